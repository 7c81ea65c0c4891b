"""`loopbot run --base-url URL --health-port P` as an operator starts it (a subprocess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bot.devtools.fakebotapi import FakeBotAPI

ROOT = Path(__file__).resolve().parents[2]


def test_run_serves_healthz_and_metrics_then_stops_on_sigterm(tiny_gguf: Path,
                                                               tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with FakeBotAPI() as api:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPBOT_", "TELEGRAM_"))}
        env["TELEGRAM_BOT_TOKEN"] = api.token
        proc = subprocess.Popen(
            [sys.executable, "-m", "bot", "run", "--base-url", api.base_url,
             "--health-port", str(port), "--model", str(tiny_gguf),
             "--db", str(tmp_path / "loopbot.db"), "--prompts", str(ROOT / "prompts")],
            env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                                timeout=5) as resp:
                        assert (resp.status, resp.read()) == (200, b"ok\n")
                        break
                except (urllib.error.URLError, ConnectionError):
                    assert proc.poll() is None, proc.communicate()[1]
                    assert time.monotonic() < deadline, "never healthy"
                    time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            assert "loopbot_inference_queue_depth 0.0" in body.splitlines()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "model and database closed" in err
    assert api.token not in err  # the token is redacted from every log line


def test_sigterm_while_the_updater_starts_still_closes_everything(tiny_gguf: Path,
                                                                  tmp_path: Path) -> None:
    """A stop signal in the middle of PTB's start-up (here: while deleteWebhook is pending)
    breaks PTB's own teardown; the bot must still close the model and the database and exit,
    instead of hanging on the database thread."""
    started, release = threading.Event(), threading.Event()

    def hold(call: object) -> None:
        started.set()
        release.wait(20)

    with FakeBotAPI() as api:
        api.before["deleteWebhook"] = hold
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPBOT_", "TELEGRAM_"))}
        env["TELEGRAM_BOT_TOKEN"] = api.token
        proc = subprocess.Popen(
            [sys.executable, "-m", "bot", "run", "--base-url", api.base_url,
             "--model", str(tiny_gguf), "--db", str(tmp_path / "loopbot.db"),
             "--prompts", str(ROOT / "prompts")],
            env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            assert started.wait(60), "the updater never started"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "model and database closed" in err


def test_a_rejected_token_is_a_one_line_error_that_does_not_print_it(
        tiny_gguf: Path, tmp_path: Path) -> None:
    wrong = "123456789:AAHwrongwrongwrongwrongwrongwrongwro"
    with FakeBotAPI() as api:  # answers 401 to any other token, as Telegram does
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPBOT_", "TELEGRAM_"))}
        env["TELEGRAM_BOT_TOKEN"] = wrong
        done = subprocess.run(
            [sys.executable, "-m", "bot", "run", "--base-url", api.base_url,
             "--model", str(tiny_gguf), "--db", str(tmp_path / "loopbot.db"),
             "--prompts", str(ROOT / "prompts")],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    # The last word is a plain instruction (PTB's own error log before it is redacted).
    assert done.stderr.strip().splitlines()[-1].startswith(
        "loopbot run: Telegram rejected the bot token")
    assert wrong not in done.stderr and wrong not in done.stdout
    assert "AAHwrong" not in done.stderr
