"""Prometheus metrics: one registry, and the small functions the rest of loopbot calls.

Counters and histograms are fed at the call sites (a verdict was shown, a vote was stored);
gauges that describe the state of the database or the model are recomputed when scraped, so
they are right after a restart and never drift from what the store says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from bot.store.db import Database
from bot.store.queries import vote_totals

# The *_created series (process start per metric) double the output and no dashboard uses
# them; Prometheus derives resets from the counters themselves.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds. A verdict on a 0.5B model on a couple of CPU cores takes ~0.1-3 s; a reply, seconds
# to minutes: the buckets are placed where the operator's questions are ("under 1 s?").
VERDICT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)
REPLY_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

# Per-version accuracy is a full aggregate over the votes; scrapes closer together than this
# reuse the last result instead of scanning the tables again.
DB_REFRESH_INTERVAL_S = 30.0


class QueueDepth(Protocol):
    @property
    def queue_depth(self) -> int: ...


class Metrics:
    """Every loopbot metric in its own registry (tests make their own instance)."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        if process_metrics:
            # CPU, memory and open files of the bot process: the usual first look when slow.
            ProcessCollector(registry=self.registry)
        self.verdict_latency = Histogram(
            "loopbot_verdict_latency_seconds", "Time the model took to score a verdict.",
            registry=self.registry, buckets=VERDICT_BUCKETS)
        self.reply_latency = Histogram(
            "loopbot_reply_latency_seconds", "Time the model took to generate a chat reply.",
            registry=self.registry, buckets=REPLY_BUCKETS)
        self.queue_depth = Gauge(
            "loopbot_inference_queue_depth", "Inference jobs waiting or running.",
            registry=self.registry)
        self.messages = Counter(
            "loopbot_messages", "User messages handled (since the process started).",
            registry=self.registry)
        self.votes = Counter(
            "loopbot_votes", "Verdict votes stored (since the process started).",
            ["version", "correct"], registry=self.registry)
        self.accuracy = Gauge(
            "loopbot_accuracy", "Share of votes saying the verdict was right, per version "
            "(all stored votes).", ["version"], registry=self.registry)
        self.stored_votes = Gauge(
            "loopbot_stored_votes", "Votes in the database per version.", ["version"],
            registry=self.registry)
        self.decisions = Counter(
            "loopbot_decisions", "Version decisions applied (promote, revert, ramp, ...).",
            ["action"], registry=self.registry)
        self.sent = Counter(
            "loopbot_messages_sent", "Messages delivered from the outbox, by kind.", ["kind"],
            registry=self.registry)
        self.send_failures = Counter(
            "loopbot_send_failures", "Outbox messages Telegram refused for good, by kind.",
            ["kind"], registry=self.registry)
        self.dropped = Counter(
            "loopbot_dropped_messages", "User messages dropped unanswered because their chat's "
            "backlog was full (the chat is told once).", ["chat_type"], registry=self.registry)
        self._db_refreshed_at: float | None = None
        self._versions_seen: set[str] = set()

    # --- call sites -------------------------------------------------------------------
    def observe_verdict(self, latency_s: float) -> None:
        self.verdict_latency.observe(latency_s)

    def observe_reply(self, latency_s: float) -> None:
        self.reply_latency.observe(latency_s)

    def count_message(self) -> None:
        self.messages.inc()

    def count_vote(self, version: str, correct: bool) -> None:
        self.votes.labels(version=version, correct="true" if correct else "false").inc()

    def count_decision(self, action: str) -> None:
        self.decisions.labels(action=action).inc()

    def count_sent(self, kind: str) -> None:
        self.sent.labels(kind=kind).inc()

    def count_send_failure(self, kind: str) -> None:
        self.send_failures.labels(kind=kind).inc()

    def count_dropped(self, chat_type: str) -> None:
        self.dropped.labels(chat_type=chat_type).inc()

    # --- gauges -----------------------------------------------------------------------
    async def refresh(self, db: Database | None, runtime: QueueDepth | None = None, *,
                      clock: Callable[[], float] = time.monotonic, force: bool = False) -> None:
        """Recompute the gauges: the queue depth of ``runtime`` always, per-version accuracy
        from ``db`` at most every :data:`DB_REFRESH_INTERVAL_S` seconds."""
        self.queue_depth.set(runtime.queue_depth if runtime is not None else 0)
        if db is None or db.closed:
            return
        now = clock()
        if (not force and self._db_refreshed_at is not None
                and now - self._db_refreshed_at < DB_REFRESH_INTERVAL_S):
            return
        rows = await vote_totals(db)
        current: set[str] = set()
        for version, votes, correct in rows:
            current.add(str(version))
            self.stored_votes.labels(version=version).set(int(votes))
            self.accuracy.labels(version=version).set(int(correct or 0) / int(votes))
        # A version whose votes were all deleted (/forget) must not keep its last value.
        for gone in self._versions_seen - current:
            self.stored_votes.remove(gone)
            self.accuracy.remove(gone)
        self._versions_seen = current
        self._db_refreshed_at = now

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# The process-wide instance the bot uses; the module functions below are its call sites.
METRICS = Metrics()


def observe_verdict(latency_s: float) -> None:
    METRICS.observe_verdict(latency_s)


def observe_reply(latency_s: float) -> None:
    METRICS.observe_reply(latency_s)


def count_message() -> None:
    METRICS.count_message()


def count_vote(version: str, correct: bool) -> None:
    METRICS.count_vote(version, correct)


def count_decision(action: str) -> None:
    METRICS.count_decision(action)


async def refresh_from_db(db: Database | None, runtime: QueueDepth | None = None, *,
                          force: bool = False) -> None:
    await METRICS.refresh(db, runtime, force=force)
