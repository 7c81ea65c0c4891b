"""The experiment job in the running bot: PTB's real JobQueue, a real database, the fake Bot API.

One database file filled with 30 hours of votes for two arms is copied: the bot's scheduled job
runs on one copy, ``loopbot analyze`` on the other, both pinned to the same clock (so an hour
boundary between the two runs cannot change the elapsed hours), and they must write the same
decision. The newest voted verdicts are not yet scored by the other arm's prompt: the job
scores them with the bot's model before it decides (the paired comparison), and the command
line reads the labels the job stored.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from bot import experiment, experiment_cli, versions
from bot.devtools.fakebotapi import FakeBotAPI
from bot.llm.runtime import local_scorer_id
from bot.prompts import load_directory
from bot.store.db import Database
from bot.telegram import jobs
from tests.e2e.botharness import ADMIN_ID, ROOT, BotHarness
from tests.unit.test_experiment import B, fill, start_test

HOURS = 30
# Voted verdicts the job scores with the other arm's prompt before it decides (a few: the tiny
# model sometimes re-evaluates a prompt's prefix, ~0.6 s, and the first run must be quick).
UNSCORED = 10


async def promotable_test(db: Database, now: float, scorer: str | None = None) -> None:
    """A test of B against the active version, started HOURS ago, with the evidence that
    makes the engine promote B at its next look (verdicts made by ``scorer``)."""
    catalog = load_directory(ROOT / "prompts")
    start = (int(now // 3600) - HOURS) * 3600.0
    await start_test(db, catalog, at=start)
    await fill(db, hours=HOURS, per_hour_a=20, per_hour_b=20, acc_a=0.70, acc_b=0.95,
               start=start, scorer_a=scorer, scorer_b=scorer)


async def _prepare(path: Path, now: float, scorer: str) -> list[tuple[int, str]]:
    """The promotable test, its verdicts made by the bot's model (``scorer``); the newest
    are left for the job to score. Returns those: (interaction, its version)."""
    db = await Database.open(path)
    try:
        await promotable_test(db, now, scorer)
        unscored = sorted((int(r[0]), str(r[1])) for r in await db.fetchall(
            "SELECT id, version_id FROM interactions ORDER BY created_at DESC, id DESC"
            f" LIMIT {UNSCORED}"))
        async with db.transaction() as conn:
            await conn.executemany("DELETE FROM paired_labels WHERE interaction_id = ?",
                                   [(i,) for i, _ in unscored])
        # The first runs of the job fail between the state write and the audit write.
        await db.fetchall("CREATE TRIGGER fail_audit BEFORE INSERT ON audit_log"
                          " BEGIN SELECT RAISE(ABORT, 'injected crash'); END")
    finally:
        await db.close()
    return unscored


def _audit(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT at, actor, action, version_id, from_state, to_state, share,"
                            " previous_active, reason, stats FROM audit_log ORDER BY id"
                            ).fetchall()


def _admin_texts(api: FakeBotAPI) -> list[str]:
    return [c.params["text"] for c in api.calls_to("sendMessage", chat_id=str(ADMIN_ID))]


def test_scheduled_job_decides_messages_admins_and_matches_loopbot_analyze(
        fake_api: FakeBotAPI, tiny_gguf: Path, tmp_path: Path) -> None:
    now = time.time()
    job_db, cli_db = tmp_path / "job.db", tmp_path / "cli.db"
    scorer = local_scorer_id(tiny_gguf)
    unscored = asyncio.run(_prepare(job_db, now, scorer))
    assert len(unscored) == UNSCORED and {v for _, v in unscored} == {"v1-zh", B}
    shutil.copyfile(job_db, cli_db)
    with sqlite3.connect(cli_db) as conn:
        conn.execute("DROP TRIGGER fail_audit")
    before = len(_audit(job_db))

    harness = BotHarness(fake_api, tiny_gguf, job_db,
                         overrides={"experiment.interval_minutes": 0.01})  # every 0.6 s
    harness.app.bot_data.post_init_hooks = [
        functools.partial(jobs.schedule_experiment_job, first=0.2, clock=lambda: now)]
    harness.start()
    try:
        # A failed write is reported and the job keeps running.
        fake_api.wait_for(lambda: any("NOT applied" in t for t in _admin_texts(fake_api)))
        assert len(_audit(job_db)) == before
        assert harness.query("SELECT id FROM prompt_versions WHERE state = 'active'") == [
            ("v1-zh",)]
        # /stats shows the running test: arms, evidence and the engine's next step.
        fake_api.send_text(fake_api.user(ADMIN_ID, "en"), "/stats")
        stats = fake_api.wait_for(lambda: [t for t in _admin_texts(fake_api)
                                           if t.startswith("📊 /stats")])[0]
        assert f"🧪 {B} vs v1-zh" in stats and "E⁺ = " in stats
        assert "next: promote: candidate better" in stats
        fake_api.wait_calls("sendPhoto", chat_id=str(ADMIN_ID))

        with sqlite3.connect(job_db) as conn:
            conn.execute("DROP TRIGGER fail_audit")
        promoted = fake_api.wait_for(lambda: [t for t in _admin_texts(fake_api)
                                              if "PROMOTE" in t and "NOT applied" not in t])
        # Later runs (every 0.6 s) find no candidate and stay silent.
        time.sleep(1.5)
    finally:
        harness.stop()

    (message,) = promoted
    assert "E⁺ = " in message and "verdicts" in message and "→ v1-en now serves everyone" in message
    assert sum("PROMOTE" in t and "NOT applied" not in t for t in _admin_texts(fake_api)) == 1
    job_entries = _audit(job_db)[before:]
    assert [(e[1], e[2], e[3]) for e in job_entries] == [("engine", "promote", B)]
    # Decided on the paired comparison: both prompts on every voted text.
    decided = json.loads(job_entries[0][-1])
    assert decided["paired_e"] is not None
    assert decided["paired_e"] >= decided["promote_threshold"] and decided["paired_z"] > 0
    # The job scored the newest voted verdicts with the other arm's prompt, through the bot's
    # model (its scorer), once each.
    with sqlite3.connect(job_db) as conn:
        # Stored by the job (the test's own labels date from before ``now``).
        new_rows = conn.execute("SELECT * FROM paired_labels WHERE created_at >= ?"
                                " ORDER BY interaction_id", (now,)).fetchall()
        rows = conn.execute("SELECT COUNT(*) FROM paired_labels").fetchone()[0]
    scored = [(i, v, label, s) for i, v, label, s, _ in new_rows]
    assert [(i, v) for i, v, _, _ in scored] == [
        (i, "v1-zh" if version == B else B) for i, version in unscored]
    assert {s for _, _, _, s in scored} == {scorer}
    assert all(label in (("正面", "负面") if v == "v1-zh" else ("positive", "negative"))
               for _, v, label, _ in scored)
    assert rows == HOURS * 40

    # The command line reads the labels the job stored.
    with sqlite3.connect(cli_db) as conn:
        conn.executemany("INSERT INTO paired_labels VALUES (?, ?, ?, ?, ?)", new_rows)
    parser = argparse.ArgumentParser()
    experiment_cli.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", "--db", str(cli_db), "--at", repr(now)])
    assert args.func(args) == 0
    assert _audit(cli_db)[before:] == job_entries
    with sqlite3.connect(job_db) as conn:
        assert conn.execute("SELECT state, replaced FROM prompt_versions WHERE id = ?",
                            (B,)).fetchone() == (versions.ACTIVE, "v1-zh")


GGUF = "gguf:qwen2.5-0.5b-instruct-q8_0.gguf:1a2b3c4d5e6f7a8b"
REMOTE = "remote:qwen2.5-7b-instruct"


async def _prepare_scored_apart(path: Path, now: float) -> None:
    catalog = load_directory(ROOT / "prompts")
    start = (int(now // 3600) - HOURS) * 3600.0
    db = await Database.open(path)
    try:
        await start_test(db, catalog, at=start)
        # What promotes B in the test above, but B's verdicts came from another model.
        await fill(db, hours=HOURS, per_hour_a=20, per_hour_b=20, acc_a=0.70, acc_b=0.95,
                   start=start, scorer_a=GGUF, scorer_b=REMOTE)
    finally:
        await db.close()


def test_the_job_does_not_decide_arms_scored_by_different_scorers_and_says_why_once(
        tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    db_path = tmp_path / "job.db"
    asyncio.run(_prepare_scored_apart(db_path, now))
    before = _audit(db_path)
    looks: list[float] = []

    async def counted(*args: Any, **kwargs: Any) -> list[experiment.Outcome]:
        looks.append(time.monotonic())
        return await experiment.analyze(*args, **kwargs)

    monkeypatch.setattr(jobs, "analyze", counted)
    started = time.time()

    with FakeBotAPI() as api:
        harness = BotHarness(api, tiny_gguf, db_path,
                             overrides={"experiment.interval_minutes": 0.01})  # every 0.6 s
        # The clock moves on: each 0.6 s is a new period the job looks at (once).
        harness.app.bot_data.post_init_hooks = [
            functools.partial(jobs.schedule_experiment_job, first=0.2,
                              clock=lambda: now + time.time() - started)]
        harness.start()
        try:
            held = api.wait_for(lambda: [t for t in _admin_texts(api) if "HOLD" in t])
            # /stats shows the held test and why.
            api.send_text(api.user(ADMIN_ID, "en"), "/stats")
            stats = api.wait_for(lambda: [t for t in _admin_texts(api)
                                          if t.startswith("📊 /stats")])[0]
            # Three more runs of the job (every 0.6 s): the admins were told once.
            told_at = len(looks)
            api.wait_for(lambda: len(looks) >= told_at + 3)
            time.sleep(0.3)  # the last run's messages, if any, are sent
        finally:
            harness.stop()
        texts = _admin_texts(api)

    (message,) = held
    assert [t for t in texts if "scorer" in t and not t.startswith("📊")] == [message]
    assert message.startswith(f"🤖 {B} vs v1-zh: HOLD\n")
    assert f"verdicts with feedback were scored by {GGUF}; {B}'s " in message
    assert f"verdicts with feedback were scored by {REMOTE}." in message
    assert ("Verdict probabilities from different scorers (model files or inference servers) "
            "are not comparable, so the test is held: neither promoted nor reverted") in message
    assert f"/retire {B} and /canary {B} <percent> to start a fresh test" in message
    assert "next: holding: the arms were not scored by the same scorer" in stats
    # Nothing was written: B is still a candidate at its share, the audit log unchanged.
    assert _audit(db_path) == before
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT state, share FROM prompt_versions WHERE id = ?",
                            (B,)).fetchone() == (versions.CANDIDATE, 0.5)

    # `loopbot analyze --json` names each arm's scorers.
    parser = argparse.ArgumentParser()
    experiment_cli.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", "--db", str(db_path), "--at", repr(now), "--json"])
    assert args.func(args) == 0
    (row,) = json.loads(capsys.readouterr().out)["outcomes"]
    assert (row["action"], row["rule"], row["applied"]) == ("hold", "scorer_mismatch", False)
    assert row["scorers"] == {"active": {GGUF: row["observations"]["active"]},
                              "candidate": {REMOTE: row["observations"]["candidate"]}}
    assert _audit(db_path) == before
