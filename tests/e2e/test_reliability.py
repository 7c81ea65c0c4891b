"""No message lost, no chat blocking another: the durable inbox and outbox and the fair
sender, driven through `loopbot run` (a child process) against the fake Bot API."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bot.devtools.fakebotapi import Call, FakeBotAPI
from tests.e2e.botprocess import start_bot, stop_bot

GROUP = -100_555_000_111
BOT = "@loopbot_test_bot"


def _mention(api: FakeBotAPI, user: dict[str, Any], text: str) -> dict[str, Any]:
    return api.send_text(user, f"{BOT} {text}", chat_id=GROUP, chat_type="supergroup",
                         entities=[{"type": "mention", "offset": 0, "length": len(BOT)}])


def _verdicts(api: FakeBotAPI, chat_id: int) -> list[Call]:
    return [c for c in api.calls_to("sendMessage", chat_id=str(chat_id))
            if "reply_markup" in c.params]


def _replies(api: FakeBotAPI, chat_id: int) -> list[Call]:
    return [c for c in api.calls_to("sendMessage", chat_id=str(chat_id))
            if "reply_markup" not in c.params]


def _answered_once(api: FakeBotAPI, chat_id: int) -> bool:
    return bool(_verdicts(api, chat_id)) and bool(_replies(api, chat_id))


def _most_in_a_minute(calls: list[Call]) -> int:
    times = sorted(c.at for c in calls)
    return max((sum(1 for u in times if t <= u < t + 60.0) for t in times), default=0)


@pytest.mark.slow
def test_a_busy_group_does_not_delay_private_chats(tiny_gguf: Path, tmp_path: Path) -> None:
    db, log = tmp_path / "loopbot.db", tmp_path / "bot.log"
    with FakeBotAPI() as api:
        proc = start_bot(api, tiny_gguf, db, log)
        try:
            api.wait_calls("getUpdates", timeout=60)
            members = [api.user(70_000 + i) for i in range(40)]
            for round_ in range(8):
                for member in members:
                    _mention(api, member, f"round {round_}: how do you like this?")
            # The group's flood is queued first; now five people write in private.
            time.sleep(1.0)
            asked_at = time.monotonic()
            privates = [api.user(80_000 + i) for i in range(5)]
            for user in privates:
                api.send_text(user, "I really like this bot")
            for user in privates:
                api.wait_for(partial(_verdicts, api, user["id"]), timeout=30)
            waits = [min(c.at for c in _verdicts(api, u["id"])) - asked_at for u in privates]
            assert max(waits) <= 10.0, waits
            print(f"private verdicts after {', '.join(f'{w:.2f}' for w in waits)} s")
            # The group: what its limit allows (20 a minute), and one notice that it is busy.
            time.sleep(5.0)
            group_sends = api.calls_to("sendMessage", chat_id=str(GROUP))
            busy = [c for c in group_sends if "Too many messages" in c.params["text"]]
            assert len(busy) == 1
            assert 0 < _most_in_a_minute(group_sends) <= 20
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            stop_s = time.monotonic() - started
            # Everything the bot sent, up to its exit (the group's minute may still have had
            # room for a few more after the count above).
            group_sends = api.calls_to("sendMessage", chat_id=str(GROUP))
        finally:
            stop_bot(proc)
    assert stop_s < 15.0, stop_s  # the stop timeout of deploy/ is 150 s; this is far below
    output = log.read_text(encoding="utf-8", errors="replace")
    assert "model and database closed" in output, output[-2000:]
    with sqlite3.connect(db) as conn:
        # Nothing the group was promised is lost: what was not sent is still queued.
        pending, sent = conn.execute(
            "SELECT SUM(state = 'pending'), SUM(state = 'sent') FROM outbox"
            " WHERE chat_id = ?", (GROUP,)).fetchone()
    assert sent == len(group_sends)
    # What was sent left room for more, up to the backlog limit (20) and the notice, never
    # more: the other messages of the flood were dropped before the model ran.
    assert (pending or 0) <= 21


@pytest.mark.slow
def test_sigkill_after_a_fetch_loses_nothing_and_answers_once(tiny_gguf: Path,
                                                              tmp_path: Path) -> None:
    db, log = tmp_path / "loopbot.db", tmp_path / "bot.log"
    users = [90_000 + i for i in range(6)]
    with FakeBotAPI() as api:
        proc = start_bot(api, tiny_gguf, db, log)
        killed = threading.Event()

        def die_on_first_send(call: Call) -> bool:
            # The batch is fetched and being answered: the process dies before the first
            # answer reaches Telegram.
            if not killed.is_set():
                killed.set()
                proc.send_signal(signal.SIGKILL)
            return False

        try:
            api.wait_calls("getUpdates", timeout=60)
            api.before["sendMessage"] = die_on_first_send
            for uid in users:
                api.send_text(api.user(uid), f"message from {uid}: what a day")
            assert killed.wait(60)
            proc.wait(10)
            del api.before["sendMessage"]
            proc = start_bot(api, tiny_gguf, db, log)
            for uid in users:
                api.wait_for(partial(_answered_once, api, uid), timeout=60)
            time.sleep(2.0)  # anything sent twice would show up by now
            for uid in users:
                assert len(_verdicts(api, uid)) == 1, uid
                assert len(_replies(api, uid)) == 1, uid
            # A verdict answered with HTTP 500 is retried and shown.
            api.error_next("sendMessage", 500)
            api.send_text(api.user(91_000), "and one more")
            api.wait_for(lambda: _verdicts(api, 91_000), timeout=30)
            assert next(c.status for c in api.calls if c.method == "sendMessage"
                        and c.params.get("chat_id") == "91000") == 500
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            stop_bot(proc)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM interactions").fetchone() == (7,)
        assert conn.execute("SELECT COUNT(*) FROM inbox WHERE state = 'pending'"
                            ).fetchone() == (0,)
