"""The database notices when it stops taking writes, and refuses to start when it is damaged.

Every failure here is real: SQLite is not replaced by anything. Tests run as root, where file
modes stop nothing, so writes are refused by the kernel instead (RLIMIT_FSIZE: every write()
fails with EFBIG, the errno path SQLite shares with a failing or full disk; ``chattr +i``: the
files are immutable even for root) and damage is real bytes written over a b-tree page.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from bot.errors import LoopbotError
from bot.store import db as dbmod
from bot.store.db import Database
from bot.store.queries import NewInteraction, Store


def interaction(message_id: int, *, text: str | None = None, user: int = 7) -> NewInteraction:
    return NewInteraction(
        chat_id=100, user_id=user, message_id=message_id,
        text=text if text is not None else f"message {message_id} " + "words " * 60,
        version_id="v1", arm="active", bucket=42, label="pos",
        probabilities={"pos": 0.75, "neg": 0.25}, verdict_latency_ms=12.5)


async def build_store(path: Path, rows: int = 200) -> None:
    """A real database, made by the store, with enough rows for a multi-level b-tree."""
    store = await Store.open(path)
    try:
        for i in range(rows):
            await store.insert_interaction(interaction(i))
    finally:
        await store.close()


@contextlib.contextmanager
def file_writes_refused() -> Iterator[None]:
    """Every write() to a file by this process fails with EFBIG (RLIMIT_FSIZE 0), root too.

    Print nothing inside: pytest's captured output is a file as well. SIGXFSZ, which would
    kill the process, is ignored meanwhile, so write() just returns the error.
    """
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@contextlib.contextmanager
def immutable(paths: Sequence[Path]) -> Iterator[None]:
    """``chattr +i``: nobody, root included, may write the files, even through open handles.
    Skips where that is impossible (not root, or a file system without the attribute)."""
    try:
        subprocess.run(["chattr", "+i", *map(str, paths)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=False, capture_output=True)
        pytest.skip(f"cannot make files immutable here: {exc}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True, capture_output=True)


def corrupt_table(path: Path, table: str) -> int:
    """Write random bytes over the root page of ``table``'s b-tree in the main file, as a
    failing disk or a stray write would; returns the page number (a page mid-file)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_schema WHERE type = 'table' AND name = ?",
            (table,)).fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
    assert 1 < root < pages
    with path.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(random.Random(root).randbytes(page_size))
        f.flush()
        os.fsync(f.fileno())
    return int(root)


def commit_elsewhere(path: Path) -> None:
    """A harmless commit by another connection: the bot's connection sees that the database
    changed and drops its page cache, so it reads the damaged page from disk. (It must change
    a value: SQLite writes nothing for an UPDATE that leaves the row as it was.)"""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        (version,) = other.execute("PRAGMA user_version").fetchone()
        other.execute(f"PRAGMA user_version = {int(version) + 1}")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "s.db")
    yield s
    await s.close()


async def test_a_refused_commit_marks_the_database_until_a_write_succeeds(store: Store) -> None:
    db = store.db
    assert db.write_failure is None and db.accepting_writes
    before = time.time()
    with file_writes_refused(), pytest.raises(sqlite3.OperationalError) as refused:
        await store.insert_interaction(interaction(1))
    failure = db.write_failure
    assert failure is not None, "the failed commit was not noticed"
    assert failure.error == str(refused.value) == "disk I/O error"
    assert failure.code == "SQLITE_IOERR_WRITE" and not failure.corrupt
    assert before <= failure.at <= time.time()
    assert not db.accepting_writes
    # Nothing half-done is left on the shared connection, and reads still work.
    assert not db.sqlite_connection.in_transaction
    assert await store.find_interaction(100, 1) is None
    # Still marked: no write has succeeded since, however long ago the failure was.
    assert db.write_failure == failure
    await store.insert_interaction(interaction(2))
    assert db.write_failure is None and db.accepting_writes


async def test_the_probe_commits_a_row_other_connections_see(store: Store) -> None:
    db = store.db
    await db.probe_write()
    first = await db.fetchone("SELECT at FROM health_probe WHERE id = 1")
    await db.probe_write()
    with contextlib.closing(sqlite3.connect(db.path)) as other:
        rows = other.execute("SELECT id, at FROM health_probe").fetchall()
    assert first is not None and len(rows) == 1 and rows[0][1] >= first[0]
    # A failing probe is a failed write like any other; the next good one clears it.
    with file_writes_refused(), pytest.raises(sqlite3.OperationalError):
        await db.probe_write()
    assert db.write_failure is not None
    await db.probe_write()
    assert db.write_failure is None


async def test_application_errors_do_not_mark_the_database(store: Store) -> None:
    db = store.db
    # A constraint the schema enforces on purpose.
    with pytest.raises(sqlite3.IntegrityError):
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO health_probe (id, at) VALUES (2, 0)")
    # A bug in a statement (SQLITE_ERROR), not the database refusing.
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO nowhere VALUES (1)")
    # A rollback on purpose.
    with pytest.raises(ValueError):
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO health_probe (id, at) VALUES (1, 0)")
            raise ValueError("changed my mind")
    assert db.write_failure is None and db.accepting_writes
    assert await db.fetchone("SELECT * FROM health_probe") is None


async def test_an_immutable_database_marks_a_failed_write(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    await build_store(path, rows=3)
    # Read-only from the start: SQLite falls back to a read-only handle and every
    # transaction is refused at BEGIN IMMEDIATE.
    with immutable([path]):
        store = await Store.open(path)
        try:
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                await store.insert_interaction(interaction(10))
            failure = store.db.write_failure
            assert failure is not None and failure.code == "SQLITE_READONLY"
            assert not store.db.accepting_writes
        finally:
            await store.close()
    # Turned read-only while open (the handles were opened for writing): the commit fails.
    store = await Store.open(path)
    try:
        with immutable([path, path.with_name("ro.db-wal")]):
            with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
                await store.insert_interaction(interaction(11))
            assert not store.db.accepting_writes
        await store.insert_interaction(interaction(12))
        assert store.db.accepting_writes
    finally:
        await store.close()


async def test_damaged_pages_mark_the_database_until_it_is_restored(tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    await build_store(path)
    store = await Store.open(path)
    try:
        corrupt_table(path, "interactions")
        commit_elsewhere(path)
        with pytest.raises(sqlite3.DatabaseError, match="malformed"):
            await store.insert_interaction(interaction(1000))
        failure = store.db.write_failure
        assert failure is not None and failure.corrupt
        assert failure.code == "SQLITE_CORRUPT" and "malformed" in failure.error
        # Other tables still take writes, but a commit does not mend the damaged pages.
        await store.db.probe_write()
        assert store.db.write_failure == failure and not store.db.accepting_writes
    finally:
        await store.close()


async def test_a_damaged_database_refuses_to_open_naming_loopbot_restore(
        tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    await build_store(path)
    page = corrupt_table(path, "interactions")
    damaged = path.read_bytes()
    started = time.monotonic()
    with pytest.raises(LoopbotError) as refused:
        await Database.open(path)
    assert time.monotonic() - started < 5
    assert isinstance(refused.value, dbmod.CorruptDatabase)
    message = str(refused.value)
    assert str(path) in message and "loopbot restore" in message
    assert f"page {page}:" in message.lower() and "\n" not in message
    # Nothing was migrated or written into the damaged file: it is left as it was.
    assert path.read_bytes() == damaged


async def test_a_file_that_is_not_a_database_gets_a_plain_message(tmp_path: Path) -> None:
    path = tmp_path / "loopbot.db"
    path.write_bytes(b"name: loopbot\nstorage:\n  db: loopbot.db\n" * 200)
    with pytest.raises(LoopbotError) as refused:
        await Database.open(path)
    assert isinstance(refused.value, dbmod.CorruptDatabase)
    message = str(refused.value)
    assert str(path) in message and "not a SQLite database" in message
    assert "loopbot restore" in message and "\n" not in message
    assert path.read_bytes().startswith(b"name: loopbot")


async def test_a_healthy_database_opens_and_is_checked_each_time(tmp_path: Path) -> None:
    path = tmp_path / "fine.db"
    await build_store(path, rows=50)
    db = await Database.open(path)
    try:
        assert db.write_failure is None and db.accepting_writes
    finally:
        await db.close()
    assert not db.accepting_writes  # closed


SECRET = "my-bank-pin-is-4711-" * 3


async def delete_a_text(path: Path, *, secure_delete_off: bool = False) -> None:
    store = await Store.open(path)
    try:
        if secure_delete_off:
            # What the connection does on a SQLite build that does not default to it.
            await store.db.sqlite_connection.execute("PRAGMA secure_delete=OFF")
        setting = await store.db.fetchone("PRAGMA secure_delete")
        assert setting is not None and setting[0] == (0 if secure_delete_off else 1)
        for i in range(20):
            await store.insert_interaction(interaction(i, user=8))
        await store.insert_interaction(interaction(99, text=SECRET))
        async with store.db.transaction() as conn:
            await conn.execute("DELETE FROM interactions WHERE user_id = 7")
    finally:
        await store.close()  # checkpoints the WAL into the main file and removes it


async def test_deleted_text_is_overwritten_not_only_unlinked(tmp_path: Path) -> None:
    # The control shows the check can fail: without secure_delete the words stay in the file.
    await delete_a_text(tmp_path / "off.db", secure_delete_off=True)
    unlinked = (tmp_path / "off.db").read_bytes()
    assert SECRET.encode() in unlinked and b"message 3 words" in unlinked
    await delete_a_text(tmp_path / "on.db")
    overwritten = (tmp_path / "on.db").read_bytes()
    assert b"message 3 words" in overwritten  # the other rows are still there, in clear text
    assert SECRET.encode() not in overwritten
