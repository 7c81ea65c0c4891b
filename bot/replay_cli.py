"""``loopbot replay LOG``: the decision engine over an event log (JSON lines, or gzip of them).

Each run of the log is aggregated as the bot aggregates its database and decided hour by hour
with the same code and configuration as the bot's job (:mod:`analytics.replay`); the first
promote, revert, retire or freeze (or none by the horizon) is printed per run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from analytics.decide import DecisionConfig, ExperimentSnapshot, decision_at
from analytics.replay import ReplayError, RunResult, iter_runs, replay_run
from bot.texts import decisions as texts


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "replay", help="run the decision engine over an event log (what would it decide?)",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("log", help="JSON lines of share/verdict/vote/reaction events "
                                    "(.gz allowed); see README, 'loopbot replay'")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_replay)


def read_events(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, event) for every non-empty line; a bad line is an error naming it."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReplayError(f"line {number}: not JSON ({exc.msg})") from None
            if not isinstance(event, dict):
                raise ReplayError(f"line {number}: an event is a JSON object")
            yield number, event


def result_json(result: RunResult, config: DecisionConfig) -> dict[str, Any]:
    return {"action": result.action, "rule": result.rule, "hour": result.hour,
            "votes": result.votes, "reason": _reason(result, config)}


def _reason(result: RunResult, config: DecisionConfig) -> str:
    at = result.hour if result.hour >= 0 else result.arrays.shape[1] - 1
    snapshot = ExperimentSnapshot(
        active_id="active", candidate_id="candidate",
        planned_share=float(result.arrays.planned_share[0, at]), start_hour=0,
        now_hour=at + 1, design_effect=float(result.arrays.design_effect[0, at]))
    decision = decision_at(result.trajectory, at, snapshot, config)
    return texts.reason(decision, snapshot, config)


def run_replay(args: argparse.Namespace) -> int:
    from bot.config import load_settings

    config = load_settings(getattr(args, "config", None)).experiment
    path = Path(args.log)
    if not path.is_file():
        print(f"loopbot replay: no file {path}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {}
    try:
        for log in iter_runs(read_events(path)):
            results[log.run] = result_json(replay_run(log, config), config)
    except (ReplayError, OSError, UnicodeDecodeError) as exc:
        print(f"loopbot replay: {path}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"runs": results}, ensure_ascii=False, indent=2))
    else:
        for run, result in results.items():
            when = f"hour {result['hour']}" if result["hour"] >= 0 else "by the horizon"
            print(f"run {run}: {result['action']} ({when}, {result['votes']} observations): "
                  f"{result['reason']}")
    return 0
