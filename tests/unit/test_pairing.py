"""The paired comparison's labels on real databases: the table, the scoring step that fills it,
/forget, backups, and how the experiment analysis counts and exports them."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from analytics.decide import DecisionConfig, HourStats, decide
from bot import experiment, pairing
from bot.llm.types import InferenceError, RuntimeBusy, Verdict
from bot.prompts import Label, PromptVersion, label_correspondence, load_directory
from bot.store.db import DB_ERRORS, HEAD_VERSION, Connection, Database
from bot.store.pairs import PendingText, store_paired_label
from bot.store.queries import Store
from tests.unit.test_experiment import H0, T0, A, B, add_interaction, start_test, text_of

ROOT = Path(__file__).resolve().parents[2]
S = "gguf:model.gguf:0123456789abcdef"  # the scorer of the verdicts and of the runtime
OTHER_SCORER = "remote:another-model"


@pytest.fixture(scope="module")
def catalog() -> dict[str, PromptVersion]:
    return load_directory(ROOT / "prompts")


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """On SQLite and on PostgreSQL."""
    database = await Database.open(db_url, upgrade=True)
    yield database
    await database.close()


async def pairs_of(db: Database) -> list[tuple[int, str, str, str]]:
    rows = await db.fetchall("SELECT interaction_id, version_id, label, scorer"
                             " FROM paired_labels ORDER BY interaction_id, version_id")
    return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


async def interaction_id(db: Database, message_id: int) -> int:
    row = await db.fetchone("SELECT id FROM interactions WHERE message_id = ?", (message_id,))
    assert row is not None
    return int(row[0])


# ------------------------------------------------------------------------------ the table


async def test_migration_009_creates_the_table_on_a_database_at_008(db_url: str) -> None:
    db = await Database.open(db_url, upgrade=True)
    async with db.transaction() as conn:  # the database as the previous release left it
        await conn.execute("DROP TABLE paired_labels")
        await conn.execute("UPDATE alembic_version SET version_num = '008'")
    assert await db.schema_version() == 8
    await db.close()

    db = await Database.open(db_url, upgrade=True)
    try:
        assert HEAD_VERSION == 9 and await db.schema_version() == 9
        async with db.transaction() as conn:
            iid = await conn.insert_id(
                "INSERT INTO interactions (created_at, chat_id, user_id, message_id, text,"
                " version_id, arm, bucket, label) VALUES (1.5, -1001234567890, 7, 1, 'hi',"
                " 'v1', 'active', 0, 'pos')")
            await conn.execute(
                "INSERT INTO paired_labels (interaction_id, version_id, label, scorer,"
                " created_at) VALUES (?, 'v2', 'neg', ?, 1700000000.25)", (iid, S))
            await conn.execute(
                "INSERT INTO paired_labels (interaction_id, version_id, label, scorer,"
                " created_at) VALUES (?, 'v3', 'pos', ?, 1700000000.5)", (iid, S))
        row = await db.fetchone("SELECT created_at FROM paired_labels WHERE version_id = 'v2'")
        assert row is not None and row[0] == 1700000000.25  # 8-byte times on both databases
        # One label per interaction and scoring version.
        with pytest.raises(DB_ERRORS, match=r"(?i)unique|duplicate"):
            async with db.transaction() as conn:
                await conn.execute(
                    "INSERT INTO paired_labels (interaction_id, version_id, label, scorer,"
                    " created_at) VALUES (?, 'v2', 'pos', ?, 1.0)", (iid, S))
        # The labels go with their interaction.
        async with db.transaction() as conn:
            await conn.execute("DELETE FROM interactions WHERE id = ?", (iid,))
        assert await pairs_of(db) == []
    finally:
        await db.close()


async def test_a_database_at_008_is_backed_up_before_009_is_applied(tmp_path: Path) -> None:
    from bot.store.backup import backup_before_migrating

    path = tmp_path / "loopbot.db"
    db = await Database.open(path)
    async with db.transaction() as conn:
        await conn.execute("DROP TABLE paired_labels")
        await conn.execute("UPDATE alembic_version SET version_num = '008'")
    await db.close()
    made = await backup_before_migrating(path, tmp_path / "backups")
    assert made is not None and made.schema_version == 8
    assert made.path.name.endswith("-pre-migration-v8.db")
    db = await Database.open(path)
    await db.close()
    with sqlite3.connect(made.path) as old, sqlite3.connect(path) as new:
        tables = "SELECT name FROM sqlite_master WHERE name = 'paired_labels'"
        assert old.execute(tables).fetchall() == []
        assert new.execute(tables).fetchall() == [("paired_labels",)]


async def test_a_backup_keeps_the_paired_labels(tmp_path: Path,
                                                catalog: dict[str, PromptVersion]) -> None:
    from bot.store.backup import backup_database

    db = await Database.open(tmp_path / "loopbot.db")
    try:
        await start_test(db, catalog)
        async with db.transaction() as conn:
            await add_interaction(conn, user=5, version=A, at=T0 + 60, message_id=5,
                                  vote=True, scorer=S, other_label="negative")
        result = await backup_database(tmp_path / "loopbot.db", tmp_path / "copy.db")
        expected = await pairs_of(db)
    finally:
        await db.close()
    assert result.schema_version == HEAD_VERSION and expected
    with sqlite3.connect(result.path) as conn:
        copied = conn.execute("SELECT interaction_id, version_id, label, scorer"
                              " FROM paired_labels ORDER BY 1, 2").fetchall()
    assert copied == expected


async def test_forget_deletes_the_paired_labels_of_the_users_messages(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog)
    async with db.transaction() as conn:
        await add_interaction(conn, user=7, version=A, at=T0 + 60, message_id=1, vote=True,
                              voter=8, scorer=S, other_label="positive")
        await add_interaction(conn, user=7, version=B, at=T0 + 70, message_id=2, vote=True,
                              scorer=S, other_label="正面")
        await add_interaction(conn, user=8, version=A, at=T0 + 80, message_id=3, vote=True,
                              voter=7, scorer=S, other_label="negative")
    kept = await interaction_id(db, 3)
    result = await Store(db).forget_user(7)
    assert result.interactions == 2
    # Only the label of user 8's message remains (user 7 voted on it: the vote is gone, the
    # message and what the other prompt says about it are user 8's).
    assert await pairs_of(db) == [(kept, B, "negative", S)]


async def test_a_label_is_not_stored_for_a_message_forgotten_while_it_was_scored(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog)
    async with db.transaction() as conn:
        await add_interaction(conn, user=7, version=A, at=T0 + 60, message_id=1, vote=True,
                              scorer=S)
    pending = PendingText(await interaction_id(db, 1), 7, A, text_of(1))
    await Store(db).forget_user(7)
    assert not await store_paired_label(db, pending, B, "positive", S, T0 + 90)
    assert await pairs_of(db) == []


# ------------------------------------------------------------------------------ scoring


class FakeClassifier:
    """The runtime's classify, recorded: the label is the version's first (or second, for
    texts in ``second``), the scorer S; texts in ``fail`` raise, ``busy`` ones too."""

    def __init__(self, *, fail: set[str] | None = None, busy: set[str] | None = None,
                 second: set[str] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail or set()
        self.busy = busy or set()
        self.second = second or set()

    async def classify(self, version: PromptVersion, text: str) -> Verdict:
        self.calls.append((version.id, text))
        if text in self.busy:
            raise RuntimeBusy("queue full")
        if text in self.fail:
            raise InferenceError("the model failed on this text")
        label = version.label_names[1 if text in self.second else 0]
        return Verdict(label=label, probabilities={n: 0.5 for n in version.label_names},
                       version_id=version.id, latency_ms=1.0, scorer=S)


async def _history_to_score(db: Database, catalog: dict[str, PromptVersion]) -> None:
    """Verdicts of every kind around a test of B (v1-en) against A (v1-zh) started at T0."""
    await start_test(db, catalog)
    async with db.transaction() as conn:
        async def add(message_id: int, version: str, at: float, **kw: Any) -> None:
            await add_interaction(conn, user=100 + message_id, version=version, at=at,
                                  message_id=message_id, **{"scorer": S, **kw})

        await add(1, A, T0 - 100, vote=True)               # before the test: no
        await add(2, A, T0 + 10, vote=True)                # yes, with B's prompt
        await add(3, B, T0 + 20, vote=False)               # yes, with A's prompt
        await add(4, A, T0 + 30)                           # no vote: no
        await add(5, A, T0 + 40, vote=True)                # text erased: no
        await add(6, B, T0 + 50, vote=True)                # a reply only: no
        await add(7, B, T0 + 60, vote=True, other_label="正面")  # scored already: no
        await add(8, "v0", T0 + 70, vote=True)             # not a version of the test: no
        await add(9, A, T0 + 80, vote=True)                # whitespace only: no
        await add(10, B, T0 + 3600 + 5, vote=True, voter=3)  # yes (another voter)
        await add(11, A, T0 + 3600 + 9, vote=True, scorer=OTHER_SCORER)  # another scorer: no
        await conn.execute("UPDATE interactions SET text = NULL WHERE message_id = 5")
        await conn.execute("UPDATE interactions SET label = NULL WHERE message_id = 6")
        await conn.execute("UPDATE interactions SET text = '  ' WHERE message_id = 9")


async def test_the_job_scores_exactly_the_voted_unscored_verdicts_with_the_other_prompt(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await _history_to_score(db, catalog)
    before = await pairs_of(db)
    classifier = FakeClassifier(second={text_of(10)})
    now = T0 + 2 * 3600
    run = await pairing.score_pending(db, classifier, catalog, DecisionConfig(), now=now)
    assert (run.scored, run.failed, run.stopped) == (3, 0, None)
    # Oldest first, each with the other arm's prompt.
    assert classifier.calls == [(B, text_of(2)), (A, text_of(3)), (A, text_of(10))]
    ids = {m: await interaction_id(db, m) for m in (2, 3, 10)}
    assert sorted(set(await pairs_of(db)) - set(before)) == sorted([
        (ids[2], B, "positive", S), (ids[3], A, "正面", S), (ids[10], A, "负面", S)])
    # Idempotent: the next run stores nothing. It learns the runtime's scorer on the one
    # verdict left, made by another scorer (message 11), and stores no label for it.
    again = FakeClassifier()
    assert await pairing.score_pending(db, again, catalog, DecisionConfig(),
                                       now=now) == pairing.PairingRun()
    assert again.calls == [(B, text_of(11))]
    assert len(await pairs_of(db)) == len(before) + 3
    # A vote on a verdict that had none: the next run scores it, and it alone.
    unvoted = await interaction_id(db, 4)
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO votes (interaction_id, user_id, correct, created_at,"
                           " updated_at) VALUES (?, 104, 1, ?, ?)", (unvoted, now, now))
    later = FakeClassifier()
    await pairing.score_pending(db, later, catalog, DecisionConfig(), now=now + 60)
    assert later.calls == [(B, text_of(4))]
    # Switched off: nothing is scored.
    async with db.transaction() as conn:
        await conn.execute("DELETE FROM paired_labels")
    off = FakeClassifier()
    await pairing.score_pending(db, off, catalog, DecisionConfig(paired_comparison=False),
                                now=now)
    assert off.calls == [] and await pairs_of(db) == []


async def test_scoring_is_bounded_per_run_and_a_failure_skips_one_text(
        db: Database, catalog: dict[str, PromptVersion],
        caplog: pytest.LogCaptureFixture) -> None:
    await start_test(db, catalog)
    async with db.transaction() as conn:
        for m in range(1, 7):
            await add_interaction(conn, user=m, version=A if m % 2 else B, at=T0 + 10 * m,
                                  message_id=m, vote=True, scorer=S)
    now = T0 + 3600
    caplog.set_level(logging.INFO, logger="bot.pairing")
    # The bound: the two oldest, the rest at the next runs.
    first = FakeClassifier()
    run = await pairing.score_pending(db, first, catalog, DecisionConfig(), now=now, limit=2)
    assert [t for _, t in first.calls] == [text_of(1), text_of(2)]
    assert run.scored == 2 and run.stopped is not None and "2 texts a run" in run.stopped
    assert "2 verdicts scored by the other arm's prompt" in caplog.text
    # A text that fails is logged and skipped; the others are scored.
    second = FakeClassifier(fail={text_of(3)})
    run = await pairing.score_pending(db, second, catalog, DecisionConfig(), now=now)
    assert [t for _, t in second.calls] == [text_of(m) for m in (3, 4, 5, 6)]
    assert (run.scored, run.failed, run.stopped) == (3, 1, None)
    assert "not scored by v1-en: the model failed on this text" in caplog.text
    # It is tried again at the next run; a busy runtime ends that run's scoring.
    async with db.transaction() as conn:
        await add_interaction(conn, user=7, version=A, at=T0 + 70, message_id=7, vote=True,
                              scorer=S)
    third = FakeClassifier(busy={text_of(3)})
    run = await pairing.score_pending(db, third, catalog, DecisionConfig(), now=now)
    assert [t for _, t in third.calls] == [text_of(3)]
    assert run.failed == 1 and run.stopped is not None and "busy" in run.stopped
    # The time budget: no text is started once it is spent.
    ticks = iter([0.0, 0.0, 1.0, 99.0, 99.0])
    fourth = FakeClassifier()
    run = await pairing.score_pending(db, fourth, catalog, DecisionConfig(), now=now,
                                      budget_s=10.0, clock=lambda: next(ticks))
    assert [t for _, t in fourth.calls] == [text_of(3)]
    assert run.scored == 1 and run.stopped is not None and "time budget" in run.stopped
    final = FakeClassifier()
    await pairing.score_pending(db, final, catalog, DecisionConfig(), now=now)
    assert [t for _, t in final.calls] == [text_of(7)]
    assert len(await pairs_of(db)) == 7
    # A model that fails on everything: a few failures in a row end the run.
    async with db.transaction() as conn:
        for m in range(20, 27):
            await add_interaction(conn, user=m, version=A, at=T0 + 100 + m, message_id=m,
                                  vote=True, scorer=S)
    broken = FakeClassifier(fail={text_of(m) for m in range(21, 27)})
    run = await pairing.score_pending(db, broken, catalog, DecisionConfig(), now=now)
    assert [t for _, t in broken.calls] == [text_of(m) for m in range(20, 26)]
    assert (run.scored, run.failed) == (1, pairing.MAX_FAILURES_IN_A_ROW)
    assert run.stopped is not None and "in a row" in run.stopped


async def test_a_run_scores_with_one_prompt_then_the_other(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    """Not one prompt switch per text: the runtime keeps a prompt's prefix evaluated."""
    await start_test(db, catalog)
    async with db.transaction() as conn:
        for m in range(1, 7):
            await add_interaction(conn, user=m, version=A if m % 2 else B, at=T0 + 10 * m,
                                  message_id=m, vote=True, scorer=S)
    classifier = FakeClassifier()
    await pairing.score_pending(db, classifier, catalog, DecisionConfig(), now=T0 + 3600)
    # The first text tells the runtime's scorer; then the active arm's texts (scored by the
    # candidate's prompt), then the candidate's, each oldest first.
    assert classifier.calls == [(B, text_of(1)), (B, text_of(3)), (B, text_of(5)),
                                (A, text_of(2)), (A, text_of(4)), (A, text_of(6))]


def test_labels_correspond_by_name_or_by_emoji(catalog: dict[str, PromptVersion]) -> None:
    zh, en = catalog[A], catalog[B]
    assert label_correspondence(zh, en) == {"positive": "正面", "negative": "负面"}
    assert label_correspondence(en, zh) == {"正面": "positive", "负面": "negative"}
    reordered = dataclasses.replace(en, labels=tuple(reversed(en.labels)))
    assert label_correspondence(en, reordered) == {"negative": "negative",
                                                   "positive": "positive"}
    # A third label, or labels without emojis: nothing says which is which.
    three = dataclasses.replace(en, labels=(*en.labels, Label("neutral", "neutral", "😐")))
    assert label_correspondence(zh, three) is None
    bare = dataclasses.replace(en, labels=tuple(Label(lb.name, lb.display) for lb in en.labels))
    assert label_correspondence(zh, bare) is None


# ------------------------------------------------------------------------------ aggregation


async def _paired_history(conn: Connection) -> dict[int, int]:
    """A small history whose paired counts are known (see the test); message id → row id."""
    async def add(m: int, version: str, at: float, vote: bool, **kw: Any) -> None:
        await add_interaction(conn, user=1000 + m, version=version, at=at, message_id=m,
                              vote=vote, **{"scorer": S, **kw})

    h0, h1 = T0 + 60, T0 + 3600 + 60
    # Hour 0, active arm (its verdicts 正面; B's prompt says positive = the same).
    await add(1, A, h0, True, other_label="positive")      # right, other the same
    await add(2, A, h0 + 1, True, other_label="negative")  # right, other wrong
    await add(3, A, h0 + 2, False, other_label="positive")  # wrong, other the same
    await add(4, A, h0 + 3, False, other_label="negative")  # wrong, other right
    await add(5, A, h0 + 4, True)                           # not scored so
    await add(6, A, h0 + 5, True)                           # scored by another scorer
    # Hour 0, candidate arm (its verdicts positive; A's prompt says 正面 = the same).
    await add(7, B, h0 + 6, True, other_label="负面")       # right, other wrong
    await add(8, B, h0 + 7, False, other_label="负面")      # wrong, other right
    await add(9, B, h0 + 8, True, other_label="正面")       # right, other the same
    await add(10, B, h0 + 9, True, other_label="正面", other_version="v0")  # stale version
    await add(12, B, h0 + 10, True, other_label="负面")     # majority wrong, see below
    # Hour 1: one voter's three votes, the daily cap keeps two; a text pasted twice, the
    # per-text cap keeps one; a wrong verdict both prompts get wrong.
    for m in (13, 14, 15):
        await add(m, A, h1 + m, True, voter=50, other_label="negative")
    await add(11, B, h1, False, other_label="正面")
    await add(16, B, h1 + 20, True, other_label="负面")
    await add(17, B, h1 + 21, True, other_label="负面")
    # Made in hour 1, voted on in hour 2: filed in hour 2.
    await add(18, A, h1 + 30, True, vote_at=T0 + 2 * 3600 + 5, other_label="positive")
    ids = {int(r[1]): int(r[0]) for r in await conn.fetchall(
        "SELECT id, message_id FROM interactions")}
    await conn.execute("INSERT INTO paired_labels (interaction_id, version_id, label, scorer,"
                       " created_at) VALUES (?, ?, 'positive', ?, 1.0)",
                       (ids[6], B, OTHER_SCORER))
    for voter, correct in ((61, 0), (62, 0)):  # message 12: 1 right, 2 wrong in its hour
        await conn.execute("INSERT INTO votes (interaction_id, user_id, correct, created_at,"
                           " updated_at) VALUES (?, ?, ?, ?, ?)",
                           (ids[12], voter, correct, h0 + 100, h0 + 100))
    await conn.execute("UPDATE interactions SET text = ? WHERE message_id = 17",
                       (text_of(16),))
    return ids


PAIRED = ("paired_right_a", "paired_right_other_wrong_a", "paired_wrong_a",
          "paired_wrong_other_same_a", "paired_right_b", "paired_right_other_wrong_b",
          "paired_wrong_b", "paired_wrong_other_same_b")


def paired_counts(row: HourStats) -> tuple[int, ...]:
    return tuple(getattr(row, name) for name in PAIRED)


async def test_the_analysis_counts_the_paired_comparison_of_the_counted_observations(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog)
    async with db.transaction() as conn:
        await _paired_history(conn)
    config = DecisionConfig(max_votes_per_user_day=2, max_observations_per_text_day=1)
    (exp,) = await experiment.build_experiments(db, catalog, config, T0 + 3 * 3600 + 60)
    snap = exp.snapshot
    assert snap.paired and snap.two_labels
    by_hour = {s.hour - H0: s for s in snap.strata}
    h0, h1, h2 = by_hour[0], by_hour[1], by_hour[2]
    # Every observation is counted as before; those scored by the other prompt (by the
    # verdict's own scorer, from the other arm's version) are counted again.
    assert (h0.votes_a, h0.correct_a, h0.votes_b, h0.correct_b) == (6, 4, 5, 3)
    assert paired_counts(h0) == (2, 1, 2, 1, 2, 1, 2, 0)
    assert (h1.votes_a, h1.votes_b) == (2, 2)
    assert paired_counts(h1) == (2, 2, 0, 0, 1, 1, 1, 1)
    assert (h2.votes_a, h2.correct_a) == (1, 1)
    assert paired_counts(h2) == (1, 0, 0, 0, 0, 0, 0, 0)
    decision = decide(snap, config)
    assert decision.stats is not None and decision.stats.paired_e is not None

    # Switched off, or prompts whose labels do not correspond: decided on votes alone.
    (off,) = await experiment.build_experiments(
        db, catalog, dataclasses.replace(config, paired_comparison=False), T0 + 3 * 3600)
    three = dataclasses.replace(catalog[B], labels=(
        *catalog[B].labels, Label("neutral", "neutral", "😐")))
    (apart,) = await experiment.build_experiments(db, {**catalog, B: three}, config,
                                                  T0 + 3 * 3600)
    for other in (off.snapshot, apart.snapshot):
        assert not other.paired and not other.two_labels
        assert all(paired_counts(s) == (0,) * 8 for s in other.strata)
    assert decide(off.snapshot, config).stats.paired_e is None  # type: ignore[union-attr]


async def test_the_event_export_carries_labels_and_the_other_prompts_label(
        tmp_path: Path, catalog: dict[str, PromptVersion]) -> None:
    db = await Database.open(tmp_path / "loopbot.db")
    try:
        await start_test(db, catalog)
        async with db.transaction() as conn:
            ids = await _paired_history(conn)
        events = await experiment.replay_events(db, catalog, DecisionConfig(),
                                                T0 + 3 * 3600 + 60)
    finally:
        await db.close()
    verdicts = {e["interaction"]: e for e in events if e["kind"] == "verdict"}
    assert len(verdicts) == 18
    assert all(e["labels"] == 2 for e in verdicts.values())
    assert {e["label"] for e in verdicts.values() if e["arm"] == "active"} == {"正面"}
    assert {e["label"] for e in verdicts.values() if e["arm"] == "candidate"} == {"positive"}
    # In the verdict's own label names, as the engine compares them.
    other = {m: verdicts[ids[m]].get("other_label") for m in ids}
    assert other == {1: "正面", 2: "负面", 3: "正面", 4: "负面", 5: None, 6: None,
                     7: "negative", 8: "negative", 9: "positive", 10: None, 11: "positive",
                     12: "negative", 13: "负面", 14: "负面", 15: "负面", 16: "negative",
                     17: "negative", 18: "正面"}
