"""``loopbot backup`` (safe while the bot runs) and ``loopbot restore`` (bot stopped)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.config import Settings


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = subparsers.add_parser(
        "backup", help="copy the database consistently (safe while the bot runs)",
        description="Take a consistent copy of the live database with SQLite's online backup "
                    "(PostgreSQL: pg_dump). Without --out the copy goes to "
                    "storage.backup_dir as loopbot-<UTC time>.db (.pgdump) and only the "
                    "newest storage.backup_keep are kept.")
    database_arguments(backup)
    backup.add_argument("--out", help="write the copy to this file (no rotation)")
    backup.set_defaults(func=run_backup)

    restore = subparsers.add_parser(
        "restore", help="put a backup in place of the database (stop the bot first)",
        description="Replace the database with a backup. Stop the bot first. The current "
                    "database is kept beside it as <db>.before-restore-<time>.")
    database_arguments(restore)
    restore.add_argument("backup", help="backup file made by `loopbot backup`")
    restore.add_argument("--new", action="store_true",
                         help="create the database if there is none at the target yet (by "
                              "default that is refused: it usually means a wrong --db)")
    restore.set_defaults(func=run_restore)


def database_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --db, as every command that opens the database takes them."""
    # SUPPRESS: do not overwrite the top-level `loopbot --config FILE` with None.
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML config file (default: $LOOPBOT_CONFIG)")
    parser.add_argument("--db", help="SQLite database file or database URL (default: "
                                     "storage.url, else storage.db)")


def _settings(args: argparse.Namespace) -> Settings:
    from bot.config import load_settings

    return load_settings(getattr(args, "config", None), overrides={"storage.db": args.db})


# Refusals and failures raise BackupError (a LoopbotError): `loopbot` prints them as one line,
# ``loopbot: <message>``, and exits with 2, like every other command's.


def run_backup(args: argparse.Namespace) -> int:
    import asyncio

    from bot.config import database_target, resolve_path
    from bot.store.backup import backup_and_rotate, backup_database

    settings = _settings(args)
    # A SQLite file, or a PostgreSQL URL (then pg_dump makes the backup).
    db = database_target(settings)
    if args.out:
        result = asyncio.run(backup_database(db, args.out))
    else:
        directory = resolve_path(settings, settings.storage.backup_dir)
        result = asyncio.run(backup_and_rotate(db, directory, settings.storage.backup_keep))
    print(f"{result.path} ({result.size_bytes} bytes, schema {result.schema_version}, "
          f"{result.seconds:.2f}s)")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from bot.config import database_target, resolve_path
    from bot.store.backup import BackupError, restore_database

    settings = _settings(args)
    target = database_target(settings)
    if "://" in target and not target.startswith("sqlite"):
        # A pg_dump archive goes back with PostgreSQL's own tool, into the server.
        raise BackupError(
            "storage.url is a PostgreSQL database: stop every replica, then restore the "
            "pg_dump archive with `pg_restore --clean --if-exists --no-owner -d "
            "postgresql://USER@HOST/DB FILE`, and start the replicas")
    db = resolve_path(settings, settings.storage.db)
    if not db.exists() and not args.new:
        # Restoring next to nothing is usually the wrong place (e.g. a relative default path
        # in another folder): the bot would go on with its old database.
        raise BackupError(f"there is no database at {db} to replace; pass the bot's --db (or "
                          "storage.db), or --new to create it there")
    moved = restore_database(args.backup, db)
    print(f"restored {db} from {args.backup}" + (f"; the previous one is {moved}" if moved
                                                  else ""))
    return 0
