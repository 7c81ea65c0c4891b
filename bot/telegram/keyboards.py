"""Inline keyboards under a verdict, and their callback data.

Callback data only names the stored interaction and the choice (``v:<id>:c`` / ``v:<id>:w`` /
``v:<id>:<label index>``), well under Telegram's 64-byte limit. It is a pointer, not a claim:
the service checks the interaction, chat and message before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from bot import texts
from bot.service import CORRECT, WRONG
from bot.store.queries import Interaction, Vote

MAX_CALLBACK_BYTES = 64
_CALLBACK_RE = re.compile(r"v:([1-9][0-9]{0,17}):(c|w|[0-9]{1,2})")


@dataclass(frozen=True)
class VoteCallback:
    interaction_id: int
    choice: str | int  # CORRECT, WRONG, or a label index


def encode(interaction_id: int, choice: str | int) -> str:
    code = {CORRECT: "c", WRONG: "w"}.get(choice, choice) if isinstance(choice, str) else choice
    data = f"v:{interaction_id}:{code}"
    if not _CALLBACK_RE.fullmatch(data) or len(data.encode()) > MAX_CALLBACK_BYTES:
        raise ValueError(f"cannot encode callback for {interaction_id}/{choice!r}")
    return data


def decode(data: str | None) -> VoteCallback | None:
    """The parsed callback, or ``None`` for anything that is not exactly our format."""
    if not data or len(data.encode()) > MAX_CALLBACK_BYTES:
        return None
    match = _CALLBACK_RE.fullmatch(data)
    if match is None:
        return None
    code = match[2]
    choice: str | int = CORRECT if code == "c" else WRONG if code == "w" else int(code)
    return VoteCallback(int(match[1]), choice)


def verdict_keyboard(interaction_id: int, lang: str, vote: Vote | None = None
                     ) -> InlineKeyboardMarkup:
    """Exactly two buttons; the recorded vote, if any, is marked."""
    right = texts.t("btn_correct", lang)
    wrong = texts.t("btn_wrong", lang)
    if vote is not None:
        if vote.correct:
            right = texts.t("btn_chosen", lang, text=right)
        else:
            wrong = texts.t("btn_chosen", lang, text=wrong)
    return InlineKeyboardMarkup([[
        InlineKeyboardButton(right, callback_data=encode(interaction_id, CORRECT)),
        InlineKeyboardButton(wrong, callback_data=encode(interaction_id, WRONG)),
    ]])


def label_keyboard(interaction: Interaction, lang: str, vote: Vote | None = None
                   ) -> InlineKeyboardMarkup:
    """After "wrong" with more than two labels: the other labels to pick the right one,
    plus the two vote buttons to change one's mind."""
    rows = []
    for index, name in enumerate(interaction.labels):
        if name == interaction.label:
            continue
        text = name
        if vote is not None and vote.correct_label == name:
            text = texts.t("btn_chosen", lang, text=name)
        rows.append([InlineKeyboardButton(text, callback_data=encode(interaction.id, index))])
    rows.append(list(verdict_keyboard(interaction.id, lang, vote).inline_keyboard[0]))
    return InlineKeyboardMarkup(rows)


def language_of_keyboard(markup: InlineKeyboardMarkup | None) -> str | None:
    """The language a verdict keyboard was drawn in (from its ✅ button), if it is ours."""
    if markup is None:
        return None
    for row in markup.inline_keyboard:
        for button in row:
            for lang in (texts.ZH, texts.EN):
                if button.text.startswith(texts.t("btn_correct", lang)):
                    return lang
    return None
