"""``loopbot console``: the bot's pipeline in a terminal, stored exactly as the bot stores it.

Each line typed gets the verdict and the reply; ``y`` / ``n`` marks the last verdict right or
wrong (a vote, as a button click would be). With stdin not a terminal, each input line gives
one output line (or one JSON object with ``--json``), so the console can be scripted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from bot.config import Settings, load_settings, prompts_directory
from bot.llm.types import InferenceError, Reply, Verdict

if TYPE_CHECKING:
    from bot.service import Classified, Service

# Console conversations are stored under this chat; ids far from real Telegram chat ids.
CONSOLE_CHAT_ID = -1
VOTE_WORDS = {"y": "correct", "yes": "correct", "n": "wrong", "no": "wrong"}


def _one_line(text: str) -> str:
    return " ".join(text.split())


async def run_console(settings: Settings, *, stdin: TextIO, stdout: TextIO, user_id: int,
                      as_json: bool, interactive: bool, with_reply: bool) -> int:
    from bot.llm.factory import open_runtime
    from bot.prompts import load_directory
    from bot.service import Service
    from bot.store.queries import Store

    runtime = await open_runtime(settings)
    versions = load_directory(prompts_directory(settings))
    from bot.store.backup import open_configured_database

    store = Store(await open_configured_database(settings))
    try:
        await runtime.start()
        service = Service(settings, store, runtime, versions)
        await service.start()
        if interactive:
            where = (", ".join(settings.model.url) if settings.model.backend == "remote"
                     else Path(getattr(runtime, "model_path", "")).name)
            print(f"loopbot console — model {where}. Type a message; y/n marks the last "
                  "verdict right/wrong; Ctrl-D quits.", file=stdout)
        session = _Session(
            service=service, stdout=stdout, user_id=user_id, as_json=as_json,
            interactive=interactive, with_reply=with_reply,
            # Message ids must be unique within the chat across runs: base them on the clock.
            next_message_id=int(time.time() * 1000))
        await session.converse(stdin)
    finally:
        await runtime.close()
        await store.close()
    return 0


@dataclass
class _Session:
    """One console run: the service, how to show results, and the ids handed out so far."""

    service: Service
    stdout: TextIO
    user_id: int
    as_json: bool
    interactive: bool
    with_reply: bool
    next_message_id: int
    # The interaction the next y/n votes on.
    last_id: int | None = None

    async def converse(self, stdin: TextIO) -> None:
        """Line by line until end of input: a vote word votes, any other text is a message."""
        while True:
            if self.interactive:
                self.stdout.write("> ")
                self.stdout.flush()
            line = await asyncio.to_thread(stdin.readline)
            if not line:
                break
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            if text.strip().lower() in VOTE_WORDS:
                await self.vote(VOTE_WORDS[text.strip().lower()])
                continue
            await self.message(text)

    async def vote(self, choice: str) -> None:
        """``choice`` on the last verdict, stored as a click on its button would be."""
        if self.last_id is None:
            print(json.dumps({"error": "nothing to vote on yet"}) if self.as_json
                  else "(nothing to vote on yet)", file=self.stdout)
            return
        outcome = await self.service.record_vote(self.last_id, self.user_id, choice,
                                                 chat_id=CONSOLE_CHAT_ID,
                                                 message_id=-self.next_message_id)
        vote = {"vote": choice, "interaction": self.last_id, "stored": outcome.ok}
        status = "stored" if outcome.ok else f"refused: {outcome.reason}"
        shown = f"vote: {choice} ({status})"
        print(json.dumps(vote) if self.as_json else shown, file=self.stdout)

    async def message(self, text: str) -> None:
        """The verdict (and the reply) for ``text``, stored and shown as the bot does."""
        from bot.service import IncomingText

        self.next_message_id += 1
        try:
            classified = await self.service.classify(IncomingText(
                chat_id=CONSOLE_CHAT_ID, user_id=self.user_id, message_id=self.next_message_id,
                text=text, chat_type="console"))
            # Without an update id nothing counts as sent before a /forget.
            assert classified is not None
            reply = (await self.service.reply(classified.interaction) if self.with_reply
                     else None)
        except InferenceError as exc:
            print(json.dumps({"error": str(exc)}) if self.as_json else f"error: {exc}",
                  file=self.stdout)
            return
        verdict = classified.verdict
        assert verdict is not None
        self.last_id = classified.interaction.id
        # The "message" showing the verdict, as the bot notes its verdict message.
        await self.service.note_messages(self.last_id, CONSOLE_CHAT_ID, "verdict",
                                         [-self.next_message_id])
        self.show(classified, verdict, reply)
        self.stdout.flush()

    def show(self, classified: Classified, verdict: Verdict, reply: Reply | None) -> None:
        """A JSON object, the chat-like lines of a terminal, or one line for a script."""
        label = classified.version.label(verdict.label)
        if self.as_json:
            print(json.dumps({
                "interaction": self.last_id, "version": classified.version.id,
                "verdict": verdict.label, "probability": round(verdict.confidence, 4),
                "probabilities": {k: round(v, 4) for k, v in verdict.probabilities.items()},
                "verdict_ms": round(verdict.latency_ms, 1),
                "reply": reply.text if reply else None,
            }), file=self.stdout)  # ASCII escapes: no character in a reply can end the line
        elif self.interactive:
            print(f"{label.emoji} {label.display} · {verdict.confidence:.0%}  "
                  f"[{classified.version.id}, {verdict.latency_ms:.0f} ms]", file=self.stdout)
            if reply is not None:
                print(reply.text or "(empty reply)", file=self.stdout)
        else:
            shown = f"{verdict.label} {verdict.confidence:.2f}"
            tail = f" | {_one_line(reply.text)}" if reply is not None else ""
            print(f"{shown}{tail}", file=self.stdout)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, overrides={"model.path": args.model,
                                                     "storage.db": args.db})
    if args.prompt:
        settings.prompts.default_version = args.prompt
    try:
        return asyncio.run(run_console(
            settings, stdin=sys.stdin, stdout=sys.stdout, user_id=args.user,
            as_json=args.json, interactive=sys.stdin.isatty() and not args.json,
            with_reply=not args.no_reply))
    except InferenceError as exc:
        print(f"loopbot console: {exc}", file=sys.stderr)
        return 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "console", help="try the bot in a terminal (verdict, reply, y/n feedback)")
    parser.add_argument("--model", default=None, help="GGUF file (default: model.path, else "
                        "the default model, fetched on first use)")
    parser.add_argument("--db", default=None, help="SQLite file (default: storage.db)")
    parser.add_argument("--prompt", default=None,
                        help="prompt version to start with when none is active yet")
    parser.add_argument("--user", type=int, default=1, help="user id the votes are stored under")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--no-reply", action="store_true", help="verdicts only")
    parser.set_defaults(func=run)
