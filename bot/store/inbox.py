"""The durable inbox: every Telegram update is committed here before Telegram is told that it
arrived, so a crash between fetching and handling loses nothing.

With long polling, Telegram forgets updates once the next ``getUpdates`` names a higher
offset; with a webhook, once the request is answered with 200. Both happen only after
:meth:`Inbox.add` returned. A stored update is handled at most once at a time (a lease, which
also lets several replicas share one inbox) and marked done afterwards; a restart picks up
what is still pending. The payload holds the user's text, so it is blanked once handled; the
row stays a day so that a redelivered update is recognised and skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bot.store.db import Database, fetchall

# Telegram keeps an unconfirmed update for 24 h; a handled one need not be remembered longer.
KEEP_DONE_S = 86_400.0
# How long a claim holds: longer than any handling (a reply may take minutes on a CPU).
LEASE_S = 600.0


@dataclass(frozen=True)
class InboxRow:
    update_id: int
    received_at: float
    payload: dict[str, Any]
    attempts: int


def sender_of(update: Mapping[str, Any]) -> int | None:
    """The user an update comes from, read from the raw JSON (any update type)."""
    for value in update.values():
        if isinstance(value, Mapping):
            who = value.get("from") or value.get("user")
            if isinstance(who, Mapping) and isinstance(who.get("id"), int):
                return int(who["id"])
    return None


class Inbox:
    def __init__(self, db: Database, owner: str = "local") -> None:
        self.db = db
        # Who claims rows: one name per process (replicas must differ).
        self.owner = owner

    async def add(self, updates: Sequence[Mapping[str, Any]], *,
                  now: float | None = None) -> list[int]:
        """Store updates (one transaction); returns the ids that were new. An update seen
        before (a redelivery) is not stored again and not returned."""
        at = time.time() if now is None else now
        new: list[int] = []
        async with self.db.transaction() as conn:
            for update in updates:
                update_id = int(update["update_id"])
                cur = await conn.execute(
                    "INSERT INTO inbox (update_id, received_at, user_id, payload)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (update_id) DO NOTHING",
                    (update_id, at, sender_of(update), json.dumps(update, ensure_ascii=False)))
                if cur.rowcount == 1:
                    new.append(update_id)
        return new

    async def claim(self, update_id: int, *, now: float | None = None,
                    lease_s: float = LEASE_S) -> InboxRow | None:
        """Take a pending update for handling; None when it is done, poison or claimed by
        someone else whose lease has not run out."""
        at = time.time() if now is None else now
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE inbox SET claimed_by = ?, claimed_until = ?, attempts = attempts + 1"
                " WHERE update_id = ? AND state = 'pending'"
                " AND (claimed_until IS NULL OR claimed_until < ? OR claimed_by = ?)",
                (self.owner, at + lease_s, update_id, at, self.owner))
            if cur.rowcount != 1:
                return None
            (row,) = await fetchall(
                conn, "SELECT update_id, received_at, payload, attempts FROM inbox"
                " WHERE update_id = ?", (update_id,))
        return InboxRow(int(row[0]), float(row[1]), json.loads(row[2]), int(row[3]))

    async def pending(self, *, now: float | None = None, limit: int = 1000) -> list[int]:
        """Update ids waiting to be handled (unclaimed, or their lease ran out), oldest
        first."""
        at = time.time() if now is None else now
        rows = await self.db.fetchall(
            "SELECT update_id FROM inbox WHERE state = 'pending'"
            " AND (claimed_until IS NULL OR claimed_until < ? OR claimed_by = ?)"
            " ORDER BY update_id LIMIT ?", (at, self.owner, limit))
        return [int(r[0]) for r in rows]

    async def release(self, update_id: int) -> None:
        """Give a claimed update back (the handler was stopped): the next start takes it."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE inbox SET claimed_by = NULL, claimed_until = NULL"
                " WHERE update_id = ? AND state = 'pending'", (update_id,))

    async def finish(self, update_id: int, *, poison: bool = False, error: str | None = None,
                     now: float | None = None) -> None:
        """Handled (or unusable): the payload, with the user's words, is blanked."""
        at = time.time() if now is None else now
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE inbox SET state = ?, payload = '{}', done_at = ?, error = ?,"
                " claimed_until = NULL WHERE update_id = ?",
                ("poison" if poison else "done", at, error, update_id))

    async def prune(self, *, now: float | None = None, keep_s: float = KEEP_DONE_S) -> int:
        """Forget handled updates older than ``keep_s`` (Telegram no longer redelivers them)."""
        at = time.time() if now is None else now
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "DELETE FROM inbox WHERE state != 'pending' AND done_at < ?", (at - keep_s,))
            return cur.rowcount

    async def counts(self) -> dict[str, int]:
        rows = await self.db.fetchall("SELECT state, COUNT(*) FROM inbox GROUP BY state")
        return {str(state): int(n) for state, n in rows}
