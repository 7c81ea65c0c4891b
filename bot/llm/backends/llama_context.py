"""One llama.cpp context over shared weights, sized to what it evaluates.

A context's memory is its KV cache (cells × layers × K and V rows, in ``type_k``/``type_v``)
plus a compute buffer reserved for the largest graph it may run: ``n_ubatch`` tokens at once
with ``n_outputs_max`` rows of logits (each a full vocabulary, 151,936 floats for Qwen). The
defaults of llama.cpp (512 × 512 rows) reserve ~300 MB for Qwen's vocabulary; a verdict needs
one row and a decode step one per sequence, so each context here states what it needs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from bot.llm.types import InferenceError

log = logging.getLogger(__name__)

# ggml_type values of the KV cache types offered in the settings.
KV_TYPES = {"f16": 1, "q8_0": 8}
_FLASH_ATTN_ENABLED = 1
_FLASH_ATTN_AUTO = -1


def lc() -> Any:
    import llama_cpp  # heavy native import: only when a model is really opened

    return llama_cpp


@dataclass(frozen=True)
class ContextShape:
    n_ctx: int  # KV cells shared by all sequences (a unified cache)
    n_batch: int  # tokens per llama_decode call (= n_ubatch: one graph per call)
    n_seq: int  # sequences
    n_outputs: int  # logits rows one call may ask for
    kv_type: str = "q8_0"


class LlamaContext:
    """One llama_context with its batch; decodes token runs into chosen sequences."""

    def __init__(self, llama: Any, model: Any, shape: ContextShape, *, n_threads: int,
                 n_vocab: int) -> None:
        params = llama.llama_context_default_params()
        params.n_ctx = shape.n_ctx
        params.n_batch = shape.n_batch
        params.n_ubatch = shape.n_batch
        params.n_seq_max = shape.n_seq
        # The compute buffer and the logits buffer are sized for this many output rows
        # (llama.cpp aborts at creation if it is below the number of sequences).
        n_outputs = max(shape.n_outputs, shape.n_seq)
        params.n_outputs_max = n_outputs
        # All sequences share one pool of cells: each takes only what it needs.
        params.kv_unified = True
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        kv_type = KV_TYPES[shape.kv_type]
        params.type_k = kv_type
        params.type_v = kv_type
        # A quantized V cache needs flash attention.
        params.flash_attn_type = (_FLASH_ATTN_ENABLED if shape.kv_type != "f16"
                                  else _FLASH_ATTN_AUTO)
        self._lc = llama
        self.ctx = llama.llama_init_from_model(model, params)
        if not self.ctx and shape.kv_type != "f16":
            log.warning("llama.cpp refused a %s KV cache here; using f16", shape.kv_type)
            params.type_k = params.type_v = KV_TYPES["f16"]
            params.flash_attn_type = _FLASH_ATTN_AUTO
            self.ctx = llama.llama_init_from_model(model, params)
        if not self.ctx:
            raise InferenceError("llama.cpp could not create a context (out of memory?)")
        self.mem = llama.llama_get_memory(self.ctx)
        self.n_ctx = int(llama.llama_n_ctx(self.ctx))
        self.n_batch = shape.n_batch
        self.n_outputs = n_outputs
        self.n_vocab = n_vocab
        self.batch = llama.llama_batch_init(shape.n_batch, 0, shape.n_seq)

    def decode(self, tokens: Sequence[int], pos0: int, seq: int, *,
               logits_for: str = "last") -> None:
        """Evaluate ``tokens`` at positions ``pos0...`` of ``seq``.

        ``logits_for`` is "last" (only the final token's logits are kept: all a verdict
        needs, and the cheapest), "none", or "all" (for scoring multi-token labels: then at
        most ``n_outputs`` tokens, and the logits of the i-th are ``logits(i)``).
        """
        if pos0 + len(tokens) > self.n_ctx:
            raise InferenceError(
                f"context full: {pos0 + len(tokens)} tokens do not fit in {self.n_ctx}")
        if logits_for == "all" and len(tokens) > self.n_outputs:
            raise InferenceError(f"{len(tokens)} rows of logits asked, at most "
                                 f"{self.n_outputs} fit")
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last_chunk = start + self.n_batch >= len(tokens)
            self.decode_rows([
                (token, pos0 + start + i, seq,
                 logits_for == "all" or (logits_for == "last" and last_chunk
                                         and i == len(chunk) - 1))
                for i, token in enumerate(chunk)])

    def decode_rows(self, rows: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) rows, in order:
        the logits of the i-th row are ``logits(i)`` afterwards."""
        if len(rows) > self.n_batch:
            raise InferenceError(f"{len(rows)} tokens in one step, at most {self.n_batch}")
        # llama.cpp aborts the process on more output rows than the context was sized for.
        if sum(row[3] for row in rows) > self.n_outputs:
            raise InferenceError(f"more than {self.n_outputs} rows of logits in one step")
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(rows)
        rc = self._lc.llama_decode(self.ctx, batch)
        if rc != 0:
            # 1: no room in the KV cache for this batch; the cache is left as it was.
            raise InferenceError(f"llama_decode failed with code {rc}")

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        ptr = self._lc.llama_get_logits_ith(self.ctx, index)
        if not ptr:
            raise InferenceError("llama.cpp returned no logits")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def trim(self, seq: int, from_pos: int) -> None:
        """Forget ``seq`` from position ``from_pos`` on (0: the whole sequence)."""
        if self.ctx is None:
            return  # closed: nothing left to trim (and its memory handle is gone)
        self._lc.llama_memory_seq_rm(self.mem, seq, from_pos, -1)

    def share(self, src: int, dst: int, length: int) -> None:
        """Let ``dst`` use ``src``'s cells for positions ``[0, length)`` (no copy: in a
        unified cache a cell can belong to several sequences)."""
        self._lc.llama_memory_seq_cp(self.mem, src, dst, 0, length)

    def last_pos(self, seq: int) -> int:
        """The highest position ``seq`` holds, -1 if it holds none."""
        return int(self._lc.llama_memory_seq_pos_max(self.mem, seq))

    def close(self) -> None:
        if self.ctx:
            self._lc.llama_batch_free(self.batch)
            self._lc.llama_free(self.ctx)
            self.ctx = None
