"""The model on inference servers, behind the same interface as the in-process runtime.

:class:`RemoteRuntime` answers verdicts (when the server can score labels exactly) and
replies over HTTP; :class:`MixedRuntime` scores verdicts in process and sends replies to the
servers (for servers that only speak chat). The service and the Telegram layer see the same
``classify``/``reply`` as with :class:`bot.llm.runtime.ModelRuntime`, and the same errors:
a server that is overloaded, too slow or unreachable is "busy" (:class:`ServerBusy`), and
``problems()`` names the servers that are down for /healthz.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from bot.config import ModelConfig
from bot.llm import scoring
from bot.llm.backends.base import Score
from bot.llm.remote.llama_server import LlamaServerApi
from bot.llm.remote.openai_chat import OpenAIChatApi
from bot.llm.remote.pool import Server, ServerPool
from bot.llm.runtime import IDLE_MESSAGE
from bot.llm.types import (
    ChatTurn,
    InferenceError,
    Reply,
    RuntimeBusy,
    ServerBusy,
    UnsupportedModel,
    Verdict,
)
from bot.prompts import PromptVersion

log = logging.getLogger(__name__)
T = TypeVar("T")


class RemoteApi(Protocol):
    name: str
    can_score: bool

    async def model_id(self) -> str: ...

    async def model_of(self, server: Server) -> str: ...

    async def stream_reply(self, version: PromptVersion, history: Sequence[ChatTurn],
                           text: str, *, key: str,
                           on_piece: Callable[[str], None]) -> tuple[int, str]: ...


def make_api(pool: ServerPool, config: ModelConfig) -> LlamaServerApi | OpenAIChatApi:
    if config.remote_api == "llama-server":
        return LlamaServerApi(pool, max_input_tokens=config.max_input_tokens, n_ctx=config.n_ctx,
                              verdict_cells=config.verdict_kv_tokens)
    return OpenAIChatApi(pool, model=config.remote_model)


class RemoteRuntime:
    """Verdicts and replies on the servers of ``model.url``."""

    def __init__(self, config: ModelConfig, *, pool: ServerPool | None = None) -> None:
        self.config = config
        self.pool = pool or ServerPool(
            config.url, api_key=config.api_key, connect_timeout_s=config.remote_connect_timeout_s,
            retry_s=config.remote_retry_s, parallel=config.remote_parallel)
        self.api = make_api(self.pool, config)
        self._pending = 0
        self._started = False
        self._closed = False
        self._model: str | None = None
        # Offline checks of candidate prompts: one at a time, so users' requests come first.
        self._background = asyncio.Semaphore(1)
        # Read by /healthz: a remote request cannot hang the bot (each has its own limit).
        self.busy_since: float | None = None
        # The replies of the current busy period (see _account), as in process.
        self._period = _Period()

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Ask the servers which model they serve; a server that is down at start does not
        stop the bot (it is answered "busy" and named by /healthz until it is up)."""
        self._started = True
        self.pool.start_watching()
        try:
            models = await asyncio.wait_for(self.pool.each(self.api.model_of),
                                            self.config.verdict_timeout_s)
        except TimeoutError:
            log.warning("inference servers did not say which model they serve within %gs",
                        self.config.verdict_timeout_s)
            return
        # One scorer name stands for every server: they must serve the same model file.
        if len(set(models.values())) > 1:
            raise UnsupportedModel("the inference servers serve different models ("
                                   + ", ".join(f"{u}: {m}" for u, m in models.items())
                                   + "): verdicts of one bot must come from one model")
        if models:
            self._model = next(iter(models.values()))
            log.info("inference on %s (%s, model %s)", ", ".join(self.config.url),
                     self.api.name, self._model)
        else:
            log.warning("no inference server reachable at start: %s",
                        "; ".join(self.pool.problems()))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.pool.aclose()

    @property
    def ready(self) -> bool:
        return self._started and not self._closed

    @property
    def queue_depth(self) -> int:
        return self._pending

    @property
    def parallel_replies(self) -> int:
        return self.config.remote_parallel * len(self.config.url)

    @property
    def can_score(self) -> bool:
        return self.api.can_score

    def problems(self) -> list[str]:
        return self.pool.problems()

    async def scorer(self) -> str:
        if self._model is None:
            try:
                self._model = await asyncio.wait_for(self.api.model_id(),
                                                     self.config.verdict_timeout_s)
            except TimeoutError:
                raise ServerBusy("the inference server did not say which model it serves "
                                 f"within {self.config.verdict_timeout_s:g}s") from None
        return f"remote:{self._model}"

    def background(self) -> RemoteBackground:
        """A classifier for bulk offline checks: one request at a time, with the replies'
        time limit, so users' verdicts and replies keep the servers' slots."""
        return RemoteBackground(self)

    # -- requests ----------------------------------------------------------------------
    async def classify(self, version: PromptVersion, text: str, *,
                       timeout: float | None = None, use_cache: bool = True,
                       background: bool = False, session: str | None = None) -> Verdict:
        if not text.strip():
            raise InferenceError("empty message: nothing to classify")
        api = self.api
        if not isinstance(api, LlamaServerApi):
            raise InferenceError(f"{api.name} cannot score labels: verdicts stay in process")
        key = session or hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
        started = time.perf_counter()
        limit = self.config.verdict_timeout_s if timeout is None else timeout

        async def run() -> Score:
            if background:
                async with self._background:
                    return await api.score(version, text, key=key)
            return await api.score(version, text, key=key)

        result = await self._bounded(run(), limit, "verdict")
        label = scoring.pick(result.probabilities, version.label_names)
        return Verdict(label=label, probabilities=result.probabilities, version_id=version.id,
                       latency_ms=(time.perf_counter() - started) * 1000.0,
                       tokens_evaluated=result.tokens_evaluated, prefix_cached=True,
                       truncated=result.truncated, scorer=await self.scorer())

    async def reply(self, version: PromptVersion, history: Sequence[ChatTurn], text: str, *,
                    timeout: float | None = None, on_text: Callable[[str], None] | None = None,
                    session: str | None = None) -> Reply:
        if not text.strip():
            raise InferenceError("empty message: nothing to answer")
        key = session or hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
        parts: list[str] = []
        started = time.perf_counter()

        def on_piece(piece: str) -> None:
            parts.append(piece)
            if on_text is not None:
                on_text("".join(parts))

        limit = self.config.reply_timeout_s if timeout is None else timeout
        tokens, stop = await self._bounded(
            self._counted(self.api.stream_reply(version, history, text, key=key,
                                                on_piece=on_piece), parts),
            limit, "reply")
        return Reply(text="".join(parts).strip(), tokens=tokens or len(parts),
                     latency_ms=(time.perf_counter() - started) * 1000.0, stopped_by=stop)

    async def _counted(self, work: Coroutine[Any, Any, tuple[int, str]],
                       parts: list[str]) -> tuple[int, str]:
        """A reply that was admitted, in this busy period's account."""
        self._period.begin()
        tokens = 0
        try:
            tokens, stop = await work
            return tokens, stop
        finally:
            self._period.end(tokens or len(parts))

    async def _bounded(self, work: Coroutine[Any, Any, T], limit: float, what: str) -> T:
        """Run one request within ``limit`` seconds; a full queue or a slow server is busy."""
        if not self.ready:
            _close(work)
            raise InferenceError("the inference client is not started or is shutting down")
        if self._pending >= self.config.max_queue:
            _close(work)
            raise RuntimeBusy("the model is busy: too many requests are waiting")
        self._pending += 1
        try:
            return await asyncio.wait_for(work, limit)
        except TimeoutError:
            raise ServerBusy(f"no {what} from the inference server within {limit:g}s") from None
        finally:
            self._pending -= 1


def _close(work: Coroutine[Any, Any, Any]) -> None:
    work.close()  # never awaited: closed, so Python does not warn about it


class RemoteBackground:
    def __init__(self, runtime: RemoteRuntime) -> None:
        self._runtime = runtime

    async def classify(self, version: PromptVersion, text: str) -> Verdict:
        return await self._runtime.classify(version, text, background=True,
                                            timeout=self._runtime.config.reply_timeout_s)


class _Period:
    """Replies from the first one starting to the last one ending: one log line each, with
    the same fields as the in-process runtime's (``loopbot bench --load`` reads them). The
    server's decode time is not visible here: ``decode_s`` is the period's wall time."""

    def __init__(self) -> None:
        self.active = self.max_active = self.replies = self.tokens = 0
        self.started = 0.0

    def begin(self) -> None:
        if self.active == 0:
            self.started, self.max_active, self.replies, self.tokens = time.perf_counter(), 0, 0, 0
        self.active += 1
        self.max_active = max(self.max_active, self.active)

    def end(self, tokens: int) -> None:
        self.active -= 1
        self.replies += 1
        self.tokens += tokens
        if self.active:
            return
        seconds = time.perf_counter() - self.started
        log.info("%s: %d replies, %d tokens in %.2fs on the inference servers (%.1f tok/s, up "
                 "to %d at once)", IDLE_MESSAGE, self.replies, self.tokens, seconds,
                 self.tokens / seconds if seconds > 0 else 0.0, self.max_active,
                 extra={"replies": self.replies, "decode_tokens": self.tokens,
                        "decode_s": round(seconds, 4), "prefill_tokens": 0, "prefill_s": 0.0,
                        "steps": 0, "max_active": self.max_active})


class LocalRuntime(Protocol):
    """What :class:`MixedRuntime` uses of :class:`bot.llm.runtime.ModelRuntime`."""

    busy_since: float | None
    scorer_id: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...

    def problems(self) -> list[str]: ...

    def background(self) -> Any: ...

    async def classify(self, version: PromptVersion, text: str, *,
                       timeout: float | None = None, use_cache: bool = True,
                       background: bool = False, session: str | None = None) -> Verdict: ...


class MixedRuntime:
    """Verdicts scored in process (exact label probabilities), replies from the servers (for
    servers that only speak chat, or to keep the scorer of a running experiment)."""

    def __init__(self, local: LocalRuntime, remote: RemoteRuntime) -> None:
        self.local, self.remote = local, remote

    async def start(self) -> None:
        await self.local.start()
        await self.remote.start()

    async def close(self) -> None:
        await self.remote.close()
        await self.local.close()

    @property
    def ready(self) -> bool:
        return self.local.ready and self.remote.ready

    @property
    def busy_since(self) -> float | None:
        return self.local.busy_since

    @property
    def queue_depth(self) -> int:
        return self.local.queue_depth + self.remote.queue_depth

    @property
    def parallel_replies(self) -> int:
        return self.remote.parallel_replies

    def problems(self) -> list[str]:
        return self.local.problems() + self.remote.problems()

    async def classify(self, version: PromptVersion, text: str, *,
                       timeout: float | None = None, use_cache: bool = True,
                       background: bool = False, session: str | None = None) -> Verdict:
        return await self.local.classify(version, text, timeout=timeout, use_cache=use_cache,
                                         background=background, session=session)

    def background(self) -> Any:
        """Offline checks at the in-process worker's background priority."""
        return self.local.background()

    async def reply(self, version: PromptVersion, history: Sequence[ChatTurn], text: str, *,
                    timeout: float | None = None, on_text: Callable[[str], None] | None = None,
                    session: str | None = None) -> Reply:
        return await self.remote.reply(version, history, text, timeout=timeout,
                                       on_text=on_text, session=session)
