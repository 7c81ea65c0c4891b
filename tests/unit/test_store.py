"""The SQLite store: migrations, constraints, and each query against a real database file."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.store.db import (
    DB_ERRORS,
    HEAD_VERSION,
    Database,
    Migration,
    MigrationError,
    discover_migrations,
)
from bot.store.queries import NewInteraction, Store

SCORER = "gguf:qwen2.5-0.5b-instruct-q8_0.gguf:1a2b3c4d5e6f7a8b"


def _new(message_id: int, *, user: int = 7, chat: int = 100, version: str = "v1",
         label: str | None = "pos", at: float | None = None) -> NewInteraction:
    return NewInteraction(
        chat_id=chat, user_id=user, message_id=message_id, text=f"text {message_id}",
        version_id=version, arm="active", bucket=42, label=label,
        probabilities={"pos": 0.75, "neg": 0.25} if label else None,
        verdict_latency_ms=12.5 if label else None, created_at=at,
    )


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """Every test of the store runs on SQLite and on PostgreSQL."""
    s = await Store.open(db_url, upgrade=True)
    yield s
    await s.close()


async def test_fresh_database_is_migrated_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    try:
        assert await db.schema_version() == HEAD_VERSION
        mode = await db.fetchone("PRAGMA journal_mode")
        fks = await db.fetchone("PRAGMA foreign_keys")
        assert mode is not None and mode[0] == "wal"
        assert fks is not None and fks[0] == 1
    finally:
        await db.close()
    # Re-opening applies nothing twice: the pre-Alembic files once each (the baseline's SQLite
    # half), Alembic at its head.
    db = await Database.open(tmp_path / "a.db")
    rows = await db.fetchall("SELECT version FROM schema_version")
    head = await db.fetchall("SELECT version_num FROM alembic_version")
    await db.close()
    assert [r[0] for r in rows] == list(range(1, len(discover_migrations()) + 1))
    assert [r[0] for r in head] == [f"{HEAD_VERSION:03d}"]


async def test_a_failing_migration_leaves_no_trace(tmp_path: Path) -> None:
    good = Migration(1, "one", "CREATE TABLE a (x INTEGER);")
    bad = Migration(2, "two", "CREATE TABLE b (y INTEGER); INSERT INTO nowhere VALUES (1);")
    with pytest.raises(MigrationError, match="002_two"):
        await Database.open(tmp_path / "m.db", migrations=[good, bad])
    # One transaction for the whole upgrade: nothing of it stays, not even the first file.
    with sqlite3.connect(tmp_path / "m.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "a" not in tables and "b" not in tables and "schema_version" not in tables


async def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    await (await Database.open(tmp_path / "n.db")).close()
    with pytest.raises(MigrationError, match="newer"):
        await Database.open(tmp_path / "n.db", migrations=[])


def test_migration_files_must_be_numbered_without_gaps(tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("SELECT 1;")
    (tmp_path / "003_c.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="without gaps"):
        discover_migrations(tmp_path)


async def test_migration_007_adds_the_scorer_to_an_existing_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    before = [m for m in discover_migrations() if m.version < 7]
    assert [m.version for m in before] == [1, 2, 3, 4, 5, 6]
    old = await Database.open(path, migrations=before)
    async with old.transaction() as conn:  # a verdict stored by the previous release
        await conn.execute(
            "INSERT INTO interactions (created_at, chat_id, user_id, message_id, text,"
            " version_id, arm, bucket, label, probabilities, confidence)"
            " VALUES (1.0, 100, 7, 1, 'old', 'v1', 'active', 42, 'pos', '{\"pos\": 1.0}', 1.0)")
    await old.close()

    store = await Store.open(path)
    try:
        assert await store.db.schema_version() == HEAD_VERSION
        legacy = await store.find_interaction(100, 1)
        assert legacy is not None and legacy.scorer is None and legacy.label == "pos"
        new, _ = await store.insert_interaction(dataclasses.replace(_new(2), scorer=SCORER))
        assert new.scorer == SCORER
    finally:
        await store.close()


async def test_the_scorer_of_a_verdict_round_trips(store: Store) -> None:
    scored, _ = await store.insert_interaction(dataclasses.replace(_new(1), scorer=SCORER))
    unknown, _ = await store.insert_interaction(dataclasses.replace(_new(2), scorer=""))
    reply_only, _ = await store.insert_interaction(_new(3, label=None))
    assert (scored.scorer, unknown.scorer, reply_only.scorer) == (SCORER, None, None)
    again = await store.find_interaction(100, 1)
    assert again is not None and again.scorer == SCORER
    rows = await store.db.fetchall("SELECT message_id, scorer FROM interactions ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, SCORER), (2, None), (3, None)]


async def test_a_redelivered_message_is_stored_once(store: Store) -> None:
    first, created = await store.insert_interaction(_new(1))
    again, created_again = await store.insert_interaction(_new(1))
    assert created and not created_again
    assert again.id == first.id
    rows = await store.db.fetchall("SELECT id FROM interactions")
    assert len(rows) == 1
    assert first.labels == ["pos", "neg"] and first.confidence == 0.75


async def test_one_vote_per_user_and_interaction_and_it_can_change(store: Store) -> None:
    inter, _ = await store.insert_interaction(_new(1))
    v1 = await store.upsert_vote(inter.id, 7, correct=True, correct_label=None)
    v2 = await store.upsert_vote(inter.id, 7, correct=False, correct_label="neg")
    v3 = await store.upsert_vote(inter.id, 7, correct=False, correct_label="neg")
    other = await store.upsert_vote(inter.id, 8, correct=True, correct_label=None)
    assert v1 is not None and v2 is not None and v3 is not None and other is not None
    assert v1.correct and not v2.correct and v2.correct_label == "neg"
    assert (v1.changes, v2.changes, v3.changes) == (0, 1, 1)
    assert v2.created_at == v1.created_at
    votes = await store.votes_for(inter.id)
    assert [(v.user_id, v.correct) for v in votes] == [(7, False), (8, True)]
    assert other.user_id == 8


async def test_votes_need_an_existing_interaction(store: Store) -> None:
    # None, not a foreign-key error: the interaction may be deleted (/forget) between the
    # click's check and its write, and the click must still be answered.
    assert await store.upsert_vote(999, 7, correct=True, correct_label=None) is None
    assert await store.db.fetchall("SELECT * FROM votes") == []


async def test_reactions_keep_the_current_set_per_user(store: Store) -> None:
    inter, _ = await store.insert_interaction(_new(1))
    await store.add_bot_messages(inter.id, 100, "verdict", [50])
    await store.add_bot_messages(inter.id, 100, "reply", [51, 52])
    assert (await store.get_interaction(inter.id)).verdict_message_id == 50  # type: ignore[union-attr]
    assert await store.find_bot_message(100, 52) == (inter.id, "reply")
    assert await store.find_bot_message(100, 53) is None
    await store.set_reaction(inter.id, 100, 51, 7, "reply", ["👍"], 1)
    await store.set_reaction(inter.id, 100, 51, 7, "reply", ["👎"], -1)
    stored = await store.reactions_for(inter.id)
    assert [(r.emojis, r.polarity) for r in stored] == [(("👎",), -1)]
    await store.set_reaction(inter.id, 100, 51, 7, "reply", [], 0)
    assert await store.reactions_for(inter.id) == []


async def test_a_reaction_keeps_its_first_polarity_and_time(store: Store) -> None:
    inter, _ = await store.insert_interaction(_new(1))
    await store.add_bot_messages(inter.id, 100, "reply", [51])
    await store.set_reaction(inter.id, 100, 51, 7, "reply", ["🤔"], 0, now=1000.0)
    await store.set_reaction(inter.id, 100, 51, 7, "reply", ["👎"], -1, now=2000.0)
    await store.set_reaction(inter.id, 100, 51, 7, "reply", ["👍"], 1, now=3000.0)
    await store.set_reaction(inter.id, 100, 51, 7, "reply", [], 0, now=4000.0)
    rows = await store.db.fetchall(
        "SELECT emojis, polarity, first_polarity, first_at FROM reactions")
    # Shown: nothing any more. Filed for the engine: the first 👎, when it was given.
    assert [tuple(r) for r in rows] == [("[]", 0, -1, 2000.0)]


async def test_version_counts_and_series(store: Store) -> None:
    a, _ = await store.insert_interaction(_new(1, version="v1", at=3600 * 10 + 5))
    b, _ = await store.insert_interaction(_new(2, version="v1", at=3600 * 11 + 5))
    c, _ = await store.insert_interaction(_new(3, version="v2", at=3600 * 11 + 9))
    await store.insert_interaction(_new(4, version="v2", label=None))
    await store.upsert_vote(a.id, 7, correct=True, correct_label=None)
    await store.upsert_vote(a.id, 8, correct=False, correct_label="neg")
    await store.upsert_vote(b.id, 7, correct=True, correct_label=None)
    await store.upsert_vote(c.id, 7, correct=False, correct_label="neg")
    await store.add_bot_messages(c.id, 100, "reply", [60])
    await store.set_reaction(c.id, 100, 60, 7, "reply", ["👎"], -1)
    counts = {c.version_id: c for c in await store.version_counts()}
    assert (counts["v1"].verdicts, counts["v1"].votes, counts["v1"].correct) == (2, 3, 2)
    assert (counts["v2"].verdicts, counts["v2"].votes, counts["v2"].correct) == (1, 1, 0)
    assert counts["v2"].reactions_negative == 1 and counts["v1"].reactions_negative == 0
    series = await store.accuracy_series(3600.0)
    assert [(p.version_id, p.period_start, p.votes, p.correct) for p in series] == [
        ("v1", 36000.0, 2, 1), ("v1", 39600.0, 1, 1), ("v2", 39600.0, 1, 0)]
    exported = await store.export_votes()
    assert len(exported) == 4 and exported[1].correct_label == "neg"


async def test_recent_turns_are_the_chats_last_pairs_oldest_first(store: Store) -> None:
    ids = []
    for m in range(1, 5):
        inter, _ = await store.insert_interaction(_new(m))
        await store.set_reply(inter.id, f"reply {m}", 5.0)
        ids.append(inter.id)
    other, _ = await store.insert_interaction(_new(9, chat=555))
    await store.set_reply(other.id, "elsewhere", 1.0)
    turns = await store.recent_turns(100, ids[3], 2)
    assert turns == [("text 2", "reply 2"), ("text 3", "reply 3")]


async def test_forget_user_deletes_texts_votes_and_reactions(store: Store) -> None:
    mine, _ = await store.insert_interaction(_new(1, user=7))
    theirs, _ = await store.insert_interaction(_new(2, user=8))
    await store.upsert_vote(mine.id, 8, correct=True, correct_label=None)
    await store.upsert_vote(theirs.id, 7, correct=True, correct_label=None)
    await store.upsert_vote(theirs.id, 8, correct=True, correct_label=None)
    result = await store.forget_user(7)
    assert (result.interactions, result.votes) == (1, 2)
    assert await store.get_interaction(mine.id) is None
    assert [v.user_id for v in await store.votes_for(theirs.id)] == [8]


async def test_retention_erases_texts_and_keeps_votes(store: Store) -> None:
    old, _ = await store.insert_interaction(_new(1, at=1000.0))
    new, _ = await store.insert_interaction(_new(2, at=5000.0))
    await store.set_reply(old.id, "old reply", 1.0)
    await store.upsert_vote(old.id, 7, correct=True, correct_label=None)
    assert await store.erase_texts_before(2000.0, quote_window_s=0.0) == 1
    erased = await store.get_interaction(old.id)
    assert erased is not None and erased.text is None and erased.reply_text is None
    assert erased.label == "pos"
    assert len(await store.votes_for(old.id)) == 1
    assert (await store.get_interaction(new.id)).text == "text 2"  # type: ignore[union-attr]


async def test_audit_log_is_append_only(store: Store) -> None:
    async with store.db.transaction() as conn:
        await conn.execute("INSERT INTO audit_log (at, actor, action, version_id, to_state)"
                           " VALUES (1, 'x', 'init', 'v1', 'active')")
    for sql in ("UPDATE audit_log SET actor = 'y'", "DELETE FROM audit_log"):
        with pytest.raises(DB_ERRORS, match="append-only"):
            async with store.db.transaction() as conn:
                await conn.execute(sql)
    rows = await store.db.fetchall("SELECT actor FROM audit_log")
    assert [r[0] for r in rows] == ["x"]


async def test_a_failed_transaction_rolls_back_everything(store: Store) -> None:
    with pytest.raises(RuntimeError):
        async with store.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO interactions (created_at, chat_id, user_id, message_id, version_id,"
                " arm, bucket) VALUES (1, 1, 1, 1, 'v1', 'active', 0)")
            raise RuntimeError("crash mid-way")
    assert await store.db.fetchall("SELECT id FROM interactions") == []
