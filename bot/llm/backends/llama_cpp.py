"""llama.cpp backend: a small class over llama-cpp-python's C API.

Why not the high-level ``llama_cpp.Llama``: it keeps one sequence in one context, so a chat
generation would evict the classifier's cached prefix, and it copies the full vocabulary of
logits for every evaluated token. Here one model (weights loaded once) serves two contexts:

* the *verdict* context holds up to ``cache_slots`` prompt-version prefixes, one sequence
  each, in a unified KV cache; a verdict evaluates only the message tokens after its
  version's prefix and then trims them off again;
* the *chat* context generates up to ``parallel_replies`` replies at once, one sequence each,
  one token for all of them per ``llama_decode`` (:mod:`bot.llm.backends.llama_replies`),
  each reusing the longest prefix it shares with what the context holds.

Each context is sized to what it evaluates (:mod:`bot.llm.backends.llama_context`): the
verdict context asks for a few rows of logits, the chat context one per reply; both keep
their KV cache in ``kv_cache_type`` (q8_0 by default: half of f16).
"""

from __future__ import annotations

import ctypes
import logging
import os
from array import array
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bot.llm import chatml, scoring
from bot.llm.backends.base import Score
from bot.llm.backends.llama_context import ContextShape, LlamaContext, lc
from bot.llm.backends.llama_replies import LlamaReplyBatch
from bot.llm.types import ChatTurn, InferenceError, UnsupportedModel
from bot.prompts import PromptVersion

log = logging.getLogger(__name__)

_SUPPORTED_ARCHES = {"qwen2", "qwen", "llama", "qwen3", "qwen2moe", "mistral", "gemma", "phi3"}
# Tokens per llama_decode in the verdict context: prefixes and long messages go in chunks of
# this many (the compute buffer grows with it; past ~128 a CPU gains nothing).
VERDICT_BATCH = 128
# Rows of logits one verdict evaluation asks for: the last token's, or a label's tokens.
VERDICT_OUTPUTS = 8
# Values per block of q8_0 (a head's row must split into whole blocks).
QUANT_BLOCK = 32
# How a chat prompt's assistant turn opens (chatml.message("assistant", ...)).
ASSISTANT_HEAD = "assistant\n"
# Recent replies whose generated tokens are kept to quote them exactly in the next prompt.
REMEMBERED_REPLIES = 1024
# Default KV cells per parallel reply (model.reply_kv_tokens = 0).
REPLY_KV_PER_SEQ = 256


@dataclass
class _Prefix:
    seq: int
    tokens: list[int]
    content_hash: str


class LlamaCppBackend:
    name = "llama_cpp"

    def __init__(self, model_path: str | Path, *, n_threads: int = 0, n_ctx: int = 2048,
                 verdict_cells: int = 768, cache_slots: int = 4, max_input_tokens: int = 512,
                 arch: str | None = None, parallel_replies: int = 1,
                 reply_kv_tokens: int = 0, prefill_chunk: int = 64,
                 kv_type: str = "q8_0") -> None:
        if arch is not None and arch not in _SUPPORTED_ARCHES:
            raise UnsupportedModel(
                f"{model_path}: architecture '{arch}' is not one loopbot's llama.cpp backend "
                f"has been used with (supported: {', '.join(sorted(_SUPPORTED_ARCHES))})")
        llama = lc()
        self._lc = llama
        llama.llama_backend_init()
        # llama.cpp logs every tensor at load; keep our logs readable unless debugging.
        if not log.isEnabledFor(logging.DEBUG):
            _quiet_llama_logs(llama)
        mparams = llama.llama_model_default_params()
        self.model = llama.llama_model_load_from_file(str(model_path).encode("utf-8"), mparams)
        if not self.model:
            raise InferenceError(f"{model_path}: llama.cpp could not load this model file")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        threads = n_threads or (os.cpu_count() or 1)
        self.max_input_tokens = max_input_tokens
        self.cache_slots = cache_slots
        parallel = max(1, parallel_replies)
        head_dim = llama.llama_model_n_embd(self.model) // max(1, llama.llama_model_n_head(
            self.model))
        if kv_type != "f16" and head_dim % QUANT_BLOCK:
            # A quantized cache stores each head's row in blocks of 32 (tiny test models).
            log.info("KV cache in f16: heads of %d do not split into blocks of %d", head_dim,
                     QUANT_BLOCK)
            kv_type = "f16"
        self.verdict = LlamaContext(llama, self.model, ContextShape(
            n_ctx=verdict_cells, n_batch=VERDICT_BATCH, n_seq=cache_slots,
            n_outputs=VERDICT_OUTPUTS, kv_type=kv_type), n_threads=threads,
            n_vocab=self.n_vocab)
        try:
            chunk = max(1, prefill_chunk)
            self.chat = LlamaContext(llama, self.model, ContextShape(
                n_ctx=max(reply_kv_tokens or REPLY_KV_PER_SEQ * parallel, n_ctx),
                n_batch=max(chunk, parallel), n_seq=parallel, n_outputs=parallel,
                kv_type=kv_type), n_threads=threads, n_vocab=self.n_vocab)
        except BaseException:
            self.verdict.close()
            raise
        # The most one reply may take: its prompt (oldest turns dropped first) and answer.
        self.reply_limit = min(n_ctx, self.chat.n_ctx)
        self.replies = LlamaReplyBatch(self, self.chat, capacity=parallel,
                                       seq_limit=self.reply_limit, prefill_chunk=chunk)
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()
        self._label_tokens: dict[tuple[str, str], list[int]] = {}
        # Recent replies' text -> the tokens generated for it (see chat_tokens).
        self._replies_said: OrderedDict[str, array[int]] = OrderedDict()
        self._assistant_head = self.tokenize(ASSISTANT_HEAD, special=False)
        # The message's chat framing is the same for every verdict: tokenize it once.
        self._query_framing = (
            self.encode([chatml.Piece(chatml.IM_START, True), chatml.Piece("user\n")]),
            self.encode([chatml.Piece(chatml.IM_END, True), chatml.Piece("\n"),
                         *chatml.assistant_opening()]),
        )

    # -- tokenization -------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Plain text is tokenized with ``special=False``: a typed ``<|im_end|>`` stays text."""
        raw = text.encode("utf-8")
        capacity = len(raw) + 8
        buf = (self._lc.llama_token * capacity)()
        n = self._lc.llama_tokenize(self.vocab, raw, len(raw), buf, capacity, False, special)
        if n < 0:
            raise InferenceError("tokenizer buffer too small")
        return list(buf[:n])

    def encode(self, pieces: Sequence[chatml.Piece]) -> list[int]:
        tokens: list[int] = []
        for piece in pieces:
            tokens += self.tokenize(piece.text, special=piece.control)
        return tokens

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def is_end_of_turn(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

    def label_tokens(self, version: PromptVersion, label: str) -> list[int]:
        """A label's tokens as they follow ``assistant\\n`` (as in the few-shot turns)."""
        key = (version.id, label)
        if key not in self._label_tokens:
            opening = self.tokenize("assistant\n", special=False)
            joined = self.tokenize("assistant\n" + label, special=False)
            tokens = (joined[len(opening):] if joined[:len(opening)] == opening
                      else self.tokenize(label, special=False))
            if not tokens:
                raise InferenceError(f"label '{label}' tokenizes to nothing")
            self._label_tokens[key] = tokens
        return self._label_tokens[key]

    def query_tokens(self, text: str, limit: int | None = None) -> tuple[list[int], bool]:
        """The message framed for the classifier, with the user's text cut to the limit
        (``model.max_input_tokens``, or ``limit`` if less)."""
        body = self.tokenize(text, special=False)
        keep = self.max_input_tokens if limit is None else min(limit, self.max_input_tokens)
        truncated = len(body) > keep
        if truncated:
            body = body[: max(0, keep)]
        head, tail = self._query_framing
        # "user\n" + text tokenizes as user/\n/text pieces under Qwen's pre-tokenizer, so
        # tokenizing them apart gives the same ids while letting us cap the text alone.
        return head + body + tail, truncated

    # -- verdicts -----------------------------------------------------------------------
    def _label_room(self, version: PromptVersion) -> int:
        """Cells the label scoring adds after the query (a label's tokens but its last)."""
        return max(len(self.label_tokens(version, name)) for name in version.label_names)

    def _prefix_for(self, version: PromptVersion, room: int = 0) -> _Prefix:
        """The version's cached prefix, evaluated if it is not cached, with ``room`` more
        cells free after it."""
        cached = self._prefixes.get(version.id)
        if cached is not None and cached.content_hash == version.content_hash:
            self._prefixes.move_to_end(version.id)
            return cached
        if cached is not None:
            seq = cached.seq  # the file changed: rebuild in the same slot
            del self._prefixes[version.id]
        else:
            seq = self._free_seq()
        self.verdict.trim(seq, 0)
        tokens = self.encode(chatml.classifier_prefix(version))
        if self._make_room(len(tokens) + room, keep=seq) < len(tokens) + room:
            raise InferenceError(
                f"the prompt version {version.id} needs {len(tokens) + room} tokens, more than "
                f"the verdict context's {self.verdict.n_ctx} (model.verdict_kv_tokens)")
        self.verdict.decode(tokens, 0, seq)
        prefix = _Prefix(seq=seq, tokens=tokens, content_hash=version.content_hash)
        self._prefixes[version.id] = prefix
        return prefix

    def _make_room(self, needed: int, keep: int) -> int:
        """Drop least recently used prefixes (not sequence ``keep``'s) until ``needed``
        cells are free for ``keep``; returns the cells ``keep`` may use."""
        def others() -> int:
            return sum(len(p.tokens) for p in self._prefixes.values() if p.seq != keep)

        while others() + needed > self.verdict.n_ctx:
            victim = next((vid for vid, p in self._prefixes.items() if p.seq != keep), None)
            if victim is None:
                break
            self.verdict.trim(self._prefixes.pop(victim).seq, 0)
        return self.verdict.n_ctx - others()

    def prepare(self, version: PromptVersion) -> int:
        """Evaluate a version's prefix now (e.g. at start), returning its length in tokens."""
        return len(self._prefix_for(version).tokens)

    def score(self, version: PromptVersion, text: str, *, use_cache: bool = True) -> Score:
        head, tail = self._query_framing
        fixed = len(head) + len(tail) + self._label_room(version)
        if use_cache:
            prefix = self._prefix_for(version, fixed)
            seq, pos0, lead = prefix.seq, len(prefix.tokens), []
        else:
            # Uncached: evaluate everything from scratch in a slot of its own (used by the
            # benchmark and by the cache-equivalence test).
            lead = self.encode(chatml.classifier_prefix(version))
            seq, pos0 = self._free_seq(), 0
            self.verdict.trim(seq, 0)
        wanted = min(len(self.tokenize(text, special=False)), self.max_input_tokens)
        room = self._make_room(pos0 + len(lead) + fixed + wanted, keep=seq)
        fits = room - pos0 - len(lead) - fixed
        if fits <= 0:
            raise InferenceError(
                f"the prompt version {version.id} leaves no room for a message in the verdict "
                f"context ({self.verdict.n_ctx} tokens: raise model.verdict_kv_tokens)")
        query, truncated = self.query_tokens(text, fits)
        tokens = lead + query
        try:
            self.verdict.decode(tokens, pos0, seq)
            first = self.verdict.logits(-1)
            logprobs = self._label_logprobs(version, first, seq, pos0 + len(tokens))
        finally:
            self.verdict.trim(seq, pos0)
        probabilities = scoring.normalise(logprobs)
        return Score(probabilities=probabilities, tokens_evaluated=len(tokens),
                     prefix_cached=use_cache, truncated=truncated)

    def _free_seq(self) -> int:
        """An unused sequence, else the least recently used one (its prefix forgotten)."""
        if len(self._prefixes) < self.cache_slots:
            used = {p.seq for p in self._prefixes.values()}
            return min(set(range(self.cache_slots)) - used)
        _, evicted = self._prefixes.popitem(last=False)
        return evicted.seq

    def _label_logprobs(self, version: PromptVersion, first: npt.NDArray[np.float32],
                        seq: int, pos: int) -> dict[str, float]:
        label_tokens = {name: self.label_tokens(version, name) for name in version.label_names}
        firsts = scoring.log_softmax_at(first, [t[0] for t in label_tokens.values()])
        result: dict[str, float] = {}
        for (name, tokens), lp_first in zip(label_tokens.items(), firsts, strict=True):
            total = lp_first
            if len(tokens) > 1:
                # Teacher forcing: feed the label's own tokens and read each next one's odds
                # (a few rows of logits per evaluation: the context is sized for that many).
                fed, step = tokens[:-1], self.verdict.n_outputs
                for start in range(0, len(fed), step):
                    chunk = fed[start:start + step]
                    self.verdict.decode(chunk, pos + start, seq, logits_for="all")
                    for i, nxt in enumerate(tokens[start + 1:start + 1 + len(chunk)]):
                        total += scoring.log_softmax_at(self.verdict.logits(i), [nxt])[0]
                self.verdict.trim(seq, pos)
            result[name] = total
        return result

    def raw_decode(self, version: PromptVersion, tokens: Sequence[int]) -> None:
        """One bare llama.cpp evaluation after the cached prefix: the benchmark's floor."""
        prefix = self._prefix_for(version)
        pos0 = len(prefix.tokens)
        self.verdict.decode(tokens, pos0, prefix.seq)
        self.verdict.trim(prefix.seq, pos0)

    # -- chat ---------------------------------------------------------------------------
    def new_sampler(self, version: PromptVersion) -> Any:
        """A sampler chain with the version's settings (one per reply)."""
        llama, gen = self._lc, version.generation
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        last_n = 64
        keep = 1 if gen.temperature <= 0 else gen.top_k
        if keep > 0 and gen.repeat_penalty >= 1.0:
            # The repeat penalty only lowers the logits of the last_n tokens, so whatever
            # wins after it is among the keep + last_n best before it: cutting to those first
            # draws the same token without penalising the whole vocabulary (for Qwen's
            # 151,936 tokens: 0.54 -> 0.12 ms a token, 8 rows a step).
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(keep + last_n))
        # The Python binding declares (n_vocab, last_n, ...) while current llama.h takes
        # (last_n, repeat, freq, present); passing last_n twice is right under both.
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_penalties(
            last_n, last_n, gen.repeat_penalty, 0.0, 0.0))
        if gen.temperature <= 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
            return chain
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(gen.top_k))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(gen.top_p, 1))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(gen.temperature))
        seed = gen.seed if gen.seed >= 0 else 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: random
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
        return chain

    def sample(self, sampler: Any, ctx: LlamaContext, index: int) -> int:
        """Sample from row ``index`` of ``ctx``'s last evaluation (the sampler accepts the
        token: it enters the repeat-penalty window)."""
        return int(self._lc.llama_sampler_sample(sampler, ctx.ctx, index))

    def free_sampler(self, sampler: Any) -> None:
        self._lc.llama_sampler_free(sampler)

    def chat_tokens(self, version: PromptVersion, history: Sequence[ChatTurn],
                    text: str) -> list[int]:
        """The reply prompt, dropping the oldest turns until it leaves room to answer."""
        budget = chatml.reply_budget(self.reply_limit, version.generation.max_tokens)
        body = self.tokenize(text, special=False)[: self.max_input_tokens]
        text = self.detokenize(body)
        turns = list(history)
        while True:
            tokens = self._encode_chat(chatml.chat_prompt(version, turns, text))
            if len(tokens) <= budget or not turns:
                break
            turns = turns[1:]
        if len(tokens) > budget:
            raise InferenceError("the message is too long to answer within the context")
        return tokens

    def _encode_chat(self, pieces: Sequence[chatml.Piece]) -> list[int]:
        """Like :meth:`encode`, but a reply this backend generated recently is quoted with
        the tokens it was generated as: re-tokenizing its text may split it differently, and
        then the chat's next prompt would share fewer cells with the sequence that holds it."""
        tokens: list[int] = []
        for piece in pieces:
            said = (self._replies_said.get(piece.text[len(ASSISTANT_HEAD):])
                    if not piece.control and piece.text.startswith(ASSISTANT_HEAD) else None)
            if said is not None:
                tokens += self._assistant_head
                tokens += said
            else:
                tokens += self.tokenize(piece.text, special=piece.control)
        return tokens

    def remember_reply(self, text: str, tokens: Sequence[int]) -> None:
        if not text:
            return
        self._replies_said[text] = array("i", tokens)
        self._replies_said.move_to_end(text)
        while len(self._replies_said) > REMEMBERED_REPLIES:
            self._replies_said.popitem(last=False)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="ignore")

    def reply_batch(self) -> LlamaReplyBatch:
        """The replies in progress, generated together (what the runtime's worker drives)."""
        return self.replies

    def generate(self, version: PromptVersion, history: Sequence[ChatTurn],
                 text: str) -> Generator[str, None, str]:
        """One reply on its own, through the same batch (which must be idle)."""
        if self.replies.busy:
            raise InferenceError("replies are being generated in the batch")
        key = object()
        self.replies.add(key, version, history, text)
        try:
            while True:
                for event in self.replies.step():
                    if event.error is not None:
                        raise event.error
                    if event.text:
                        yield event.text
                    if event.finished is not None:
                        return event.finished
        finally:
            self.replies.remove(key)  # a no-op once finished; frees it if stopped early

    def close(self) -> None:
        self.replies.close()
        self.verdict.close()
        self.chat.close()
        if self.model:
            self._lc.llama_model_free(self.model)
            self.model = None


def _forward_errors(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == 4:  # GGML_LOG_LEVEL_ERROR (5 is CONT: progress dots)
        log.error("llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())


# The ctypes callback must outlive every call into llama.cpp, so it lives at module level.
_log_callback: Any = None


def _quiet_llama_logs(llama: Any) -> None:
    global _log_callback
    if _log_callback is None:
        _log_callback = llama.llama_log_callback(_forward_errors)
    llama.llama_log_set(_log_callback, ctypes.c_void_p(0))
