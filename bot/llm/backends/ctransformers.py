"""Optional ctransformers backend, for older GGUF files of the architectures it knows.

Its bundled ggml predates Qwen2, so a qwen2 file must be refused up front, with a message
that says which backend runs it, instead of crashing inside native code.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bot.llm import chatml, scoring
from bot.llm.backends.base import Score
from bot.llm.types import ChatTurn, UnsupportedModel
from bot.prompts import PromptVersion

# What ctransformers 0.2.27 can load from GGUF (its ggml knows only the llama graph there).
CTRANSFORMERS_ARCHES = {"llama"}


def check_architecture(path: str | Path, arch: str) -> None:
    if arch not in CTRANSFORMERS_ARCHES:
        raise UnsupportedModel(
            f"{path}: the ctransformers backend cannot run the '{arch}' architecture (its "
            f"bundled ggml predates it; it runs only: {', '.join(sorted(CTRANSFORMERS_ARCHES))})."
            " Use the llama_cpp backend instead: set model.backend: llama_cpp in the config "
            "(the default).")


class CTransformersBackend:
    name = "ctransformers"

    def __init__(self, model_path: str | Path, *, arch: str, n_threads: int = 0,
                 max_input_tokens: int = 512) -> None:
        check_architecture(model_path, arch)
        try:
            from ctransformers import AutoModelForCausalLM
        except ImportError as exc:
            raise UnsupportedModel(
                "the ctransformers backend needs the optional extra: "
                "pip install 'loopbot[ctransformers]'") from exc
        self.max_input_tokens = max_input_tokens
        self.llm: Any = AutoModelForCausalLM.from_pretrained(
            str(model_path), model_type=arch, threads=n_threads or -1)

    def _encode(self, pieces: Sequence[chatml.Piece]) -> list[int]:
        # ctransformers cannot tokenize with special parsing off, so control tokens in text
        # are defused before tokenizing; template control tokens are looked up by text.
        tokens: list[int] = []
        for piece in pieces:
            text = piece.text if piece.control else piece.text.replace("<|", "< |")
            tokens += self.llm.tokenize(text, add_bos_token=False)
        return tokens

    def score(self, version: PromptVersion, text: str, *, use_cache: bool = True) -> Score:
        body = text[: self.max_input_tokens * 4]
        tokens = self._encode(chatml.classifier_prefix(version) + chatml.classifier_query(body))
        logprobs: dict[str, float] = {}
        for label in version.label_names:
            label_tokens = self.llm.tokenize(label, add_bos_token=False)
            self.llm.reset()
            self.llm.eval(tokens)
            total = 0.0
            for tok in label_tokens:
                total += scoring.log_softmax_at(np.asarray(self.llm.logits, dtype=np.float32),
                                                [tok])[0]
                self.llm.eval([tok])
            logprobs[label] = total
        return Score(probabilities=scoring.normalise(logprobs), tokens_evaluated=len(tokens),
                     prefix_cached=False, truncated=len(body) < len(text))

    def generate(self, version: PromptVersion, history: Sequence[ChatTurn],
                 text: str) -> Generator[str, None, str]:
        tokens = self._encode(chatml.chat_prompt(version, history, text))
        gen = version.generation
        stream = self.llm.generate(tokens, top_k=gen.top_k, top_p=gen.top_p,
                                   temperature=gen.temperature,
                                   repetition_penalty=gen.repeat_penalty, reset=True)
        for count, token in enumerate(stream):
            if count >= gen.max_tokens:
                return "length"
            if self.llm.is_eos_token(token):
                return "eos"
            yield self.llm.detokenize([token])
        return "eos"

    def close(self) -> None:
        self.llm = None
