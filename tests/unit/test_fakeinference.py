"""The scripted fake llama-server, over real HTTP with plain httpx: the happy shapes, then each
scripted failure. Times are only compared with each other (what came first), never bounded
tightly."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bot.devtools.fakeinference import (
    BYTE_OFFSET,
    IM_END,
    IM_START,
    FakeLlamaServer,
    connection_reset,
    cut_stream,
    error,
    held,
    invalid_json,
    missing_fields,
    no_slot,
    rate_limited,
    raw,
    reply,
    slow,
    stream_error,
)

A, B = BYTE_OFFSET + ord("a"), BYTE_OFFSET + ord("b")


@pytest.fixture
def fake() -> Iterator[FakeLlamaServer]:
    with FakeLlamaServer(logprobs={A: -0.25, B: -1.5}, default_logprob=-4.0) as server:
        yield server


@pytest.fixture
def client(fake: FakeLlamaServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=10.0) as c:
        yield c


def events(lines: Iterator[str]) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream (``[DONE]`` kept as a string)."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_lines(client: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(response.iter_lines())


# --- the happy shapes --------------------------------------------------------------------------

def test_health_props_models_metrics(fake: FakeLlamaServer, client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/health").json() == {"status": "ok"}
    props = client.get("/props").json()
    assert props["model_path"] == fake.model_path
    assert props["total_slots"] == 1
    assert props["default_generation_settings"]["n_ctx"] == fake.n_ctx
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "qwen1_5-0_5b-chat-q8_0.gguf"
    metrics = client.get("/metrics").text
    assert "# TYPE llamacpp:prompt_tokens_total counter" in metrics
    assert "llamacpp:requests_processing 0" in metrics
    assert client.get("/nope").json()["error"]["code"] == 404


def test_toy_tokenizer(client: httpx.Client) -> None:
    text = "<|im_start|>hi<|im_end|>"
    special = client.post("/tokenize", json={"content": text, "parse_special": True,
                                             "add_special": False}).json()["tokens"]
    assert special == [IM_START, BYTE_OFFSET + ord("h"), BYTE_OFFSET + ord("i"), IM_END]
    plain = client.post("/tokenize", json={"content": text,
                                           "parse_special": False}).json()["tokens"]
    assert plain == [BYTE_OFFSET + b for b in text.encode()]
    for tokens in (special, plain):
        assert client.post("/detokenize", json={"tokens": tokens}).json() == {"content": text}
    accented = client.post("/tokenize", json={"content": "é", "with_pieces": True}).json()
    assert accented["tokens"] == [{"id": BYTE_OFFSET + 0xC3, "piece": [0xC3]},
                                  {"id": BYTE_OFFSET + 0xA9, "piece": [0xA9]}]


def test_forced_token_logprobs(fake: FakeLlamaServer, client: httpx.Client) -> None:
    body = {"prompt": [IM_START, 5, 6], "n_predict": 1, "n_probs": 3,
            "post_sampling_probs": False, "logit_bias": [[B, 1000.0]], "temperature": 0.0,
            "stream": False}
    answer = client.post("/completion", json=body).json()
    assert answer["content"] == "b" and answer["stop"] is True
    assert answer["stop_type"] == "limit" and answer["tokens_predicted"] == 1
    (entry,) = answer["completion_probabilities"]
    assert entry["id"] == B and entry["logprob"] == -1.5
    assert entry["token"] == "b" and entry["bytes"] == [ord("b")]
    top = entry["top_logprobs"]
    assert [t["id"] for t in top][:2] == [A, B] and len(top) == 3
    assert set(top[0]) == {"id", "token", "bytes", "logprob"}
    assert top[2]["logprob"] < -1.5
    # The object form; the largest bias wins; unknown ids get default_logprob.
    other = client.post("/completion", json={
        "prompt": "x", "n_predict": 1, "n_probs": 1,
        "logit_bias": {str(A): 5, str(BYTE_OFFSET + ord("z")): 9}}).json()
    assert other["completion_probabilities"][0]["logprob"] == -4.0
    assert other["content"] == "z"
    assert fake.last("/completion").body["logit_bias"] == {str(A): 5,
                                                           str(BYTE_OFFSET + ord("z")): 9}


def test_completion_stream(fake: FakeLlamaServer, client: httpx.Client) -> None:
    fake.on("/completion", reply(["Hi", " there", "!"]))
    got = events(iter(stream_lines(client, "/completion", {"prompt": "hello",
                                                           "stream": True})))
    *chunks, final = got
    assert [c["content"] for c in chunks] == ["Hi", " there", "!"]
    assert all(c["stop"] is False for c in chunks)
    assert final["stop"] is True and final["stop_type"] == "eos"
    assert final["tokens_predicted"] == 3 and final["content"] == ""
    assert final["timings"]["predicted_n"] == 3
    # The default reply again, cut by n_predict.
    *chunks, final = events(iter(stream_lines(client, "/completion", {
        "prompt": "hello", "stream": True, "n_predict": 2, "n_probs": 2})))
    assert [c["content"] for c in chunks] == ["Hello", ","]
    assert chunks[1]["completion_probabilities"][0]["id"] == BYTE_OFFSET + ord(",")
    assert final["stop_type"] == "limit"


def test_openai_endpoints(fake: FakeLlamaServer, client: httpx.Client) -> None:
    got = events(iter(stream_lines(client, "/v1/completions", {
        "prompt": [1, 2, 3], "stream": True, "max_tokens": 3})))
    assert got[-1] == "[DONE]"
    assert [e["choices"][0]["text"] for e in got[:-2]] == ["Hello", ",", " world"]
    assert got[0]["choices"][0]["finish_reason"] is None
    assert got[-2]["choices"][0]["finish_reason"] == "length"
    whole = client.post("/v1/completions", json={"prompt": "hi"}).json()
    assert whole["choices"][0] == {"text": "Hello, world!", "index": 0, "logprobs": None,
                                   "finish_reason": "stop"}

    messages = [{"role": "user", "content": "hi"}]
    chat = events(iter(stream_lines(client, "/v1/chat/completions",
                                    {"messages": messages, "stream": True})))
    assert chat[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in chat[:-1]]
    assert deltas[0] == {"role": "assistant", "content": None}
    assert "".join(d.get("content") or "" for d in deltas) == "Hello, world!"
    assert chat[-2]["choices"][0]["finish_reason"] == "stop"
    answer = client.post("/v1/chat/completions", json={"messages": messages}).json()
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!"}


def test_requests_are_recorded() -> None:
    with FakeLlamaServer(api_key="k3y") as fake:
        url = fake.url
        assert httpx.get(url + "/health").status_code == 200  # public
        denied = httpx.post(url + "/tokenize", json={"content": "a"})
        assert denied.status_code == 401
        assert denied.json()["error"] == {"code": 401, "message": "Invalid API Key",
                                          "type": "authentication_error"}
        ok = httpx.post(url + "/tokenize?x=1", json={"content": "a"},
                        headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200
        first, second = fake.requests_to("/tokenize")
        assert first.authorization is None and first.status == 401
        assert second.authorization == "Bearer k3y" and second.status == 200
        assert second.body == {"content": "a"} and second.query == {"x": "1"}
        assert second.method == "POST" and second.path == "/tokenize"


# --- scripted failures -------------------------------------------------------------------------

def test_rate_limited_with_retry_after(fake: FakeLlamaServer, client: httpx.Client) -> None:
    fake.on("/completion", rate_limited(retry_after=7), times=2)
    for _ in range(2):
        answer = client.post("/completion", json={"prompt": "x"})
        assert answer.status_code == 429
        assert answer.headers["retry-after"] == "7"
        assert answer.json()["error"]["code"] == 429
    assert client.get("/health").status_code == 200  # other endpoints unaffected
    assert client.post("/completion", json={"prompt": "x"}).status_code == 200
    assert [r.status for r in fake.requests_to("/completion")] == [429, 429, 200]


def test_unavailable(fake: FakeLlamaServer, client: httpx.Client) -> None:
    fake.set_loading(True)
    for path in ("/health", "/props"):
        answer = client.get(path)
        assert answer.status_code == 503
        assert answer.json() == {"error": {"code": 503, "message": "Loading model",
                                           "type": "unavailable_error"}}
    fake.set_loading(False)
    assert client.get("/health").status_code == 200

    fake.always("*", no_slot())
    for _ in range(3):
        answer = client.post("/completion", json={"prompt": "x"})
        assert answer.status_code == 503
        assert answer.json()["error"]["message"] == "no slot available"
    fake.clear()
    assert client.post("/completion", json={"prompt": "x"}).status_code == 200
    fake.on("/tokenize", error(500, "boom"))
    assert client.post("/tokenize", json={"content": "a"}).json()["error"] == {
        "code": 500, "message": "boom", "type": "server_error"}


def test_slow_first_byte(fake: FakeLlamaServer) -> None:
    gate = threading.Event()
    fake.on("/completion", held(gate) | slow(first_byte=0.2))
    order: list[str] = []

    def slow_request() -> None:
        started = time.monotonic()
        answer = httpx.post(fake.url + "/completion", json={"prompt": "x"}, timeout=30.0)
        assert answer.status_code == 200
        order.append("slow")
        waited.append(time.monotonic() - started)

    waited: list[float] = []
    thread = threading.Thread(target=slow_request)
    thread.start()
    fake.wait_requests("/completion")
    assert httpx.get(fake.url + "/health", timeout=10.0).status_code == 200
    order.append("fast")
    assert thread.is_alive() and order == ["fast"]  # still held
    gate.set()
    thread.join(10)
    assert order == ["fast", "slow"]
    assert waited[0] >= 0.2  # the first-byte delay came after the gate


def test_slow_chunks(fake: FakeLlamaServer, client: httpx.Client) -> None:
    fake.on("/completion", slow(between_chunks=0.15) | reply(["a", "b", "c"]))
    started = time.monotonic()
    got: list[Any] = []
    with client.stream("POST", "/completion", json={"prompt": "x", "stream": True}) as response:
        got = events(response.iter_lines())
        finished = time.monotonic()
    assert [e["content"] for e in got] == ["a", "b", "c", ""]
    assert finished - started >= 0.45  # three waits between the four events
    assert fake.last("/completion").behaviour == "slow+reply"


def test_malformed_bodies(fake: FakeLlamaServer, client: httpx.Client) -> None:
    fake.on("/completion", invalid_json())
    answer = client.post("/completion", json={"prompt": "x", "n_probs": 1})
    assert answer.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        answer.json()

    fake.on("/completion", missing_fields())
    body = client.post("/completion", json={"prompt": "x", "n_probs": 1}).json()
    assert "completion_probabilities" not in body and "content" not in body
    fake.on("/props", missing_fields("model_path"))
    assert "model_path" not in client.get("/props").json()

    fake.on("/completion", invalid_json())
    lines = stream_lines(client, "/completion", {"prompt": "x", "stream": True})
    with pytest.raises(json.JSONDecodeError):
        events(iter(lines))


def test_stream_cut(fake: FakeLlamaServer, client: httpx.Client) -> None:
    # "end": a complete HTTP body, but no final event.
    fake.on("/completion", cut_stream(after=2, how="end"))
    got = events(iter(stream_lines(client, "/completion", {"prompt": "x", "stream": True})))
    assert [e["content"] for e in got] == ["Hello", ","]
    assert all(e["stop"] is False for e in got)

    fake.on("/v1/chat/completions", cut_stream(after=1, how="close"))
    with pytest.raises(httpx.RemoteProtocolError):  # incomplete chunked body
        stream_lines(client, "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "x"}], "stream": True})

    fake.on("/completion", cut_stream(after=1, how="reset"))
    with pytest.raises(httpx.TransportError):
        stream_lines(client, "/completion", {"prompt": "x", "stream": True})

    fake.on("/completion", stream_error(after=1, status=503, message="no slot available"))
    got = events(iter(stream_lines(client, "/completion", {"prompt": "x", "stream": True})))
    assert got[0]["content"] == "Hello"
    assert got[-1] == {"error": {"code": 503, "message": "no slot available",
                                 "type": "unavailable_error"}}

    fake.on("/completion", cut_stream(how="close"))  # not streamed: half the body
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/completion", json={"prompt": "x"})
    assert client.post("/completion", json={"prompt": "x"}).status_code == 200


def test_connection_reset_and_raw(fake: FakeLlamaServer, client: httpx.Client) -> None:
    fake.on("/tokenize", connection_reset())
    with pytest.raises(httpx.TransportError):
        client.post("/tokenize", json={"content": "a"})
    assert fake.last("/tokenize").status == 0  # it arrived, nothing was answered
    fake.on("/health", raw(502, "<html>Bad Gateway</html>", "text/html"))
    answer = client.get("/health")
    assert answer.status_code == 502 and answer.text == "<html>Bad Gateway</html>"
    assert client.post("/tokenize", json={"content": "a"}).status_code == 200


def test_down_then_up_on_the_same_port(fake: FakeLlamaServer) -> None:
    port = fake.port
    fake.on("/completion", slow(first_byte=30))
    cut: list[Exception] = []

    def hanging() -> None:
        try:
            httpx.post(fake.url + "/completion", json={"prompt": "x"}, timeout=30.0)
        except httpx.TransportError as exc:
            cut.append(exc)

    thread = threading.Thread(target=hanging)
    thread.start()
    fake.wait_requests("/completion")
    fake.down()
    thread.join(10)
    assert cut  # the answer in progress died with the server
    assert not fake.is_up
    with pytest.raises(httpx.ConnectError):
        httpx.get(fake.url + "/health", timeout=5.0)
    fake.up()
    assert fake.port == port
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5.0).json() == {"status": "ok"}


def test_down_blackhole_times_out(fake: FakeLlamaServer) -> None:
    fake.down(blackhole=True)
    with pytest.raises(httpx.ConnectTimeout):
        httpx.get(fake.url + "/health", timeout=httpx.Timeout(5.0, connect=0.3))
    fake.up()
    assert httpx.get(fake.url + "/health", timeout=5.0).status_code == 200
