"""ChatML framing as token pieces, so that control tokens come only from the template.

Qwen's chat format is ``<|im_start|>role\\ncontent<|im_end|>\\n``. Rendering it to one string
and tokenizing with special-token parsing on would turn a user's typed ``<|im_start|>`` into
a real control token (prompt injection). Instead the template is a list of pieces, each marked
as control or as plain text, and a backend tokenizes plain text with special parsing off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.llm.types import ChatTurn
from bot.prompts import PromptVersion

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


@dataclass(frozen=True)
class Piece:
    text: str
    control: bool = False


def message(role: str, content: str) -> list[Piece]:
    return [Piece(IM_START, True), Piece(f"{role}\n{content}"), Piece(IM_END, True), Piece("\n")]


def assistant_opening() -> list[Piece]:
    return [Piece(IM_START, True), Piece("assistant\n")]


def classifier_prefix(version: PromptVersion) -> list[Piece]:
    """System prompt and few-shot turns: identical for every message of a version (cached)."""
    pieces = message("system", version.system)
    for example in version.examples:
        pieces += message("user", example.text)
        pieces += message("assistant", example.label)
    return pieces


def classifier_query(text: str) -> list[Piece]:
    """What a verdict evaluates after the cached prefix: the message and the answer opening."""
    return message("user", text) + assistant_opening()


def chat_prompt(version: PromptVersion, history: Sequence[ChatTurn], text: str) -> list[Piece]:
    pieces = message("system", version.chat_system)
    for turn in history:
        pieces += message("assistant" if turn.role == "assistant" else "user", turn.text)
    pieces += message("user", text)
    return pieces + assistant_opening()


def reply_budget(n_ctx: int, max_tokens: int) -> int:
    """Prompt tokens a reply may take: what leaves room to answer within ``n_ctx`` (a
    ``max_tokens`` beyond half of it is capped), the same in process and on a server."""
    return n_ctx - min(max_tokens, n_ctx // 2) - 1
