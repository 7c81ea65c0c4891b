"""Retention: texts past the configured age are erased; votes, labels and stats stay."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.ops.retention import DAY_S, erase_old_texts
from bot.store.queries import NewInteraction, Store

NOW = 1_800_000_000.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "r.db")
    yield s
    await s.close()


async def _message(store: Store, message_id: int, age_days: float) -> int:
    interaction, _ = await store.insert_interaction(NewInteraction(
        chat_id=5, user_id=5, message_id=message_id, text=f"secret words {message_id}",
        version_id="v1-en", arm="active", bucket=3, label="negative",
        probabilities={"positive": 0.2, "negative": 0.8}, verdict_latency_ms=40.0,
        created_at=NOW - age_days * DAY_S))
    await store.set_reply(interaction.id, f"reply to {message_id}", 900.0)
    await store.add_bot_messages(interaction.id, 5, "reply", [5000 + message_id])
    await store.upsert_vote(interaction.id, 77, correct=message_id % 2 == 0, correct_label=None)
    await store.set_reaction(interaction.id, 5, 5000 + message_id, 77, "reply", ["👍"], 1)
    return interaction.id


async def test_texts_past_retention_are_erased_and_their_votes_kept(store: Store) -> None:
    old = [await _message(store, i, age) for i, age in ((1, 400), (2, 31), (3, 30.01))]
    young = [await _message(store, i, age) for i, age in ((4, 29.99), (5, 1))]
    stats_before = await store.version_counts()

    assert await erase_old_texts(store.db, 30, now=NOW) == 3
    for iid in old:
        got = await store.get_interaction(iid)
        assert got is not None and got.text is None and got.reply_text is None
        # The verdict and the feedback on it stay: they are the statistics.
        assert got.label == "negative" and got.probabilities["negative"] == 0.8
        assert len(await store.votes_for(iid)) == 1
        assert len(await store.reactions_for(iid)) == 1
    for iid in young:
        got = await store.get_interaction(iid)
        assert got is not None and got.text is not None and got.reply_text is not None
    assert await store.version_counts() == stats_before
    erased_at = await store.db.fetchall(
        "SELECT text_erased_at FROM interactions ORDER BY id")
    assert [r[0] for r in erased_at] == [NOW, NOW, NOW, None, None]

    # A second sweep finds nothing new; a day later the next one ages out.
    assert await erase_old_texts(store.db, 30, now=NOW) == 0
    assert await erase_old_texts(store.db, 30, now=NOW + DAY_S) == 1


async def test_zero_days_keeps_texts_forever(store: Store) -> None:
    await _message(store, 1, 10_000)
    assert await erase_old_texts(store.db, 0, now=NOW) == 0
    row = await store.db.fetchone("SELECT text FROM interactions")
    assert row is not None and row[0] == "secret words 1"


async def test_a_report_quoting_an_erased_text_is_blanked(store: Store) -> None:
    await _message(store, 1, 31)
    # Mined a week ago, from a vote window reaching back past the cutoff: it quotes that text.
    async with store.db.transaction() as conn:
        for cid, age_days in (("v1-en-c1", 7), ("v1-en-c2", 40), ("v1-en-c3", 1)):
            await conn.execute(
                "INSERT INTO candidate_proposals (candidate_id, parent_id, created_at, status,"
                " path, reason, judged, error_rate, report) VALUES (?, 'v1-en', ?, 'refused',"
                " 'p.yaml', 'r', 1, 0.5, ?)",
                (cid, NOW - age_days * DAY_S, '{"examples": ["secret words 1"]}'))
    await erase_old_texts(store.db, 30, now=NOW)
    rows = await store.db.fetchall(
        "SELECT candidate_id, report FROM candidate_proposals ORDER BY candidate_id")
    # Made before the cutoff + the vote window: may quote erased texts, blanked. The newest
    # window starts after the cutoff: it quotes nothing erased and is kept.
    assert [tuple(r) for r in rows] == [
        ("v1-en-c1", "{}"), ("v1-en-c2", "{}"),
        ("v1-en-c3", '{"examples": ["secret words 1"]}')]

