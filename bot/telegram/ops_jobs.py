"""The nightly backup and the retention sweep, scheduled on python-telegram-bot's JobQueue."""

from __future__ import annotations

import datetime as dt
import logging

from bot.config import ConfigError, Settings, database_target, resolve_path
from bot.ops.retention import erase_old_texts
from bot.store.backup import BackupError, backup_and_rotate
from bot.store.db import DB_ERRORS
from bot.telegram.jobs import once_per_period
from bot.telegram.state import BotApp, BotContext

log = logging.getLogger(__name__)

# Hourly: a text is gone at most an hour after its deadline, and each sweep touches only the
# rows that crossed it since the last one (interactions_time index).
RETENTION_INTERVAL_S = 3600.0
# The first sweep after start-up, once the bot is answering messages.
RETENTION_FIRST_S = 60.0
BACKUP_JOB = "loopbot-nightly-backup"
RETENTION_JOB = "loopbot-retention"


def schedule_ops_jobs(application: BotApp, settings: Settings) -> None:
    """Schedule the nightly backup (``storage.backup_hour_utc``, -1 = off) and the retention
    sweep (``storage.retention_days``, 0 = off). Call once, when the bot starts."""
    storage = settings.storage
    if not -1 <= storage.backup_hour_utc <= 23:
        raise ConfigError("storage.backup_hour_utc: an hour 0-23 (UTC), or -1 for no backups")
    if storage.retention_days < 0:
        raise ConfigError("storage.retention_days: 0 (keep forever) or more days")
    queue = application.job_queue
    if queue is None:
        raise RuntimeError("python-telegram-bot was installed without the job-queue extra")
    if storage.backup_hour_utc >= 0:
        queue.run_daily(_nightly_backup, time=dt.time(storage.backup_hour_utc, tzinfo=dt.UTC),
                        name=BACKUP_JOB)
        log.info("nightly backup at %02d:00 UTC into %s (keeping %d)", storage.backup_hour_utc,
                 resolve_path(settings, storage.backup_dir), storage.backup_keep)
    if storage.retention_days > 0:
        queue.run_repeating(_retention_sweep, interval=RETENTION_INTERVAL_S,
                            first=RETENTION_FIRST_S, name=RETENTION_JOB)


async def _nightly_backup(context: BotContext) -> None:
    # Once a day across replicas (they share the database and, in deploy/, the backup folder).
    await once_per_period(context, BACKUP_JOB, 86_400.0, lambda: _backup(context))


async def _backup(context: BotContext) -> bool:
    settings = context.state.settings
    storage = settings.storage
    try:
        await backup_and_rotate(database_target(settings),
                                resolve_path(settings, storage.backup_dir), storage.backup_keep)
    except (BackupError, OSError) as exc:
        # Logged as an error, and /healthz stays green: the bot still answers users.
        log.error("nightly backup failed: %s", exc)
        return False
    return True


async def _retention_sweep(context: BotContext) -> None:
    await once_per_period(context, RETENTION_JOB, RETENTION_INTERVAL_S,
                          lambda: _sweep(context))


async def _sweep(context: BotContext) -> bool:
    settings = context.state.settings
    service = context.state.service
    if service is None:
        return False  # still starting or already stopping: the next sweep does it
    try:
        await erase_old_texts(service.store.db, settings.storage.retention_days)
    except DB_ERRORS as exc:
        log.error("retention sweep failed (retried in %.0fs): %s", RETENTION_INTERVAL_S, exc)
        return False
    return True
