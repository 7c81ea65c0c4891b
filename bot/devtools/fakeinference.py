"""A scripted fake of llama.cpp's ``llama-server`` HTTP API on loopback, for tests of a remote
inference backend's error paths (the real llama-server covers the happy path elsewhere).

It serves ``/health``, ``/props``, ``/v1/models``, ``/tokenize``, ``/detokenize``,
``/completion`` (streamed or not, with ``completion_probabilities``), ``/v1/completions``,
``/v1/chat/completions`` and ``/metrics`` with the real server's JSON shapes (llama.cpp
``tools/server``: ``server-context.cpp``, ``server-task.cpp``), records every request, and lets
a test script what the next requests get: an error status (429 with ``Retry-After``, 503
"Loading model" / "no slot available"...), a slow answer, a malformed body, a stream cut in the
middle, a connection reset, a given reply; ``down()`` closes the listening socket (connections
are refused) and ``up()`` listens again on the same port.

**Token ids are toy ids**, not Qwen's: a UTF-8 byte ``b`` is token ``BYTE_OFFSET + b``; with
``parse_special`` the strings ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` are 151643,
151644, 151645 (as in Qwen's vocabulary); a generated piece of more than one byte gets an id of
its own from ``PIECE_OFFSET`` on (``piece_id``), which ``/detokenize`` knows. ``add_special``
adds nothing (Qwen adds no BOS) unless ``bos_id`` is given.

**Generation is scripted**: a reply is the list of pieces ``reply`` (or a ``reply(...)``
behaviour's), one token per piece, cut at ``n_predict`` / ``max_tokens`` (``stop_type``
``"limit"``) or at a ``stop`` word (``"word"``), else ending with ``"eos"``. A positive
``logit_bias`` forces the token with the largest bias instead (``n_predict`` times, or once).
A token's log-probability is ``logprobs[id]`` (``default_logprob`` for the others); the
``top_logprobs`` are the best ``n_probs`` of ``logprobs`` and the generated token, padded with
byte tokens below them. ``post_sampling_probs`` only renames the fields (``prob`` = e^logprob).

Scripting, from the test thread (thread-safe)::

    fake.on("/completion", rate_limited(retry_after=2), times=3)  # the next 3 requests
    fake.always("*", slow(first_byte=0.5))                         # every endpoint, until clear()
    fake.on("/completion", held(gate) | reply(["a", "b"]))         # answers once gate.set()
    fake.set_loading(True); fake.down(); fake.up()
    fake.clear()
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

BYTE_OFFSET = 1000
PIECE_OFFSET = 160_000
N_VOCAB = 200_000
ENDOFTEXT, IM_START, IM_END = 151_643, 151_644, 151_645
SPECIAL_TOKENS: dict[str, int] = {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START,
                                  "<|im_end|>": IM_END}
_SPECIAL_TEXT = {v: k for k, v in SPECIAL_TOKENS.items()}
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")
# End-of-generation tokens: forcing one ends the completion with "eos" and no text.
_EOG = {ENDOFTEXT, IM_END}
_FILLER = "etaoinshrdlucmfwypvbgkjqxz"

# The endpoints, by the paths that reach them (as registered in llama.cpp's server.cpp).
_ALIASES = {"/v1/health": "/health", "/completions": "/completion", "/models": "/v1/models",
            "/chat/completions": "/v1/chat/completions"}
_PUBLIC = {"/health"}
_GENERATING = {"/completion", "/v1/completions", "/v1/chat/completions"}
# What ``missing_fields()`` drops when it names none: what a client needs from each answer.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "/health": ("status",),
    "/props": ("model_path", "total_slots", "default_generation_settings"),
    "/v1/models": ("data",),
    "/tokenize": ("tokens",),
    "/detokenize": ("content",),
    "/completion": ("content", "completion_probabilities", "stop", "stop_type",
                    "tokens_predicted"),
    "/v1/completions": ("choices",),
    "/v1/chat/completions": ("choices",),
}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                500: "server_error", 501: "not_supported_error", 503: "unavailable_error"}
_JSON = "application/json; charset=utf-8"
_BUILD = "b0000-fakeinference"

Fault = Literal["invalid_json", "missing_fields", "cut", "reset", "stream_error"]
CutHow = Literal["end", "close", "reset"]


# --- scripted behaviours ---------------------------------------------------------------------

@dataclass(frozen=True)
class Behaviour:
    """How one request is answered. Build them with the functions below (``rate_limited()``,
    ``slow()``, ...); ``a | b`` combines two (``b``'s settings win where both set one)."""

    name: str = "normal"
    # An error answer: HTTP status, the error's message and type ({"error": {...}} body).
    error: tuple[int, str, str] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # A raw answer, sent as is.
    raw: tuple[int, bytes, str] | None = None
    first_byte_delay: float = 0.0
    # Answer only once this is set (the test decides when): deterministic "slow".
    gate: threading.Event | None = None
    chunk_delay: float = 0.0
    pieces: tuple[str, ...] | None = None
    stop_type: str | None = None
    fault: Fault | None = None
    missing: tuple[str, ...] = ()
    after: int = 1
    how: CutHow = "close"

    def __or__(self, other: Behaviour) -> Behaviour:
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(other, f.name)
            if f.name != "name" and value != f.default:
                changes[f.name] = value
        name = other.name if self.name == "normal" else (
            self.name if other.name == "normal" else f"{self.name}+{other.name}")
        return dataclasses.replace(self, name=name, **changes)


NORMAL = Behaviour()


def error(status: int, message: str, type_: str | None = None, *,
          retry_after: int | str | None = None) -> Behaviour:
    """HTTP ``status`` with llama-server's error body ``{"error": {"code", "message", "type"}}``
    (and a ``Retry-After`` header if given)."""
    headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
    return Behaviour(name=f"error {status}",
                     error=(status, message, type_ or _ERROR_TYPES.get(status, "server_error")),
                     headers=headers)


def rate_limited(retry_after: int | str = 1, message: str = "Too Many Requests") -> Behaviour:
    """429 with ``Retry-After`` (seconds, or an HTTP date), as a proxy in front would say."""
    return dataclasses.replace(error(429, message, retry_after=retry_after), name="429")


def loading() -> Behaviour:
    """503 "Loading model", what every endpoint says while the model loads."""
    return dataclasses.replace(error(503, "Loading model", "unavailable_error"), name="loading")


def no_slot() -> Behaviour:
    """503 "no slot available" (``/slots?fail_on_no_slot``, proxies that shed load)."""
    return dataclasses.replace(error(503, "no slot available", "unavailable_error"),
                               name="no slot")


def slow(first_byte: float = 0.0, between_chunks: float = 0.0) -> Behaviour:
    """Wait ``first_byte`` seconds before answering, ``between_chunks`` between streamed
    events. The waits end early (the connection closed) on ``down()`` / ``stop()``."""
    return Behaviour(name="slow", first_byte_delay=first_byte, chunk_delay=between_chunks)


def held(gate: threading.Event) -> Behaviour:
    """Answer nothing until the test sets ``gate`` (then answer as usual, after any
    ``first_byte`` delay): a request kept in flight for exactly as long as a test needs."""
    return Behaviour(name="held", gate=gate)


def reply(pieces: Iterable[str], stop_type: str | None = None) -> Behaviour:
    """Generate these pieces (one token each); ``stop_type`` overrides the computed one."""
    return Behaviour(name="reply", pieces=tuple(pieces), stop_type=stop_type)


def invalid_json() -> Behaviour:
    """200 with a body cut in the middle of its JSON (streamed: the first event's)."""
    return Behaviour(name="invalid json", fault="invalid_json")


def missing_fields(*fields: str) -> Behaviour:
    """200 with valid JSON lacking ``fields`` (top-level keys; by default what a client needs
    from that endpoint), in every streamed event too."""
    return Behaviour(name="missing fields", fault="missing_fields", missing=tuple(fields))


def cut_stream(after: int = 1, how: CutHow = "close") -> Behaviour:
    """Send ``after`` token events, never the final one, then: ``"end"`` ends the HTTP body
    properly, ``"close"`` closes the connection mid-body, ``"reset"`` resets it. Not streamed:
    half the body, then the connection closed (or reset)."""
    return Behaviour(name=f"cut stream ({how})", fault="cut", after=after, how=how)


def stream_error(after: int = 1, status: int = 500, message: str = "stream failed",
                 type_: str | None = None) -> Behaviour:
    """Send ``after`` token events, then ``data: {"error": {...}}`` and end the stream, as
    llama-server does when a task fails mid-stream. Not streamed: the error answer."""
    return Behaviour(name="stream error", fault="stream_error", after=after,
                     error=(status, message, type_ or _ERROR_TYPES.get(status, "server_error")))


def connection_reset() -> Behaviour:
    """Read the request, then reset the connection (TCP RST) without a byte of answer."""
    return Behaviour(name="reset", fault="reset")


def raw(status: int, body: bytes | str, content_type: str = _JSON,
        headers: dict[str, str] | None = None) -> Behaviour:
    """Answer exactly this."""
    data = body.encode() if isinstance(body, str) else body
    return Behaviour(name=f"raw {status}", raw=(status, data, content_type),
                     headers=tuple((headers or {}).items()))


# --- what was asked --------------------------------------------------------------------------

@dataclass
class Request:
    method: str
    path: str              # as sent, without the query string
    endpoint: str          # the canonical path (``/v1/health`` -> ``/health``)
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: Any              # the parsed JSON body, None if absent or not JSON
    raw: bytes
    at: float = field(default_factory=time.monotonic)
    behaviour: str = "normal"
    status: int = 0        # the HTTP status answered (0: none, the connection was dropped)

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True


@dataclass
class _Token:
    id: int
    piece: bytes


@dataclass
class _Generation:
    tokens: list[_Token]
    stop_type: str
    stopping_word: str
    n_prompt: int
    n_probs: int
    post_sampling: bool

    @property
    def text(self) -> str:
        return b"".join(t.piece for t in self.tokens).decode("utf-8", errors="replace")


class _Killed(Exception):
    """The server went down (or stopped) while this request was being answered."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_


# --- the server ------------------------------------------------------------------------------

class FakeLlamaServer:
    def __init__(self, *, model_path: str = "/models/qwen1_5-0_5b-chat-q8_0.gguf",
                 model_id: str | None = None, total_slots: int = 1, n_ctx: int = 2048,
                 reply: Sequence[str] = ("Hello", ",", " world", "!"),
                 logprobs: dict[int, float] | None = None, default_logprob: float = -3.0,
                 api_key: str | None = None, bos_id: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.model_path = model_path
        self.model_id = model_id or model_path.replace("\\", "/").rsplit("/", 1)[-1]
        self.total_slots = total_slots
        self.n_ctx = n_ctx
        self.api_key = api_key
        self.bos_id = bos_id
        self.host = host
        self.requests: list[Request] = []
        self._reply = list(reply)
        self._logprobs = dict(logprobs or {})
        self._default_logprob = default_logprob
        self._loading = False
        self._queues: dict[str, list[Behaviour]] = {}
        self._modes: dict[str, Behaviour] = {}
        self._piece_ids: dict[bytes, int] = {}
        self._id_pieces: dict[int, bytes] = {}
        self._metrics = {"prompt_tokens_total": 0, "tokens_predicted_total": 0,
                         "n_decode_total": 0, "requests_processing": 0}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._server: _Server | None = _Server((host, 0), self)
        self._port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None
        self._blackhole: list[socket.socket] = []
        self._started = False

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def start(self) -> FakeLlamaServer:
        if not self._started:
            self._started = True
            self._serve()
        return self

    def stop(self) -> None:
        self.down()
        self._close_blackhole()

    def __enter__(self) -> FakeLlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def down(self, *, blackhole: bool = False) -> None:
        """Stop listening, as a crashed server: the listening socket is closed (connections
        are refused) and open connections are closed, answers in progress cut. With
        ``blackhole``, the port instead accepts no connection and never answers (a full
        backlog: connecting times out), as a host that is up but whose server hangs."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.killed.set()
            if thread is not None:
                server.shutdown()  # only returns once serve_forever has ended
            server.server_close()
            server.drop_connections()
            if thread is not None:
                thread.join(5)
        if blackhole:
            self._open_blackhole()

    def up(self) -> None:
        """Listen again, on the same port."""
        self._close_blackhole()
        if self._server is None:
            self._server = _Server((self.host, self._port), self)
            self._serve()

    def _serve(self) -> None:
        assert self._server is not None
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name=f"fake-llama-server:{self._port}")
        self._thread.start()

    def _open_blackhole(self) -> None:
        if self._blackhole:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._port))
        listener.listen(0)
        self._blackhole.append(listener)
        # Fill the accept queue (never accepted): later SYNs are dropped, connects time out.
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        filler.connect_ex((self.host, self._port))
        select.select([], [filler], [], 1.0)
        self._blackhole.append(filler)

    def _close_blackhole(self) -> None:
        for sock in self._blackhole:
            with contextlib.suppress(OSError):
                sock.close()
        self._blackhole = []

    # --- scripting -----------------------------------------------------------------------

    def on(self, path: str, behaviour: Behaviour, times: int | None = 1) -> None:
        """The next ``times`` requests to ``path`` (``"*"``: any endpoint) get ``behaviour``;
        ``times=None``: all of them until ``clear()``. Queued behaviours go first, the
        endpoint's own before ``"*"``'s."""
        key = _canonical(path)
        with self._cond:
            if times is None:
                self._modes[key] = behaviour
            else:
                self._queues.setdefault(key, []).extend([behaviour] * times)

    def always(self, path: str, behaviour: Behaviour) -> None:
        self.on(path, behaviour, times=None)

    def clear(self, path: str | None = None) -> None:
        """Forget what was scripted for ``path`` (every path if None); also ends ``loading``."""
        with self._cond:
            if path is None:
                self._queues.clear()
                self._modes.clear()
                self._loading = False
            else:
                key = _canonical(path)
                self._queues.pop(key, None)
                self._modes.pop(key, None)

    def pending(self, path: str) -> int:
        """How many queued behaviours ``path`` still has."""
        with self._cond:
            return len(self._queues.get(_canonical(path), []))

    def set_loading(self, loading: bool = True) -> None:
        """Every endpoint, ``/health`` included, answers 503 "Loading model" (the real
        server's state middleware) until ``set_loading(False)``."""
        with self._cond:
            self._loading = loading

    def set_reply(self, pieces: Sequence[str]) -> None:
        with self._cond:
            self._reply = list(pieces)

    def set_logprobs(self, logprobs: dict[int, float], default: float | None = None) -> None:
        with self._cond:
            self._logprobs = dict(logprobs)
            if default is not None:
                self._default_logprob = default

    def logprob(self, token: int) -> float:
        with self._cond:
            return self._logprobs.get(token, self._default_logprob)

    def _behaviour_for(self, endpoint: str) -> Behaviour:
        with self._cond:
            for key in (endpoint, "*"):
                queue = self._queues.get(key)
                if queue:
                    return queue.pop(0)
            return self._modes.get(endpoint) or self._modes.get("*") or NORMAL

    # --- assertions ----------------------------------------------------------------------

    def requests_to(self, path: str) -> list[Request]:
        key = _canonical(path)
        with self._cond:
            return [r for r in self.requests if r.endpoint == key]

    def last(self, path: str) -> Request:
        found = self.requests_to(path)
        if not found:
            raise AssertionError(f"no request to {path}")
        return found[-1]

    def wait_requests(self, path: str, count: int = 1, timeout: float = 10.0) -> list[Request]:
        """Until ``count`` requests to ``path`` have arrived (answered or not)."""
        deadline = time.monotonic() + timeout
        key = _canonical(path)
        with self._cond:
            while True:
                found = [r for r in self.requests if r.endpoint == key]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {count} requests to {path}; "
                                         f"got {len(found)}")
                self._cond.wait(left)

    # --- the toy tokenizer ---------------------------------------------------------------

    def tokenize(self, text: str, *, parse_special: bool = True,
                 add_special: bool = False) -> list[int]:
        tokens = [self.bos_id] if add_special and self.bos_id is not None else []
        parts = _SPECIAL_RE.split(text) if parse_special else [text]
        for part in parts:
            if parse_special and part in SPECIAL_TOKENS:
                tokens.append(SPECIAL_TOKENS[part])
            else:
                tokens += [BYTE_OFFSET + b for b in part.encode("utf-8")]
        return tokens

    def detokenize(self, tokens: Iterable[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """A token's piece (b"" for an id the toy vocabulary does not know)."""
        if BYTE_OFFSET <= token < BYTE_OFFSET + 256:
            return bytes([token - BYTE_OFFSET])
        if token in _SPECIAL_TEXT:
            return _SPECIAL_TEXT[token].encode()
        with self._cond:
            return self._id_pieces.get(token, b"")

    def piece_id(self, piece: str | bytes) -> int:
        """The id a generated piece gets: its byte's, a special token's, or one of its own."""
        data = piece.encode("utf-8") if isinstance(piece, str) else piece
        text = data.decode("utf-8", errors="replace")
        if text in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[text]
        if len(data) == 1:
            return BYTE_OFFSET + data[0]
        with self._cond:
            token = self._piece_ids.get(data)
            if token is None:
                token = PIECE_OFFSET + len(self._piece_ids)
                self._piece_ids[data] = token
                self._id_pieces[token] = data
            return token

    # --- answering -----------------------------------------------------------------------

    def _record(self, request: Request) -> None:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()

    def _answered(self, request: Request, status: int) -> None:
        """Recorded before the answer is written, so a client that has it sees it recorded."""
        with self._cond:
            request.status = status
            self._cond.notify_all()

    def _handle(self, h: _Handler, method: str) -> None:
        split = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        data = h.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(data) if data else None
            bad_json: str | None = None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            body, bad_json = None, str(exc)
        endpoint = _canonical(split.path)
        request = Request(method=method, path=split.path, endpoint=endpoint,
                          query=dict(parse_qsl(split.query)),
                          headers={k.lower(): v for k, v in h.headers.items()},
                          body=body, raw=data)
        with self._cond:
            # While "loading", every request gets 503 and scripted behaviours wait.
            behaviour = loading() if self._loading else self._behaviour_for(endpoint)
        request.behaviour = behaviour.name
        self._record(request)
        if behaviour.gate is not None:
            h.wait_for(behaviour.gate)
        h.wait(behaviour.first_byte_delay)

        if behaviour.fault == "reset":
            h.reset()
            return
        if behaviour.raw is not None:
            status, payload, content_type = behaviour.raw
            self._answered(request, status)
            h.send(status, payload, content_type, behaviour.headers)
            return
        if behaviour.error is not None and behaviour.fault != "stream_error":
            self._send_error(h, request, *behaviour.error, headers=behaviour.headers)
            return
        denied = self._check_key(request)
        if denied:
            self._send_error(h, request, 401, denied, "authentication_error")
            return
        try:
            if bad_json is not None:
                raise _BadRequest(500, f"[json.exception.parse_error] {bad_json}")
            answer = self._route(method, endpoint, body, behaviour)
        except _BadRequest as exc:
            self._send_error(h, request, exc.status, str(exc), exc.type)
            return
        if answer is None:
            self._send_error(h, request, 404, "File Not Found", "not_found_error")
            return
        if behaviour.fault == "stream_error" and behaviour.error is not None \
                and not isinstance(answer, _Events):
            self._send_error(h, request, *behaviour.error, headers=behaviour.headers)
            return
        if isinstance(answer, _Events):
            self._send_events(h, request, answer, behaviour, endpoint)
        elif isinstance(answer, str):
            self._answered(request, 200)
            h.send(200, answer.encode(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._send_json(h, request, answer, behaviour, endpoint)

    def _check_key(self, request: Request) -> str:
        if self.api_key is None or request.endpoint in _PUBLIC:
            return ""
        given = request.headers.get("authorization") or request.headers.get("x-api-key") or ""
        given = given.removeprefix("Bearer ")
        return "" if given == self.api_key else "Invalid API Key"

    def _send_error(self, h: _Handler, request: Request, status: int, message: str,
                    type_: str | None = None, headers: Sequence[tuple[str, str]] = ()) -> None:
        body = {"error": {"code": status, "message": message,
                          "type": type_ or _ERROR_TYPES.get(status, "server_error")}}
        self._answered(request, status)
        h.send(status, json.dumps(body).encode(), _JSON, headers)

    def _send_json(self, h: _Handler, request: Request, answer: Any, behaviour: Behaviour,
                   endpoint: str) -> None:
        if behaviour.fault == "missing_fields":
            answer = _without(answer, behaviour.missing or _REQUIRED.get(endpoint, ()))
        payload = json.dumps(answer).encode()
        if behaviour.fault == "invalid_json":
            payload = payload[: max(1, len(payload) // 2)]
        if behaviour.fault == "cut":
            # Announce the whole body, send half of it, then drop the connection.
            self._answered(request, 200)
            h.send_head(200, _JSON, behaviour.headers, length=len(payload))
            h.write(payload[: len(payload) // 2])
            if behaviour.how == "reset":
                h.reset()
            else:
                h.close()
            return
        self._answered(request, 200)
        h.send(200, payload, _JSON, behaviour.headers)

    def _send_events(self, h: _Handler, request: Request, events: _Events,
                     behaviour: Behaviour, endpoint: str) -> None:
        items: list[Any] = list(events.events)
        if behaviour.fault == "missing_fields":
            fields = behaviour.missing or _REQUIRED.get(endpoint, ())
            items = [_without(e, fields) for e in items]
        lines = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in items]
        if behaviour.fault == "invalid_json" and lines:
            lines[0] = lines[0][: max(8, len(lines[0]) // 2)].rstrip(b"\n") + b"\n\n"
        ending = events.done
        if behaviour.fault in ("cut", "stream_error"):
            lines, ending = lines[: min(behaviour.after, events.token_events)], b""
            if behaviour.fault == "stream_error" and behaviour.error is not None:
                status, message, type_ = behaviour.error
                lines.append(b"data: " + json.dumps({"error": {
                    "code": status, "message": message, "type": type_}}).encode() + b"\n\n")
        self._answered(request, 200)
        h.send_head(200, "text/event-stream", behaviour.headers, chunked=True)
        with self._generating():
            for i, line in enumerate(lines):
                if i:
                    h.wait(behaviour.chunk_delay)
                h.write_chunk(line)
            if ending:
                h.wait(behaviour.chunk_delay)
                h.write_chunk(ending)
        if behaviour.fault == "cut" and behaviour.how == "reset":
            h.reset()
        elif behaviour.fault == "cut" and behaviour.how == "close":
            h.close()
        else:
            h.end_chunks()

    @contextlib.contextmanager
    def _generating(self) -> Iterator[None]:
        with self._cond:
            self._metrics["requests_processing"] += 1
        try:
            yield
        finally:
            with self._cond:
                self._metrics["requests_processing"] -= 1

    def _route(self, method: str, endpoint: str, body: Any,
               behaviour: Behaviour) -> Any:
        routes: dict[tuple[str, str], Callable[[Any, Behaviour], Any]] = {
            ("GET", "/health"): lambda b, _: {"status": "ok"},
            ("GET", "/props"): lambda b, _: self._props(),
            ("GET", "/v1/models"): lambda b, _: self._models(),
            ("GET", "/metrics"): lambda b, _: self._prometheus(),
            ("POST", "/tokenize"): self._tokenize_endpoint,
            ("POST", "/detokenize"): self._detokenize_endpoint,
            ("POST", "/completion"): self._completion,
            ("POST", "/v1/completions"): self._oai_completion,
            ("POST", "/v1/chat/completions"): self._chat_completion,
        }
        handler = routes.get((method, endpoint))
        if handler is None:
            return None
        if endpoint not in ("/health", "/props", "/v1/models", "/metrics") \
                and not isinstance(body, dict):
            raise _BadRequest(500, "[json.exception.type_error.305] cannot use operator[] "
                                   "with a string argument with null")
        return handler(body, behaviour)

    # --- endpoints -----------------------------------------------------------------------

    def _props(self) -> dict[str, Any]:
        params = {"seed": 4294967295, "temperature": 0.8, "top_k": 40, "top_p": 0.95,
                  "min_p": 0.05, "typical_p": 1.0, "repeat_last_n": 64, "repeat_penalty": 1.0,
                  "presence_penalty": 0.0, "frequency_penalty": 0.0, "n_predict": -1,
                  "n_keep": 0, "n_probs": 0, "min_keep": 0, "stream": True,
                  "post_sampling_probs": False, "samplers": ["top_k", "top_p", "min_p",
                                                             "temperature"]}
        return {"default_generation_settings": {"params": params, "n_ctx": self.n_ctx},
                "total_slots": self.total_slots, "model_alias": self.model_id,
                "model_path": self.model_path,
                "modalities": {"vision": False, "video": False, "audio": False},
                "endpoint_slots": True, "endpoint_props": False, "endpoint_metrics": True,
                "chat_template": "{# toy ChatML #}", "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>", "build_info": _BUILD, "is_sleeping": False}

    def _models(self) -> dict[str, Any]:
        return {"models": [{"name": self.model_id, "model": self.model_id, "modified_at": "",
                            "size": "", "digest": "", "type": "model", "description": "",
                            "tags": [""], "capabilities": ["completion"], "parameters": "",
                            "details": {"parent_model": "", "format": "gguf", "family": "",
                                        "families": [""], "parameter_size": "",
                                        "quantization_level": ""}}],
                "object": "list",
                "data": [{"id": self.model_id, "aliases": [], "tags": [], "object": "model",
                          "created": int(time.time()), "owned_by": "llamacpp",
                          "meta": {"vocab_type": 2, "n_vocab": N_VOCAB, "n_ctx": self.n_ctx,
                                   "n_ctx_train": 32768, "n_embd": 1024,
                                   "n_params": 463_987_712, "size": 531_066_880,
                                   "ftype": "Q8_0"}}]}

    def _prometheus(self) -> str:
        with self._cond:
            m = dict(self._metrics)
        items = [("counter", "prompt_tokens_total", "Number of prompt tokens processed.",
                  m["prompt_tokens_total"]),
                 ("counter", "tokens_predicted_total", "Number of generation tokens processed.",
                  m["tokens_predicted_total"]),
                 ("counter", "n_decode_total", "Total number of llama_decode() calls",
                  m["n_decode_total"]),
                 ("gauge", "requests_processing", "Number of requests processing.",
                  m["requests_processing"]),
                 ("gauge", "requests_deferred", "Number of requests deferred.", 0)]
        return "".join(f"# HELP llamacpp:{name} {text}\n# TYPE llamacpp:{name} {kind}\n"
                       f"llamacpp:{name} {value}\n" for kind, name, text, value in items)

    def _tokenize_endpoint(self, body: dict[str, Any], _: Behaviour) -> dict[str, Any]:
        if "content" not in body:
            return {"tokens": []}
        tokens = self._mixed(body["content"], parse_special=body.get("parse_special", True) is
                             not False, add_special=body.get("add_special") is True)
        if body.get("with_pieces") is True:
            out: list[Any] = []
            for t in tokens:
                piece = self.token_bytes(t)
                try:
                    shown: Any = piece.decode("utf-8")
                except UnicodeDecodeError:
                    shown = list(piece)
                out.append({"id": t, "piece": shown})
            return {"tokens": out}
        return {"tokens": tokens}

    def _detokenize_endpoint(self, body: dict[str, Any], _: Behaviour) -> dict[str, Any]:
        tokens = body.get("tokens", [])
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise _BadRequest(500, "[json.exception.type_error.302] type must be number")
        return {"content": self.detokenize(tokens)}

    def _mixed(self, content: Any, *, parse_special: bool, add_special: bool) -> list[int]:
        """A string, or a list of token ids and strings (llama.cpp's ``tokenize_mixed``)."""
        if isinstance(content, str):
            return self.tokenize(content, parse_special=parse_special, add_special=add_special)
        if isinstance(content, list):
            tokens: list[int] = []
            for i, part in enumerate(content):
                if isinstance(part, bool):
                    raise _BadRequest(500, "\"prompt\" elements must be strings or tokens")
                if isinstance(part, int):
                    tokens.append(part)
                elif isinstance(part, str):
                    tokens += self.tokenize(part, parse_special=parse_special,
                                            add_special=add_special and i == 0)
                else:
                    raise _BadRequest(500, "\"prompt\" elements must be strings or tokens")
            return tokens
        raise _BadRequest(500, "\"prompt\" must be a string or a list of tokens")

    def _prompt_tokens(self, body: dict[str, Any]) -> int:
        if "prompt" not in body:
            raise _BadRequest(500, "\"prompt\" is required")
        tokens = self._mixed(body["prompt"], parse_special=True, add_special=True)
        if not tokens:
            raise _BadRequest(500, "\"prompt\" must not be empty")
        if len(tokens) >= self.n_ctx:
            raise _BadRequest(400, f"the request exceeds the available context size "
                                   f"({len(tokens)} tokens, n_ctx {self.n_ctx})",
                              "exceed_context_size_error")
        return len(tokens)

    def _generate(self, body: dict[str, Any], behaviour: Behaviour, n_prompt: int,
                  n_probs: int) -> _Generation:
        n_predict = _int(body.get("n_predict", body.get("max_tokens",
                                                       body.get("max_completion_tokens"))), -1)
        forced = self._forced_token(body.get("logit_bias"))
        stop_type, stopping = "eos", ""
        if forced is not None:
            if forced in _EOG:
                tokens: list[_Token] = []
            else:
                count = n_predict if n_predict > 0 else 1
                tokens = [_Token(forced, self.token_bytes(forced))] * count
                stop_type = "limit" if n_predict > 0 else "eos"
        else:
            with self._cond:
                pieces = list(behaviour.pieces if behaviour.pieces is not None else self._reply)
            tokens = [_Token(self.piece_id(p), p.encode("utf-8")) for p in pieces]
            words = body.get("stop") or []
            if isinstance(words, str):
                words = [words]
            tokens, stopping = _cut_at_stop(tokens, [w for w in words if isinstance(w, str)])
            if stopping:
                stop_type = "word"
            elif 0 <= n_predict <= len(tokens):
                tokens, stop_type = tokens[:n_predict], "limit"
        if behaviour.stop_type is not None:
            stop_type = behaviour.stop_type
        with self._cond:
            self._metrics["prompt_tokens_total"] += n_prompt
            self._metrics["tokens_predicted_total"] += len(tokens)
            self._metrics["n_decode_total"] += len(tokens) + 1
        return _Generation(tokens, stop_type, stopping, n_prompt, n_probs,
                           body.get("post_sampling_probs") is True)

    def _forced_token(self, bias: Any) -> int | None:
        """The token with the largest positive ``logit_bias``, if any."""
        pairs: list[tuple[Any, Any]] = []
        if isinstance(bias, list):
            pairs = [(e[0], e[1]) for e in bias if isinstance(e, list) and len(e) == 2]
        elif isinstance(bias, dict):
            pairs = list(bias.items())
        best: tuple[float, int] | None = None
        for key, value in pairs:
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue  # false bans a token: it forces nothing
            if isinstance(key, str) and re.fullmatch(r"-?\d+", key):
                key = int(key)
            ids = ([key] if isinstance(key, int) and not isinstance(key, bool)
                   else self.tokenize(key, parse_special=False) if isinstance(key, str) else [])
            for token in ids:
                if 0 <= token < N_VOCAB and value > 0 and (best is None or value > best[0]):
                    best = (float(value), token)
        return None if best is None else best[1]

    def _probs(self, gen: _Generation, token: _Token) -> dict[str, Any]:
        """One ``completion_probabilities`` entry, as ``probs_vector_to_json``."""
        post = gen.post_sampling
        with self._cond:
            table = dict(self._logprobs)
            default = self._default_logprob
        chosen = table.get(token.id, default)
        table.setdefault(token.id, chosen)
        ranked = sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[: gen.n_probs]
        floor = min((lp for _, lp in ranked), default=chosen)
        taken = {t for t, _ in ranked}
        fillers = (BYTE_OFFSET + ord(c) for c in _FILLER if BYTE_OFFSET + ord(c) not in taken)
        for k, filler in zip(range(gen.n_probs - len(ranked)), fillers, strict=False):
            ranked.append((filler, floor - 1.0 - 0.5 * k))

        def value(lp: float) -> float:
            return math.exp(lp) if post else lp

        key = "prob" if post else "logprob"
        top = [{"id": t, "token": _text(self.token_bytes(t)), "bytes": list(self.token_bytes(t)),
                key: value(lp)} for t, lp in ranked]
        return {"id": token.id, "token": _text(token.piece), "bytes": list(token.piece),
                key: value(chosen), "top_probs" if post else "top_logprobs": top}

    @staticmethod
    def _timings(gen: _Generation) -> dict[str, Any]:
        n = len(gen.tokens)
        return {"cache_n": 0, "prompt_n": gen.n_prompt, "prompt_ms": gen.n_prompt * 0.5,
                "prompt_per_token_ms": 0.5, "prompt_per_second": 2000.0, "predicted_n": n,
                "predicted_ms": n * 20.0, "predicted_per_token_ms": 20.0,
                "predicted_per_second": 50.0}

    def _completion(self, body: dict[str, Any], behaviour: Behaviour) -> Any:
        n_prompt = self._prompt_tokens(body)
        n_probs = _int(body.get("n_probs", body.get("logprobs")), 0)
        gen = self._generate(body, behaviour, n_prompt, n_probs)
        stream = body.get("stream") is True
        final: dict[str, Any] = {
            "index": 0, "content": "" if stream else gen.text,
            "tokens": [] if stream else [t.id for t in gen.tokens], "id_slot": 0,
            "stop": True, "model": self.model_id, "tokens_predicted": len(gen.tokens),
            "tokens_evaluated": n_prompt,
            "generation_settings": {"n_predict": _int(body.get("n_predict"), -1),
                                    "n_probs": n_probs, "stream": stream},
            "prompt": "", "has_new_line": "\n" in gen.text, "truncated": False,
            "stop_type": gen.stop_type, "stopping_word": gen.stopping_word,
            "tokens_cached": n_prompt + len(gen.tokens), "timings": self._timings(gen)}
        if not stream:
            if n_probs > 0 and gen.tokens:
                final["completion_probabilities"] = [self._probs(gen, t) for t in gen.tokens]
            return final
        events: list[dict[str, Any]] = []
        for i, token in enumerate(gen.tokens):
            event: dict[str, Any] = {"index": 0, "content": _text(token.piece),
                                     "tokens": [token.id], "stop": False, "id_slot": 0,
                                     "tokens_predicted": i + 1, "tokens_evaluated": n_prompt}
            if n_probs > 0:
                event["completion_probabilities"] = [self._probs(gen, token)]
            events.append(event)
        return _Events([*events, final], len(events), b"")

    def _oai_base(self, obj: str) -> dict[str, Any]:
        return {"created": int(time.time()), "model": self.model_id,
                "system_fingerprint": _BUILD, "object": obj,
                "id": f"cmpl-fake{next(self._ids)}"}

    @staticmethod
    def _usage(gen: _Generation) -> dict[str, Any]:
        n = len(gen.tokens)
        return {"completion_tokens": n, "prompt_tokens": gen.n_prompt,
                "total_tokens": n + gen.n_prompt, "prompt_tokens_details": {"cached_tokens": 0}}

    def _oai_completion(self, body: dict[str, Any], behaviour: Behaviour) -> Any:
        n_prompt = self._prompt_tokens(body)
        n_probs = _int(body.get("logprobs"), 0)
        gen = self._generate(body, behaviour, n_prompt, n_probs)
        finish = "length" if gen.stop_type == "limit" else "stop"
        base = self._oai_base("text_completion")

        def logprobs(tokens: list[_Token]) -> Any:
            if n_probs <= 0 or not tokens:
                return None
            return {"content": [self._probs(gen, t) for t in tokens]}

        if body.get("stream") is not True:
            return {**base, "choices": [{"text": gen.text, "index": 0,
                                         "logprobs": logprobs(gen.tokens),
                                         "finish_reason": finish}],
                    "usage": self._usage(gen), "timings": self._timings(gen)}
        events: list[dict[str, Any]] = [
            {**base, "choices": [{"text": _text(t.piece), "index": 0,
                                  "logprobs": logprobs([t]), "finish_reason": None}]}
            for t in gen.tokens]
        final = {**base, "choices": [{"text": "", "index": 0, "logprobs": None,
                                      "finish_reason": finish}],
                 "usage": self._usage(gen), "timings": self._timings(gen)}
        return _Events([*events, final], len(events), b"data: [DONE]\n\n")

    def _chat_completion(self, body: dict[str, Any], behaviour: Behaviour) -> Any:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest(400, "'messages' is required")
        prompt = ""
        for message in messages:
            if not isinstance(message, dict):
                raise _BadRequest(400, "each message must be an object")
            content = message.get("content")
            text = content if isinstance(content, str) else json.dumps(content)
            prompt += f"<|im_start|>{message.get('role', 'user')}\n{text}<|im_end|>\n"
        prompt += "<|im_start|>assistant\n"
        n_prompt = self._prompt_tokens({"prompt": prompt})
        n_probs = _int(body.get("top_logprobs"), 20) if body.get("logprobs") is True else 0
        gen = self._generate(body, behaviour, n_prompt, n_probs)
        finish = "length" if gen.stop_type == "limit" else "stop"
        base = self._oai_base("chat.completion")
        if body.get("stream") is not True:
            choice: dict[str, Any] = {"finish_reason": finish, "index": 0,
                                      "message": {"role": "assistant", "content": gen.text}}
            if n_probs > 0 and gen.tokens:
                choice["logprobs"] = {"content": [self._probs(gen, t) for t in gen.tokens]}
            return {**base, "choices": [choice], "usage": self._usage(gen),
                    "timings": self._timings(gen)}
        base["object"] = "chat.completion.chunk"

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"finish_reason": finish_reason, "index": 0,
                                         "delta": delta}]}

        events = [chunk({"role": "assistant", "content": None})]
        for token in gen.tokens:
            event = chunk({"content": _text(token.piece)})
            if n_probs > 0:
                event["choices"][0]["logprobs"] = {"content": [self._probs(gen, token)]}
            events.append(event)
        final = chunk({}, finish)
        final["timings"] = self._timings(gen)
        if isinstance(body.get("stream_options"), dict) \
                and body["stream_options"].get("include_usage") is True:
            events.append(final)
            final = {**base, "choices": [], "usage": self._usage(gen),
                     "timings": self._timings(gen)}
        return _Events([*events, final], len(events), b"data: [DONE]\n\n")


@dataclass
class _Events:
    """A streamed answer: its events (token events first), and what ends the stream."""

    events: list[dict[str, Any]]
    token_events: int
    done: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: FakeLlamaServer) -> None:
        self.fake = fake
        self.killed = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llama.cpp"
    sys_version = ""
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._run("GET")

    def do_POST(self) -> None:
        self._run("POST")

    def _run(self, method: str) -> None:
        try:
            self.server.fake._handle(self, method)
        except (_Killed, OSError):
            self.close_connection = True

    # What the fake's answers are made of.
    def wait_for(self, gate: threading.Event) -> None:
        while not gate.wait(0.05):
            if self.server.killed.is_set():
                raise _Killed

    def wait(self, seconds: float) -> None:
        if seconds > 0 and self.server.killed.wait(seconds):
            raise _Killed
        if self.server.killed.is_set():
            raise _Killed

    def send_head(self, status: int, content_type: str, headers: Iterable[tuple[str, str]],
                  *, length: int | None = None, chunked: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers:
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
        else:
            self.send_header("Content-Length", str(length or 0))
        self.end_headers()

    def send(self, status: int, payload: bytes, content_type: str,
             headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_head(status, content_type, headers, length=len(payload))
        self.write(payload)

    def write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        if self.server.killed.is_set():
            raise _Killed
        self.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")

    def end_chunks(self) -> None:
        self.write(b"0\r\n\r\n")

    def close(self) -> None:
        """Close the connection (FIN), whatever was promised."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def reset(self) -> None:
        """Reset the connection (RST): SO_LINGER 0, then close."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()


# --- helpers ---------------------------------------------------------------------------------

def _canonical(path: str) -> str:
    if path == "*":
        return path
    path = urlsplit(path).path.rstrip("/") or "/"
    return _ALIASES.get(path, path)


def _int(value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return int(value)


def _text(piece: bytes) -> str:
    """A piece as text, an incomplete UTF-8 sequence dropped (llama.cpp's validate_utf8)."""
    return piece.decode("utf-8", errors="ignore")


def _without(obj: Any, fields: Iterable[str]) -> Any:
    if not isinstance(obj, dict):
        return obj
    drop = set(fields)
    return {k: v for k, v in obj.items() if k not in drop}


def _cut_at_stop(tokens: list[_Token], words: list[str]) -> tuple[list[_Token], str]:
    """The tokens up to the earliest stop word (excluded, the last piece trimmed)."""
    text = b"".join(t.piece for t in tokens)
    hits = [(text.find(w.encode()), w) for w in words if w and w.encode() in text]
    if not hits:
        return tokens, ""
    at, word = min(hits)
    kept: list[_Token] = []
    offset = 0
    for token in tokens:
        if offset >= at:
            break
        piece = token.piece[: at - offset]
        kept.append(token if piece == token.piece else _Token(token.id, piece))
        offset += len(token.piece)
    return kept, word


__all__ = ["BYTE_OFFSET", "ENDOFTEXT", "IM_END", "IM_START", "PIECE_OFFSET", "Behaviour",
           "FakeLlamaServer", "Request", "connection_reset", "cut_stream", "error",
           "held", "invalid_json", "loading", "missing_fields", "no_slot", "rate_limited", "raw",
           "reply", "slow", "stream_error"]
