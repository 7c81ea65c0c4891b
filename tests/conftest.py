"""Shared fixtures: real GGUF models built at test time (never committed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.llamaserver import LlamaServer


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight qwen2 GGUF with a real byte-level BPE tokenizer and ChatML."""
    from bot.llm.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "tiny.gguf", shape="tiny")


@pytest.fixture(scope="session")
def qwen_q8(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Qwen1.5-0.5B's exact shapes and real vocabulary, random weights, Q8_0 (~500 MB)."""
    from bot.llm import vocab
    from bot.llm.testmodel import make_test_model

    if vocab.qwen_tiktoken_path() is None:
        pytest.skip("dashscope (Qwen's vocabulary; the 'bench' extra) is not installed")
    path = make_test_model(tmp_path_factory.mktemp("qwen05") / "q8.gguf",
                           shape="qwen1.5-0.5b", quant="q8_0")
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """llama.cpp's llama-server, built once from the vendored source (see tests/llamaserver)."""
    from tests.llamaserver import server_binary

    return server_binary()


@pytest.fixture(scope="module")
def llama_server(llama_server_binary: Path, tiny_gguf: Path) -> Iterator[LlamaServer]:
    """A real llama-server on 127.0.0.1 serving the tiny test model (2 slots)."""
    from tests.llamaserver import LlamaServer

    server = LlamaServer(llama_server_binary, tiny_gguf).start()
    yield server
    server.stop()
