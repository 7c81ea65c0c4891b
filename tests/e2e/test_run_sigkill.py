"""`loopbot run` as an operator starts it: a subprocess against a Bot API on loopback.

An acknowledged click survives SIGKILL; after a restart the admin sees the vote in /stats, a
non-admin's /rollback is refused, and SIGTERM shuts down gracefully.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bot import cli
from bot.devtools.fakebotapi import FakeBotAPI

ROOT = Path(__file__).resolve().parents[2]
ADMIN = 777
# Until `run` is registered in bot.cli, the same handler is called through its parser.
_SCRIPT = (
    "import argparse, sys\n"
    "from bot.telegram import run_cli\n"
    "parser = argparse.ArgumentParser(prog='loopbot')\n"
    "run_cli.register(parser.add_subparsers())\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def _start(api: FakeBotAPI, model: Path, db: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPBOT_", "TELEGRAM_"))}
    env.update(TELEGRAM_BOT_TOKEN=api.token, LOOPBOT_ADMINS=str(ADMIN),
               LOOPBOT_LOG_LEVEL="INFO", PYTHONPATH=str(ROOT))
    entry = (["-m", "bot"] if "bot.telegram.run_cli" in cli.COMMAND_MODULES
             else ["-c", _SCRIPT])
    args = [sys.executable, *entry, "run", "--base-url", api.base_url, "--model", str(model),
            "--db", str(db), "--prompts", str(ROOT / "prompts")]
    with log.open("ab") as out:
        return subprocess.Popen(args, env=env, cwd=db.parent, stdout=out,
                                stderr=subprocess.STDOUT)


def _votes(db: Path) -> list[tuple[int, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT user_id, correct FROM votes").fetchall()


@pytest.mark.slow
def test_acknowledged_vote_survives_sigkill(tiny_gguf: Path, tmp_path: Path) -> None:
    db, log = tmp_path / "loopbot.db", tmp_path / "bot.log"
    with FakeBotAPI() as api:
        proc = _start(api, tiny_gguf, db, log)
        try:
            user = api.user(31, "en")
            api.send_text(user, "what a lovely day")
            verdict = api.wait_for(lambda: next(
                (m for m in api.bot_messages(31) if "reply_markup" in m), None), timeout=60)
            buttons = verdict["reply_markup"]["inline_keyboard"]
            assert len(buttons) == 1 and len(buttons[0]) == 2

            forged = api.click(user, verdict, "v:424242:c")
            api.wait_calls("answerCallbackQuery", callback_query_id=forged["callback_query"]["id"])
            assert _votes(db) == []

            click = api.click(user, verdict, buttons[0][1]["callback_data"])
            api.wait_calls("answerCallbackQuery", callback_query_id=click["callback_query"]["id"])
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert _votes(db) == [(31, 0)]

        # Restarted on the same database: the vote is what the admin sees.
        proc = _start(api, tiny_gguf, db, log)
        try:
            api.send_text(api.user(ADMIN, "en"), "/stats")
            stats = api.wait_for(lambda: next(
                (c.params["text"] for c in api.calls_to("sendMessage", chat_id=str(ADMIN))),
                None), timeout=60)
            assert "1 verdicts · 1 votes (0 ✅)" in stats
            api.send_text(api.user(32, "en"), "/rollback")
            refusal = api.wait_for(lambda: next(
                (c.params["text"] for c in api.calls_to("sendMessage", chat_id="32")), None))
            assert refusal == "Sorry, this command is for admins only."
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    output = log.read_text(encoding="utf-8", errors="replace")
    assert "model and database closed" in output, output[-2000:]
    assert "refused admin command /rollback from user 32" in output
    # The click the first process never confirmed to Telegram came again: still one vote.
    assert _votes(db) == [(31, 0)]
