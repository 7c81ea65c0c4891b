"""Webhook mode: Telegram POSTs updates to us instead of us polling for them.

Semantics of the settings (and of ``loopbot run --webhook-url URL --listen HOST:PORT``):
- ``telegram.webhook_url`` is the public HTTPS address Telegram posts to, as registered with
  ``setWebhook``. Its path is also the path the local server answers on, so a reverse proxy
  forwards ``location /that/path`` unchanged (see deploy/nginx.conf).
- ``telegram.webhook_listen`` (``HOST:PORT``, ``[::1]:PORT`` for IPv6) is where the local HTTP
  server binds; behind a proxy that is 127.0.0.1 and a free port.
- ``telegram.webhook_secret`` (``LOOPBOT_WEBHOOK_SECRET``) is sent by Telegram in the
  ``X-Telegram-Bot-Api-Secret-Token`` header of every update; python-telegram-bot answers 403
  to a request without it. Left empty, a random one is made at each start: ``setWebhook`` is
  called at each start anyway, so nobody needs to know it.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from bot.config import ConfigError, TelegramConfig

log = logging.getLogger(__name__)

# Telegram's rule for secret_token: 1-256 characters, A-Z a-z 0-9 _ -.
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
# The only ports api.telegram.org delivers webhooks to.
TELEGRAM_WEBHOOK_PORTS = frozenset({443, 80, 88, 8443})


@dataclass(frozen=True)
class WebhookPlan:
    webhook_url: str
    listen_host: str
    listen_port: int
    url_path: str
    secret_token: str
    # True when no secret was configured and this one was generated for this run.
    secret_generated: bool


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


def plan_webhook(tg: TelegramConfig) -> WebhookPlan:
    """Check the webhook settings and work out what to bind and register."""
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
    host, listen_port = parse_listen(tg.webhook_listen)
    secret, generated = tg.webhook_secret, False
    if not secret:
        secret, generated = secrets.token_urlsafe(32), True
    elif not _SECRET_RE.match(secret):
        raise ConfigError("telegram.webhook_secret: 1-256 characters of A-Z, a-z, 0-9, _ and -")
    return WebhookPlan(webhook_url=url, listen_host=host, listen_port=listen_port,
                       url_path=parts.path.strip("/"), secret_token=secret,
                       secret_generated=generated)
