"""/healthz and /metrics over real HTTP, with a real model runtime and a real database."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot.config import ModelConfig
from bot.errors import LoopbotError
from bot.llm.runtime import ModelRuntime
from bot.ops.health import Components, HealthChecker, HealthServer
from bot.ops.metrics import Metrics
from bot.store.db import Database
from bot.store.queries import Store
from tests.unit.test_store_db_health import (
    build_store,
    commit_elsewhere,
    corrupt_table,
    file_writes_refused,
    immutable,
    interaction,
)


@pytest.fixture
async def runtime(tiny_gguf: Path) -> AsyncIterator[ModelRuntime]:
    rt = ModelRuntime(tiny_gguf, ModelConfig(n_threads=1))
    await rt.start()
    yield rt
    await rt.close()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "health.db")
    yield database
    await database.close()


async def _get(port: int, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text(), resp.headers.get("Content-Type", "")


async def test_healthz_is_200_when_ready_and_503_naming_a_locked_database(
        runtime: ModelRuntime, db: Database) -> None:
    checker = HealthChecker(lambda: Components(runtime, db), probe_timeout_s=0.5)
    server = HealthServer(checker, host="127.0.0.1", port=0, metrics=Metrics())
    await server.start()
    try:
        assert await _get(server.port, "/healthz") == (200, "ok\n", "text/plain; charset=utf-8")
        # Another process holding SQLite's write lock: the bot could not store a vote now.
        other = sqlite3.connect(db.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            status, body, _ = await _get(server.port, "/healthz")
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert status == 503
        assert "database: a write did not get through" in body
        # Once the lock is gone the probe that was waiting finishes and the bot is healthy.
        for _ in range(50):
            status, body, _ = await _get(server.port, "/healthz")
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert (status, body) == (200, "ok\n")
    finally:
        await server.stop()
    # The probe committed its row (it went through to disk) and left no transaction open.
    probe = await db.fetchone("SELECT at FROM health_probe WHERE id = 1")
    assert probe is not None and probe[0] > 0
    assert db.sqlite_connection.in_transaction is False


async def test_healthz_names_every_missing_part(db: Database, tmp_path: Path) -> None:
    starting = HealthChecker(lambda: Components())
    report = await starting.check()
    assert report.problems == ("model: not loaded", "database: not open")
    closed = await Database.open(tmp_path / "closed.db")
    await closed.close()
    report = await HealthChecker(lambda: Components(None, closed)).check()
    assert "database: closed" in report.problems


async def test_a_full_disk_is_unhealthy(runtime: ModelRuntime, db: Database) -> None:
    # Asking for more free space than any disk has is the same answer as a full disk.
    checker = HealthChecker(lambda: Components(runtime, db), min_free_bytes=1 << 62)
    report = await checker.check()
    assert len(report.problems) == 1 and "MiB free on its disk" in report.problems[0]


async def test_an_inference_job_running_too_long_makes_it_unhealthy(
        runtime: ModelRuntime, db: Database) -> None:
    release = threading.Event()
    job = asyncio.create_task(runtime.call(lambda _backend: release.wait(10), timeout=20))
    try:
        for _ in range(100):
            if runtime.busy_since is not None:
                break
            await asyncio.sleep(0.01)
        checker = HealthChecker(lambda: Components(runtime, db), stuck_after_s=0.5)
        assert (await checker.check()).ok  # running, but not for long yet
        await asyncio.sleep(0.6)
        report = await checker.check()
        assert not report.ok
        assert report.problems[0].startswith("inference: one job has been running for")
    finally:
        release.set()
        await job
    assert (await checker.check()).ok


async def test_metrics_endpoint_serves_loopbot_metrics_in_prometheus_format(
        runtime: ModelRuntime, db: Database) -> None:
    metrics = Metrics()
    metrics.observe_verdict(0.3)
    metrics.count_message()
    metrics.count_vote("v1-en", True)
    metrics.count_decision("promote")
    server = HealthServer(HealthChecker(lambda: Components(runtime, db)), host="127.0.0.1",
                          port=0, metrics=metrics)
    await server.start()
    try:
        status, body, content_type = await _get(server.port, "/metrics")
    finally:
        await server.stop()
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    for line in ('loopbot_verdict_latency_seconds_bucket{le="0.5"} 1.0',
                 "loopbot_verdict_latency_seconds_count 1.0",
                 "loopbot_reply_latency_seconds_count 0.0",
                 "loopbot_inference_queue_depth 0.0",
                 "loopbot_messages_total 1.0",
                 'loopbot_votes_total{correct="true",version="v1-en"} 1.0',
                 'loopbot_decisions_total{action="promote"} 1.0'):
        assert line in body.splitlines(), line


async def test_healthz_is_503_when_the_database_is_read_only(runtime: ModelRuntime,
                                                             db: Database) -> None:
    # SQLite answers a read-only database file and `query_only` with the same refusal
    # ("attempt to write a readonly database"); root ignores file modes, so use the pragma.
    await db.sqlite_connection.execute("PRAGMA query_only = ON")
    checker = HealthChecker(lambda: Components(runtime, db), probe_timeout_s=0.5)
    server = HealthServer(checker, host="127.0.0.1", port=0, metrics=Metrics())
    await server.start()
    try:
        status, body, _ = await _get(server.port, "/healthz")
        assert status == 503 and "database: not writable" in body, body
        await db.sqlite_connection.execute("PRAGMA query_only = OFF")
        assert (await _get(server.port, "/healthz"))[:2] == (200, "ok\n")
    finally:
        await server.stop()


async def test_healthz_is_503_while_the_disk_refuses_writes(runtime: ModelRuntime,
                                                           tmp_path: Path) -> None:
    # The old probe rolled back before anything reached the disk, so it said "ok" here.
    store = await Store.open(tmp_path / "refusing.db")
    checker = HealthChecker(lambda: Components(runtime, store.db), probe_timeout_s=5)
    try:
        assert (await checker.check()).ok
        with file_writes_refused():
            with pytest.raises(sqlite3.OperationalError):
                await store.insert_interaction(interaction(1))
            report = await checker.check()
        assert report.problems == ("database: not writable: disk I/O error",)
        # The disk takes writes again: the probe's own commit proves it.
        assert (await checker.check()).ok
        assert store.db.accepting_writes
    finally:
        await checker.close()
        await store.close()


async def test_healthz_is_503_when_the_database_files_turn_read_only(
        runtime: ModelRuntime, db: Database) -> None:
    checker = HealthChecker(lambda: Components(runtime, db), probe_timeout_s=5)
    server = HealthServer(checker, host="127.0.0.1", port=0, metrics=Metrics())
    await server.start()
    try:
        assert (await _get(server.port, "/healthz"))[:2] == (200, "ok\n")
        with immutable([db.path, db.path.with_name(db.path.name + "-wal")]):
            status, body, _ = await _get(server.port, "/healthz")
        assert (status, body) == (503, "database: not writable: disk I/O error\n")
        assert (await _get(server.port, "/healthz"))[:2] == (200, "ok\n")
    finally:
        await server.stop()


async def test_healthz_is_503_after_a_write_hits_damaged_pages(runtime: ModelRuntime,
                                                               tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    await build_store(path)
    store = await Store.open(path)
    checker = HealthChecker(lambda: Components(runtime, store.db), probe_timeout_s=5)
    server = HealthServer(checker, host="127.0.0.1", port=0, metrics=Metrics())
    await server.start()
    try:
        corrupt_table(path, "interactions")
        commit_elsewhere(path)
        with pytest.raises(sqlite3.DatabaseError, match="malformed"):
            await store.insert_interaction(interaction(1000))
        # The probe's own table still takes writes; the damage is still there.
        for _ in range(2):
            status, body, _ = await _get(server.port, "/healthz")
            assert status == 503, body
            assert body.startswith("database: damaged: database disk image is malformed")
            assert "loopbot restore" in body and len(body.splitlines()) == 1
    finally:
        await server.stop()
        await store.close()
    # The orchestrator restarts the bot: it refuses to start on the damaged file.
    with pytest.raises(LoopbotError, match="loopbot restore"):
        await Store.open(path)
