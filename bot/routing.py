"""Sticky routing: user -> bucket -> prompt version. Pure functions, no I/O.

Every user falls into one of ``BUCKETS`` buckets by a salted hash, so the assignment never
changes while the salt stays. A candidate owns the bucket range that starts at ``start``; with
share ``s`` it serves the buckets ``start <= b < start + s * BUCKETS``. Raising ``s`` only
extends the range, so every user already in keeps seeing the candidate (their feedback stays
comparable across the ramp).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from bot.errors import LoopbotError

BUCKETS = 10_000
ACTIVE = "active"
CANDIDATE = "candidate"


class RoutingError(LoopbotError, ValueError):
    """The requested traffic split cannot be laid out in the bucket space."""


def bucket(user_id: int, salt: str) -> int:
    """The user's bucket in ``[0, BUCKETS)``; SHA-256 so ids that differ by one spread out."""
    digest = hashlib.sha256(f"{salt}\x1f{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Slice:
    """A candidate's share of traffic: the buckets from ``start`` on, ``share * BUCKETS`` wide."""

    version_id: str
    start: int
    share: float

    @property
    def end(self) -> float:
        return self.start + self.share * BUCKETS

    def serves(self, user_bucket: int) -> bool:
        return self.start <= user_bucket and user_bucket - self.start < self.share * BUCKETS


@dataclass(frozen=True)
class Assignment:
    version_id: str
    arm: str  # ACTIVE or CANDIDATE
    bucket: int


def assign(user_id: int, salt: str, active_id: str, candidates: Sequence[Slice]) -> Assignment:
    """The version that serves ``user_id``: the candidate whose range holds the bucket, else
    the active version."""
    b = bucket(user_id, salt)
    for candidate in candidates:
        if candidate.serves(b):
            return Assignment(candidate.version_id, CANDIDATE, b)
    return Assignment(active_id, ACTIVE, b)


def _check_share(share: float) -> None:
    if not 0.0 < share <= 1.0:
        raise RoutingError(f"share must be in (0, 1], got {share}")


def place(others: Sequence[Slice], share: float) -> int:
    """Where a new candidate's range starts, in the widest free gap.

    Ranges only grow upwards, so a gap right after another candidate is split in the middle:
    the neighbour below can still ramp up into the lower half and the new candidate into the
    upper one. A gap with nobody below it (the start of the bucket space) is used from its
    beginning.
    """
    _check_share(share)
    gaps: list[tuple[float, int, bool]] = []
    cursor = 0.0
    for other in sorted(others, key=lambda s: s.start):
        if other.start > cursor:
            gaps.append((other.start - _ceil(cursor), _ceil(cursor), cursor > 0))
        cursor = max(cursor, other.end)
    if cursor < BUCKETS:
        gaps.append((BUCKETS - _ceil(cursor), _ceil(cursor), cursor > 0))
    width = share * BUCKETS
    fitting = [gap for gap in gaps if gap[0] >= width]
    if not fitting:
        taken = ", ".join(f"{s.version_id} {s.share:.0%}" for s in others)
        raise RoutingError(f"no free range of {share:.0%} of users (candidates hold: {taken})")
    gap_width, gap_start, after_another = max(fitting, key=lambda gap: (gap[0], -gap[1]))
    if not after_another:
        return gap_start
    return gap_start + int((gap_width - width) // 2)


def room(others: Sequence[Slice], start: int) -> float:
    """The largest share a range starting at ``start`` can grow to without running into
    another candidate's range or past the last bucket."""
    ceiling = min((o.start for o in others if o.start >= start), default=BUCKETS)
    return max(0.0, (ceiling - start) / BUCKETS)


def check_resize(others: Sequence[Slice], resized: Slice) -> None:
    """Refuse a share that would run into another candidate's range or past the last bucket."""
    _check_share(resized.share)
    if resized.end > BUCKETS + 1e-9:
        raise RoutingError(
            f"{resized.version_id}: a share of {resized.share:.0%} starting at bucket "
            f"{resized.start} runs past the end of the bucket space"
        )
    for other in others:
        if other.version_id == resized.version_id:
            continue
        if resized.start < other.end and other.start < resized.end:
            raise RoutingError(
                f"{resized.version_id}: a share of {resized.share:.0%} would overlap "
                f"candidate {other.version_id} ({other.share:.0%})"
            )


def _ceil(value: float) -> int:
    whole = int(value)
    return whole if whole == value else whole + 1
