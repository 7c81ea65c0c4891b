"""`loopbot console` as a user runs it: a subprocess over pipes, a real model, a real DB."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def loopbot(*args: str, stdin: str = "", env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("LOOPBOT_", "TELEGRAM_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "bot", *args], input=stdin, text=True,
                          capture_output=True, env=full_env, cwd=cwd or ROOT, timeout=timeout)


def test_piped_console_prints_a_verdict_and_a_reply_per_line(tiny_gguf: Path,
                                                             tmp_path: Path) -> None:
    db = tmp_path / "console.db"
    done = loopbot("console", "--model", str(tiny_gguf), "--db", str(db),
                   stdin="I love it\n这家店太差了\n", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        verdict, _, reply = line.partition(" | ")
        label, probability = verdict.split(" ")
        assert label in {"正面", "负面"}  # the default version's labels
        assert 0.0 <= float(probability) <= 1.0
        assert reply.strip()


def test_console_votes_are_stored_like_button_clicks(tiny_gguf: Path, tmp_path: Path) -> None:
    db = tmp_path / "console.db"
    done = loopbot("console", "--model", str(tiny_gguf), "--db", str(db), "--json",
                   "--prompt", "v1-en", stdin="y\nI love it\ny\nterrible\nn\n")
    assert done.returncode == 0, done.stderr
    # Every line is JSON, the answer to a vote with nothing to vote on included.
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows[0] == {"error": "nothing to vote on yet"}
    verdicts = [r for r in rows if "verdict" in r]
    votes = [r for r in rows if "vote" in r]
    assert [v["verdict"] in {"positive", "negative"} for v in verdicts] == [True, True]
    assert all(abs(sum(v["probabilities"].values()) - 1) < 1e-3 for v in verdicts)
    assert [v["vote"] for v in votes] == ["correct", "wrong"]
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT interaction_id, correct FROM votes ORDER BY id").fetchall()
    assert stored == [(verdicts[0]["interaction"], 1), (verdicts[1]["interaction"], 0)]


def test_without_a_model_offline_it_says_how_to_get_one(tmp_path: Path) -> None:
    # A closed port on loopback stands in for "no internet": the download cannot start.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model:\n  model_dir: {tmp_path / 'models'}\n"
        f"  fetch_base_url: http://127.0.0.1:{port}\n", encoding="utf-8")
    done = loopbot("--config", str(config), "console", "--db", str(tmp_path / "x.db"),
                   stdin="hello\n", timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "LOOPBOT_MODEL" in done.stderr or "model.path" in done.stderr
    assert "loopbot model fetch" in done.stderr
