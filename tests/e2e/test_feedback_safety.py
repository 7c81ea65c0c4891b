"""What a crowd or an unlucky timing must not get through: /forget racing votes and reactions,
feedback from people who never saw the message, a canary that serves nobody, and an update
the library cannot read. The real bot over HTTP against the fake Bot API, real SQLite."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bot.devtools.fakebotapi import FakeBotAPI
from tests.e2e.botharness import ADMIN_ID, BotHarness

GROUP = -100_777_000_222
BOT = "@loopbot_test_bot"
# Users who each race a vote, a group vote and a reaction against their own /forget.
USERS = 6


@pytest.fixture(scope="module")
def api() -> Iterator[FakeBotAPI]:
    with FakeBotAPI() as fake:
        yield fake


@pytest.fixture(scope="module")
def bot(api: FakeBotAPI, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[BotHarness]:
    harness = BotHarness(api, tiny_gguf, tmp_path_factory.mktemp("safety") / "loopbot.db")
    harness.start()
    yield harness
    harness.stop()


def _answered(api: FakeBotAPI, bot: BotHarness, user: dict[str, Any], text: str, *,
              chat_id: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send a text and wait for the verdict and the reply to be delivered and noted."""
    cid = user["id"] if chat_id is None else chat_id
    if chat_id is None:
        update = api.send_text(user, text)
    else:
        update = api.send_text(user, f"{BOT} {text}", chat_id=cid, chat_type="supergroup",
                               entities=[{"type": "mention", "offset": 0, "length": len(BOT)}])
    mid = update["message"]["message_id"]
    api.wait_for(lambda: bot.query(
        "SELECT 1 FROM bot_messages b JOIN interactions i ON i.id = b.interaction_id"
        " WHERE i.chat_id = ? AND i.message_id = ? AND b.kind = 'reply'", (cid, mid)),
        timeout=30)
    rows = bot.query(
        "SELECT b.kind, b.message_id FROM bot_messages b JOIN interactions i"
        " ON i.id = b.interaction_id WHERE i.chat_id = ? AND i.message_id = ?", (cid, mid))
    ids = dict(rows)
    return api.messages[(cid, ids["verdict"])], api.messages[(cid, ids["reply"])]


def _told_forgotten(api: FakeBotAPI, chat_id: int) -> bool:
    return any("deleted" in c.params.get("text", "").lower()
               for c in api.calls_to("sendMessage", chat_id=str(chat_id)))


def _forget(api: FakeBotAPI, user: dict[str, Any], chat_id: int | None = None
            ) -> dict[str, Any]:
    cid = user["id"] if chat_id is None else chat_id
    message = api.user_message(user, chat_id=cid,
                               chat_type="private" if chat_id is None else "supergroup")
    message.update(text="/forget", entities=[{"type": "bot_command", "offset": 0,
                                              "length": 7}])
    return {"message": message}


def test_forget_is_final_for_feedback_in_the_same_batch(api: FakeBotAPI,
                                                        bot: BotHarness) -> None:
    """Votes and reactions sent just before /forget, arriving with it in one batch, are not
    written after the deletion; a click after it is answered, not crashed on."""
    author = api.user(61_000)
    group_verdict, _ = _answered(api, bot, author, "the group likes it", chat_id=GROUP)
    for n in range(USERS):
        user = api.user(62_000 + n)
        verdict, reply = _answered(api, bot, user, f"message {n}: this is fine")
        data = verdict["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
        group_data = group_verdict["reply_markup"]["inline_keyboard"][0][1]["callback_data"]
        api.push_batch([
            {"callback_query": {"id": f"a{n}", "from": user, "message": verdict,
                                "chat_instance": "x", "data": data}},
            {"callback_query": {"id": f"g{n}", "from": user, "message": group_verdict,
                                "chat_instance": "y", "data": group_data}},
            {"message_reaction": {"chat": reply["chat"], "message_id": reply["message_id"],
                                  "user": user, "date": 0, "old_reaction": [],
                                  "new_reaction": [{"type": "emoji", "emoji": "👍"}]}},
            _forget(api, user),
            # Sent after /forget: the verdict it names is gone, and the click is answered.
            {"callback_query": {"id": f"late{n}", "from": user, "message": verdict,
                                "chat_instance": "x", "data": data}},
        ])
        api.wait_calls("answerCallbackQuery", callback_query_id=f"late{n}", timeout=30)
        api.wait_for(partial(_told_forgotten, api, user["id"]), timeout=30)
    uids = tuple(62_000 + n for n in range(USERS))
    marks = ",".join("?" * len(uids))
    assert bot.query(f"SELECT COUNT(*) FROM votes WHERE user_id IN ({marks})", uids) == [(0,)]
    assert bot.query(f"SELECT COUNT(*) FROM reactions WHERE user_id IN ({marks})",
                     uids) == [(0,)]
    assert bot.query(f"SELECT COUNT(*) FROM interactions WHERE user_id IN ({marks})",
                     uids) == [(0,)]
    # Nothing of what they wrote is left in the inbox either.
    rows = bot.query(f"SELECT payload FROM inbox WHERE user_id IN ({marks})"
                     " AND state != 'pending'", uids)
    assert rows and all(payload == "{}" for (payload,) in rows)


def test_only_people_who_could_see_a_message_give_feedback_on_it(api: FakeBotAPI,
                                                                  bot: BotHarness) -> None:
    owner, stranger = api.user(63_000), api.user(63_001)
    verdict, reply = _answered(api, bot, owner, "my private thoughts")
    data = verdict["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
    forged = api.push({"callback_query": {"id": "stranger", "from": stranger,
                                          "message": verdict, "chat_instance": "z",
                                          "data": data}})
    api.react(stranger, reply, ["👎"])
    api.wait_calls("answerCallbackQuery", callback_query_id=forged["callback_query"]["id"])
    api.react(owner, reply, ["👍"])
    api.wait_for(lambda: bot.query("SELECT 1 FROM reactions WHERE user_id = 63000"))
    assert bot.query("SELECT COUNT(*) FROM votes WHERE user_id = 63001") == [(0,)]
    assert bot.query("SELECT COUNT(*) FROM reactions WHERE user_id = 63001") == [(0,)]


def test_a_canary_too_small_to_serve_anyone_is_refused(api: FakeBotAPI,
                                                       bot: BotHarness) -> None:
    admin = api.user(ADMIN_ID)
    before = len(api.calls_to("sendMessage", chat_id=str(ADMIN_ID)))
    api.send_text(admin, "/canary v1-en 1e-9")
    api.wait_for(lambda: len(api.calls_to("sendMessage", chat_id=str(ADMIN_ID))) > before)
    answer = api.calls_to("sendMessage", chat_id=str(ADMIN_ID))[-1].params["text"]
    assert "serve nobody" in answer
    assert bot.query("SELECT COUNT(*) FROM prompt_versions WHERE state = 'candidate'") == [(0,)]


def test_an_update_the_library_cannot_read_is_skipped_once(
        api: FakeBotAPI, bot: BotHarness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    poison = api.push({"message": {"message_id": 1, "date": "yesterday", "text": "秘密 4711",
                                   "chat": {"id": 64_000, "type": "private"},
                                   "from": api.user(64_000)}})
    user = api.user(64_001)
    _answered(api, bot, user, "still listening?")
    assert bot.query("SELECT state FROM inbox WHERE update_id = ?",
                     (poison["update_id"],)) == [("poison",)]
    lines = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    mentions = [line for line in lines if f"update {poison['update_id']} " in line]
    assert len(mentions) == 1, mentions
    assert not [line for line in lines if "4711" in line]


def _analyze(db: Path, capsys: pytest.CaptureFixture[str], at: float) -> dict[str, Any]:
    from bot.cli import main

    capsys.readouterr()
    assert main(["analyze", "--json", "--dry-run", "--db", str(db), "--at", str(at)]) == 0
    (outcome,) = json.loads(capsys.readouterr().out)["outcomes"]
    assert isinstance(outcome, dict)
    return outcome


def test_fifty_votes_on_one_group_verdict_are_one_observation(
        api: FakeBotAPI, bot: BotHarness, capsys: pytest.CaptureFixture[str]) -> None:
    admin = api.user(ADMIN_ID)
    before = len(api.calls_to("sendMessage", chat_id=str(ADMIN_ID)))
    api.send_text(admin, "/canary v1-en 50")
    api.wait_for(lambda: len(api.calls_to("sendMessage", chat_id=str(ADMIN_ID))) > before)
    group = -100_777_000_333
    verdict, _ = _answered(api, bot, api.user(65_000), "we all have an opinion on this",
                           chat_id=group)
    # The votes fall into the next hour's stratum; analyse once that hour has closed.
    later = time.time() + 2 * 3600
    untouched = _analyze(Path(bot.db_path), capsys, later)
    data = verdict["reply_markup"]["inline_keyboard"][0][1]["callback_data"]
    members = [api.user(66_000 + n) for n in range(50)]
    for member in members:
        api.push({"callback_query": {"id": f"m{member['id']}", "from": member,
                                     "message": verdict, "chat_instance": "g", "data": data}})
    api.wait_for(lambda: bot.query("SELECT COUNT(*) FROM votes WHERE user_id >= 66000"
                                   " AND user_id < 66050") == [(50,)], timeout=30)
    voted = _analyze(Path(bot.db_path), capsys, later)
    arm = "active" if bot.query(
        "SELECT arm FROM interactions WHERE chat_id = ?", (group,)) == [("active",)] else (
        "candidate")
    # 50 votes were cast on the verdict; the engine counts one observation.
    assert voted["raw_votes"][arm] == 50
    assert voted["observations"][arm] == 1
    print(f"analyze --json: raw_votes {voted['raw_votes']}, observations "
          f"{voted['observations']}")
    # ... and decides as it did without them.
    assert (voted["action"], voted["rule"]) == (untouched["action"], untouched["rule"])
    # The running test as an event log, which `loopbot replay` reads.
    sent = len(api.calls_to("sendDocument", chat_id=str(ADMIN_ID)))
    api.send_text(admin, "/export events")
    (call,) = api.wait_for(lambda: api.calls_to("sendDocument", chat_id=str(ADMIN_ID))[sent:])
    name, data = call.files["document"]
    log = Path(bot.db_path).parent / name
    log.write_bytes(data)
    from bot.cli import main

    capsys.readouterr()
    assert main(["replay", str(log), "--json"]) == 0
    replayed = json.loads(capsys.readouterr().out)["runs"]
    assert set(replayed) == {"v1-en"} and replayed["v1-en"]["reason"]
    api.send_text(admin, "/retire v1-en")
    api.wait_for(lambda: bot.query(
        "SELECT state FROM prompt_versions WHERE id = 'v1-en'") == [("retired",)])
