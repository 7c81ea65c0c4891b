"""The SQLite connection: WAL, foreign keys, versioned migrations, serialised transactions.

One aiosqlite connection serves the whole process. Every statement goes through one asyncio
lock, so a coroutine's transaction can never interleave with another's half-finished one on the
shared connection (SQLite sees a single connection, the lock gives each caller a clean view).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from bot.errors import LoopbotError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATION_RE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


class MigrationError(LoopbotError, RuntimeError):
    """The migrations on disk and the schema in the database do not fit together."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def discover_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """``NNN_name.sql`` files in order; gaps and duplicates are refused (a lost file is a bug)."""
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_RE.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migration {migration.version:03d}_{migration.name} found where "
                f"{expected:03d} was expected (versions must be 1, 2, 3, ... without gaps)"
            )
    return found


def _prepare_path(path: str | Path) -> Path:
    """Startup only (a blocking mkdir is fine here): the database's directory must exist."""
    path = Path(path).expanduser()
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


class Database:
    """An open loopbot database. Use :meth:`open`; close with :meth:`close`."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(
        cls, path: str | Path, *, migrations: Iterable[Migration] | None = None
    ) -> Database:
        path = _prepare_path(path)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), so the
        # sqlite3 module never opens or commits one behind our back.
        conn = await aiosqlite.connect(str(path), isolation_level=None, timeout=30.0)
        try:
            conn.row_factory = aiosqlite.Row
            await conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the caller goes on (a vote is acknowledged only
            # after this), which also survives power loss, not only a killed process.
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA busy_timeout=30000")
            db = cls(conn, path)
            await db._migrate(list(migrations) if migrations is not None
                              else discover_migrations())
        except BaseException:
            await conn.close()
            raise
        return db

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            # Folds the WAL back into the main file so a copied .db is complete on its own.
            with suppress(sqlite3.Error):
                await self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            await self._conn.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def _migrate(self, migrations: list[Migration]) -> None:
        await self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        async with self._conn.execute("SELECT MAX(version) FROM schema_version") as cur:
            row = await cur.fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        latest = migrations[-1].version if migrations else 0
        if current > latest:
            raise MigrationError(
                f"{self.path}: schema version {current} is newer than this loopbot knows "
                f"({latest}); run the newer release or restore a backup"
            )
        for migration in migrations:
            if migration.version <= current:
                continue
            # executescript commits any open transaction first, so BEGIN/COMMIT live inside the
            # script: the migration and its schema_version row land together or not at all.
            script = (
                "BEGIN IMMEDIATE;\n"
                f"{migration.sql}\n;\n"
                "INSERT INTO schema_version (version, name, applied_at) VALUES "
                f"({migration.version}, '{migration.name}', {time.time()!r});\n"
                "COMMIT;"
            )
            try:
                await self._conn.executescript(script)
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    await self._conn.execute("ROLLBACK")
                raise MigrationError(
                    f"migration {migration.version:03d}_{migration.name} failed: {exc}"
                ) from exc

    async def schema_version(self) -> int:
        row = await self.fetchone("SELECT MAX(version) FROM schema_version")
        return int(row[0]) if row and row[0] is not None else 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; any exception rolls the whole block back."""
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            else:
                await self._conn.execute("COMMIT")

    async def fetchall(
        self, sql: str, params: tuple[object, ...] | dict[str, object] = ()
    ) -> list[aiosqlite.Row]:
        async with self._lock, self._conn.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def fetchone(
        self, sql: str, params: tuple[object, ...] | dict[str, object] = ()
    ) -> aiosqlite.Row | None:
        async with self._lock, self._conn.execute(sql, params) as cur:
            return await cur.fetchone()


async def fetchone(
    conn: aiosqlite.Connection, sql: str, params: tuple[object, ...] = ()
) -> aiosqlite.Row | None:
    """A read inside an open :meth:`Database.transaction` (the lock is already held)."""
    async with conn.execute(sql, params) as cur:
        return await cur.fetchone()


async def fetchall(
    conn: aiosqlite.Connection, sql: str, params: tuple[object, ...] = ()
) -> list[aiosqlite.Row]:
    async with conn.execute(sql, params) as cur:
        return list(await cur.fetchall())
