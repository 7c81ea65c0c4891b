"""Fair sending: the outbox is delivered per chat, under Telegram's limits, outside the update
handlers.

Telegram lets one bot send about 30 messages a second overall, one a second into a private
chat and 20 a minute into a group. A handler that waited for those limits itself would hold
its slot while it waits, so one busy group could stall every other chat. Here each chat with
something to send has its own worker; a worker waits only for its own chat's limit and for
the shared overall one, so a slow group delays nobody else.

Failures: a network error, a 5xx or a 429 is retried with backoff (the row stays pending in
the database, so a restart retries too); a refusal that cannot change (the user blocked the
bot, the chat is gone, a bad request) is recorded and not retried.

Several replicas: each chat has one sender at a time, the replica holding the chat's lease
in the database (:meth:`Outbox.lease_chat`), so the per-chat limits and the order of a chat's
messages hold whichever replica stored them; the overall limit is divided among the replicas
(``telegram.replicas``). A sweep finds rows other replicas stored (admin notes of a job that
ran there) or left behind (a replica that died): their chats' leases expire and are taken.

A group whose backlog reaches ``backlog_limit`` messages is told that the bot is busy (at
most once every ten minutes), and what it sends meanwhile is dropped before the model runs:
visibly (the notice, and a count in the metrics), never silently.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from telegram import Bot, InlineKeyboardMarkup, Message, ReplyParameters
from telegram.constants import ChatAction
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError

from bot.ops.metrics import Metrics
from bot.store.outbox import GROUP_TYPES, Outbox, OutboxItem
from bot.telegram.periodic import every

log = logging.getLogger(__name__)

# Retries of a send that may succeed later: 1 s, 2 s, 4 s ... up to a minute apart, for at most
# a day (Telegram would not want a day-old answer shown; the row is marked failed then).
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
GIVE_UP_AFTER_S = 86_400.0
# How long a chat's sender holds the chat (renewed while it sends; a replica killed mid-send
# leaves a lease that expires this long after its last renewal).
CHAT_LEASE_S = 30.0
# Replicas: how often each looks for chats with pending rows it was not told about.
SENDER_SWEEP_S = 2.0
# A group over its backlog is told so at most this often.
BUSY_NOTICE_EVERY_S = 600.0


@dataclass(frozen=True)
class SendLimits:
    """Telegram's documented flood limits for one bot."""

    per_second_overall: int = 30
    private_interval_s: float = 1.0
    group_per_minute: int = 20
    # Pending messages a group may have before it is told the bot is busy (a minute's worth).
    backlog_limit: int = 20

    @classmethod
    def for_replicas(cls, replicas: int, backlog_limit: int = 20) -> SendLimits:
        """One replica's share of the bot's overall limit (the per-chat limits stay whole:
        a chat has one sender at a time)."""
        return cls(per_second_overall=max(1, cls.per_second_overall // max(1, replicas)),
                   backlog_limit=backlog_limit)


class _Window:
    """At most ``limit`` events in any ``window_s`` (sliding)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self.times: collections.deque[float] = collections.deque()

    def wait_s(self, now: float) -> float:
        while self.times and now - self.times[0] >= self.window_s:
            self.times.popleft()
        if len(self.times) < self.limit:
            return 0.0
        return self.times[0] + self.window_s - now

    def take(self, now: float) -> None:
        self.times.append(now)


class _Limiter:
    """The overall limit and each chat's, as sliding windows."""

    def __init__(self, limits: SendLimits, clock: Callable[[], float]) -> None:
        self.limits, self.clock = limits, clock
        self.overall = _Window(limits.per_second_overall, 1.0)
        self.chats: dict[int, _Window] = {}
        self.lock = asyncio.Lock()

    def _chat(self, chat_id: int, group: bool) -> _Window:
        window = self.chats.get(chat_id)
        if window is None:
            window = (_Window(self.limits.group_per_minute, 60.0) if group
                      else _Window(1, self.limits.private_interval_s))
            self.chats[chat_id] = window
        return window

    async def acquire(self, chat_id: int, group: bool) -> None:
        chat = self._chat(chat_id, group)
        while True:
            # The chat's own limit first, without holding the shared lock: a group waiting
            # for its minute must not keep other chats from the overall budget.
            await asyncio.sleep(chat.wait_s(self.clock()))
            async with self.lock:
                now = self.clock()
                if chat.wait_s(now) > 0:
                    continue
                wait = self.overall.wait_s(now)
                if wait <= 0:
                    self.overall.take(now)
                    chat.take(now)
                    return
            await asyncio.sleep(wait)

    def forget_idle(self) -> None:
        now = self.clock()
        self.chats = {c: w for c, w in self.chats.items() if w.wait_s(now) > 0 or (
            w.times and now - w.times[-1] < w.window_s)}


@dataclass
class _Preview:
    """A reply shown while it is generated: the latest text, and the message showing it."""

    text: str = ""
    shown: str = ""
    message_id: int | None = None
    reply_to: int | None = None


class Sender:
    def __init__(self, bot: Bot, outbox: Outbox, *, limits: SendLimits | None = None,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic, owner: str = "local",
                 sweep_s: float | None = None, chat_lease_s: float = CHAT_LEASE_S) -> None:
        self.bot, self.outbox = bot, outbox
        # This process among the replicas: the owner of the chat leases it takes.
        self.owner = owner
        # How often to look for chats with pending rows this process was not told about
        # (None: never; one process stores every row it sends).
        self.sweep_s = sweep_s
        self.chat_lease_s = chat_lease_s
        self._sweeper: asyncio.Task[None] | None = None
        self.limits = limits or SendLimits()
        self.metrics = metrics
        self._limiter = _Limiter(self.limits, clock)
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._wake: dict[int, asyncio.Event] = {}
        self._chat_types: dict[int, str] = {}
        # Messages promised to a chat by handlers still running (not in the outbox yet).
        self._reserved: collections.Counter[int] = collections.Counter()
        # When each chat was last told it is over its backlog.
        self._busy_told: dict[int, float] = {}
        self._clock = clock
        self._previews: dict[tuple[int, str], _Preview] = {}
        self._closing = False
        # Called when a message could not be delivered for good (for tests and logs).
        self.on_failure: Callable[[OutboxItem, str], Awaitable[None]] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Deliver what an earlier run left in the outbox."""
        await self.sweep()
        if self.sweep_s is not None:
            self._sweeper = asyncio.create_task(
                every(self.sweep_s, self.sweep, what="outbox sweep",
                      stopped=lambda: self._closing), name="loopbot-send-sweep")

    async def sweep(self) -> None:
        """Start a worker for every chat with pending rows (one whose lease another replica
        holds stops at once)."""
        for chat_id, chat_type in await self.outbox.chats_pending():
            self.notify(chat_id, chat_type)

    async def stop(self) -> None:
        """Stop at once: what is not sent stays pending in the outbox for the next start."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._workers.clear()

    @property
    def idle(self) -> bool:
        return not self._workers

    # --- what handlers call --------------------------------------------------------------

    def notify(self, chat_id: int, chat_type: str) -> None:
        """New rows for the chat are committed: make sure its worker runs."""
        if self._closing:
            return
        self._chat_types[chat_id] = chat_type
        event = self._wake.setdefault(chat_id, asyncio.Event())
        event.set()
        if chat_id not in self._workers:
            self._workers[chat_id] = asyncio.create_task(self._work(chat_id),
                                                         name=f"loopbot-send-{chat_id}")

    async def reserve(self, chat_id: int, chat_type: str, count: int) -> bool:
        """Promise ``count`` messages to a chat before the model runs for it. A group whose
        backlog (pending + promised) has reached the limit gets False: drop the message."""
        if chat_type in GROUP_TYPES:
            backlog = await self.outbox.backlog(chat_id) + self._reserved[chat_id]
            if backlog + count > self.limits.backlog_limit:
                if self.metrics is not None:
                    self.metrics.count_dropped(chat_type)
                return False
        self._reserved[chat_id] += count
        return True

    def release(self, chat_id: int, count: int) -> None:
        """The promised messages are in the outbox now (or will not come)."""
        self._reserved[chat_id] -= count
        if self._reserved[chat_id] <= 0:
            del self._reserved[chat_id]

    def tell_busy(self, chat_id: int) -> bool:
        """Whether to tell the chat it is over its backlog: at most once every
        ``BUSY_NOTICE_EVERY_S``, so a flood gets one notice, not one per message."""
        now = self._clock()
        last = self._busy_told.get(chat_id)
        if last is not None and now - last < BUSY_NOTICE_EVERY_S:
            return False
        self._busy_told[chat_id] = now
        if len(self._busy_told) > 10_000:
            self._busy_told = {c: t for c, t in self._busy_told.items()
                               if now - t < BUSY_NOTICE_EVERY_S}
        return True

    def preview(self, chat_id: int, chat_type: str, key: str, text: str,
                reply_to: int | None) -> None:
        """Show ``text`` as the reply so far (edited in place, as often as the chat's limit
        allows; never before the chat's pending messages, such as the verdict)."""
        self._previews.setdefault((chat_id, key), _Preview(reply_to=reply_to)).text = text
        self.notify(chat_id, chat_type)

    def preview_message(self, chat_id: int, key: str) -> int | None:
        preview = self._previews.get((chat_id, key))
        return preview.message_id if preview else None

    def end_preview(self, chat_id: int, key: str) -> None:
        self._previews.pop((chat_id, key), None)

    async def typing(self, chat_id: int) -> None:
        """Best effort, never waiting: 'typing…' (a chat action, not a message: it does not
        count against the chat's message limit)."""
        with contextlib.suppress(TelegramError):
            await self.bot.send_chat_action(chat_id, ChatAction.TYPING)

    # --- the chat's worker ---------------------------------------------------------------

    async def _work(self, chat_id: int) -> None:
        leased_until = 0.0
        try:
            while not self._closing:
                self._wake[chat_id].clear()
                if time.time() > leased_until - self.chat_lease_s / 2:
                    if not await self.outbox.lease_chat(chat_id, self.owner,
                                                        lease_s=self.chat_lease_s):
                        return  # another replica sends this chat's messages
                    leased_until = time.time() + self.chat_lease_s
                item, retry_at = await self.outbox.next_for(chat_id)
                if item is not None:
                    if not await self._deliver(item):
                        leased_until = 0.0
                        return  # another replica took the chat over
                    leased_until = time.time() + self.chat_lease_s
                    continue
                if await self._show_preview(chat_id):
                    continue
                if retry_at is None:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.05, retry_at - time.time())):
                        await self._wake[chat_id].wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The database refused (health shows it); the rows stay pending for later.
            log.exception("sending to chat %s stopped; pending messages stay queued", chat_id)
        finally:
            if leased_until and not self._closing:
                with contextlib.suppress(Exception):
                    await self.outbox.release_chat(chat_id, self.owner)
            self._workers.pop(chat_id, None)
            self._limiter.forget_idle()
            # A row committed while the worker was finishing must not wait for the next one.
            if not self._closing and self._wake.get(chat_id, asyncio.Event()).is_set():
                self.notify(chat_id, self._chat_types.get(chat_id, "private"))

    def _group(self, chat_id: int, chat_type: str | None = None) -> bool:
        return (chat_type or self._chat_types.get(chat_id, "private")) in GROUP_TYPES

    async def _deliver(self, item: OutboxItem) -> bool:
        """Send one row; False when the chat's lease was lost while waiting for the limit
        (another replica sends it now, and the row is left to it)."""
        await self._limiter.acquire(item.chat_id, self._group(item.chat_id, item.chat_type))
        # The wait for a group's limit can outlast the lease: renew it now, so no other
        # replica can take the chat (and send this row again) until well after the send.
        if not await self.outbox.lease_chat(item.chat_id, self.owner,
                                            lease_s=self.chat_lease_s):
            return False
        if not await self.outbox.is_pending(item.id):
            return True  # another replica sent it while this one waited (and lost the chat)
        try:
            message_id = await self._send(item)
        except RetryAfter as exc:
            await self.outbox.retry_later(item, "429 retry after", retry_seconds(exc.retry_after))
        except (Forbidden, BadRequest) as exc:
            await self._failed(item, f"{type(exc).__name__}: {exc.message}")
        except NetworkError as exc:  # 5xx, time-outs, connection errors
            if time.time() - item.created_at > GIVE_UP_AFTER_S:
                await self._failed(item, f"gave up after a day: {exc.message}")
            else:
                delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(item.attempts, 10))
                log.warning("send to chat %s failed (%s); retry in %.0fs", item.chat_id,
                            exc.message, delay)
                await self.outbox.retry_later(item, exc.message, delay)
        else:
            await self.outbox.mark_sent(item, message_id)
            if self.metrics is not None:
                self.metrics.count_sent(item.kind)
        return True

    async def _failed(self, item: OutboxItem, error: str) -> None:
        log.warning("message %s to chat %s refused for good: %s", item.id, item.chat_id, error)
        await self.outbox.fail(item, error)
        if self.metrics is not None:
            self.metrics.count_send_failure(item.kind)
        if self.on_failure is not None:
            await self.on_failure(item, error)

    async def _send(self, item: OutboxItem) -> int:
        payload = dict(item.payload)
        preview_key = payload.pop("preview_key", None)
        text = str(payload.pop("text"))
        markup = payload.pop("reply_markup", None)
        reply = payload.pop("reply_parameters", None)
        if isinstance(preview_key, str):
            shown = self._previews.pop((item.chat_id, preview_key), None)
            if shown is not None and shown.message_id is not None:
                if shown.shown != text:
                    await self.bot.edit_message_text(text, chat_id=item.chat_id,
                                                     message_id=shown.message_id)
                return shown.message_id
        sent: Message = await self.bot.send_message(
            item.chat_id, text,
            reply_markup=InlineKeyboardMarkup.de_json(markup, self.bot) if markup else None,
            reply_parameters=ReplyParameters.de_json(reply, self.bot) if reply else None,
        )
        return sent.message_id

    async def _show_preview(self, chat_id: int) -> bool:
        """Send or edit one preview of this chat whose text changed; False when none did."""
        for (chat, _key), preview in list(self._previews.items()):
            if chat != chat_id or not preview.text.strip() or preview.text == preview.shown:
                continue
            await self._limiter.acquire(chat_id, self._group(chat_id))
            text = preview.text
            try:
                if preview.message_id is None:
                    sent = await self.bot.send_message(
                        chat_id, text, reply_parameters=ReplyParameters(
                            preview.reply_to, allow_sending_without_reply=True)
                        if preview.reply_to else None)
                    preview.message_id = sent.message_id
                else:
                    await self.bot.edit_message_text(text, chat_id=chat_id,
                                                     message_id=preview.message_id)
            except TelegramError as exc:  # a preview is a courtesy: never retried
                log.debug("preview in chat %s not shown: %s", chat_id, exc)
            preview.shown = text
            return True
        return False


def retry_seconds(value: Any) -> float:
    """A RetryAfter's wait in seconds (PTB gives an int or, in newer versions, a timedelta)."""
    return float(value.total_seconds()) if hasattr(value, "total_seconds") else float(value)
