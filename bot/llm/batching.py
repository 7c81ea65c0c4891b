"""Replies in progress as one batch: what the runtime's worker asks of a backend.

The worker owns the scheduling of *jobs* (priorities, timeouts, cancellation, "busy"); a
:class:`ReplyBatch` owns the scheduling of *tokens*: which waiting reply joins, which prompt
tokens are evaluated in this step, and one new token for every reply that is generating. The
worker calls :meth:`ReplyBatch.step` once per turn, after every waiting verdict has run.

Backends that decode many sequences at once (llama.cpp) implement the protocol themselves;
any other backend gets :class:`SerialBatch`, which advances one reply's generator at a time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bot.llm.backends.base import Backend
from bot.llm.types import ChatTurn, InferenceError
from bot.prompts import PromptVersion


@dataclass(frozen=True)
class ReplyEvent:
    """What happened to one reply in a step: a piece of text, its end, or its failure."""

    key: Hashable
    text: str = ""
    tokens: int = 0  # tokens sampled for it in this step (0 or 1)
    # "eos" or "length" once the reply is complete.
    finished: str | None = None
    error: InferenceError | None = None


@dataclass
class BatchStats:
    """An account of the work done since the batch was last idle."""

    decode_tokens: int = 0  # tokens sampled
    decode_s: float = 0.0  # seconds in decode steps (one token for every active reply)
    prefill_tokens: int = 0  # prompt tokens evaluated
    prefill_s: float = 0.0
    steps: int = 0
    replies: int = 0  # replies that finished
    max_active: int = 0  # most replies generating at once
    started: float = field(default_factory=time.monotonic)


class ReplyBatch(Protocol):
    """The replies being generated together. Single-threaded: only the worker calls it."""

    capacity: int  # replies that can generate at once
    stats: BatchStats

    def add(self, key: Hashable, version: PromptVersion, history: Sequence[ChatTurn],
            text: str) -> None:
        """Queue a reply; it joins the batch at a later step. Raises InferenceError if it
        can never be answered (e.g. its prompt cannot fit)."""
        ...

    def remove(self, key: Hashable) -> None:
        """Stop a reply (its caller is gone): it leaves the batch and frees its sequence."""
        ...

    def step(self) -> list[ReplyEvent]:
        """One turn: admit waiting replies, evaluate some prompt tokens, one new token for
        every generating reply. Never raises for one reply's sake: failures are events."""
        ...

    @property
    def busy(self) -> bool:
        """Whether any reply is waiting or generating."""
        ...

    def close(self) -> None:
        """End every reply (the model is about to be freed)."""
        ...


@dataclass
class _Serial:
    key: Hashable
    version: PromptVersion
    history: Sequence[ChatTurn]
    text: str
    gen: Generator[str, None, str] | None = None


class SerialBatch:
    """One reply at a time, advanced one token per step, for backends that cannot batch."""

    capacity = 1

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._queue: deque[_Serial] = deque()
        self.stats = BatchStats()

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    def add(self, key: Hashable, version: PromptVersion, history: Sequence[ChatTurn],
            text: str) -> None:
        self._queue.append(_Serial(key, version, history, text))

    def remove(self, key: Hashable) -> None:
        for item in list(self._queue):
            if item.key == key:
                self._queue.remove(item)
                if item.gen is not None:
                    item.gen.close()  # stops generation; the backend resets its state

    def step(self) -> list[ReplyEvent]:
        if not self._queue:
            return []
        item = self._queue[0]
        started = time.perf_counter()
        self.stats.steps += 1
        self.stats.max_active = 1
        try:
            if item.gen is None:
                item.gen = self._backend.generate(item.version, item.history, item.text)
            piece = next(item.gen)
        except StopIteration as stop:
            self._queue.popleft()
            self.stats.replies += 1
            return [ReplyEvent(item.key, finished=stop.value or "length")]
        except Exception as exc:  # one reply's failure is that reply's alone
            self._queue.popleft()
            return [ReplyEvent(item.key, error=exc if isinstance(exc, InferenceError)
                               else InferenceError(str(exc)))]
        finally:
            self.stats.decode_s += time.perf_counter() - started
        self.stats.decode_tokens += 1
        return [ReplyEvent(item.key, text=piece, tokens=1)]

    def close(self) -> None:
        while self._queue:
            item = self._queue.popleft()
            if item.gen is not None:
                item.gen.close()
