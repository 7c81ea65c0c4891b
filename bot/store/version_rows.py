"""The rows behind version state and its audit log. :mod:`bot.versions` is their only
writer: it decides, this module only reads and writes what it decided.

A change reads the states with :func:`load_for_change` inside its transaction: that takes the
version lock first (PostgreSQL: a transaction-scoped advisory lock; SQLite: ``BEGIN
IMMEDIATE`` has already let one writer in), so two replicas can never both check "one active
version" and both write."""

from __future__ import annotations

from bot.store.db import Connection, Database, Record

_SELECT_STATES = "SELECT * FROM prompt_versions"
VERSION_LOCK = "loopbot:versions"


async def load(db: Database) -> list[Record]:
    return await db.fetchall(_SELECT_STATES)


async def load_for_change(conn: Connection) -> list[Record]:
    await conn.lock(VERSION_LOCK)
    return await conn.fetchall(_SELECT_STATES)


async def audit_rows(db: Database, *, limit: int, version_id: str | None) -> list[Record]:
    """Newest first."""
    if version_id is None:
        return await db.fetchall("SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", (limit,))
    return await db.fetchall(
        "SELECT * FROM audit_log WHERE version_id = ? ORDER BY id DESC LIMIT ?",
        (version_id, limit))


async def write_state(
    conn: Connection, version_id: str, state: str, *, share: float, range_start: int,
    content_hash: str, since: float, replaced: str | None,
) -> None:
    await conn.execute(
        "INSERT INTO prompt_versions (id, state, share, range_start, content_hash, state_since,"
        " replaced) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET state = excluded.state, share = excluded.share,"
        " range_start = excluded.range_start, content_hash = excluded.content_hash,"
        " state_since = excluded.state_since, replaced = excluded.replaced",
        (version_id, state, float(share), int(range_start), content_hash, float(since),
         replaced),
    )


async def append_audit(
    conn: Connection, *, at: float, actor: str, action: str, version_id: str,
    from_state: str | None, to_state: str, share: float, previous_active: str | None,
    reason: str, stats: str,
) -> Record:
    """Append one entry (the table refuses updates and deletes); returns the stored row."""
    row = await conn.fetchone(
        "INSERT INTO audit_log (at, actor, action, version_id, from_state, to_state, share,"
        " previous_active, reason, stats) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
        (float(at), actor, action, version_id, from_state, to_state, float(share),
         previous_active, reason, stats),
    )
    assert row is not None
    return row


async def last_change(db: Database) -> float | None:
    """When version state last changed (the newest audit entry), None if never."""
    row = await db.fetchone("SELECT MAX(at) FROM audit_log")
    return None if row is None or row[0] is None else float(row[0])
