"""Consistent copies of the live database, their rotation, and restoring one.

SQLite's online backup API copies the pages inside one read transaction of a separate
connection: in WAL mode the bot keeps writing meanwhile, and the copy is the database as of
one commit (every vote committed before the backup started is in it; none is half in it).
Copying the file with ``cp`` instead can tear a page or miss what still sits in the -wal file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bot.errors import LoopbotError
from bot.store.db import HEAD_VERSION, Database, parse_target

if TYPE_CHECKING:
    from bot.config import Settings

log = logging.getLogger(__name__)

BACKUP_PREFIX = "loopbot-"
BACKUP_SUFFIX = ".db"
# PostgreSQL: pg_dump's custom format (restore with pg_restore).
PG_BACKUP_SUFFIX = ".pgdump"
# Timestamped names sort chronologically, so rotation needs no file dates (which a copy resets).
_NAME_RE = re.compile(
    rf"^{BACKUP_PREFIX}(\d{{8}}T\d{{6}}Z)(?:-[a-z0-9-]+)?(?:{BACKUP_SUFFIX}|{PG_BACKUP_SUFFIX})$")


class BackupError(LoopbotError, RuntimeError):
    """A backup or restore could not be made; the message says what to check."""


@dataclass(frozen=True)
class BackupResult:
    path: Path
    size_bytes: int
    seconds: float
    schema_version: int


def backup_name(now: datetime | None = None, tag: str = "", suffix: str = BACKUP_SUFFIX
                ) -> str:
    """``loopbot-20260123T030000Z.db`` (``tag`` adds e.g. ``-pre-migration-v3``)."""
    at = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{BACKUP_PREFIX}{at:%Y%m%dT%H%M%SZ}{'-' + tag if tag else ''}{suffix}"


def is_postgresql(where: str | Path) -> bool:
    return str(where).startswith(("postgresql://", "postgres://", "postgresql+asyncpg://"))


def _pg_dump_sync(url: str, out_path: str | Path) -> BackupResult:
    """``pg_dump --format=custom`` of the database at ``url`` (one consistent snapshot: pg_dump
    reads inside one repeatable-read transaction while the replicas keep writing)."""
    import subprocess

    from sqlalchemy.engine import make_url

    started = time.perf_counter()
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise BackupError("pg_dump is not installed: backups of a PostgreSQL database need the "
                          "PostgreSQL client tools (Debian/Ubuntu: apt-get install "
                          "postgresql-client) of the server's major version or newer")
    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)  # not on the command line (ps shows it)
    dsn = parsed.set(drivername="postgresql", password=None).render_as_string(
        hide_password=False)
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        done = subprocess.run([pg_dump, "--format=custom", "--no-owner", "--file",
                               str(partial), dsn], env=env, capture_output=True, text=True,
                              timeout=3600, check=False)
        if done.returncode != 0:
            raise BackupError(f"pg_dump of {parsed.render_as_string(hide_password=True)} "
                              f"failed: {done.stderr.strip()[-500:]}")
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, out)
    except OSError as exc:
        raise BackupError(f"pg_dump to {out} failed: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return BackupResult(out, out.stat().st_size, time.perf_counter() - started, 0)


def _schema_version(conn: sqlite3.Connection) -> int:
    """Alembic's revision (the schema version since Alembic), else the version the numbered
    SQL files of older releases recorded, else 0."""
    try:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        if row and row[0] is not None:
            return int(row[0])
    except sqlite3.OperationalError:
        pass  # made by a release before Alembic
    try:
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    except sqlite3.OperationalError:
        return 0  # a database created before any migration ran
    return int(row[0]) if row and row[0] is not None else 0


def _open_readonly(path: Path) -> sqlite3.Connection:
    # mode=ro: a backup must never create a missing database or run anything that writes.
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


# Every SQLite database file starts with these 16 bytes (an empty file is an empty database).
_SQLITE_MAGIC = b"SQLite format 3\x00"
# How long a restore waits for the exclusive lock before it concludes that another process
# has the database open (an idle bot holds its lock for good, so waiting longer cannot help).
_IN_USE_TIMEOUT = 1.0


def _not_sqlite(path: Path) -> str:
    return (f"{path} is not a valid SQLite database (its header is damaged, or it is not a "
            "database file)")


def _is_not_a_database(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", "").startswith("SQLITE_NOTADB")


def _has_sqlite_header(path: Path) -> bool:
    """False for a non-empty file that does not start the way every SQLite database starts;
    read before SQLite opens the file (opening can create -wal/-shm files beside it)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return not head or head == _SQLITE_MAGIC


def _check_header(path: Path, then: str) -> None:
    if not _has_sqlite_header(path):
        raise BackupError(_not_sqlite(path) + then)


def _same_file(a: Path, b: Path) -> bool:
    """One file under two names: the same path, a symlink or a hard link to it."""
    with contextlib.suppress(OSError):
        if os.path.samefile(a, b):
            return True
    return a.resolve() == b.resolve()  # also when neither exists yet


def _live_file(out: Path, db: Path) -> str | None:
    """How ``out`` is part of the database ``db`` (the file or one of its companions)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        if _same_file(out, db.with_name(db.name + suffix)):
            return f"{db}{suffix}"
    return None


def _backup_sync(src_path: str | Path, out_path: str | Path) -> BackupResult:
    started = time.perf_counter()
    src, out = Path(src_path).expanduser(), Path(out_path).expanduser()
    if not src.is_file():
        raise BackupError(f"database {src} does not exist")
    live = _live_file(out, src)
    if live is not None:
        what = "the live database" if live == str(src) else "a file of the live database"
        raise BackupError(f"{out} is {what} ({live}): the backup would overwrite it; write "
                          "the backup to another file")
    _check_header(src, ": nothing was backed up")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed: a crash mid-backup never leaves a file that
    # looks like a finished backup (rotation would otherwise delete a good one for it).
    partial = out.with_name(f".{out.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        source = _open_readonly(src)
        try:
            target = sqlite3.connect(partial)
            try:
                # pages=-1: everything in one step, i.e. one read transaction = one snapshot.
                # Stepping would restart whenever the bot commits in between.
                source.backup(target, pages=-1)
                # The copy is a self-contained file: no -wal companion to forget when moving it.
                target.execute("PRAGMA journal_mode=DELETE")
                check = target.execute("PRAGMA quick_check").fetchone()
                if not check or check[0] != "ok":
                    raise BackupError(f"the copy of {src} failed its integrity check: {check}")
                version = _schema_version(target)
            finally:
                target.close()
        finally:
            source.close()
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, out)
    except sqlite3.Error as exc:
        if _is_not_a_database(exc):
            raise BackupError(_not_sqlite(src) + ": nothing was backed up") from exc
        raise BackupError(f"backup of {src} failed: {exc}") from exc
    except OSError as exc:
        raise BackupError(f"backup of {src} to {out} failed: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return BackupResult(out, out.stat().st_size, time.perf_counter() - started, version)


async def backup_database(src_db_path: str | Path, out_path: str | Path) -> BackupResult:
    """Copy the database at ``src_db_path`` to ``out_path`` while the bot may be writing to it.

    Runs in a worker thread on its own read-only connection, so the bot's event loop and its
    connection are not held up (WAL lets the bot commit while the copy is read)."""
    if is_postgresql(src_db_path):
        result = await asyncio.to_thread(_pg_dump_sync, str(src_db_path), out_path)
        # Any schema: a backup is what one takes before `loopbot db upgrade`.
        db = await Database.open(str(src_db_path), check_schema=False)
        try:
            result = BackupResult(result.path, result.size_bytes, result.seconds,
                                  await db.schema_version())
        finally:
            await db.close()
    else:
        result = await asyncio.to_thread(_backup_sync, src_db_path, out_path)
    log.info("backup written to %s (%d bytes, schema %d, %.2fs)", result.path,
             result.size_bytes, result.schema_version, result.seconds)
    return result


def list_backups(directory: str | Path) -> list[Path]:
    """loopbot's backups in ``directory``, oldest first."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_file() and _NAME_RE.match(p.name)]
    return sorted(found, key=lambda p: (_NAME_RE.match(p.name)[1], p.name))  # type: ignore[index]


def rotate_backups(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest backups (``keep`` <= 0 keeps them all); returns the
    deleted files. Only files named like loopbot's backups are ever touched."""
    if keep <= 0:
        return []
    backups = list_backups(directory)
    doomed = backups[:-keep] if len(backups) > keep else []
    for path in doomed:
        path.unlink(missing_ok=True)
        log.info("old backup %s deleted (keeping %d)", path.name, keep)
    return doomed


def _free_name(directory: str | Path, name: str) -> Path:
    """``name`` in ``directory``, numbered when two backups fall in the same second (a
    backup is never overwritten by the next one)."""
    folder = Path(directory).expanduser()
    suffix = PG_BACKUP_SUFFIX if name.endswith(PG_BACKUP_SUFFIX) else BACKUP_SUFFIX
    stem = name.removesuffix(suffix)
    candidate, n = folder / name, 1
    while candidate.exists():
        n += 1
        candidate = folder / f"{stem}-{n}{suffix}"
    return candidate


async def backup_and_rotate(src_db_path: str | Path, directory: str | Path, keep: int,
                            *, tag: str = "") -> BackupResult:
    """The nightly job: a new timestamped backup in ``directory``, then rotation."""
    suffix = PG_BACKUP_SUFFIX if is_postgresql(src_db_path) else BACKUP_SUFFIX
    out = await asyncio.to_thread(_free_name, directory, backup_name(tag=tag, suffix=suffix))
    result = await backup_database(src_db_path, out)
    await asyncio.to_thread(rotate_backups, directory, keep)
    return result


def _pending_migrations_sync(path: str | Path) -> tuple[int, int] | None:
    db_path = Path(path).expanduser()
    if not db_path.is_file():
        return None
    latest = HEAD_VERSION
    then = (f": stop the bot, move it aside and restore a backup "
            f"(`loopbot restore FILE --db {db_path} --new`)")
    _check_header(db_path, then)
    try:
        conn = _open_readonly(db_path)
        try:
            current = _schema_version(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if _is_not_a_database(exc):
            raise BackupError(_not_sqlite(db_path) + then) from exc
        raise BackupError(f"cannot read the schema version of {db_path}: {exc}") from exc
    return (current, latest) if current < latest else None


async def backup_before_migrating(db_path: str | Path, backup_dir: str | Path
                                  ) -> BackupResult | None:
    """Call before opening the database at start-up: if this release's migrations would
    change an existing database, first copy it to ``backup_dir`` as
    ``loopbot-<time>-pre-migration-v<old>.db`` (rotation counts it like a nightly one, so
    it stays for the next ``backup_keep`` nights). Returns the backup, or None when there is
    nothing to migrate (or no database yet)."""
    pending = await asyncio.to_thread(_pending_migrations_sync, db_path)
    if pending is None:
        return None
    current, latest = pending
    log.info("database %s is at schema %d, this release needs %d: backing it up first",
             db_path, current, latest)
    return await backup_database(
        db_path, os.path.join(backup_dir, backup_name(tag=f"pre-migration-v{current}")))


async def open_configured_database(settings: Settings, *,
                                   upgrade: bool | None = None) -> Database:
    """The configured database, opened the way every command opens it.

    SQLite: when this release's migrations would change it, it is backed up to
    ``storage.backup_dir`` first, then migrated. PostgreSQL: opened as it is; a schema older
    than this release is refused (``loopbot db upgrade`` migrates it, once, for every
    replica), unless ``upgrade`` is True."""
    from bot.config import database_target, resolve_path

    target = parse_target(database_target(settings))
    if target.path is None:
        return await Database.open(target.url, upgrade=bool(upgrade))
    await backup_before_migrating(target.path,
                                  resolve_path(settings, settings.storage.backup_dir))
    return await Database.open(target.path)


def _check_backup_file(backup: Path) -> None:
    """A loopbot database, readable and whole; it is only read (``immutable``: no lock, no
    -wal/-shm file created beside it). Only its main file is checked: that is what is copied."""
    nothing = ": nothing was restored"
    if backup.stat().st_size == 0:
        raise BackupError(f"{backup} is empty (0 bytes), not a loopbot backup{nothing}")
    _check_header(backup, nothing)
    try:
        conn = sqlite3.connect(f"{backup.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()
            version = _schema_version(conn) if check and check[0] == "ok" else 0
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if _is_not_a_database(exc):
            raise BackupError(_not_sqlite(backup) + nothing) from exc
        raise BackupError(f"{backup} is not a readable SQLite database ({exc}){nothing}"
                          ) from exc
    if not check or check[0] != "ok":
        raise BackupError(f"{backup} failed its integrity check ({check[0] if check else '?'})"
                          f"{nothing}")
    if version == 0:
        raise BackupError(f"{backup} is an SQLite file but not a loopbot database (no loopbot "
                          f"migration was ever applied to it){nothing}")


def _check_not_in_use(db: Path) -> None:
    """Refuse when another process (the bot) has ``db`` open, asking SQLite's own locks.

    The bot keeps its database in WAL mode, and a WAL connection that has read the database
    once (``Database.open`` does, at once) keeps a shared lock on the file until it is closed,
    idle and outside any transaction too. A connection in EXCLUSIVE locking mode needs the
    exclusive lock on the file to read a WAL database at all, so it gets SQLITE_BUSY while
    any other process has such a connection open. The probe changes nothing when it is
    refused; when it gets the lock (no one else has the file), closing it folds a left-over
    -wal into the file, which is what the bot's next start would do anyway."""
    if db.stat().st_size == 0:
        return  # an empty file: nothing in it to lose, and no one uses it as a database
    damaged = (f"{db} is not a valid SQLite database, so loopbot cannot tell whether the bot "
               f"still has it open: stop the bot, move {db} aside, then run the restore again "
               "with --new")
    if not _has_sqlite_header(db):
        raise BackupError(damaged)
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True,
                               timeout=_IN_USE_TIMEOUT, isolation_level=None)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open {db} to check that the bot is stopped: {exc}") from exc
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            raise BackupError(
                f"the bot (or another process) has {db} open: stop it first (e.g. "
                "`systemctl stop loopbot`), then run the restore again; nothing was restored"
            ) from exc
        if _is_not_a_database(exc):
            raise BackupError(damaged) from exc
        raise BackupError(f"cannot check that nothing uses {db}: {exc}") from exc
    finally:
        conn.close()


def restore_database(backup_path: str | Path, db_path: str | Path) -> Path | None:
    """Put a backup in place of the database. The bot must be stopped.

    Refused, with nothing changed, when the backup is the database itself, is not a whole
    loopbot database, or another process (the running bot) has the database open. The
    current database (if any) is kept beside it as ``<db>.before-restore-<time>``; its stale
    -wal/-shm files are removed (SQLite would otherwise replay the old database's log onto the
    restored file). Returns where the previous database was moved, if there was one.

    The bot could still start between the check and the swap: stop its service first."""
    backup, db = Path(backup_path).expanduser(), Path(db_path).expanduser()
    if not backup.is_file():
        raise BackupError(f"backup {backup} does not exist")
    live = _live_file(backup, db)
    if live is not None:
        what = "the database itself" if live == str(db) else "a file of the live database"
        raise BackupError(f"{backup} is {what} ({live}): restore from a backup file made by "
                          "`loopbot backup`, not from the live database")
    _check_backup_file(backup)
    if db.exists():
        _check_not_in_use(db)
    try:
        return _swap_in(backup, db)
    except OSError as exc:
        raise BackupError(f"restoring {db} from {backup} failed: {exc} (if the database was "
                          f"already moved aside, it is {db.name}.before-restore-<time>)"
                          ) from exc


def _swap_in(backup: Path, db: Path) -> Path | None:
    db.parent.mkdir(parents=True, exist_ok=True)
    moved: Path | None = None
    if db.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        moved = db.with_name(f"{db.name}.before-restore-{stamp}")
        os.replace(db, moved)
    for suffix in ("-wal", "-shm", "-journal"):
        companion = db.with_name(db.name + suffix)
        if companion.exists():
            if moved is not None:
                # Kept with the old file: together they are the old database, complete.
                os.replace(companion, moved.with_name(moved.name + suffix))
            else:
                companion.unlink()
    partial = db.with_name(f".{db.name}.restoring")
    shutil.copyfile(backup, partial)
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, db)
    if moved is not None:
        # The restored file gets the old one's permissions and owner: the bot's user must
        # write it, and a restore is often run as root right after stopping the service.
        with contextlib.suppress(OSError):
            shutil.copymode(moved, db)
            old = moved.stat()
            if hasattr(os, "chown") and os.geteuid() == 0:
                os.chown(db, old.st_uid, old.st_gid)
    log.info("restored %s from %s", db, backup)
    return moved
