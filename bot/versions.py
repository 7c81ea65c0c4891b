"""Which prompt version is active, which are candidates, which are retired.

This module is the only writer of that state. Each change runs in one transaction together with
its append-only audit entry (who, when, why, the statistics behind it), so a crash leaves either
the old state or the new one, and never a change without its explanation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot import routing
from bot.errors import LoopbotError
from bot.prompts import PromptVersion
from bot.store import version_rows
from bot.store.db import Connection, Database, Record
from bot.store.outbox import Outgoing, add_outgoing

ACTIVE = "active"
CANDIDATE = "candidate"
RETIRED = "retired"


class VersionError(LoopbotError, ValueError):
    """A requested state change is not possible; the message says why, for the admin."""


@dataclass(frozen=True)
class VersionState:
    version_id: str
    state: str
    share: float
    range_start: int
    content_hash: str
    since: float
    replaced: str | None

    def slice(self) -> routing.Slice:
        return routing.Slice(self.version_id, self.range_start, self.share)


@dataclass(frozen=True)
class Deployment:
    """A consistent snapshot of all version states."""

    active: VersionState | None
    candidates: tuple[VersionState, ...]
    retired: tuple[VersionState, ...]

    def slices(self) -> tuple[routing.Slice, ...]:
        return tuple(c.slice() for c in self.candidates)

    def get(self, version_id: str) -> VersionState | None:
        for state in (self.active, *self.candidates, *self.retired):
            if state is not None and state.version_id == version_id:
                return state
        return None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    version_id: str
    from_state: str | None
    to_state: str
    share: float
    previous_active: str | None
    reason: str
    stats: dict[str, Any] = field(default_factory=dict)


def _state(row: Record) -> VersionState:
    return VersionState(
        version_id=row["id"], state=row["state"], share=float(row["share"]),
        range_start=int(row["range_start"]), content_hash=row["content_hash"],
        since=float(row["state_since"]), replaced=row["replaced"],
    )


def _entry(row: Record) -> AuditEntry:
    return AuditEntry(
        id=int(row["id"]), at=float(row["at"]), actor=row["actor"], action=row["action"],
        version_id=row["version_id"], from_state=row["from_state"], to_state=row["to_state"],
        share=float(row["share"]), previous_active=row["previous_active"],
        reason=row["reason"], stats=json.loads(row["stats"]),
    )


def _snapshot(rows: list[Record]) -> Deployment:
    states = [_state(r) for r in rows]
    active = next((s for s in states if s.state == ACTIVE), None)
    candidates = tuple(sorted((s for s in states if s.state == CANDIDATE),
                              key=lambda s: (s.since, s.version_id)))
    retired = tuple(sorted((s for s in states if s.state == RETIRED),
                           key=lambda s: s.version_id))
    return Deployment(active, candidates, retired)





# Checked inside a change's transaction; raises VersionError when the state is not what the
# caller decided on (e.g. the engine's snapshot, while an admin changed something meanwhile).
Expectation = Callable[[Deployment], None]
# What to tell about a change (the admins' message), stored in the outbox in the change's own
# transaction: a change is never told twice or not at all, whichever replica made it and
# even if that replica dies right after the commit.
Notes = Callable[["AuditEntry"], Sequence[Outgoing]]


async def _note(conn: Connection, notes: Notes | None, entry: AuditEntry) -> AuditEntry:
    if notes is not None:
        await add_outgoing(conn, notes(entry), entry.at)
    return entry

async def load(db: Database) -> Deployment:
    return _snapshot(await version_rows.load(db))


async def audit_log(db: Database, *, limit: int = 50, version_id: str | None = None
                    ) -> list[AuditEntry]:
    """Newest first."""
    rows = await version_rows.audit_rows(db, limit=limit, version_id=version_id)
    return [_entry(r) for r in rows]


async def _write(
    conn: Connection, version_id: str, state: str, *, share: float = 0.0,
    range_start: int = 0, content_hash: str, since: float, replaced: str | None,
) -> None:
    await version_rows.write_state(conn, version_id, state, share=share,
                                   range_start=range_start, content_hash=content_hash,
                                   since=since, replaced=replaced)


async def _audit(
    conn: Connection, *, at: float, actor: str, action: str, version_id: str,
    from_state: str | None, to_state: str, share: float = 0.0,
    previous_active: str | None = None, reason: str, stats: Mapping[str, Any] | None,
) -> AuditEntry:
    blob = json.dumps(dict(stats or {}), ensure_ascii=False, sort_keys=True, default=str)
    row = await version_rows.append_audit(
        conn, at=at, actor=actor, action=action, version_id=version_id,
        from_state=from_state, to_state=to_state, share=share,
        previous_active=previous_active, reason=reason, stats=blob)
    return _entry(row)


async def _current(conn: Connection) -> Deployment:
    """The states, read under the version lock: the change that follows is decided on a
    snapshot nobody else can change before this transaction commits."""
    return _snapshot(await version_rows.load_for_change(conn))


def _shown(version_id: str) -> str:
    """An id as echoed in an error: bounded, the message goes back to a chat (4096 at most)."""
    return version_id if len(version_id) <= 64 else version_id[:61] + "..."


def _known(versions: Mapping[str, PromptVersion], version_id: str) -> PromptVersion:
    try:
        return versions[version_id]
    except KeyError:
        # The list is bounded too.
        shown = _shown(version_id)
        names = sorted(versions)
        known = ", ".join(names[:20]) or "none"
        if len(names) > 20:
            known += f" and {len(names) - 20} more (/versions)"
        raise VersionError(f"unknown version '{shown}' (known: {known})") from None


async def ensure_active(
    db: Database, versions: Mapping[str, PromptVersion], default_id: str, *,
    actor: str = "system", now: float | None = None,
) -> str:
    """The active version's id; on a fresh database ``default_id`` is made active (audited)."""
    at = time.time() if now is None else now
    async with db.transaction() as conn:
        current = await _current(conn)
        if current.active is not None:
            return current.active.version_id
        version = _known(versions, default_id)
        previous = current.get(default_id)
        await _write(conn, default_id, ACTIVE, content_hash=version.content_hash, since=at,
                     replaced=None)
        await _audit(conn, at=at, actor=actor, action="init", version_id=default_id,
                     from_state=previous.state if previous else None, to_state=ACTIVE,
                     reason="no active version yet: the configured default", stats=None)
        return default_id


async def promote(
    db: Database, version_id: str, versions: Mapping[str, PromptVersion], *, actor: str,
    reason: str, stats: Mapping[str, Any] | None = None, now: float | None = None,
    expect: Expectation | None = None, notes: Notes | None = None,
) -> AuditEntry:
    """Make ``version_id`` the active version for everybody; the old active is retired and
    remembered as the rollback target."""
    at = time.time() if now is None else now
    version = _known(versions, version_id)
    async with db.transaction() as conn:
        current = await _current(conn)
        if expect is not None:
            expect(current)  # inside the transaction: nobody can change it in between
        old = current.active
        if old is not None and old.version_id == version_id:
            raise VersionError(f"'{version_id}' is already the active version")
        target = current.get(version_id)
        if old is not None:
            await _write(conn, old.version_id, RETIRED, content_hash=old.content_hash,
                         since=at, replaced=old.replaced)
        await _write(conn, version_id, ACTIVE, content_hash=version.content_hash, since=at,
                     replaced=old.version_id if old else None)
        return await _note(conn, notes, await _audit(
            conn, at=at, actor=actor, action="promote", version_id=version_id,
            from_state=target.state if target else None, to_state=ACTIVE,
            previous_active=old.version_id if old else None, reason=reason, stats=stats,
        ))


async def rollback(
    db: Database, versions: Mapping[str, PromptVersion], *, actor: str, reason: str,
    stats: Mapping[str, Any] | None = None, now: float | None = None,
) -> AuditEntry:
    """Back to the version the current active one replaced, at once. Repeated rollbacks walk
    further back through the promotions."""
    at = time.time() if now is None else now
    async with db.transaction() as conn:
        current = await _current(conn)
        active = current.active
        if active is None:
            raise VersionError("there is no active version to roll back from")
        if active.replaced is None:
            raise VersionError(
                f"'{active.version_id}' did not replace another version: nothing to roll back to"
            )
        target_id = active.replaced
        version = _known(versions, target_id)
        target = current.get(target_id)
        await _write(conn, active.version_id, RETIRED, content_hash=active.content_hash,
                     since=at, replaced=active.replaced)
        # The restored version keeps its own rollback target, so a second rollback goes
        # one step further back instead of flipping between two versions.
        # ... unless its own target is the version just rolled back from (A → B → A by
        # promotion): going "back" there would flip between the two for ever.
        back = target.replaced if target else None
        await _write(conn, target_id, ACTIVE, content_hash=version.content_hash, since=at,
                     replaced=None if back == active.version_id else back)
        return await _audit(
            conn, at=at, actor=actor, action="rollback", version_id=target_id,
            from_state=target.state if target else None, to_state=ACTIVE,
            previous_active=active.version_id, reason=reason, stats=stats,
        )


async def set_canary(
    db: Database, version_id: str, percent: float, versions: Mapping[str, PromptVersion], *,
    actor: str, reason: str, stats: Mapping[str, Any] | None = None, now: float | None = None,
    expect: Expectation | None = None, notes: Notes | None = None,
) -> AuditEntry:
    """Serve ``version_id`` to ``percent`` % of users. A running candidate keeps its range
    (raising the share keeps its users) and its test; a new one starts a test now."""
    at = time.time() if now is None else now
    version = _known(versions, version_id)
    if not 0.0 < percent <= 100.0:
        raise VersionError(f"the canary share must be above 0 and at most 100 %, got {percent}")
    share = percent / 100.0
    async with db.transaction() as conn:
        current = await _current(conn)
        if expect is not None:
            expect(current)  # inside the transaction: nobody can change it in between
        if current.active is not None and current.active.version_id == version_id:
            raise VersionError(f"'{version_id}' is the active version; it serves everyone else")
        existing = current.get(version_id)
        others = [s for s in current.slices() if s.version_id != version_id]
        try:
            if existing is not None and existing.state == CANDIDATE:
                start, since, digest = existing.range_start, existing.since, existing.content_hash
                routing.check_resize(others, routing.Slice(version_id, start, share))
            else:
                start, since, digest = routing.place(others, share), at, version.content_hash
        except routing.RoutingError as exc:
            raise VersionError(str(exc)) from exc
        await _write(conn, version_id, CANDIDATE, share=share, range_start=start,
                     content_hash=digest, since=since,
                     replaced=existing.replaced if existing else None)
        return await _note(conn, notes, await _audit(
            conn, at=at, actor=actor, action="canary", version_id=version_id,
            from_state=existing.state if existing else None, to_state=CANDIDATE, share=share,
            previous_active=current.active.version_id if current.active else None,
            reason=reason, stats=stats,
        ))


async def retire(
    db: Database, version_id: str, *, actor: str, reason: str,
    stats: Mapping[str, Any] | None = None, now: float | None = None,
    expect: Expectation | None = None, notes: Notes | None = None,
) -> AuditEntry:
    """Stop serving a candidate (its users go back to the active version)."""
    at = time.time() if now is None else now
    async with db.transaction() as conn:
        current = await _current(conn)
        if expect is not None:
            expect(current)  # inside the transaction: nobody can change it in between
        existing = current.get(version_id)
        if existing is None:
            raise VersionError(
                f"unknown version '{_shown(version_id)}': it has never been served")
        if existing.state == ACTIVE:
            raise VersionError(
                f"'{version_id}' is the active version: promote or roll back to another first"
            )
        if existing.state == RETIRED:
            raise VersionError(f"'{version_id}' is already retired")
        await _write(conn, version_id, RETIRED, content_hash=existing.content_hash, since=at,
                     replaced=existing.replaced)
        return await _note(conn, notes, await _audit(
            conn, at=at, actor=actor, action="retire", version_id=version_id,
            from_state=existing.state, to_state=RETIRED,
            previous_active=current.active.version_id if current.active else None,
            reason=reason, stats=stats,
        ))


async def restart_edited(
    db: Database, versions: Mapping[str, PromptVersion], *, actor: str = "system",
    now: float | None = None, stats: Mapping[str, Any] | None = None,
    notes: Notes | None = None,
) -> list[AuditEntry]:
    """A version whose YAML changed since its test began is a different treatment: its test
    starts again from now (votes before ``since`` no longer count for it). For the active
    version that restarts every running test (a test starts at the later ``since`` of its two
    arms)."""
    at = time.time() if now is None else now
    entries: list[AuditEntry] = []
    async with db.transaction() as conn:
        current = await _current(conn)
        active = current.active
        edited = versions.get(active.version_id) if active is not None else None
        if active is not None and edited is not None and active.content_hash not in (
                "", edited.content_hash):
            await _write(conn, active.version_id, ACTIVE, content_hash=edited.content_hash,
                         since=at, replaced=active.replaced)
            entries.append(await _note(conn, notes, await _audit(
                conn, at=at, actor=actor, action="restart", version_id=active.version_id,
                from_state=ACTIVE, to_state=ACTIVE, previous_active=active.replaced,
                reason=f"active prompt file changed ({active.content_hash} -> "
                       f"{edited.content_hash}): running tests start again",
                stats=stats,
            )))
        for cand in current.candidates:
            version = versions.get(cand.version_id)
            if version is None or version.content_hash == cand.content_hash:
                continue
            await _write(conn, cand.version_id, CANDIDATE, share=cand.share,
                         range_start=cand.range_start, content_hash=version.content_hash,
                         since=at, replaced=cand.replaced)
            entries.append(await _note(conn, notes, await _audit(
                conn, at=at, actor=actor, action="restart", version_id=cand.version_id,
                from_state=CANDIDATE, to_state=CANDIDATE, share=cand.share,
                previous_active=current.active.version_id if current.active else None,
                reason=f"prompt file changed ({cand.content_hash} -> {version.content_hash})",
                stats=stats,
            )))
    return entries
