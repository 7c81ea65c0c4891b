"""`loopbot run` as an operator starts it: a child process against the fake Bot API."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from bot.devtools.fakebotapi import FakeBotAPI

ROOT = Path(__file__).resolve().parents[2]


def start_bot(api: FakeBotAPI, model: Path, db: Path, log: Path, *, admins: str = "",
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPBOT_", "TELEGRAM_"))}
    clean.update(TELEGRAM_BOT_TOKEN=api.token, LOOPBOT_ADMINS=admins,
                 LOOPBOT_LOG_LEVEL="INFO", PYTHONPATH=str(ROOT), **(env or {}))
    args = [sys.executable, "-m", "bot", "run", "--base-url", api.base_url, "--model",
            str(model), "--db", str(db), "--prompts", str(ROOT / "prompts")]
    with log.open("ab") as out:
        return subprocess.Popen(args, env=clean, cwd=db.parent, stdout=out,
                                stderr=subprocess.STDOUT)


def stop_bot(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
