"""The paired comparison's labels: what the other arm's prompt says about a voted verdict's text.

:mod:`bot.pairing` scores the texts; every statement it runs lives here. The experiment
analysis reads the labels back through :class:`bot.store.experiments.ExperimentReader`.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.store.db import Database
from bot.store.queries import user_lock


@dataclass(frozen=True)
class PendingText:
    """A voted verdict of a running test that the other arm's prompt has not scored yet."""

    interaction_id: int
    # The verdict's author: the row is written under their lock, like /forget.
    user_id: int
    # The version that made the verdict (the other arm's version scores the text).
    version_id: str
    text: str
    # The scorer that made the verdict ("" when not recorded).
    scorer: str = ""


async def pending_texts(db: Database, a_id: str, b_id: str, start: float, end: float, *,
                        limit: int, scorer: str | None = None) -> list[PendingText]:
    """Verdicts of version ``a_id`` or ``b_id`` made in ``[start, end)`` that have a text and
    at least one vote and no label yet from the other one's prompt, oldest first.

    ``scorer``: only verdicts that scorer made (a verdict stored without one counts as
    ``""``): a label from another scorer would not be counted (:mod:`bot.experiment`)."""
    if limit <= 0:
        return []
    scorer_clause = "" if scorer is None else " AND COALESCE(i.scorer, '') = ?"
    rows = await db.fetchall(
        "SELECT i.id, i.user_id, i.version_id, i.text, COALESCE(i.scorer, '')"
        " FROM interactions i"
        " WHERE i.version_id IN (?, ?) AND i.created_at >= ? AND i.created_at < ?"
        " AND i.label IS NOT NULL AND i.text IS NOT NULL AND TRIM(i.text) != ''"
        f"{scorer_clause}"
        " AND EXISTS (SELECT 1 FROM votes v WHERE v.interaction_id = i.id)"
        " AND NOT EXISTS (SELECT 1 FROM paired_labels p WHERE p.interaction_id = i.id"
        "   AND p.version_id = CASE WHEN i.version_id = ? THEN ? ELSE ? END)"
        " ORDER BY i.created_at, i.id LIMIT ?",
        (a_id, b_id, start, end, *(() if scorer is None else (scorer,)), a_id, b_id, a_id,
         limit))
    return [PendingText(int(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows]


async def store_paired_label(db: Database, pending: PendingText, version_id: str, label: str,
                             scorer: str, now: float) -> bool:
    """Store the label ``version_id``'s prompt gives the text; False when the verdict is gone
    (its author's /forget while the text was scored) or was labelled meanwhile."""
    async with db.transaction() as conn:
        # The author's lock, as /forget takes it: a label is never stored after the
        # interaction's deletion committed (the row would outlive the user's data).
        await conn.lock(user_lock(pending.user_id))
        cur = await conn.execute(
            "INSERT INTO paired_labels (interaction_id, version_id, label, scorer, created_at)"
            " SELECT CAST(? AS BIGINT), ?, ?, ?, CAST(? AS DOUBLE PRECISION)"
            " WHERE EXISTS (SELECT 1 FROM interactions WHERE id = ?)"
            " ON CONFLICT (interaction_id, version_id) DO NOTHING",
            (pending.interaction_id, version_id, label, scorer, now,
             pending.interaction_id))
        return cur.rowcount == 1
