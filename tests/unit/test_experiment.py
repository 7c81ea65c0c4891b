"""The engine's I/O half: snapshots read from a real database, decisions written atomically."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from analytics.decide import DecisionConfig, decide
from bot import experiment, experiment_cli, versions
from bot.prompts import PromptVersion, load_directory
from bot.store.db import DB_ERRORS, Database
from bot.store.queries import NewInteraction
from tests.dbfaults import fail_audit_inserts, stop_failing_audit_inserts

ROOT = Path(__file__).resolve().parents[2]
A, B = "v1-zh", "v1-en"
# An hour boundary, so hour indexes in the tests are easy to read.
T0 = 1_700_000_000 // 3600 * 3600
H0 = T0 // 3600


@pytest.fixture(scope="module")
def catalog() -> dict[str, PromptVersion]:
    return load_directory(ROOT / "prompts")


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "loopbot.db")
    yield database
    await database.close()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """Every experiment test runs on SQLite and on PostgreSQL."""
    database = await Database.open(db_url, upgrade=True)
    yield database
    await database.close()


async def start_test(db: Database, catalog: dict[str, PromptVersion], *, share: float = 50.0,
                     at: float = T0) -> None:
    await versions.ensure_active(db, catalog, A, now=at - 3600)
    await versions.set_canary(db, B, share, catalog, actor="admin:1", reason="test",
                              now=at)


# Each version's labels, the first one the verdict add_interaction stores (v1-zh and v1-en
# name them differently; their emojis match them up: bot.prompts.label_correspondence).
LABELS = {A: ("正面", "负面"), B: ("positive", "negative")}


def labels_of(version: str) -> tuple[str, str]:
    return LABELS.get(version, LABELS[B])  # other test versions are copies of v1-en


def text_of(message_id: int) -> str:
    """A text of its own per message (people write different things; equal texts are one
    cluster to the engine)."""
    return "".join(chr(0x4E00 + (message_id * 7919 + k * 104_729) % 20_000) for k in range(8))


async def add_interaction(
    conn: object, *, user: int, version: str, at: float, message_id: int,
    vote: bool | None = None, voter: int | None = None, vote_at: float | None = None,
    latency_ms: float | None = None, reaction: int | None = None,
    reaction_at: float | None = None, scorer: str | None = None,
    other_label: str | None = None, other_version: str | None = None,
) -> None:
    """One verdict row (and its vote / reply reaction) exactly as the bot stores them.

    ``other_label``: the label the other arm's prompt (``other_version``; default: the
    other of A and B) gave the text, as the bot's job stores it (bot.pairing), by the
    verdict's own scorer."""
    from bot.store.db import Connection

    assert isinstance(conn, Connection)
    arm = "active" if version == A else "candidate"
    iid = await conn.insert_id(
        "INSERT INTO interactions (created_at, chat_id, user_id, message_id, text, version_id,"
        " arm, bucket, label, probabilities, reply_latency_ms, scorer)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, '{}', ?, ?)",
        (float(at), user, user, message_id, text_of(message_id), version, arm,
         labels_of(version)[0], latency_ms, scorer))
    if other_label is not None:
        await conn.execute(
            "INSERT INTO paired_labels (interaction_id, version_id, label, scorer, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (iid, other_version or (B if version == A else A), other_label, scorer or "",
             float(at) + 60))
    if vote is not None:
        when = at + 30 if vote_at is None else vote_at
        await conn.execute(
            "INSERT INTO votes (interaction_id, user_id, correct, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?)", (iid, user if voter is None else voter, int(vote),
                                        when, when))
    if reaction is not None:
        when = at + 40 if reaction_at is None else reaction_at
        await conn.execute(
            "INSERT INTO reactions (interaction_id, chat_id, message_id, user_id, kind, emojis,"
            " polarity, updated_at, first_polarity, first_at)"
            " VALUES (?, ?, ?, ?, 'reply', ?, ?, ?, ?, ?)",
            (iid, user, message_id + 1_000_000, user,
             {1: '["👍"]', -1: '["👎"]'}.get(reaction, '["🤔"]'), reaction, when, reaction,
             when))


def other_right(rng: random.Random, own_right: bool, acc_own: float, acc_other: float) -> bool:
    """Whether the other prompt is right on a text, given the served one's verdict: the two
    agree as often as their accuracies allow (the better one is right wherever the worse one
    is), so each keeps its own accuracy."""
    if acc_other >= acc_own:
        return own_right or rng.random() < (acc_other - acc_own) / max(1e-12, 1 - acc_own)
    return own_right and rng.random() < acc_other / acc_own


async def fill(db: Database, *, hours: int, per_hour_a: int, per_hour_b: int, acc_a: float,
               acc_b: float, seed: int = 1, start: float = T0, first_user: int = 10_000,
               scorer_a: str | None = None, scorer_b: str | None = None,
               pairs: bool = True) -> None:
    """``hours`` of traffic from ``start``: every verdict from a new user, who votes on it;
    each arm's verdicts scored by ``scorer_a`` / ``scorer_b`` (None: not recorded).

    ``pairs``: each text also has the label the other arm's prompt gives it (the paired
    comparison's labels, bot.pairing), as right as ``acc_a`` / ``acc_b`` say."""
    rng = random.Random(seed)
    pair_rng = random.Random(seed + 1)  # the votes stay what they were without pairs
    user = first_user
    async with db.transaction() as conn:
        for hour in range(hours):
            for version, n, acc, other_acc, scorer in (
                    (A, per_hour_a, acc_a, acc_b, scorer_a),
                    (B, per_hour_b, acc_b, acc_a, scorer_b)):
                other = labels_of(B if version == A else A)
                for k in range(n):
                    user += 1
                    at = start + hour * 3600 + 60 + k * (3000 / max(n, 1))
                    right = rng.random() < acc
                    # The verdict is the version's first label: the other prompt says the
                    # same (its own first label) when both are right or both wrong.
                    same = other_right(pair_rng, right, acc, other_acc) == right
                    await add_interaction(conn, user=user, version=version, at=at,
                                          message_id=user, vote=right, latency_ms=800.0,
                                          scorer=scorer,
                                          other_label=(other[0] if same else other[1])
                                          if pairs else None)


async def audit_count(db: Database) -> int:
    row = await db.fetchone("SELECT COUNT(*) FROM audit_log")
    assert row is not None
    return int(row[0])


# ------------------------------------------------------------------------------ snapshots


async def test_snapshot_counts_completed_hours_with_capped_votes(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    since = T0 + 600
    await start_test(db, catalog, at=since)
    async with db.transaction() as conn:
        # Before the test started: not part of it.
        await add_interaction(conn, user=1, version=A, at=T0 + 100, message_id=1, vote=True)
        # Hour 0: one user votes 12 times on the active arm; the daily cap keeps 10.
        for k in range(12):
            await add_interaction(conn, user=5, version=A, at=since + 10 + k, message_id=10 + k,
                                  vote=k % 2 == 0, latency_ms=1000.0)
        await add_interaction(conn, user=6, version=B, at=since + 100, message_id=30,
                              vote=True, latency_ms=3000.0, reaction=-1)
        await add_interaction(conn, user=7, version=B, at=since + 200, message_id=31,
                              reaction=0)
        # Hour 1: user 6 again (not new), a vote cast in hour 2 on an hour-1 verdict, a 👍.
        await add_interaction(conn, user=6, version=B, at=T0 + 3600 + 5, message_id=32,
                              vote=False, vote_at=T0 + 2 * 3600 + 5)
        await add_interaction(conn, user=8, version=A, at=T0 + 3600 + 9, message_id=33,
                              reaction=1)
        # The current hour (3) is still open: ignored.
        await add_interaction(conn, user=9, version=B, at=T0 + 3 * 3600 + 1, message_id=34,
                              vote=True)
    cfg = DecisionConfig(max_votes_per_user_day=10)
    (exp,) = await experiment.build_experiments(db, catalog, cfg, T0 + 3 * 3600 + 1800)
    snap = exp.snapshot
    assert (snap.start_hour, snap.now_hour, snap.active_id, snap.candidate_id) == (
        H0, H0 + 3, A, B)
    assert snap.planned_share == 0.5 and snap.concurrent_candidates == 1
    assert not snap.content_changed
    by_hour = {s.hour - H0: s for s in snap.strata}
    assert sorted(by_hour) == [0, 1, 2]
    h0, h1, h2 = by_hour[0], by_hour[1], by_hour[2]
    assert (h0.votes_a, h0.correct_a, h0.votes_b, h0.correct_b) == (10, 5, 1, 1)
    assert (h0.served_a, h0.served_b, h0.new_users_a, h0.new_users_b) == (12, 2, 1, 2)
    assert (h0.up_b, h0.down_b, h0.up_a, h0.down_a) == (0, 1, 0, 0)
    assert (h0.latency_n_a, h0.latency_n_b) == (12, 1)
    assert h0.latency_sum_a == pytest.approx(12.0) and h0.latency_sum_b == pytest.approx(3.0)
    assert h0.planned_share == pytest.approx(0.5)
    assert (h1.served_a, h1.served_b, h1.new_users_a, h1.new_users_b) == (1, 1, 1, 0)
    assert (h1.votes_a, h1.votes_b, h1.up_a) == (0, 0, 1)
    assert (h2.votes_b, h2.correct_b, h2.served_b) == (1, 0, 0)


async def test_a_reaction_changed_after_its_hour_closed_stays_in_that_hour(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    from bot.store.queries import Store

    await start_test(db, catalog)
    store = Store(db)
    inter, _ = await store.insert_interaction(NewInteraction(
        chat_id=5, user_id=5, message_id=1, text="hi", version_id=B, arm="candidate",
        bucket=1, label="positive", probabilities={"positive": 0.9, "negative": 0.1},
        created_at=T0 + 60))
    await store.add_bot_messages(inter.id, 5, "reply", [2])
    await store.set_reaction(inter.id, 5, 2, 5, "reply", ["👎"], -1, now=T0 + 120)

    async def hour0() -> tuple[int, int]:
        (exp,) = await experiment.build_experiments(db, catalog, DecisionConfig(),
                                                    T0 + 3 * 3600)
        first = next(s for s in exp.snapshot.strata if s.hour == H0)
        return first.up_b, first.down_b

    assert await hour0() == (0, 1)
    # Two hours later the user switches to 👍, then takes it back: hour 0 does not change.
    await store.set_reaction(inter.id, 5, 2, 5, "reply", ["👍"], 1, now=T0 + 2 * 3600)
    await store.set_reaction(inter.id, 5, 2, 5, "reply", [], 0, now=T0 + 2 * 3600 + 60)
    assert await hour0() == (0, 1)


async def test_share_timeline_follows_the_ramp(db: Database,
                                               catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog, share=10, at=T0)
    await versions.set_canary(db, B, 50, catalog, actor="engine", reason="ramp",
                              now=T0 + 6 * 3600)
    timeline = experiment.ShareTimeline.from_audit(await versions.audit_log(db))
    assert timeline.share_at(B, T0 - 1) == 0.0
    assert timeline.share_at(B, T0 + 3600) == pytest.approx(0.1)
    assert timeline.share_at(B, T0 + 7 * 3600) == pytest.approx(0.5)
    assert timeline.share_at(A, T0 + 7 * 3600) == 0.0


# ------------------------------------------------------------------------------ decisions


async def test_engine_promotes_a_better_candidate_with_one_audit_entry(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog)
    await fill(db, hours=30, per_hour_a=20, per_hour_b=20, acc_a=0.70, acc_b=0.95)
    before = await audit_count(db)
    (out,) = await experiment.analyze(db, catalog, DecisionConfig(), now=T0 + 30 * 3600 + 60)
    assert out.action == "promote" and out.applied and out.error is None
    assert await audit_count(db) == before + 1
    state = await versions.load(db)
    assert state.active is not None and state.active.version_id == B
    assert state.active.replaced == A and not state.candidates
    (entry,) = await versions.audit_log(db, limit=1)
    assert (entry.action, entry.version_id, entry.actor, entry.id) == (
        "promote", B, "engine", out.audit_id)
    assert entry.stats["decision"] == "promote" and entry.stats["e_plus"] >= 500
    assert entry.stats["votes_b"] >= 100
    # The admin message carries the numbers behind the decision.
    assert "E⁺" in out.message and f"{entry.stats['votes_b']} verdicts" in out.message
    # Nothing left to decide: a second run writes nothing.
    assert await experiment.analyze(db, catalog, DecisionConfig(),
                                    now=T0 + 30 * 3600 + 120) == []
    assert await audit_count(db) == before + 1


async def test_a_decision_on_a_test_an_admin_changed_meanwhile_is_not_applied(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog)
    await fill(db, hours=30, per_hour_a=20, per_hour_b=20, acc_a=0.70, acc_b=0.95)
    now = T0 + 30 * 3600 + 60
    (exp,) = await experiment.build_experiments(db, catalog, DecisionConfig(), now)
    decision = decide(exp.snapshot, DecisionConfig())
    assert decision.action == "promote"
    # Between the engine's snapshot and its write, an admin ends the test by hand.
    await versions.retire(db, B, actor="admin:1", reason="by hand", now=now + 1)
    before = await audit_count(db)
    assert await experiment.apply_decision(db, exp, decision, catalog, reason="test",
                                          now=now + 2) is None
    assert await audit_count(db) == before
    state = await versions.load(db)
    assert state.active is not None and state.active.version_id == A


async def test_engine_reverts_a_worse_candidate_and_keeps_the_active(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog)
    # A revert on accuracy waits min_revert_hours (84 h by default).
    await fill(db, hours=90, per_hour_a=20, per_hour_b=20, acc_a=0.90, acc_b=0.55)
    before = await audit_count(db)
    (out,) = await experiment.analyze(db, catalog, DecisionConfig(), now=T0 + 90 * 3600 + 60)
    assert out.action == "revert" and out.applied
    assert await audit_count(db) == before + 1
    state = await versions.load(db)
    assert state.active is not None and state.active.version_id == A
    retired = state.get(B)
    assert retired is not None and retired.state == versions.RETIRED and retired.share == 0
    (entry,) = await versions.audit_log(db, limit=1)
    assert entry.action == "retire" and entry.stats["decision"] == "revert"
    assert entry.reason.startswith("revert: ")


async def test_sample_ratio_guard_freezes_a_broken_split(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog)  # planned 50/50 ...
    # ... but only a quarter of the new users reach the candidate; accuracy is equal.
    await fill(db, hours=20, per_hour_a=30, per_hour_b=10, acc_a=0.8, acc_b=0.8)
    (out,) = await experiment.analyze(db, catalog, DecisionConfig(), now=T0 + 20 * 3600 + 60)
    assert (out.action, out.decision.rule, out.applied) == ("freeze", "srm", True)
    assert out.decision.stats is not None
    assert out.decision.stats.srm_observed_share == pytest.approx(0.25)
    assert out.decision.stats.srm_expected_share == pytest.approx(0.5)
    assert "25.0% of the new users of the two arms went to v1-en, the plan expects 50.0%" in (
        out.message)
    state = await versions.load(db)
    frozen = state.get(B)
    assert frozen is not None and frozen.state == versions.RETIRED and frozen.share == 0
    assert state.active is not None and state.active.version_id == A
    (entry,) = await versions.audit_log(db, limit=1)
    assert entry.stats["decision"] == "freeze" and "sample-ratio" in entry.reason


async def test_a_healthy_split_is_not_frozen(db: Database,
                                             catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog)
    await fill(db, hours=20, per_hour_a=20, per_hour_b=20, acc_a=0.8, acc_b=0.8)
    before = await audit_count(db)
    (out,) = await experiment.analyze(db, catalog, DecisionConfig(), now=T0 + 20 * 3600 + 60)
    assert out.action == "hold" and not out.applied and not out.notable
    assert "E⁺" in out.message
    assert await audit_count(db) == before


GGUF = "gguf:qwen2.5-0.5b-instruct-q8_0.gguf:1a2b3c4d5e6f7a8b"
REMOTE = "remote:qwen2.5-7b-instruct"


async def test_arms_scored_by_different_scorers_are_not_decided_and_the_admins_told_why(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog)
    # Data that promotes (see test_engine_promotes_...), but B was scored by another model.
    await fill(db, hours=30, per_hour_a=20, per_hour_b=20, acc_a=0.70, acc_b=0.95,
               scorer_a=GGUF, scorer_b=REMOTE)
    before = await audit_count(db)
    (out,) = await experiment.analyze(db, catalog, DecisionConfig(), now=T0 + 30 * 3600 + 60)
    assert (out.action, out.decision.rule, out.applied) == ("hold", "scorer_mismatch", False)
    assert out.notable and out.tell_once == (B, A, H0, "scorer_mismatch")
    assert await audit_count(db) == before
    state = await versions.load(db)
    assert state.active is not None and state.active.version_id == A
    assert [(c.version_id, c.share) for c in state.candidates] == [(B, 0.5)]
    n_a, n_b = out.observations
    assert out.scorers == ({GGUF: n_a}, {REMOTE: n_b}) and n_a > 100 and n_b > 100
    assert out.message.startswith(f"🤖 {B} vs {A}: HOLD\n")
    assert (f"{A}'s {n_a} verdicts with feedback were scored by {GGUF}; {B}'s {n_b} verdicts "
            f"with feedback were scored by {REMOTE}. Verdict probabilities from different "
            "scorers") in out.message
    assert f"/retire {B} and /canary {B} <percent> to start a fresh test" in out.message
    assert out.to_json()["scorers"] == {"active": {GGUF: n_a}, "candidate": {REMOTE: n_b}}


async def test_arms_scored_by_one_scorer_are_decided_as_before(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog)
    await fill(db, hours=30, per_hour_a=20, per_hour_b=20, acc_a=0.70, acc_b=0.95,
               scorer_a=GGUF, scorer_b=GGUF)
    (out,) = await experiment.analyze(db, catalog, DecisionConfig(), now=T0 + 30 * 3600 + 60,
                                      apply=False)
    assert (out.action, out.decision.rule) == ("promote", "evidence_better")
    assert out.tell_once is None
    assert out.to_json()["scorers"] == {"active": {GGUF: out.observations[0]},
                                        "candidate": {GGUF: out.observations[1]}}


@pytest.mark.parametrize("later", [None, GGUF, REMOTE])
async def test_verdicts_stored_before_scorers_were_recorded_are_one_scorer_unrecorded(
        db: Database, catalog: dict[str, PromptVersion], later: str | None) -> None:
    await start_test(db, catalog)
    # 15 hours stored before the upgrade (scorer NULL), then 15 hours after it.
    await fill(db, hours=15, per_hour_a=20, per_hour_b=20, acc_a=0.70, acc_b=0.95)
    await fill(db, hours=15, per_hour_a=20, per_hour_b=20, acc_a=0.70, acc_b=0.95,
               start=T0 + 15 * 3600, first_user=500_000, scorer_a=later, scorer_b=later)
    (out,) = await experiment.analyze(db, catalog, DecisionConfig(), now=T0 + 30 * 3600 + 60,
                                      apply=False)
    active, candidate = out.scorers
    if later is None:
        # All of it unrecorded: one scorer in both arms, decided as before.
        assert (dict(active), dict(candidate)) == ({"unrecorded": out.observations[0]},
                                                   {"unrecorded": out.observations[1]})
        assert out.action == "promote"
    elif later == GGUF:
        # The upgrade that started recording the in-process scorer: the same scorer.
        assert set(active) == set(candidate) == {"unrecorded", GGUF}
        assert out.action == "promote"
    else:
        # Moved to a server in the middle of the test: not comparable.
        assert set(active) == set(candidate) == {"unrecorded", REMOTE}
        assert (out.action, out.decision.rule) == ("hold", "scorer_mismatch")
        assert "unrecorded (" in out.message and f"{REMOTE} (" in out.message
        assert '. "unrecorded": verdicts stored before loopbot recorded scorers. ' in out.message


async def test_ramp_keeps_the_test_and_is_applied_once(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog, share=10)
    await fill(db, hours=8, per_hour_a=18, per_hour_b=2, acc_a=0.8, acc_b=0.8)
    now = T0 + 8 * 3600 + 60
    plan = DecisionConfig(ramp_shares=[0.1, 0.5], ramp_after_hours=[0.0, 6.0])
    (out,) = await experiment.analyze(db, catalog, plan, now=now)
    assert (out.action, out.decision.new_share, out.applied) == ("ramp", 0.5, True)
    state = await versions.load(db)
    (cand,) = state.candidates
    assert (cand.share, cand.since) == (0.5, T0)
    (entry,) = await versions.audit_log(db, limit=1)
    assert (entry.action, entry.share, entry.stats["decision"]) == ("canary", 0.5, "ramp")
    count = await audit_count(db)
    (again,) = await experiment.analyze(db, catalog, plan, now=now + 60)
    assert again.action == "hold" and await audit_count(db) == count


async def test_an_edited_candidate_restarts_its_test(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    import dataclasses

    await start_test(db, catalog)
    await fill(db, hours=3, per_hour_a=5, per_hour_b=5, acc_a=0.8, acc_b=0.8)
    edited = {**catalog, B: dataclasses.replace(catalog[B], content_hash="edited")}
    now = T0 + 3 * 3600 + 60
    (out,) = await experiment.analyze(db, edited, DecisionConfig(), now=now)
    assert out.decision.restart and out.applied and out.notable
    (cand,) = (await versions.load(db)).candidates
    assert (cand.since, cand.content_hash) == (now, "edited")
    # The old votes are about the old prompt: the new test has no completed hour yet.
    (exp,) = await experiment.build_experiments(db, edited, DecisionConfig(), now + 60)
    assert exp.snapshot.strata == ()


async def test_two_candidates_split_the_traffic_and_a_promotion_restarts_the_other(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    import dataclasses

    cat = {**catalog, "v2": dataclasses.replace(catalog[B], id="v2", content_hash="h-v2")}
    await start_test(db, cat, share=30)
    await versions.set_canary(db, "v2", 30, cat, actor="admin:1", reason="test", now=T0)
    # New users per hour: 8 active, 6 each candidate, as the 40/30/30 split plans.
    await fill(db, hours=30, per_hour_a=8, per_hour_b=6, acc_a=0.6, acc_b=0.98)
    async with db.transaction() as conn:
        for hour in range(30):
            for k in range(6):
                user = 900_000 + 10 * hour + k
                await add_interaction(conn, user=user, version="v2", at=T0 + hour * 3600 + k,
                                      message_id=user, vote=k % 4 != 0)
    now = T0 + 30 * 3600 + 60
    exp_b, _ = await experiment.build_experiments(db, cat, DecisionConfig(), now)
    assert exp_b.snapshot.concurrent_candidates == 2
    # Within "active or v1-en" a user lands on v1-en with probability 0.3 / 0.7.
    assert {round(s.planned_share, 6) for s in exp_b.snapshot.strata} == {round(3 / 7, 6)}

    out_b, out_c = await experiment.analyze(db, cat, DecisionConfig(), now=now)
    assert (out_b.candidate_id, out_b.action, out_b.applied) == (B, "promote", True)
    # Two candidates: each gets half the error budget.
    assert out_b.decision.stats is not None
    assert out_b.decision.stats.promote_threshold == pytest.approx(
        2 / DecisionConfig().alpha_promote_sequential)
    # v2 was compared with v1-zh: against the new active version its test starts now.
    assert (out_c.candidate_id, out_c.active_id, out_c.action) == ("v2", B, "hold")
    assert out_c.snapshot is not None and out_c.snapshot.strata == ()
    state = await versions.load(db)
    assert state.active is not None and state.active.version_id == B
    assert [c.version_id for c in state.candidates] == ["v2"]


async def test_the_error_budget_stays_split_after_a_second_candidate_ends(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    import dataclasses

    cat = {**catalog, "v2": dataclasses.replace(catalog[B], id="v2", content_hash="h-v2")}
    await start_test(db, cat, share=30)
    await versions.set_canary(db, "v2", 30, cat, actor="admin:1", reason="test", now=T0 + 60)
    await versions.retire(db, "v2", actor="admin:1", reason="done", now=T0 + 5 * 3600)
    (exp,) = await experiment.build_experiments(db, cat, DecisionConfig(), T0 + 9 * 3600)
    # Earlier looks were taken with two candidates: the split must not loosen afterwards.
    assert exp.snapshot.concurrent_candidates == 2


async def _two_candidates_then_one_retired(
        db: Database, cat: dict[str, PromptVersion], *, users_come_back: bool) -> float:
    """40/30/30 for 30 h, exactly as planned; then v2 is retired. Returns ``now``."""
    await start_test(db, cat, share=30)
    await versions.set_canary(db, "v2", 30, cat, actor="admin:1", reason="test", now=T0)
    await fill(db, hours=30, per_hour_a=8, per_hour_b=6, acc_a=0.8, acc_b=0.8)
    v2_users = [900_000 + 20 * hour + k for hour in range(30) for k in range(6)]
    async with db.transaction() as conn:
        for n, user in enumerate(v2_users):
            await add_interaction(conn, user=user, version="v2",
                                  at=T0 + (n // 6) * 3600 + n % 6, message_id=user, vote=True)
    await versions.retire(db, "v2", actor="admin:1", reason="done", now=T0 + 30 * 3600)
    if users_come_back:
        # v2's users return; routing now sends every one of them to the active version.
        async with db.transaction() as conn:
            for n, user in enumerate(v2_users):
                await add_interaction(conn, user=user, version=A,
                                      at=T0 + 30 * 3600 + 600 + 30 * n,
                                      message_id=2_000_000 + user, vote=True)
    await fill(db, hours=3, per_hour_a=10, per_hour_b=4, acc_a=0.8, acc_b=0.8,
               start=T0 + 30 * 3600, first_user=500_000)
    return T0 + 33 * 3600 + 60


@pytest.mark.parametrize("users_come_back", [False, True])
async def test_retiring_one_candidate_does_not_break_the_others_split(
        db: Database, catalog: dict[str, PromptVersion], users_come_back: bool) -> None:
    import dataclasses

    cat = {**catalog, "v2": dataclasses.replace(catalog[B], id="v2", content_hash="h-v2")}
    now = await _two_candidates_then_one_retired(db, cat, users_come_back=users_come_back)
    (exp,) = await experiment.build_experiments(db, cat, DecisionConfig(), now)
    shares = {s.hour - H0: s.planned_share for s in exp.snapshot.strata}
    # While v2 ran, P(v1-en | active or v1-en) was 0.3 / 0.7; afterwards it is 0.3.
    assert shares[29] == pytest.approx(3 / 7) and shares[31] == pytest.approx(0.3)
    # v2's returning users are not new users: their buckets are not a fair draw any more.
    assert sum(s.new_users_a + s.new_users_b for s in exp.snapshot.strata) == 30 * 14 + 3 * 14
    decision = decide(exp.snapshot, DecisionConfig())
    assert decision.rule != "srm"
    assert decision.stats is not None and decision.stats.srm_e < 10


async def test_a_ramp_is_capped_where_the_next_candidates_range_begins(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    import dataclasses

    cat = {**catalog, "v2": dataclasses.replace(catalog[B], id="v2", content_hash="h-v2")}
    await start_test(db, cat, share=10)
    # A layout from before candidates were placed apart: v2 right after v1-en's range.
    await versions.set_canary(db, "v2", 10, cat, actor="admin:1", reason="test", now=T0)
    async with db.transaction() as conn:
        await conn.execute("UPDATE prompt_versions SET range_start = 1500 WHERE id = 'v2'")
    await fill(db, hours=8, per_hour_a=16, per_hour_b=2, acc_a=0.8, acc_b=0.8)
    (out_b, _) = await experiment.analyze(db, cat, DecisionConfig(), now=T0 + 8 * 3600 + 60)
    assert out_b.snapshot is not None and out_b.snapshot.max_share == pytest.approx(0.15)
    # The plan wants 1/3; routing has room for 15%: the ramp goes there, without an error.
    assert (out_b.action, out_b.decision.new_share, out_b.error) == ("ramp", 0.15, None)
    (again, _) = await experiment.analyze(db, cat, DecisionConfig(), now=T0 + 9 * 3600 + 60)
    assert again.action == "hold" and again.error is None and not again.notable


async def test_an_admins_share_change_makes_the_engines_snapshot_stale(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await start_test(db, catalog, share=10)
    await fill(db, hours=8, per_hour_a=18, per_hour_b=2, acc_a=0.8, acc_b=0.8)
    now = T0 + 8 * 3600 + 60
    (exp,) = await experiment.build_experiments(db, catalog, DecisionConfig(), now)
    decision = decide(exp.snapshot, DecisionConfig())
    assert decision.action == "ramp"
    # Between the snapshot and the write, an admin sets the share by hand.
    await versions.set_canary(db, B, 5, catalog, actor="admin:1", reason="slower", now=now + 1)
    before = await audit_count(db)
    assert await experiment.apply_decision(db, exp, decision, catalog, reason="test",
                                          now=now + 2) is None
    assert await audit_count(db) == before
    (cand,) = (await versions.load(db)).candidates
    assert cand.share == pytest.approx(0.05)


async def test_dry_run_and_cli_report_without_writing(
        tmp_path: Path, sqlite_db: Database, catalog: dict[str, PromptVersion],
        capsys: pytest.CaptureFixture[str]) -> None:
    db = sqlite_db  # the command line reads the SQLite file by path
    await start_test(db, catalog)
    await fill(db, hours=30, per_hour_a=20, per_hour_b=20, acc_a=0.70, acc_b=0.95)
    now = T0 + 30 * 3600 + 60
    before = await audit_count(db)
    (dry,) = await experiment.analyze(db, catalog, DecisionConfig(), now=now, apply=False)
    assert dry.action == "promote" and not dry.applied and "dry run" in dry.message
    await db.close()

    parser = argparse.ArgumentParser()
    experiment_cli.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", "--db", str(db.path), "--json", "--dry-run",
                              "--at", str(now)])
    assert await asyncio.to_thread(args.func, args) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["outcomes"]
    assert (row["candidate"], row["action"], row["applied"]) == (B, "promote", False)
    assert row["stats"] == dry.decision.stats_json()
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == before

    args = parser.parse_args(["analyze", "--db", str(db.path), "--at", str(now)])
    assert await asyncio.to_thread(args.func, args) == 0
    assert "PROMOTE" in capsys.readouterr().out
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == before + 1
        assert conn.execute("SELECT id FROM prompt_versions WHERE state = 'active'"
                            ).fetchall() == [(B,)]


async def test_the_cli_leaves_restarts_for_edited_files_to_the_bot(
        tmp_path: Path, sqlite_db: Database, catalog: dict[str, PromptVersion],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    db = sqlite_db  # the command line reads the SQLite file by path
    import shutil

    await start_test(db, catalog)
    await fill(db, hours=3, per_hour_a=5, per_hour_b=5, acc_a=0.8, acc_b=0.8)
    now = T0 + 3 * 3600 + 60
    before = await audit_count(db)
    await db.close()
    # The prompt files on disk were edited; the running bot still serves what it loaded.
    prompts = tmp_path / "prompts"
    shutil.copytree(ROOT / "prompts", prompts)
    edited = prompts / f"{B}.yaml"
    edited.write_text(edited.read_text(encoding="utf-8").replace(
        "Answer with one word", "Reply with one word"), encoding="utf-8")
    monkeypatch.setenv("LOOPBOT_PROMPTS", str(prompts))
    parser = argparse.ArgumentParser()
    experiment_cli.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", "--db", str(db.path), "--at", str(now)])
    assert await asyncio.to_thread(args.func, args) == 0
    assert "not applied here: the file on disk is not what the bot serves" in (
        capsys.readouterr().out)
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == before

    # The bot, once it serves the edited file, restarts the test with the numbers behind it.
    reopened = await Database.open(db.path)
    try:
        served = load_directory(prompts)
        (out,) = await experiment.analyze(reopened, served, DecisionConfig(), now=now)
        assert out.decision.restart and out.applied
        (entry,) = await versions.audit_log(reopened, limit=1)
        assert entry.action == "restart" and entry.stats["rule"] == "restart"
        assert entry.stats["now_hour"] == H0 + 3
    finally:
        await reopened.close()


async def test_the_cli_refuses_to_apply_decisions_in_the_past(
        sqlite_db: Database, catalog: dict[str, PromptVersion],
        capsys: pytest.CaptureFixture[str]) -> None:
    db = sqlite_db  # the command line reads the SQLite file by path
    await start_test(db, catalog)
    await fill(db, hours=30, per_hour_a=20, per_hour_b=20, acc_a=0.70, acc_b=0.95)
    await db.close()
    parser = argparse.ArgumentParser()
    experiment_cli.register(parser.add_subparsers())
    past = T0 - 10
    args = parser.parse_args(["analyze", "--db", str(db.path), "--at", str(past)])
    assert await asyncio.to_thread(args.func, args) == 2
    assert "before the last recorded version change" in capsys.readouterr().err
    args = parser.parse_args(["analyze", "--db", str(db.path), "--at", str(past), "--dry-run"])
    assert await asyncio.to_thread(args.func, args) == 0


# ------------------------------------------------------------------------------ atomicity


async def _inject_audit_failure(db: Database) -> None:
    # A failure between the state write and the audit write of the same transaction.
    await fail_audit_inserts(db)


async def _state_rows(db: Database) -> list[tuple[object, ...]]:
    return [tuple(r) for r in await db.fetchall("SELECT * FROM prompt_versions ORDER BY id")]


@pytest.mark.parametrize("change", ["promote", "revert", "rollback"])
async def test_a_crash_between_state_and_audit_leaves_one_consistent_state(
        db: Database, catalog: dict[str, PromptVersion], change: str) -> None:
    await start_test(db, catalog)
    better = change != "revert"
    hours = 30 if better else 90  # a revert on accuracy waits min_revert_hours
    await fill(db, hours=hours, per_hour_a=20, per_hour_b=20, acc_a=0.70 if better else 0.9,
               acc_b=0.95 if better else 0.55)
    now = T0 + hours * 3600 + 60
    if change == "rollback":
        await experiment.analyze(db, catalog, DecisionConfig(), now=now)
    rows, count = await _state_rows(db), await audit_count(db)

    await _inject_audit_failure(db)
    if change == "rollback":
        with pytest.raises(DB_ERRORS, match="injected crash"):
            await versions.rollback(db, catalog, actor="admin:1", reason="/rollback")
    else:
        (out,) = await experiment.analyze(db, catalog, DecisionConfig(), now=now)
        assert out.action == change and not out.applied
        assert out.error is not None and "injected crash" in out.error
        assert "NOT applied" in out.message
    assert await _state_rows(db) == rows and await audit_count(db) == count

    await stop_failing_audit_inserts(db)
    if change == "rollback":
        await versions.rollback(db, catalog, actor="admin:1", reason="/rollback")
        expected_active = A
    else:
        (out,) = await experiment.analyze(db, catalog, DecisionConfig(), now=now)
        assert out.applied
        expected_active = B if change == "promote" else A
    assert await audit_count(db) == count + 1
    state = await versions.load(db)
    assert state.active is not None and state.active.version_id == expected_active
    assert not state.candidates


_CHURN = textwrap.dedent("""
    import asyncio, sys
    from analytics.decide import Action, Decision, DecisionConfig, Rule
    from bot import experiment, versions
    from bot.prompts import load_directory
    from bot.store.db import Database

    async def main(path, prompts):
        catalog = load_directory(prompts)
        db = await Database.open(path)
        await versions.ensure_active(db, catalog, "v1-zh", now=1.0)
        i = 0
        while True:
            i += 1
            now = 1000.0 * i
            await versions.set_canary(db, "v1-en", 50, catalog, actor="t", reason="c", now=now)
            (exp,) = await experiment.build_experiments(db, catalog, DecisionConfig(), now)
            action = (Action.PROMOTE, Action.REVERT, Action.FREEZE, Action.RAMP)[i % 4]
            decision = Decision(action=action, rule=Rule.COLLECTING, elapsed_hours=i,
                                new_share=0.6 if action == "ramp" else None)
            await experiment.apply_decision(db, exp, decision, catalog, reason="churn",
                                            now=now + 1)
            if action == "promote":
                await versions.rollback(db, catalog, actor="t", reason="back", now=now + 2)
            elif action == "ramp":
                await versions.retire(db, "v1-en", actor="t", reason="end", now=now + 2)
            print(i, flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def _replay(entries: list[tuple[str, str, str, float, str | None]]) -> dict[str, tuple[str, float]]:
    state: dict[str, tuple[str, float]] = {}
    for action, version_id, to_state, share, previous in entries:
        if action in ("promote", "rollback") and previous:
            state[previous] = (versions.RETIRED, 0.0)
        state[version_id] = (to_state, share if to_state == versions.CANDIDATE else 0.0)
    return state


def test_kill_9_during_decisions_leaves_state_matching_the_audit_log(tmp_path: Path) -> None:
    """A real crash: the process applying decisions is SIGKILLed at a random moment."""
    path = tmp_path / "churn.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHURN, str(path), str(ROOT / "prompts")],
                             stdout=subprocess.PIPE, env=env, cwd=ROOT)
    assert child.stdout is not None
    try:
        deadline = time.monotonic() + 30
        while int(child.stdout.readline() or b"0") < 5:
            assert time.monotonic() < deadline and child.poll() is None, "child stalled"
        time.sleep(random.Random().uniform(0.0, 0.05))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        entries = conn.execute("SELECT action, version_id, to_state, share, previous_active"
                               " FROM audit_log ORDER BY id").fetchall()
        table = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT id, state, share FROM prompt_versions")}
        engine = conn.execute("SELECT stats FROM audit_log WHERE actor = 'engine'").fetchall()
    assert len(entries) >= 10
    assert table == _replay(entries)
    assert list(table.values()).count((versions.ACTIVE, 0.0)) == 1
    assert all("decision" in json.loads(s) for (s,) in engine)
