"""``loopbot webhook set | delete | info``: the bot's webhook registration with Telegram.

A single bot registers its webhook itself at every start. Replicas behind a load balancer do
not (``telegram.webhook_register: false``, :mod:`bot.telegram.webhook`): the webhook is
registered once, with the secret they all share, by ``loopbot webhook set``. ``info`` shows
what Telegram has (URL, waiting updates, its last delivery error) and what in it does not
match this configuration; ``delete`` removes the webhook (long polling works again).

Refusals (no token, no URL, no secret, a bad value) are :class:`bot.config.ConfigError`:
``loopbot`` prints them on one line and exits with 2. Telegram refusing a call, or being out
of reach, is a :class:`WebhookError`: one line, exit code 1, as ``loopbot run`` does. Neither
the token nor the secret is ever printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from bot.errors import LoopbotError

if TYPE_CHECKING:
    from telegram import Bot, WebhookInfo

    from bot.config import Settings

T = TypeVar("T")


class WebhookError(LoopbotError, RuntimeError):
    """Telegram refused a webhook call, or could not be reached (exit code 1)."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "webhook", help="register, inspect or delete the bot's webhook with Telegram",
        description="Manage the webhook Telegram delivers updates to. Replicas behind a load "
                    "balancer run with LOOPBOT_WEBHOOK_REGISTER=false and one shared "
                    "LOOPBOT_WEBHOOK_SECRET; the webhook is registered once with "
                    "`loopbot webhook set`.")
    sub = parser.add_subparsers(dest="webhook_command", metavar="{set,delete,info}")
    sub.required = True

    set_ = sub.add_parser(
        "set", help="register telegram.webhook_url with the shared secret",
        description="Register the webhook (setWebhook) with telegram.webhook_url, the secret "
                    "telegram.webhook_secret (required: the replicas check it), the update "
                    "types `loopbot run` handles, and the pending updates kept.")
    _common(set_)
    set_.add_argument("--webhook-url", metavar="URL",
                      help="the public HTTPS URL Telegram posts to (default: "
                           "telegram.webhook_url / LOOPBOT_WEBHOOK_URL)")
    set_.add_argument("--max-connections", type=int, metavar="N",
                      help="connections Telegram opens at once, 1-100 (Telegram's default: "
                           "40)")
    set_.set_defaults(func=run_set)

    delete = sub.add_parser(
        "delete", help="remove the webhook (updates wait at Telegram, or go to polling)",
        description="Remove the webhook (deleteWebhook). Replicas get no update until it is "
                    "set again; the waiting updates are kept unless --drop-pending.")
    _common(delete)
    delete.add_argument("--drop-pending", action="store_true",
                        help="also drop the updates Telegram is holding (default: kept for "
                             "the next webhook or getUpdates)")
    delete.set_defaults(func=run_delete)

    info = sub.add_parser(
        "info", help="show the webhook Telegram has (getWebhookInfo)",
        description="Print getWebhookInfo: URL, pending updates, the last delivery error, "
                    "max connections, IP address, allowed updates; and what in it does not "
                    "match this configuration.")
    _common(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=run_info)


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: do not overwrite the top-level `loopbot --config FILE` with None.
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML config file (default: $LOOPBOT_CONFIG)")
    parser.add_argument("--base-url",
                        help="Bot API root (telegram.base_url), e.g. "
                             "http://127.0.0.1:8081/bot for a self-hosted Bot API server")


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    from bot.config import ConfigError, load_settings

    settings = load_settings(getattr(args, "config", None),
                             overrides={"telegram.base_url": args.base_url, **overrides})
    tg = settings.telegram
    if not tg.token:
        raise ConfigError("no bot token: set TELEGRAM_BOT_TOKEN (or telegram.token) to the "
                          "token @BotFather gave")
    if tg.base_url.rstrip("/").endswith(tg.token):
        raise ConfigError("telegram.base_url (--base-url) must not contain the token (it is "
                          "appended)")
    return settings


def _call(settings: Settings, action: Callable[[Bot], Awaitable[T]]) -> T:
    """Run ``action`` with an initialised Bot; Telegram's failures become WebhookErrors with
    the token taken out of their text."""
    import asyncio

    from telegram import Bot
    from telegram.error import BadRequest, InvalidToken, NetworkError, TelegramError, TimedOut

    tg = settings.telegram

    async def with_bot() -> T:
        async with Bot(tg.token, base_url=tg.base_url, base_file_url=tg.base_file_url) as bot:
            return await action(bot)

    def clean(exc: BaseException) -> str:
        return str(exc).replace(tg.token, "<token>")

    # BadRequest and TimedOut are NetworkErrors in python-telegram-bot: they come first.
    try:
        return asyncio.run(with_bot())
    except InvalidToken:
        raise WebhookError("Telegram rejected the bot token (TELEGRAM_BOT_TOKEN / "
                           "telegram.token): check it with @BotFather") from None
    except BadRequest as exc:
        raise WebhookError(f"Telegram refused: {clean(exc)}") from None
    except TimedOut:
        raise WebhookError(f"no answer from the Bot API at {tg.base_url} in time") from None
    except NetworkError as exc:
        raise WebhookError(f"cannot reach the Bot API at {tg.base_url}: {clean(exc)}") from None
    except TelegramError as exc:
        raise WebhookError(f"Telegram refused: {clean(exc)}") from None


def _failing_with_1(name: str, run: Callable[[argparse.Namespace], int]
                    ) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except WebhookError as exc:
            print(f"loopbot webhook {name}: {exc}", file=sys.stderr)
            return 1

    return wrapped


# --- set ----------------------------------------------------------------------------------


def _set(args: argparse.Namespace) -> int:
    from bot.config import ConfigError
    from bot.telegram.webhook import ALLOWED_UPDATES, registration

    settings = _settings(args, **{"telegram.webhook_url": args.webhook_url})
    target = registration(settings.telegram)  # URL and shared secret, or a refusal
    if args.max_connections is not None and not 1 <= args.max_connections <= 100:
        raise ConfigError(f"--max-connections: must be 1-100, got {args.max_connections}")

    async def action(bot: Bot) -> WebhookInfo:
        await bot.set_webhook(target.webhook_url, secret_token=target.secret_token,
                              allowed_updates=list(ALLOWED_UPDATES),
                              drop_pending_updates=False,
                              max_connections=args.max_connections)
        return await bot.get_webhook_info()

    info = _call(settings, action)
    print(f"webhook set: {info.url or target.webhook_url}")
    print(f"  allowed updates: {', '.join(ALLOWED_UPDATES)}")
    print(f"  pending updates: {info.pending_update_count} (kept)")
    print("  secret token: telegram.webhook_secret (not shown); every replica needs the same "
          "one, with LOOPBOT_WEBHOOK_REGISTER=false")
    return 0


run_set = _failing_with_1("set", _set)


# --- delete -------------------------------------------------------------------------------


def _delete(args: argparse.Namespace) -> int:
    settings = _settings(args)
    drop = bool(args.drop_pending)

    async def action(bot: Bot) -> WebhookInfo:
        before = await bot.get_webhook_info()
        await bot.delete_webhook(drop_pending_updates=drop)
        return before

    before = _call(settings, action)
    waiting = _updates(before.pending_update_count)
    what = (f"{waiting} dropped" if drop else
            f"{waiting} kept for the next webhook or getUpdates")
    if before.url:
        print(f"webhook deleted (was {before.url}); {what}")
        print("  replicas with LOOPBOT_WEBHOOK_REGISTER=false get no updates until "
              "`loopbot webhook set`")
    else:
        print(f"no webhook was set; {what}")
    return 0


run_delete = _failing_with_1("delete", _delete)


# --- info ---------------------------------------------------------------------------------


def info_json(info: WebhookInfo) -> dict[str, Any]:
    """getWebhookInfo with the Bot API's field names, every field present (null when Telegram
    left it out), dates as Unix times."""
    return {
        "url": info.url,
        "has_custom_certificate": info.has_custom_certificate,
        "pending_update_count": info.pending_update_count,
        "ip_address": info.ip_address,
        "last_error_date": _unix(info.last_error_date),
        "last_error_message": info.last_error_message,
        "last_synchronization_error_date": _unix(info.last_synchronization_error_date),
        "max_connections": info.max_connections,
        # null: Telegram's default set (every type but chat_member and reactions).
        "allowed_updates": list(info.allowed_updates) if info.allowed_updates else None,
    }


def describe(info: WebhookInfo, *, now: float | None = None) -> list[str]:
    """getWebhookInfo for people, one field a line."""
    at = time.time() if now is None else now

    def when(date: datetime | None) -> str:
        if date is None:
            return "none"
        ago = max(0, int(at - date.timestamp()))
        return f"{date:%Y-%m-%d %H:%M:%S} UTC ({_duration(ago)} ago)"

    error = when(info.last_error_date)
    if info.last_error_date is not None and info.last_error_message:
        error += f": {info.last_error_message}"
    rows = [
        ("url", info.url or "(none: no webhook is set; getUpdates works)"),
        ("pending updates", str(info.pending_update_count)),
        ("last error", error),
        ("last sync error", when(info.last_synchronization_error_date)),
        ("max connections", "-" if info.max_connections is None
         else str(info.max_connections)),
        ("ip address", info.ip_address or "-"),
        ("allowed updates", ", ".join(info.allowed_updates) if info.allowed_updates
         else "Telegram's default (all but chat_member and reactions)"),
        ("custom certificate", "yes" if info.has_custom_certificate else "no"),
    ]
    return [f"{name + ':':<20}{value}" for name, value in rows]


def _info(args: argparse.Namespace) -> int:
    import json

    from bot.telegram.webhook import registration_problems

    settings = _settings(args)

    async def action(bot: Bot) -> WebhookInfo:
        return await bot.get_webhook_info()

    info = _call(settings, action)
    configured = settings.telegram.webhook_url.strip()
    problems = (registration_problems(info.url, info.allowed_updates or (), configured)
                if configured else [])
    if args.json:
        print(json.dumps({**info_json(info), "configured_url": configured or None,
                          "problems": problems}, ensure_ascii=False, indent=2))
        return 0
    print("\n".join(describe(info)))
    for problem in problems:
        print(f"warning: {problem}")
    return 0


run_info = _failing_with_1("info", _info)


def _updates(count: int) -> str:
    return f"{count} pending update{'' if count == 1 else 's'}"


def _unix(date: datetime | None) -> int | None:
    return None if date is None else int(date.timestamp())


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172_800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86_400} days"
