"""``loopbot analyze``: the scheduled experiment analysis, run once from the command line.

It calls the same :func:`bot.experiment.analyze` as the bot's job, so on the same database
and at the same hour it reaches the same decisions (and, without ``--dry-run``, applies them
the same way, with the same audit entries). Prompt files are read from the configured
directory: they are the versions the bot serves after its next start, so a file edited since
is reported, and its test is restarted by the bot when it starts with it, not here.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from bot.config import Settings
    from bot.experiment import Outcome
    from bot.prompts import PromptVersion


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "analyze", help="run the experiment analysis once (what the hourly job does)",
        description="Decide for every candidate version (promote, revert, retire, ramp, "
                    "freeze or hold) from the votes in the database, and apply the decisions "
                    "through the audited version state, exactly like the bot's scheduled job.")
    # SUPPRESS: do not overwrite the top-level `loopbot --config FILE` with None.
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML config file (default: $LOOPBOT_CONFIG)")
    parser.add_argument("--db", help="SQLite database file (default: storage.db)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dry-run", action="store_true",
                        help="decide and report, but change nothing")
    parser.add_argument("--at", type=float, default=None, metavar="UNIX_TIME",
                        help="analyse as of this time (default: now); e.g. to replay a past "
                             "decision on a backup. A time before the last recorded version "
                             "change can only be used with --dry-run")
    parser.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import time

    from bot.config import load_settings, prompts_directory, resolve_path
    from bot.prompts import load_directory

    settings = load_settings(getattr(args, "config", None), overrides={"storage.db": args.db})
    db_path = resolve_path(settings, settings.storage.db)
    if not settings.storage.url and not db_path.is_file():
        # Opening would create an empty database; there is nothing to analyse.
        print(f"loopbot analyze: no database at {db_path}", file=sys.stderr)
        return 1
    prompt_versions = load_directory(prompts_directory(settings))
    now = time.time() if args.at is None else float(args.at)
    dry_run = bool(args.dry_run)
    outcomes = asyncio.run(_analyze(prompt_versions, settings, now, apply=not dry_run,
                                    check_past=not dry_run and args.at is not None))
    if outcomes is None:
        return 2
    if args.json:
        print(json.dumps({"now": now, "db": str(db_path), "dry_run": dry_run,
                          "outcomes": [o.to_json() for o in outcomes]},
                         ensure_ascii=False, indent=2))
    elif not outcomes:
        print("no running experiment (no candidate version)")
    else:
        print("\n\n".join(o.message for o in outcomes))
    return 1 if any(o.error for o in outcomes) else 0


async def _analyze(prompt_versions: Mapping[str, PromptVersion], settings: Settings,
                   now: float, *, apply: bool, check_past: bool) -> list[Outcome] | None:
    from bot.experiment import analyze
    from bot.store.backup import open_configured_database
    from bot.store.version_rows import last_change

    db = await open_configured_database(settings)
    try:
        last = await last_change(db) if check_past else None
        if last is not None and now < last:
            # Written with a past time, the audit log would go back in time and a version's
            # "since" would predate changes already made after it.
            print(f"loopbot analyze: --at {now:.0f} is before the last recorded version change "
                  f"({last:.0f}); decisions cannot be applied in the past: add --dry-run to "
                  "replay", file=sys.stderr)
            return None
        # The files read here may be newer than what the bot serves: restarts are the bot's.
        return await analyze(db, prompt_versions, settings.experiment, now=now, apply=apply,
                             apply_restarts=False)
    finally:
        await db.close()
