"""Message splitting below Telegram's limit, callback data, language choice."""

from __future__ import annotations

import pytest

from bot import texts
from bot.service import CORRECT, WRONG, UserRateLimiter, reaction_polarity
from bot.telegram import keyboards


def test_split_respects_the_limit_and_loses_nothing() -> None:
    words = " ".join(f"word{i}." for i in range(3000))  # ~25k characters
    pieces = texts.split_message(words)
    assert len(pieces) > 5
    assert all(texts.utf16_len(p) <= texts.MESSAGE_LIMIT for p in pieces)
    assert " ".join(pieces).split() == words.split()
    assert all(p.endswith(".") for p in pieces[:-1])  # cut at sentence/word boundaries


def test_split_counts_utf16_units_and_cuts_unbroken_text() -> None:
    emoji = "😀" * 5000  # 10,000 UTF-16 units, no boundary anywhere
    pieces = texts.split_message(emoji, limit=4096)
    assert all(texts.utf16_len(p) <= 4096 for p in pieces)
    assert "".join(pieces) == emoji
    assert texts.split_message("short") == ["short"]
    assert texts.split_message("  ") == []


def test_split_prefers_paragraphs() -> None:
    text = "a" * 3000 + "\n\n" + "b" * 3000
    assert texts.split_message(text) == ["a" * 3000, "b" * 3000]


def test_callback_data_round_trips_and_is_compact() -> None:
    for choice in (CORRECT, WRONG, 0, 7):
        data = keyboards.encode(123456789012, choice)
        assert len(data.encode()) <= keyboards.MAX_CALLBACK_BYTES
        decoded = keyboards.decode(data)
        assert decoded == keyboards.VoteCallback(123456789012, choice)


@pytest.mark.parametrize("data", [
    None, "", "v:1:x", "v:0:c", "v:-1:c", "v:1:c:extra", "x:1:c", "v:1:100",
    "v:" + "9" * 70 + ":c", "v:1:c\n",
])
def test_malformed_callback_data_is_rejected(data: str | None) -> None:
    assert keyboards.decode(data) is None


def test_verdict_keyboard_has_exactly_two_buttons() -> None:
    markup = keyboards.verdict_keyboard(5, texts.EN)
    (row,) = markup.inline_keyboard
    assert [b.callback_data for b in row] == ["v:5:c", "v:5:w"]


def test_language_choice() -> None:
    assert texts.language_of("zh-hans") == texts.ZH
    assert texts.language_of("en") == texts.EN
    assert texts.language_of(None) == texts.EN
    assert texts.t("verdict", texts.ZH, emoji="😊", label="正面", percent=93) == "😊 正面 · 93%"


def test_rate_limiter_sliding_window() -> None:
    now = [0.0]
    limiter = UserRateLimiter(2, 10.0, clock=lambda: now[0])
    assert limiter.allow(1) and limiter.allow(1) and not limiter.allow(1)
    assert limiter.allow(2)
    now[0] = 10.5
    assert limiter.allow(1)


def test_reaction_polarity() -> None:
    pos, neg = ["👍", "❤"], ["👎"]
    assert reaction_polarity(["👍"], pos, neg) == 1
    assert reaction_polarity(["❤️"], pos, neg) == 1  # variation selector ignored
    assert reaction_polarity(["👍", "👎"], pos, neg) == -1
    assert reaction_polarity(["🤔"], pos, neg) == 0
