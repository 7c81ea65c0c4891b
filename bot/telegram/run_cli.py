"""``loopbot run``: start the Telegram bot (long polling, or webhook mode with --webhook-url)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run", help="run the Telegram bot (long polling, or a webhook with --webhook-url)",
        description="Run the Telegram bot. The token comes from TELEGRAM_BOT_TOKEN (or the "
                    "config file), admins from LOOPBOT_ADMINS=id1,id2.")
    # SUPPRESS: without a value here, the global `loopbot --config X run` is kept.
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML config file (default: $LOOPBOT_CONFIG)")
    parser.add_argument("--base-url",
                        help="Bot API root, e.g. http://127.0.0.1:8081/bot for a "
                             "self-hosted Bot API server")
    parser.add_argument("--model", help="GGUF model file")
    parser.add_argument("--db", help="SQLite database file")
    parser.add_argument("--prompts", help="directory of prompt version YAML files")
    from bot.telegram.run_options import add_run_arguments

    add_run_arguments(parser)  # --health-port, --webhook-url, --listen, --log-json
    parser.set_defaults(func=run, configures_logging=True)


def run(args: argparse.Namespace) -> int:
    from bot.config import ConfigError, load_settings
    from bot.telegram.app import build_application
    from bot.telegram.run_options import run_overrides

    try:
        settings = load_settings(args.config, overrides={
            "telegram.base_url": args.base_url,
            "model.path": args.model,
            "storage.db": args.db,
            "prompts.directory": getattr(args, "prompts", None),
            **run_overrides(args),
        })
    except ConfigError as exc:
        print(f"loopbot run: {exc}", file=sys.stderr)
        return 2
    from bot.ops.logs import setup_logging

    if args.log_level:
        settings.logging.level = args.log_level
    setup_logging(settings.logging,
                  secrets=[settings.telegram.token, settings.telegram.webhook_secret])
    if not settings.telegram.token:
        print("loopbot run: no bot token. Create a bot with @BotFather and set "
              "TELEGRAM_BOT_TOKEN=<token>", file=sys.stderr)
        return 2
    if settings.telegram.base_url.rstrip("/").endswith(settings.telegram.token):
        print("loopbot run: --base-url must not contain the token (it is appended)",
              file=sys.stderr)
        return 2
    from telegram.error import InvalidToken, NetworkError

    from bot.llm.types import InferenceError
    from bot.prompts import PromptError
    from bot.store.backup import BackupError
    from bot.store.db import MigrationError
    from bot.telegram.run_options import serve
    from bot.versions import VersionError

    app = build_application(settings)
    token = settings.telegram.token
    try:
        serve(app, settings)  # webhook mode when telegram.webhook_url is set, else polling
    except InvalidToken:
        # PTB's own message quotes the token: never print it.
        print("loopbot run: Telegram rejected the bot token (TELEGRAM_BOT_TOKEN / "
              "telegram.token): check it with @BotFather", file=sys.stderr)
        return 1
    except NetworkError as exc:
        print(f"loopbot run: cannot reach the Bot API at {settings.telegram.base_url}: "
              f"{str(exc).replace(token, '<token>')}", file=sys.stderr)
        return 1
    except (InferenceError, PromptError, MigrationError, VersionError, ConfigError,
            BackupError, OSError) as exc:
        # Start-up problems an operator can fix: say what, without a traceback.
        print(f"loopbot run: {str(exc).replace(token, '<token>')}", file=sys.stderr)
        return 1
    return 0
