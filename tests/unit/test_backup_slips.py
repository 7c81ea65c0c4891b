"""Operator slips with `loopbot backup` / `loopbot restore`: each is refused with one plain line
(``loopbot: ...``, exit code 2) and nothing on disk changes.

Real SQLite files throughout; "the bot is running" is a real second process holding the
database open the way the bot does (``Database.open``: WAL, one idle connection)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bot.store.backup import BackupError, backup_database, restore_database
from bot.store.queries import NewInteraction, Store

ROOT = Path(__file__).resolve().parents[2]

Snapshot = dict[str, tuple[int, int, str]]


def snapshot(folder: Path) -> Snapshot:
    """Every file under ``folder``: size, mtime and content hash (symlinks as themselves)."""
    found: Snapshot = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            found[str(path.relative_to(folder))] = (0, st.st_mtime_ns, os.readlink(path))
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns, digest)
    return found


def make_database(path: Path, votes: int = 1) -> Path:
    """A real loopbot database (all migrations, some votes), closed as the bot closes it."""

    async def build() -> None:
        store = await Store.open(path)
        try:
            for user in range(1, votes + 1):
                interaction, _ = await store.insert_interaction(NewInteraction(
                    chat_id=user, user_id=user, message_id=1, text=f"message {user}",
                    version_id="v1-en", arm="active", bucket=user, label="positive",
                    probabilities={"positive": 0.8, "negative": 0.2}))
                await store.upsert_vote(interaction.id, user, correct=True, correct_label=None)
        finally:
            await store.close()

    asyncio.run(build())
    return path


def make_backup(db: Path, out: Path) -> Path:
    return asyncio.run(backup_database(db, out)).path


def votes(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        count: int = conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
    return count


def loopbot(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``loopbot ARGV`` through the real entry point; returns the exit code and stderr."""
    from bot.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_plain_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("loopbot: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


def damage_header(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.write(b"\0" * 100)


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOPBOT_CONFIG", raising=False)


# --- restore X --db X ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_restoring_the_live_database_onto_itself_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    db = make_database(tmp_path / "loopbot.db")
    given = db
    if how == "symlink":
        given = tmp_path / "link.db"
        given.symlink_to(db)
    elif how == "hard link":
        given = tmp_path / "other-name.db"
        os.link(db, given)
    before = snapshot(tmp_path)
    code, err = loopbot(capsys, "restore", str(given), "--db", str(db))
    assert code == 2
    assert_one_plain_line(err, "is the database itself")
    assert snapshot(tmp_path) == before
    assert votes(db) == 1


# --- restore of a file that is not a loopbot database ---------------------------------------


def test_restoring_an_empty_file_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = make_database(tmp_path / "loopbot.db")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    before = snapshot(tmp_path)
    code, err = loopbot(capsys, "restore", str(empty), "--db", str(db))
    assert code == 2
    assert_one_plain_line(err, "empty.db", "empty (0 bytes)")
    assert snapshot(tmp_path) == before
    with pytest.raises(BackupError, match=r"empty \(0 bytes\)"):
        restore_database(empty, db)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", ["other tables", "no migration applied"])
def test_restoring_a_sqlite_file_that_is_not_a_loopbot_database_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str) -> None:
    db = make_database(tmp_path / "loopbot.db")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        if content == "other tables":
            conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
            conn.execute("INSERT INTO notes (body) VALUES ('hello')")
        else:  # what Database.open leaves when it stops before the first migration
            conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                         " name TEXT NOT NULL, applied_at REAL NOT NULL)")
    conn.close()
    before = snapshot(tmp_path)
    code, err = loopbot(capsys, "restore", str(other), "--db", str(db))
    assert code == 2
    assert_one_plain_line(err, "other.db", "not a loopbot database")
    assert snapshot(tmp_path) == before


# --- restore while the bot runs -------------------------------------------------------------

# Each holds the database open in a separate process the way the running bot does, prints
# "open" and waits for a line on stdin before closing.
HOLDERS = {
    # The bot right after start-up: Database.open (WAL, migrations checked), idle, no
    # transaction open.
    "idle after Database.open": (
        "import asyncio, sys\n"
        "from bot.store.db import Database\n"
        "async def main():\n"
        "    db = await Database.open(sys.argv[1])\n"
        "    print('open', flush=True)\n"
        "    await asyncio.to_thread(sys.stdin.readline)\n"
        "    await db.close()\n"
        "asyncio.run(main())\n"),
    # The bot after acknowledging a vote: committed (it sits in the -wal file), idle.
    "idle after committing a vote": (
        "import asyncio, sys\n"
        "from bot.store.queries import NewInteraction, Store\n"
        "async def main():\n"
        "    store = await Store.open(sys.argv[1])\n"
        "    i, _ = await store.insert_interaction(NewInteraction(chat_id=9, user_id=9,"
        " message_id=9, text='late', version_id='v1-en', arm='active', bucket=9,"
        " label='positive', probabilities={'positive': 0.8, 'negative': 0.2}))\n"
        "    await store.upsert_vote(i.id, 9, correct=True, correct_label=None)\n"
        "    print('open', flush=True)\n"
        "    await asyncio.to_thread(sys.stdin.readline)\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"),
    # Another process in the middle of a write transaction.
    "inside a write transaction": (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA journal_mode=WAL')\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "print('open', flush=True)\n"
        "sys.stdin.readline()\n"
        "c.execute('ROLLBACK')\n"
        "c.close()\n"),
}


@contextmanager
def held_open(db: Path, script: str) -> Iterator[None]:
    """Runs ``script`` in its own Python process until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(db)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    assert stdin is not None and stdout is not None and stderr is not None
    try:
        # EOF (an empty line) if the process dies before it has the database open.
        assert stdout.readline() == "open\n", stderr.read()
        yield
    finally:
        if proc.poll() is None:
            stdin.write("\n")
            stdin.close()
        proc.wait(60)
    assert proc.returncode == 0, stderr.read()


@pytest.mark.parametrize("holder", list(HOLDERS))
def test_restore_is_refused_while_another_process_has_the_database_open(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], holder: str) -> None:
    db = make_database(tmp_path / "live" / "loopbot.db")
    copy = make_backup(db, tmp_path / "backups" / "copy.db")
    with held_open(db, HOLDERS[holder]):
        before = snapshot(tmp_path)
        code, err = loopbot(capsys, "restore", str(copy), "--db", str(db))
        assert code == 2
        assert_one_plain_line(err, f"has {db} open", "stop")
        assert snapshot(tmp_path) == before
        with pytest.raises(BackupError, match="open"):
            restore_database(copy, db)
        assert snapshot(tmp_path) == before
    # Once the other process is gone the same restore goes through.
    code, err = loopbot(capsys, "restore", str(copy), "--db", str(db))
    assert code == 0, err
    assert votes(db) == 1


def test_a_refused_restore_leaves_a_hand_copied_backup_untouched_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A copy made with ``cp`` of the stopped bot's file is in WAL mode: checking it must not
    create -wal/-shm files beside it (it is read as an immutable file)."""
    db = make_database(tmp_path / "live" / "loopbot.db")
    copied = tmp_path / "by-hand" / "loopbot.db"
    copied.parent.mkdir()
    copied.write_bytes(db.read_bytes())
    assert copied.read_bytes()[18:20] == b"\x02\x02"  # WAL mode
    with held_open(db, HOLDERS["idle after Database.open"]):
        before = snapshot(tmp_path)
        code, err = loopbot(capsys, "restore", str(copied), "--db", str(db))
        assert code == 2
        assert_one_plain_line(err, "open", "stop it first")
        assert snapshot(tmp_path) == before


# --- backup --out <the live database> -------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "relative path", "symlink", "hard link", "-wal"])
def test_backup_onto_the_live_database_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        how: str) -> None:
    db = make_database(tmp_path / "loopbot.db", votes=3)
    out = str(db)
    if how == "relative path":
        monkeypatch.chdir(tmp_path)
        out = "./sub/../loopbot.db"
        (tmp_path / "sub").mkdir()
    elif how == "symlink":
        (tmp_path / "link.db").symlink_to(db)
        out = str(tmp_path / "link.db")
    elif how == "hard link":
        os.link(db, tmp_path / "same-inode.db")
        out = str(tmp_path / "same-inode.db")
    elif how == "-wal":
        out = str(db) + "-wal"
    before = snapshot(tmp_path)
    code, err = loopbot(capsys, "backup", "--db", str(db), "--out", out)
    assert code == 2
    assert_one_plain_line(err, "live database")
    assert snapshot(tmp_path) == before
    assert votes(db) == 3


def test_backup_onto_the_live_database_is_refused_while_the_bot_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = make_database(tmp_path / "loopbot.db")
    with held_open(db, HOLDERS["idle after committing a vote"]):
        before = snapshot(tmp_path)
        code, err = loopbot(capsys, "backup", "--db", str(db), "--out", str(db))
        assert code == 2
        assert_one_plain_line(err, "live database")
        assert snapshot(tmp_path) == before
    assert votes(db) == 2  # the vote acknowledged by the bot is still in the database


# --- a damaged header -----------------------------------------------------------------------


def test_restoring_a_backup_with_a_damaged_header_is_one_plain_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = make_database(tmp_path / "loopbot.db")
    copy = make_backup(db, tmp_path / "copy.db")
    damage_header(copy)
    before = snapshot(tmp_path)
    code, err = loopbot(capsys, "restore", str(copy), "--db", str(db))
    assert code == 2
    assert_one_plain_line(err, "copy.db", "not a valid SQLite database")
    assert snapshot(tmp_path) == before


def test_restoring_onto_a_database_with_a_damaged_header_is_one_plain_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SQLite cannot tell whether a process still has a damaged file open, so the restore
    does not replace it blindly: it says so and how to go on."""
    db = make_database(tmp_path / "loopbot.db")
    copy = make_backup(db, tmp_path / "copy.db")
    damage_header(db)
    before = snapshot(tmp_path)
    code, err = loopbot(capsys, "restore", str(copy), "--db", str(db))
    assert code == 2
    assert_one_plain_line(err, "loopbot.db", "not a valid SQLite database", "--new")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv", [
    ["backup", "--out", "{tmp}/copy.db"],
    ["backup"],
    ["prompts", "list"],  # every command backs an old database up before migrating it
])
def test_a_database_with_a_damaged_header_is_one_plain_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        argv: list[str]) -> None:
    db = make_database(tmp_path / "loopbot.db")
    damage_header(db)
    monkeypatch.setenv("LOOPBOT_BACKUP_DIR", str(tmp_path / "backups"))
    before = snapshot(tmp_path)
    code, err = loopbot(capsys, *[a.format(tmp=tmp_path) for a in argv], "--db", str(db))
    assert code == 2
    assert_one_plain_line(err, "loopbot.db", "not a valid SQLite database")
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "backups").exists()
