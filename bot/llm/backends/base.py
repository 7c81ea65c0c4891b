"""The contract every model backend meets. Backends are synchronous and single-threaded: the
runtime's one worker thread is the only caller, so they need no locks."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

from bot.llm.types import ChatTurn
from bot.prompts import PromptVersion


@dataclass(frozen=True)
class Score:
    probabilities: dict[str, float]
    tokens_evaluated: int
    prefix_cached: bool
    truncated: bool


class Backend(Protocol):
    name: str

    def score(self, version: PromptVersion, text: str, *, use_cache: bool = True) -> Score:
        """Probability of each of the version's labels as the answer to ``text``."""
        ...

    def generate(
        self, version: PromptVersion, history: Sequence[ChatTurn], text: str
    ) -> Generator[str, None, str]:
        """Yield the reply's text piece by piece (one step per token), stopping at the end
        of the turn or ``version.generation.max_tokens``; the generator's return value is the
        stop reason ("eos" or "length")."""
        ...

    def close(self) -> None: ...
