"""The ops jobs on a real python-telegram-bot JobQueue, and what each one does when it runs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from telegram.ext import Application

from bot.config import ConfigError, Settings, load_settings
from bot.llm.runtime import ModelRuntime
from bot.service import Service
from bot.store.backup import list_backups
from bot.store.queries import NewInteraction, Store
from bot.telegram.ops_jobs import BACKUP_JOB, RETENTION_JOB, schedule_ops_jobs
from bot.telegram.state import CONTEXT_TYPES, BotApp, new_job_queue


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(None, env={}, overrides={
        "storage.db": str(tmp_path / "loopbot.db"),
        "storage.backup_dir": str(tmp_path / "backups"), **overrides})


def _app() -> BotApp:
    return (Application.builder().context_types(CONTEXT_TYPES).job_queue(new_job_queue())
            .token("123:TEST").build())


def test_both_jobs_are_scheduled_when_configured(tmp_path: Path) -> None:
    app = _app()
    schedule_ops_jobs(app, _settings(tmp_path, **{"storage.backup_hour_utc": 3,
                                                 "storage.retention_days": 30}))
    assert app.job_queue is not None
    jobs = {job.name: job for job in app.job_queue.jobs()}
    assert set(jobs) == {BACKUP_JOB, RETENTION_JOB}
    trigger = jobs[BACKUP_JOB].trigger
    # A daily cron trigger at 03:00 UTC.
    assert "hour='3'" in repr(trigger) and "minute='0'" in repr(trigger)
    assert "timezone='UTC'" in repr(trigger)


def test_off_settings_schedule_nothing_and_bad_hours_are_named(tmp_path: Path) -> None:
    app = _app()
    schedule_ops_jobs(app, _settings(tmp_path, **{"storage.backup_hour_utc": -1,
                                                 "storage.retention_days": 0}))
    assert app.job_queue is not None and app.job_queue.jobs() == ()
    with pytest.raises(ConfigError, match=r"storage\.backup_hour_utc"):
        schedule_ops_jobs(app, _settings(tmp_path, **{"storage.backup_hour_utc": 24}))


async def test_running_the_jobs_backs_up_with_rotation_and_erases_old_texts(
        tmp_path: Path, tiny_gguf: Path) -> None:
    settings = _settings(tmp_path, **{"storage.backup_hour_utc": 2, "storage.backup_keep": 2,
                                     "storage.retention_days": 7})
    store = await Store.open(settings.storage.db)
    old_at = (dt.datetime.now(dt.UTC) - dt.timedelta(days=8)).timestamp()
    interaction, _ = await store.insert_interaction(NewInteraction(
        chat_id=1, user_id=1, message_id=1, text="old words", version_id="v1-en", arm="active",
        bucket=1, label="positive", probabilities={"positive": 0.9, "negative": 0.1},
        created_at=old_at))
    await store.upsert_vote(interaction.id, 1, correct=True, correct_label=None)
    app = _app()
    # The service as the bot has it after start-up (the runtime is not needed by these jobs).
    app.bot_data.settings = settings
    app.bot_data.service = Service(settings, store, ModelRuntime(tiny_gguf, settings.model), {})
    schedule_ops_jobs(app, settings)
    assert app.job_queue is not None
    jobs = {job.name: job for job in app.job_queue.jobs()}
    backups = tmp_path / "backups"
    backups.mkdir()
    for day in (1, 2, 3):  # earlier nights' backups (rotation goes by the names)
        (backups / f"loopbot-202601{day:02d}T020000Z.db").write_bytes(b"old")
    try:
        await jobs[BACKUP_JOB].run(app)
        # Fired again the same day (a second replica's JobQueue, or a restart): the day's
        # backup is taken once.
        await jobs[BACKUP_JOB].run(app)
        await jobs[RETENTION_JOB].run(app)
    finally:
        await store.close()
    kept = list_backups(backups)
    assert [p.name for p in kept[:1]] == ["loopbot-20260103T020000Z.db"]
    assert len(kept) == 2 and kept[1].read_bytes()[:15] == b"SQLite format 3"
    reopened = await Store.open(settings.storage.db)
    try:
        got = await reopened.get_interaction(interaction.id)
        assert got is not None and got.text is None and got.label == "positive"
        assert len(await reopened.votes_for(interaction.id)) == 1
    finally:
        await reopened.close()
