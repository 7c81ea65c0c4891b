"""The durable outbox: what the bot must send, stored with what it answers.

A verdict is written in the same transaction as its interaction, a reply with the reply text,
so a crash can no longer leave a stored verdict that is never shown: the sender finds the row
after a restart. Delivery happens outside the update handlers (:mod:`bot.telegram.sender`),
per chat and under Telegram's limits. A sent row keeps the message id and loses its text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bot.store.db import Connection, Database, fetchall

OutboxKind = Literal["verdict", "reply", "notice"]
GROUP_TYPES = frozenset({"group", "supergroup", "channel"})


@dataclass(frozen=True)
class Outgoing:
    """A message to send: ``payload`` holds the Bot API's sendMessage parameters (``text``,
    optionally ``reply_markup`` and ``reply_parameters``) as plain JSON."""

    chat_id: int
    chat_type: str
    kind: OutboxKind
    payload: dict[str, Any]
    interaction_id: int | None = None

    @property
    def is_group(self) -> bool:
        return self.chat_type in GROUP_TYPES


@dataclass(frozen=True)
class OutboxItem:
    id: int
    created_at: float
    chat_id: int
    chat_type: str
    interaction_id: int | None
    kind: OutboxKind
    payload: dict[str, Any]
    attempts: int


async def add_outgoing(conn: Connection, items: Sequence[Outgoing],
                       now: float) -> None:
    """Inside an open transaction: store what must be sent with what the transaction
    writes."""
    await conn.executemany(
        "INSERT INTO outbox (created_at, chat_id, chat_type, interaction_id, kind, payload)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(now, o.chat_id, o.chat_type, o.interaction_id, o.kind,
          json.dumps(o.payload, ensure_ascii=False)) for o in items])


def _item(row: Sequence[Any]) -> OutboxItem:
    return OutboxItem(int(row[0]), float(row[1]), int(row[2]), str(row[3]),
                      None if row[4] is None else int(row[4]), row[5], json.loads(row[6]),
                      int(row[7]))


_COLUMNS = "id, created_at, chat_id, chat_type, interaction_id, kind, payload, attempts"


class Outbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, items: Sequence[Outgoing], *, now: float | None = None) -> None:
        async with self.db.transaction() as conn:
            await add_outgoing(conn, items, time.time() if now is None else now)

    async def chats_pending(self) -> list[tuple[int, str]]:
        """Chats with something to send (chat id, chat type), the longest waiting first."""
        rows = await self.db.fetchall(
            "SELECT chat_id, chat_type, MIN(id) AS first FROM outbox WHERE state = 'pending'"
            " GROUP BY chat_id, chat_type ORDER BY first")
        return [(int(r[0]), str(r[1])) for r in rows]

    async def next_for(self, chat_id: int) -> tuple[OutboxItem | None, float | None]:
        """The chat's oldest pending message, or (None, when the next one may be retried)."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS}, not_before FROM outbox WHERE state = 'pending'"
            " AND chat_id = ? ORDER BY id LIMIT 1", (chat_id,))
        if not rows:
            return None, None
        row = rows[0]
        if float(row[8]) > time.time():
            return None, float(row[8])
        return _item(row), None

    async def is_pending(self, item_id: int) -> bool:
        row = await self.db.fetchone("SELECT state FROM outbox WHERE id = ?", (item_id,))
        return row is not None and row[0] == "pending"

    async def backlog(self, chat_id: int) -> int:
        row = await self.db.fetchone(
            "SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND chat_id = ?", (chat_id,))
        return int(row[0]) if row else 0

    async def mark_sent(self, item: OutboxItem, message_id: int,
                        *, now: float | None = None) -> None:
        """Delivered: remember the message (votes and reactions on it find their verdict or
        reply) and forget the text."""
        at = time.time() if now is None else now
        async with self.db.transaction() as conn:
            await conn.execute(
                # Only a pending row: a row another replica already settled stays as it is.
                "UPDATE outbox SET state = 'sent', sent_at = ?, sent_message_id = ?,"
                " payload = '{}', attempts = attempts + 1 WHERE id = ? AND state = 'pending'",
                (at, message_id, item.id))
            if item.interaction_id is None or item.kind == "notice":
                return
            if item.kind == "verdict":
                await conn.execute(
                    "UPDATE interactions SET verdict_message_id = ? WHERE id = ?",
                    (message_id, item.interaction_id))
            # The interaction may be gone (/forget meanwhile): nothing to attach then.
            await conn.execute(
                "INSERT INTO bot_messages (chat_id, message_id, interaction_id, kind)"
                " SELECT CAST(? AS BIGINT), CAST(? AS BIGINT), CAST(? AS BIGINT), ?"
                " WHERE EXISTS (SELECT 1 FROM interactions WHERE id = ?)"
                " ON CONFLICT (chat_id, message_id) DO NOTHING",
                (item.chat_id, message_id, item.interaction_id, item.kind,
                 item.interaction_id))

    async def retry_later(self, item: OutboxItem, error: str, delay_s: float) -> None:
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, not_before = ?, error = ?"
                " WHERE id = ? AND state = 'pending'",
                (time.time() + delay_s, error[:500], item.id))

    async def fail(self, item: OutboxItem, error: str, *, state: str = "failed") -> None:
        """Telegram refused for good (blocked, chat gone, bad request): never retried."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, payload = '{}',"
                " error = ?, sent_at = ? WHERE id = ? AND state = 'pending'",
                (state, error[:500], time.time(), item.id))

    async def lease_chat(self, chat_id: int, owner: str, *, lease_s: float,
                         now: float | None = None) -> bool:
        """Become (or stay) the one sender of a chat for ``lease_s`` seconds. With several
        replicas, one sender per chat keeps Telegram's per-chat limit and the order of the
        chat's messages; False while another replica's lease runs."""
        at = time.time() if now is None else now
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO chat_senders (chat_id, owner, lease_until) VALUES (?, ?, ?)"
                " ON CONFLICT (chat_id) DO UPDATE SET owner = excluded.owner,"
                " lease_until = excluded.lease_until"
                " WHERE chat_senders.owner = excluded.owner OR chat_senders.lease_until < ?",
                (chat_id, owner, at + lease_s, at))
        return cur.rowcount == 1

    async def release_chat(self, chat_id: int, owner: str) -> None:
        async with self.db.transaction() as conn:
            await conn.execute("DELETE FROM chat_senders WHERE chat_id = ? AND owner = ?",
                               (chat_id, owner))

    async def counts(self) -> dict[str, int]:
        rows = await self.db.fetchall("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        return {str(state): int(n) for state, n in rows}

    async def pending_ids(self, chat_id: int) -> list[int]:
        async with self.db.transaction() as conn:
            rows = await fetchall(
                conn, "SELECT id FROM outbox WHERE state = 'pending' AND chat_id = ?"
                " ORDER BY id", (chat_id,))
        return [int(r[0]) for r in rows]
