"""``loopbot bench --load N``: N chats write to the real bot at the same moment; how long does
each wait for its verdict and its reply?

The bot under test is ``loopbot run`` itself, a child process (the Application of
:func:`bot.telegram.app.build_application`, long polling, a real SQLite file, the model), polling
a fake Bot API on 127.0.0.1 (:mod:`bot.devtools.fakebotapi`). Each round, every chat sends one
message, all in one ``getUpdates`` batch; the round ends when every chat has its verdict and
its whole reply (or a notice: busy, timeout, error). Latencies are measured from the moment
the batch is offered to the bot to the moment the message reaches the fake API, so they
include the outbox's pacing (one message a second per private chat), as users see it.

Two bots run side by side: continuous batching (``model.parallel_replies``) and the
sequential baseline (``parallel_replies: 1``), both started before the first round and driven
in alternating order round by round, so that whatever else the machine does affects both.
Memory is the bot process's peak resident set (``VmHWM`` in ``/proc/PID/status``). Decode
throughput comes from the runtime's own account of its busy periods (a JSON log line per
period: tokens sampled and seconds spent in decode steps).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bot import texts
from bot.devtools.fakebotapi import FakeBotAPI
from bot.store.readonly import reply_texts

# What the bot says instead of an answer when it cannot give one.
NOTICES = {texts.t(key, lang): key for key in ("busy", "timeout", "error")
           for lang in (texts.ZH, texts.EN)}
FIRST_CHAT = 70_000
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The runtime's log line at the end of each busy period of reply generation.
STATS_MESSAGE = "reply batch idle"


def terminate(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """Stop a `loopbot run` child as an operator would (SIGTERM), killing it only if it
    does not stop within ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class ChatOutcome:
    """What one chat got in one round (seconds after its message was offered to the bot)."""

    chat_id: int
    message_id: int
    verdict_s: float | None = None
    reply_s: float | None = None
    reply_text: str = ""
    pieces: int = 0
    notice: str | None = None
    complete: bool = False

    @property
    def done(self) -> bool:
        return self.notice is not None or self.complete


@dataclass
class BotUnderLoad:
    name: str
    parallel_replies: int
    workdir: Path
    api: FakeBotAPI = field(default_factory=FakeBotAPI)
    proc: subprocess.Popen[bytes] | None = None
    outcomes: list[ChatOutcome] = field(default_factory=list)
    busy_seconds: float = 0.0
    log_offset: int = 0

    @property
    def db(self) -> Path:
        return self.workdir / "loopbot.db"

    @property
    def log(self) -> Path:
        return self.workdir / "bot.log"

    def start(self, model: Path, prompts: Path, settings: dict[str, Any]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.api.start()
        config = self.workdir / "config.yaml"
        config.write_text(yaml.safe_dump(settings), encoding="utf-8")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LOOPBOT_", "TELEGRAM_"))}
        # The bot runs this very code, wherever it was imported from.
        env.update(TELEGRAM_BOT_TOKEN=self.api.token, LOOPBOT_ADMINS="",
                   PYTHONPATH=os.pathsep.join(filter(None, (str(PACKAGE_ROOT),
                                                            env.get("PYTHONPATH")))))
        args = [sys.executable, "-m", "bot", "run", "--config", str(config), "--base-url",
                self.api.base_url, "--model", str(model), "--db", str(self.db), "--prompts",
                str(prompts), "--log-json"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, env=env, cwd=self.workdir, stdout=out,
                                         stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        """Ready once it set its commands (post_init is done) and polls for updates."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the {self.name} bot exited at start:\n{self.tail()}")
            if self.api.calls_to("setMyCommands") and self.api.calls_to("getUpdates"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the {self.name} bot did not start in {timeout:g}s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(encoding="utf-8", errors="replace")
                         .splitlines()[-lines:])

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        return peak_rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        self.api.stop()

    def decode_stats(self) -> dict[str, float]:
        """Sum of the runtime's busy-period accounts logged since ``log_offset``."""
        totals = {"decode_tokens": 0.0, "decode_s": 0.0, "prefill_tokens": 0.0,
                  "prefill_s": 0.0, "replies": 0.0, "max_active": 0.0}
        with self.log.open("rb") as log:
            log.seek(self.log_offset)
            for raw in log:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(entry, dict) or not str(entry.get("message", "")).startswith(
                        STATS_MESSAGE):
                    continue
                for key in totals:
                    value = float(entry.get(key, 0.0))
                    totals[key] = (max(totals[key], value) if key == "max_active"
                                   else totals[key] + value)
        return totals

    def mark_log(self) -> None:
        self.log_offset = self.log.stat().st_size


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (VmHWM), from the kernel."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def play_round(bot: BotUnderLoad, chats: list[int], round_no: int, *,
               messages: Sequence[str], timeout: float) -> list[ChatOutcome]:
    """Every chat sends one message at once; wait until each is answered or ``timeout``."""
    api = bot.api
    with api._cond:
        first_call = len(api.calls)
    updates = []
    outcomes: dict[int, ChatOutcome] = {}
    for index, chat_id in enumerate(chats):
        user = api.user(chat_id, "zh" if index % 2 == 0 else "en")
        message = api.user_message(user)
        message["text"] = messages[(index + round_no) % len(messages)]
        updates.append({"message": message})
        outcomes[chat_id] = ChatOutcome(chat_id, message["message_id"])
    started = time.monotonic()
    api.push_batch(updates)
    seen = first_call
    deadline = started + timeout
    while True:
        with api._cond:
            new = api.calls[seen:]
            seen += len(new)
        for call in new:
            if call.method != "sendMessage" or call.status != 200:
                continue
            outcome = outcomes.get(int(call.params["chat_id"]))
            if outcome is None:
                continue
            text = call.params.get("text", "")
            if "reply_markup" in call.params:
                outcome.verdict_s = call.at - started
            elif text in NOTICES:
                outcome.notice = NOTICES[text]
            else:
                outcome.reply_text += text
                outcome.pieces += 1
                outcome.reply_s = call.at - started
        waiting = [o for o in outcomes.values() if not o.done and o.pieces
                   and o.verdict_s is not None]
        if waiting:
            _check_complete(bot.db, waiting)
        if all(o.done for o in outcomes.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    bot.busy_seconds += max((o.reply_s or o.verdict_s or 0.0) for o in outcomes.values())
    return list(outcomes.values())


def _check_complete(db: Path, outcomes: list[ChatOutcome]) -> None:
    """A reply is complete once every piece of the text the bot stored has arrived."""
    stored = reply_texts(db, [(o.chat_id, o.message_id) for o in outcomes])
    for outcome in outcomes:
        text = stored.get((outcome.chat_id, outcome.message_id))
        if text is None:
            continue
        pieces = texts.split_message(text) or ["(empty)"]
        if outcome.pieces >= len(pieces):
            outcome.complete = True


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summary(bot: BotUnderLoad) -> dict[str, Any]:
    outcomes = bot.outcomes
    verdicts = [o.verdict_s for o in outcomes if o.verdict_s is not None]
    replies = [o.reply_s for o in outcomes if o.complete and o.reply_s is not None]
    stats = bot.decode_stats()
    answered = sum(o.complete for o in outcomes)
    return {
        "parallel_replies": bot.parallel_replies,
        "verdict_p50_s": round(_quantile(verdicts, 0.5), 3),
        "verdict_p95_s": round(_quantile(verdicts, 0.95), 3),
        "verdict_max_s": round(max(verdicts, default=0.0), 3),
        "reply_p50_s": round(_quantile(replies, 0.5), 3),
        "reply_p95_s": round(_quantile(replies, 0.95), 3),
        "reply_max_s": round(max(replies, default=0.0), 3),
        "msgs_per_s": round(answered / bot.busy_seconds, 3) if bot.busy_seconds else 0.0,
        "decode_tok_s_aggregate": (round(stats["decode_tokens"] / stats["decode_s"], 2)
                                   if stats["decode_s"] else 0.0),
        "decode_tokens": int(stats["decode_tokens"]),
        "prefill_tokens": int(stats["prefill_tokens"]),
        "max_active_replies": int(stats["max_active"]),
        "messages": len(outcomes),
        "complete": answered,
        "busy": sum(o.notice == "busy" for o in outcomes),
        "timeouts": sum(o.notice == "timeout" for o in outcomes),
        "errors": sum(o.notice == "error" for o in outcomes),
        "unanswered": sum(not o.done for o in outcomes),
        "rss_mb": round(bot.peak_rss_mb(), 1),
    }


def run_load(model: Path, prompts: Path, *, messages: Sequence[str], chats: int, rounds: int,
             threads: int, parallel_replies: int | None, baseline: bool,
             conversations: bool = False,
             extra_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Both bots side by side; returns the figures as one JSON-ready dict. Each round is a
    burst of first messages from ``chats`` new chats, or with ``conversations`` the same
    chats writing again (their prompts then carry the previous turns)."""
    model_settings: dict[str, Any] = {"n_threads": threads}
    if parallel_replies is not None:
        model_settings["parallel_replies"] = parallel_replies
    common: dict[str, Any] = {"telegram": {"poll_timeout_s": 1},
                              "logging": {"level": "INFO", "json": True}}
    for section, values in (extra_settings or {}).items():
        common.setdefault(section, {}).update(values)
    reply_timeout = float(common.get("model", {}).get("reply_timeout_s", 120.0))
    with tempfile.TemporaryDirectory(prefix="loopbot-load-") as tmp:
        bots = [BotUnderLoad("batched", parallel_replies or 0, Path(tmp) / "batched")]
        if baseline:
            bots.append(BotUnderLoad("sequential", 1, Path(tmp) / "sequential"))
        try:
            for bot in bots:
                settings = json.loads(json.dumps(common))
                model_cfg = dict(model_settings)
                if bot.name == "sequential":
                    model_cfg["parallel_replies"] = 1
                settings.setdefault("model", {}).update(model_cfg)
                bot.start(model, prompts, settings)
            for bot in bots:
                bot.wait_ready(timeout=300)
                # Warm-up: one chat, not measured (pages in, settles the thread pool).
                play_round(bot, [FIRST_CHAT - 1], 0, messages=messages,
                           timeout=reply_timeout + 30)
                bot.busy_seconds = 0.0
                bot.mark_log()
            for round_no in range(rounds):
                first = FIRST_CHAT + (0 if conversations else round_no * chats)
                ids = list(range(first, first + chats))
                order = bots if round_no % 2 == 0 else bots[::-1]
                for bot in order:
                    bot.outcomes += play_round(bot, ids, round_no, messages=messages,
                                               timeout=reply_timeout + 60)
            time.sleep(1.5)  # the busy-period log line follows the last reply
            results = {bot.name: summary(bot) for bot in bots}
        finally:
            for bot in bots:
                bot.stop()
    batched = results["batched"]
    out: dict[str, Any] = {"model": str(model), "threads": threads, "chats": chats,
                           "rounds": rounds, "conversations": conversations, **batched}
    if baseline:
        seq = results["sequential"]
        out["sequential"] = seq
        out["reply_max_over_sequential"] = (round(batched["reply_max_s"] / seq["reply_max_s"], 3)
                                            if seq["reply_max_s"] else None)
        out["decode_speedup"] = (round(batched["decode_tok_s_aggregate"]
                                       / seq["decode_tok_s_aggregate"], 3)
                                 if seq["decode_tok_s_aggregate"] else None)
    return out
