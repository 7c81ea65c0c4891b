"""Continuous batching of chat replies in one llama.cpp context.

Each reply in progress owns one sequence of the chat context. A step evaluates, in one
``llama_decode``, the next token of every reply that is generating (one row of logits each),
after at most ``prefill_chunk`` prompt tokens of replies that joined (their logits are kept
only for a prompt's last token), so a long prompt never stalls the others for long. A reply
that finishes leaves at once; the next waiting one joins at the next step.

Prompt reuse: the KV cells of a finished reply stay with its sequence (a cache, evicted least
recently used as soon as room is needed). A new reply starts from the longest prefix it shares
with what any sequence holds — its chat's previous reply (same system prompt and history), or
any reply of the same prompt version (same system prompt) — borrowing those cells without a
copy (in a unified cache a cell can belong to several sequences). A cancelled or failed reply's
cells are freed at once.

Room: the cache has ``n_ctx`` cells for every sequence together. The batch mirrors which
cells each sequence references (a shared prefix is one set of cells, as in llama.cpp), so it
knows exactly how many are in use; a reply joins only when the cells in use, plus what the
replies in progress may still add (the rest of their prompt and ``max_tokens`` each), leave
room for all of its own. A running reply never runs out of room halfway.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.llm.backends.llama_context import LlamaContext
from bot.llm.batching import BatchStats, ReplyEvent
from bot.llm.types import ChatTurn, InferenceError
from bot.prompts import PromptVersion


class ReplyHost(Protocol):
    """What the batch needs from the backend: the prompt, the vocabulary, the samplers."""

    def chat_tokens(self, version: PromptVersion, history: Sequence[ChatTurn],
                    text: str) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def is_end_of_turn(self, token: int) -> bool: ...

    def new_sampler(self, version: PromptVersion) -> Any: ...

    def sample(self, sampler: Any, ctx: LlamaContext, index: int) -> int: ...

    def free_sampler(self, sampler: Any) -> None: ...

    def remember_reply(self, text: str, tokens: Sequence[int]) -> None: ...


@dataclass(eq=False)
class _Reply:
    key: Hashable
    version: PromptVersion
    prompt: list[int]
    need: int  # cells it may take: prompt + max_tokens (capped by the per-reply limit)
    seq: int = -1
    todo: list[int] = field(default_factory=list)  # prompt tokens not yet evaluated
    sampler: Any = None
    next_token: int | None = None  # sampled, evaluated at the next decode step
    generated: int = 0
    pending: bytes = b""  # an incomplete UTF-8 character
    output: list[int] = field(default_factory=list)  # the tokens sampled
    text: list[str] = field(default_factory=list)  # the text given out


@dataclass(eq=False)
class _Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)  # what its cells hold, by position
    cells: list[int] = field(default_factory=list)  # which cells, by position (our names)
    reply: _Reply | None = None
    used: int = 0  # when it last took a reply (for least-recently-used eviction)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LlamaReplyBatch:
    """The :class:`bot.llm.batching.ReplyBatch` of the llama.cpp backend."""

    def __init__(self, host: ReplyHost, ctx: LlamaContext, *, capacity: int, seq_limit: int,
                 prefill_chunk: int) -> None:
        self.capacity = capacity
        self.seq_limit = min(seq_limit, ctx.n_ctx)  # positions one reply may use
        self.prefill_chunk = max(1, min(prefill_chunk, ctx.n_batch))
        self.stats = BatchStats()
        self._host = host
        self._ctx = ctx
        self._slots = [_Slot(seq) for seq in range(capacity)]
        self._waiting: deque[_Reply] = deque()
        self._replies: dict[Hashable, _Reply] = {}
        self._clock = itertools.count(1)
        # How many sequences reference each cell in use (a cell is free at zero).
        self._refs: dict[int, int] = {}
        self._names = itertools.count()
        # Since the start (stats is reset by the runtime at each idle period).
        self.prefilled = 0  # prompt tokens evaluated
        self.peak_active = 0  # most replies generating at once
        self.peak_reserved = 0  # most cells reserved by replies at once

    # -- what the worker calls ----------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self._replies)

    @property
    def active(self) -> int:
        """Replies holding a sequence (evaluating their prompt, or generating)."""
        return sum(slot.reply is not None for slot in self._slots)

    @property
    def generating(self) -> int:
        """Replies past their prompt, producing tokens."""
        return sum(slot.reply is not None and not slot.reply.todo for slot in self._slots)

    @property
    def context(self) -> LlamaContext:
        return self._ctx

    def sequences(self) -> dict[Hashable, int]:
        """The sequence of each reply holding one."""
        return {slot.reply.key: slot.seq for slot in self._slots if slot.reply is not None}

    def add(self, key: Hashable, version: PromptVersion, history: Sequence[ChatTurn],
            text: str) -> None:
        if key in self._replies:
            raise InferenceError("this reply is already being generated")
        prompt = self._host.chat_tokens(version, history, text)
        need = min(len(prompt) + version.generation.max_tokens, self.seq_limit)
        if need > self._ctx.n_ctx:
            raise InferenceError(
                f"the reply needs {need} tokens, more than the {self._ctx.n_ctx} there are")
        reply = _Reply(key, version, prompt, need)
        self._waiting.append(reply)
        self._replies[key] = reply

    def remove(self, key: Hashable) -> None:
        reply = self._replies.pop(key, None)
        if reply is None:
            return
        if reply.seq < 0:
            self._waiting.remove(reply)
        else:
            self._release(self._slots[reply.seq], keep=False)

    def step(self) -> list[ReplyEvent]:
        events: list[ReplyEvent] = []
        if self._replies:
            self.stats.steps += 1
        self._admit()
        self._prefill(events)
        self._decode(events)
        return events

    def close(self) -> None:
        for slot in self._slots:
            self._release(slot, keep=False)
        self._waiting.clear()
        self._replies.clear()

    @property
    def cells_in_use(self) -> int:
        return len(self._refs)

    def audit(self) -> list[str]:
        """Where the batch's picture of the cache differs from llama.cpp's (for tests)."""
        wrong = []
        for slot in self._slots:
            last = self._ctx.last_pos(slot.seq)
            if last != len(slot.tokens) - 1 or len(slot.cells) != len(slot.tokens):
                wrong.append(f"sequence {slot.seq}: {len(slot.tokens)} tokens, llama.cpp "
                             f"holds positions up to {last}")
        referenced = {cell for slot in self._slots for cell in slot.cells}
        if referenced != set(self._refs):
            wrong.append("cell references out of step")
        return wrong

    def seq_of(self, key: Hashable) -> int:
        """The sequence a reply generates in (-1 while it waits): for tests."""
        reply = self._replies.get(key)
        return -1 if reply is None else reply.seq

    # -- cells ---------------------------------------------------------------------------
    def _cut(self, slot: _Slot, pos: int) -> None:
        """Forget ``slot``'s positions from ``pos`` on."""
        if pos >= len(slot.tokens):
            return
        self._ctx.trim(slot.seq, pos)
        for cell in slot.cells[pos:]:
            self._refs[cell] -= 1
            if not self._refs[cell]:
                del self._refs[cell]
        del slot.tokens[pos:], slot.cells[pos:]

    def _copy(self, src: _Slot, dst: _Slot, length: int) -> None:
        """``dst`` (empty) references ``src``'s first ``length`` cells."""
        self._ctx.share(src.seq, dst.seq, length)
        dst.tokens = src.tokens[:length]
        dst.cells = src.cells[:length]
        for cell in dst.cells:
            self._refs[cell] += 1

    def _grow(self, slot: _Slot, tokens: Sequence[int]) -> None:
        """``tokens`` were just evaluated after ``slot``'s last position, in new cells."""
        for token in tokens:
            cell = next(self._names)
            self._refs[cell] = 1
            slot.tokens.append(token)
            slot.cells.append(cell)

    def _own_cells(self, slot: _Slot, start: int = 0) -> int:
        """Cells from ``start`` on that no other sequence references (freed by a cut)."""
        return sum(self._refs[cell] == 1 for cell in slot.cells[start:])

    # -- joining --------------------------------------------------------------------------
    def _admit(self) -> None:
        """Waiting replies join in arrival order while a sequence and room are free."""
        while self._waiting:
            reply = self._waiting[0]
            free = [slot for slot in self._slots if slot.reply is None]
            if not free:
                return
            source, shared = self._best_source(reply)
            if source is not None and source.reply is None:
                target = source  # reuse its cells in place
            else:
                # An empty sequence first, else the least recently used finished one.
                target = min(free, key=lambda slot: (bool(slot.tokens), slot.used))
            if not self._make_room(reply, target, source, shared):
                return
            self._waiting.popleft()
            if target is source:
                self._cut(target, shared)
            else:
                self._cut(target, 0)
                if source is not None and len(source.tokens) >= shared > 0:
                    self._copy(source, target, shared)
            reply.seq = target.seq
            reply.todo = reply.prompt[len(target.tokens):]
            reply.sampler = self._host.new_sampler(reply.version)
            target.reply = reply
            target.used = next(self._clock)
            self.stats.max_active = max(self.stats.max_active, self.active)
            self.peak_active = max(self.peak_active, self.active)
            self.peak_reserved = max(self.peak_reserved, self.cells_in_use + self._growth())

    def _best_source(self, reply: _Reply) -> tuple[_Slot | None, int]:
        best: _Slot | None = None
        length = 0
        for slot in self._slots:
            n = common_prefix(slot.tokens, reply.prompt)
            if n > length:
                best, length = slot, n
        # Evaluate at least the prompt's last token: its logits give the first reply token.
        return best, min(length, len(reply.prompt) - 1)

    def _growth(self) -> int:
        """Cells the replies in progress may still add: the rest of each one's prompt and
        answer (a borrowed prefix only lowers it)."""
        return sum(slot.reply.need - len(slot.tokens) for slot in self._slots
                   if slot.reply is not None)

    def _make_room(self, reply: _Reply, target: _Slot, source: _Slot | None,
                   shared: int) -> bool:
        """Whether ``reply`` fits in ``target``, evicting finished replies' cells as needed:
        first those no waiting reply would reuse, least recently used first; the prefix
        ``source`` last."""
        keep = shared if target is source else 0

        def fits() -> bool:
            borrowed = shared if source is not None and len(source.tokens) >= shared else 0
            added = reply.need - borrowed  # cells the reply itself may add
            freed = self._own_cells(target, keep)  # what taking ``target`` lets go
            return self.cells_in_use - freed + self._growth() + added <= self._ctx.n_ctx

        def wanted(slot: _Slot) -> int:
            # How much of it a waiting reply (its chat's next message, say) would reuse.
            return max((common_prefix(slot.tokens, other.prompt) for other in self._waiting
                        if other is not reply), default=0)

        for slot in sorted((slot for slot in self._slots
                            if slot.reply is None and slot.tokens and slot is not target),
                           key=lambda slot: (slot is source, wanted(slot), slot.used)):
            if fits():
                return True
            self._cut(slot, 0)
        return fits()

    # -- evaluating -----------------------------------------------------------------------
    def _prefill(self, events: list[ReplyEvent]) -> None:
        """Up to ``prefill_chunk`` prompt tokens of the replies that joined, oldest first;
        logits only for a prompt's last token."""
        rows: list[tuple[int, int, int, bool]] = []
        parts: list[tuple[_Reply, int, int | None]] = []
        budget = self.prefill_chunk
        for slot in sorted((s for s in self._slots if s.reply is not None and s.reply.todo),
                           key=lambda s: s.used):
            reply = slot.reply
            assert reply is not None
            self._borrow(slot, reply)
            # A reply that joined with it is about to evaluate a prefix they share (the same
            # version's system prompt): borrow it at the next step instead of computing it.
            if any(common_prefix(other.prompt, reply.prompt) > len(slot.tokens)
                   for other, _, _ in parts):
                continue
            take = reply.todo[:budget]
            pos = len(slot.tokens)
            done = len(take) == len(reply.todo)
            for i, token in enumerate(take):
                rows.append((token, pos + i, slot.seq, done and i == len(take) - 1))
            parts.append((reply, len(take), len(rows) - 1 if done else None))
            budget -= len(take)
            if budget <= 0:
                break
        if not rows:
            return
        started = time.perf_counter()
        try:
            self._ctx.decode_rows(rows)
        except InferenceError as exc:
            for reply, _, _ in parts:
                self._fail(reply, exc, events)
            return
        for reply, count, out in parts:
            self._grow(self._slots[reply.seq], reply.todo[:count])
            reply.todo = reply.todo[count:]
            if out is not None:
                self._sample(reply, out, events)
        self.stats.prefill_tokens += len(rows)
        self.prefilled += len(rows)
        self.stats.prefill_s += time.perf_counter() - started

    def _borrow(self, slot: _Slot, reply: _Reply) -> None:
        """If another sequence now holds more of this reply's prompt than it has evaluated,
        take those cells instead (a reply that joined in the same step has evaluated it)."""
        best: _Slot | None = None
        length = len(slot.tokens)
        for other in self._slots:
            if other is not slot:
                n = min(common_prefix(other.tokens, reply.prompt), len(reply.prompt) - 1)
                if n > length:
                    best, length = other, n
        if best is not None:
            self._cut(slot, 0)
            self._copy(best, slot, length)
            reply.todo = reply.prompt[length:]

    def _decode(self, events: list[ReplyEvent]) -> None:
        """One token for every generating reply, in one llama_decode."""
        generating = [s.reply for s in self._slots
                      if s.reply is not None and s.reply.next_token is not None]
        if not generating:
            return
        started = time.perf_counter()
        rows = [(r.next_token, len(self._slots[r.seq].tokens), r.seq, True)
                for r in generating if r.next_token is not None]
        try:
            self._ctx.decode_rows(rows)
        except InferenceError as exc:
            for reply in generating:
                self._fail(reply, exc, events)
            return
        for index, reply in enumerate(generating):
            assert reply.next_token is not None
            self._grow(self._slots[reply.seq], (reply.next_token,))
            reply.next_token = None
            self._sample(reply, index, events)
        self.stats.decode_tokens += len(rows)
        self.stats.decode_s += time.perf_counter() - started

    def _sample(self, reply: _Reply, index: int, events: list[ReplyEvent]) -> None:
        """The reply's next token from row ``index`` of the last evaluation."""
        host = self._host
        try:
            token = host.sample(reply.sampler, self._ctx, index)
        except Exception as exc:  # one reply's failure is that reply's alone
            self._fail(reply, exc, events)
            return
        if host.is_end_of_turn(token):
            self._finish(reply, "eos", "", 0, events)
            return
        reply.generated += 1
        reply.output.append(token)
        text, reply.pending = split_utf8(reply.pending + host.token_bytes(token))
        tokens = len(self._slots[reply.seq].tokens)
        if reply.generated >= reply.version.generation.max_tokens or (
                tokens + 1 >= self.seq_limit):
            self._finish(reply, "length", text, 1, events)
            return
        reply.next_token = token
        reply.text.append(text)
        events.append(ReplyEvent(reply.key, text=text, tokens=1))

    # -- leaving --------------------------------------------------------------------------
    def _finish(self, reply: _Reply, reason: str, text: str, tokens: int,
                events: list[ReplyEvent]) -> None:
        if reply.pending:
            text += reply.pending.decode("utf-8", errors="replace")
            reply.pending = b""
        events.append(ReplyEvent(reply.key, text=text, tokens=tokens, finished=reason))
        reply.text.append(text)
        # The chat's next prompt quotes this reply: with these very tokens, it shares this
        # sequence's cells up to the reply's end.
        self._host.remember_reply("".join(reply.text).strip(), reply.output)
        self._replies.pop(reply.key, None)
        self._release(self._slots[reply.seq], keep=True)
        self.stats.replies += 1

    def _fail(self, reply: _Reply, exc: Exception, events: list[ReplyEvent]) -> None:
        error = exc if isinstance(exc, InferenceError) else InferenceError(str(exc))
        events.append(ReplyEvent(reply.key, error=error))
        self._replies.pop(reply.key, None)
        if reply.seq >= 0:
            self._release(self._slots[reply.seq], keep=False)

    def _release(self, slot: _Slot, *, keep: bool) -> None:
        """The reply leaves its sequence; ``keep`` its cells for reuse, or free them."""
        reply = slot.reply
        if reply is not None and reply.sampler is not None:
            self._host.free_sampler(reply.sampler)
            reply.sampler = None
        slot.reply = None
        if not keep:
            self._cut(slot, 0)


def split_utf8(data: bytes) -> tuple[str, bytes]:
    """Decode the complete UTF-8 characters; keep a trailing partial one for later."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace"), b""
