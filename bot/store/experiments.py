"""What the decision engine reads about one experiment (active version A vs candidate B).

Every statement the experiment analysis runs lives here; :mod:`bot.experiment` turns the rows
into hourly strata. All reads cover ``[start, end)`` of the interactions' time.
"""

from __future__ import annotations

from dataclasses import dataclass

from analytics.decide import UNRECORDED_SCORER
from bot.store.db import Database

# The scorer of verdicts stored before scorers were recorded (``interactions.scorer`` NULL,
# migration 007): to the engine they are all one scorer.


@dataclass(frozen=True)
class ServedRow:
    """An interaction of arm A or B: when, by whom, whether a verdict was shown."""

    id: int
    user_id: int
    version_id: str
    created_at: float
    verdict: bool
    reply_latency_ms: float | None
    # The verdict's probability (its confidence band) and the text (its cluster); None once
    # erased by retention or /forget.
    confidence: float | None = None
    text: str | None = None
    # The verdict's label (None: a reply only) and who scored it (None: not recorded).
    label: str | None = None
    scorer: str | None = None


@dataclass(frozen=True)
class VoteRow:
    user_id: int
    # As first cast: a later change must not rewrite an hour that already closed.
    correct: bool
    created_at: float
    version_id: str
    interaction_id: int = 0
    # Who scored the verdict voted on (``interactions.scorer``; UNRECORDED_SCORER when it
    # was stored before scorers were recorded).
    scorer: str = UNRECORDED_SCORER


@dataclass(frozen=True)
class PairedRow:
    """The label the other arm's prompt gives a verdict's text (the paired comparison)."""

    interaction_id: int
    label: str
    scorer: str


@dataclass(frozen=True)
class ReactionRow:
    # +1 / -1 as first given, like votes.
    polarity: int
    at: float
    version_id: str
    interaction_id: int = 0
    user_id: int = 0


class ExperimentReader:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def served(self, a_id: str, b_id: str, start: float, end: float) -> list[ServedRow]:
        rows = await self.db.fetchall(
            "SELECT id, user_id, version_id, created_at, label IS NOT NULL AS verdict,"
            " reply_latency_ms, confidence, text, label, scorer FROM interactions"
            " WHERE version_id IN (?, ?) AND created_at >= ? AND created_at < ?"
            " ORDER BY created_at, id", (a_id, b_id, start, end))
        return [ServedRow(int(r["id"]), int(r["user_id"]), str(r["version_id"]),
                          float(r["created_at"]), bool(r["verdict"]),
                          None if r["reply_latency_ms"] is None
                          else float(r["reply_latency_ms"]),
                          None if r["confidence"] is None else float(r["confidence"]),
                          r["text"], r["label"], r["scorer"]) for r in rows]

    async def first_interaction_ids(self, a_id: str, b_id: str, start: float,
                                    end: float) -> dict[int, int]:
        """user id → id of the user's first interaction ever, for the users of this test."""
        rows = await self.db.fetchall(
            "SELECT user_id, MIN(id) FROM interactions WHERE user_id IN ("
            "  SELECT user_id FROM interactions"
            "  WHERE version_id IN (?, ?) AND created_at >= ? AND created_at < ?)"
            " GROUP BY user_id", (a_id, b_id, start, end))
        return {int(u): int(i) for u, i in rows}

    async def votes(self, a_id: str, b_id: str, start: float, end: float) -> list[VoteRow]:
        """Votes cast before ``end`` on verdicts of the test, in the order they were cast."""
        rows = await self.db.fetchall(
            "SELECT v.user_id, COALESCE(v.first_correct, v.correct) AS correct, v.created_at,"
            " i.version_id, v.interaction_id, i.scorer FROM votes v"
            " JOIN interactions i ON i.id = v.interaction_id"
            " WHERE i.version_id IN (?, ?) AND i.created_at >= ? AND v.created_at < ?"
            " ORDER BY v.created_at, v.id", (a_id, b_id, start, end))
        return [VoteRow(int(r["user_id"]), bool(r["correct"]), float(r["created_at"]),
                        str(r["version_id"]), int(r["interaction_id"]),
                        r["scorer"] or UNRECORDED_SCORER) for r in rows]

    async def paired_labels(self, a_id: str, b_id: str, start: float,
                            end: float) -> dict[int, PairedRow]:
        """interaction id → the label the *other* arm's prompt gives its text, for the
        verdicts of the test (``[start, end)``) that were scored so (:mod:`bot.pairing`)."""
        rows = await self.db.fetchall(
            "SELECT p.interaction_id, p.label, p.scorer FROM paired_labels p"
            " JOIN interactions i ON i.id = p.interaction_id"
            " WHERE i.version_id IN (?, ?) AND i.created_at >= ? AND i.created_at < ?"
            " AND p.version_id = CASE WHEN i.version_id = ? THEN ? ELSE ? END",
            (a_id, b_id, start, end, a_id, b_id, a_id))
        return {int(r[0]): PairedRow(int(r[0]), str(r[1]), str(r[2])) for r in rows}

    async def reply_reactions(self, a_id: str, b_id: str, start: float,
                              end: float) -> list[ReactionRow]:
        rows = await self.db.fetchall(
            "SELECT r.first_polarity AS polarity, r.first_at AS at, i.version_id,"
            " r.interaction_id, r.user_id"
            " FROM reactions r JOIN interactions i ON i.id = r.interaction_id"
            " WHERE r.kind = 'reply' AND r.first_polarity != 0 AND i.version_id IN (?, ?)"
            " AND i.created_at >= ? AND r.first_at < ?", (a_id, b_id, start, end))
        return [ReactionRow(int(r["polarity"]), float(r["at"]), str(r["version_id"]),
                            int(r["interaction_id"]), int(r["user_id"])) for r in rows]
