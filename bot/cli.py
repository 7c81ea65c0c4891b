"""``loopbot`` command line: one parser, each feature registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from bot.errors import LoopbotError

# Modules exposing ``register(subparsers)``; imported when the parser is built, so each keeps
# its heavy imports (llama.cpp, telegram, matplotlib) inside its handlers.
COMMAND_MODULES = (
    "bot.telegram.run_cli",
    "bot.telegram.webhook_cli",
    "bot.console",
    "bot.llm.model_cli",
    "bot.bench",
    "bot.prompts_cli",
    "bot.ops.backup_cli",
    "bot.ops.db_cli",
    "bot.experiment_cli",
    "bot.learning_cli",
    "bot.simulate_cli",
    "bot.replay_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopbot",
        description="A Telegram sentiment bot on a small local model that improves its "
        "prompts from users' feedback.",
    )
    parser.add_argument("--config", default=None,
                        help="YAML settings file (default: $LOOPBOT_CONFIG, else built-in "
                        "defaults); see config.example.yaml")
    parser.add_argument("--log-level", default=None, type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="DEBUG, INFO, WARNING or ERROR")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    _accept_config_everywhere(parser)
    return parser


def _accept_config_everywhere(parser: argparse.ArgumentParser) -> None:
    """Let ``--config`` follow any subcommand too (``loopbot console --config X``).

    SUPPRESS as the default: a subcommand given no ``--config`` keeps the global one.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--config" not in sub._option_string_actions:
                    sub.add_argument("--config", default=argparse.SUPPRESS,
                                     help="YAML settings file (default: $LOOPBOT_CONFIG)")
                _accept_config_everywhere(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not getattr(args, "configures_logging", False):
        # Tools stay quiet unless asked; the bot sets up its own logging from the config.
        logging.basicConfig(
            level=(args.log_level or "WARNING").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        code: int = args.func(args)
    except LoopbotError as exc:
        print(f"loopbot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `loopbot model info X | head`: the reader left; not an error worth a traceback.
        sys.stderr.close()
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
