"""llama.cpp's ``llama-server``: token ids in, exact label probabilities and streamed replies out.

Prompts go as token ids, built from the same ChatML pieces as in process: control pieces are
tokenized by the server with special-token parsing on, everything else (the system prompt, the
user's text) with it off (``/tokenize``'s ``parse_special: false``), so a typed ``<|im_start|>``
stays text, exactly as in process.

**Verdicts are label scoring, not generation.** llama-server gives no prompt log-probabilities,
but for a generated position it reports the *pre-sampling* probability of the token it picked
(``n_probs`` > 0 with ``post_sampling_probs: false``: a softmax of the raw logits, before any
bias or sampler). A ``logit_bias`` of +1000 on one label token with greedy sampling makes that
token the one picked, so the answer is exactly log p(token | prompt) as in process (checked
against in-process scoring in the tests: within 2e-3, typically 3e-5). One request per label
token position; the first also returns the top-``TOP_PROBS`` tokens, which gives the other
labels' first tokens without another request when they are among them. ``cache_prompt`` lets
the server reuse the prompt it already holds (the version's prefix, the same message).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from bot.llm import chatml, scoring
from bot.llm.backends.base import Score
from bot.llm.remote.pool import Server, ServerPool
from bot.llm.types import ChatTurn, InferenceError
from bot.prompts import PromptVersion

# A bias no logit comes near: the biased token is the one greedy sampling picks.
FORCE_BIAS = 1000.0
TOP_PROBS = 10
_TOKEN_CACHE = 512


class LlamaServerApi:
    """Verdicts and replies on llama-server's native API (``/completion``, ``/tokenize``)."""

    name = "llama-server"
    can_score = True

    def __init__(self, pool: ServerPool, *, max_input_tokens: int, n_ctx: int,
                 verdict_cells: int = 768) -> None:
        self.pool = pool
        self.max_input_tokens = max_input_tokens
        self.n_ctx = n_ctx
        # The in-process verdict context's size: a message is cut where it would be cut there,
        # so both score the same tokens.
        self.verdict_cells = verdict_cells
        # Token ids of pieces that recur (system prompts, examples, framing, labels).
        self._pieces: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()

    async def model_of(self, server: Server) -> str:
        """The model file's name, from the server's ``/props``."""
        props = await self.pool.get_json(server, "/props")
        path = props.get("model_path") if isinstance(props, dict) else None
        if not isinstance(path, str) or not path:
            raise InferenceError(f"{server.url}/props names no model_path: is it llama-server?")
        return path.replace("\\", "/").rsplit("/", 1)[-1]

    async def model_id(self) -> str:
        return await self.pool.call("model", self.model_of)

    # -- tokens ----------------------------------------------------------------------------
    async def tokenize(self, text: str, *, special: bool, key: str) -> list[int]:
        async def ask(server: Server) -> list[int]:
            body = await self.pool.post_json(server, "/tokenize", {
                "content": text, "add_special": False, "parse_special": special})
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise InferenceError(f"{server.url}/tokenize answered without token ids")
            return tokens

        return await self.pool.call(key, ask)

    async def _piece(self, text: str, control: bool, key: str) -> list[int]:
        cached = self._pieces.get((text, control))
        if cached is not None:
            self._pieces.move_to_end((text, control))
            return cached
        tokens = await self.tokenize(text, special=control, key=key)
        self._pieces[(text, control)] = tokens
        while len(self._pieces) > _TOKEN_CACHE:
            self._pieces.popitem(last=False)
        return tokens

    async def encode(self, pieces: Sequence[chatml.Piece], key: str, *,
                     cache: bool = True) -> list[int]:
        tokens: list[int] = []
        for piece in pieces:
            if cache or piece.control:
                tokens += await self._piece(piece.text, piece.control, key)
            else:
                tokens += await self.tokenize(piece.text, special=False, key=key)
        return tokens

    async def label_tokens(self, label: str, key: str) -> list[int]:
        """A label's tokens as they follow ``assistant\\n`` (as in process)."""
        opening = await self._piece("assistant\n", False, key)
        joined = await self._piece("assistant\n" + label, False, key)
        tokens = (joined[len(opening):] if joined[:len(opening)] == opening
                  else await self._piece(label, False, key))
        if not tokens:
            raise InferenceError(f"label '{label}' tokenizes to nothing")
        return tokens

    async def _query(self, text: str, key: str, room: int | None = None
                     ) -> tuple[list[int], bool]:
        """The message framed for the classifier, its text cut to ``room`` tokens (at most
        ``max_input_tokens``), as in process."""
        head = await self.encode([chatml.Piece(chatml.IM_START, True), chatml.Piece("user\n")],
                                 key)
        tail = await self.encode([chatml.Piece(chatml.IM_END, True), chatml.Piece("\n"),
                                  *chatml.assistant_opening()], key)
        keep = self.max_input_tokens if room is None else min(
            self.max_input_tokens, room - len(head) - len(tail))
        if keep <= 0:
            raise InferenceError("the prompt version leaves no room for a message in the "
                                 f"verdict context ({self.verdict_cells} tokens: raise "
                                 "model.verdict_kv_tokens)")
        body = await self.tokenize(text, special=False, key=key)
        return head + body[:keep] + tail, len(body) > keep

    # -- verdicts --------------------------------------------------------------------------
    async def score(self, version: PromptVersion, text: str, *, key: str) -> Score:
        prefix = await self.encode(chatml.classifier_prefix(version), key)
        labels = {name: await self.label_tokens(name, key) for name in version.label_names}
        # In process the message gets what the verdict context leaves after the prefix, the
        # framing and the longest label: the same cut here.
        room = self.verdict_cells - len(prefix) - max(len(t) for t in labels.values())
        query, truncated = await self._query(text, key, room)
        prompt = prefix + query
        known: dict[int, float] = {}  # first-position log-probabilities seen so far
        logprobs: dict[str, float] = {}
        for name, tokens in labels.items():
            if tokens[0] not in known:
                known.update(await self._forced(prompt, tokens[0], key))
            total = known[tokens[0]]
            for k in range(1, len(tokens)):  # teacher forcing, one position per request
                total += (await self._forced(prompt + tokens[:k], tokens[k], key))[tokens[k]]
            logprobs[name] = total
        return Score(probabilities=scoring.normalise(logprobs), tokens_evaluated=len(query),
                     prefix_cached=True, truncated=truncated)

    async def _forced(self, prompt: list[int], token: int, key: str) -> dict[int, float]:
        """log p(token | prompt), and those of the top tokens at that position."""
        async def ask(server: Server) -> dict[int, float]:
            body = await self.pool.post_json(server, "/completion", {
                "prompt": prompt, "n_predict": 1, "n_probs": TOP_PROBS,
                "post_sampling_probs": False, "logit_bias": [[token, FORCE_BIAS]],
                "temperature": 0.0, "cache_prompt": True, "stream": False})
            return _forced_answer(server, body, token)

        return await self.pool.call(key, ask)

    # -- replies ---------------------------------------------------------------------------
    async def reply_prompt(self, version: PromptVersion, history: Sequence[ChatTurn],
                           text: str, key: str) -> list[int]:
        """The chat prompt, the oldest turns dropped until prompt and answer fit n_ctx."""
        # As in process: room to answer, the user's text cut to max_input_tokens, the oldest
        # turns dropped first.
        budget = chatml.reply_budget(self.n_ctx, version.generation.max_tokens)
        body = await self.tokenize(text, special=False, key=key)
        if len(body) > self.max_input_tokens:
            text = await self.detokenize(body[:self.max_input_tokens], key)
        turns = list(history)
        while True:
            pieces = chatml.chat_prompt(version, turns, text)
            tokens = await self.encode(pieces, key, cache=False)
            if len(tokens) <= budget or not turns:
                break
            turns = turns[1:]
        if len(tokens) > budget:
            raise InferenceError("the message is too long to answer within the context")
        return tokens

    async def detokenize(self, tokens: list[int], key: str) -> str:
        async def ask(server: Server) -> str:
            body = await self.pool.post_json(server, "/detokenize", {"tokens": tokens})
            content = body.get("content") if isinstance(body, dict) else None
            if not isinstance(content, str):
                raise InferenceError(f"{server.url}/detokenize answered without content")
            return content

        return await self.pool.call(key, ask)

    async def stream_reply(self, version: PromptVersion, history: Sequence[ChatTurn],
                           text: str, *, key: str,
                           on_piece: Callable[[str], None]) -> tuple[int, str]:
        """Stream the reply's pieces to ``on_piece``; returns (tokens, stop reason)."""
        prompt = await self.reply_prompt(version, history, text, key)
        gen = version.generation
        body: dict[str, Any] = {
            "prompt": prompt, "stream": True, "n_predict": gen.max_tokens,
            "temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k,
            "min_p": 0.0, "repeat_penalty": gen.repeat_penalty, "repeat_last_n": 64,
            "cache_prompt": True}
        if gen.seed >= 0:
            body["seed"] = gen.seed

        async def run(server: Server) -> tuple[int, str]:
            tokens, stop = 0, ""
            async with self.pool.stream(server, "/completion", body) as events:
                async for event in events:
                    piece = event.get("content")
                    if isinstance(piece, str) and piece:
                        on_piece(piece)
                    if event.get("stop") is True:
                        predicted = event.get("tokens_predicted")
                        tokens = predicted if isinstance(predicted, int) else 0
                        stop = "length" if event.get("stop_type") == "limit" else "eos"
                        break
            if not stop:
                raise InferenceError(f"inference server {server.url} ended the reply stream "
                                     "without its final event")
            return tokens, stop

        return await self.pool.call(key, run)


def _forced_answer(server: Server, body: Any, token: int) -> dict[int, float]:
    try:
        entry = body["completion_probabilities"][0]
        picked, logprob = int(entry["id"]), float(entry["logprob"])
        top = {int(t["id"]): float(t["logprob"]) for t in entry.get("top_logprobs", [])}
    except (KeyError, IndexError, TypeError, ValueError):
        raise InferenceError(f"{server.url}/completion answered without the token's "
                             "log-probability (completion_probabilities)") from None
    if picked != token:
        raise InferenceError(f"{server.url} did not honour logit_bias (picked {picked}, "
                             f"not {token}): cannot score labels on it")
    if not math.isfinite(logprob):
        raise InferenceError(f"{server.url} gave a non-finite log-probability")
    return {**top, token: logprob}
