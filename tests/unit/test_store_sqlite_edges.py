"""SQLite's one connection under SQLAlchemy: a failed COMMIT and a cancelled task leave it
usable, with its pragmas, and nothing half-done visible."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.store.db import Database


async def test_a_commit_that_fails_leaves_nothing_open_and_nothing_visible(
        tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "c.db")
    try:
        async with db.transaction() as conn:
            await conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
            await conn.execute(
                "CREATE TABLE child (p INTEGER REFERENCES parent (id)"
                " DEFERRABLE INITIALLY DEFERRED)")
        # The foreign key is checked at COMMIT: the commit itself fails.
        with pytest.raises(Exception, match="FOREIGN KEY"):
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO child (p) VALUES (42)")
        assert not db.sqlite_connection.in_transaction
        assert await db.fetchall("SELECT p FROM child") == []
        async with db.transaction() as conn:  # the next transaction begins normally
            await conn.execute("INSERT INTO parent (id) VALUES (1)")
        assert [tuple(r) for r in await db.fetchall("SELECT id FROM parent")] == [(1,)]
    finally:
        await db.close()


async def test_a_task_cancelled_mid_transaction_leaves_the_connection_usable(
        tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "k.db")
    started = asyncio.Event()
    try:
        async def slow_write() -> None:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO health_probe (id, at) VALUES (1, 1.0)")
                started.set()
                # A statement that takes a while, cancelled while it runs.
                await conn.execute(
                    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n"
                    " WHERE x < 3000000) SELECT COUNT(*) FROM n")

        task = asyncio.create_task(slow_write())
        await started.wait()
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Rolled back, the same connection, its pragmas in force, writes go through.
        assert await db.fetchall("SELECT * FROM health_probe") == []
        fks = await db.fetchone("PRAGMA foreign_keys")
        assert fks is not None and fks[0] == 1
        await asyncio.wait_for(db.probe_write(), timeout=5)
    finally:
        await asyncio.wait_for(db.close(), timeout=10)
