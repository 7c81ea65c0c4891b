"""Continuous batching of replies, on a real (tiny, random-weight) qwen2 GGUF through llama.cpp.

What must hold when replies are generated together: each sequence computes what it would
alone; a reply that leaves (cancelled, timed out, failed) frees its sequence and the others go
on; verdicts still run before the next step; nobody runs out of cache room halfway.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from bot.config import ModelConfig
from bot.llm.backends.base import Backend, Score
from bot.llm.backends.llama_context import LlamaContext
from bot.llm.backends.llama_cpp import LlamaCppBackend
from bot.llm.backends.llama_replies import LlamaReplyBatch
from bot.llm.batching import ReplyEvent, SerialBatch
from bot.llm.runtime import ModelRuntime, open_backend
from bot.llm.types import ChatTurn, InferenceError, InferenceTimeout
from bot.prompts import PromptVersion, load_directory

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
TEXTS = ("hello", "I love it", "这家店太差了", "tell me a story", "what?", "12345 !!!",
         "good morning to you", "再见")


@pytest.fixture(scope="module")
def version() -> PromptVersion:
    return load_directory(PROMPTS)["v1-en"]


def variant(base: PromptVersion, name: str, **generation: Any) -> PromptVersion:
    return dataclasses.replace(base, id=name, content_hash=f"{base.content_hash}-{name}",
                               generation=dataclasses.replace(base.generation, **generation))


class Recording(LlamaCppBackend):
    """The real backend, noting the logits each reply's tokens were sampled from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[str, list[npt.NDArray[np.float32]]] = {}
        self._owner: dict[int, str] = {}

    def new_sampler(self, version: PromptVersion) -> Any:
        sampler = super().new_sampler(version)
        self._owner[id(sampler)] = version.id
        return sampler

    def sample(self, sampler: Any, ctx: LlamaContext, index: int) -> int:
        self.seen.setdefault(self._owner[id(sampler)], []).append(ctx.logits(index).copy())
        return super().sample(sampler, ctx, index)


def recording(model: Path, parallel: int) -> Recording:
    return Recording(model, n_threads=2, parallel_replies=parallel)


def run_batch(backend: LlamaCppBackend, replies: Sequence[tuple[PromptVersion, str]]
              ) -> dict[str, str]:
    """Generate ``replies`` together through the backend's batch; their texts by version."""
    batch = backend.reply_batch()
    texts = {v.id: "" for v, _ in replies}
    for v, text in replies:
        batch.add(v.id, v, [], text)
    while batch.busy:
        for event in batch.step():
            assert event.error is None, event.error
            texts[str(event.key)] += event.text
    return texts


def test_each_sequence_in_a_batched_step_computes_what_it_would_alone(
        tiny_gguf: Path, version: PromptVersion) -> None:
    """Eight greedy replies generated together get, at every step, the logits the same reply
    gets when it is generated alone in a context of its own.

    Tolerance: 2e-3 on logits whose magnitude is ~1. The tiny model's weights are f16, and
    llama.cpp's CPU kernels round a batch's activations to f16 (relative error 2^-11, about
    4.9e-4) on a different path than a single row's, so rows of a batch and a row alone differ
    by ~1e-4 (measured: at most 2.3e-4); a mistake of indexing (another sequence's row, a
    wrong position, a stale cell) moves them by ~1e-1, which the last check shows. On the Q8_0
    model with Qwen's shapes the two are identical (tests/e2e/test_bench.py)."""
    replies = [(variant(version, f"s{i}", temperature=0.0, max_tokens=6), text)
               for i, text in enumerate(TEXTS)]
    together = recording(tiny_gguf, parallel=len(replies))
    alone = recording(tiny_gguf, parallel=1)
    try:
        batched_text = run_batch(together, replies)
        assert together.replies.stats.max_active == len(replies)
        assert together.replies.stats.decode_tokens >= len(replies)  # a batched step ran
        single_text = {v.id: "".join(alone.generate(v, [], text)) for v, text in replies}
        for v, _ in replies:
            got, ref = together.seen[v.id], alone.seen[v.id]
            assert len(got) == len(ref) == 6
            for step, (a, b) in enumerate(zip(got, ref, strict=True)):
                assert np.abs(a - b).max() <= 2e-3, (v.id, step, np.abs(a - b).max())
        assert batched_text == single_text
        # The check has teeth: another sequence's logits are far outside the tolerance.
        other = np.abs(together.seen["s0"][1] - alone.seen["s1"][1]).max()
        assert other > 2e-2
    finally:
        together.close()
        alone.close()


def test_sampling_settings_stay_per_sequence_in_one_batch(tiny_gguf: Path,
                                                           version: PromptVersion) -> None:
    """Each reply samples with its own version's settings and its own sampler state."""
    greedy = variant(version, "greedy", temperature=0.0, max_tokens=12)
    twins = [variant(version, f"twin{i}", temperature=1.5, top_k=1000, top_p=1.0, seed=7,
                     max_tokens=12) for i in range(2)]
    other = variant(version, "other", temperature=1.5, top_k=1000, top_p=1.0, seed=8,
                    max_tokens=12)
    backend = open_backend(tiny_gguf, ModelConfig(n_threads=2, parallel_replies=4))
    alone = open_backend(tiny_gguf, ModelConfig(n_threads=2, parallel_replies=1))
    try:
        assert isinstance(backend, LlamaCppBackend) and isinstance(alone, LlamaCppBackend)
        texts = run_batch(backend, [(v, "hello") for v in (greedy, *twins, other)])
        # Hot neighbours do not change what the greedy reply computes and picks.
        assert texts["greedy"] == "".join(alone.generate(greedy, [], "hello"))
        # Same prompt, same seed: the same draws (a sampler shared by the sequences, or one
        # sequence's token fed to another, would make them differ); another seed differs.
        assert texts["twin0"] == texts["twin1"]
        assert texts["other"] != texts["twin0"] != texts["greedy"]
    finally:
        backend.close()
        alone.close()


async def started(model: Path, factory: Callable[[], Backend] | None = None,
                  **overrides: Any) -> ModelRuntime:
    config = dataclasses.replace(ModelConfig(n_threads=2, n_ctx=1024), **overrides)
    runtime = ModelRuntime(model, config, backend_factory=factory)
    await runtime.start()
    return runtime


def llama(runtime: ModelRuntime) -> LlamaCppBackend:
    backend = runtime.backend
    assert isinstance(backend, LlamaCppBackend)
    return backend


async def generating(runtime: ModelRuntime, count: int) -> None:
    """Until ``count`` replies are past their prompt and producing tokens."""
    batch = llama(runtime).replies
    for _ in range(2000):
        if batch.generating >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{count} replies never generated together ({batch.generating})")


class NotingRemovals(LlamaReplyBatch):
    """The real batch, noting what a leaving reply leaves behind, at that moment."""

    removed: list[tuple[int, int, int]]  # (its sequence, its last cell, replies still active)

    def remove(self, key: Hashable) -> None:
        seq = self.seq_of(key)
        super().remove(key)
        self.removed.append((seq, self.context.last_pos(seq) if seq >= 0 else -1,
                             self.active))


class Noting(LlamaCppBackend):
    def __init__(self, model: Path, parallel: int) -> None:
        super().__init__(model, n_threads=2, parallel_replies=parallel, reply_kv_tokens=4096)
        self.replies = NotingRemovals(self, self.chat, capacity=parallel,
                                      seq_limit=self.reply_limit, prefill_chunk=64)
        self.replies.removed = []


async def test_a_reply_cancelled_mid_batch_frees_its_sequence_and_the_others_finish(
        tiny_gguf: Path, version: PromptVersion) -> None:
    long = variant(version, "long", temperature=0.0, max_tokens=900)
    runtime = await started(tiny_gguf, lambda: Noting(tiny_gguf, 4), parallel_replies=4)
    try:
        tasks = [asyncio.create_task(runtime.reply(long, [], text)) for text in TEXTS[:4]]
        await generating(runtime, 4)
        batch = llama(runtime).replies
        assert isinstance(batch, NotingRemovals)
        seqs = batch.sequences()
        # Keys are submission numbers: tasks[1]'s is the second.
        victim = sorted(k for k in seqs if isinstance(k, int))[1]
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[1], asyncio.CancelledError)
        for reply in (done[0], *done[2:]):
            assert not isinstance(reply, BaseException), reply
            assert reply.stopped_by in ("eos", "length") and reply.tokens > 0
        # When it left, its sequence held no cell any more, and the three others were
        # still generating (they finished afterwards, checked above).
        assert batch.removed == [(seqs[victim], -1, 3)]
        assert runtime.queue_depth == 0 and not batch.busy
        assert await runtime.call(lambda _: batch.audit()) == []
    finally:
        await runtime.close()


async def test_a_timed_out_reply_leaves_the_batch_and_the_others_finish(
        tiny_gguf: Path, version: PromptVersion) -> None:
    long = variant(version, "long", temperature=0.0, max_tokens=400)
    runtime = await started(tiny_gguf, parallel_replies=4, reply_kv_tokens=2048)
    try:
        slow = asyncio.create_task(runtime.reply(long, [], "a story", timeout=0.05))
        others = [asyncio.create_task(runtime.reply(long, [], t)) for t in TEXTS[:3]]
        with pytest.raises(InferenceTimeout):
            await slow
        for reply in await asyncio.gather(*others):
            assert reply.tokens > 0
        assert runtime.queue_depth == 0
    finally:
        await runtime.close()


async def test_a_verdict_submitted_during_a_batch_of_8_runs_before_the_next_step(
        tiny_gguf: Path, version: PromptVersion) -> None:
    seen: list[tuple[int, int]] = []
    runtime: ModelRuntime

    class Watching(LlamaCppBackend):
        def score(self, v: PromptVersion, text: str, *, use_cache: bool = True) -> Score:
            seen.append((runtime.batch_steps, self.replies.generating))
            return super().score(v, text, use_cache=use_cache)

    long = variant(version, "long", temperature=0.0, max_tokens=600)
    runtime = await started(tiny_gguf, lambda: Watching(
        tiny_gguf, n_threads=2, parallel_replies=8, reply_kv_tokens=6144), parallel_replies=8)
    try:
        tasks = [asyncio.create_task(runtime.reply(long, [], text)) for text in TEXTS]
        await generating(runtime, 8)
        for _ in range(5):
            submitted = runtime.batch_steps  # steps finished; one may be running now
            verdict = await runtime.classify(version, "I love it")
            assert verdict.label in version.label_names
            steps_before, generating_then = seen[-1]
            assert steps_before <= submitted + 1
            assert generating_then == 8
        for reply in await asyncio.gather(*tasks):
            assert reply.tokens > 0
    finally:
        await runtime.close()


async def test_one_failing_reply_fails_alone(tiny_gguf: Path, version: PromptVersion) -> None:
    class Failing(LlamaCppBackend):
        def __init__(self) -> None:
            super().__init__(tiny_gguf, n_threads=2, parallel_replies=4)
            self.doomed: set[int] = set()

        def new_sampler(self, v: PromptVersion) -> Any:
            sampler = super().new_sampler(v)
            if v.id == "doomed":
                self.doomed.add(id(sampler))
            return sampler

        def sample(self, sampler: Any, ctx: LlamaContext, index: int) -> int:
            if id(sampler) in self.doomed:
                raise RuntimeError("this reply's sampler broke")
            return super().sample(sampler, ctx, index)

        def free_sampler(self, sampler: Any) -> None:
            self.doomed.discard(id(sampler))  # its id may be reused by the next one
            super().free_sampler(sampler)

    fine = variant(version, "fine", temperature=0.0, max_tokens=40)
    runtime = await started(tiny_gguf, Failing, parallel_replies=4)
    try:
        doomed = asyncio.create_task(runtime.reply(variant(version, "doomed"), [], "hi"))
        others = [asyncio.create_task(runtime.reply(fine, [], t)) for t in TEXTS[:3]]
        with pytest.raises(InferenceError, match="sampler broke"):
            await doomed
        assert all(r.tokens > 0 for r in await asyncio.gather(*others))
        # The worker goes on serving.
        assert (await runtime.reply(fine, [], "again")).tokens > 0
    finally:
        await runtime.close()


async def test_replies_wait_for_room_and_all_complete(tiny_gguf: Path,
                                                      version: PromptVersion) -> None:
    """A cache with room for two replies: the others wait, none runs out halfway. (llama.cpp
    rounds a context up to a multiple of 256 cells: 512 here.)"""
    reply_version = variant(version, "r", temperature=0.0, max_tokens=150)
    runtime = await started(tiny_gguf, parallel_replies=4, n_ctx=256, reply_kv_tokens=512)
    try:
        replies = await asyncio.gather(*[runtime.reply(reply_version, [], t)
                                         for t in TEXTS[:5]])
        assert all(r.stopped_by in ("eos", "length") for r in replies)
        batch = llama(runtime).replies
        assert batch.context.n_ctx == 512
        assert batch.peak_reserved <= 512
        assert batch.peak_active == 2  # ~190 cells each (prompt + 150): two at a time
        assert await runtime.call(lambda _: batch.audit()) == []
    finally:
        await runtime.close()


async def test_a_chat_s_next_prompt_reuses_its_previous_reply(tiny_gguf: Path,
                                                              version: PromptVersion) -> None:
    """The second message of a chat evaluates only what is new: the system prompt, the first
    message and the reply (quoted with the tokens it was generated as) are in the cache."""
    reply_version = variant(version, "r", temperature=0.8, seed=3, max_tokens=40)
    runtime = await started(tiny_gguf, parallel_replies=4)
    try:
        first = await runtime.reply(reply_version, [], "hello there")
        batch = llama(runtime).replies
        before = batch.prefilled
        history = [ChatTurn("user", "hello there"), ChatTurn("assistant", first.text)]
        await runtime.reply(reply_version, history, "and then?")
        evaluated = batch.prefilled - before
        backend = llama(runtime)
        new_part = len(backend.tokenize("and then?", special=False))
        whole = len(backend.chat_tokens(reply_version, history, "and then?"))
        # The last reply token (sampled, never evaluated), the turns' framing, the text.
        assert evaluated <= new_part + 16, (evaluated, new_part, whole)
        assert whole > 2 * evaluated
    finally:
        await runtime.close()


async def test_other_backends_reply_one_at_a_time(tiny_gguf: Path,
                                                  version: PromptVersion) -> None:
    """A backend without a batch (ctransformers) gets the serial one: same contract."""

    class NoBatch:
        name = "no-batch"

        def __init__(self) -> None:
            self.inner = open_backend(tiny_gguf, ModelConfig(n_threads=2))

        def score(self, v: PromptVersion, text: str, *, use_cache: bool = True) -> Score:
            return self.inner.score(v, text, use_cache=use_cache)

        def generate(self, v: PromptVersion, history: Sequence[ChatTurn], text: str) -> Any:
            return self.inner.generate(v, history, text)

        def close(self) -> None:
            self.inner.close()

    greedy = variant(version, "g", temperature=0.0, max_tokens=20)
    runtime = await started(tiny_gguf, NoBatch)
    try:
        assert runtime.parallel_replies == 1
        assert isinstance(runtime._batch, SerialBatch)
        a, b = await asyncio.gather(runtime.reply(greedy, [], "hello"),
                                    runtime.reply(greedy, [], "hello"))
        assert a.text == b.text and a.tokens > 0
    finally:
        await runtime.close()


def test_the_cut_before_the_repeat_penalty_draws_the_same_tokens(
        tiny_gguf: Path, version: PromptVersion) -> None:
    """Sampling keeps only the top_k + 64 candidates before applying the repeat penalty (it
    only lowers the last 64 tokens' logits): the same draws as penalising every token."""

    class PlainChain(LlamaCppBackend):
        def new_sampler(self, v: PromptVersion) -> Any:
            gen, llama = v.generation, self._lc
            chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
            for part in (llama.llama_sampler_init_penalties(64, 64, gen.repeat_penalty, 0.0, 0.0),
                         llama.llama_sampler_init_top_k(gen.top_k),
                         llama.llama_sampler_init_top_p(gen.top_p, 1),
                         llama.llama_sampler_init_temp(gen.temperature),
                         llama.llama_sampler_init_dist(gen.seed)):
                llama.llama_sampler_chain_add(chain, part)
            return chain

    # A strong penalty and a hot, wide sampler: the penalty changes many draws here.
    hot = variant(version, "hot", temperature=1.2, top_k=50, top_p=0.95, seed=5,
                  repeat_penalty=1.8, max_tokens=200)
    cut = open_backend(tiny_gguf, ModelConfig(n_threads=2, parallel_replies=1))
    plain = PlainChain(tiny_gguf, n_threads=2, parallel_replies=1)
    try:
        for text in TEXTS[:4]:
            assert "".join(cut.generate(hot, [], text)) == "".join(plain.generate(hot, [], text))
    finally:
        cut.close()
        plain.close()


def test_the_batch_s_picture_of_the_cache_stays_true_under_churn(
        tiny_gguf: Path, version: PromptVersion) -> None:
    """Replies joining, sharing prefixes, finishing, being cancelled and evicted at random in a
    cache too small for all of them: after every step the cells the batch believes each
    sequence holds are the ones llama.cpp holds, it never over-commits, and every reply that
    was not cancelled completes."""
    import random

    rng = random.Random(4)
    backend = LlamaCppBackend(tiny_gguf, n_threads=2, parallel_replies=4, n_ctx=512,
                              reply_kv_tokens=768)
    batch = backend.replies
    versions = [variant(version, f"v{i}", temperature=0.8, seed=i, max_tokens=rng.randint(5, 90))
                for i in range(3)]
    done: dict[int, str] = {}
    live: set[int] = set()
    history: list[ChatTurn] = []
    said: dict[int, str] = {}

    def note(event: ReplyEvent) -> None:
        key = int(str(event.key))
        said[key] = said.get(key, "") + event.text
        if event.finished is not None:
            done[key] = event.finished
            live.discard(key)
            # Its text comes back quoted in a later prompt, as a chat's history would.
            history.extend([ChatTurn("user", "hi"), ChatTurn("assistant", said[key].strip())])

    try:
        for key in range(60):
            turns = history[-2:] if rng.random() < 0.5 else []
            batch.add(key, rng.choice(versions), turns, rng.choice(TEXTS))
            live.add(key)
            for _ in range(rng.randint(0, 12)):
                for event in batch.step():
                    assert event.error is None, event.error
                    note(event)
                assert batch.audit() == []
                assert batch.cells_in_use + batch._growth() <= batch.context.n_ctx
            if live and rng.random() < 0.2:
                victim = rng.choice(sorted(live))
                batch.remove(victim)
                live.discard(victim)
                assert batch.audit() == []
        while batch.busy:
            for event in batch.step():
                assert event.error is None, event.error
                note(event)
            assert batch.audit() == []
        assert not live and len(done) > 40
        assert batch.peak_active > 1  # it did batch
    finally:
        backend.close()
