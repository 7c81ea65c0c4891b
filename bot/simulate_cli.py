"""``loopbot simulate``: the command line of :mod:`analytics.simulate` (the decision engine
vs the anchors), of the improvement-loop simulation (``--loop``) and of the check against
gbstats itself (``--check-gbstats``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from analytics.decide import DecisionConfig
from analytics.simulate import SCENARIOS, simulate


def table(report: dict[str, Any]) -> str:
    cols = ("false_promotion_rate", "false_rollback_rate", "power_plus5", "power_plus10",
            "rollback_power_minus5", "mean_votes_plus5", "mean_votes_plus10")
    heads = ("false+", "false-", "pow+5", "pow+10", "rb-5", "votes+5", "votes+10")
    lines = [f"{'scenario':<13} {'method':<11} " + " ".join(f"{h:>8}" for h in heads)]
    for name, methods in report["scenarios"].items():
        for method, m in methods.items():
            cells = []
            for c in cols:
                v = m[c]
                cells.append(f"{'-':>8}" if v is None else
                             f"{v:>8.0f}" if c.startswith("mean") else f"{v:>8.3f}")
            lines.append(f"{name:<13} {method:<11} " + " ".join(cells))
    return "\n".join(lines)


def _handler(args: argparse.Namespace) -> int:
    if getattr(args, "loop", False):
        from bot.learning.simulation import run_from_args

        return run_from_args(args)
    if getattr(args, "check_gbstats", None):
        return _check_gbstats(args)
    if getattr(args, "write_log", None):
        return _write_log(args)
    if args.runs is None:
        args.runs = 1000
    if args.runs < 1:
        print("simulate: --runs must be at least 1", file=sys.stderr)
        return 2
    started = time.monotonic()
    config = DecisionConfig()
    settings_path = getattr(args, "config", None)
    if settings_path:
        from bot.config import load_settings  # only when a config file is given

        config = load_settings(settings_path).experiment
    try:
        report = simulate(args.runs, args.seed, args.scenarios, config,
                          progress=None if args.json else
                          (lambda msg: print(msg, file=sys.stderr)))
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
        print(f"\n{args.runs} runs per scenario and effect, seed {args.seed}, "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


def _write_log(args: argparse.Namespace) -> int:
    """The simulation's own traffic as the event log ``loopbot replay`` reads (one scenario,
    one effect), and the engine's first decision of each run on stderr's last line."""
    import gzip

    import numpy as np

    from analytics.simulate import EFFECTS, run_events, simulate_traffic

    names = args.scenarios or ["S1"]
    runs = 20 if args.runs is None else args.runs
    if len(names) != 1 or args.effect not in EFFECTS or runs < 1:
        print("simulate: --write-log takes one --scenarios NAME, --effect "
              f"{'|'.join(EFFECTS)} and --runs ≥ 1", file=sys.stderr)
        return 2
    config = DecisionConfig()
    scenario = SCENARIOS[names[0]]
    rng = np.random.default_rng([args.seed, list(SCENARIOS).index(names[0]),
                                 list(EFFECTS).index(args.effect)])
    traffic = simulate_traffic(scenario, EFFECTS[args.effect], runs, rng,
                               config.max_votes_per_user_day,
                               config.max_observations_per_text_day)
    opener = gzip.open if args.write_log.endswith(".gz") else open
    try:
        with opener(args.write_log, "wt", encoding="utf-8") as out:
            for run in range(runs):
                for event in run_events(traffic, scenario, run):
                    out.write(json.dumps(event) + "\n")
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {runs} runs of {names[0]} ({args.effect}) to {args.write_log}",
          file=sys.stderr)
    return 0


def _check_gbstats(args: argparse.Namespace) -> int:
    from bot.gbstats_check import GbstatsUnavailable, compare, simulated_counts

    runs = 20 if args.runs is None else args.runs
    if runs < 1:
        print("simulate: --runs must be at least 1", file=sys.stderr)
        return 2
    counts = simulated_counts(runs, args.seed)
    try:
        agreement = compare(args.check_gbstats, counts)
    except GbstatsUnavailable as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(agreement.as_json(), indent=2))
    else:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in agreement.max_abs_diff.items())
        print(f"GrowthBook column vs gbstats on {agreement.looks} looks of {agreement.runs} "
              f"simulated runs (every scenario and effect): largest differences {diffs}; "
              f"{agreement.flag_disagreements} looks and {agreement.decision_disagreements} "
              f"runs decided differently: {'they agree' if agreement.ok else 'THEY DIFFER'}")
    return 0 if agreement.ok else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="benchmark the decision engine against naive and GrowthBook on simulated traffic",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per scenario and effect (default 1000; 20 with "
                             "--check-gbstats)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=None,
                        metavar="NAME", help=f"subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--write-log", metavar="FILE", default=None,
                        help="instead of the benchmark, write one scenario's simulated "
                             "traffic as an event log for `loopbot replay` (.gz to compress)")
    parser.add_argument("--effect", default="zero",
                        help="with --write-log: zero, plus5, plus10 or minus5")
    parser.add_argument("--check-gbstats", metavar="PYTHON", default=None,
                        help="instead of the benchmark, compare its GrowthBook column with "
                             "gbstats 0.8.0 run by PYTHON (an interpreter of a separate "
                             "environment with `pip install gbstats==0.8.0`: it needs numpy<2)")
    from bot.learning.simulation import add_loop_arguments

    add_loop_arguments(parser)
    parser.set_defaults(func=_handler)
