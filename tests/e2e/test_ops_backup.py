"""`loopbot backup` while the bot writes votes, and `loopbot restore` from that copy."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bot.cli import main
from bot.store.queries import NewInteraction, Store


def loopbot(*argv: str) -> int:
    """The subcommands exactly as ``loopbot`` runs them (its parser, handlers and the one place
    that turns a refusal into ``loopbot: <message>`` and exit code 2)."""
    code: int = main(list(argv))
    return code


class VoteWriter(threading.Thread):
    """Stands in for the running bot: its own event loop and connection, committing votes
    through the real store as fast as it can. ``committed`` only grows after a commit."""

    def __init__(self, db: Path) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.committed: list[int] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._write())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _write(self) -> None:
        store = await Store.open(self.db)
        try:
            user = 0
            while not self.stop.is_set():
                user += 1
                interaction, _ = await store.insert_interaction(NewInteraction(
                    chat_id=user, user_id=user, message_id=1, text=f"message {user}",
                    version_id="v1-en", arm="active", bucket=user % 10_000, label="positive",
                    probabilities={"positive": 0.7, "negative": 0.3}))
                await store.upsert_vote(interaction.id, user, correct=user % 3 != 0,
                                        correct_label=None)
                self.committed.append(user)
                if len(self.committed) >= 20:
                    self.ready.set()
        finally:
            await store.close()


def schema(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()


def voters(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT user_id FROM votes ORDER BY id")]


def test_backup_during_writes_keeps_every_committed_vote_and_restores(tmp_path: Path) -> None:
    db = tmp_path / "live" / "loopbot.db"
    writer = VoteWriter(db)
    writer.start()
    assert writer.ready.wait(30) and writer.error is None, writer.error
    try:
        committed_before = list(writer.committed)
        out = tmp_path / "backups" / "copy.db"
        assert loopbot("backup", "--db", str(db), "--out", str(out)) == 0
        # The bot goes on writing after the backup (the copy must not block or break it).
        target = len(writer.committed) + 5
        for _ in range(300):
            if len(writer.committed) >= target or writer.error is not None:
                break
            time.sleep(0.01)
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.error is None

    copied = voters(out)
    assert len(writer.committed) > len(copied)
    # Every vote committed before the backup began is in the copy ...
    assert set(committed_before) <= set(copied)
    # ... and the copy is the database as of one commit: a prefix of the commit order, no gaps.
    assert copied == writer.committed[:len(copied)]
    assert schema(out) == schema(db)
    with sqlite3.connect(out) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # Self-contained: no -wal companion is needed to read it.
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        # Interaction and vote are two commits: the copy may hold one interaction whose vote
        # came after it.
        texts = conn.execute("SELECT COUNT(*) FROM interactions WHERE text IS NOT NULL")
        assert texts.fetchone()[0] in (len(copied), len(copied) + 1)

    # A restore aimed where there is no database (a wrong --db) is refused, not "restored".
    elsewhere = db.parent / "elsewhere" / "loopbot.db"
    assert loopbot("restore", "--db", str(elsewhere), str(out)) == 2
    assert not elsewhere.exists()
    # Restore (bot stopped): the database goes back to the copy; the replaced one is kept.
    assert loopbot("restore", "--db", str(db), str(out)) == 0
    assert voters(db) == copied
    kept = [p for p in db.parent.glob("loopbot.db.before-restore-*")
            if not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == 1 and voters(kept[0]) == writer.committed

    # The restored file opens as the bot opens it (WAL, migrations up to date) and takes votes.
    async def reopen() -> int:
        store = await Store.open(db)
        try:
            await store.upsert_vote(1, 12345, correct=True, correct_label=None)
            return len(await store.votes_for(1))
        finally:
            await store.close()

    assert asyncio.run(reopen()) == 2


def test_backup_of_a_missing_database_fails_with_a_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = loopbot("backup", "--db", str(tmp_path / "nope.db"), "--out", str(tmp_path / "x.db"))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("loopbot: ") and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "nope.db").exists()  # a backup never creates the database
    assert not list(tmp_path.iterdir())


# The running bot, in its own process: it commits votes through the real store until a line
# arrives on stdin, then prints how many it committed.
BOT_PROCESS = """
import asyncio, sys, threading
from bot.store.queries import NewInteraction, Store
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
async def main():
    store = await Store.open(sys.argv[1])
    user = 0
    while not stop.is_set():
        user += 1
        i, _ = await store.insert_interaction(NewInteraction(
            chat_id=user, user_id=user, message_id=1, text=f"message {user}",
            version_id="v1-en", arm="active", bucket=user % 10_000, label="positive",
            probabilities={"positive": 0.7, "negative": 0.3}))
        await store.upsert_vote(i.id, user, correct=True, correct_label=None)
        if user == 20:
            print("ready", flush=True)
        await asyncio.sleep(0.005)
    await store.close()
    print(user, flush=True)
asyncio.run(main())
"""


def test_restore_while_the_bot_runs_is_refused_and_loses_no_vote(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "live" / "loopbot.db"
    bot = subprocess.Popen([sys.executable, "-c", BOT_PROCESS, str(db)], text=True,
                           cwd=Path(__file__).resolve().parents[2], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert bot.stdin is not None and bot.stdout is not None and bot.stderr is not None
    try:
        assert bot.stdout.readline() == "ready\n", bot.stderr.read()
        out = tmp_path / "backups" / "copy.db"
        assert loopbot("backup", "--db", str(db), "--out", str(out)) == 0  # fine while it runs
        capsys.readouterr()
        assert loopbot("restore", "--db", str(db), str(out)) == 2
        err = capsys.readouterr().err
        assert err == f"loopbot: the bot (or another process) has {db} open: stop it first " \
                      "(e.g. `systemctl stop loopbot`), then run the restore again; nothing " \
                      "was restored\n"
        before = len(voters(db))
        for _ in range(500):  # the bot goes on acknowledging votes after the refusal
            if len(voters(db)) >= before + 5:
                break
            time.sleep(0.01)
    finally:
        rest, errors = bot.communicate("\n", timeout=60)
    assert bot.returncode == 0, errors
    # Every vote the bot acknowledged, before and after the refused restore, is in the live
    # database (none went to a set-aside copy: there is none).
    assert voters(db) == list(range(1, int(rest.split()[-1]) + 1))
    assert len(voters(db)) >= before + 5
    assert not list(db.parent.glob("*before-restore*"))
