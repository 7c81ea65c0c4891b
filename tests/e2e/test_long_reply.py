"""Long replies: split below Telegram's 4096-character limit, streamed by editing, and a full
inference queue answered with "busy" instead of waiting without end.

The tiny model's weights are noise, so a long reply needs a prompt version that lets it talk:
max_tokens 2048 and a hot, seeded sampler (seeded: the same text gives the same reply).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bot.devtools.fakebotapi import FakeBotAPI
from tests.e2e.botharness import ROOT, BotHarness


@pytest.fixture(scope="module")
def chatty_bot(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[BotHarness, FakeBotAPI]]:
    prompts = tmp_path_factory.mktemp("prompts")
    data = yaml.safe_load((ROOT / "prompts" / "v1-zh.yaml").read_text(encoding="utf-8"))
    data["generation"].update(max_tokens=2048, temperature=2.0, seed=14)
    (prompts / "v1-zh.yaml").write_text(yaml.safe_dump(data, allow_unicode=True),
                                        encoding="utf-8")
    with FakeBotAPI() as api:
        harness = BotHarness(api, tiny_gguf, tmp_path_factory.mktemp("long") / "l.db",
                             overrides={"prompts.directory": str(prompts),
                                        "model.n_ctx": 4096, "model.n_threads": 1,
                                        "model.max_queue": 1,
                                        "telegram.stream_edit_interval_s": 0.2})
        harness.start()
        yield harness, api
        harness.stop()


@pytest.mark.slow
def test_a_reply_over_4096_characters_is_split(
        chatty_bot: tuple[BotHarness, FakeBotAPI]) -> None:
    bot, api = chatty_bot
    # A few fresh chats, in case a change to the test model shortens the first reply.
    for chat_id, text in enumerate(("你好", "今天怎么样？", "讲个故事吧", "hello"), start=501):
        api.send_text(api.user(chat_id, "zh"), text)

        def reply_of(cid: int = chat_id) -> list[tuple[str]]:
            return bot.query("SELECT reply_text FROM interactions WHERE chat_id = ?"
                             " AND reply_text IS NOT NULL", (cid,))

        ((stored,),) = api.wait_for(reply_of, timeout=60)
        if len(stored) > 4096:
            break
    else:
        pytest.fail("no reply over 4096 characters: the premise of this test broke")
    # Each piece's message id is stored as it is sent: wait until the chat's outbox is empty.
    api.wait_for(lambda: bot.query(
        "SELECT COUNT(*) FROM outbox WHERE chat_id = ?"
        " HAVING COUNT(*) > 0 AND SUM(state = 'pending') = 0", (chat_id,)), timeout=60)
    ((sent,),) = bot.query(
        "SELECT COUNT(*) FROM bot_messages WHERE chat_id = ? AND kind = 'reply'", (chat_id,))
    replies = api.bot_messages(chat_id)
    pieces = [m["text"] for m in replies if "reply_markup" not in m]
    assert len(pieces) >= 2
    assert all(len(p.encode("utf-16-le")) // 2 <= 4096 for p in pieces)
    assert "".join(pieces).replace(" ", "").replace("\n", "") == stored.replace(
        " ", "").replace("\n", "")
    # Only the first piece answers the user's message; all are remembered for reactions.
    assert "reply_to_message" in replies[1] and "reply_to_message" not in replies[2]
    assert sent == len(pieces)
    # The first piece was shown while it was generated, then completed by edits.
    assert api.calls_to("editMessageText", chat_id=str(chat_id),
                        message_id=str(replies[1]["message_id"]))


@pytest.mark.slow
def test_a_full_inference_queue_answers_busy(
        chatty_bot: tuple[BotHarness, FakeBotAPI]) -> None:
    bot, api = chatty_bot
    # A long reply occupies the only queue slot (model.max_queue = 1) ...
    api.send_text(api.user(601, "zh"), "你好")
    api.wait_calls("sendChatAction", chat_id="601")
    # ... so a message arriving meanwhile is refused politely, not queued.
    api.send_text(api.user(602, "en"), "anyone?")
    assert api.wait_for(lambda: [c.params["text"] for c in
                                 api.calls_to("sendMessage", chat_id="602")]) == [
        "I'm busy right now, please try again in a moment 🙏"]
    api.wait_for(lambda: bot.query(
        "SELECT 1 FROM bot_messages WHERE chat_id = 601 AND kind = 'reply'"), timeout=60)
    assert bot.query("SELECT COUNT(*) FROM interactions WHERE chat_id = 602") == [(0,)]
