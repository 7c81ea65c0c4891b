"""Webhook mode: Telegram POSTs updates to us instead of us polling for them.

Semantics of the settings (and of ``loopbot run --webhook-url URL --listen HOST:PORT``):
- ``telegram.webhook_url`` is the public HTTPS address Telegram posts to, as registered with
  ``setWebhook``. Its path is also the path the local server answers on, so a reverse proxy
  forwards ``location /that/path`` unchanged (see deploy/nginx.conf).
- ``telegram.webhook_listen`` (``HOST:PORT``, ``[::1]:PORT`` for IPv6) is where the local HTTP
  server binds; behind a proxy that is 127.0.0.1 and a free port.
- ``telegram.webhook_secret`` (``LOOPBOT_WEBHOOK_SECRET``) is sent by Telegram in the
  ``X-Telegram-Bot-Api-Secret-Token`` header of every update; the webhook server
  (:mod:`bot.telegram.webhook_server`) answers 403 to a request without it.
- ``telegram.webhook_register`` (``LOOPBOT_WEBHOOK_REGISTER``, default true) says who
  registers the webhook:

  - true (one bot): ``loopbot run`` calls ``setWebhook`` at every start. The secret may then
    be left empty: a random one is made at each start, and nobody else needs to know it.
  - false (several replicas behind a load balancer, deploy/compose.replicas.yaml): the
    webhook is registered once with ``loopbot webhook set`` (:mod:`bot.telegram.webhook_cli`)
    and no start replaces it; a start that did would change the secret under the other
    replicas' feet. Every replica must be given the one secret that was registered (a start
    without one is refused), and at start each asks ``getWebhookInfo`` once and logs a
    warning when Telegram delivers to another URL, or without an update type the bot
    handles. That check never stops the start: Telegram may be unreachable for a moment,
    and the updates wait there.

  Long polling deletes any webhook when it starts (``getUpdates`` and a webhook exclude each
  other), so ``webhook_register: false`` without a ``webhook_url`` is refused as well: one
  replica started without its URL would take the updates away from all the others.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from telegram import Update

from bot.config import ConfigError, TelegramConfig

log = logging.getLogger(__name__)

# The update types the bot handles, asked for by polling and by every webhook registration
# (``loopbot run`` and ``loopbot webhook set`` alike).
ALLOWED_UPDATES: tuple[str, ...] = (Update.MESSAGE, Update.CALLBACK_QUERY,
                                    Update.MESSAGE_REACTION)
# What Telegram delivers when a webhook was registered without allowed_updates: every type
# except these (Bot API, setWebhook).
_NOT_DELIVERED_BY_DEFAULT = frozenset({"chat_member", "message_reaction",
                                       "message_reaction_count"})
# Telegram's rule for secret_token: 1-256 characters, A-Z a-z 0-9 _ -.
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
# The only ports api.telegram.org delivers webhooks to.
TELEGRAM_WEBHOOK_PORTS = frozenset({443, 80, 88, 8443})
# Named in every refusal about a missing secret or URL.
_SECRET_KEY = "telegram.webhook_secret (LOOPBOT_WEBHOOK_SECRET)"
_REGISTER_KEY = "telegram.webhook_register (LOOPBOT_WEBHOOK_REGISTER)"


@dataclass(frozen=True)
class WebhookPlan:
    webhook_url: str
    listen_host: str
    listen_port: int
    url_path: str
    secret_token: str
    # True when no secret was configured and this one was generated for this run.
    secret_generated: bool
    # True: register with setWebhook at start; False: `loopbot webhook set` did (replicas).
    register: bool = True


@dataclass(frozen=True)
class WebhookRegistration:
    """What ``loopbot webhook set`` registers: the configured URL and the shared secret."""

    webhook_url: str
    secret_token: str


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[IPv6]:PORT`` / ``:PORT`` (all interfaces) -> (host, port)."""
    text = value.strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", text)
    if not match:
        raise ConfigError(f"telegram.webhook_listen: expected HOST:PORT, got {value!r}")
    host = match[1] if match[1] is not None else (match[3] or "0.0.0.0")
    port = int(match[2] if match[2] is not None else match[4])
    if not 0 < port < 65536:
        raise ConfigError(f"telegram.webhook_listen: port {port} is out of range")
    return host, port


def _uses_official_api(tg: TelegramConfig) -> bool:
    return (urlsplit(tg.base_url).hostname or "").lower() == "api.telegram.org"


def _check_url(tg: TelegramConfig) -> SplitResult:
    url = tg.webhook_url.strip()
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"telegram.webhook_url: expected https://host/path, got {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError("telegram.webhook_url: must not have a ?query or #fragment")
    if _uses_official_api(tg):
        # A self-hosted Bot API server (or a test one) also delivers to http and other ports.
        if parts.scheme != "https":
            raise ConfigError("telegram.webhook_url: Telegram only delivers to https:// URLs")
        port = parts.port or 443
        if port not in TELEGRAM_WEBHOOK_PORTS:
            raise ConfigError(f"telegram.webhook_url: Telegram only delivers to ports "
                              f"{', '.join(map(str, sorted(TELEGRAM_WEBHOOK_PORTS)))}, "
                              f"not {port}")
    return parts


def _check_secret(secret: str) -> None:
    if not _SECRET_RE.match(secret):
        raise ConfigError("telegram.webhook_secret: 1-256 characters of A-Z, a-z, 0-9, _ and -")


def plan_webhook(tg: TelegramConfig) -> WebhookPlan:
    """Check the webhook settings and work out what to bind and register."""
    parts = _check_url(tg)
    host, listen_port = parse_listen(tg.webhook_listen)
    secret, generated = tg.webhook_secret, False
    if secret:
        _check_secret(secret)
    elif not tg.webhook_register:
        # A generated one would differ from the one `loopbot webhook set` registered: every
        # update would get 403.
        raise ConfigError(f"{_SECRET_KEY} is empty, but {_REGISTER_KEY} is false: replicas "
                          "behind a load balancer must all be given the secret that "
                          "`loopbot webhook set` registered (make one with: python3 -c "
                          "\"import secrets; print(secrets.token_urlsafe(32))\")")
    else:
        secret, generated = secrets.token_urlsafe(32), True
    return WebhookPlan(webhook_url=tg.webhook_url.strip(), listen_host=host,
                       listen_port=listen_port, url_path=parts.path.strip("/"),
                       secret_token=secret, secret_generated=generated,
                       register=tg.webhook_register)


def check_polling(tg: TelegramConfig) -> None:
    """Long polling deletes the webhook at start: refused when somebody else owns it."""
    if not tg.webhook_url and not tg.webhook_register:
        raise ConfigError(f"{_REGISTER_KEY} is false, but telegram.webhook_url "
                          "(LOOPBOT_WEBHOOK_URL) is empty: long polling would delete the "
                          "webhook that the replicas share. Set the webhook URL (webhook "
                          "mode), or webhook_register true for a single bot that polls")


def registration(tg: TelegramConfig) -> WebhookRegistration:
    """What ``loopbot webhook set`` registers. Unlike a single bot's start, it needs the
    secret configured: the replicas that receive the updates must know it."""
    if not tg.webhook_url.strip():
        raise ConfigError("telegram.webhook_url (LOOPBOT_WEBHOOK_URL, or --webhook-url) is "
                          "empty: give the public https:// URL that Telegram posts to")
    _check_url(tg)
    if not tg.webhook_secret:
        raise ConfigError(f"{_SECRET_KEY} is empty: the replicas must share the secret that "
                          "is registered, so it is not generated here. Set the same one for "
                          "`loopbot webhook set` and every replica (make one with: python3 -c "
                          "\"import secrets; print(secrets.token_urlsafe(32))\")")
    _check_secret(tg.webhook_secret)
    return WebhookRegistration(webhook_url=tg.webhook_url.strip(),
                               secret_token=tg.webhook_secret)


def registration_problems(registered_url: str, registered_updates: Sequence[str],
                          expected_url: str,
                          expected_updates: Sequence[str] = ALLOWED_UPDATES) -> list[str]:
    """What is wrong with the webhook Telegram has (``getWebhookInfo``) for a bot that serves
    ``expected_url``: one sentence per problem, none when it is right. An empty
    ``registered_updates`` is Telegram's default set (everything but reactions and
    chat_member)."""
    if not registered_url:
        return [f"no webhook is registered with Telegram: updates wait there until "
                f"`loopbot webhook set` registers {expected_url}"]
    problems = []
    if registered_url != expected_url:
        problems.append(f"Telegram delivers updates to {registered_url}, not to "
                        f"telegram.webhook_url {expected_url}: run `loopbot webhook set` "
                        f"with this configuration, or correct LOOPBOT_WEBHOOK_URL")
    if registered_updates:
        missing = [u for u in expected_updates if u not in registered_updates]
    else:
        missing = [u for u in expected_updates if u in _NOT_DELIVERED_BY_DEFAULT]
    if missing:
        problems.append(f"the registered webhook does not ask for {', '.join(missing)} "
                        f"updates (registered: "
                        f"{', '.join(registered_updates) or 'Telegram default'}): they are "
                        f"never delivered; run `loopbot webhook set` again")
    return problems
