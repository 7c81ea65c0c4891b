"""The operations flags of ``loopbot run`` and the choice between polling and webhook.

``bot/telegram/run_cli.py`` calls these three functions, so the flags' meaning lives next to
the code that implements them.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from bot.config import Settings

if TYPE_CHECKING:
    from bot.telegram.state import BotApp


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    ops = parser.add_argument_group("operations")
    ops.add_argument("--health-port", type=int, metavar="PORT",
                     help="serve /healthz and /metrics on this port (health.port; 0 = off)")
    ops.add_argument("--health-host", metavar="HOST",
                     help="address of the health endpoint (health.host, default 127.0.0.1)")
    ops.add_argument("--webhook-url", metavar="URL",
                     help="webhook mode: the public HTTPS URL Telegram posts updates to "
                          "(telegram.webhook_url); its path is served locally. Without it: "
                          "long polling")
    ops.add_argument("--listen", metavar="HOST:PORT",
                     help="webhook mode: where the local webhook server binds, behind the "
                          "reverse proxy (telegram.webhook_listen, default 0.0.0.0:8443). The "
                          "secret token comes from LOOPBOT_WEBHOOK_SECRET. Replicas set "
                          "LOOPBOT_WEBHOOK_REGISTER=false and share one secret, registered "
                          "once with `loopbot webhook set`")
    ops.add_argument("--log-json", action="store_true", default=None,
                     help="one JSON object per log line (logging.json)")


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted settings for :func:`bot.config.load_settings` (None = not given)."""
    return {
        "health.port": getattr(args, "health_port", None),
        "health.host": getattr(args, "health_host", None),
        "telegram.webhook_url": getattr(args, "webhook_url", None),
        "telegram.webhook_listen": getattr(args, "listen", None),
        "logging.json": getattr(args, "log_json", None),
    }


def serve(application: BotApp, settings: Settings) -> None:
    """Webhook mode when ``telegram.webhook_url`` is set, long polling otherwise; returns
    when the bot stopped (SIGINT/SIGTERM)."""
    if settings.telegram.webhook_url:
        from bot.telegram.app import run_webhook

        run_webhook(application, settings)
    else:
        from bot.telegram.app import run_polling
        from bot.telegram.webhook import check_polling

        check_polling(settings.telegram)  # polling would delete the replicas' webhook
        run_polling(application)
