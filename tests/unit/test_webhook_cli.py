"""``loopbot webhook set | info | delete`` against the fake Bot API over HTTP, and the refusals
of ``webhook set`` and of ``loopbot run`` when replicas leave the registration to it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.cli import main
from bot.devtools.fakebotapi import FakeBotAPI

ROOT = Path(__file__).resolve().parents[2]
URL = "https://bot.example.com/telegram/loopbot"
SECRET = "shared_Secret-for-replicas-42"
# What `loopbot run` asks Telegram for (bot/telegram/app.py), written out: a registration
# without message_reaction would silently lose every reaction vote.
RUN_UPDATES = ["message", "callback_query", "message_reaction"]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBotAPI]:
    """The fake Bot API, with the environment of a replica pointed at it."""
    for name in list(os.environ):
        if name.startswith(("LOOPBOT_", "TELEGRAM_")):
            monkeypatch.delenv(name)
    with FakeBotAPI() as fake:
        monkeypatch.setenv("TELEGRAM_BOT_TOKEN", fake.token)
        monkeypatch.setenv("LOOPBOT_BASE_URL", fake.base_url)
        monkeypatch.setenv("LOOPBOT_WEBHOOK_URL", URL)
        monkeypatch.setenv("LOOPBOT_WEBHOOK_SECRET", SECRET)
        yield fake


def webhook(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["webhook", *args])
    out, err = capsys.readouterr()
    return code, out, err


def info(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = webhook(capsys, "info", "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def push_message(api: FakeBotAPI, text: str = "hello") -> None:
    api.push({"message": {**api.user_message(api.user(7)), "text": text}})


# --- set ----------------------------------------------------------------------------------


def test_set_registers_the_url_the_shared_secret_and_the_updates_run_handles(
        api: FakeBotAPI, capsys: pytest.CaptureFixture[str]) -> None:
    from bot.telegram.webhook import ALLOWED_UPDATES

    code, out, err = webhook(capsys, "set")
    assert code == 0, err
    (call,) = api.calls_to("setWebhook")
    assert call.params["url"] == URL
    assert call.params["secret_token"] == SECRET
    assert call.json("allowed_updates") == RUN_UPDATES == list(ALLOWED_UPDATES)
    assert call.json("drop_pending_updates") is False
    assert "max_connections" not in call.params  # Telegram's default unless asked
    assert URL in out
    # Neither secret is ever printed.
    assert SECRET not in out + err and api.token not in out + err
    registered = info(capsys)
    assert (registered["url"], registered["allowed_updates"]) == (URL, RUN_UPDATES)
    assert registered["problems"] == []


def test_set_keeps_the_updates_waiting_at_telegram(api: FakeBotAPI,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    push_message(api)
    push_message(api)
    assert webhook(capsys, "set")[0] == 0
    assert info(capsys)["pending_update_count"] == 2


def test_set_takes_the_url_and_max_connections_from_flags(
        api: FakeBotAPI, capsys: pytest.CaptureFixture[str]) -> None:
    other = "https://lb.example.com:8443/hook"
    code, _, err = webhook(capsys, "set", "--webhook-url", other, "--max-connections", "100")
    assert code == 0, err
    (call,) = api.calls_to("setWebhook")
    assert (call.params["url"], call.params["max_connections"]) == (other, "100")
    assert info(capsys)["max_connections"] == 100


def test_set_without_a_secret_is_refused_and_nothing_is_sent(
        api: FakeBotAPI, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOPBOT_WEBHOOK_SECRET")
    code, out, err = webhook(capsys, "set")
    assert code == 2
    assert "telegram.webhook_secret" in err and "LOOPBOT_WEBHOOK_SECRET" in err
    assert err.startswith("loopbot: ") and len(err.strip().splitlines()) == 1
    assert out == "" and api.calls == []


@pytest.mark.parametrize(("env", "args", "named"), [
    ({"LOOPBOT_WEBHOOK_URL": ""}, [], "LOOPBOT_WEBHOOK_URL"),
    ({}, ["--webhook-url", "bot.example.com/x"], "telegram.webhook_url"),
    ({"LOOPBOT_WEBHOOK_SECRET": "has spaces"}, [], "telegram.webhook_secret"),
    ({}, ["--max-connections", "0"], "--max-connections"),
    ({"TELEGRAM_BOT_TOKEN": ""}, [], "TELEGRAM_BOT_TOKEN"),
])
def test_bad_settings_are_refused_by_name_before_telegram_is_called(
        api: FakeBotAPI, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        env: dict[str, str], args: list[str], named: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = webhook(capsys, "set", *args)
    assert code == 2 and named in err, err
    assert api.calls == []


def test_telegram_refusing_the_webhook_is_one_line_and_exit_1(
        api: FakeBotAPI, capsys: pytest.CaptureFixture[str]) -> None:
    api.error_next("setWebhook", 400,
                   description="Bad Request: bad webhook: Failed to resolve host")
    code, out, err = webhook(capsys, "set")
    assert code == 1
    assert err.strip() == ("loopbot webhook set: Telegram refused: Bad webhook: failed to "
                           "resolve host")
    assert out == ""


# --- info ---------------------------------------------------------------------------------


def test_info_shows_url_pending_updates_and_the_last_delivery_error(
        api: FakeBotAPI, capsys: pytest.CaptureFixture[str]) -> None:
    assert webhook(capsys, "set", "--webhook-url", "https://203.0.113.7/telegram/loopbot")[0] == 0
    for _ in range(3):
        push_message(api)
    api.webhook_failed("Wrong response from the webhook: 502 Bad Gateway",
                       at=time.time() - 300)
    code, out, err = webhook(capsys, "info")
    assert code == 0, err
    lines = dict(line.split(":", 1) for line in out.splitlines()
                 if not line.startswith("warning"))
    fields = {key: value.strip() for key, value in lines.items()}
    assert fields["url"] == "https://203.0.113.7/telegram/loopbot"
    assert fields["pending updates"] == "3"
    assert fields["last error"].endswith(
        "UTC (5 min ago): Wrong response from the webhook: 502 Bad Gateway")
    assert fields["max connections"] == "40"
    assert fields["ip address"] == "203.0.113.7"
    assert fields["allowed updates"] == ", ".join(RUN_UPDATES)
    # The configuration says bot.example.com: info names the difference.
    assert f"warning: Telegram delivers updates to https://203.0.113.7/telegram/loopbot, " \
           f"not to telegram.webhook_url {URL}" in out


def test_info_json_has_every_bot_api_field(api: FakeBotAPI,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert webhook(capsys, "set")[0] == 0
    failed_at = int(time.time()) - 60
    api.webhook_failed("Connection timed out", at=failed_at)
    data = info(capsys)
    assert data == {
        "url": URL, "has_custom_certificate": False, "pending_update_count": 0,
        "ip_address": None,  # a host name: Telegram shows the address once resolved
        "last_error_date": failed_at, "last_error_message": "Connection timed out",
        "last_synchronization_error_date": None, "max_connections": 40,
        "allowed_updates": RUN_UPDATES, "configured_url": URL, "problems": [],
    }


def test_info_names_a_registration_that_would_lose_reactions(
        api: FakeBotAPI, capsys: pytest.CaptureFixture[str]) -> None:
    # Registered by hand without allowed_updates: Telegram's default leaves reactions out.
    api.webhook = {"url": URL, "secret_token": SECRET}
    data = info(capsys)
    assert data["allowed_updates"] is None
    (problem,) = data["problems"]
    assert "message_reaction" in problem and "loopbot webhook set" in problem


def test_info_without_a_webhook(api: FakeBotAPI, capsys: pytest.CaptureFixture[str]) -> None:
    push_message(api)
    data = info(capsys)
    assert (data["url"], data["pending_update_count"], data["max_connections"]) == ("", 1, None)
    assert data["problems"] == [f"no webhook is registered with Telegram: updates wait there "
                                f"until `loopbot webhook set` registers {URL}"]


# --- delete -------------------------------------------------------------------------------


def test_delete_keeps_waiting_updates_unless_told_to_drop_them(
        api: FakeBotAPI, capsys: pytest.CaptureFixture[str]) -> None:
    assert webhook(capsys, "set")[0] == 0
    push_message(api)
    push_message(api)
    code, out, err = webhook(capsys, "delete")
    assert code == 0, err
    assert out.startswith(f"webhook deleted (was {URL}); 2 pending updates kept")
    assert api.calls_to("deleteWebhook")[-1].json("drop_pending_updates") is False
    after = info(capsys)
    assert (after["url"], after["pending_update_count"]) == ("", 2)
    assert api.webhook == {}

    assert webhook(capsys, "set")[0] == 0
    code, out, _ = webhook(capsys, "delete", "--drop-pending")
    assert code == 0 and "2 pending updates dropped" in out
    assert api.calls_to("deleteWebhook")[-1].json("drop_pending_updates") is True
    assert info(capsys)["pending_update_count"] == 0


def test_delete_without_a_webhook_says_so(api: FakeBotAPI,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = webhook(capsys, "delete")
    assert code == 0 and out.startswith("no webhook was set; 0 pending updates kept")


# --- Telegram out of reach or refusing the token ------------------------------------------


def test_a_wrong_token_is_exit_1_and_never_printed(api: FakeBotAPI,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "123456789:AAHwrongwrongwrongwrongwrongwrongwro"
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", wrong)
    code, out, err = webhook(capsys, "info")
    assert code == 1
    assert err.strip() == ("loopbot webhook info: Telegram rejected the bot token "
                           "(TELEGRAM_BOT_TOKEN / telegram.token): check it with @BotFather")
    assert "AAHwrong" not in out + err


def test_an_unreachable_bot_api_is_exit_1(api: FakeBotAPI, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nothing listens on once this is closed
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/bot"
    monkeypatch.setenv("LOOPBOT_BASE_URL", closed)
    code, _, err = webhook(capsys, "delete")
    assert code == 1
    assert err.startswith(f"loopbot webhook delete: cannot reach the Bot API at {closed}: ")
    assert api.token not in err


# --- the fake Bot API behaves as Telegram does --------------------------------------------


def _raw(api: FakeBotAPI, method: str, **params: Any) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"{api.base_url}{api.token}/{method}",
                                     data=json.dumps(params).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_fake_refuses_get_updates_while_a_webhook_is_set(api: FakeBotAPI) -> None:
    assert _raw(api, "setWebhook", url=URL)[0] == 200
    status, body = _raw(api, "getUpdates")
    assert status == 409 and body["description"].startswith("Conflict: can't use getUpdates")
    # An empty URL removes the webhook, as in the Bot API.
    assert _raw(api, "setWebhook", url="") == (200, {"ok": True, "result": True})
    assert _raw(api, "getUpdates", timeout=0) == (200, {"ok": True, "result": []})


def test_the_fake_checks_the_secret_token_as_telegram_does(api: FakeBotAPI) -> None:
    status, body = _raw(api, "setWebhook", url=URL, secret_token="not allowed!")
    assert status == 400 and "secret token" in body["description"]
    assert api.webhook == {}


# --- `loopbot run` with the registration left to `loopbot webhook set` --------------------


def _run(api: FakeBotAPI, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPBOT_", "TELEGRAM_"))}
    return subprocess.run(
        [sys.executable, "-m", "bot", "run", "--base-url", api.base_url,
         "--model", str(tmp_path / "no-model-needed.gguf"), "--db", str(tmp_path / "l.db"),
         "--prompts", str(ROOT / "prompts")],
        env={**clean, "TELEGRAM_BOT_TOKEN": api.token, **env}, cwd=tmp_path,
        capture_output=True, text=True, timeout=120, check=False)


def test_run_without_registering_refuses_to_start_without_the_shared_secret(
        api: FakeBotAPI, tmp_path: Path) -> None:
    done = _run(api, tmp_path, LOOPBOT_WEBHOOK_URL=URL, LOOPBOT_WEBHOOK_REGISTER="false")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("loopbot run: telegram.webhook_secret (LOOPBOT_WEBHOOK_SECRET) is "
                           "empty, but telegram.webhook_register"), done.stderr
    assert api.calls == []  # refused before anything was asked of Telegram
    assert not (tmp_path / "l.db").exists()


def test_run_without_registering_refuses_long_polling(api: FakeBotAPI, tmp_path: Path) -> None:
    """Polling would call deleteWebhook: the replicas' webhook would be gone."""
    done = _run(api, tmp_path, LOOPBOT_WEBHOOK_REGISTER="false", LOOPBOT_WEBHOOK_SECRET=SECRET)
    assert done.returncode == 1
    assert "long polling would delete the webhook" in done.stderr, done.stderr
    assert api.calls_to("deleteWebhook") == [] and api.calls == []
