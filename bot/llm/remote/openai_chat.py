"""Replies from any OpenAI-compatible chat endpoint (``/v1/chat/completions``): Ollama,
LM Studio, vLLM, llama-server. Replies only: a chat endpoint returns generated text, never
the exact probability of each label after the prompt, so verdicts stay in process.

These servers take messages, not token ids: they render the chat template to text and
tokenize it **with special-token parsing on** (llama-server and Ollama do; so do Hugging Face
tokenizers behind vLLM), so a user's typed ``<|im_start|>`` would become a real control token
and could open a turn of its own. Every control-token spelling in user-supplied text is
therefore broken with a zero-width space after ``<|`` before it is sent: the model sees the
same characters with an invisible one inside, and no control token (tested against the real
llama-server in ``tests/e2e/test_remote_backend.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from bot.llm.remote.pool import Server, ServerPool
from bot.llm.types import ChatTurn, InferenceError
from bot.prompts import PromptVersion

# "<|im_start|>", "<|endoftext|>", "<|im_end|>" and any other "<|...|>" spelling.
_CONTROL = re.compile(r"<\|")
ZERO_WIDTH_SPACE = "\u200b"


def defuse(text: str) -> str:
    """``text`` with every ``<|`` broken, so no chat template turns it into a control token."""
    return _CONTROL.sub("<" + ZERO_WIDTH_SPACE + "|", text)


class OpenAIChatApi:
    name = "openai-chat"
    can_score = False

    def __init__(self, pool: ServerPool, *, model: str = "") -> None:
        self.pool = pool
        self.model = model

    async def model_of(self, server: Server) -> str:
        """The configured model name, else the first one the server lists."""
        if self.model:
            return self.model
        body = await self.pool.get_json(server, "/v1/models")
        try:
            return str(body["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise InferenceError(f"{server.url}/v1/models lists no model: set "
                                 "model.remote_model") from None

    async def model_id(self) -> str:
        if not self.model:
            self.model = await self.pool.call("model", self.model_of)
        return self.model

    @staticmethod
    def messages(version: PromptVersion, history: Sequence[ChatTurn],
                 text: str) -> list[dict[str, str]]:
        out = [{"role": "system", "content": version.chat_system}]
        for turn in history:
            out.append({"role": "assistant" if turn.role == "assistant" else "user",
                        "content": defuse(turn.text)})
        out.append({"role": "user", "content": defuse(text)})
        return out

    async def stream_reply(self, version: PromptVersion, history: Sequence[ChatTurn],
                           text: str, *, key: str,
                           on_piece: Callable[[str], None]) -> tuple[int, str]:
        gen = version.generation
        body: dict[str, Any] = {
            "model": await self.model_id(), "stream": True,
            "messages": self.messages(version, history, text),
            "max_tokens": gen.max_tokens, "temperature": gen.temperature, "top_p": gen.top_p}
        if gen.seed >= 0:
            body["seed"] = gen.seed

        async def run(server: Server) -> tuple[int, str]:
            pieces, stop = 0, ""
            async with self.pool.stream(server, "/v1/chat/completions", body) as events:
                async for event in events:
                    try:
                        choice = event["choices"][0] if event.get("choices") else {}
                    except (KeyError, IndexError, TypeError):
                        raise InferenceError(f"{server.url} streamed a chunk without choices") \
                            from None
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    piece = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(piece, str) and piece:
                        pieces += 1
                        on_piece(piece)
                    reason = choice.get("finish_reason") if isinstance(choice, dict) else None
                    if reason:
                        stop = "length" if reason == "length" else "eos"
            if not stop:
                raise InferenceError(f"inference server {server.url} ended the reply stream "
                                     "without a finish reason")
            return pieces, stop

        return await self.pool.call(key, run)
