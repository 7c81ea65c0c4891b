"""``loopbot db upgrade`` and ``loopbot db current``: the schema, migrated once.

SQLite databases are migrated by the bot itself at start (one process owns the file, and it
backs the file up first). A PostgreSQL database is shared by replicas: it is migrated once,
by ``loopbot db upgrade`` (compose runs it as a one-shot service before the replicas), and a
replica started against an older schema refuses to run and says to run this command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bot.ops.backup_cli import database_arguments


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = subparsers.add_parser(
        "db", help="the database schema: upgrade it, show its version",
        description="Migrate the database (storage.url, or the SQLite file storage.db) to "
                    "this release's schema, or show which version it has.")
    commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = commands.add_parser(
        "upgrade", help="migrate the schema to this release (once, before the replicas)")
    database_arguments(upgrade)
    upgrade.set_defaults(func=run_upgrade)
    current = commands.add_parser("current", help="print the schema version and this "
                                  "release's")
    database_arguments(current)
    current.set_defaults(func=run_current)


def _target(args: argparse.Namespace) -> str:
    from bot.config import database_target, load_settings

    # --db (a file or a URL) wins over storage.url: load_settings sees to that.
    settings = load_settings(getattr(args, "config", None), overrides={"storage.db": args.db})
    return database_target(settings)


def run_upgrade(args: argparse.Namespace) -> int:
    from bot.store.db import Database, parse_target

    target = parse_target(_target(args))

    async def upgrade() -> tuple[int, int]:
        if target.path is not None:
            # A SQLite file is copied first, as at the bot's start.
            from bot.config import load_settings, resolve_path
            from bot.store.backup import backup_before_migrating

            settings = load_settings(getattr(args, "config", None))
            await backup_before_migrating(
                target.path, resolve_path(settings, settings.storage.backup_dir))
        db = await Database.open(target.url, check_schema=False)
        try:
            return await db.upgrade()
        finally:
            await db.close()

    before, after = asyncio.run(upgrade())
    if before == after:
        print(f"{target.display}: schema version {after}, already current")
    else:
        print(f"{target.display}: schema upgraded from version {before} to {after}")
    return 0


def run_current(args: argparse.Namespace) -> int:
    from bot.store.db import HEAD_VERSION, Database, parse_target

    target = parse_target(_target(args))
    if target.path is not None and not target.path.exists():
        # Opening would create an empty database at a mistyped path.
        print(f"loopbot db current: no database at {target.path}", file=sys.stderr)
        return 1

    async def current() -> int:
        db = await Database.open(target.url, check_schema=False)
        try:
            return await db.schema_version()
        finally:
            await db.close()

    version = asyncio.run(current())
    state = ("current" if version == HEAD_VERSION else
             "older: run `loopbot db upgrade`" if version < HEAD_VERSION else
             "newer than this release")
    print(f"{target.display}: schema version {version}; this release: {HEAD_VERSION} "
          f"({state})")
    return 0
