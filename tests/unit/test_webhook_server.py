"""The webhook server over real HTTP on 127.0.0.1: checks before reads, limits while reading.

Requests that must not be read are sent by hand over a socket: headers announcing a huge body
and then only a few bytes of it. An answer that comes back at once was given without the body,
since the body was never sent. Memory is read from /proc/self/statm while the server is being
flooded in this same process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from bot.telegram.webhook_server import WebhookServer

PATH = "/telegram/loopbot"
SECRET = "s3cret-token_for-tests-0123456789"
MB = 1024 * 1024
TEXT = "my very private message text"
UPDATE = {"update_id": 7001, "message": {"message_id": 5, "text": TEXT,
                                         "chat": {"id": 42, "type": "private"}}}

Accept = Callable[[dict[str, Any]], Awaitable[None]]


class Inbox:
    """A stand-in for the durable inbox: records what it was given, or fails."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []
        self.fail: Exception | None = None

    async def __call__(self, update: dict[str, Any]) -> None:
        if self.fail is not None:
            raise self.fail
        self.updates.append(update)


ServerFactory = Callable[..., Awaitable[WebhookServer]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    started: list[WebhookServer] = []

    async def make(accept: Accept, **kwargs: Any) -> WebhookServer:
        kwargs.setdefault("secret", SECRET)
        server = WebhookServer(PATH, accept=accept, host="127.0.0.1", port=0, **kwargs)
        await server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


async def _post(port: int, body: bytes, *, secret: str | None = SECRET, path: str = PATH,
                headers: dict[str, str] | None = None) -> int:
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if secret is not None:
        all_headers["X-Telegram-Bot-Api-Secret-Token"] = secret
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{port}{path}", data=body, headers=all_headers) as resp:
        assert await resp.read() == b"" or resp.status >= 400
        return resp.status


def _head(*, secret: str | None = SECRET, length: int | None = None,
          chunked: bool = False) -> bytes:
    lines = [f"POST {PATH} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if secret is not None:
        lines.append(f"X-Telegram-Bot-Api-Secret-Token: {secret}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _raw(port: int, data: bytes, *, timeout: float = 3.0) -> tuple[int, float]:
    """Sends ``data`` and nothing more; returns the status and how long it took to come."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        start = time.monotonic()
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            status_line = await reader.readline()
        return int(status_line.split()[1]), time.monotonic() - start
    finally:
        writer.close()


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


CHUNK = bytes(64 * 1024)


async def _flood(port: int, head: bytes, body_bytes: int, *, chunked: bool = False) -> int:
    """Sends ``head`` and then ``body_bytes`` of body from one reused 64 KiB buffer (so the
    client's own memory stays flat), whatever the server answers meanwhile, until the body is
    sent or the server closes the connection. Returns the status the server answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status = asyncio.create_task(reader.readline())
    piece = _chunked(CHUNK) if chunked else CHUNK
    try:
        writer.write(head)
        sent = 0
        while sent < body_bytes:
            writer.write(piece)
            await writer.drain()
            sent += len(CHUNK)
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the server closed the connection on a body it would not read
    try:
        async with asyncio.timeout(10):
            return int((await status).split()[1])
    finally:
        writer.close()


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _peak_rss_growth(work: Awaitable[Any]) -> int:
    """The most the process's resident memory grew over its value before ``work``."""
    before = _rss()
    peak = before
    task = asyncio.ensure_future(work)
    while not task.done():
        peak = max(peak, _rss())
        await asyncio.sleep(0.005)
    await task
    return max(peak, _rss()) - before


# --- the happy path ---------------------------------------------------------------------------


async def test_a_good_update_is_handed_to_accept_and_answered_200_empty(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox)
    assert await _post(server.port, json.dumps(UPDATE).encode()) == 200
    assert inbox.updates == [UPDATE]


async def test_the_path_may_be_given_without_its_leading_slash(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = WebhookServer(PATH.lstrip("/"), SECRET, inbox, "127.0.0.1", 0)
    await server.start()
    try:
        assert await _post(server.port, json.dumps(UPDATE).encode()) == 200
    finally:
        await server.stop()
    assert inbox.updates == [UPDATE]


async def test_an_empty_secret_means_no_check(make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox, secret="")
    assert await _post(server.port, json.dumps(UPDATE).encode(), secret=None) == 200
    assert await _post(server.port, json.dumps(UPDATE).encode(), secret="anything") == 200
    assert len(inbox.updates) == 2


async def test_a_chunked_update_within_the_limit_is_accepted(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox)
    body = json.dumps(UPDATE).encode()
    status, _ = await _raw(server.port, _head(chunked=True) + _chunked(body[:10])
                           + _chunked(body[10:]) + b"0\r\n\r\n")
    assert status == 200
    assert inbox.updates == [UPDATE]


async def test_the_port_is_known_only_while_running(inbox: Inbox) -> None:
    server = WebhookServer(PATH, SECRET, inbox, "127.0.0.1", 0)
    with pytest.raises(RuntimeError):
        _ = server.port
    await server.start()
    assert server.port > 0
    await server.stop()
    with pytest.raises(RuntimeError):
        _ = server.port
    assert SECRET not in repr(server)


# --- path, method, secret ---------------------------------------------------------------------


async def test_other_paths_are_404_and_other_methods_405(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox)
    assert await _post(server.port, json.dumps(UPDATE).encode(), path="/other") == 404
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{server.port}{PATH}") as resp:
        assert resp.status == 405
    assert inbox.updates == []


@pytest.mark.parametrize("secret", [None, "", "wrong", SECRET[:-1], SECRET + "x", "é" * 10])
async def test_a_missing_or_wrong_secret_is_403_and_nothing_is_accepted(
        make_server: ServerFactory, inbox: Inbox, secret: str | None) -> None:
    server = await make_server(inbox)
    assert await _post(server.port, json.dumps(UPDATE).encode(), secret=secret) == 403
    assert inbox.updates == []


async def test_the_secret_is_checked_before_any_body_byte_is_read(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox)
    # 95 MB announced, 5 bytes sent: the answer cannot have waited for the body.
    for secret in (None, "wrong"):
        status, took = await _raw(server.port, _head(secret=secret, length=95 * MB) + b'{"upd')
        assert status == 403
        assert took < 1.0
    # Chunked, likewise: only the first bytes of a chunk are ever sent.
    status, _ = await _raw(server.port, _head(secret="wrong", chunked=True) + b"100000\r\n{")
    assert status == 403
    assert inbox.updates == []


# --- size -------------------------------------------------------------------------------------


async def test_a_content_length_over_the_limit_is_413_before_reading(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox, max_body_bytes=MB)
    status, took = await _raw(server.port, _head(length=MB + 1) + b"{")
    assert (status, took < 1.0) == (413, True)
    status, _ = await _raw(server.port, _head(length=95 * MB) + b"{")
    assert status == 413
    # Exactly the limit is fine (it is then read, and is no update).
    body = b" " * (MB - 2) + b"{}"
    assert await _post(server.port, body) == 400
    assert inbox.updates == []


async def test_no_content_length_and_not_chunked_is_411(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox)
    status, _ = await _raw(server.port, _head())
    assert status == 411
    assert inbox.updates == []


async def test_a_compressed_body_is_415(make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox)
    status = await _post(server.port, b"\x1f\x8b", headers={"Content-Encoding": "gzip"})
    assert status == 415
    assert inbox.updates == []


async def test_a_chunked_body_over_the_limit_is_413(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox, max_body_bytes=MB)
    assert await _flood(server.port, _head(chunked=True), 5 * MB, chunked=True) == 413
    assert inbox.updates == []


async def test_a_chunked_flood_buffers_no_more_than_about_the_limit(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox, max_body_bytes=MB)
    head = _head(chunked=True)
    assert await _flood(server.port, head, 2 * MB, chunked=True) == 413  # warm up
    growth = await _peak_rss_growth(asyncio.gather(
        *(_flood(server.port, head, 100 * MB, chunked=True) for _ in range(4))))
    # Read in full, that would be 400 MB; each request holds at most ~1 MB before its 413.
    assert growth < 16 * MB, f"RSS grew by {growth / MB:.1f} MB"
    assert inbox.updates == []


async def test_a_content_length_smaller_than_the_body_reads_only_that_many_bytes(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox, max_body_bytes=MB)
    # 20 bytes declared, 5 MB sent: the body is the 20 bytes (no update), the rest is never
    # taken for a body; the connection closes.
    status = await _flood(server.port, _head(length=20), 5 * MB)
    assert status == 400
    assert inbox.updates == []


async def test_eight_95_mb_requests_without_the_secret_cost_no_memory(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox)
    head = _head(secret=None, length=95 * MB)
    assert await _flood(server.port, head, MB) == 403  # warm up
    results: list[int] = []

    async def flood_all() -> None:
        results.extend(await asyncio.gather(
            *(_flood(server.port, head, 95 * MB) for _ in range(8))))

    growth = await _peak_rss_growth(flood_all())
    assert results == [403] * 8
    # Read in full, that would be 760 MB (the tornado server went from 203 MB to 1,245 MB).
    assert growth < 8 * MB, f"RSS grew by {growth / MB:.1f} MB"
    assert inbox.updates == []


# --- time and concurrency ---------------------------------------------------------------------


async def test_a_slow_body_is_408_after_the_read_timeout(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox, read_timeout_s=0.3)
    status, took = await _raw(server.port, _head(length=100) + b'{"update_id": ')
    assert status == 408
    assert 0.3 <= took < 2.0
    assert inbox.updates == []


async def test_requests_over_max_concurrent_are_503_at_once(
        make_server: ServerFactory) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    stored: list[int] = []

    async def slow_accept(update: dict[str, Any]) -> None:
        started.set()
        await release.wait()
        stored.append(update["update_id"])

    server = await make_server(slow_accept, max_concurrent=1)
    first = asyncio.create_task(_post(server.port, json.dumps({"update_id": 1}).encode()))
    await asyncio.wait_for(started.wait(), 5)
    assert await _post(server.port, json.dumps({"update_id": 2}).encode()) == 503
    release.set()
    assert await first == 200
    # The slot is free again.
    assert await _post(server.port, json.dumps({"update_id": 3}).encode()) == 200
    assert stored == [1, 3]


async def test_stop_lets_an_update_being_stored_finish(inbox: Inbox) -> None:
    async def slow_accept(update: dict[str, Any]) -> None:
        await asyncio.sleep(0.3)
        await inbox(update)

    server = WebhookServer(PATH, SECRET, slow_accept, "127.0.0.1", 0)
    await server.start()
    request = asyncio.create_task(_post(server.port, json.dumps(UPDATE).encode()))
    await asyncio.sleep(0.1)
    await server.stop()
    assert await request == 200
    assert inbox.updates == [UPDATE]


# --- content ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"", b"not json", b"\x80\x81", b"[1, 2]", b'"text"', b"{}", b'{"message": {}}',
    b'{"update_id": "7001"}', b'{"update_id": 1.5}', b'{"update_id": true}',
    b'{"update_id": null}', b"[" * 100_000 + b"]" * 100_000,
], ids=["empty", "garbage", "not-utf8", "array", "string", "empty-object", "no-update-id",
        "string-id", "float-id", "bool-id", "null-id", "deeply-nested"])
async def test_a_body_that_is_not_an_update_is_400(
        make_server: ServerFactory, inbox: Inbox, body: bytes) -> None:
    server = await make_server(inbox)
    assert await _post(server.port, body) == 400
    assert inbox.updates == []


async def test_accept_failing_is_503_so_telegram_redelivers(
        make_server: ServerFactory, inbox: Inbox) -> None:
    server = await make_server(inbox)
    inbox.fail = RuntimeError("database is locked")
    assert await _post(server.port, json.dumps(UPDATE).encode()) == 503
    inbox.fail = None
    assert await _post(server.port, json.dumps(UPDATE).encode()) == 200
    assert inbox.updates == [UPDATE]


# --- logs -------------------------------------------------------------------------------------


async def test_logs_carry_neither_the_secret_nor_the_text_above_debug(
        make_server: ServerFactory, inbox: Inbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = await make_server(inbox)
    good = json.dumps(UPDATE).encode()
    assert await _post(server.port, good) == 200
    assert await _post(server.port, good, secret="wrong") == 403
    assert await _post(server.port, json.dumps({**UPDATE, "update_id": TEXT}).encode()) == 400
    assert await _post(server.port, b"{" + TEXT.encode()) == 400
    inbox.fail = ValueError(f"cannot store {TEXT}")
    assert await _post(server.port, good) == 503
    # A broken chunked encoding: aiohttp's parser quotes the bytes (only at DEBUG here).
    bad_chunk = _head(chunked=True) + f"zz {TEXT}\r\n".encode()
    assert (await _raw(server.port, bad_chunk))[0] == 400

    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert all(SECRET not in line for _, line in lines)
    assert all(TEXT not in line for level, line in lines if level > logging.DEBUG)
    errors = [line for level, line in lines if level == logging.ERROR]
    assert errors == ["webhook: update 7001 could not be stored (ValueError); answered 503, "
                      "Telegram will deliver it again"]
    warnings = [line for level, line in lines if level == logging.WARNING]
    assert any("403" in line and "secret" in line for line in warnings)
    assert any("400" in line and "update_id is a str" in line for line in warnings)
    assert any("malformed HTTP (BadHttpMessage), answered 400" in line for line in warnings)
    # ... and what aiohttp had to say, with the bytes, is still there for debugging.
    assert any(TEXT in line for level, line in lines if level == logging.DEBUG) or any(
        TEXT in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


async def test_rejections_anyone_can_cause_are_logged_once_per_interval(
        make_server: ServerFactory, inbox: Inbox, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="bot.telegram.webhook_server")
    server = await make_server(inbox)
    for _ in range(5):
        assert await _post(server.port, b"{}", secret="wrong") == 403
    assert len([r for r in caplog.records if "403" in r.getMessage()]) == 1
