"""The schema's migrations (Alembic), for SQLite and PostgreSQL.

Revision ``007`` is the baseline: the schema as the numbered SQL files 001-007 built it. On
SQLite the baseline *is* those files (a database made by an older release has them up to its
``schema_version`` and gets only the rest, so nothing is rebuilt and nothing lost); on
PostgreSQL it is the same schema spelled for PostgreSQL (64-bit ids, identity columns,
``DOUBLE PRECISION`` times, a PL/pgSQL trigger that keeps the audit log append-only).
Revisions after it are ordinary Alembic revisions written for both databases.

Revision ids are the schema version numbers (``"007"``, ``"008"``, ...), so ``loopbot db
current``, backups and messages keep speaking of one integer version.

These functions run on a synchronous SQLAlchemy connection (``AsyncConnection.run_sync``),
inside the caller's open transaction: a migration and its version row commit together.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text

from bot.errors import LoopbotError

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import Connection

SCRIPT_DIR = Path(__file__).parent
MIGRATIONS_DIR = SCRIPT_DIR.parent / "migrations"
_MIGRATION_RE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
BASELINE = "007"
HEAD_VERSION = 9


class MigrationError(LoopbotError, RuntimeError):
    """The migrations on disk and the schema in the database do not fit together."""


class SchemaBehind(MigrationError):
    """The database's schema is older than this release: ``loopbot db upgrade`` first."""


@dataclass(frozen=True)
class Migration:
    """One of the numbered SQL files that built SQLite databases before Alembic (001-007);
    they are the SQLite half of Alembic's baseline revision."""

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


def split_sqlite_script(script: str) -> list[str]:
    """A script's statements one by one, as SQLite would run them (``CREATE TRIGGER ...
    BEGIN ...; END;`` stays one statement): the driver runs one statement per call."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            body = "\n".join(row for row in pending.splitlines()
                             if not row.lstrip().startswith("--")).strip()
            if body.rstrip(";").strip():
                statements.append(body)
            pending = ""
    if pending.strip() and "\n".join(row for row in pending.splitlines()
                                     if not row.lstrip().startswith("--")).strip():
        statements.append(pending.strip())
    return statements


# Alembic (with Mako and Pygments, ~10 MB resident) is imported only to migrate: a start on a
# current schema reads alembic_version with plain SQL (HEAD_VERSION is checked against the
# revision files by a test).


def _script() -> ScriptDirectory:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_DIR))
    return ScriptDirectory.from_config(config)


def head_version() -> int:
    head = _script().get_current_head()
    assert head is not None
    return int(head)


def current_version(conn: Connection) -> int:
    """The schema version: Alembic's revision, else the pre-Alembic ``schema_version`` (an
    SQLite database of an older release), else 0 (empty)."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        if revision is not None:
            return int(revision)
    return legacy_version(conn)


def legacy_version(conn: Connection) -> int:
    """The version the pre-Alembic numbered SQL files recorded (0: none)."""
    if "schema_version" not in set(inspect(conn).get_table_names()):
        return 0
    value = conn.execute(text("SELECT MAX(version) FROM schema_version")).scalar()
    return int(value) if value is not None else 0


def upgrade_to_head(conn: Connection, dialect: str) -> int:
    """Run every revision the database does not have yet; returns the version reached."""
    if current_version(conn) == HEAD_VERSION:
        return HEAD_VERSION  # nothing to do: Alembic is not even loaded
    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext

    script = _script()
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_DIR))
    config.attributes["dialect"] = dialect

    def upgrade(rev: object, context: object) -> object:
        return script._upgrade_revs("head", rev)  # type: ignore[arg-type]

    with EnvironmentContext(config, script, fn=upgrade, destination_rev="head") as env:
        env.configure(connection=conn, target_metadata=None,
                      transaction_per_migration=False)
        env.run_migrations()
    return current_version(conn)


def apply_legacy_sqlite(conn: Connection, migrations: Sequence[Migration]) -> None:
    """Apply the pre-Alembic numbered SQL files the database does not have yet, each with its
    ``schema_version`` row (the baseline's SQLite half, and tests that build an older
    release's database)."""
    conn.execute(text(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"))
    current = legacy_version(conn)
    latest = migrations[-1].version if migrations else 0
    if current_version(conn) > latest:
        raise MigrationError(f"schema version {current} is newer than this loopbot knows "
                             f"({latest}); run the newer release or restore a backup")
    for migration in migrations:
        if migration.version <= current:
            continue
        try:
            for statement in split_sqlite_script(migration.sql):
                conn.exec_driver_sql(statement)
        except Exception as exc:
            raise MigrationError(
                f"migration {migration.version:03d}_{migration.name} failed: {exc}") from exc
        conn.execute(text("INSERT INTO schema_version (version, name, applied_at)"
                          " VALUES (:v, :n, :t)"),
                     {"v": migration.version, "n": migration.name, "t": time.time()})
