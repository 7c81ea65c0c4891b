"""The remote backend's error paths and routing, against a scripted fake llama-server
(``bot.devtools.fakeinference``): overload and slowness are "busy", broken answers are errors,
a server that is down is skipped, named and taken back; one chat stays on one server."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import ConfigError, ModelConfig, load_settings
from bot.devtools import fakeinference as fi
from bot.llm.remote.runtime import RemoteRuntime
from bot.llm.types import (
    InferenceError,
    RuntimeBusy,
    ServerBusy,
    ServerUnavailable,
    UnsupportedModel,
)
from bot.prompts import PromptVersion, load_directory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def zh() -> PromptVersion:
    return load_directory(ROOT / "prompts")["v1-zh"]


@pytest.fixture
def fake() -> Iterator[fi.FakeLlamaServer]:
    with fi.FakeLlamaServer(api_key="sekret") as server:
        yield server


def _runtime(*urls: str, **extra: Any) -> RemoteRuntime:
    settings: dict[str, Any] = {"verdict_timeout_s": 5.0, "reply_timeout_s": 5.0,
                                "remote_retry_s": 0.1, "api_key": "sekret", **extra}
    return RemoteRuntime(ModelConfig(backend="remote", url=list(urls), **settings))


async def _started(runtime: RemoteRuntime) -> RemoteRuntime:
    await runtime.start()
    return runtime


def test_label_probabilities_are_the_forced_tokens_log_probabilities(
        fake: fi.FakeLlamaServer, zh: PromptVersion) -> None:
    # The toy tokenizer makes each UTF-8 byte a token: "正面" and "负面" are 6 tokens each,
    # so the labels are scored by teacher forcing over all of them.
    pos = fake.tokenize("正面", parse_special=False)
    neg = fake.tokenize("负面", parse_special=False)
    fake.set_logprobs({pos[0]: -1.0, neg[0]: -2.5, **{t: -0.1 for t in pos[1:] + neg[1:]}})

    async def run() -> Any:
        runtime = await _started(_runtime(fake.url))
        try:
            return await runtime.classify(zh, "还行", session="1")
        finally:
            await runtime.close()

    verdict = asyncio.run(run())
    lp_pos = -1.0 + 5 * -0.1
    lp_neg = -2.5 + sum(-0.1 for t in neg[1:] if t not in pos[1:]) + sum(
        -0.1 for t in neg[1:] if t in pos[1:])
    expected = math.exp(lp_pos) / (math.exp(lp_pos) + math.exp(lp_neg))
    assert verdict.probabilities["正面"] == pytest.approx(expected, abs=1e-9)
    assert verdict.scorer == f"remote:{fake.model_id}"
    forced = [r.body for r in fake.requests_to("/completion")]
    assert all(r["n_predict"] == 1 and r["post_sampling_probs"] is False for r in forced)
    # The first request's top tokens include "负面"'s first token: 1 + 5 + 5 requests.
    assert len(forced) == 11
    assert all(r.authorization == "Bearer sekret" for r in fake.requests)


@pytest.mark.parametrize("behaviour", [fi.rate_limited(retry_after=2), fi.loading(),
                                       fi.no_slot()], ids=["429", "503-loading", "503-no-slot"])
def test_an_overloaded_server_is_busy_not_down(fake: fi.FakeLlamaServer, zh: PromptVersion,
                                               behaviour: fi.Behaviour) -> None:
    async def run() -> tuple[BaseException, list[str]]:
        runtime = await _started(_runtime(fake.url))
        fake.always("/completion", behaviour)
        try:
            with pytest.raises(RuntimeBusy) as caught:
                await runtime.classify(zh, "好")
            fake.clear()
            await runtime.classify(zh, "好")  # the next request is served again
            return caught.value, runtime.problems()
        finally:
            await runtime.close()

    error, problems = asyncio.run(run())
    assert isinstance(error, ServerBusy) and "overloaded" in str(error)
    assert problems == []


def test_a_slow_server_is_busy_within_the_limit(fake: fi.FakeLlamaServer,
                                                zh: PromptVersion) -> None:
    gate = threading.Event()

    async def run() -> BaseException:
        runtime = await _started(_runtime(fake.url, reply_timeout_s=0.5))
        fake.always("/completion", fi.held(gate))
        try:
            with pytest.raises(ServerBusy) as caught:
                await runtime.reply(zh, [], "你好")
            return caught.value
        finally:
            gate.set()
            await runtime.close()

    assert "within 0.5s" in str(asyncio.run(run()))


@pytest.mark.parametrize(("path", "behaviour", "words"), [
    ("/completion", fi.invalid_json(), "not JSON"),
    ("/completion", fi.missing_fields("completion_probabilities"), "log-probability"),
    ("/tokenize", fi.missing_fields("tokens"), "without token ids"),
])
def test_a_malformed_verdict_answer_is_an_error(fake: fi.FakeLlamaServer, zh: PromptVersion,
                                                path: str, behaviour: fi.Behaviour,
                                                words: str) -> None:
    async def run() -> BaseException:
        runtime = await _started(_runtime(fake.url))
        fake.always(path, behaviour)
        try:
            with pytest.raises(InferenceError) as caught:
                await runtime.classify(zh, "一般般")
            return caught.value
        finally:
            await runtime.close()

    error = asyncio.run(run())
    assert not isinstance(error, RuntimeBusy) and words in str(error), error


@pytest.mark.parametrize("behaviour", [fi.cut_stream(after=2), fi.cut_stream(after=2, how="end"),
                                       fi.stream_error(after=1)], ids=["closed", "ended", "error"])
def test_a_reply_stream_cut_short_is_an_error_not_a_short_reply(
        fake: fi.FakeLlamaServer, zh: PromptVersion, behaviour: fi.Behaviour) -> None:
    async def run() -> BaseException:
        runtime = await _started(_runtime(fake.url))
        fake.always("/completion", behaviour)
        try:
            with pytest.raises(InferenceError) as caught:
                await runtime.reply(zh, [], "讲个笑话")
            return caught.value
        finally:
            await runtime.close()

    error = asyncio.run(run())
    assert not isinstance(error, RuntimeBusy), error


def test_a_reply_streams_piece_by_piece(fake: fi.FakeLlamaServer, zh: PromptVersion) -> None:
    fake.set_reply(["你", "好", "！"])
    seen: list[str] = []

    async def run() -> Any:
        runtime = await _started(_runtime(fake.url))
        try:
            return await runtime.reply(zh, [], "嗨", on_text=seen.append)
        finally:
            await runtime.close()

    reply = asyncio.run(run())
    assert (reply.text, reply.tokens, reply.stopped_by) == ("你好！", 3, "eos")
    assert seen == ["你", "你好", "你好！"]


def test_a_full_queue_is_busy_at_once(fake: fi.FakeLlamaServer, zh: PromptVersion) -> None:
    gate = threading.Event()

    async def run() -> None:
        runtime = await _started(_runtime(fake.url, max_queue=1))
        fake.always("/completion", fi.held(gate))
        try:
            first = asyncio.create_task(runtime.reply(zh, [], "一"))
            await asyncio.sleep(0.2)
            with pytest.raises(RuntimeBusy):
                await runtime.reply(zh, [], "二")
            gate.set()
            fake.clear()
            await first
        finally:
            gate.set()
            await runtime.close()

    asyncio.run(run())


def test_chats_stick_to_a_server_and_move_while_it_is_down(zh: PromptVersion) -> None:
    with fi.FakeLlamaServer() as one, fi.FakeLlamaServer() as two:
        servers = {one.url: one, two.url: two}

        async def run() -> None:
            runtime = await _started(_runtime(one.url, two.url))
            try:
                homes: dict[str, str] = {}
                for chat in map(str, range(12)):
                    counts = {u: len(s.requests_to("/completion")) for u, s in servers.items()}
                    await runtime.reply(zh, [], "你好", session=chat)
                    (homes[chat],) = [u for u, s in servers.items()
                                      if len(s.requests_to("/completion")) > counts[u]]
                assert set(homes.values()) == set(servers)  # both get chats
                for chat, home in homes.items():  # and each chat keeps its server
                    before = len(servers[home].requests_to("/completion"))
                    await runtime.reply(zh, [], "再说一次", session=chat)
                    assert len(servers[home].requests_to("/completion")) == before + 1

                one.down()
                for chat in homes:  # everyone is answered by the server still up
                    await runtime.reply(zh, [], "还在吗", session=chat)
                (problem,) = runtime.problems()
                assert one.url in problem and "down" in problem
                one.up()
                for _ in range(100):
                    if not runtime.problems():
                        break
                    await asyncio.sleep(0.05)
                assert runtime.problems() == []
                moved_back = next(c for c, h in homes.items() if h == one.url)
                before = len(one.requests_to("/completion"))
                await runtime.reply(zh, [], "回来了", session=moved_back)
                assert len(one.requests_to("/completion")) == before + 1
            finally:
                await runtime.close()

        asyncio.run(run())


def test_no_server_reachable_is_busy_and_named(zh: PromptVersion) -> None:
    fake = fi.FakeLlamaServer().start()
    url = fake.url
    fake.stop()

    async def run() -> tuple[BaseException, list[str]]:
        runtime = await _started(_runtime(url))  # starts even so: the server may come later
        try:
            with pytest.raises(ServerUnavailable) as caught:
                await runtime.classify(zh, "好")
            return caught.value, runtime.problems()
        finally:
            await runtime.close()

    error, problems = asyncio.run(run())
    assert isinstance(error, RuntimeBusy) and url in str(error)
    assert len(problems) == 1 and url in problems[0]


def test_servers_serving_different_models_are_refused_at_start() -> None:
    with fi.FakeLlamaServer(model_path="/m/a-q8_0.gguf") as one, \
            fi.FakeLlamaServer(model_path="/m/a-q4_0.gguf") as two:
        async def run() -> None:
            runtime = _runtime(one.url, two.url, api_key="")
            try:
                with pytest.raises(UnsupportedModel, match="serve different models"):
                    await runtime.start()
            finally:
                await runtime.close()

        asyncio.run(run())


@pytest.mark.parametrize(("urls", "words"), [
    (["http://a:8080/v1"], "without /v1"),
    (["http://a:8080", "http://a:8080/"], "listed twice"),
    (["a:8080"], "must start with http"),
    ([], "needs the inference server's URL"),
])
def test_bad_server_urls_are_named(urls: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_settings(None, env={}, overrides={"model.backend": "remote", "model.url": urls})


def test_event_lines_split_only_at_newlines() -> None:
    """A token's text may hold U+2028, U+0085 or \\x1c raw inside a JSON string (llama-server
    writes it so); httpx's aiter_lines would split there and break the JSON."""
    import httpx

    from bot.llm.remote.pool import sse_lines

    body = ('data: {"content":"a\u2028b\u0085c\x1cd"}\r\n\n'
            'data: {"content":"e"}\n\ndata: [DONE]').encode()

    async def run() -> list[str]:
        response = httpx.Response(200, stream=httpx.ByteStream(body))
        return [line async for line in sse_lines(response)]

    lines = asyncio.run(run())
    assert lines == ['data: {"content":"a\u2028b\u0085c\x1cd"}', "",
                     'data: {"content":"e"}', "", "data: [DONE]"]
