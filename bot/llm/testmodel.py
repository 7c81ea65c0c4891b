"""Random-weight qwen2 GGUF files that llama.cpp really loads: for tests and benchmarks.

The weights are noise, but everything llama.cpp looks at is real: the qwen2 tensor layout, a
byte-level BPE tokenizer with Qwen's pre-tokenizer, the ChatML control tokens and Qwen1.5-Chat's
chat template. ``tiny`` is a few hundred kB and loads in milliseconds; ``qwen1.5-0.5b`` has the
real model's shapes and vocabulary, so its speed and token counts are those of the real model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bot.errors import LoopbotError
from bot.llm import vocab as vocabs

# Sentences the tiny vocabulary learns its merges from: the labels and the words of the
# shipped prompts, so that label scoring and prompts stay a handful of tokens.
SAMPLE_TEXT = (
    "你是一个情感分类器。判断用户消息的情感倾向，只回答“正面”或“负面”。",
    "这家店的服务太好了，下次还来！ 正面",
    "质量很差，用了两天就坏了。 负面",
    "物流很快，包装也很用心。 正面",
    "等了一个小时还没上菜，太失望了。 负面",
    "这部电影太好看了，我非常喜欢。 正面",
    "客服态度很差，再也不买了。 负面",
    "味道不错，价格也合理，推荐！ 正面",
    "东西是坏的，退货还很麻烦。 负面",
    "情感：正面 情感：负面 正面 负面 正面 负面 回答：正面 回答：负面",
    "你是 loopbot，一个友好、简洁的中文助手。用用户的语言回答，回答不超过三句话。",
    "You are a sentiment classifier. Decide whether the user's message is positive or negative.",
    "Answer with one word: positive or negative.",
    "The service was wonderful, I'll come back! positive",
    "Broke after two days. Terrible quality. negative",
    "Fast delivery and careful packaging. positive",
    "Waited an hour for the food, so disappointing. negative",
    "I love it, the best thing I have ever bought. positive",
    "I hate it, this is the worst product and a waste of money. negative",
    "Great movie, really good acting and a happy ending. positive",
    "The app keeps crashing and support never answers. negative",
    "positive negative positive negative Positive Negative positive negative",
    "You are loopbot, a friendly and concise assistant. Answer in the user's language, in at "
    "most three sentences.",
    "user assistant system user assistant system",
)

TINY_MERGES = 400
INIT_STD = 0.02


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    rope_freq_base: float
    rms_eps: float
    full_vocab: bool  # Qwen's real 151,936-row vocabulary, else the small trained one


SHAPES: dict[str, Shape] = {
    "tiny": Shape(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_ctx=32768,
                  rope_freq_base=1e6, rms_eps=1e-6, full_vocab=False),
    # Qwen1.5-0.5B's config.json.
    "qwen1.5-0.5b": Shape(n_embd=1024, n_layer=24, n_head=16, n_head_kv=16, n_ff=2816,
                          n_ctx=32768, rope_freq_base=1e6, rms_eps=1e-6, full_vocab=True),
}
QUANTS = ("f16", "q8_0")


class ModelBuildError(LoopbotError, RuntimeError):
    """The test model could not be built (bad arguments or a failed quantisation)."""


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def build_vocab(shape: Shape, notify: Callable[[str], None] = _note) -> vocabs.Vocab:
    if not shape.full_vocab:
        return vocabs.train_byte_bpe(SAMPLE_TEXT, TINY_MERGES, min_count=1)
    try:
        return vocabs.qwen_vocab()
    except vocabs.VocabError as exc:
        notify(f"{exc}; using a byte-level vocabulary padded to {vocabs.QWEN_VOCAB_SIZE} "
               "rows instead, so token counts will NOT match Qwen's "
               "(install the bench extra: pip install 'loopbot[bench]')")
        return vocabs.byte_level_vocab(SAMPLE_TEXT, TINY_MERGES, vocabs.QWEN_VOCAB_SIZE)


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, columns)
    kind: str  # "weight" (f16 noise), "bias" (f32 noise) or "norm" (f32 ones)


def _tensors(shape: Shape, n_vocab: int) -> list[_Tensor]:
    head_dim = shape.n_embd // shape.n_head
    kv_dim = head_dim * shape.n_head_kv
    e, f = shape.n_embd, shape.n_ff
    # No output.weight: Qwen1.5-0.5B ties the output projection to the token embeddings.
    out = [_Tensor("token_embd.weight", (n_vocab, e), "weight")]
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        out += [
            _Tensor(p + "attn_norm.weight", (e,), "norm"),
            _Tensor(p + "attn_q.weight", (e, e), "weight"),
            _Tensor(p + "attn_q.bias", (e,), "bias"),
            _Tensor(p + "attn_k.weight", (kv_dim, e), "weight"),
            _Tensor(p + "attn_k.bias", (kv_dim,), "bias"),
            _Tensor(p + "attn_v.weight", (kv_dim, e), "weight"),
            _Tensor(p + "attn_v.bias", (kv_dim,), "bias"),
            _Tensor(p + "attn_output.weight", (e, e), "weight"),
            _Tensor(p + "ffn_norm.weight", (e,), "norm"),
            _Tensor(p + "ffn_gate.weight", (f, e), "weight"),
            _Tensor(p + "ffn_up.weight", (f, e), "weight"),
            _Tensor(p + "ffn_down.weight", (e, f), "weight"),
        ]
    out.append(_Tensor("output_norm.weight", (e,), "norm"))
    return out


def _dtype(kind: str) -> type[np.floating]:
    return np.float16 if kind == "weight" else np.float32


def _fill(t: _Tensor, seed: int, index: int) -> np.ndarray:
    data = np.empty(t.shape, dtype=_dtype(t.kind))
    if t.kind == "norm":
        data.fill(1.0)
        return data
    # One generator per tensor: values depend on (seed, tensor) only, not on chunking.
    rng = np.random.default_rng([seed, index])
    flat = data.reshape(-1)
    step = 1 << 22
    buf = np.empty(min(step, flat.size), dtype=np.float32)
    for start in range(0, flat.size, step):
        chunk = buf[: min(step, flat.size - start)]
        rng.standard_normal(out=chunk, dtype=np.float32)
        chunk *= INIT_STD
        flat[start:start + chunk.size] = chunk
    return data


def _write_f16(path: Path, shape_name: str, shape: Shape, vocab: vocabs.Vocab, seed: int) -> None:
    import gguf

    arch = "qwen2"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"loopbot random qwen2 ({shape_name}, seed {seed})")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_freq_base(shape.rope_freq_base)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(vocabs.QWEN_CHAT_TEMPLATE)

    tensors = _tensors(shape, len(vocab))
    for t in tensors:
        dtype = np.dtype(_dtype(t.kind))
        nbytes = int(np.prod(t.shape)) * dtype.itemsize
        writer.add_tensor_info(t.name, t.shape, dtype, nbytes)
    # Streamed tensor by tensor: the 0.5b shape is ~1 GB of F16 that need not sit in memory.
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, t in enumerate(tensors):
        writer.write_tensor_data(_fill(t, seed, index))
    writer.close()


@contextlib.contextmanager
def _quiet_llama() -> Iterator[None]:
    # llama-cpp-python forwards llama.cpp's log through this logger; quantize logs every tensor.
    logger = logging.getLogger("llama-cpp-python")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def quantize_q8_0(src: Path, dst: Path, n_threads: int = 0) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = n_threads or (os.cpu_count() or 1)
    with _quiet_llama():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                            ctypes.byref(params))
    if rc != 0:
        raise ModelBuildError(f"llama_model_quantize failed ({rc}) for {src} -> {dst}")


def make_test_model(
    path: str | os.PathLike[str],
    shape: str = "tiny",
    quant: str = "f16",
    seed: int = 0,
    *,
    notify: Callable[[str], None] = _note,
) -> Path:
    """Write a random-weight qwen2 GGUF at ``path`` and return its path.

    The file appears atomically: a half-written model is never left under the final name.
    """
    if shape not in SHAPES:
        raise ModelBuildError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    if quant not in QUANTS:
        raise ModelBuildError(f"unknown quantisation {quant!r} (choose from {', '.join(QUANTS)})")
    dest = Path(path).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    spec = SHAPES[shape]
    vocab = build_vocab(spec, notify)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    f16 = tmp.with_suffix(".f16") if quant != "f16" else tmp
    try:
        _write_f16(f16, shape, spec, vocab, seed)
        if quant == "q8_0":
            quantize_q8_0(f16, tmp)
        os.replace(tmp, dest)
    finally:
        for leftover in {tmp, f16}:
            leftover.unlink(missing_ok=True)
    return dest
