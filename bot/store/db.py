"""The SQLite connection: WAL, foreign keys, versioned migrations, serialised transactions.

One aiosqlite connection serves the whole process. Every statement goes through one asyncio
lock, so a coroutine's transaction can never interleave with another's half-finished one on the
shared connection (SQLite sees a single connection, the lock gives each caller a clean view).

A damaged file is refused when it is opened (``PRAGMA quick_check``), and a transaction the
database refuses while the bot runs (read-only, full or failing disk, damaged pages) is kept as
:attr:`Database.write_failure` until a commit succeeds, so ``/healthz`` and the Telegram layer
can say so instead of the bot going silent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from bot.errors import LoopbotError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATION_RE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")

# SQLite's primary result codes (the low byte of an extended code) that mean the database
# refuses the write: it is read-only, locked past the busy timeout, the disk is full or fails,
# the file is damaged. Not among them: a statement the code got wrong (SQLITE_ERROR), a
# constraint doing its job (SQLITE_CONSTRAINT), or a rollback on purpose.
_REFUSALS = frozenset({
    sqlite3.SQLITE_PERM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOTADB,
})
# Damage does not mend itself: a later commit that avoids the bad pages proves nothing.
_DAMAGE = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class MigrationError(LoopbotError, RuntimeError):
    """The migrations on disk and the schema in the database do not fit together."""


class CorruptDatabase(LoopbotError, RuntimeError):
    """The database file is damaged, or is not a SQLite database: it has to be restored."""


@dataclass(frozen=True)
class WriteFailure:
    """The last transaction the database refused (see :attr:`Database.write_failure`)."""

    error: str  # SQLite's message, e.g. "attempt to write a readonly database"
    code: str  # SQLite's error name, e.g. "SQLITE_IOERR_WRITE"
    at: float  # time.time() when it was refused
    corrupt: bool  # damaged pages: only a restore ends it, not a later successful commit


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _restore_hint(path: Path) -> str:
    return (f"stop the bot and put the newest backup in its place with "
            f"`loopbot restore BACKUP_FILE --db {path}` (the damaged file is kept beside it)")


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
        self._write_failure: WriteFailure | None = None

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
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA busy_timeout=30000")
            try:
                # The first statements read the header: a file that is no database fails here.
                await conn.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit is on disk before the caller goes on (a vote is acknowledged
                # only after this), which also survives power loss, not only a killed process.
                await conn.execute("PRAGMA synchronous=FULL")
                # Deleted rows are overwritten with zeros, not only unlinked: /forget and the
                # retention job erase the words from the file (some SQLite builds default to
                # it, others do not).
                await conn.execute("PRAGMA secure_delete=ON")
                await _quick_check(conn, path)
            except sqlite3.DatabaseError as exc:
                if _primary_code(exc) not in _DAMAGE:
                    raise
                raise _damaged(path, exc) from exc
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

    @property
    def write_failure(self) -> WriteFailure | None:
        """The last transaction the database refused (at BEGIN, in its block or at COMMIT),
        until a later commit succeeds; ``None`` while writes go through. Damaged pages stay
        reported for the life of this connection: a restart checks the file and refuses it."""
        return self._write_failure

    @property
    def accepting_writes(self) -> bool:
        """False once closed and while :attr:`write_failure` is set: tell the user the bot is
        temporarily unavailable rather than stay silent. A successful commit (a user's or
        :meth:`probe_write`) sets it back to True, so callers may keep trying."""
        return not self._closed and self._write_failure is None

    async def probe_write(self) -> None:
        """Commit one row to ``health_probe`` the way a vote is committed (BEGIN IMMEDIATE, a
        write, COMMIT fsync'd under synchronous=FULL). Raises what SQLite raised; like any
        transaction it records a refusal in, or clears, :attr:`write_failure`."""
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO health_probe (id, at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET at = excluded.at", (time.time(),))

    async def checkpoint(self) -> bool:
        """Copy the WAL into the main file and truncate it (``wal_checkpoint(TRUNCATE)``): with
        secure_delete the zeroed pages then replace the old ones in the file. False when a
        reader in another process kept it from completing (it is retried by later ones)."""
        async with self._lock, self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
            row = await cur.fetchone()
        return row is not None and row[0] == 0

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
        """``BEGIN IMMEDIATE`` … ``COMMIT``; any exception rolls the whole block back.

        A refusal by the database (see ``_REFUSALS``) is kept as :attr:`write_failure`; a
        successful COMMIT clears it."""
        async with self._lock:
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._note_refusal(exc)
                raise
            try:
                yield self._conn
            except BaseException as exc:
                await self._rollback()
                if isinstance(exc, sqlite3.Error):
                    self._note_refusal(exc)
                raise
            try:
                await self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                # A failed COMMIT may leave the transaction open: never leave it to the next
                # caller, whose BEGIN would fail ("cannot start a transaction within ...").
                await self._rollback()
                self._note_refusal(exc)
                raise
            self._note_commit()

    async def _rollback(self) -> None:
        # SQLite has already rolled back after some errors (SQLITE_FULL, SQLITE_IOERR,
        # SQLITE_BUSY, ...): a second ROLLBACK would fail and hide the error that matters.
        if not self._conn.in_transaction:
            return
        try:
            await self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("database: rollback failed: %s", exc)
            self._note_refusal(exc)

    def _note_refusal(self, exc: sqlite3.Error) -> None:
        code = _primary_code(exc)
        if code not in _REFUSALS:
            return
        current = self._write_failure
        if current is not None and current.corrupt:
            return  # the damage stays the news
        failure = WriteFailure(
            error=str(exc), code=getattr(exc, "sqlite_errorname", "") or f"SQLite code {code}",
            at=time.time(), corrupt=code in _DAMAGE)
        if failure.corrupt:
            log.error("database %s is damaged: %s; %s", self.path, exc,
                      _restore_hint(self.path))
        elif current is None:
            log.error("database %s refused a write: %s (%s)", self.path, exc, failure.code)
        self._write_failure = failure

    def _note_commit(self) -> None:
        failure = self._write_failure
        if failure is not None and not failure.corrupt:
            log.warning("database %s takes writes again (refused since %.0fs ago: %s)",
                        self.path, time.time() - failure.at, failure.error)
            self._write_failure = None

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


async def _quick_check(conn: aiosqlite.Connection, path: Path) -> None:
    """Refuse a damaged file before anything runs on it. quick_check reads every page once,
    so start-up pays O(size of the file): 0.3 s for a 380 MB database in the OS cache, else
    the time to read the file from disk (integrity_check, which also compares every index with
    its table, took 3.8 s on the same file: not worth it at every start)."""
    started = time.monotonic()
    async with conn.execute("PRAGMA quick_check(3)") as cur:
        rows = [str(row[0]) for row in await cur.fetchall()]
    took = time.monotonic() - started
    if took > 2.0:
        log.info("database %s: quick_check took %.1fs", path, took)
    if rows != ["ok"]:
        found = "; ".join(line for row in rows for line in row.splitlines()
                          if line and not line.startswith("***"))
        raise CorruptDatabase(
            f"{path} is damaged (SQLite's quick_check: {found}); {_restore_hint(path)}")


def _damaged(path: Path, exc: sqlite3.DatabaseError) -> CorruptDatabase:
    if _primary_code(exc) == sqlite3.SQLITE_NOTADB:
        # `loopbot restore` cannot tell whether the bot still uses a file it cannot read as a
        # database, so it wants that file moved aside first (and then --new).
        return CorruptDatabase(
            f"{path} is not a SQLite database (SQLite: {exc}); if it is loopbot's database, it "
            f"is damaged: stop the bot, move it aside and restore the newest backup with "
            f"`loopbot restore BACKUP_FILE --db {path} --new`; otherwise point storage.db at "
            f"the right file")
    return CorruptDatabase(f"{path} is damaged (SQLite: {exc}); {_restore_hint(path)}")


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
