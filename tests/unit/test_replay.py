"""`loopbot replay`: the engine over an event log decides as the simulation did on the same
traffic, reads what operators give it, and says which line is wrong."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from analytics.decide import ACTIONS, PAIRED_FIELDS, DecisionConfig, evaluate
from analytics.observations import RunningDesignEffect
from analytics.replay import ReplayError, group_runs, replay_run
from analytics.simulate import SCENARIOS, run_events, simulate_traffic
from analytics.stats import design_effect
from bot.cli import main

CFG = DecisionConfig()


@pytest.mark.parametrize(("scenario", "effect", "seed"), [
    ("S1", 0.05, 1), ("S3_up", 0.10, 2), ("S1", -0.05, 3), ("S_propensity_right", 0.0, 4),
])
def test_replay_of_simulated_traffic_decides_as_the_simulation(
        scenario: str, effect: float, seed: int) -> None:
    runs = 12
    traffic = simulate_traffic(SCENARIOS[scenario], effect, runs, np.random.default_rng(seed),
                               CFG.max_votes_per_user_day, CFG.max_observations_per_text_day)
    action, idx = evaluate(traffic.arrays, CFG).first_terminal()
    events = [(n, e) for run in range(runs)
              for n, e in enumerate(run_events(traffic, SCENARIOS[scenario], run))]
    logs = group_runs(events)
    assert len(logs) == runs
    decided = 0
    for run in range(runs):
        result = replay_run(logs[str(run)], CFG)
        expected = str(ACTIONS[int(action[run])]) if idx[run] >= 0 else "hold"
        assert (result.action, result.hour) == (expected, int(idx[run])), run
        # The paired comparison aggregates back exactly too (the other prompt's labels).
        assert traffic.arrays.pairs is not None and result.arrays.pairs is not None
        for name in PAIRED_FIELDS:
            np.testing.assert_array_equal(getattr(result.arrays.pairs, name)[0],
                                          getattr(traffic.arrays.pairs, name)[run], name)
        assert result.arrays.pairs.two_labels
        decided += result.hour >= 0
    assert decided  # the comparison covered decisions, not only holds


def test_the_running_design_effect_is_the_batch_one() -> None:
    rng = np.random.default_rng(0)
    running = RunningDesignEffect()
    cells: dict[tuple[int, int], list[int]] = {}
    for _ in range(400):
        key, arm, correct = int(rng.integers(0, 30)), int(rng.integers(0, 2)), rng.random() < .7
        running.add(key, arm, bool(correct))
        cell = cells.setdefault((key, arm), [0, 0])
        cell[0] += 1
        cell[1] += int(correct)
    table = {arm: [cells.get((k, arm), [0, 0]) for k in range(30)] for arm in (0, 1)}
    batch = design_effect([c[0] for c in table[0]], [c[1] for c in table[0]],
                          [c[0] for c in table[1]], [c[1] for c in table[1]])
    assert running.value() == pytest.approx(float(batch), rel=1e-12)


def test_the_command_line_reads_gzip_and_names_a_bad_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "s1.jsonl.gz"
    assert main(["simulate", "--write-log", str(log), "--scenarios", "S1", "--effect",
                 "plus10", "--runs", "3", "--seed", "5"]) == 0
    capsys.readouterr()
    assert main(["replay", str(log), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["runs"]) == {"0", "1", "2"}
    assert all(r["action"] in ("promote", "hold", "retire") and r["reason"]
               for r in report["runs"].values())
    bad = tmp_path / "bad.jsonl"
    with gzip.open(log, "rt") as source:
        lines = source.read().splitlines()[:3]
    bad.write_text("\n".join([*lines, '{"kind": "vote", "run": "0", "at": "soon"}']) + "\n")
    assert main(["replay", str(bad)]) == 2
    assert "line 4" in capsys.readouterr().err


def test_events_are_checked() -> None:
    with pytest.raises(ReplayError, match="line 2: kind"):
        group_runs([(1, {"kind": "share", "run": 1, "at": 0, "share": 0.5}),
                    (2, {"kind": "click", "run": 1, "at": 0})])
    with pytest.raises(ReplayError, match="share must be in"):
        group_runs([(1, {"kind": "share", "run": 1, "at": 0, "share": 1.5})])


def test_a_paired_run_without_labels_yet_is_replayed_paired() -> None:
    """The bot holds a paired test whose voted texts lack the other prompt's label; its log
    marks every verdict with a null ``other_label``, and the replay holds it too."""
    traffic = simulate_traffic(SCENARIOS["S1"], 0.10, 1, np.random.default_rng(8),
                               CFG.max_votes_per_user_day, CFG.max_observations_per_text_day)
    events = run_events(traffic, SCENARIOS["S1"], 0)
    for event in events:
        if event["kind"] == "verdict":
            event["other_label"] = None
    log = group_runs(list(enumerate(events)))["0"]
    result = replay_run(log, CFG)
    assert result.arrays.pairs is not None and result.arrays.pairs.right_a.sum() == 0
    assert result.action != "promote"
    for event in events:
        event.pop("other_label", None)
    assert replay_run(group_runs(list(enumerate(events)))["0"], CFG).action == "promote"
