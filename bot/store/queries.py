"""The typed async API over the database: interactions, votes, reactions, aggregates.

Version state is not written here: :mod:`bot.versions` is its only writer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.errors import LoopbotError
from bot.store.db import Connection, Database, Record, fetchone
from bot.store.outbox import Outgoing, add_outgoing


class UserForgotten(LoopbotError, RuntimeError):
    """The message, vote or reaction was sent before its author's /forget: not stored."""


async def _hold_unforgotten(conn: Connection, user_id: int, update_id: int | None) -> None:
    """Take the user's lock for this transaction (/forget takes it too) and refuse what the
    user sent before asking to be forgotten: checked here, in the storing transaction, so a
    /forget handled meanwhile by another replica wins whichever commits first."""
    await conn.lock(user_lock(user_id))
    if update_id is not None and await fetchone(
            conn, "SELECT 1 FROM forgotten_users WHERE user_id = ? AND before_update_id > ?",
            (user_id, update_id)) is not None:
        raise UserForgotten(
            f"user {user_id} asked to be forgotten after sending update {update_id}")


def user_lock(user_id: int) -> str:
    """The name of a user's lock (:meth:`Connection.lock`): storing their message and
    forgetting them never interleave, on whichever replicas they run."""
    return f"loopbot:user:{user_id}"


@dataclass(frozen=True)
class NewInteraction:
    chat_id: int
    user_id: int
    message_id: int
    text: str
    version_id: str
    arm: str
    bucket: int
    chat_type: str = "private"
    update_id: int | None = None
    content_hash: str = ""
    # None when only a reply was asked for (no verdict computed).
    label: str | None = None
    probabilities: dict[str, float] | None = None
    verdict_latency_ms: float | None = None
    created_at: float | None = None
    # Which scorer produced the verdict (``Verdict.scorer``, e.g. "gguf:<file>:<hash>" or
    # "remote:<model id>"); None when unknown or when no verdict was computed.
    scorer: str | None = None


@dataclass(frozen=True)
class Interaction:
    id: int
    created_at: float
    update_id: int | None
    chat_id: int
    chat_type: str
    user_id: int
    message_id: int
    text: str | None
    version_id: str
    content_hash: str
    arm: str
    bucket: int
    label: str | None
    probabilities: dict[str, float]
    confidence: float | None
    verdict_latency_ms: float | None
    verdict_message_id: int | None
    reply_text: str | None
    reply_latency_ms: float | None
    # None for a reply only, and for verdicts stored before scorers were recorded.
    scorer: str | None = None

    @property
    def labels(self) -> list[str]:
        """The version's labels in its order, as they were when the verdict was made."""
        return list(self.probabilities)


@dataclass(frozen=True)
class Vote:
    interaction_id: int
    user_id: int
    correct: bool
    correct_label: str | None
    created_at: float
    updated_at: float
    changes: int


@dataclass(frozen=True)
class Reaction:
    interaction_id: int
    chat_id: int
    message_id: int
    user_id: int
    kind: str
    emojis: tuple[str, ...]
    polarity: int


@dataclass(frozen=True)
class VersionCounts:
    version_id: str
    verdicts: int
    votes: int
    correct: int
    reactions_positive: int
    reactions_negative: int
    mean_latency_ms: float | None


@dataclass(frozen=True)
class AccuracyPoint:
    """Votes on verdicts made in one period (by the verdict's time) for one version."""

    version_id: str
    period_start: float
    votes: int
    correct: int


@dataclass(frozen=True)
class ExportedVote:
    interaction_id: int
    interaction_at: float
    vote_at: float
    chat_id: int
    user_id: int
    voter_id: int
    version_id: str
    arm: str
    label: str | None
    confidence: float | None
    correct: bool
    correct_label: str | None
    text: str | None


@dataclass(frozen=True)
class ForgetResult:
    interactions: int
    votes: int
    reactions: int


def _interaction(row: Record) -> Interaction:
    return Interaction(
        id=int(row["id"]), created_at=float(row["created_at"]), update_id=row["update_id"],
        chat_id=int(row["chat_id"]), chat_type=row["chat_type"], user_id=int(row["user_id"]),
        message_id=int(row["message_id"]), text=row["text"], version_id=row["version_id"],
        content_hash=row["content_hash"], arm=row["arm"], bucket=int(row["bucket"]),
        label=row["label"], probabilities=json.loads(row["probabilities"]),
        confidence=row["confidence"], verdict_latency_ms=row["verdict_latency_ms"],
        verdict_message_id=row["verdict_message_id"], reply_text=row["reply_text"],
        reply_latency_ms=row["reply_latency_ms"], scorer=row["scorer"],
    )


def _vote(row: Record) -> Vote:
    return Vote(
        interaction_id=int(row["interaction_id"]), user_id=int(row["user_id"]),
        correct=bool(row["correct"]), correct_label=row["correct_label"],
        created_at=float(row["created_at"]), updated_at=float(row["updated_at"]),
        changes=int(row["changes"]),
    )


class Store:
    """All reads and writes the bot makes, except version state (see :mod:`bot.versions`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    async def open(cls, where: str | Path, *, upgrade: bool | None = None) -> Store:
        """``where``: a SQLite path or URL, or a PostgreSQL URL (see :meth:`Database.open`)."""
        return cls(await Database.open(where, upgrade=upgrade))

    async def close(self) -> None:
        await self.db.close()

    # --- interactions -------------------------------------------------------------------

    async def insert_interaction(
        self, new: NewInteraction,
        outgoing: Callable[[Interaction], Sequence[Outgoing]] | None = None,
    ) -> tuple[Interaction, bool]:
        """Store a message's verdict. Returns ``(interaction, created)``; ``created`` is False
        when the same chat message was stored before (a redelivered update).

        ``outgoing`` makes what must be sent about a new interaction (its verdict message);
        it is stored in the same transaction, so a stored verdict is always shown."""
        probs = dict(new.probabilities or {})
        confidence = probs.get(new.label) if new.label is not None else None
        at = time.time() if new.created_at is None else new.created_at
        async with self.db.transaction() as conn:
            # Under the user's lock, like /forget (another replica may be forgetting this
            # user right now): a message sent before the user's /forget is not stored.
            await _hold_unforgotten(conn, new.user_id, new.update_id)
            cur = await conn.execute(
                "INSERT INTO interactions (created_at, update_id, chat_id, chat_type, user_id,"
                " message_id, text, version_id, content_hash, arm, bucket, label,"
                " probabilities, confidence, verdict_latency_ms, scorer)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (chat_id, message_id) DO NOTHING",
                (at, new.update_id, new.chat_id, new.chat_type, new.user_id, new.message_id,
                 new.text, new.version_id, new.content_hash, new.arm, new.bucket, new.label,
                 json.dumps(probs, ensure_ascii=False), confidence, new.verdict_latency_ms,
                 new.scorer or None),
            )
            created = cur.rowcount == 1
            row = await fetchone(
                conn, "SELECT * FROM interactions WHERE chat_id = ? AND message_id = ?",
                (new.chat_id, new.message_id),
            )
            assert row is not None
            interaction = _interaction(row)
            if created and outgoing is not None:
                await add_outgoing(conn, outgoing(interaction), at)
        return interaction, created

    async def get_interaction(self, interaction_id: int) -> Interaction | None:
        row = await self.db.fetchone("SELECT * FROM interactions WHERE id = ?",
                                     (interaction_id,))
        return _interaction(row) if row else None

    async def find_interaction(self, chat_id: int, message_id: int) -> Interaction | None:
        row = await self.db.fetchone(
            "SELECT * FROM interactions WHERE chat_id = ? AND message_id = ?",
            (chat_id, message_id),
        )
        return _interaction(row) if row else None

    async def add_bot_messages(self, interaction_id: int, chat_id: int, kind: str,
                               message_ids: Sequence[int]) -> None:
        """Remember which bot messages belong to an interaction (for votes and reactions)."""
        async with self.db.transaction() as conn:
            if kind == "verdict" and message_ids:
                await conn.execute(
                    "UPDATE interactions SET verdict_message_id = ? WHERE id = ?",
                    (message_ids[0], interaction_id),
                )
            # The interaction may be gone already (/forget while the reply was generated):
            # then there is nothing to attach the messages to.
            await conn.executemany(
                "INSERT INTO bot_messages (chat_id, message_id, interaction_id, kind)"
                " SELECT CAST(? AS BIGINT), CAST(? AS BIGINT), CAST(? AS BIGINT), ?"
                " WHERE EXISTS (SELECT 1 FROM interactions WHERE id = ?)"
                " ON CONFLICT (chat_id, message_id) DO NOTHING",
                [(chat_id, mid, interaction_id, kind, interaction_id) for mid in message_ids],
            )

    async def set_reply(self, interaction_id: int, text: str, latency_ms: float,
                        outgoing: Sequence[Outgoing] = ()) -> bool:
        """Store the reply and what must be sent of it, together; False when the interaction
        is gone (/forget while the reply was generated): then nothing is sent either."""
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE interactions SET reply_text = ?, reply_latency_ms = ? WHERE id = ?",
                (text, latency_ms, interaction_id),
            )
            if cur.rowcount != 1:
                return False
            await add_outgoing(conn, outgoing, time.time())
            return True

    async def find_bot_message(self, chat_id: int, message_id: int) -> tuple[int, str] | None:
        row = await self.db.fetchone(
            "SELECT interaction_id, kind FROM bot_messages WHERE chat_id = ? AND message_id = ?",
            (chat_id, message_id),
        )
        return (int(row[0]), str(row[1])) if row else None

    async def recent_turns(self, chat_id: int, before_id: int, limit: int
                           ) -> list[tuple[str, str]]:
        """The chat's last ``limit`` (user text, bot reply) pairs before an interaction, oldest
        first; erased texts are skipped."""
        if limit <= 0:
            return []
        rows = await self.db.fetchall(
            "SELECT text, reply_text FROM interactions WHERE chat_id = ? AND id < ?"
            " AND text IS NOT NULL AND reply_text IS NOT NULL ORDER BY id DESC LIMIT ?",
            (chat_id, before_id, limit),
        )
        return [(str(r[0]), str(r[1])) for r in reversed(rows)]

    # --- votes and reactions ------------------------------------------------------------

    async def upsert_vote(self, interaction_id: int, user_id: int, *, correct: bool,
                          correct_label: str | None, now: float | None = None,
                          update_id: int | None = None) -> Vote | None:
        """One vote per user and interaction; a second click changes it. Returns the stored
        row after the transaction committed, or None when the interaction is gone."""
        at = time.time() if now is None else now
        # "Wrong" clicked again after the right label was picked keeps that label: a re-tap
        # must not erase the correction mining and credibility learn from.
        label = ("CASE WHEN excluded.correct = 0 AND excluded.correct_label IS NULL"
                 " AND votes.correct = 0 THEN votes.correct_label"
                 " ELSE excluded.correct_label END")
        async with self.db.transaction() as conn:
            await _hold_unforgotten(conn, user_id, update_id)  # vs the voter's /forget
            if await fetchone(conn, "SELECT 1 FROM interactions WHERE id = ?",
                              (interaction_id,)) is None:
                return None  # deleted meanwhile (/forget of its author)
            await conn.execute(
                "INSERT INTO votes (interaction_id, user_id, correct, correct_label, created_at,"
                " updated_at, first_correct) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (interaction_id, user_id) DO UPDATE SET"
                f" correct = excluded.correct, correct_label = {label},"
                " updated_at = excluded.updated_at,"
                # COALESCE: a null-safe comparison both databases spell the same way (labels
                # are never empty strings).
                " changes = votes.changes + CASE WHEN votes.correct != excluded.correct"
                f"   OR COALESCE(votes.correct_label, '') != COALESCE({label}, '')"
                "   THEN 1 ELSE 0 END",
                (interaction_id, user_id, int(correct), correct_label, at, at, int(correct)),
            )
            row = await fetchone(
                conn, "SELECT * FROM votes WHERE interaction_id = ? AND user_id = ?",
                (interaction_id, user_id),
            )
        assert row is not None
        return _vote(row)

    async def get_vote(self, interaction_id: int, user_id: int) -> Vote | None:
        row = await self.db.fetchone(
            "SELECT * FROM votes WHERE interaction_id = ? AND user_id = ?",
            (interaction_id, user_id),
        )
        return _vote(row) if row else None

    async def votes_for(self, interaction_id: int) -> list[Vote]:
        rows = await self.db.fetchall(
            "SELECT * FROM votes WHERE interaction_id = ? ORDER BY id", (interaction_id,))
        return [_vote(r) for r in rows]

    async def set_reaction(self, interaction_id: int, chat_id: int, message_id: int,
                           user_id: int, kind: str, emojis: Sequence[str], polarity: int,
                           now: float | None = None,
                           update_id: int | None = None) -> Reaction | None:
        """The user's current reactions on one bot message (``None`` once all are removed).

        The first non-neutral polarity and its time stay as given (``first_polarity``,
        ``first_at``): the decision engine files a reaction there, so a later change cannot
        rewrite an hour it already closed. A removed reaction keeps its row, emptied."""
        at = time.time() if now is None else now
        async with self.db.transaction() as conn:
            await _hold_unforgotten(conn, user_id, update_id)  # vs the user's /forget
            await conn.execute(
                "INSERT INTO reactions (interaction_id, chat_id, message_id, user_id, kind,"
                " emojis, polarity, updated_at, first_polarity, first_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (chat_id, message_id, user_id) DO UPDATE SET"
                " emojis = excluded.emojis, polarity = excluded.polarity,"
                " updated_at = excluded.updated_at,"
                " first_polarity = CASE WHEN COALESCE(reactions.first_polarity, 0) = 0"
                "   THEN excluded.polarity ELSE reactions.first_polarity END,"
                " first_at = CASE WHEN COALESCE(reactions.first_polarity, 0) = 0"
                "   THEN excluded.updated_at ELSE reactions.first_at END",
                (interaction_id, chat_id, message_id, user_id, kind,
                 json.dumps(list(emojis), ensure_ascii=False), polarity if emojis else 0, at,
                 polarity if emojis else 0, at),
            )
        if not emojis:
            return None
        return Reaction(interaction_id, chat_id, message_id, user_id, kind, tuple(emojis),
                        polarity)

    async def reactions_for(self, interaction_id: int) -> list[Reaction]:
        rows = await self.db.fetchall(
            "SELECT * FROM reactions WHERE interaction_id = ? AND emojis != '[]' ORDER BY id",
            (interaction_id,))
        return [Reaction(int(r["interaction_id"]), int(r["chat_id"]), int(r["message_id"]),
                         int(r["user_id"]), r["kind"], tuple(json.loads(r["emojis"])),
                         int(r["polarity"])) for r in rows]

    # --- aggregates ---------------------------------------------------------------------

    async def version_counts(self) -> list[VersionCounts]:
        """Per version: verdicts shown, votes on them, correct votes, reply reactions."""
        rows = await self.db.fetchall(
            "SELECT i.version_id AS version_id,"
            " COUNT(i.label) AS verdicts,"
            " AVG(i.verdict_latency_ms) AS latency,"
            " COALESCE(SUM(v.n), 0) AS votes, COALESCE(SUM(v.c), 0) AS correct,"
            " COALESCE(SUM(r.pos), 0) AS pos, COALESCE(SUM(r.neg), 0) AS neg"
            " FROM interactions i"
            " LEFT JOIN (SELECT interaction_id, COUNT(*) AS n, SUM(correct) AS c FROM votes"
            "            GROUP BY interaction_id) v ON v.interaction_id = i.id"
            " LEFT JOIN (SELECT interaction_id,"
            "            SUM(CASE WHEN polarity > 0 THEN 1 ELSE 0 END) AS pos,"
            "            SUM(CASE WHEN polarity < 0 THEN 1 ELSE 0 END) AS neg"
            "            FROM reactions WHERE kind = 'reply'"
            "            GROUP BY interaction_id) r ON r.interaction_id = i.id"
            " GROUP BY i.version_id ORDER BY MIN(i.created_at)"
        )
        return [VersionCounts(
            version_id=r["version_id"], verdicts=int(r["verdicts"] or 0), votes=int(r["votes"]),
            correct=int(r["correct"]), reactions_positive=int(r["pos"]),
            reactions_negative=int(r["neg"]),
            mean_latency_ms=float(r["latency"]) if r["latency"] is not None else None,
        ) for r in rows]

    async def accuracy_series(self, period_s: float = 3600.0, since: float = 0.0
                              ) -> list[AccuracyPoint]:
        """Votes per version and period of the verdict's time, oldest first."""
        async with self.db.read() as conn:
            period = conn.hour_bucket("i.created_at / ?")
            rows = await conn.fetchall(
                f"SELECT i.version_id, {period} AS period,"
                " COUNT(*) AS n, SUM(v.correct) AS c"
                " FROM votes v JOIN interactions i ON i.id = v.interaction_id"
                " WHERE i.created_at >= ? GROUP BY 1, 2 ORDER BY 2, 1",
                (float(period_s), since),
            )
        return [AccuracyPoint(r[0], float(r[1]) * period_s, int(r[2]), int(r[3]))
                for r in rows]

    async def export_votes(self) -> list[ExportedVote]:
        rows = await self.db.fetchall(
            "SELECT v.*, i.created_at AS i_at, i.chat_id, i.user_id AS author, i.version_id,"
            " i.arm, i.label, i.confidence, i.text"
            " FROM votes v JOIN interactions i ON i.id = v.interaction_id ORDER BY v.id"
        )
        return [ExportedVote(
            interaction_id=int(r["interaction_id"]), interaction_at=float(r["i_at"]),
            vote_at=float(r["updated_at"]), chat_id=int(r["chat_id"]),
            user_id=int(r["author"]), voter_id=int(r["user_id"]), version_id=r["version_id"],
            arm=r["arm"], label=r["label"], confidence=r["confidence"],
            correct=bool(r["correct"]), correct_label=r["correct_label"], text=r["text"],
        ) for r in rows]

    # --- privacy ------------------------------------------------------------------------

    async def forget_user(self, user_id: int, *, before_update_id: int = 0,
                          now: float | None = None) -> ForgetResult:
        """Delete the user's messages (with everything attached to them: other users' votes and
        reactions, the other prompt's labels of the paired comparison), votes and reactions,
        and the texts of the updates they sent; leave a tombstone so that votes and reactions
        sent before ``before_update_id`` (Telegram's order) are refused if they arrive late."""
        at = time.time() if now is None else now
        async with self.db.transaction() as conn:
            await conn.lock(user_lock(user_id))
            await conn.execute(
                "INSERT INTO forgotten_users (user_id, forgotten_at, before_update_id)"
                " VALUES (?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET"
                " forgotten_at = excluded.forgotten_at,"
                " before_update_id = CASE WHEN excluded.before_update_id"
                "   > forgotten_users.before_update_id THEN excluded.before_update_id"
                "   ELSE forgotten_users.before_update_id END",
                (user_id, at, before_update_id))
            # Handled updates keep no text; their rows only recognise redeliveries.
            await conn.execute("UPDATE inbox SET payload = '{}' WHERE user_id = ?"
                               " AND state != 'pending'", (user_id,))
            own = await fetchone(
                conn,
                "SELECT (SELECT COUNT(*) FROM votes WHERE user_id = ?"
                "        OR interaction_id IN (SELECT id FROM interactions WHERE user_id = ?)),"
                " (SELECT COUNT(*) FROM reactions WHERE emojis != '[]' AND (user_id = ?"
                "        OR interaction_id IN (SELECT id FROM interactions WHERE user_id = ?)))",
                (user_id, user_id, user_id, user_id),
            )
            await conn.execute("DELETE FROM votes WHERE user_id = ?", (user_id,))
            await conn.execute("DELETE FROM reactions WHERE user_id = ?", (user_id,))
            # The other prompt's labels of the user's messages (bot.pairing): said here, not
            # left to the cascade alone, so that nothing of the user's depends on it.
            await conn.execute("DELETE FROM paired_labels WHERE interaction_id IN"
                               " (SELECT id FROM interactions WHERE user_id = ?)", (user_id,))
            # ON DELETE CASCADE removes other users' votes and reactions on these messages.
            cur = await conn.execute("DELETE FROM interactions WHERE user_id = ?", (user_id,))
            deleted = cur.rowcount
            # Mining reports quote example texts; they are rebuilt from what remains.
            await conn.execute("UPDATE candidate_proposals SET report = '{}'")
        assert own is not None
        # secure_delete overwrote the pages in the WAL; the checkpoint moves them into the
        # main file and truncates the WAL, so the words are gone from disk, not only unlinked.
        await self.db.checkpoint()
        return ForgetResult(interactions=deleted, votes=int(own[0]), reactions=int(own[1]))

    async def forgotten_before(self, user_id: int) -> int | None:
        """The update id before which the user's feedback is refused (None: never forgot)."""
        row = await self.db.fetchone(
            "SELECT before_update_id FROM forgotten_users WHERE user_id = ?", (user_id,))
        return int(row[0]) if row else None

    async def users_since(self, since: float) -> int:
        """Distinct users who wrote since ``since``."""
        row = await self.db.fetchone(
            "SELECT COUNT(DISTINCT user_id) FROM interactions WHERE created_at >= ?", (since,))
        return int(row[0]) if row else 0

    async def erase_texts_before(self, cutoff: float, now: float | None = None, *,
                                 quote_window_s: float) -> int:
        """Retention: blank message and reply texts of interactions older than ``cutoff``;
        verdicts, votes and reactions stay for the statistics. ``quote_window_s``: how far
        back the improvement loop's mining reports quote texts (its vote window)."""
        at = time.time() if now is None else now
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE interactions SET text = NULL, reply_text = NULL, text_erased_at = ?"
                " WHERE created_at < ? AND (text IS NOT NULL OR reply_text IS NOT NULL)",
                (at, cutoff),
            )
            # Mining reports quote texts of the vote window before they were made: one made
            # up to a window after the cutoff may quote a text erased now.
            await conn.execute("UPDATE candidate_proposals SET report = '{}'"
                               " WHERE report != '{}' AND created_at < ?",
                               (cutoff + quote_window_s,))
            return cur.rowcount


async def vote_totals(db: Database) -> list[tuple[str, int, int]]:
    """(version, votes, correct votes) for every version with votes (for /metrics)."""
    rows = await db.fetchall(
        "SELECT i.version_id, COUNT(*), SUM(v.correct) FROM votes v"
        " JOIN interactions i ON i.id = v.interaction_id GROUP BY i.version_id")
    return [(str(r[0]), int(r[1]), int(r[2] or 0)) for r in rows]
