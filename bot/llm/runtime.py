"""The model as a shared, scarce resource: one worker thread owns it, the event loop awaits.

Jobs wait in a priority queue. A verdict (a few dozen tokens, needed for the buttons) always
runs before the next token of a chat reply: replies are generators that the worker advances
one token at a time, checking the queue in between. Chat replies run one at a time (they share
one chat context), in arrival order. Every caller has a timeout; a job whose caller gave up is
dropped before it starts, or stopped at its next token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bot.config import ModelConfig
from bot.llm import scoring
from bot.llm.backends.base import Backend
from bot.llm.gguf_info import read_gguf_info
from bot.llm.types import (
    ChatTurn,
    InferenceError,
    InferenceTimeout,
    Reply,
    RuntimeBusy,
    UnsupportedModel,
    Verdict,
)
from bot.prompts import PromptVersion

log = logging.getLogger(__name__)
T = TypeVar("T")

# Lower runs first. BACKGROUND (offline checks of candidate prompts) yields to users' replies.
CONTROL, VERDICT, CHAT, BACKGROUND = -1, 0, 1, 2


@dataclass(order=True)
class _Job:
    priority: int
    order: int
    run: Callable[[], Any] = field(compare=False)
    future: concurrent.futures.Future[Any] = field(compare=False)
    # For chat jobs: the generator being advanced, created on the first step.
    steps: _LazySteps | None = field(default=None, compare=False)
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)


def open_backend(model_path: str | Path, config: ModelConfig) -> Backend:
    """Read the GGUF header first, so a backend that cannot run it refuses with a reason."""
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise InferenceError(
            f"model file {path} does not exist: run `loopbot model fetch` or set model.path "
            "(LOOPBOT_MODEL / --model) to a GGUF file")
    info = read_gguf_info(path)
    if config.backend == "ctransformers":
        from bot.llm.backends.ctransformers import CTransformersBackend

        return CTransformersBackend(path, arch=info.architecture, n_threads=config.n_threads,
                                    max_input_tokens=config.max_input_tokens)
    if config.backend != "llama_cpp":
        raise UnsupportedModel(f"unknown backend '{config.backend}'")
    from bot.llm.backends.llama_cpp import LlamaCppBackend

    return LlamaCppBackend(path, n_threads=config.n_threads, n_ctx=config.n_ctx,
                           cache_slots=config.prefix_cache_versions,
                           max_input_tokens=config.max_input_tokens, arch=info.architecture)


class ModelRuntime:
    def __init__(self, model_path: str | Path, config: ModelConfig,
                 backend_factory: Callable[[], Backend] | None = None) -> None:
        self.model_path = Path(model_path)
        self.config = config
        self._factory = backend_factory or (lambda: open_backend(self.model_path, config))
        self._queue: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._order = itertools.count()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._backend: Backend | None = None
        self._closed = False
        self.last_job_started = time.monotonic()
        self.busy_since: float | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._work, name="loopbot-model", daemon=True)
        self._thread.start()
        await self._submit(CONTROL, self._load, timeout=None, count=False)

    def _load(self) -> None:
        started = time.perf_counter()
        self._backend = self._factory()
        log.info("model %s loaded with %s in %.1fs", self.model_path.name,
                 self._backend.name, time.perf_counter() - started)

    async def close(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        await self._submit(CONTROL, self._shutdown, timeout=None, count=False)
        await asyncio.to_thread(self._thread.join, 10)

    def _shutdown(self) -> None:
        # A reply waiting between two tokens holds a live generator whose clean-up touches
        # the model's contexts: end every queued job while they still exist.
        self._drain()
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        raise _Stop

    @property
    def ready(self) -> bool:
        # A dead worker thread would leave every request to time out: not ready.
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self._backend is not None and not self._closed

    @property
    def queue_depth(self) -> int:
        return self._pending

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise InferenceError("the model is not loaded")
        return self._backend

    # -- requests -----------------------------------------------------------------------
    async def classify(self, version: PromptVersion, text: str, *,
                       timeout: float | None = None, use_cache: bool = True,
                       background: bool = False) -> Verdict:
        """The verdict for ``text``; ``background`` jobs (bulk offline checks) wait until
        no user's verdict or reply is pending."""
        if not text.strip():
            raise InferenceError("empty message: nothing to classify")

        def run() -> Verdict:
            started = time.perf_counter()
            result = self.backend.score(version, text, use_cache=use_cache)
            label = scoring.pick(result.probabilities, version.label_names)
            return Verdict(label=label, probabilities=result.probabilities,
                           version_id=version.id,
                           latency_ms=(time.perf_counter() - started) * 1000.0,
                           tokens_evaluated=result.tokens_evaluated,
                           prefix_cached=result.prefix_cached, truncated=result.truncated)

        limit = self.config.verdict_timeout_s if timeout is None else timeout
        verdict: Verdict = await self._submit(BACKGROUND if background else VERDICT, run,
                                              timeout=limit)
        return verdict

    def background(self) -> BackgroundClassifier:
        """A classifier for bulk work that must not slow down users."""
        return BackgroundClassifier(self)

    async def reply(self, version: PromptVersion, history: Sequence[ChatTurn], text: str, *,
                    timeout: float | None = None,
                    on_text: Callable[[str], None] | None = None) -> Reply:
        if not text.strip():
            raise InferenceError("empty message: nothing to answer")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        parts: list[str] = []
        return_value: list[str] = []

        def steps() -> Iterator[None]:
            gen = self.backend.generate(version, history, text)
            reason = "length"
            while True:
                try:
                    piece = next(gen)
                except StopIteration as stop:
                    reason = stop.value or reason
                    break
                parts.append(piece)
                if on_text is not None:
                    loop.call_soon_threadsafe(on_text, "".join(parts))
                yield None
            return_value.append(reason)

        def finish() -> Reply:
            text_out = "".join(parts).strip()
            return Reply(text=text_out, tokens=len(parts),
                         latency_ms=(time.perf_counter() - started) * 1000.0,
                         stopped_by=return_value[0] if return_value else "length")

        limit = self.config.reply_timeout_s if timeout is None else timeout
        reply: Reply = await self._submit(CHAT, finish, timeout=limit, steps=steps)
        return reply

    async def call(self, fn: Callable[[Backend], T], *, timeout: float | None = None) -> T:
        """Run ``fn(backend)`` on the worker as a verdict-priority job (benchmarks, checks)."""
        result: T = await self._submit(VERDICT, lambda: fn(self.backend), timeout=timeout)
        return result

    async def _submit(self, priority: int, run: Callable[[], Any], *, timeout: float | None,
                      steps: Callable[[], Iterator[None]] | None = None,
                      count: bool = True) -> Any:
        if self._thread is None:
            raise InferenceError("the model runtime is not started")
        if count:
            if self._closed:
                raise InferenceError("the model runtime is shutting down")
            with self._pending_lock:
                if self._pending >= self.config.max_queue:
                    raise RuntimeBusy("the model is busy: too many requests are waiting")
                self._pending += 1
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        job = _Job(priority, next(self._order), run, future)
        if steps is not None:
            job.steps = _LazySteps(steps)
        if count:
            future.add_done_callback(lambda _: self._release())
        self._queue.put(job)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            job.cancelled.set()
            future.cancel()
            raise InferenceTimeout(f"no answer from the model within {timeout:g}s") from None
        except asyncio.CancelledError:
            # The caller is gone (e.g. its task was cancelled at shutdown): stop generating.
            job.cancelled.set()
            future.cancel()
            raise

    def _release(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    # -- the worker ---------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job.cancelled.is_set() or job.future.cancelled():
                    self._finish_cancelled(job)
                    continue
                if not job.future.running() and not job.future.set_running_or_notify_cancel():
                    continue
                self.busy_since = time.monotonic()
                self.last_job_started = self.busy_since
                # A reply advances one token, then waiting verdicts get their turn.
                if job.steps is not None and next(job.steps, _DONE) is not _DONE:
                    self._queue.put(job)
                    continue
                result = job.run()
                # Idle before the caller wakes: whoever awaited this job must not see it busy.
                self.busy_since = None
                job.future.set_result(result)
            except _Stop:
                job.future.set_result(None)
                self._drain()
                return
            except Exception as exc:  # the worker must survive any one job
                self.busy_since = None
                log.warning("inference job failed: %s", exc, exc_info=log.isEnabledFor(10))
                if not job.future.done():
                    job.future.set_exception(
                        exc if isinstance(exc, InferenceError) else InferenceError(str(exc)))
            finally:
                self.busy_since = None

    @staticmethod
    def _finish_cancelled(job: _Job) -> None:
        if job.steps is not None:
            job.steps.close()  # stops generation; the backend resets its chat state
        if job.future.running():
            # Already started (a reply between tokens): cancel() would be refused.
            job.future.set_exception(InferenceTimeout("the caller stopped waiting"))
        elif not job.future.done():
            job.future.cancel()

    def _drain(self) -> None:
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job.steps is not None:
                try:
                    job.steps.close()
                except Exception as exc:  # shutting down must finish whatever one job does
                    log.warning("ending a queued reply failed: %s", exc)
            if not job.future.done():
                job.future.set_exception(InferenceError("the model runtime was closed"))


class _Stop(Exception):
    """Raised by the shutdown job to end the worker loop."""


_DONE = object()


class _LazySteps:
    """Creates the step generator on the worker thread, at the job's first step."""

    def __init__(self, factory: Callable[[], Iterator[None]]) -> None:
        self._factory = factory
        self._gen: Iterator[None] | None = None

    def __iter__(self) -> _LazySteps:
        return self

    def __next__(self) -> None:
        if self._gen is None:
            self._gen = self._factory()
        return next(self._gen)

    def close(self) -> None:
        close = getattr(self._gen, "close", None)
        if close is not None:
            close()


class BackgroundClassifier:
    """``classify`` at background priority, for code that takes any classifier."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self._runtime = runtime

    async def classify(self, version: PromptVersion, text: str) -> Verdict:
        return await self._runtime.classify(version, text, background=True,
                                            timeout=self._runtime.config.reply_timeout_s)
