"""The webhook endpoint: a small aiohttp server that takes Telegram's update POSTs.

It replaces python-telegram-bot's tornado server, which read bodies of up to 100 MB before
looking at the secret token and answered Telegram before the update was stored. Here each
request goes through, in this order, and stops at the first failure:

1. path and method: ``POST {path}``, else 404 / 405;
2. the ``X-Telegram-Bot-Api-Secret-Token`` header (constant-time comparison), before a single
   body byte is read: 403;
3. the declared size, still without reading: no ``Content-Length`` (and not chunked) 411, a
   ``Content-Length`` over ``max_body_bytes`` 413, a ``Content-Encoding`` 415 (Telegram does
   not compress, and a compressed body is a small upload that inflates);
4. a free slot: at most ``max_concurrent`` requests read or store at once, the rest get 503
   at once instead of piling up;
5. the body, read with the limit enforced as it arrives (a chunked body over the limit: 413
   after at most ``max_body_bytes`` + one network read were buffered) and within
   ``read_timeout_s`` (a slow sender: 408);
6. JSON: an object with an integer ``update_id``, else 400;
7. ``await accept(update)``: it returned, so the update is stored: 200 with an empty body; it
   raised: 503, and Telegram delivers the update again later.

Rejected requests close the connection (after at most ``LINGERING_TIME_S`` of draining, so
the client can read the answer). Logs never carry the secret or the update's content: a
rejection names the reason and at most the ``update_id``, and rejections an outsider can cause
at will are logged at most once per ``REJECT_LOG_INTERVAL_S`` per kind, with a count.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
# Telegram's updates are a few KB; a message with a long entity list stays far below this.
DEFAULT_MAX_BODY_BYTES = 1_048_576
# A whole body must arrive within this (aiohttp has no per-request body timeout).
DEFAULT_READ_TIMEOUT_S = 10.0
# Telegram opens at most 100 connections to a webhook (setWebhook's max_connections, 40 by
# default); a few more leave room for a retry racing its own first attempt.
DEFAULT_MAX_CONCURRENT = 128
# How long a rejected request's unread body is drained (and thrown away) before the
# connection closes, so the client reads the answer instead of a reset.
LINGERING_TIME_S = 1.0
# Idle keep-alive connections, and connections that never finish their headers, close after
# this (aiohttp's default is an hour).
KEEPALIVE_TIMEOUT_S = 75.0
# stop() lets requests being stored finish for this long, then cancels them (Telegram
# redelivers what got no 200).
SHUTDOWN_TIMEOUT_S = 5.0
REJECT_LOG_INTERVAL_S = 10.0

Accept = Callable[[dict[str, Any]], Awaitable[None]]


class _Reject(Exception):
    """Ends a request with ``status``; ``reason`` goes to the log (never request content)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _ThrottledLog:
    """One WARNING per kind per interval, with how many were left out in between."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, message: str) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        more = f" ({skipped} more like it since the last such line)" if skipped else ""
        log.warning("%s%s", message, more)


class _HttpLog(logging.Logger):
    """aiohttp's server logger for this server. A malformed request (anyone can send one)
    becomes one throttled WARNING naming the error's type, not aiohttp's ERROR with a
    traceback quoting the request's bytes (those go to DEBUG). Everything else is passed on
    to ``bot.telegram.webhook_server.http`` as it is."""

    def __init__(self, rejections: _ThrottledLog) -> None:
        super().__init__(f"{__name__}.http")
        self._rejections = rejections
        self._target = logging.getLogger(self.name)

    def handle(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and record.levelno > logging.DEBUG:
            # The message is aiohttp's "Error handling request from <peer>"; the exception's
            # own text quotes the offending bytes.
            self._rejections.warning(f"http-{exc.code}",
                                     f"webhook: {record.getMessage()}: malformed HTTP "
                                     f"({type(exc).__name__}), answered {exc.code}")
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if self._target.isEnabledFor(record.levelno):
            self._target.handle(record)


class WebhookServer:
    """``POST {path}`` for Telegram's updates, handed to ``accept`` before answering 200."""

    def __init__(self, path: str, secret: str, accept: Accept, host: str, port: int,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, *,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                 max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> None:
        if max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        if max_concurrent <= 0:
            raise ValueError("max_concurrent must be positive")
        # webhook.plan_webhook strips the slashes: "telegram/loopbot" and "/telegram/loopbot"
        # name the same path.
        self.path = path if path.startswith("/") else "/" + path
        self._secret = secret.encode()
        self._accept = accept
        self.host = host
        self.requested_port = port
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.max_concurrent = max_concurrent
        self._in_flight = 0
        self._rejections = _ThrottledLog(REJECT_LOG_INTERVAL_S)
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:  # the secret stays out of reprs, hence out of tracebacks
        return f"WebhookServer(path={self.path!r}, host={self.host!r}, port={self.requested_port})"

    async def start(self) -> None:
        # client_max_size also bounds request.read()/json(), should anything ever call them;
        # the handler below reads the body itself, with the same limit.
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post(self.path, self._handle)
        # No access log: it would name every request, and the answer is logged when it matters.
        runner = web.AppRunner(app, access_log=None, logger=_HttpLog(self._rejections),
                               lingering_time=LINGERING_TIME_S,
                               keepalive_timeout=KEEPALIVE_TIMEOUT_S,
                               shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.requested_port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("webhook server on http://%s:%d%s (secret token %s)", self.host, self.port,
                 self.path, "required" if self._secret else "NOT checked")

    @property
    def port(self) -> int:
        """The bound port (differs from the configured one when that was 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the webhook server is not running")
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            self._check_headers(request)
            if self._in_flight >= self.max_concurrent:
                raise _Reject(503, f"{self._in_flight} requests already being handled")
            self._in_flight += 1
            try:
                body = await self._read_body(request)
                update = self._parse(body)
                return await self._store(update)
            finally:
                self._in_flight -= 1
        except _Reject as reject:
            self._rejections.warning(str(reject.status),
                                     f"webhook: answered {reject.status} to a request from "
                                     f"{request.remote}: {reject.reason}")
            response = web.Response(status=reject.status)
            # Whatever is left of the body is not read: no keep-alive after it.
            response.force_close()
            return response

    def _check_headers(self, request: web.Request) -> None:
        if self._secret:
            given = request.headers.get(SECRET_HEADER, "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, self._secret):
                raise _Reject(403, "missing or wrong secret token")
        length = request.content_length
        if length is None:
            if request.headers.get(hdrs.TRANSFER_ENCODING, "").lower() != "chunked":
                raise _Reject(411, "no Content-Length")
        elif length > self.max_body_bytes:
            raise _Reject(413, f"Content-Length {length} is over the limit of "
                               f"{self.max_body_bytes} bytes")
        encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
        if encoding != "identity":
            raise _Reject(415, "compressed body")

    async def _read_body(self, request: web.Request) -> bytes:
        body = bytearray()
        try:
            async with asyncio.timeout(self.read_timeout_s):
                while chunk := await request.content.readany():
                    if len(body) + len(chunk) > self.max_body_bytes:
                        raise _Reject(413, f"body over the limit of {self.max_body_bytes} "
                                           f"bytes")
                    body += chunk
        except TimeoutError:
            raise _Reject(408, f"body not received within {self.read_timeout_s:g}s "
                               f"({len(body)} bytes came)") from None
        except _Reject:
            raise
        except Exception as exc:  # the client went away, or a broken chunked encoding
            raise _Reject(400, f"body could not be read ({type(exc).__name__})") from None
        return bytes(body)

    def _parse(self, body: bytes) -> dict[str, Any]:
        try:
            update = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            # JSONDecodeError's message names a position, never the document.
            where = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            raise _Reject(400, f"body of {len(body)} bytes is not JSON ({where})") from None
        if not isinstance(update, dict):
            raise _Reject(400, f"body is a JSON {type(update).__name__}, not an object")
        update_id = update.get("update_id")
        if type(update_id) is not int:  # bool is an int subclass, and not an update_id
            raise _Reject(400, "update has no integer update_id" if update_id is None else
                               f"update_id is a {type(update_id).__name__}, not an integer")
        return update

    async def _store(self, update: dict[str, Any]) -> web.Response:
        update_id = update["update_id"]
        try:
            await self._accept(update)
        except Exception as exc:
            # The exception's text is left out: it may quote the update. The traceback is
            # there at DEBUG for whoever runs with it.
            log.error("webhook: update %d could not be stored (%s); answered 503, Telegram "
                      "will deliver it again", update_id, type(exc).__name__)
            log.debug("webhook: update %d: accept failed", update_id, exc_info=True)
            return web.Response(status=503)
        return web.Response(status=200)
