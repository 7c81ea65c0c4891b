"""Backup naming, rotation, the pre-migration backup and restore, on real SQLite files."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.store.backup import (
    BackupError,
    backup_before_migrating,
    backup_database,
    backup_name,
    list_backups,
    restore_database,
    rotate_backups,
)
from bot.store.db import Database, discover_migrations
from bot.store.queries import NewInteraction, Store


def test_names_sort_by_time_and_rotation_keeps_the_newest(tmp_path: Path) -> None:
    names = [backup_name(datetime(2026, 1, d, 3, tzinfo=UTC)) for d in (9, 10, 11, 12)]
    names.append(backup_name(datetime(2026, 1, 10, 12, tzinfo=UTC), tag="pre-migration-v1"))
    assert names[0] == "loopbot-20260109T030000Z.db"
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    # Not ours: rotation must never delete these.
    (tmp_path / "loopbot.db").write_bytes(b"live")
    (tmp_path / "notes-20260101T000000Z.db").write_bytes(b"x")
    (tmp_path / ".loopbot-20260101T000000Z.db.partial").write_bytes(b"x")

    deleted = rotate_backups(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == sorted(
        [names[0], names[1], "loopbot-20260110T120000Z-pre-migration-v1.db"])
    assert [p.name for p in list_backups(tmp_path)] == [names[2], names[3]]
    assert {p.name for p in tmp_path.iterdir()} == {
        names[2], names[3], "loopbot.db", "notes-20260101T000000Z.db",
        ".loopbot-20260101T000000Z.db.partial"}
    assert rotate_backups(tmp_path, keep=0) == []


async def test_pre_migration_backup_only_when_migrations_are_pending(tmp_path: Path) -> None:
    db_path = tmp_path / "loopbot.db"
    backups = tmp_path / "backups"
    assert await backup_before_migrating(db_path, backups) is None  # no database yet
    # A database from an older release: it knows fewer migrations than this one.
    old = await Database.open(db_path, migrations=discover_migrations()[:-1])
    await old.close()
    made = await backup_before_migrating(db_path, backups)
    assert made is not None
    version = len(discover_migrations()) - 1
    assert made.path.name.endswith(f"-pre-migration-v{version}.db")
    assert made.schema_version == version
    db = await Database.open(db_path)
    await db.close()
    assert await backup_before_migrating(db_path, backups) is None  # up to date now
    assert list_backups(backups) == [made.path]


async def test_restore_replaces_the_database_and_drops_its_stale_log(tmp_path: Path) -> None:
    db_path = tmp_path / "loopbot.db"
    store = await Store.open(db_path)
    interaction, _ = await store.insert_interaction(NewInteraction(
        chat_id=1, user_id=1, message_id=1, text="before", version_id="v1-en", arm="active",
        bucket=1, label="positive", probabilities={"positive": 0.9, "negative": 0.1}))
    copy = await backup_database(db_path, tmp_path / "b" / "copy.db")
    await store.close()
    # A bot killed right after committing a vote: the vote is only in the -wal file.
    crashed = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('INSERT INTO votes (interaction_id, user_id, correct, created_at,"
        " updated_at) VALUES (?, 2, 0, 0, 0)', (int(sys.argv[2]),))\n"
        "os._exit(0)\n"), str(db_path), str(interaction.id)], timeout=60)
    assert crashed.returncode == 0
    wal = db_path.with_name("loopbot.db-wal")
    assert wal.exists() and wal.stat().st_size > 0

    moved = restore_database(copy.path, db_path)
    assert moved is not None and moved.name.startswith("loopbot.db.before-restore-")
    assert not wal.exists()
    with sqlite3.connect(db_path) as restored:
        assert restored.execute("SELECT COUNT(*) FROM votes").fetchone() == (0,)
        assert restored.execute("SELECT text FROM interactions").fetchall() == [("before",)]
    # The old database together with its log is kept whole.
    with sqlite3.connect(moved) as previous:
        assert previous.execute("SELECT COUNT(*) FROM votes").fetchone() == (1,)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a file to another user needs root")
async def test_a_restore_run_as_root_keeps_the_bots_ownership(tmp_path: Path) -> None:
    db_path = tmp_path / "loopbot.db"
    store = await Store.open(db_path)
    copy = await backup_database(db_path, tmp_path / "b" / "copy.db")
    await store.close()
    os.chown(db_path, 4321, 4321)  # the service's user owns the live database
    restore_database(copy.path, db_path)
    assert (db_path.stat().st_uid, db_path.stat().st_gid) == (4321, 4321)


@pytest.mark.parametrize("argv", [["prompts", "list"], ["report"], ["analyze", "--dry-run"]])
def test_every_command_backs_an_old_database_up_before_migrating_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    db_path, backups = tmp_path / "loopbot.db", tmp_path / "backups"

    async def old_release() -> None:
        old = await Database.open(db_path, migrations=discover_migrations()[:-1])
        await old.close()

    asyncio.run(old_release())
    monkeypatch.delenv("LOOPBOT_CONFIG", raising=False)
    monkeypatch.setenv("LOOPBOT_BACKUP_DIR", str(backups))
    assert main([*argv, "--db", str(db_path)]) == 0, capsys.readouterr().err
    version = len(discover_migrations()) - 1
    (made,) = list_backups(backups)
    assert made.name.endswith(f"-pre-migration-v{version}.db")
    with sqlite3.connect(made) as copy:
        assert copy.execute("SELECT MAX(version) FROM schema_version").fetchone() == (version,)


def test_restore_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"not sqlite at all" * 100)
    (tmp_path / "loopbot.db").write_bytes(b"")
    with pytest.raises(BackupError, match=r"bogus\.db"):
        restore_database(bogus, tmp_path / "loopbot.db")
    with pytest.raises(BackupError, match="does not exist"):
        restore_database(tmp_path / "missing.db", tmp_path / "loopbot.db")
    assert (tmp_path / "loopbot.db").exists()  # untouched
