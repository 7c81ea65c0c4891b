from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bot.llm import model_cli
from bot.llm import vocab as vocabs
from bot.llm.gguf_info import read_gguf_info
from bot.llm.testmodel import SHAPES, ModelBuildError, build_vocab, make_test_model

llama_cpp = pytest.importorskip("llama_cpp")


def _load(path: Path, **kwargs: Any) -> Any:
    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False, **kwargs)


def _last_logits(llm: Any) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def _ids(llm: Any, text: str, special: bool = False) -> list[int]:
    ids: list[int] = llm.tokenize(text.encode(), add_bos=False, special=special)
    return ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("testmodel") / "tiny.gguf")


def test_tiny_model_is_small_and_loads_fast(tiny: Path) -> None:
    assert tiny.stat().st_size < 1_000_000
    started = time.perf_counter()
    llm = _load(tiny)
    assert time.perf_counter() - started < 1.0
    assert llm.metadata["general.architecture"] == "qwen2"
    assert llm.metadata["tokenizer.chat_template"] == vocabs.QWEN_CHAT_TEMPLATE


def test_tiny_vocab_tokenises_labels_into_few_tokens(tiny: Path) -> None:
    llm = _load(tiny, vocab_only=True)
    for label in ("正面", "负面", "positive", "negative", " positive", " negative"):
        assert 1 <= len(_ids(llm, label)) <= 2, label
    # Byte-level: anything round-trips, even text the merges never saw.
    text = "Ünïcödé ✓ 😀 ١٢٣ 東京"
    assert llm.detokenize(_ids(llm, text)).decode() == text


def test_chatml_tokens_are_control_tokens_only_when_asked(tiny: Path) -> None:
    llm = _load(tiny, vocab_only=True)
    im_start, im_end = _ids(llm, "<|im_start|><|im_end|>", special=True)
    assert llm.token_eos() == im_end
    typed = _ids(llm, "<|im_start|>user", special=False)
    assert im_start not in typed and len(typed) > 2
    assert llm.detokenize(typed).decode() == "<|im_start|>user"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_tiny_model_evaluates_to_finite_logits(tmp_path: Path, quant: str) -> None:
    path = make_test_model(tmp_path / f"tiny-{quant}.gguf", quant=quant)
    assert read_gguf_info(path).quantization == quant.upper()
    llm = _load(path)
    llm.eval(_ids(llm, "<|im_start|>user\nI love it<|im_end|>\n", special=True))
    logits = _last_logits(llm)
    assert np.isfinite(logits).all()
    assert logits.std() > 0  # the weights are noise, not zeros


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = make_test_model(tmp_path / "a.gguf", seed=7).read_bytes()
    b = make_test_model(tmp_path / "b.gguf", seed=7).read_bytes()
    c = make_test_model(tmp_path / "c.gguf", seed=8).read_bytes()
    assert a == b
    assert len(a) == len(c) and a != c


def test_bad_arguments_are_refused_and_nothing_is_left(tmp_path: Path) -> None:
    with pytest.raises(ModelBuildError, match="unknown shape"):
        make_test_model(tmp_path / "x.gguf", shape="huge")
    with pytest.raises(ModelBuildError, match="unknown quantisation"):
        make_test_model(tmp_path / "x.gguf", quant="q4_0")
    assert list(tmp_path.iterdir()) == []


def test_missing_qwen_vocab_falls_back_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vocabs, "qwen_tiktoken_path", lambda: None)
    notes: list[str] = []
    vocab = build_vocab(SHAPES["qwen1.5-0.5b"], notes.append)
    assert len(vocab) == vocabs.QWEN_VOCAB_SIZE
    assert "dashscope" in notes[0] and "NOT match" in notes[0]
    assert vocab.tokens[vocab.eos_id] == "<|im_end|>"


def test_make_test_command_writes_the_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="loopbot")
    parser.add_argument("--config")
    model_cli.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli.gguf"
    args = parser.parse_args(["model", "make-test", str(out), "--shape", "tiny", "--seed", "3"])
    assert args.func(args) == 0
    assert read_gguf_info(out).architecture == "qwen2"
    assert str(out) in capsys.readouterr().out


# --- The benchmark shape (slow: one ~500 MB build shared by these tests) --------------------



@pytest.mark.slow
def test_benchmark_shape_has_qwen15_05b_shapes(qwen_q8: Path) -> None:
    info = read_gguf_info(qwen_q8)
    assert info.quantization == "Q8_0"
    assert (info.vocab_size, info.embedding_length, info.block_count, info.head_count,
            info.head_count_kv, info.feed_forward_length, info.context_length) == (
        151936, 1024, 24, 16, 16, 2816, 32768)
    assert info.tied_embeddings
    assert info.metadata["qwen2.rope.freq_base"] == pytest.approx(1e6)
    assert info.metadata["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    names = {t.name for t in info.tensors}
    assert {"blk.0.attn_q.bias", "blk.23.attn_k.bias", "blk.23.attn_v.bias"} <= names
    assert 450e6 < info.parameter_count < 480e6


@pytest.mark.slow
def test_benchmark_shape_tokenises_exactly_like_qwen(qwen_q8: Path) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    path = vocabs.qwen_tiktoken_path()
    assert path is not None
    encoding = tiktoken.Encoding(
        "qwen", pat_str=vocabs.QWEN_SPLIT_PATTERN,
        mergeable_ranks=vocabs.load_qwen_ranks(path), special_tokens={},
    )
    llm = _load(qwen_q8, vocab_only=True)
    samples = [
        "这家店的服务太好了，下次还来！",
        "等了一个小时还没上菜，太失望了。",
        "I love it!!! Don't you? It's 2024-05-17 and pi is 3.14159.",
        "Mixed 中英 text, numbers 1234567 and emoji 😀👍🏽🍎\n\n  spaced\tout\r\n",
        "ÄÖÜ ß café naïve,東京タワーへ行きました。كلمة",
        "正面", "负面", "positive", " negative",
    ]
    for text in samples:
        assert _ids(llm, text) == encoding.encode(text), text
    assert _ids(llm, "<|im_start|><|im_end|><|endoftext|>", special=True) == [
        151644, 151645, 151643]


@pytest.mark.slow
def test_benchmark_shape_q8_0_loads_and_evaluates(qwen_q8: Path) -> None:
    llm = _load(qwen_q8)
    ids = _ids(llm, "<|im_start|>user\n这家店的服务太好了<|im_end|>\n<|im_start|>assistant\n",
               special=True)
    llm.eval(ids)
    logits = _last_logits(llm)
    assert logits.shape == (151936,)
    assert np.isfinite(logits).all() and logits.std() > 0
