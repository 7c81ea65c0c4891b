"""llama.cpp backend: a small class over llama-cpp-python's C API.

Why not the high-level ``llama_cpp.Llama``: it keeps one sequence in one context, so a chat
generation would evict the classifier's cached prefix, and it copies the full vocabulary of
logits for every evaluated token. Here one model (weights loaded once) serves two contexts:

* the *verdict* context holds up to ``cache_slots`` prompt-version prefixes, one sequence
  each, in a unified KV cache; a verdict evaluates only the message tokens after its
  version's prefix and then trims them off again;
* the *chat* context generates replies token by token, reusing whatever leading tokens the
  previous reply's prompt shares with the new one (the chat system prompt).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bot.llm import chatml, scoring
from bot.llm.backends.base import Score
from bot.llm.types import ChatTurn, InferenceError, UnsupportedModel
from bot.prompts import PromptVersion

log = logging.getLogger(__name__)

_SUPPORTED_ARCHES = {"qwen2", "qwen", "llama", "qwen3", "qwen2moe", "mistral", "gemma", "phi3"}


def _lc() -> Any:
    import llama_cpp  # heavy native import: only when a model is really opened

    return llama_cpp


@dataclass
class _Prefix:
    seq: int
    tokens: list[int]
    content_hash: str


class _Context:
    """One llama_context with its batch; decodes token runs into chosen sequences."""

    def __init__(self, lc: Any, model: Any, *, n_ctx: int, n_batch: int, n_seq: int,
                 n_threads: int) -> None:
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        # All sequences share one pool of cells: a version's prefix takes only what it needs.
        params.kv_unified = True
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        self._lc = lc
        self.ctx = lc.llama_init_from_model(model, params)
        if not self.ctx:
            raise InferenceError("llama.cpp could not create a context (out of memory?)")
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.n_batch = n_batch
        self.batch = lc.llama_batch_init(n_batch, 0, n_seq)

    def decode(self, tokens: Sequence[int], pos0: int, seq: int, *,
               logits_for: str = "last") -> None:
        """Evaluate ``tokens`` at positions ``pos0...`` of ``seq``.

        ``logits_for`` is "last" (only the final token's logits are kept: all a verdict
        needs, and the cheapest) or "all" (for scoring multi-token labels).
        """
        if pos0 + len(tokens) > self.n_ctx:
            raise InferenceError(
                f"context full: {pos0 + len(tokens)} tokens do not fit in {self.n_ctx}")
        lc, batch = self._lc, self.batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last_chunk = start + self.n_batch >= len(tokens)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = pos0 + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits_for == "all" or (last_chunk and i == len(chunk) - 1)
            batch.n_tokens = len(chunk)
            rc = lc.llama_decode(self.ctx, batch)
            if rc != 0:
                raise InferenceError(f"llama_decode failed with code {rc}")

    def logits(self, index: int, n_vocab: int) -> npt.NDArray[np.float32]:
        ptr = self._lc.llama_get_logits_ith(self.ctx, index)
        if not ptr:
            raise InferenceError("llama.cpp returned no logits")
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    def trim(self, seq: int, from_pos: int) -> None:
        if self.ctx is None:
            return  # closed: nothing left to trim (and its memory handle is gone)
        self._lc.llama_memory_seq_rm(self.mem, seq, from_pos, -1)

    def close(self) -> None:
        if self.ctx:
            self._lc.llama_batch_free(self.batch)
            self._lc.llama_free(self.ctx)
            self.ctx = None


class LlamaCppBackend:
    name = "llama_cpp"

    def __init__(self, model_path: str | Path, *, n_threads: int = 0, n_ctx: int = 2048,
                 cache_slots: int = 4, max_input_tokens: int = 512,
                 arch: str | None = None) -> None:
        if arch is not None and arch not in _SUPPORTED_ARCHES:
            raise UnsupportedModel(
                f"{model_path}: architecture '{arch}' is not one loopbot's llama.cpp backend "
                f"has been used with (supported: {', '.join(sorted(_SUPPORTED_ARCHES))})")
        lc = _lc()
        self._lc = lc
        lc.llama_backend_init()
        # llama.cpp logs every tensor at load; keep our logs readable unless debugging.
        if not log.isEnabledFor(logging.DEBUG):
            _quiet_llama_logs(lc)
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(model_path).encode("utf-8"), mparams)
        if not self.model:
            raise InferenceError(f"{model_path}: llama.cpp could not load this model file")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        threads = n_threads or (os.cpu_count() or 1)
        self.max_input_tokens = max_input_tokens
        self.cache_slots = cache_slots
        self.verdict = _Context(lc, self.model, n_ctx=n_ctx, n_batch=512, n_seq=cache_slots,
                                n_threads=threads)
        self.chat = _Context(lc, self.model, n_ctx=n_ctx, n_batch=512, n_seq=1,
                             n_threads=threads)
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()
        self._chat_tokens: list[int] = []
        self._label_tokens: dict[tuple[str, str], list[int]] = {}
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

    def query_tokens(self, text: str) -> tuple[list[int], bool]:
        """The message framed for the classifier, with the user's text cut to the limit."""
        body = self.tokenize(text, special=False)
        truncated = len(body) > self.max_input_tokens
        if truncated:
            body = body[: self.max_input_tokens]
        head, tail = self._query_framing
        # "user\n" + text tokenizes as user/\n/text pieces under Qwen's pre-tokenizer, so
        # tokenizing them apart gives the same ids while letting us cap the text alone.
        return head + body + tail, truncated

    # -- verdicts -----------------------------------------------------------------------
    def _prefix_for(self, version: PromptVersion) -> _Prefix:
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
        self._ensure_room(len(tokens) + self.max_input_tokens + 64, keep=seq)
        self.verdict.decode(tokens, 0, seq)
        prefix = _Prefix(seq=seq, tokens=tokens, content_hash=version.content_hash)
        self._prefixes[version.id] = prefix
        return prefix

    def _ensure_room(self, needed: int, keep: int) -> None:
        """Evict least recently used prefixes until ``needed`` more cells fit."""
        while (sum(len(p.tokens) for p in self._prefixes.values() if p.seq != keep) + needed
               > self.verdict.n_ctx) and self._prefixes:
            _, evicted = self._prefixes.popitem(last=False)
            self.verdict.trim(evicted.seq, 0)
        if needed > self.verdict.n_ctx:
            raise InferenceError(
                f"the prompt version needs {needed} tokens, more than n_ctx={self.verdict.n_ctx}")

    def prepare(self, version: PromptVersion) -> int:
        """Evaluate a version's prefix now (e.g. at start), returning its length in tokens."""
        return len(self._prefix_for(version).tokens)

    def score(self, version: PromptVersion, text: str, *, use_cache: bool = True) -> Score:
        query, truncated = self.query_tokens(text)
        if use_cache:
            prefix = self._prefix_for(version)
            seq, pos0, tokens = prefix.seq, len(prefix.tokens), query
        else:
            # Uncached: evaluate everything from scratch in a slot of its own (used by the
            # benchmark and by the cache-equivalence test).
            prefix_tokens = self.encode(chatml.classifier_prefix(version))
            seq = self._free_seq()
            self.verdict.trim(seq, 0)
            pos0, tokens = 0, prefix_tokens + query
        try:
            self.verdict.decode(tokens, pos0, seq)
            first = self.verdict.logits(-1, self.n_vocab)
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
                # Teacher forcing: feed the label's own tokens and read each next one's odds.
                self.verdict.decode(tokens[:-1], pos, seq, logits_for="all")
                for i, nxt in enumerate(tokens[1:]):
                    total += scoring.log_softmax_at(self.verdict.logits(i, self.n_vocab),
                                                    [nxt])[0]
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
    def _sampler(self, version: PromptVersion) -> Any:
        lc, gen = self._lc, version.generation
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        last_n = 64
        # The Python binding declares (n_vocab, last_n, ...) while current llama.h takes
        # (last_n, repeat, freq, present); passing last_n twice is right under both.
        lc.llama_sampler_chain_add(
            chain, lc.llama_sampler_init_penalties(last_n, last_n, gen.repeat_penalty, 0.0, 0.0))
        if gen.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(gen.top_k))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(gen.top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(gen.temperature))
        seed = gen.seed if gen.seed >= 0 else 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: random
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def chat_tokens(self, version: PromptVersion, history: Sequence[ChatTurn],
                    text: str) -> list[int]:
        """The reply prompt, dropping the oldest turns until it leaves room to answer."""
        # Leave room to answer; a max_tokens beyond half the context is capped by the context.
        budget = self.chat.n_ctx - min(version.generation.max_tokens, self.chat.n_ctx // 2) - 1
        body = self.tokenize(text, special=False)[: self.max_input_tokens]
        text = self.detokenize(body)
        turns = list(history)
        while True:
            tokens = self.encode(chatml.chat_prompt(version, turns, text))
            if len(tokens) <= budget or not turns:
                break
            turns = turns[1:]
        if len(tokens) > budget:
            raise InferenceError("the message is too long to answer within the context")
        return tokens

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="ignore")

    def generate(self, version: PromptVersion, history: Sequence[ChatTurn],
                 text: str) -> Generator[str, None, str]:
        prompt = self.chat_tokens(version, history, text)
        # Reuse the KV cells of the longest common prefix with the previous reply's prompt.
        common = 0
        for a, b in zip(self._chat_tokens, prompt, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # always evaluate >= 1 token for fresh logits
        self.chat.trim(0, common)
        self._chat_tokens = prompt[:common]
        sampler = self._sampler(version)
        pending = b""
        reason = "length"
        try:
            self.chat.decode(prompt[common:], common, 0)
            self._chat_tokens = list(prompt)
            for _ in range(version.generation.max_tokens):
                token = self._lc.llama_sampler_sample(sampler, self.chat.ctx, -1)
                if self.is_end_of_turn(token):
                    reason = "eos"
                    break
                # llama_sampler_sample has already accepted the token (repeat penalty window).
                pending += self.token_bytes(token)
                text_out, pending = _split_utf8(pending)
                if text_out:
                    yield text_out
                if len(self._chat_tokens) + 1 >= self.chat.n_ctx:
                    break
                self.chat.decode([token], len(self._chat_tokens), 0)
                self._chat_tokens.append(token)
        except BaseException:
            self._chat_tokens = []  # state unknown: start from scratch next time
            self.chat.trim(0, 0)
            raise
        finally:
            self._lc.llama_sampler_free(sampler)
        if pending:
            yield pending.decode("utf-8", errors="replace")
        return reason

    def close(self) -> None:
        self.verdict.close()
        self.chat.close()
        if self.model:
            self._lc.llama_model_free(self.model)
            self.model = None


def _split_utf8(data: bytes) -> tuple[str, bytes]:
    """Decode the complete UTF-8 characters; keep a trailing partial one for later."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace"), b""


def _forward_errors(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == 4:  # GGML_LOG_LEVEL_ERROR (5 is CONT: progress dots)
        log.error("llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())


# The ctypes callback must outlive every call into llama.cpp, so it lives at module level.
_log_callback: Any = None


def _quiet_llama_logs(lc: Any) -> None:
    global _log_callback
    if _log_callback is None:
        _log_callback = lc.llama_log_callback(_forward_errors)
    lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
