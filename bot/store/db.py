"""The database: SQLite by default, PostgreSQL for several replicas; one schema, one owner.

Every statement runs through SQLAlchemy 2 Core (``aiosqlite`` or ``asyncpg`` underneath), in
this package only: the rest of the bot calls :mod:`bot.store`. Statements are written once in
SQL that both databases read the same way (``ON CONFLICT``, ``RETURNING``, ``CASE`` instead of
boolean arithmetic); the few that differ are spelled by :class:`Connection` per dialect
(:meth:`Connection.hour_bucket`, :meth:`Connection.lock`). The schema is migrated by Alembic
(:mod:`bot.store.schema`); databases made before Alembic are stamped and upgraded in place.

SQLite: one connection serves the whole process and every statement goes through one asyncio
lock, so a coroutine's transaction never interleaves with another's half-finished one;
transactions are ``BEGIN IMMEDIATE`` (the writer's lock is taken at the start, so a change
re-checked inside its transaction cannot be overtaken). A damaged file is refused when it is
opened (``PRAGMA quick_check``).

PostgreSQL: a connection pool, transactions run concurrently (READ COMMITTED); where the
bot needs one writer at a time (version state, one user's votes against /forget) the
transaction takes a transaction-scoped advisory lock (:meth:`Connection.lock`), which is
released at commit or rollback and therefore also safe with pooled connections.

On both, a transaction the database refuses while the bot runs (read-only, full or failing
disk, damaged pages, the server gone) is kept as :attr:`Database.write_failure` until a
commit succeeds, so ``/healthz`` and the Telegram layer can say so instead of going silent.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.elements import TextClause

from bot.errors import LoopbotError

# The schema's names, re-exported: callers know bot.store.db only.
from bot.store.schema import HEAD_VERSION as HEAD_VERSION
from bot.store.schema import MIGRATIONS_DIR as MIGRATIONS_DIR
from bot.store.schema import Migration as Migration
from bot.store.schema import MigrationError as MigrationError
from bot.store.schema import SchemaBehind as SchemaBehind
from bot.store.schema import apply_legacy_sqlite, current_version, upgrade_to_head
from bot.store.schema import discover_migrations as discover_migrations
from bot.store.schema import split_sqlite_script as split_sqlite_script

log = logging.getLogger(__name__)
T = TypeVar("T")


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
# PostgreSQL SQLSTATE classes that mean the server refuses writes or is gone (not a bug in a
# statement, not a constraint): 08 connection, 53 resources (disk full), 57 operator
# intervention (shutdown), 58 system error, 25006 read-only transaction (a standby).
_PG_REFUSAL_CLASSES = ("08", "53", "57", "58")
_PG_READ_ONLY = "25006"

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
# The SQLite library Python was built with (reports and benchmarks name it).
SQLITE_VERSION = sqlite3.sqlite_version

# Errors a database call may raise: sqlite3's own (unwrapped, as before SQLAlchemy) for
# SQLite, SQLAlchemy's for PostgreSQL.
DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, SQLAlchemyError)


class CorruptDatabase(LoopbotError, RuntimeError):
    """The database file is damaged, or is not a SQLite database: it has to be restored."""


@dataclass(frozen=True)
class WriteFailure:
    """The last transaction the database refused (see :attr:`Database.write_failure`)."""

    error: str  # the database's message, e.g. "attempt to write a readonly database"
    code: str  # SQLite's error name, e.g. "SQLITE_IOERR_WRITE", or PostgreSQL's SQLSTATE
    at: float  # time.time() when it was refused
    corrupt: bool  # damaged pages: only a restore ends it, not a later successful commit


def _primary_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _restore_hint(path: Path) -> str:
    return (f"stop the bot and put the newest backup in its place with "
            f"`loopbot restore BACKUP_FILE --db {path}` (the damaged file is kept beside it)")


# --- where the database is -----------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A database to open: a SQLite file, or a PostgreSQL URL."""

    dialect: str
    url: str  # SQLAlchemy's async URL (sqlite+aiosqlite:///..., postgresql+asyncpg://...)
    path: Path | None  # the SQLite file; None for PostgreSQL

    @property
    def display(self) -> str:
        """Where it is, for logs and messages: the file, or the URL without its password."""
        if self.path is not None:
            return str(self.path)
        # As the operator wrote it (postgresql://), without the driver or the password.
        return make_url(self.url).set(drivername="postgresql").render_as_string(
            hide_password=True)


def parse_target(where: str | Path) -> Target:
    """``where`` is a file path (SQLite), ``sqlite:///path`` or ``postgresql://...``."""
    raw = str(where)
    if raw.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
        url = make_url(raw.replace("postgres://", "postgresql://", 1))
        return Target(POSTGRESQL, url.set(drivername="postgresql+asyncpg")
                      .render_as_string(hide_password=False), None)
    if raw.startswith("sqlite"):
        url = make_url(raw)
        if url.get_backend_name() != "sqlite" or not url.database:
            raise MigrationError(f"{raw}: a SQLite URL names a file (sqlite:///path/to.db)")
        raw = url.database
    path = _prepare_path(raw)
    return Target(SQLITE, f"sqlite+aiosqlite:///{path}", path)


def _prepare_path(path: str | Path) -> Path:
    """Startup only (a blocking mkdir is fine here): the database's directory must exist."""
    path = Path(path).expanduser()
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --- rows and statements -------------------------------------------------------------------

class Record(Sequence[Any]):
    """A result row, read by position (``row[0]``) or by column name (``row["id"]``)."""

    __slots__ = ("_keys", "_values")

    def __init__(self, values: tuple[Any, ...], keys: Mapping[str, int]) -> None:
        self._values = values
        self._keys = keys

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self._values[self._keys[key]]
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __repr__(self) -> str:
        return f"Record({dict(zip(self._keys, self._values, strict=True))!r})"


Params = Sequence[Any] | Mapping[str, Any]


@functools.lru_cache(maxsize=2048)
def _clause(sql: str) -> TextClause:
    """The statement with ``?`` placeholders renamed ``:p0, :p1, ...`` (SQLAlchemy's bound
    parameters, which each driver then spells its own way: ``?`` for SQLite, ``$1`` for
    asyncpg). A colon in the SQL itself is escaped so that it is not taken for a parameter."""
    out: list[str] = []
    quote: str | None = None
    n = 0
    for ch in sql:
        if quote is not None:
            out.append("\\:" if ch == ":" else ch)
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append(f":p{n}")
            n += 1
        elif ch == ":":
            out.append("\\:")
        else:
            out.append(ch)
    return text("".join(out))


def _clean(value: Any) -> Any:
    # PostgreSQL's text cannot hold U+0000 ("invalid byte sequence for encoding UTF8"), and a
    # model's reply or a user's message can contain it: stored as U+FFFD on both databases,
    # so a text reads back the same whichever one the bot runs on.
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _bind(params: Params) -> dict[str, Any]:
    if isinstance(params, Mapping):
        return {key: _clean(value) for key, value in params.items()}
    return {f"p{i}": _clean(value) for i, value in enumerate(params)}


def _statement(sql: str, params: Params) -> TextClause:
    return text(sql) if isinstance(params, Mapping) else _clause(sql)


@dataclass(frozen=True)
class Cursor:
    """What a statement returned: the rows (for ``RETURNING`` and queries) and how many rows
    it changed."""

    rowcount: int
    rows: list[Record]

    def fetchone(self) -> Record | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Record]:
        return list(self.rows)


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock`` (the same in every process
    and release: Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big",
                          signed=True)


async def finish_first(operation: Awaitable[T]) -> T:
    """Await ``operation`` even if the caller is cancelled meanwhile, then pass the
    cancellation on. SQLite's one connection must not be cut off in the middle of a
    statement: SQLAlchemy would throw the connection away (with SQLite's write lock still
    held on it) and silently open another."""
    task = asyncio.ensure_future(operation)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with suppress(BaseException):
            await task
        raise


class Connection:
    """A connection inside one transaction (or one read) of :class:`Database`."""

    def __init__(self, conn: AsyncConnection, dialect: str, database: Database) -> None:
        self._conn = conn
        self.dialect = dialect
        self._database = database

    async def execute(self, sql: str, params: Params = ()) -> Cursor:
        try:
            run = self._conn.execute(_statement(sql, params), _bind(params))
            result = await (finish_first(run) if self.dialect == SQLITE else run)
        except DBAPIError as exc:
            raise self._database._unwrap(exc) from exc
        rows = ([Record(tuple(r), {k: i for i, k in enumerate(result.keys())})
                 for r in result.fetchall()] if result.returns_rows else [])
        return Cursor(result.rowcount if result.rowcount is not None else -1, rows)

    async def executemany(self, sql: str, seq: Iterable[Params]) -> None:
        batch = list(seq)
        if not batch:
            return
        try:
            run = self._conn.execute(_statement(sql, batch[0]), [_bind(p) for p in batch])
            await (finish_first(run) if self.dialect == SQLITE else run)
        except DBAPIError as exc:
            raise self._database._unwrap(exc) from exc

    async def fetchone(self, sql: str, params: Params = ()) -> Record | None:
        return (await self.execute(sql, params)).fetchone()

    async def fetchall(self, sql: str, params: Params = ()) -> list[Record]:
        return (await self.execute(sql, params)).rows

    async def insert_id(self, sql: str, params: Params = ()) -> int:
        """An INSERT of one row; returns its new ``id`` (``RETURNING id`` on both databases)."""
        row = (await self.execute(f"{sql} RETURNING id", params)).fetchone()
        assert row is not None
        return int(row[0])

    async def lock(self, name: str) -> None:
        """Hold a named lock until this transaction ends. PostgreSQL: a transaction-scoped
        advisory lock (released at commit or rollback, so a pooled connection never keeps
        it). SQLite: nothing to do, ``BEGIN IMMEDIATE`` already let one writer in."""
        if self.dialect == POSTGRESQL:
            await self.execute("SELECT pg_advisory_xact_lock(?)", (lock_key(name),))

    def hour_bucket(self, expr: str) -> str:
        """SQL for ``expr`` (seconds / period, a float) truncated towards zero to an integer,
        the same on both databases: SQLite's CAST truncates, PostgreSQL's rounds (6000/3600
        is hour 1 in SQLite and 2 in PostgreSQL), so PostgreSQL truncates first."""
        if self.dialect == POSTGRESQL:
            return f"CAST(TRUNC({expr}) AS BIGINT)"
        return f"CAST({expr} AS INTEGER)"


class Database:
    """An open loopbot database. Use :meth:`open`; close with :meth:`close`."""

    def __init__(self, engine: AsyncEngine, target: Target,
                 sqlite_conn: AsyncConnection | None) -> None:
        self._engine = engine
        self.target = target
        self.dialect = target.dialect
        # SQLite: the one connection (SQLAlchemy's), and under it aiosqlite's (``_conn``).
        self._sa = sqlite_conn
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._write_failure: WriteFailure | None = None

    @property
    def path(self) -> Path:
        """The SQLite file (PostgreSQL: a placeholder path naming the server, for messages)."""
        return self.target.path if self.target.path is not None else Path(self.target.display)

    @property
    def sqlite_connection(self) -> aiosqlite.Connection:
        """SQLite's own connection under SQLAlchemy's (tests, pragmas); not for PostgreSQL."""
        if self._conn is None:
            raise TypeError(f"{self.target.display} is not a SQLite database")
        return self._conn

    @property
    def is_postgresql(self) -> bool:
        return self.dialect == POSTGRESQL

    @classmethod
    async def open(
        cls, where: str | Path, *, migrations: Iterable[Migration] | None = None,
        upgrade: bool | None = None, check_schema: bool = True,
    ) -> Database:
        """Open the database at ``where`` (a SQLite path or URL, or a PostgreSQL URL).

        ``upgrade``: bring the schema to this release's head first. Default: yes for SQLite
        (one process owns the file), no for PostgreSQL, where ``loopbot db upgrade`` runs the
        migrations once and a replica started against an older schema refuses to run.
        ``migrations`` (tests): apply only these pre-Alembic SQL files, as an older release
        would have, and stop there. ``check_schema=False`` (``loopbot db``): open whatever
        schema the database has, without migrating it."""
        target = parse_target(where)
        if target.dialect == POSTGRESQL:
            return await cls._open_postgresql(target, upgrade=bool(upgrade),
                                              check=check_schema)
        return await cls._open_sqlite(target, migrations=migrations,
                                      upgrade=upgrade is None or upgrade, check=check_schema)

    @classmethod
    async def _open_sqlite(cls, target: Target, *, migrations: Iterable[Migration] | None,
                           upgrade: bool, check: bool) -> Database:
        assert target.path is not None
        path = target.path
        # One connection for the process (StaticPool); timeout: SQLite's busy wait.
        engine = create_async_engine(target.url, poolclass=StaticPool,
                                     connect_args={"timeout": 30.0})

        @event.listens_for(engine.sync_engine, "connect")
        def _autocommit(dbapi_connection: Any, _record: Any) -> None:
            # Transactions are explicit (BEGIN IMMEDIATE ... COMMIT): the driver must never
            # open or commit one behind our back.
            dbapi_connection.isolation_level = None
            # Per connection, not per file: set on every connection the pool ever makes, so
            # ON DELETE CASCADE (/forget) and the busy wait hold on a replacement too.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        try:
            sa = await engine.connect()
        except DBAPIError as exc:
            await engine.dispose()
            orig = _orig(exc)
            raise (_damaged(path, orig) if _primary_code(orig) in _DAMAGE else orig) from exc
        db = cls(engine, target, sa)
        try:
            raw = await sa.get_raw_connection()
            db._conn = raw.driver_connection
            assert db._conn is not None
            db._conn.row_factory = aiosqlite.Row
            try:
                # The first statements read the header: a file that is no database fails here.
                await db._conn.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit is on disk before the caller goes on (a vote is acknowledged
                # only after this), which also survives power loss, not only a killed process.
                await db._conn.execute("PRAGMA synchronous=FULL")
                # Deleted rows are overwritten with zeros, not only unlinked: /forget and the
                # retention job erase the words from the file (some SQLite builds default to
                # it, others do not).
                await db._conn.execute("PRAGMA secure_delete=ON")
                await _quick_check(db._conn, path)
            except sqlite3.DatabaseError as exc:
                if _primary_code(exc) not in _DAMAGE:
                    raise
                raise _damaged(path, exc) from exc
            if migrations is not None:
                await db._apply_legacy(list(migrations))
            elif upgrade and check:
                await db.upgrade()
            elif check:
                await db.require_current()
        except BaseException:
            await db._dispose()
            raise
        return db

    @classmethod
    async def _open_postgresql(cls, target: Target, *, upgrade: bool, check: bool) -> Database:
        # pool_pre_ping: a connection the server dropped (restart, failover) is replaced
        # instead of failing the next vote.
        engine = create_async_engine(target.url, pool_size=5, max_overflow=10,
                                     pool_pre_ping=True, pool_recycle=1800)
        db = cls(engine, target, None)
        try:
            if upgrade:
                await db.upgrade()
            elif check:
                await db.require_current()
            else:
                await db.schema_version()  # connects: a wrong URL fails here, clearly
        except (DBAPIError, OSError, TypeError) as exc:
            # TypeError: asyncpg refusing a URL option it does not know (libpq's
            # ?sslmode=...; asyncpg spells it ?ssl=...).
            await engine.dispose()
            reason = exc.orig if isinstance(exc, DBAPIError) else exc
            raise MigrationError(f"cannot use the database at {target.display}: "
                                 f"{reason}") from exc
        except BaseException:
            await engine.dispose()
            raise
        return db

    async def _dispose(self) -> None:
        if self._sa is not None:
            with suppress(Exception):
                await self._sa.close()
        await self._engine.dispose()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            if self._conn is not None:
                # Folds the WAL back into the main file so a copied .db is complete on its own.
                with suppress(sqlite3.Error, ValueError):
                    await self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            await self._dispose()

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
        """Commit one row to ``health_probe`` the way a vote is committed (a write
        transaction, a durable COMMIT). Raises what the database raised; like any
        transaction it records a refusal in, or clears, :attr:`write_failure`."""
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO health_probe (id, at) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET at = excluded.at", (time.time(),))

    async def checkpoint(self) -> bool:
        """SQLite: copy the WAL into the main file and truncate it (``wal_checkpoint
        (TRUNCATE)``): with secure_delete the zeroed pages then replace the old ones in the
        file. False when a reader in another process kept it from completing (it is retried
        by later ones). PostgreSQL manages its own WAL: nothing to do."""
        if self._conn is None:
            return True
        async with self._lock, self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
            row = await cur.fetchone()
        return row is not None and row[0] == 0

    # --- schema --------------------------------------------------------------------------

    async def _apply_legacy(self, migrations: list[Migration]) -> None:
        """Tests: build the schema of an older release with its own numbered SQL files."""
        async with self.transaction() as conn:
            await conn._conn.run_sync(apply_legacy_sqlite, migrations)

    async def upgrade(self) -> tuple[int, int]:
        """Migrate the schema to this release's head (Alembic); returns (before, after).
        On PostgreSQL two processes upgrading at once wait for each other (advisory lock)."""
        async with self.transaction() as conn:
            await conn.lock("loopbot:schema")
            before = await conn._conn.run_sync(current_version)
            if before > HEAD_VERSION:
                raise MigrationError(
                    f"{self.target.display}: schema version {before} is newer than this "
                    f"loopbot knows ({HEAD_VERSION}); run the newer release or restore a "
                    "backup")
            try:
                after = await conn._conn.run_sync(upgrade_to_head, self.dialect)
            except (sqlite3.Error, SQLAlchemyError) as exc:
                raise MigrationError(f"{self.target.display}: migrating the schema from "
                                     f"version {before} failed: {exc}") from exc
        if after != before:
            log.info("database %s: schema upgraded from version %d to %d",
                     self.target.display, before, after)
        return before, after

    async def require_current(self) -> None:
        """Refuse a schema other than this release's: older needs ``loopbot db upgrade``,
        newer needs the newer release."""
        current = await self.schema_version()
        if current < HEAD_VERSION:
            raise SchemaBehind(
                f"{self.target.display}: schema version {current}, this release needs "
                f"{HEAD_VERSION}: run `loopbot db upgrade` once (with the same storage "
                f"settings), then start the replicas")
        if current > HEAD_VERSION:
            raise MigrationError(
                f"{self.target.display}: schema version {current} is newer than this "
                f"loopbot knows ({HEAD_VERSION}); run the newer release or restore a backup")

    async def schema_version(self) -> int:
        async with self._connect() as conn:
            return int(await conn._conn.run_sync(current_version))

    # --- transactions --------------------------------------------------------------------

    def read(self) -> AbstractAsyncContextManager[Connection]:
        """A connection for reads that need the dialect (:meth:`Connection.hour_bucket`) or
        several statements; no write lock is taken."""
        return self._connect()

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[Connection]:
        """A connection for reads (no write lock taken)."""
        if self._sa is not None:
            async with self._lock:
                try:
                    yield Connection(self._sa, self.dialect, self)
                finally:
                    # Ends SQLAlchemy's notional transaction; nothing is open in SQLite.
                    await finish_first(self._sa.rollback())
            return
        async with self._engine.connect() as sa:
            yield Connection(sa, self.dialect, self)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """One write transaction; any exception rolls the whole block back. SQLite: ``BEGIN
        IMMEDIATE`` ... ``COMMIT``; PostgreSQL: a pooled connection's transaction.

        A refusal by the database is kept as :attr:`write_failure`; a successful COMMIT
        clears it."""
        if self._sa is not None:
            async with self._lock, self._sqlite_transaction(self._sa) as conn:
                yield conn
            return
        try:
            async with self._engine.begin() as sa:
                yield Connection(sa, self.dialect, self)
        except (DBAPIError, sqlite3.Error, OSError) as exc:
            self._note_refusal(exc)
            raise
        self._note_commit()

    @asynccontextmanager
    async def _sqlite_transaction(self, sa: AsyncConnection) -> AsyncIterator[Connection]:
        try:
            await finish_first(sa.exec_driver_sql("BEGIN IMMEDIATE"))
        except DBAPIError as exc:
            self._note_refusal(_orig(exc))
            await self._rollback(sa)
            raise _orig(exc) from exc
        try:
            yield Connection(sa, self.dialect, self)
        except BaseException as exc:
            await self._rollback(sa)
            if isinstance(exc, sqlite3.Error):
                self._note_refusal(exc)
            raise
        try:
            await finish_first(sa.commit())
        except DBAPIError as exc:
            # A failed COMMIT may leave the transaction open: never leave it to the next
            # caller, whose BEGIN would fail ("cannot start a transaction within ...").
            await self._rollback(sa)
            self._note_refusal(_orig(exc))
            raise _orig(exc) from exc
        self._note_commit()

    async def _rollback(self, sa: AsyncConnection) -> None:
        # SQLite has already rolled back after some errors (SQLITE_FULL, SQLITE_IOERR,
        # SQLITE_BUSY, ...); the driver's rollback then does nothing, and a failure of it
        # must not hide the error that matters.
        try:
            await finish_first(sa.rollback())
        except DBAPIError as exc:
            log.error("database: rollback failed: %s", _orig(exc))
            self._note_refusal(_orig(exc))
        # After a failed COMMIT SQLAlchemy considers its transaction over and its rollback
        # does nothing, while SQLite's is still open: end it on the driver itself, or the
        # next caller would read uncommitted rows or fail to BEGIN.
        driver = self._conn
        if driver is not None and driver.in_transaction:
            try:
                await finish_first(driver.rollback())
            except sqlite3.Error as exc:
                log.error("database: rollback failed: %s", exc)
                self._note_refusal(exc)

    def _unwrap(self, exc: DBAPIError) -> BaseException:
        """SQLite's own errors surface unwrapped (the codes say what failed); PostgreSQL's
        stay SQLAlchemy's (``exc.orig`` holds asyncpg's)."""
        if self.dialect == SQLITE and isinstance(exc.orig, sqlite3.Error):
            return exc.orig
        return exc

    def _note_refusal(self, exc: BaseException) -> None:
        failure = self._refusal(exc)
        if failure is None:
            return
        current = self._write_failure
        if current is not None and current.corrupt:
            return  # the damage stays the news
        if failure.corrupt:
            log.error("database %s is damaged: %s; %s", self.target.display, exc,
                      _restore_hint(self.path))
        elif current is None:
            log.error("database %s refused a write: %s (%s)", self.target.display,
                      failure.error, failure.code)
        self._write_failure = failure

    def _refusal(self, exc: BaseException) -> WriteFailure | None:
        if isinstance(exc, DBAPIError) and self.dialect == SQLITE and exc.orig is not None:
            exc = exc.orig
        if isinstance(exc, sqlite3.Error):
            code = _primary_code(exc)
            if code not in _REFUSALS:
                return None
            return WriteFailure(
                error=str(exc),
                code=getattr(exc, "sqlite_errorname", "") or f"SQLite code {code}",
                at=time.time(), corrupt=code in _DAMAGE)
        state = _sqlstate(exc)
        gone = isinstance(exc, OSError) or (isinstance(exc, DBAPIError)
                                           and exc.connection_invalidated)
        if gone or (state is not None and (state.startswith(_PG_REFUSAL_CLASSES)
                                           or state == _PG_READ_ONLY)):
            orig = getattr(exc, "orig", None) or exc
            return WriteFailure(error=str(orig).splitlines()[0] if str(orig) else repr(orig),
                                code=state or type(orig).__name__, at=time.time(),
                                corrupt=False)
        return None

    def _note_commit(self) -> None:
        failure = self._write_failure
        if failure is not None and not failure.corrupt:
            log.warning("database %s takes writes again (refused since %.0fs ago: %s)",
                        self.target.display, time.time() - failure.at, failure.error)
            self._write_failure = None

    async def fetchall(self, sql: str, params: Params = ()) -> list[Record]:
        async with self._connect() as conn:
            return await conn.fetchall(sql, params)

    async def fetchone(self, sql: str, params: Params = ()) -> Record | None:
        async with self._connect() as conn:
            return await conn.fetchone(sql, params)


def _orig(exc: DBAPIError) -> BaseException:
    """The driver's own error under SQLAlchemy's wrapper."""
    return exc.orig if isinstance(exc.orig, BaseException) else exc


def _sqlstate(exc: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE of an error, through SQLAlchemy's and asyncpg's wrappers."""
    for candidate in (exc, getattr(exc, "orig", None),
                      getattr(getattr(exc, "orig", None), "__cause__", None)):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(state, str):
            return state
    return None


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


def _damaged(path: Path, exc: BaseException | None) -> CorruptDatabase:
    if exc is not None and _primary_code(exc) == sqlite3.SQLITE_NOTADB:
        # `loopbot restore` cannot tell whether the bot still uses a file it cannot read as a
        # database, so it wants that file moved aside first (and then --new).
        return CorruptDatabase(
            f"{path} is not a SQLite database (SQLite: {exc}); if it is loopbot's database, it "
            f"is damaged: stop the bot, move it aside and restore the newest backup with "
            f"`loopbot restore BACKUP_FILE --db {path} --new`; otherwise point storage.db at "
            f"the right file")
    return CorruptDatabase(f"{path} is damaged (SQLite: {exc}); {_restore_hint(path)}")


async def fetchone(conn: Connection, sql: str, params: Params = ()) -> Record | None:
    """A read inside an open :meth:`Database.transaction`."""
    return await conn.fetchone(sql, params)


async def fetchall(conn: Connection, sql: str, params: Params = ()) -> list[Record]:
    return await conn.fetchall(sql, params)
