"""The model as a shared, scarce resource: one worker thread owns it, the event loop awaits.

Jobs wait in a priority queue: control, then verdicts, then chat replies, then background
work. Chat replies are generated together (continuous batching, :mod:`bot.llm.batching`): a
reply joins the batch when the worker takes it from the queue, and each turn of the worker
first runs every waiting verdict, then one step of the batch (one new token for every reply in
progress, up to ``model.parallel_replies``; a newly joined reply's prompt is evaluated in
chunks between steps). Every caller has a timeout; a job whose caller gave up is dropped
before it starts, or leaves the batch before the next step, freeing its sequence. A full
queue answers "busy" at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bot.config import ModelConfig
from bot.llm import scoring
from bot.llm.backends.base import Backend
from bot.llm.batching import BatchStats, ReplyBatch, ReplyEvent, SerialBatch
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
# The log line at the end of each busy period of reply generation (``loopbot bench --load``
# reads its fields).
IDLE_MESSAGE = "reply batch idle"


@dataclass
class _ReplyRequest:
    version: PromptVersion
    history: Sequence[ChatTurn]
    text: str
    on_text: Callable[[str], None] | None
    loop: asyncio.AbstractEventLoop
    started: float
    parts: list[str] = field(default_factory=list)
    tokens: int = 0


@dataclass(order=True)
class _Job:
    priority: int
    order: int
    run: Callable[[], Any] | None = field(compare=False)
    future: concurrent.futures.Future[Any] = field(compare=False)
    # A chat reply: generated in the batch instead of run.
    reply: _ReplyRequest | None = field(default=None, compare=False)
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)


class _JobQueue:
    """Jobs by priority, then arrival. The worker takes only jobs up to a priority: while
    replies are generating, background work stays queued."""

    def __init__(self) -> None:
        self._heap: list[_Job] = []
        self._cond = threading.Condition()

    def put(self, job: _Job) -> None:
        with self._cond:
            heapq.heappush(self._heap, job)
            self._cond.notify()

    def take(self, max_priority: int, *, block: bool) -> _Job | None:
        with self._cond:
            while True:
                if self._heap and self._heap[0].priority <= max_priority:
                    return heapq.heappop(self._heap)
                if not block:
                    return None
                self._cond.wait()

    def drain(self) -> list[_Job]:
        with self._cond:
            jobs, self._heap = sorted(self._heap), []
            return jobs


def parallel_replies(config: ModelConfig) -> int:
    """Replies generated at once: the setting, or 4 per thread (from 4 to 16) when it is 0.
    On 2 cores a step of 8 costs ~4× one of 1 (see README, Benchmarks)."""
    if config.parallel_replies > 0:
        return config.parallel_replies
    threads = config.n_threads or os.cpu_count() or 1
    return max(4, min(16, 4 * threads))


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
                           verdict_cells=config.verdict_kv_tokens,
                           cache_slots=config.prefix_cache_versions,
                           max_input_tokens=config.max_input_tokens, arch=info.architecture,
                           parallel_replies=parallel_replies(config),
                           reply_kv_tokens=config.reply_kv_tokens,
                           prefill_chunk=config.prefill_chunk_tokens,
                           kv_type=config.kv_cache_type)


class ModelRuntime:
    def __init__(self, model_path: str | Path, config: ModelConfig,
                 backend_factory: Callable[[], Backend] | None = None) -> None:
        self.model_path = Path(model_path)
        self.config = config
        self._factory = backend_factory or (lambda: open_backend(self.model_path, config))
        self._jobs = _JobQueue()
        self._order = itertools.count()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._backend: Backend | None = None
        self._batch: ReplyBatch | None = None
        # Replies in the batch, by their job's order number (the batch's key).
        self._replies: dict[Hashable, _Job] = {}
        self._closed = False
        self.last_job_started = time.monotonic()
        self.busy_since: float | None = None
        # Steps of the reply batch taken so far (tests watch what runs between two).
        self.batch_steps = 0
        # What reply generation has cost since the start (benchmarks read it).
        self.reply_totals = BatchStats()
        # Which scorer this runtime's verdicts come from (known once the model is loaded).
        self.scorer_id = ""

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._work, name="loopbot-model", daemon=True)
        self._thread.start()
        await self._submit(CONTROL, self._load, timeout=None, count=False)

    def _load(self) -> None:
        started = time.perf_counter()
        self.scorer_id = local_scorer_id(self.model_path)
        backend = self._factory()
        make_batch = getattr(backend, "reply_batch", None)
        self._batch = make_batch() if callable(make_batch) else SerialBatch(backend)
        self._backend = backend
        log.info("model %s loaded with %s in %.1fs; up to %d replies at once",
                 self.model_path.name, backend.name, time.perf_counter() - started,
                 self._batch.capacity)

    async def close(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        await self._submit(CONTROL, self._shutdown, timeout=None, count=False)
        await asyncio.to_thread(self._thread.join, 10)

    def _shutdown(self) -> None:
        # Replies in progress hold sequences of the model's contexts: end every job while
        # the contexts still exist.
        self._drain()
        self._end_replies(InferenceError("the model runtime was closed"))
        if self._batch is not None:
            self._batch.close()
            self._batch = None
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
    def parallel_replies(self) -> int:
        """Replies generated at once (known once the model is loaded)."""
        return self._batch.capacity if self._batch is not None else parallel_replies(self.config)

    def problems(self) -> list[str]:
        """What /healthz should report besides readiness: nothing, in process."""
        return []

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise InferenceError("the model is not loaded")
        return self._backend

    # -- requests -----------------------------------------------------------------------
    async def classify(self, version: PromptVersion, text: str, *,
                       timeout: float | None = None, use_cache: bool = True,
                       background: bool = False, session: str | None = None) -> Verdict:
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
                           prefix_cached=result.prefix_cached, truncated=result.truncated,
                           scorer=self.scorer_id)

        limit = self.config.verdict_timeout_s if timeout is None else timeout
        verdict: Verdict = await self._submit(BACKGROUND if background else VERDICT, run,
                                              timeout=limit)
        return verdict

    def background(self) -> BackgroundClassifier:
        """A classifier for bulk work that must not slow down users."""
        return BackgroundClassifier(self)

    async def reply(self, version: PromptVersion, history: Sequence[ChatTurn], text: str, *,
                    timeout: float | None = None,
                    on_text: Callable[[str], None] | None = None,
                    session: str | None = None) -> Reply:
        """The chat reply, generated in the batch with the other replies in progress;
        ``on_text`` gets the text so far after each token (on the caller's event loop).
        ``session`` (the chat) matters to remote runtimes only."""
        if not text.strip():
            raise InferenceError("empty message: nothing to answer")
        request = _ReplyRequest(version, list(history), text, on_text,
                                asyncio.get_running_loop(), time.perf_counter())
        limit = self.config.reply_timeout_s if timeout is None else timeout
        reply: Reply = await self._submit(CHAT, None, timeout=limit, reply=request)
        return reply

    async def call(self, fn: Callable[[Backend], T], *, timeout: float | None = None) -> T:
        """Run ``fn(backend)`` on the worker as a verdict-priority job (benchmarks, checks)."""
        result: T = await self._submit(VERDICT, lambda: fn(self.backend), timeout=timeout)
        return result

    async def _submit(self, priority: int, run: Callable[[], Any] | None, *,
                      timeout: float | None, reply: _ReplyRequest | None = None,
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
        job = _Job(priority, next(self._order), run, future, reply)
        if count:
            future.add_done_callback(lambda _: self._release())
        self._jobs.put(job)
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
            generating = self._batch is not None and self._batch.busy
            # While replies generate: verdicts first, new replies join; background waits.
            job = self._jobs.take(CHAT if generating else BACKGROUND, block=not generating)
            if job is None:
                self._step()
                continue
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                self._finish_cancelled(job)
                continue
            if job.reply is not None:
                self._join(job)
                continue
            try:
                self.busy_since = time.monotonic()
                self.last_job_started = self.busy_since
                assert job.run is not None
                result = job.run()
                # Idle before the caller wakes: whoever awaited this job must not see it busy.
                self.busy_since = None
                job.future.set_result(result)
            except _Stop:
                job.future.set_result(None)
                return
            except Exception as exc:  # the worker must survive any one job
                self.busy_since = None
                log.warning("inference job failed: %s", exc, exc_info=log.isEnabledFor(10))
                if not job.future.done():
                    job.future.set_exception(_as_inference_error(exc))
            finally:
                self.busy_since = None

    def _join(self, job: _Job) -> None:
        """A reply enters the batch (it starts generating at a coming step)."""
        request = job.reply
        assert request is not None
        try:
            if self._batch is None:
                raise InferenceError("the model is not loaded")
            self._batch.add(job.order, request.version, request.history, request.text)
        except Exception as exc:  # this reply cannot be made; the others go on
            log.warning("reply refused: %s", exc)
            job.future.set_exception(_as_inference_error(exc))
            return
        self._replies[job.order] = job

    def _step(self) -> None:
        batch = self._batch
        assert batch is not None
        # Replies whose callers gave up leave before the step, freeing their sequences.
        for key, job in list(self._replies.items()):
            if job.cancelled.is_set():
                batch.remove(key)
                del self._replies[key]
                self._finish_cancelled(job)
        if not batch.busy:
            self._log_idle(batch)
            return
        self.busy_since = time.monotonic()
        self.last_job_started = self.busy_since
        try:
            events = batch.step()
        except Exception as exc:  # a bug in the batch: end its replies, keep serving
            log.warning("reply step failed: %s", exc, exc_info=log.isEnabledFor(10))
            for key in list(self._replies):
                batch.remove(key)
            self._end_replies(_as_inference_error(exc))
            events = []
        finally:
            self.busy_since = None
        self.batch_steps += 1
        for event in events:
            self._deliver(event)
        if not batch.busy:
            self._log_idle(batch)

    def _deliver(self, event: ReplyEvent) -> None:
        job = self._replies.get(event.key)
        if job is None or job.reply is None:
            return
        request = job.reply
        request.tokens += event.tokens
        if event.text:
            request.parts.append(event.text)
            if request.on_text is not None:
                with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                    request.loop.call_soon_threadsafe(request.on_text, "".join(request.parts))
        if event.error is not None:
            del self._replies[job.order]
            job.future.set_exception(event.error)
        elif event.finished is not None:
            del self._replies[job.order]
            job.future.set_result(Reply(
                text="".join(request.parts).strip(), tokens=request.tokens,
                latency_ms=(time.perf_counter() - request.started) * 1000.0,
                stopped_by=event.finished))

    def _log_idle(self, batch: ReplyBatch) -> None:
        """One line per busy period: what the replies cost (``bench --load`` reads it)."""
        stats, batch.stats = batch.stats, BatchStats()
        if not stats.steps:
            return
        totals = self.reply_totals
        totals.decode_tokens += stats.decode_tokens
        totals.decode_s += stats.decode_s
        totals.prefill_tokens += stats.prefill_tokens
        totals.prefill_s += stats.prefill_s
        totals.steps += stats.steps
        totals.replies += stats.replies
        totals.max_active = max(totals.max_active, stats.max_active)
        rate = stats.decode_tokens / stats.decode_s if stats.decode_s > 0 else 0.0
        log.info("%s: %d replies, %d tokens in %.2fs of decode steps (%.1f tok/s, up to %d "
                 "at once), %d prompt tokens in %.2fs", IDLE_MESSAGE, stats.replies,
                 stats.decode_tokens, stats.decode_s, rate, stats.max_active,
                 stats.prefill_tokens, stats.prefill_s,
                 extra={"replies": stats.replies, "decode_tokens": stats.decode_tokens,
                        "decode_s": round(stats.decode_s, 4),
                        "prefill_tokens": stats.prefill_tokens,
                        "prefill_s": round(stats.prefill_s, 4), "steps": stats.steps,
                        "max_active": stats.max_active})

    def _end_replies(self, error: InferenceError) -> None:
        for job in self._replies.values():
            if not job.future.done():
                job.future.set_exception(error)
        self._replies.clear()

    @staticmethod
    def _finish_cancelled(job: _Job) -> None:
        if job.future.running():
            # Already started (a reply in the batch): cancel() would be refused.
            job.future.set_exception(InferenceTimeout("the caller stopped waiting"))
        elif not job.future.done():
            job.future.cancel()

    def _drain(self) -> None:
        for job in self._jobs.drain():
            if not job.future.done():
                job.future.set_exception(InferenceError("the model runtime was closed"))


def local_scorer_id(path: Path) -> str:
    """``gguf:<file name>:<first 16 hex digits of its SHA-256>``: verdicts of two files (or
    of a changed file under the same name) are never taken for one scorer's."""
    if not path.is_file():
        return f"gguf:{path.name}"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return f"gguf:{path.name}:{digest.hexdigest()[:16]}"


def _as_inference_error(exc: Exception) -> InferenceError:
    return exc if isinstance(exc, InferenceError) else InferenceError(str(exc))


class _Stop(Exception):
    """Raised by the shutdown job to end the worker loop."""


class BackgroundClassifier:
    """``classify`` at background priority, for code that takes any classifier."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self._runtime = runtime

    async def classify(self, version: PromptVersion, text: str) -> Verdict:
        return await self._runtime.classify(version, text, background=True,
                                            timeout=self._runtime.config.reply_timeout_s)
