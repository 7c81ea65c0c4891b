"""Updates in: long polling into the durable inbox, and the dispatcher that hands stored
updates to python-telegram-bot's handlers.

PTB's own polling confirms a batch to Telegram by asking for the next one while the batch is
still being handled, and it parses the whole batch at once: a crash lost what was fetched, and
one update the library could not parse stopped polling for good. Here the raw batch is stored
first (:class:`bot.store.inbox.Inbox`), the offset that confirms it is sent only after the
commit, and each update is parsed and handled on its own: an unusable one is marked and
skipped, and polling goes on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

from telegram import Update
from telegram.error import Conflict, Forbidden, InvalidToken, NetworkError, RetryAfter
from telegram.warnings import PTBUserWarning

from bot.store.inbox import Inbox
from bot.telegram.handlers.messages import apologise_for_restart
from bot.telegram.periodic import every
from bot.telegram.sender import retry_seconds
from bot.telegram.state import BotApp

log = logging.getLogger(__name__)
# getUpdates is called raw on purpose (PTB would parse, and fail on, the whole batch).
warnings.filterwarnings("ignore", message="Please use 'Bot.getUpdates'",
                        category=PTBUserWarning)

# At most this many updates are handled at once (each holds little but its model job).
CONCURRENT_UPDATES = 64
# A message this old when it is finally handled (after a long outage) gets a short "sorry,
# I was restarting" instead of a verdict: the user has moved on, and a burst of stale
# answers would only bury the chat.
STALE_AFTER_S = 3600.0
BACKOFF_MAX_S = 30.0


class Dispatcher:
    """Handles stored updates: claim, parse, run the handlers, mark done."""

    def __init__(self, app: BotApp, inbox: Inbox, *,
                 concurrency: int = CONCURRENT_UPDATES) -> None:
        self.app, self.inbox = app, inbox
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        # Updates this process is handling: a resume sweep must not start them twice.
        self._inflight: set[int] = set()
        self._stopping = False

    def submit(self, update_ids: Sequence[int]) -> None:
        for update_id in update_ids:
            if self._stopping:
                return
            if update_id in self._inflight:
                continue
            self._inflight.add(update_id)
            task = asyncio.create_task(self._handle(update_id),
                                       name=f"loopbot-update-{update_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(functools.partial(self._done, update_id))

    def _done(self, update_id: int, _task: asyncio.Task[None]) -> None:
        self._inflight.discard(update_id)

    async def resume_forever(self, every_s: float) -> None:
        """Replicas: now and then take up updates whose claim ran out (a replica that died
        while handling them), and any stored while nobody handed them over."""
        await every(every_s, self.resume, what="inbox sweep", stopped=lambda: self._stopping)

    async def resume(self) -> int:
        """Hand over what an earlier run stored but did not finish; returns how many."""
        pending = await self.inbox.pending()
        if pending:
            log.info("resuming %d updates stored before the restart", len(pending))
        self.submit(pending)
        return len(pending)

    @property
    def busy(self) -> int:
        return len(self._tasks)

    async def stop(self, timeout: float) -> None:
        """Let running handlers finish within ``timeout``; the rest stay pending in the
        inbox (handling is idempotent per update, so the next start redoes them)."""
        self._stopping = True
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _handle(self, update_id: int) -> None:
        async with self._slots:
            row = await self.inbox.claim(update_id)
            if row is None:
                return  # handled already, or by another replica
            try:
                update = Update.de_json(row.payload, self.app.bot)
            except Exception as exc:
                # Logged once, without the payload (it may hold users' words).
                log.warning("update %s cannot be read (%s): skipped", update_id,
                            type(exc).__name__)
                await self.inbox.finish(update_id, poison=True, error=type(exc).__name__)
                return
            try:
                await self._process(update, row.payload)
            except asyncio.CancelledError:
                await asyncio.shield(self.inbox.release(update_id))
                raise
            await self.inbox.finish(update_id)

    async def _process(self, update: Update, payload: dict[str, Any]) -> None:
        if _stale(payload):
            await apologise_for_restart(self.app, update)
            return
        # PTB runs the handlers and routes their errors to the error handler.
        await self.app.process_update(update)


def _stale(payload: dict[str, Any]) -> bool:
    message = payload.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("date"), int):
        return False
    return bool(time.time() - int(message["date"]) > STALE_AFTER_S)


class Poller:
    """Long polling: getUpdates → inbox (committed) → dispatcher; the next getUpdates
    confirms the batch to Telegram only after the commit."""

    def __init__(self, app: BotApp, inbox: Inbox, dispatcher: Dispatcher, *,
                 timeout_s: int, allowed_updates: Sequence[str]) -> None:
        self.app, self.inbox, self.dispatcher = app, inbox, dispatcher
        self.timeout_s = timeout_s
        self.allowed_updates = list(allowed_updates)
        self.offset: int | None = None

    async def run(self) -> None:
        """Until cancelled. A rejected token or a competing webhook/poller ends it with the
        error; network trouble is retried with backoff."""
        bot = self.app.bot
        await bot.delete_webhook(drop_pending_updates=False)
        failures = 0
        while True:
            try:
                raw = await bot.do_api_request(
                    "getUpdates",
                    api_kwargs={"offset": self.offset, "timeout": self.timeout_s,
                                "allowed_updates": self.allowed_updates},
                    read_timeout=self.timeout_s + 10.0)
                await self._store(raw)
                failures = 0
            except (InvalidToken, Forbidden, Conflict):
                raise
            except RetryAfter as exc:
                await asyncio.sleep(retry_seconds(exc.retry_after))
            except (NetworkError, OSError) as exc:
                failures += 1
                delay = min(BACKOFF_MAX_S, 0.5 * 2 ** min(failures, 8))
                log.warning("getUpdates failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
            except Exception:
                # The inbox refused the batch (database trouble): Telegram keeps it, since
                # the offset did not move; try again after a pause.
                failures += 1
                log.exception("could not store updates; they stay with Telegram")
                await asyncio.sleep(min(BACKOFF_MAX_S, 0.5 * 2 ** min(failures, 8)))

    async def _store(self, raw: Any) -> None:
        if not isinstance(raw, list):
            return
        usable = [u for u in raw if isinstance(u, dict) and isinstance(u.get("update_id"), int)]
        if len(usable) < len(raw):
            log.warning("getUpdates returned %d entries without an update id: skipped",
                        len(raw) - len(usable))
        if not usable:
            return
        new = await self.inbox.add(usable)
        self.offset = max(int(u["update_id"]) for u in usable) + 1
        self.dispatcher.submit(new)
