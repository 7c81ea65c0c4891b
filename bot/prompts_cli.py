"""``loopbot prompts list|validate|show``: the versions on disk and, if a database is
configured, their state in it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bot.config import Settings, load_settings, prompts_directory, resolve_path
from bot.prompts import load_directory, validate_directory


async def _states(settings: Settings) -> dict[str, str]:
    db = resolve_path(settings, settings.storage.db)
    if not db.is_file():
        return {}
    from bot import versions
    from bot.store.backup import open_configured_database

    database = await open_configured_database(settings)
    try:
        state = await versions.load(database)
    finally:
        await database.close()
    result: dict[str, str] = {}
    if state.active is not None:
        result[state.active.version_id] = "active"
    for candidate in state.candidates:
        result[candidate.version_id] = f"candidate {candidate.share:.0%}"
    return result


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, overrides={"storage.db": args.db})
    directory = Path(args.dir) if args.dir else prompts_directory(settings)
    if args.action == "validate":
        errors = validate_directory(directory)
        for error in errors:
            print(f"invalid: {error}", file=sys.stderr)
        count = len(list(directory.glob("*.yaml")))
        print(f"{count - len(errors)} of {count} prompt versions in {directory} are valid")
        return 1 if errors else 0
    versions = load_directory(directory)
    if args.action == "show":
        if args.id is None:
            print("loopbot prompts show: which version? e.g. `loopbot prompts show "
                  f"{min(versions, default='v1-zh')}` (`loopbot prompts list` lists them)",
                  file=sys.stderr)
            return 2
        if args.id not in versions:
            print(f"no prompt version '{args.id}' in {directory}", file=sys.stderr)
            return 2
        print(versions[args.id].to_yaml(), end="")
        return 0
    states = asyncio.run(_states(settings))
    print(f"{'id':<24} {'parent':<16} {'lang':<5} {'labels':<20} {'examples':>8}  "
          f"{'hash':<16}  state")
    for vid, version in sorted(versions.items()):
        labels = "/".join(version.label_names)
        print(f"{vid:<24} {version.parent or '-':<16} {version.language:<5} {labels:<20} "
              f"{len(version.examples):>8}  {version.content_hash:<16}  "
              f"{states.get(vid, '-')}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("prompts", help="list, validate or show prompt versions")
    parser.add_argument("action", choices=["list", "validate", "show"])
    parser.add_argument("id", nargs="?", help="version id (for show)")
    parser.add_argument("--dir", "--prompts", dest="dir", default=None,
                        help="prompts directory (default: configured)")
    parser.add_argument("--db", default=None, help="database, to show each version's state")
    parser.set_defaults(func=run)
