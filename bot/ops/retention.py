"""Retention: users' message texts are kept ``storage.retention_days``, then blanked.

Only the words go: the verdict, its label and probabilities, votes and reactions stay, because
the statistics (and the decisions already taken on them) must remain reproducible.
"""

from __future__ import annotations

import logging
import time

from bot.learning.cycle import VOTE_WINDOW_S
from bot.store.db import Database
from bot.store.queries import Store

log = logging.getLogger(__name__)

DAY_S = 86_400.0


async def erase_old_texts(db: Database, days: int, now: float | None = None) -> int:
    """Blank ``interactions.text`` and the bot's reply text of every interaction created more
    than ``days`` days before ``now`` (Unix seconds; default: the clock). ``days`` <= 0 keeps
    texts forever. Returns how many interactions were erased by this call."""
    if days <= 0:
        return 0
    at = time.time() if now is None else now
    # The store owns the UPDATE, so /forget and retention blank the same columns.
    erased = await Store(db).erase_texts_before(at - days * DAY_S, now=at,
                                               quote_window_s=VOTE_WINDOW_S)
    if erased:
        log.info("retention: erased the texts of %d interactions older than %d days",
                 erased, days)
    return erased
