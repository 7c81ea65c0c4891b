from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from bot.llm import model_cli
from bot.llm.gguf_info import GGUFError, read_gguf_info
from bot.llm.testmodel import make_test_model
from bot.llm.vocab import QWEN_CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("gguf_info") / "tiny.gguf", shape="tiny")


def test_reads_the_header_of_a_tiny_qwen2(tiny: Path) -> None:
    info = read_gguf_info(tiny)
    assert info.architecture == "qwen2"
    assert info.quantization == "F16"
    assert info.file_size == tiny.stat().st_size
    assert (info.embedding_length, info.block_count, info.head_count, info.head_count_kv,
            info.feed_forward_length, info.context_length) == (64, 2, 4, 2, 128, 32768)
    assert info.chat_template == QWEN_CHAT_TEMPLATE
    assert (info.tokenizer_model, info.tokenizer_pre) == ("gpt2", "qwen2")
    assert info.eos_token_id is not None
    assert info.special_tokens[info.eos_token_id] == "<|im_end|>"
    assert info.bos_token_id is not None
    assert info.special_tokens[info.bos_token_id] == "<|endoftext|>"
    assert info.add_bos_token is False
    assert info.tied_embeddings


def test_agrees_with_the_gguf_package_reader(tiny: Path) -> None:
    from gguf import GGUFReader

    info = read_gguf_info(tiny)
    reader = GGUFReader(tiny)
    assert info.tensor_count == len(reader.tensors)
    assert [t.name for t in info.tensors] == [t.name for t in reader.tensors]
    assert [t.ggml_type for t in info.tensors] == [int(t.tensor_type) for t in reader.tensors]
    assert info.parameter_count == sum(int(t.n_elements) for t in reader.tensors)
    assert info.vocab_size == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert info.metadata["general.name"] == reader.fields["general.name"].contents()


def test_quantised_file_reports_q8_0(tmp_path: Path) -> None:
    path = make_test_model(tmp_path / "q8.gguf", shape="tiny", quant="q8_0")
    assert read_gguf_info(path).quantization == "Q8_0"


def test_quantisation_is_inferred_without_file_type(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("w", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_gguf_info(path)
    assert (info.architecture, info.file_type, info.quantization) == ("llama", None, "F32")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a GGUF file"),
        (b"PK\x03\x04" + b"\0" * 64, "not a GGUF file"),
        (b"GGUF" + (9).to_bytes(4, "little") + b"\0" * 32, "unsupported GGUF version 9"),
    ],
)
def test_non_gguf_files_are_refused_by_name(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message) as caught:
        read_gguf_info(path)
    assert str(path) in str(caught.value)


def test_truncated_weights_are_detected(tiny: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:-1000])
    with pytest.raises(GGUFError, match=r"truncated GGUF file.*interrupted download") as caught:
        read_gguf_info(cut)
    assert str(cut) in str(caught.value)


def test_truncated_header_is_detected(tiny: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:5000])  # inside the token list
    with pytest.raises(GGUFError, match="truncated GGUF header"):
        read_gguf_info(cut)


def test_missing_file_is_a_gguf_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such model file"):
        read_gguf_info(tmp_path / "absent.gguf")
    assert issubclass(GGUFError, ValueError)


def _run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="loopbot")
    parser.add_argument("--config")
    model_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


def test_info_command_prints_architecture_quant_and_template(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run_cli("model", "info", str(tiny)) == 0
    out = capsys.readouterr().out
    assert "architecture:    qwen2" in out
    assert "quantisation:    F16" in out
    assert "<|im_start|>assistant\\n" in out  # the template, newlines escaped
    assert _run_cli("model", "info", "--json", str(tiny)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "qwen2"
    assert data["chat_template"] == QWEN_CHAT_TEMPLATE


def test_info_command_fails_cleanly_on_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("hello, not a model")
    assert _run_cli("model", "info", str(bad)) == 1
    assert "not a GGUF file" in capsys.readouterr().err
