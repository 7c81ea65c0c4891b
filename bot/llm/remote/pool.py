"""The inference servers the bot talks to: which one serves a request, which are down.

One chat's requests go to the same server while it is up (rendezvous hashing on the chat),
so the server's prompt cache holds that chat's previous exchange. A server that refuses a
connection or does not accept one within the connect timeout is marked down and its chats
move to the next server in their order; a watcher polls it and takes it back when it answers
again, so a restarted server is used without restarting the bot. Overload (429, 503) and
slowness are not "down": they are answered "busy" for that request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from bot.llm.types import InferenceError, ServerBusy, ServerUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# Connection failures: the server is not there (stopped, crashed, wrong address).
_UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout)


@dataclass
class Server:
    url: str
    down_since: float | None = None
    reason: str = ""

    @property
    def up(self) -> bool:
        return self.down_since is None


class ServerPool:
    def __init__(self, urls: list[str], *, api_key: str = "", connect_timeout_s: float = 3.0,
                 retry_s: float = 5.0, parallel: int = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not urls:
            raise InferenceError("no inference server URL is configured (model.url)")
        self.servers = [Server(url.rstrip("/")) for url in urls]
        self.retry_s = retry_s
        self._clock = clock
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No overall read timeout here: each request is bounded by the runtime's own limit
        # (verdict_timeout_s / reply_timeout_s); the connect timeout is what says "down".
        self.client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(None, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=parallel * len(urls) + 4,
                                max_keepalive_connections=parallel * len(urls)))
        self._slots = {s.url: asyncio.Semaphore(parallel) for s in self.servers}
        self._watcher: asyncio.Task[None] | None = None

    # -- choosing a server -----------------------------------------------------------------
    def order(self, key: str) -> list[Server]:
        """The servers to try for ``key``, best first: those up in the key's own order, then
        those down (the longest down last), so a chat keeps its server while it is up."""
        def rank(server: Server) -> bytes:
            return hashlib.blake2b(f"{key}|{server.url}".encode(), digest_size=8).digest()

        ranked = sorted(self.servers, key=rank, reverse=True)
        return ([s for s in ranked if s.up]
                + sorted((s for s in ranked if not s.up), key=lambda s: s.down_since or 0.0,
                         reverse=True))

    def mark_down(self, server: Server, reason: str) -> None:
        if server.up:
            log.warning("inference server %s is down: %s", server.url, reason)
            server.down_since = self._clock()
        server.reason = reason

    def mark_up(self, server: Server) -> None:
        if not server.up:
            log.info("inference server %s answers again", server.url)
        server.down_since, server.reason = None, ""

    def problems(self) -> list[str]:
        """One line per server that is down, for /healthz."""
        now = self._clock()
        return [f"inference server {s.url}: down for {now - (s.down_since or now):.0f}s "
                f"({s.reason})" for s in self.servers if not s.up]

    @property
    def any_up(self) -> bool:
        return any(s.up for s in self.servers)

    # -- requests --------------------------------------------------------------------------
    async def call(self, key: str, request: Callable[[Server], Awaitable[T]]) -> T:
        """``request`` on the first server for ``key`` that can be reached. Only a failed
        connection moves on to the next server (nothing was sent); any other failure is this
        request's answer."""
        reasons: list[str] = []
        for server in self.order(key):
            async with self._slots[server.url]:
                try:
                    result = await request(server)
                except _UNREACHABLE as exc:
                    self.mark_down(server, _describe(exc))
                    reasons.append(f"{server.url}: {server.reason}")
                    continue
                except httpx.HTTPError as exc:
                    # Connected, then the answer broke off (a crash, a proxy cutting it): an
                    # error of this request; if the server is gone, the next one finds out.
                    raise InferenceError(f"inference server {server.url} broke off its "
                                         f"answer: {_describe(exc)}") from exc
                except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                    # An answer of an unexpected shape: this request's error, not a crash.
                    raise InferenceError(f"inference server {server.url} answered in an "
                                         f"unexpected shape: {_describe(exc)}") from exc
            self.mark_up(server)
            return result
        raise ServerUnavailable("no inference server can be reached: " + "; ".join(reasons))

    async def each(self, request: Callable[[Server], Awaitable[T]]) -> dict[str, T]:
        """``request`` on every server that can be reached, by URL (at start)."""
        answers: dict[str, T] = {}
        for server in self.servers:
            try:
                answers[server.url] = await request(server)
            except _UNREACHABLE as exc:
                self.mark_down(server, _describe(exc))
                continue
            except httpx.HTTPError as exc:
                raise InferenceError(f"inference server {server.url}: {_describe(exc)}") \
                    from exc
            self.mark_up(server)
        return answers

    async def post_json(self, server: Server, path: str, body: dict[str, Any]) -> Any:
        response = await self.client.post(server.url + path, json=body)
        return parse_json(server, path, response)

    async def get_json(self, server: Server, path: str) -> Any:
        response = await self.client.get(server.url + path)
        return parse_json(server, path, response)

    @contextlib.asynccontextmanager
    async def stream(self, server: Server, path: str,
                     body: dict[str, Any]) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Server-sent events of a streamed POST, as JSON objects (``[DONE]`` ends them)."""
        async with self.client.stream("POST", server.url + path, json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                raise_for_status(server, path, response)
            yield _events(server, path, response)

    # -- watching servers that are down ---------------------------------------------------
    def start_watching(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="loopbot-server-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.retry_s))
            for server in [s for s in self.servers if not s.up]:
                try:
                    await self._probe(server)
                except Exception as exc:  # the watcher must outlive any odd answer
                    log.warning("probing %s failed: %s", server.url, exc)
                    server.reason = _describe(exc)

    async def _probe(self, server: Server) -> None:
        """llama-server and vLLM answer /health; Ollama and LM Studio have none, but list
        their models: either answering 200 means the server is back."""
        status = 0
        for path in ("/health", "/v1/models"):
            try:
                response = await self.client.get(server.url + path, timeout=httpx.Timeout(5.0))
            except httpx.HTTPError as exc:
                server.reason = _describe(exc)
                return
            status = response.status_code
            if status == 200:
                self.mark_up(server)
                return
            if status != 404:
                break
        server.reason = f"/health answers {status}"

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self.client.aclose()


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "no connection within the connect timeout"
    if isinstance(exc, httpx.ConnectError):
        return f"connection refused or failed: {exc}" if str(exc) else "connection refused"
    return f"{type(exc).__name__}: {exc}"


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:200]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))[:200]
    return str(error or body)[:200]


def raise_for_status(server: Server, path: str, response: httpx.Response) -> None:
    """Overload (429, 503) is "busy"; anything else that failed is an error of this request."""
    code = response.status_code
    if code < 400:
        return
    message = _error_message(response)
    if code in (429, 503):
        raise ServerBusy(f"inference server {server.url} is overloaded ({code}: {message})")
    raise InferenceError(f"inference server {server.url}{path} answered {code}: {message}")


def parse_json(server: Server, path: str, response: httpx.Response) -> Any:
    raise_for_status(server, path, response)
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InferenceError(f"inference server {server.url}{path} answered something that "
                             f"is not JSON: {response.text[:120]!r}") from None


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of a server-sent event stream, split at "\n" (and "\r\n") only.

    Why not ``aiter_lines``: httpx splits like ``str.splitlines``, also at U+2028, U+2029,
    U+0085 and \x1c-\x1e, which JSON may carry raw inside a string. llama-server writes a
    token's text raw, so a reply containing one of them (a random-weight model's did) was cut
    in two and read as broken JSON."""
    buffer = ""
    async for chunk in response.aiter_text():
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if buffer:
        yield buffer.removesuffix("\r")


async def _events(server: Server, path: str,
                  response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in sse_lines(response):
        if not line.startswith("data:"):
            continue  # blank separators, comments, "event:" lines
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise InferenceError(f"inference server {server.url}{path} streamed something "
                                 f"that is not JSON: {data[:120]!r}") from None
        if not isinstance(event, dict):
            raise InferenceError(f"inference server {server.url}{path} streamed {data[:120]!r}")
        if "error" in event:
            error = event["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            code = error.get("code") if isinstance(error, dict) else None
            if code in (429, 503):
                raise ServerBusy(f"inference server {server.url} is overloaded ({message})")
            raise InferenceError(f"inference server {server.url}{path}: {message}")
        yield event
