"""The real bot over HTTP: fake Bot API on loopback, tiny real GGUF model, and a real
database: every test runs twice, on a SQLite file and on a real PostgreSQL.

Tests in this module share one running bot (per database) and keep apart by user and chat
ids; they run in file order (the admin test restores the version state it changes).
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bot.devtools.fakebotapi import FakeBotAPI
from tests.e2e.botharness import ADMIN_ID, BotHarness


@pytest.fixture(scope="module", params=[
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The database of this module's bot: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path_factory.mktemp("bot") / "loopbot.db")
    from tests.e2e.botharness import postgres_database

    return postgres_database(request.getfixturevalue("pg_cluster"), "e2e_bot")


@pytest.fixture(scope="module")
def fake_api(database: str) -> Iterator[FakeBotAPI]:
    """One fake Bot API per database, so the two runs do not see each other's calls."""
    with FakeBotAPI() as api:
        yield api


@pytest.fixture(scope="module")
def bot(fake_api: FakeBotAPI, tiny_gguf: Path, database: str) -> Iterator[BotHarness]:
    harness = BotHarness(fake_api, tiny_gguf, database,
                         overrides={"telegram.user_rate_limit": 5})
    harness.start()
    yield harness
    harness.stop()

VERDICT_RE = re.compile(r"(😊 正面|😞 负面|😊 positive|😞 negative) · \d{1,3}%")
STALE_EN = "This button is no longer valid; nothing was recorded."


def _messages(api: FakeBotAPI, chat_id: int, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = api.wait_for(
        lambda: m if len(m := api.bot_messages(chat_id)) >= count else None)
    return found


def _converse(api: FakeBotAPI, bot: BotHarness, user: dict[str, Any], text: str
              ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Send a text and wait until the bot has answered and noted its messages; returns
    (update, verdict message, first reply message)."""
    before = len(api.bot_messages(user["id"]))
    update = api.send_text(user, text)
    api.wait_for(lambda: bot.query(
        "SELECT 1 FROM bot_messages b JOIN interactions i ON i.id = b.interaction_id"
        " WHERE i.chat_id = ? AND i.message_id = ? AND b.kind = 'reply'",
        (user["id"], update["message"]["message_id"])))
    messages = api.bot_messages(user["id"])[before:]
    return update, messages[0], messages[1]


def _answers(api: FakeBotAPI, update: dict[str, Any]) -> list[str]:
    cq = update["callback_query"]["id"]
    calls = api.wait_calls("answerCallbackQuery", callback_query_id=cq)
    return [c.params.get("text", "") for c in calls]


def _texts_to(api: FakeBotAPI, chat_id: int) -> list[str]:
    return [c.params["text"] for c in api.calls_to("sendMessage", chat_id=str(chat_id))]


def test_message_verdict_click_vote_and_stats(bot: BotHarness, fake_api: FakeBotAPI) -> None:
    user = fake_api.user(101, "zh")
    update, verdict, reply = _converse(fake_api, bot, user, "这家店的服务太好了，下次还来！")
    assert VERDICT_RE.fullmatch(verdict["text"]), verdict["text"]
    (row,) = verdict["reply_markup"]["inline_keyboard"]
    assert [b["text"] for b in row] == ["✅ 对", "❌ 错"]
    assert all(len(b["callback_data"].encode()) <= 64 for b in row)
    # The reply is a separate message answering the user's message, after "typing".
    assert reply["reply_to_message"]["message_id"] == update["message"]["message_id"]
    assert "reply_markup" not in reply
    assert fake_api.calls_to("sendChatAction", chat_id="101", action="typing")

    # The vote must be in the database (seen from another connection) when the click is
    # acknowledged.
    seen_at_answer: list[list[tuple[Any, ...]]] = []
    fake_api.before["answerCallbackQuery"] = lambda call: seen_at_answer.append(
        bot.query("SELECT user_id, correct FROM votes"))
    try:
        click = fake_api.click(user, verdict, row[0]["callback_data"])
        assert _answers(fake_api, click) == ["谢谢！已记为正确 ✅"]
    finally:
        del fake_api.before["answerCallbackQuery"]
    assert seen_at_answer == [[(101, 1)]]
    stored = bot.query("SELECT chat_id, message_id, version_id, arm, label, text,"
                       " verdict_message_id, reply_text IS NOT NULL FROM interactions")
    assert stored == [(101, update["message"]["message_id"], "v1-zh", "active",
                       stored[0][4], "这家店的服务太好了，下次还来！", verdict["message_id"], 1)]
    # The keyboard now shows the recorded vote.
    fake_api.wait_for(lambda: fake_api.messages[(101, verdict["message_id"])]["reply_markup"]
                      ["inline_keyboard"][0][0]["text"] == "✅ 对 ✔")

    admin = fake_api.user(ADMIN_ID, "en")
    fake_api.send_text(admin, "/stats")
    photo = fake_api.wait_calls("sendPhoto", chat_id=str(ADMIN_ID))[0]
    (text,) = _texts_to(fake_api, ADMIN_ID)
    assert "v1-zh [active]" in text
    assert "1 verdicts · 1 votes (1 ✅)" in text
    assert "accuracy 100% (95% CI" in text
    assert photo.files["photo"][1].startswith(b"\x89PNG\r\n\x1a\n")


def test_a_user_can_change_the_vote_and_it_stays_one_row(bot: BotHarness,
                                                         fake_api: FakeBotAPI) -> None:
    user = fake_api.user(102, "en")
    _, verdict, _ = _converse(fake_api, bot, user, "I love it")
    (row,) = verdict["reply_markup"]["inline_keyboard"]
    assert [b["text"] for b in row] == ["✅ right", "❌ wrong"]
    assert _answers(fake_api, fake_api.click(user, verdict, row[0]["callback_data"])) == [
        "Thanks! Recorded as right ✅"]
    assert _answers(fake_api, fake_api.click(user, verdict, row[1]["callback_data"])) == [
        "Thanks! Recorded as wrong ❌"]
    votes = bot.query("SELECT v.correct, v.correct_label, i.label, v.changes FROM votes v"
                      " JOIN interactions i ON i.id = v.interaction_id WHERE v.user_id = 102")
    assert len(votes) == 1
    correct, correct_label, label, changes = votes[0]
    assert (correct, changes) == (0, 1)
    assert {correct_label, label} == {"正面", "负面"}
    fake_api.wait_for(lambda: fake_api.messages[(102, verdict["message_id"])]["reply_markup"]
                      ["inline_keyboard"][0][1]["text"] == "❌ wrong ✔")


def test_forged_and_stale_callbacks_change_nothing(bot: BotHarness,
                                                   fake_api: FakeBotAPI) -> None:
    alice, mallory = fake_api.user(103, "en"), fake_api.user(104, "en")
    _, alice_verdict, _ = _converse(fake_api, bot, alice, "the food was great")
    _, mallory_verdict, _ = _converse(fake_api, bot, mallory, "meh")
    alice_iid = int(alice_verdict["reply_markup"]["inline_keyboard"][0][0]
                    ["callback_data"].split(":")[1])
    _, alice_second, _ = _converse(fake_api, bot, alice, "and the service too")
    votes_before = bot.query("SELECT COUNT(*) FROM votes")
    forged = [
        # Another chat's interaction id, clicked on one's own verdict message.
        fake_api.click(mallory, mallory_verdict, f"v:{alice_iid}:w"),
        # The right chat, but a different message than the one the verdict was shown in.
        fake_api.click(alice, alice_second, f"v:{alice_iid}:c"),
        fake_api.click(mallory, mallory_verdict, "v:99999999:c"),
        fake_api.click(mallory, mallory_verdict, "v:1:c;DROP TABLE votes"),
        fake_api.click(mallory, mallory_verdict, "x" * 64),
    ]
    for click in forged:
        assert _answers(fake_api, click) == [STALE_EN]
    assert bot.query("SELECT COUNT(*) FROM votes") == votes_before


def test_reactions_on_replies_are_stored(bot: BotHarness, fake_api: FakeBotAPI) -> None:
    user = fake_api.user(105, "en")
    _, verdict, reply = _converse(fake_api, bot, user, "thanks for the help")
    fake_api.react(user, reply, ["👍"])
    rows = fake_api.wait_for(lambda: bot.query(
        "SELECT kind, emojis, polarity FROM reactions WHERE user_id = 105"))
    assert rows == [("reply", '["👍"]', 1)]
    fake_api.react(user, reply, ["👎"], old=["👍"])
    fake_api.wait_for(lambda: bot.query(
        "SELECT polarity FROM reactions WHERE user_id = 105") == [(-1,)])
    # A reaction on a message that is not the bot's is ignored.
    fake_api.react(user, {"chat": verdict["chat"], "message_id": 1}, ["👍"])
    fake_api.react(user, verdict, ["🔥"])
    fake_api.wait_for(lambda: len(bot.query(
        "SELECT 1 FROM reactions WHERE user_id = 105")) == 2)
    assert sorted(bot.query("SELECT kind, polarity FROM reactions WHERE user_id = 105")) == [
        ("reply", -1), ("verdict", 1)]


def test_admin_commands_and_refusal_of_others(bot: BotHarness, fake_api: FakeBotAPI) -> None:
    audit_before = bot.query("SELECT COUNT(*) FROM audit_log")[0][0]
    stranger = fake_api.user(106, "en")
    for attempt in ("/rollback", "/promote v1-en", "/canary v1-en 50", "/stats", "/export"):
        fake_api.send_text(stranger, attempt)
    fake_api.wait_for(lambda: len(_texts_to(fake_api, 106)) == 5)
    assert set(_texts_to(fake_api, 106)) == {"Sorry, this command is for admins only."}
    assert bot.query("SELECT COUNT(*) FROM audit_log")[0][0] == audit_before

    admin = fake_api.user(ADMIN_ID, "en")

    def command(text: str) -> str:
        before = len(_texts_to(fake_api, ADMIN_ID))
        fake_api.send_text(admin, text)
        return str(fake_api.wait_for(lambda: (t := _texts_to(fake_api, ADMIN_ID))[before:]
                                     and t[before]))

    assert command("/promote nope").startswith("Not done: unknown version 'nope'")
    assert command("/canary v1-en 10") == "🐤 v1-en now serves 10% of users."
    assert "v1-en: candidate 10%" in command("/versions")
    assert command("/promote v1-en").startswith("✅ v1-en is now the active version")
    assert command("/rollback").startswith("↩️ Rolled back to v1-zh")
    assert command("/canary").startswith("Usage: /canary")
    assert command("/retire").startswith("Usage: /retire")
    assert command("/canary v1-en 10") == "🐤 v1-en now serves 10% of users."
    assert command("/retire v1-en") == "⏹ v1-en is no longer served; v1-zh serves everyone."
    assert command("/retire v1-zh").startswith("Not done: 'v1-zh' is the active version")
    actions = bot.query("SELECT action, version_id, actor FROM audit_log ORDER BY id")
    assert actions[-5:] == [("canary", "v1-en", f"admin:{ADMIN_ID}"),
                            ("promote", "v1-en", f"admin:{ADMIN_ID}"),
                            ("rollback", "v1-zh", f"admin:{ADMIN_ID}"),
                            ("canary", "v1-en", f"admin:{ADMIN_ID}"),
                            ("retire", "v1-en", f"admin:{ADMIN_ID}")]
    assert bot.query("SELECT id, state FROM prompt_versions ORDER BY id") == [
        ("v1-en", "retired"), ("v1-zh", "active")]

    fake_api.send_text(admin, "/export")
    document = fake_api.wait_calls("sendDocument", chat_id=str(ADMIN_ID))[0]
    name, data = document.files["document"]
    assert name.endswith(".csv")
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    assert len(rows) == bot.query("SELECT COUNT(*) FROM votes")[0][0] >= 2
    assert {r["voter_id"] for r in rows} >= {"101", "102"}


def test_a_redelivered_update_is_stored_and_answered_once(bot: BotHarness,
                                                          fake_api: FakeBotAPI) -> None:
    user = fake_api.user(107, "en")
    update, _, _ = _converse(fake_api, bot, user, "hello there")
    polls = len(fake_api.calls_to("getUpdates"))
    fake_api.push(update, redeliver=True)
    # Two more long polls: the redelivered update was fetched and handled.
    fake_api.wait_for(lambda: len(fake_api.calls_to("getUpdates")) >= polls + 2)
    fake_api.send_text(fake_api.user(1070, "en"), "/help")  # a marker processed after it
    fake_api.wait_for(lambda: _texts_to(fake_api, 1070))
    assert bot.query("SELECT COUNT(*) FROM interactions WHERE chat_id = 107") == [(1,)]
    assert len(fake_api.bot_messages(107)) == 2


def test_non_text_messages_get_a_polite_answer(bot: BotHarness, fake_api: FakeBotAPI) -> None:
    user = fake_api.user(108, "zh")
    message = fake_api.user_message(user)
    message["sticker"] = {"file_id": "s1", "file_unique_id": "s1", "type": "regular",
                          "width": 512, "height": 512, "is_animated": False,
                          "is_video": False}
    fake_api.push({"message": message})
    assert fake_api.wait_for(lambda: _texts_to(fake_api, 108)) == [
        "我只看得懂文字消息 🙂 请发一句话给我。"]
    assert bot.query("SELECT COUNT(*) FROM interactions WHERE chat_id = 108") == [(0,)]


def test_groups_answer_only_when_addressed(bot: BotHarness, fake_api: FakeBotAPI) -> None:
    group, user = -5000, fake_api.user(109, "en")
    fake_api.send_text(user, "just chatting among humans", chat_id=group, chat_type="group")
    handle = "@loopbot_test_bot"
    update = fake_api.send_text(user, f"{handle} is this nice?", chat_id=group,
                                chat_type="group",
                                entities=[{"type": "mention", "offset": 0,
                                           "length": len(handle)}])
    verdict, reply = _messages(fake_api, group, 2)
    assert VERDICT_RE.fullmatch(verdict["text"])
    assert verdict["reply_to_message"]["message_id"] == update["message"]["message_id"]
    # Replying to the bot's message also addresses it.
    fake_api.send_text(user, "and this?", chat_id=group, chat_type="group", reply_to=reply)
    _messages(fake_api, group, 4)
    assert bot.query("SELECT text FROM interactions WHERE chat_id = ? ORDER BY id",
                     (group,)) == [("is this nice?",), ("and this?",)]


def test_flooding_user_gets_one_notice(bot: BotHarness, fake_api: FakeBotAPI) -> None:
    user = fake_api.user(110, "en")
    limit = bot.settings.telegram.user_rate_limit
    for i in range(limit + 4):
        fake_api.send_text(user, f"message {i}")
    sticker = fake_api.user_message(user)
    sticker["sticker"] = {"file_id": "s2", "file_unique_id": "s2", "type": "regular",
                          "width": 512, "height": 512, "is_animated": False,
                          "is_video": False}
    sticker_update = fake_api.push({"message": sticker})["update_id"]
    fake_api.wait_for(lambda: any("a bit fast" in t for t in _texts_to(fake_api, 110)))
    # Reply message ids are stored after the last piece was sent: nothing is left in flight.
    fake_api.wait_for(lambda: bot.query(
        "SELECT COUNT(DISTINCT interaction_id) FROM bot_messages"
        " WHERE chat_id = 110 AND kind = 'reply'") == [(limit,)], timeout=30)
    # The sticker was fetched (its update confirmed); its handler answers at once if at all.
    fake_api.wait_for(lambda: any(int(c.params.get("offset", 0)) > sticker_update
                                  for c in fake_api.calls_to("getUpdates")))
    time.sleep(0.5)
    said = _texts_to(fake_api, 110)
    # Four refused texts and a refused sticker: one notice, not five.
    assert sum("a bit fast" in t for t in said) == 1
    assert not any("only read text" in t for t in said)


def test_a_429_from_the_api_is_retried(bot: BotHarness, fake_api: FakeBotAPI) -> None:
    user = fake_api.user(111, "en")
    fake_api.fail_next("sendMessage", retry_after=1)
    _, verdict, _ = _converse(fake_api, bot, user, "is anyone there?")
    assert VERDICT_RE.fullmatch(verdict["text"])
    refused = [c for c in fake_api.calls if c.method == "sendMessage" and c.status == 429]
    assert len(refused) == 1 and refused[0].params["chat_id"] == "111"
    assert refused[0].params["text"] == verdict["text"]


def test_user_commands_and_forget(bot: BotHarness, fake_api: FakeBotAPI) -> None:
    user = fake_api.user(112, "en")
    _, verdict, _ = _converse(fake_api, bot, user, "remember me")
    click = fake_api.click(user, verdict, verdict["reply_markup"]["inline_keyboard"][0][0]
                           ["callback_data"])
    _answers(fake_api, click)
    for command in ("/start", "/help", "/privacy"):
        fake_api.send_text(user, command)
    fake_api.wait_for(lambda: len(_texts_to(fake_api, 112)) >= 5)
    texts = _texts_to(fake_api, 112)
    assert any(t.startswith("Hi! I'm loopbot") for t in texts)
    assert any("kept for 90 days" in t for t in texts)
    fake_api.send_text(user, "/forget")
    fake_api.wait_for(lambda: any(t.startswith("Deleted:") for t in _texts_to(fake_api, 112)))
    assert "Deleted: 1 messages, 1 votes, 0 reactions." in _texts_to(fake_api, 112)
    assert bot.query("SELECT COUNT(*) FROM interactions WHERE user_id = 112") == [(0,)]
    assert bot.query("SELECT COUNT(*) FROM votes WHERE user_id = 112") == [(0,)]


def test_respond_with_verdict_only_or_reply_only(bot: BotHarness, fake_api: FakeBotAPI) -> None:
    tg = bot.settings.telegram  # the running bot reads this per message
    user = fake_api.user(113, "en")
    try:
        tg.respond_with = "verdict"
        fake_api.send_text(user, "verdict please")
        fake_api.wait_for(lambda: bot.query(
            "SELECT 1 FROM bot_messages b JOIN interactions i ON i.id = b.interaction_id"
            " WHERE i.chat_id = 113"))
        tg.respond_with = "reply"
        fake_api.send_text(user, "just chat")
        fake_api.wait_for(lambda: len(bot.query(
            "SELECT 1 FROM bot_messages b JOIN interactions i ON i.id = b.interaction_id"
            " WHERE i.chat_id = 113")) == 2)
    finally:
        tg.respond_with = "both"
    first, second = fake_api.bot_messages(113)
    assert VERDICT_RE.fullmatch(first["text"]) and "reply_markup" in first
    assert "reply_markup" not in second
    assert bot.query("SELECT text, label IS NOT NULL, reply_text IS NOT NULL FROM interactions"
                     " WHERE chat_id = 113 ORDER BY id") == [
        ("verdict please", 1, 0), ("just chat", 0, 1)]


def _new_text(api: FakeBotAPI, chat_id: int, seen: int) -> str | None:
    """The first text sent to ``chat_id`` after the ``seen`` ones, if any yet."""
    texts = _texts_to(api, chat_id)
    return texts[seen] if len(texts) > seen else None


def test_report_and_approve_for_admins(bot: BotHarness, fake_api: FakeBotAPI) -> None:
    user = fake_api.user(131, "zh")
    _, verdict, _ = _converse(fake_api, bot, user, "不是很好，但是也还行吧")
    (row,) = verdict["reply_markup"]["inline_keyboard"]
    _answers(fake_api, fake_api.click(user, verdict, row[1]["callback_data"]))

    admin = fake_api.user(ADMIN_ID, "en")
    before = len(_texts_to(fake_api, ADMIN_ID))
    fake_api.send_text(admin, "/report")
    report = fake_api.wait_for(
        lambda: t[before:] if len(t := _texts_to(fake_api, ADMIN_ID)) > before else None)
    assert "v1-zh" in report[0]  # the active version's report, whatever it found so far

    for command, expected in (("/approve", "Usage: /approve ID"),
                              ("/approve v1-zh-c99", "cannot approve")):
        before = len(_texts_to(fake_api, ADMIN_ID))
        fake_api.send_text(admin, command)
        answer = fake_api.wait_for(partial(_new_text, fake_api, ADMIN_ID, before))
        assert expected in answer

    outsider = fake_api.user(132, "en")
    fake_api.send_text(outsider, "/approve v1-zh")
    fake_api.wait_for(lambda: _texts_to(fake_api, 132))
    assert bot.query("SELECT COUNT(*) FROM candidate_proposals") == [(0,)]


def test_a_group_keyboard_keeps_its_language_and_marks_nobody(bot: BotHarness,
                                                              fake_api: FakeBotAPI) -> None:
    group, author, voter = -5100, fake_api.user(120, "zh"), fake_api.user(121, "en")
    handle = "@loopbot_test_bot"
    fake_api.send_text(author, f"{handle} 这家店不错", chat_id=group, chat_type="group",
                       entities=[{"type": "mention", "offset": 0, "length": len(handle)}])
    verdict, _ = _messages(fake_api, group, 2)
    (row,) = verdict["reply_markup"]["inline_keyboard"]
    assert [b["text"] for b in row] == ["✅ 对", "❌ 错"]
    click = fake_api.click(voter, verdict, row[0]["callback_data"])
    # The voter is answered in their language; the shared keyboard stays as it was.
    assert _answers(fake_api, click) == ["Thanks! Recorded as right ✅"]
    assert bot.query("SELECT v.user_id, v.correct FROM votes v JOIN interactions i"
                     " ON i.id = v.interaction_id WHERE i.chat_id = ?", (group,)) == [(121, 1)]
    assert fake_api.calls_to("editMessageReplyMarkup", chat_id=str(group)) == []


ANONYMOUS_ADMIN = {"id": 1087968824, "is_bot": True, "first_name": "Group",
                   "username": "GroupAnonymousBot"}


def test_anonymous_admins_speak_for_their_group(bot: BotHarness, fake_api: FakeBotAPI) -> None:
    group = -5200
    handle = "@loopbot_test_bot"
    message = fake_api.user_message(ANONYMOUS_ADMIN, chat_id=group, chat_type="supergroup")
    message.update(text=f"{handle} great news", sender_chat=fake_api.chat(group, "supergroup"),
                   entities=[{"type": "mention", "offset": 0, "length": len(handle)}])
    fake_api.push({"message": message})
    _messages(fake_api, group, 2)
    # Stored under the group it speaks for, not the service account all such senders share.
    assert bot.query("SELECT user_id FROM interactions WHERE chat_id = ?", (group,)) == [
        (group,)]
    forget = fake_api.user_message(ANONYMOUS_ADMIN, chat_id=group, chat_type="supergroup")
    forget.update(text="/forget", sender_chat=fake_api.chat(group, "supergroup"),
                  entities=[{"type": "bot_command", "offset": 0, "length": 7}])
    fake_api.push({"message": forget})
    fake_api.wait_for(lambda: any("on behalf of a group" in t
                                  for t in _texts_to(fake_api, group)))
    assert bot.query("SELECT COUNT(*) FROM interactions WHERE chat_id = ?", (group,)) == [(1,)]

