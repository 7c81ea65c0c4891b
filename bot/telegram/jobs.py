"""The experiment analysis on python-telegram-bot's JobQueue, and the admins' messages.

Every ``experiment.interval_minutes`` the job runs :func:`bot.experiment.analyze` on the bot's
own database and prompt versions (the ones it serves), applies the decisions, and tells every
admin what it did and why whenever the action is not a plain hold. A hold that waits for a
person (arms scored by different scorers) is told once per test while the bot runs, not at
every look. It never dies: any error is logged and the next run tries again (each write is
one transaction, so a failed run leaves the state as it was).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bot.experiment import analyze
from bot.learning import loop as learning
from bot.telegram.state import BotApp, BotContext
from bot.texts import learning as learning_texts

log = logging.getLogger(__name__)

EXPERIMENT_JOB = "loopbot-experiment"
# The first analysis shortly after start-up: a decision due while the bot was down is taken
# within a minute, once the bot is answering messages.
FIRST_RUN_S = 30.0


@dataclass(frozen=True)
class JobData:
    # The analysis's "now"; a parameter so a test can pin the hour.
    clock: Callable[[], float] = time.time
    # The holds the admins were already told about (Outcome.tell_once): told once, not hourly.
    told: set[tuple[str, str, int, str]] = field(default_factory=set)


async def schedule_experiment_job(application: BotApp, *, first: float = FIRST_RUN_S,
                                  clock: Callable[[], float] = time.time) -> None:
    """A ``post_init`` hook (see :data:`bot.telegram.app.DEFAULT_POST_INIT_HOOKS`): schedule
    the analysis every ``experiment.interval_minutes``, the first run after ``first`` s."""
    state = application.bot_data
    queue = application.job_queue
    if queue is None:
        raise RuntimeError("python-telegram-bot was installed without the job-queue extra")
    interval_s = state.settings.experiment.interval_minutes * 60.0
    queue.run_repeating(run_experiment_job, interval=interval_s, first=first,
                        name=EXPERIMENT_JOB, data=JobData(clock),
                        # A slow run is never stacked with the next one.
                        job_kwargs={"max_instances": 1, "coalesce": True})
    log.info("experiment analysis every %g min (first in %gs)",
             state.settings.experiment.interval_minutes, first)


async def run_experiment_job(context: BotContext) -> None:
    data = context.job.data if context.job else None
    if not isinstance(data, JobData):
        data = JobData()
    clock = data.clock
    state = context.state
    service = state.service
    if service is None:
        return  # still starting or already stopping: the next run does it
    try:
        outcomes = await analyze(service.store.db, service.versions, state.settings.experiment,
                                 now=clock())
    except Exception:
        log.exception("experiment analysis failed; retried at the next run")
        return
    for outcome in outcomes:
        log.info("experiment %s vs %s: %s (%s)%s", outcome.candidate_id, outcome.active_id,
                 outcome.action, outcome.decision.rule,
                 f" — error: {outcome.error}" if outcome.error else "")
        if outcome.applied:
            service.metrics.count_decision(outcome.action)
        if not outcome.notable:
            continue
        once = outcome.tell_once
        if once is not None:
            if once in data.told:
                continue
            data.told.add(once)
        for admin in state.settings.telegram.admins:
            try:
                await context.bot.send_message(admin, outcome.message)
            except Exception as exc:  # one unreachable admin must not silence the others
                log.warning("could not message admin %s: %s", admin, exc)


LEARNING_JOB = "loopbot-learning"
# Mining needs a day's worth of votes more than it needs speed: once an hour is plenty.
LEARNING_INTERVAL_S = 3600.0


async def schedule_learning_job(application: BotApp, *, first: float = 120.0,
                                interval: float = LEARNING_INTERVAL_S) -> None:
    """A ``post_init`` hook: the improvement loop (mine → candidate → offline check →
    canary or proposal), unless ``loop.mode`` is "off"."""
    state = application.bot_data
    if state.settings.loop.mode == "off" or application.job_queue is None:
        return
    application.job_queue.run_repeating(
        run_learning_job, interval=interval, first=first, name=LEARNING_JOB,
        job_kwargs={"max_instances": 1, "coalesce": True})
    log.info("improvement loop (%s) every %g min", state.settings.loop.mode, interval / 60)


async def run_learning_job(context: BotContext) -> None:
    state = context.state
    service = state.service
    if service is None:
        return
    try:
        result = await learning.run_cycle(service)
    except Exception:
        log.exception("improvement loop failed; retried at the next run")
        return
    text = learning_texts.cycle_text(result)
    if text is None:
        return
    for admin in state.settings.telegram.admins:
        try:
            await context.bot.send_message(admin, text)
        except Exception as exc:
            log.warning("could not message admin %s: %s", admin, exc)
