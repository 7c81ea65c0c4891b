"""The real bot in webhook mode and in polling mode, with its health and metrics endpoint.

Telegram is the fake Bot API on loopback; updates are POSTed to the bot's webhook server over
HTTP exactly as Telegram delivers them, with and without the right secret token.
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings, load_settings
from bot.devtools.fakebotapi import FakeBotAPI
from bot.telegram.app import build_application, run_polling, run_webhook
from bot.telegram.ops_hooks import ops_post_init

ROOT = Path(__file__).resolve().parents[2]
SECRET = "right_Secret-token-123"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(url: str, body: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_healthy(port: int, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            status, body = http(f"http://127.0.0.1:{port}/healthz")
            if status == 200:
                return body
            last = f"{status} {body}"
        except (urllib.error.URLError, ConnectionError) as exc:
            last = str(exc)  # not listening yet: the model is still loading
        time.sleep(0.1)
    raise AssertionError(f"/healthz never returned 200: {last}")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def above_debug(self) -> list[str]:
        fmt = logging.Formatter()
        return [record.getMessage() + (fmt.formatException(record.exc_info)
                                       if record.exc_info else "")
                for record in self.records if record.levelno > logging.DEBUG]


@pytest.fixture
def records() -> Iterator[Records]:
    root = logging.getLogger()
    handler, level = Records(), root.level
    root.addHandler(handler)
    # INFO is what operators run with; DEBUG may show texts by design.
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


class RunningBot:
    def __init__(self, settings: Settings, run: Callable[[Any], None]) -> None:
        self.app = build_application(settings, post_init_hooks=[ops_post_init])
        self.error: BaseException | None = None
        self._run = run
        self._thread = threading.Thread(target=self._target, daemon=True)

    def _target(self) -> None:
        try:
            self._run(self.app)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> RunningBot:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        state = self.app.bot_data
        if state.request_stop is not None and self._thread.is_alive():
            state.request_stop()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the bot did not stop"
        assert self.error is None, self.error


def _settings(api: FakeBotAPI, model: Path, db: Path, **overrides: Any) -> Settings:
    return load_settings(None, env={"TELEGRAM_BOT_TOKEN": api.token}, overrides={
        "telegram.base_url": api.base_url, "model.path": str(model), "storage.db": str(db),
        "prompts.directory": str(ROOT / "prompts"), "telegram.poll_timeout_s": 1,
        "health.port": free_port(), **overrides})


@pytest.mark.slow
def test_webhook_updates_with_the_secret_are_handled_and_others_refused(
        tiny_gguf: Path, tmp_path: Path, records: Records) -> None:
    listen = free_port()
    hook = f"http://127.0.0.1:{listen}/telegram/loopbot"
    db = tmp_path / "loopbot.db"
    api = FakeBotAPI()
    with api:
        settings = _settings(api, tiny_gguf, db, **{
            "telegram.webhook_url": hook, "telegram.webhook_listen": f"127.0.0.1:{listen}",
            "telegram.webhook_secret": SECRET})
        with RunningBot(settings, lambda app: run_webhook(app, settings,
                                                          handle_signals=False)):
            assert wait_healthy(settings.health.port) == "ok\n"
            # PTB registers the webhook, then opens its server: wait for the latter.
            _wait_listening(listen)
            # Registered with Telegram: our URL, our secret, the update types we handle.
            assert api.webhook["url"] == hook
            assert api.webhook["secret_token"] == SECRET
            # The same list `loopbot webhook set` registers (tests/unit/test_webhook_cli.py).
            assert json.loads(api.webhook["allowed_updates"]) == [
                "message", "callback_query", "message_reaction"]
            assert len(api.calls_to("setWebhook")) == 1

            user = api.user(5101)
            marker = "webhook marker 这句话不该出现在日志里 7731"

            def update(update_id: int) -> dict[str, Any]:
                return {"update_id": update_id,
                        "message": {**api.user_message(user), "text": marker}}

            refused = [update(1), update(2)]
            assert http(hook, refused[0], {SECRET_HEADER: "wrong-token"})[0] == 403
            assert http(hook, refused[1])[0] == 403  # no token at all
            accepted = update(3)
            assert http(hook, accepted, {SECRET_HEADER: SECRET})[0] == 200

            # Handled: the verdict reaches the chat and the interaction is stored.
            api.wait_calls("sendMessage", chat_id=str(user["id"]), timeout=30)
            stored = _wait_rows(db, "SELECT message_id FROM interactions", 1)
            assert stored == [(accepted["message"]["message_id"],)]

            status, body = http(f"http://127.0.0.1:{settings.health.port}/metrics")
            assert status == 200
            for name in ("loopbot_verdict_latency_seconds", "loopbot_reply_latency_seconds",
                         "loopbot_inference_queue_depth", "loopbot_messages_total",
                         "loopbot_decisions_total"):
                assert name in body, name
        # The refused updates were never handled.
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM interactions").fetchone() == (1,)
    # Nothing above DEBUG carried the user's words (httpx/PTB/bot/ops loggers alike).
    lines = records.above_debug()
    assert lines, "the bot logged nothing at INFO: the check would prove nothing"
    assert not [line for line in lines if "7731" in line]


@pytest.mark.slow
def test_a_replica_leaves_the_registration_alone_and_warns_when_it_is_not_its_own(
        tiny_gguf: Path, tmp_path: Path, records: Records) -> None:
    """webhook_register false: no setWebhook at start (it would replace the registration all
    replicas share); one getWebhookInfo, whose other URL and missing update type are logged
    as warnings; updates with the shared secret are handled as usual."""
    listen = free_port()
    hook = f"http://127.0.0.1:{listen}/telegram/loopbot"
    stale = "https://old.example.com/telegram/loopbot"
    db = tmp_path / "loopbot.db"
    with FakeBotAPI() as api:
        # What `loopbot webhook set` registered for another deployment, without reactions.
        api.webhook = {"url": stale, "secret_token": SECRET,
                       "allowed_updates": json.dumps(["message", "callback_query"])}
        settings = _settings(api, tiny_gguf, db, **{
            "telegram.webhook_url": hook, "telegram.webhook_listen": f"127.0.0.1:{listen}",
            "telegram.webhook_secret": SECRET, "telegram.webhook_register": False})
        with RunningBot(settings, lambda app: run_webhook(app, settings,
                                                          handle_signals=False)):
            assert wait_healthy(settings.health.port) == "ok\n"
            _wait_listening(listen)
            started = _wait_log(records, "webhook mode: listening on")
            assert "registered by `loopbot webhook set`" in started

            user = api.user(5202)
            update = {"update_id": 41, "message": {**api.user_message(user), "text": "hi"}}
            assert http(hook, update, {SECRET_HEADER: "wrong-token"})[0] == 403
            assert http(hook, update, {SECRET_HEADER: SECRET})[0] == 200
            api.wait_calls("sendMessage", chat_id=str(user["id"]), timeout=30)
        assert api.calls_to("setWebhook") == [] and api.calls_to("deleteWebhook") == []
        assert len(api.calls_to("getWebhookInfo")) == 1
        # The registration is as it was.
        assert api.webhook["url"] == stale
    warnings = [r.getMessage() for r in records.records if r.levelno == logging.WARNING
                and r.name == "bot.telegram.runner"]
    assert len(warnings) == 2, warnings
    assert f"Telegram delivers updates to {stale}, not to telegram.webhook_url {hook}" \
        in warnings[0]
    assert "does not ask for message_reaction" in warnings[1]
    assert not [line for line in records.above_debug() if SECRET in line]


def test_a_replica_starts_when_telegram_cannot_say_what_is_registered(
        tiny_gguf: Path, tmp_path: Path, records: Records) -> None:
    listen = free_port()
    hook = f"http://127.0.0.1:{listen}/telegram/loopbot"
    with FakeBotAPI() as api:
        api.error_next("getWebhookInfo", 502, description="Bad Gateway")
        settings = _settings(api, tiny_gguf, tmp_path / "loopbot.db", **{
            "telegram.webhook_url": hook, "telegram.webhook_listen": f"127.0.0.1:{listen}",
            "telegram.webhook_secret": SECRET, "telegram.webhook_register": False})
        with RunningBot(settings, lambda app: run_webhook(app, settings,
                                                          handle_signals=False)):
            assert wait_healthy(settings.health.port) == "ok\n"
            _wait_log(records, "webhook mode: listening on")
            user = api.user(5203)
            update = {"update_id": 42, "message": {**api.user_message(user), "text": "hi"}}
            assert http(hook, update, {SECRET_HEADER: SECRET})[0] == 200
            api.wait_calls("sendMessage", chat_id=str(user["id"]), timeout=30)
        assert api.calls_to("setWebhook") == []
    assert any("could not check the registration with getWebhookInfo" in r.getMessage()
               for r in records.records if r.levelno == logging.WARNING)


def test_polling_mode_serves_health_and_metrics_too(tiny_gguf: Path, tmp_path: Path) -> None:
    with FakeBotAPI() as api:
        settings = _settings(api, tiny_gguf, tmp_path / "loopbot.db")
        with RunningBot(settings, lambda app: run_polling(app, handle_signals=False)):
            assert wait_healthy(settings.health.port) == "ok\n"
            status, body = http(f"http://127.0.0.1:{settings.health.port}/metrics")
            assert status == 200 and "loopbot_inference_queue_depth" in body
            api.wait_calls("getUpdates")
        # Stopped with the bot: nothing listens there any more.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", settings.health.port), timeout=1).close()


def _wait_rows(db: Path, sql: str, count: int, timeout: float = 30.0) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as conn:
            rows = conn.execute(sql).fetchall()
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def _wait_log(records: Records, part: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        found = [r.getMessage() for r in list(records.records) if part in r.getMessage()]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"never logged: {part}"
        time.sleep(0.05)


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
