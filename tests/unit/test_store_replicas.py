"""What several replicas on one database rely on, on SQLite and on a real PostgreSQL: ids that
do not fit in 32 bits, hour buckets that are the same on both, job leases, one sender per
chat, a /forget that wins against a message stored by another replica, an inbox update
handled by one replica only, and an older release's SQLite database upgraded in place."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.store.db import HEAD_VERSION, Database, discover_migrations
from bot.store.inbox import Inbox
from bot.store.jobs import JobRuns
from bot.store.outbox import Outbox, Outgoing
from bot.store.queries import NewInteraction, Store, UserForgotten

SUPERGROUP = -1001234567890  # below -2**31: a 64-bit id
BIG_USER = 7_000_000_000  # Telegram's user ids pass 2**32 too


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = await Store.open(db_url, upgrade=True)
    yield s
    await s.close()


def _new(message_id: int, *, user: int = BIG_USER, chat: int = SUPERGROUP,
         at: float | None = None, update_id: int | None = None) -> NewInteraction:
    return NewInteraction(
        chat_id=chat, user_id=user, message_id=message_id, text=f"text {message_id}",
        version_id="v1", arm="active", bucket=42, label="pos",
        probabilities={"pos": 0.75, "neg": 0.25}, created_at=at, update_id=update_id,
        chat_type="supergroup")


async def test_ids_below_minus_2_to_the_31_round_trip(store: Store) -> None:
    assert SUPERGROUP < -(2**31) and BIG_USER > 2**32
    made, created = await store.insert_interaction(_new(2**40))
    assert created and (made.chat_id, made.user_id, made.message_id) == (
        SUPERGROUP, BIG_USER, 2**40)
    await store.add_bot_messages(made.id, SUPERGROUP, "verdict", [2**35])
    assert await store.find_bot_message(SUPERGROUP, 2**35) == (made.id, "verdict")
    vote = await store.upsert_vote(made.id, BIG_USER + 1, correct=True, correct_label=None)
    assert vote is not None and vote.user_id == BIG_USER + 1
    again, created = await store.insert_interaction(_new(2**40))
    assert not created and again.id == made.id


# Verdict times at the edges of hour buckets: exactly on an hour, a microsecond before and
# after, and 6000 s (1.67 h: 1 in SQLite's CAST, 2 in PostgreSQL's if it rounded).
EDGES = [3600.0 * 10, 3600.0 * 10 - 1e-6, 3600.0 * 10 + 1e-6, 6000.0, 3600.0 * 11 - 0.5,
         1_795_651_200.0 - 1e-3, 1_795_651_200.0]


async def test_hour_buckets_at_their_edges_are_the_same_on_both_databases(
        store: Store) -> None:
    for n, at in enumerate(EDGES, start=1):
        made, _ = await store.insert_interaction(_new(n, at=at))
        await store.upsert_vote(made.id, 1, correct=n % 2 == 0, correct_label=None)
    series = await store.accuracy_series(3600.0)
    got = sorted((p.period_start, p.votes, p.correct) for p in series)
    expected: dict[float, list[int]] = {}
    for n, at in enumerate(EDGES, start=1):
        start = float(int(at / 3600.0)) * 3600.0  # truncation, as the engine buckets hours
        expected.setdefault(start, [0, 0])
        expected[start][0] += 1
        expected[start][1] += n % 2 == 0
    assert got == sorted((k, v[0], v[1]) for k, v in expected.items())


async def test_a_job_period_runs_once_and_a_dead_holders_lease_expires(store: Store) -> None:
    a, b = JobRuns(store.db, "replica-a"), JobRuns(store.db, "replica-b")
    lease = await a.claim("hourly", 100, lease_s=60, now=1000.0)
    assert lease is not None
    # While a's lease runs, b may not run the period (nor a second time a).
    assert await b.claim("hourly", 100, lease_s=60, now=1010.0) is None
    # a is killed: nothing finished. After its lease ran out, b runs the period.
    taken = await b.claim("hourly", 100, lease_s=60, now=1061.0)
    assert taken is not None and taken.holder == "replica-b"
    assert not await a.finish(lease, now=1062.0)  # a's lease is gone: it cannot finish it
    assert await b.finish(taken, now=1063.0)
    # Done: nobody runs that period again, the next one is free.
    assert await a.claim("hourly", 100, lease_s=60, now=2000.0) is None
    assert await b.claim("hourly", 100, lease_s=60, now=2000.0) is None
    nxt = await a.claim("hourly", 101, lease_s=60, now=2001.0)
    assert nxt is not None
    await a.release(nxt)  # failed: given back, the next firing tries the period again
    assert await b.claim("hourly", 101, lease_s=60, now=2002.0) is not None


async def test_two_replicas_racing_for_a_period_get_it_once(store: Store) -> None:
    runs = [JobRuns(store.db, f"replica-{i}") for i in range(6)]
    got = await asyncio.gather(*(r.claim("race", 7, lease_s=60, now=5.0) for r in runs))
    assert sum(lease is not None for lease in got) == 1


async def test_one_sender_per_chat_until_its_lease_expires(store: Store) -> None:
    outbox = Outbox(store.db)
    assert await outbox.lease_chat(SUPERGROUP, "a", lease_s=30, now=100.0)
    assert await outbox.lease_chat(SUPERGROUP, "a", lease_s=30, now=110.0)  # renewed
    assert not await outbox.lease_chat(SUPERGROUP, "b", lease_s=30, now=120.0)
    assert await outbox.lease_chat(SUPERGROUP, "b", lease_s=30, now=141.0)  # a's ran out
    await outbox.release_chat(SUPERGROUP, "b")
    assert await outbox.lease_chat(SUPERGROUP, "a", lease_s=30, now=142.0)


async def test_an_update_is_claimed_by_one_replica_only(store: Store) -> None:
    one, two = Inbox(store.db, owner="replica-a"), Inbox(store.db, owner="replica-b")
    update = {"update_id": 5_000_000_001, "message": {"from": {"id": BIG_USER}, "text": "hi"}}
    # The same update delivered to both replicas at once: stored once.
    added = await asyncio.gather(one.add([update]), two.add([update]))
    assert sorted(map(len, added)) == [0, 1]
    claims = await asyncio.gather(one.claim(5_000_000_001), two.claim(5_000_000_001))
    assert sum(c is not None for c in claims) == 1


async def test_a_message_stored_after_its_authors_forget_is_refused(store: Store) -> None:
    # Another replica is still answering update 10 when the user's /forget (update 11) is
    # handled: whichever commits second, nothing of update 10 stays.
    await store.insert_interaction(_new(1, update_id=9))
    await store.forget_user(BIG_USER, before_update_id=11)
    with pytest.raises(UserForgotten):
        await store.insert_interaction(_new(2, update_id=10))
    assert await store.find_interaction(SUPERGROUP, 1) is None
    assert await store.find_interaction(SUPERGROUP, 2) is None
    later, created = await store.insert_interaction(_new(3, update_id=12))
    assert created and later.text == "text 3"


async def test_admin_notes_are_stored_with_what_they_tell(store: Store) -> None:
    outbox = Outbox(store.db)
    await outbox.add([Outgoing(SUPERGROUP, "supergroup", "notice", {"text": "x"})])
    assert await outbox.chats_pending() == [(SUPERGROUP, "supergroup")]


async def test_an_older_releases_sqlite_database_upgrades_in_place_with_nothing_lost(
        tmp_path: Path) -> None:
    """A database built the way the release before Alembic built it (its numbered SQL files,
    nothing else), with votes, reactions and audit entries, opened by this release."""
    path = tmp_path / "old.db"
    old = await Database.open(path, migrations=discover_migrations())
    async with old.transaction() as conn:
        await conn.execute(
            "INSERT INTO prompt_versions (id, state, content_hash, state_since)"
            " VALUES ('v1', 'active', 'h', 1.0)")
        await conn.execute(
            "INSERT INTO audit_log (at, actor, action, version_id, to_state, reason)"
            " VALUES (1.0, 'system', 'init', 'v1', 'active', 'first')")
        for n in range(1, 6):
            await conn.execute(
                "INSERT INTO interactions (created_at, chat_id, user_id, message_id, text,"
                " version_id, arm, bucket, label, probabilities, confidence)"
                " VALUES (?, ?, ?, ?, ?, 'v1', 'active', 1, 'pos', '{\"pos\": 0.9}', 0.9)",
                (3600.0 * n, SUPERGROUP, 10 + n, n, f"old text {n}"))
            await conn.execute(
                "INSERT INTO votes (interaction_id, user_id, correct, created_at, updated_at,"
                " first_correct) VALUES (?, ?, ?, ?, ?, ?)",
                (n, 99, n % 2, 3600.0 * n + 5, 3600.0 * n + 5, n % 2))
            await conn.execute(
                "INSERT INTO reactions (interaction_id, chat_id, message_id, user_id, kind,"
                " emojis, polarity, updated_at, first_polarity, first_at)"
                " VALUES (?, ?, ?, 98, 'reply', '[\"👍\"]', 1, ?, 1, ?)",
                (n, SUPERGROUP, 100 + n, 3600.0 * n + 9, 3600.0 * n + 9))
    assert await old.schema_version() == 7
    await old.close()
    with sqlite3.connect(path) as conn:
        before = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                  for t in ("prompt_versions", "audit_log", "interactions", "votes",
                            "reactions")}
        assert "alembic_version" not in {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master")}

    store = await Store.open(path)  # what `loopbot run` does at start
    try:
        assert await store.db.schema_version() == HEAD_VERSION
        counts = {c.version_id: c for c in await store.version_counts()}
        assert (counts["v1"].verdicts, counts["v1"].votes, counts["v1"].correct) == (5, 5, 3)
        assert counts["v1"].reactions_positive == 5
        # And the new tables work on it.
        assert await JobRuns(store.db, "x").claim("hourly", 1, lease_s=5) is not None
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        after = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                 for t in before}
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version")]
    assert after == before
    assert versions == list(range(1, 8))  # the old files were not applied twice
    assert json.loads(before["audit_log"][0][-1]) == {}


@pytest.mark.postgres
async def test_a_postgresql_backup_is_a_pg_dump_archive_and_restore_says_how(
        pg_url: str, tmp_path: Path) -> None:
    from bot.ops.backup_cli import run_restore
    from bot.store.backup import BackupError, backup_and_rotate, list_backups

    store = await Store.open(pg_url, upgrade=True)
    try:
        await store.insert_interaction(_new(1))
    finally:
        await store.close()
    result = await backup_and_rotate(pg_url, tmp_path / "backups", keep=2)
    assert result.path.name.endswith(".pgdump") and result.schema_version == HEAD_VERSION
    assert result.path.read_bytes()[:5] == b"PGDMP"  # pg_dump's custom format
    assert list_backups(tmp_path / "backups") == [result.path]

    import argparse

    args = argparse.Namespace(backup=str(result.path), db=pg_url, new=False)
    with pytest.raises(BackupError, match="pg_restore"):
        run_restore(args)


async def test_a_schema_newer_or_older_than_the_release_is_refused_with_what_to_do(
        db_url: str) -> None:
    from bot.store.db import MigrationError, SchemaBehind

    db = await Database.open(db_url, upgrade=True)
    async with db.transaction() as conn:
        await conn.execute("UPDATE alembic_version SET version_num = '007'")
    await db.close()
    # A replica (no upgrade at start) on an older schema: refused, with the command to run.
    with pytest.raises(SchemaBehind, match="loopbot db upgrade"):
        await Database.open(db_url, upgrade=False)
    db = await Database.open(db_url, check_schema=False)
    async with db.transaction() as conn:
        await conn.execute("UPDATE alembic_version SET version_num = '099'")
    await db.close()
    for upgrade in (True, False):
        with pytest.raises(MigrationError, match="newer"):
            await Database.open(db_url, upgrade=upgrade)


@pytest.mark.postgres
def test_loopbot_db_upgrade_migrates_once_and_current_reports_it(
        pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    assert main(["db", "current", "--db", pg_url]) == 0
    assert f"schema version 0; this release: {HEAD_VERSION} (older" in capsys.readouterr().out
    assert main(["db", "upgrade", "--db", pg_url]) == 0
    assert f"upgraded from version 0 to {HEAD_VERSION}" in capsys.readouterr().out
    assert main(["db", "upgrade", "--db", pg_url]) == 0
    assert "already current" in capsys.readouterr().out
    assert main(["db", "current", "--db", pg_url]) == 0
    assert "(current)" in capsys.readouterr().out


async def test_the_health_probe_writes_to_the_database_it_is_on(store: Store) -> None:
    from bot.ops.health import HealthChecker

    class Parts:
        runtime = None

    checker = HealthChecker(lambda: Parts())  # type: ignore[arg-type, return-value]
    assert await checker._check_db(store.db) == []
    row = await store.db.fetchone("SELECT at FROM health_probe WHERE id = 1")
    assert row is not None and row[0] > 1_700_000_000


async def test_a_nul_character_in_a_text_is_stored_on_both_databases(store: Store) -> None:
    made, _ = await store.insert_interaction(_new(1))
    assert await store.set_reply(made.id, "a\x00b", 1.0)
    got = await store.get_interaction(made.id)
    assert got is not None and got.reply_text == "a\ufffdb"


async def test_a_vote_or_reaction_stored_after_the_voters_forget_is_refused(
        store: Store) -> None:
    made, _ = await store.insert_interaction(_new(1, user=5, update_id=1))
    await store.forget_user(BIG_USER, before_update_id=20)
    # Sent before the /forget (update 19), stored after it by another replica: refused.
    with pytest.raises(UserForgotten):
        await store.upsert_vote(made.id, BIG_USER, correct=True, correct_label=None,
                                update_id=19)
    with pytest.raises(UserForgotten):
        await store.set_reaction(made.id, SUPERGROUP, 77, BIG_USER, "reply", ["👍"], 1,
                                 update_id=19)
    assert await store.votes_for(made.id) == [] and await store.reactions_for(made.id) == []
    # Sent after it: new data.
    assert await store.upsert_vote(made.id, BIG_USER, correct=True, correct_label=None,
                                   update_id=21) is not None


def test_the_head_version_constant_is_the_newest_revision_file() -> None:
    from bot.store.schema import head_version

    assert head_version() == HEAD_VERSION


def test_the_bot_starts_without_loading_matplotlib_or_alembic(tmp_path: Path) -> None:
    """~40 MB resident that `loopbot run` does not need until an admin asks for a chart or a
    migration runs (issue 10's memory budget: ≤ 0.9 GB after 8 concurrent replies)."""
    import subprocess
    import sys

    db = tmp_path / "current.db"
    code = (
        "import asyncio, sys\n"
        "from bot.store.db import Database\n"
        "async def main():\n"
        f"    db = await Database.open({str(db)!r})\n"
        "    await db.close()\n"
        "asyncio.run(main())\n"
        "import bot.telegram.app, bot.telegram.runner\n"
        "print(sorted(m for m in ('matplotlib', 'alembic') if m in sys.modules))\n")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    assert first.stdout.strip() == "['alembic']"  # a new database is migrated
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    assert again.stdout.strip() == "[]"  # a current one is only read
