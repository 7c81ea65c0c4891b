"""Scheduled jobs that run once per period, however many replicas schedule them.

Every replica's JobQueue fires the hourly decision, the improvement loop, retention and the
nightly backup. Before it runs a period's job, a replica takes the job's row in ``job_runs``
with one conditional ``UPDATE`` (committed on its own): it gets it only when that period is
not finished and nobody else holds an unexpired lease on it. Running the job is not part of
that transaction: a job writes in transactions of its own, each one atomic with its audit
entry and its admin notes, so a replica killed half-way leaves only whole decisions behind.
Its lease then expires and the next replica to fire runs the period again, on the state the
first one left; a decision already written is not taken twice (the state it decided on has
changed, so the engine decides afresh).

A row lock or PostgreSQL's transaction-scoped advisory lock would also exclude, but only
while one transaction stays open for the whole job; a lease survives the job's own commits
and a killed process, and reads the same on SQLite. (Session-level advisory locks are
re-entrant on a pooled connection and do not exclude at all.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bot.store.db import Database


@dataclass(frozen=True)
class Lease:
    name: str
    period: int
    holder: str


class JobRuns:
    def __init__(self, db: Database, holder: str) -> None:
        self.db = db
        # This process's name among the replicas (the lease's owner).
        self.holder = holder

    async def claim(self, name: str, period: int, *, lease_s: float,
                    now: float | None = None) -> Lease | None:
        """Take the job ``name`` for ``period``; None when that period is done or another
        replica holds an unexpired lease on it."""
        at = time.time() if now is None else now
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO job_runs (name, period) VALUES (?, ?)"
                " ON CONFLICT (name) DO NOTHING", (name, -1))
            cur = await conn.execute(
                "UPDATE job_runs SET period = ?, holder = ?, lease_until = ?, started_at = ?"
                " WHERE name = ? AND (done_period IS NULL OR done_period < ?)"
                " AND (holder IS NULL OR lease_until IS NULL OR lease_until < ?"
                "      OR period < ? OR holder = ?)",
                (period, self.holder, at + lease_s, at, name, period, at, period,
                 self.holder))
        return Lease(name, period, self.holder) if cur.rowcount == 1 else None

    async def finish(self, lease: Lease, *, now: float | None = None) -> bool:
        """The period's job is done: no replica runs it again. False when the lease was
        lost meanwhile (it expired and another replica took the period)."""
        at = time.time() if now is None else now
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE job_runs SET done_period = ?, finished_at = ?, holder = NULL,"
                " lease_until = NULL WHERE name = ? AND holder = ? AND period = ?",
                (lease.period, at, lease.name, lease.holder, lease.period))
        return cur.rowcount == 1

    async def renew(self, lease: Lease, *, lease_s: float, now: float | None = None) -> bool:
        """Extend a lease still held (a long job); False when it was lost."""
        at = time.time() if now is None else now
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE job_runs SET lease_until = ? WHERE name = ? AND holder = ?"
                " AND period = ?", (at + lease_s, lease.name, lease.holder, lease.period))
        return cur.rowcount == 1

    async def release(self, lease: Lease) -> None:
        """Give the period back unfinished (the job failed): the next firing, here or on
        another replica, tries it again."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE job_runs SET holder = NULL, lease_until = NULL"
                " WHERE name = ? AND holder = ? AND period = ?",
                (lease.name, lease.holder, lease.period))

    async def state(self, name: str) -> dict[str, object] | None:
        row = await self.db.fetchone("SELECT * FROM job_runs WHERE name = ?", (name,))
        return None if row is None else dict(zip(row.keys(), row, strict=True))
