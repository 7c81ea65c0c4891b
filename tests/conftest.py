"""Shared fixtures: real GGUF models built at test time (never committed)."""

from __future__ import annotations

import re
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest

if TYPE_CHECKING:
    from tests.llamaserver import LlamaServer
    from tests.pgcluster import PgCluster


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


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL server for the session (Unix socket only, fsync off; see
    tests/pgcluster). Skipped without the server binaries, unless LOOPBOT_REQUIRE_SERVERS=1."""
    from tests.llamaserver import required
    from tests.pgcluster import PgCluster, PgUnavailable

    try:
        cluster = PgCluster().start()
    except PgUnavailable as err:
        reason = f"PostgreSQL cannot run here: {err}"
    else:
        reason = ""
    if reason:
        if required():
            pytest.fail(reason + " (LOOPBOT_REQUIRE_SERVERS=1)", pytrace=False)
        pytest.skip(reason)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, uniquely named database on the session cluster; its SQLAlchemy asyncpg URL.
    Dropped afterwards, WITH (FORCE), so connections a test left open do not matter."""
    from tests.pgcluster import PgClusterError

    stem = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower()).strip("_")[:40]
    name = pg_cluster.create_database(f"t_{stem}_{uuid.uuid4().hex[:8]}")
    yield pg_cluster.url(name)
    try:
        pg_cluster.drop_database(name)
    except PgClusterError as err:  # never fail a test on cleanup: the cluster goes anyway
        warnings.warn(f"dropping test database {name}: {err}", stacklevel=1)


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"),
                        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that uses it runs twice: on a SQLite file and on a fresh PostgreSQL database
    (the cluster is only started when a postgresql case runs)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'loopbot.db'}"
    return cast(str, request.getfixturevalue("pg_url"))
