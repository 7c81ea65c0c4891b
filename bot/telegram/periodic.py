"""A sweep that runs every few seconds until its owner stops, and survives failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(seconds: float, work: Callable[[], Awaitable[object]], *, what: str,
                stopped: Callable[[], bool]) -> None:
    """Run ``work`` every ``seconds`` until ``stopped()``. A failure is logged and the next
    round tries again: the database being away for a while must not end the sweep (health
    reports it meanwhile)."""
    while not stopped():
        await asyncio.sleep(seconds)
        try:
            await work()
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)
