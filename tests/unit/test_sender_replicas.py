"""Two replicas' senders on one outbox: each message goes out once, even when one replica's
wait for a chat's rate limit outlasts its lease on the chat (the real PTB Bot against the
fake Bot API; a real database)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from telegram import Bot
from telegram.request import HTTPXRequest

from bot.devtools.fakebotapi import FakeBotAPI
from bot.store.outbox import Outbox, Outgoing
from bot.store.queries import Store
from bot.telegram.sender import Sender, SendLimits

CHAT = 5555


async def _until(done: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll without blocking the event loop the senders run on."""
    async with asyncio.timeout(timeout):
        while not done():  # noqa: ASYNC110 - a condition in another thread's server
            await asyncio.sleep(0.02)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = await Store.open(db_url, upgrade=True)
    yield s
    await s.close()


async def test_a_lease_lost_while_waiting_for_the_chats_limit_sends_nothing_twice(
        store: Store, tmp_path: Path) -> None:
    with FakeBotAPI() as api:
        bot = Bot(api.token, base_url=api.base_url, request=HTTPXRequest())
        await bot.initialize()
        outbox = Outbox(store.db)
        # Replica A may send into the chat once every 1.5 s but holds the chat for 0.5 s:
        # while it waits for its second send, its lease runs out and B takes the chat.
        slow = SendLimits(private_interval_s=1.5)
        a = Sender(bot, outbox, limits=slow, owner="A", chat_lease_s=0.5)
        b = Sender(bot, outbox, owner="B", chat_lease_s=0.5, sweep_s=0.2)
        try:
            await outbox.add([Outgoing(CHAT, "private", "notice", {"text": f"m{n}"})
                              for n in range(3)])
            await a.start()
            await _until(lambda: bool(api.calls_to("sendMessage", chat_id=str(CHAT))))
            await b.start()  # B's sweep finds the chat's rows once A's lease ran out

            await _until(lambda: len(api.calls_to("sendMessage", chat_id=str(CHAT))) >= 3)
            await asyncio.sleep(2.0)  # A's wait ends: it must not send m1 again
            assert await outbox.backlog(CHAT) == 0
        finally:
            await a.stop()
            await b.stop()
            await bot.shutdown()
        texts = [c.params["text"] for c in api.calls_to("sendMessage", chat_id=str(CHAT))]
    assert sorted(texts) == ["m0", "m1", "m2"]
    assert texts[0] == "m0"
