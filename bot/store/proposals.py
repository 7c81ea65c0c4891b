"""What the improvement loop reads and writes: votes with their verdicts, offline checks,
mined candidate proposals. :mod:`bot.learning.loop` decides; this module holds its SQL."""

from __future__ import annotations

import json
from typing import Any

from bot.store.db import Database, Record


async def vote_rows(db: Database, *, since: float | None) -> list[Record]:
    """Every vote on a verdict (``since``: on a verdict made at or after that time), oldest
    first."""
    recent = "" if since is None else " AND i.created_at >= ?"  # indexed: interactions_time
    return await db.fetchall(
        "SELECT v.interaction_id, v.user_id, v.correct, v.correct_label, v.created_at AS voted,"
        " i.created_at AS verdict_at, i.version_id, i.label, i.probabilities, i.text"
        " FROM votes v JOIN interactions i ON i.id = v.interaction_id"
        f" WHERE i.label IS NOT NULL{recent} ORDER BY v.created_at, v.id",
        () if since is None else (since,),
    )


async def insert_offline_check(db: Database, *, at: float, candidate_id: str, active_id: str,
                               n: int, candidate_correct: int, active_correct: int,
                               margin: float, passed: bool, reason: str,
                               details: dict[str, Any]) -> int:
    async with db.transaction() as conn:
        return await conn.insert_id(
            "INSERT INTO offline_checks (at, candidate_id, active_id, n, candidate_correct,"
            " active_correct, margin, passed, reason, details) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (at, candidate_id, active_id, n, candidate_correct, active_correct, float(margin),
             int(passed), reason, json.dumps(details, ensure_ascii=False)))


async def last_offline_check(db: Database, candidate_id: str | None) -> Record | None:
    if candidate_id is None:
        return await db.fetchone("SELECT * FROM offline_checks ORDER BY id DESC LIMIT 1")
    return await db.fetchone(
        "SELECT * FROM offline_checks WHERE candidate_id = ? ORDER BY id DESC LIMIT 1",
        (candidate_id,))


async def list_proposals(db: Database, status: str | None, limit: int) -> list[Record]:
    """Newest first."""
    if status is None:
        return await db.fetchall(
            "SELECT * FROM candidate_proposals ORDER BY created_at DESC LIMIT ?", (limit,))
    return await db.fetchall(
        "SELECT * FROM candidate_proposals WHERE status = ? ORDER BY created_at DESC"
        " LIMIT ?", (status, limit))


async def get_proposal(db: Database, candidate_id: str) -> Record | None:
    return await db.fetchone("SELECT * FROM candidate_proposals WHERE candidate_id = ?",
                             (candidate_id,))


async def last_proposal_of(db: Database, parent_id: str) -> Record | None:
    return await db.fetchone(
        "SELECT * FROM candidate_proposals WHERE parent_id = ? ORDER BY created_at DESC"
        " LIMIT 1", (parent_id,))


async def set_status(db: Database, candidate_id: str, status: str, *, actor: str | None,
                     at: float) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            "UPDATE candidate_proposals SET status = ?, decided_by = ?, decided_at = ?"
            " WHERE candidate_id = ?", (status, actor, at, candidate_id))


async def insert_proposal(db: Database, *, candidate_id: str, parent_id: str, at: float,
                          status: str, path: str, reason: str, judged: int, error_rate: float,
                          offline_check_id: int | None, report: dict[str, Any],
                          decided_by: str | None, decided_at: float | None) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO candidate_proposals (candidate_id, parent_id, created_at, status, path,"
            " reason, judged, error_rate, offline_check_id, report, decided_by, decided_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (candidate_id, parent_id, at, status, path, reason, judged, float(error_rate),
             offline_check_id, json.dumps(report, ensure_ascii=False), decided_by,
             decided_at))


async def expire_proposals(db: Database, *, at: float, older_than: float) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            "UPDATE candidate_proposals SET status = 'expired', decided_by = 'loop',"
            " decided_at = ? WHERE status = 'proposed' AND created_at < ?", (at, older_than))
