"""The experiment analysis on python-telegram-bot's JobQueue, and the admins' messages.

Every ``experiment.interval_minutes`` the job runs :func:`bot.experiment.analyze` on the bot's
own database and prompt versions (the ones it serves), right after scoring the verdicts voted
on since its last run with the other arm's prompt (:func:`bot.pairing.score_pending`, the
paired comparison's labels), applies the decisions, and tells every
admin what it did and why whenever the action is not a plain hold. A hold that waits for a
person (arms scored by different scorers) is told once per test while the bot runs, not at
every look. It never dies: any error is logged and the next run tries again (each write is
one transaction, so a failed run leaves the state as it was).

Replicas: every replica schedules the job, and each run of it first takes the period's lease
in the database (:class:`bot.store.jobs.JobRuns`): one replica runs a period, the others
skip it. The admins' message about an applied decision is stored in the outbox in the
decision's own transaction, so a replica killed right after deciding leaves one decision and
one message; its lease expires and the next replica's run finds the state already decided.
The job fires every minute (or every interval, if shorter) and does its work once per
``experiment.interval_minutes`` period, so a period a dead replica left is taken up within
minutes of its lease running out, not an interval later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bot import pairing
from bot.config import replica_name
from bot.experiment import analyze
from bot.learning import loop as learning
from bot.store.jobs import JobRuns, Lease
from bot.telegram.state import BotApp, BotContext
from bot.texts import learning as learning_texts

if TYPE_CHECKING:
    from analytics.decide import DecisionConfig
    from bot.service import Service

log = logging.getLogger(__name__)

EXPERIMENT_JOB = "loopbot-experiment"
# The first analysis shortly after start-up: a decision due while the bot was down is taken
# within a minute, once the bot is answering messages.
FIRST_RUN_S = 30.0
# How often a replica looks whether the current period still needs running.
TICK_S = 60.0
# How long a replica holds a period's lease: far longer than an analysis takes; a replica
# killed mid-run blocks the period this long.
LEASE_S = 600.0


@dataclass(frozen=True)
class JobData:
    # The analysis's "now"; a parameter so a test can pin the hour.
    clock: Callable[[], float] = time.time
    # The holds the admins were already told about (Outcome.tell_once): told once, not hourly.
    told: set[tuple[str, str, int, str]] = field(default_factory=set)
    lease_s: float = LEASE_S
    # (period, candidate) whose failed write the admins were told about: a period retried
    # every tick after a failure is told once, not every minute.
    failures_told: set[tuple[int, str]] = field(default_factory=set)


async def schedule_experiment_job(application: BotApp, *, first: float = FIRST_RUN_S,
                                  clock: Callable[[], float] = time.time,
                                  lease_s: float = LEASE_S) -> None:
    """A ``post_init`` hook (see :data:`bot.telegram.app.DEFAULT_POST_INIT_HOOKS`): schedule
    the analysis every ``experiment.interval_minutes``, the first run after ``first`` s."""
    state = application.bot_data
    queue = application.job_queue
    if queue is None:
        raise RuntimeError("python-telegram-bot was installed without the job-queue extra")
    interval_s = state.settings.experiment.interval_minutes * 60.0
    # A short interval (tests, demos) also starts sooner than the usual first run.
    first = min(first, interval_s)
    queue.run_repeating(run_experiment_job, interval=min(interval_s, TICK_S), first=first,
                        name=EXPERIMENT_JOB, data=JobData(clock, lease_s=lease_s),
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
    now = clock()
    runs = JobRuns(service.store.db, replica_name(state.settings))
    period = int(now // (state.settings.experiment.interval_minutes * 60.0))
    try:
        lease = await runs.claim(EXPERIMENT_JOB, period, lease_s=data.lease_s, now=now)
    except Exception as exc:
        log.error("experiment analysis: cannot take this period's lease: %s", exc)
        return
    if lease is None:
        return  # done this period, or another replica is running it
    admins = list(state.settings.telegram.admins)
    try:
        async with _renewing(runs, lease, data.lease_s):
            await service.load_new_versions()  # a candidate another replica put in canary
            await _score_pairs(service, state.settings.experiment, now)
            outcomes = await analyze(service.store.db, service.versions,
                                     state.settings.experiment, now=now, notify=admins)
    except Exception:
        log.exception("experiment analysis failed; retried at the next run")
        await _give_back(runs, lease)
        return
    for outcome in outcomes:
        log.info("experiment %s vs %s: %s (%s)%s", outcome.candidate_id, outcome.active_id,
                 outcome.action, outcome.decision.rule,
                 f" — error: {outcome.error}" if outcome.error else "")
        if outcome.applied:
            service.metrics.count_decision(outcome.action)
        if not outcome.notable:
            continue
        if outcome.noted:  # stored in the outbox with the decision: the sender delivers it
            sender = state.sender
            for admin in admins:
                if sender is not None:
                    sender.notify(admin, "private")
            continue
        once = outcome.tell_once
        if once is not None:
            if once in data.told:
                continue
            data.told.add(once)
        if outcome.error is not None:
            failure = (period, outcome.candidate_id)
            if failure in data.failures_told:
                continue
            data.failures_told.add(failure)
        for admin in state.settings.telegram.admins:
            try:
                await context.bot.send_message(admin, outcome.message)
            except Exception as exc:  # one unreachable admin must not silence the others
                log.warning("could not message admin %s: %s", admin, exc)
    try:
        if any(o.error for o in outcomes):
            await runs.release(lease)  # a write failed: the next tick tries the period again
        else:
            await runs.finish(lease)
    except Exception as exc:
        log.error("experiment analysis: cannot record the period as done: %s", exc)


async def _score_pairs(service: Service, config: DecisionConfig, now: float) -> None:
    """The paired comparison's labels of the verdicts voted on since the last run, before
    the analysis reads them (:mod:`bot.pairing`). Its failure does not stop the analysis: it
    decides on the labels stored so far."""
    try:
        await pairing.score_pending(service.store.db, pairing.classifier_of(service.runtime),
                                    service.versions, config, now=now)
    except Exception:
        log.exception("paired comparison: scoring failed; the analysis goes on with the "
                      "labels stored so far")


@contextlib.asynccontextmanager
async def _renewing(runs: JobRuns, lease: Lease, lease_s: float) -> AsyncIterator[None]:
    """Keep the lease while the job runs (an improvement cycle's offline check can take
    longer than a lease): renewed every third of it, so only a dead holder's lease runs out."""
    async def renew() -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                if not await runs.renew(lease, lease_s=lease_s):
                    log.warning("%s: lease of period %d lost while running", lease.name,
                                lease.period)
                    return
            except Exception as exc:
                log.warning("%s: cannot renew the lease: %s", lease.name, exc)

    task = asyncio.create_task(renew(), name=f"loopbot-lease-{lease.name}")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _give_back(runs: JobRuns, lease: Lease) -> None:
    try:
        await runs.release(lease)
    except Exception as exc:
        log.error("cannot release the lease of %s: %s", lease.name, exc)


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


async def once_per_period(context: BotContext, name: str, period_s: float,
                          work: Callable[[], Awaitable[bool]], *,
                          lease_s: float = LEASE_S) -> None:
    """Run ``work`` unless this period of job ``name`` is done or another replica runs it;
    ``work`` returns whether the period is done (False: try again at the next firing)."""
    service = context.state.service
    if service is None:
        return  # still starting or already stopping
    runs = JobRuns(service.store.db, replica_name(context.state.settings))
    try:
        lease = await runs.claim(name, int(time.time() // period_s), lease_s=lease_s)
    except Exception as exc:
        log.error("%s: cannot take this period's lease: %s", name, exc)
        return
    if lease is None:
        return
    done = False
    try:
        async with _renewing(runs, lease, lease_s):
            done = await work()
    finally:
        try:
            await (runs.finish(lease) if done else runs.release(lease))
        except Exception as exc:
            log.error("%s: cannot record the period: %s", name, exc)


async def run_learning_job(context: BotContext) -> None:
    await once_per_period(context, LEARNING_JOB, LEARNING_INTERVAL_S,
                          lambda: _learning_cycle(context))


async def _learning_cycle(context: BotContext) -> bool:
    """One improvement cycle; False when it failed (the period is given back)."""
    state = context.state
    service = state.service
    if service is None:
        return False
    try:
        await service.load_new_versions()
        result = await learning.run_cycle(service)
    except Exception:
        log.exception("improvement loop failed; retried at the next run")
        return False
    text = learning_texts.cycle_text(result)
    if text is None:
        return True
    for admin in state.settings.telegram.admins:
        try:
            await context.bot.send_message(admin, text)
        except Exception as exc:
            log.warning("could not message admin %s: %s", admin, exc)
    return True
