"""``loopbot simulate --check-gbstats PYTHON``: the GrowthBook column against gbstats itself.

The benchmark's GrowthBook column comes from ``analytics.baselines.growthbook_sequential``, a
vectorised reimplementation, because gbstats 0.8.0 pins numpy<2 / pandas<2 and cannot share
the runtime's environment. This check makes the claim "it is GrowthBook's test" reproducible:
it simulates a few runs of every scenario and effect, gives the counts of every hourly look to
gbstats (run by ``PYTHON``, an interpreter of an environment where ``pip install
gbstats==0.8.0`` was done, through ``bot/gbstats_reference.py``) and to the
reimplementation, and compares the intervals, the p-values and, what the benchmark counts,
each run's first decision.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from analytics.baselines import GROWTHBOOK_TUNING, first_decision, growthbook_sequential
from analytics.decide import DecisionConfig, evaluate
from bot.errors import LoopbotError

REFERENCE_SCRIPT = Path(__file__).with_name("gbstats_reference.py")
# Both sides do the same floating-point formula; anything beyond rounding is a real difference.
TOLERANCE = 1e-9


class GbstatsUnavailable(LoopbotError, RuntimeError):
    """gbstats could not be run with the interpreter given."""


def gbstats_results(python: str | Path, cases: npt.NDArray[np.int64], alpha: float = 0.05,
                    tuning: float = GROWTHBOOK_TUNING,
                    timeout: float = 900.0) -> npt.NDArray[np.float64]:
    """(low, high, p_value) per row of ``cases`` (n_a, x_a, n_b, x_b), computed by gbstats."""
    request = json.dumps({"alpha": alpha, "tuning": tuning, "cases": cases.tolist()})
    try:
        done = subprocess.run([str(python), str(REFERENCE_SCRIPT)], input=request,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GbstatsUnavailable(f"cannot run {python}: {exc}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        hint = (" (install it there with `pip install gbstats==0.8.0`)"
                if "No module named 'gbstats'" in done.stderr else "")
        raise GbstatsUnavailable(f"gbstats failed under {python}: {last}{hint}")
    return np.asarray(json.loads(done.stdout), dtype=np.float64).reshape(-1, 3)


@dataclass(frozen=True)
class Agreement:
    looks: int
    runs: int
    max_abs_diff: dict[str, float]
    # Looks where one says "significant" and the other does not (or the other direction).
    flag_disagreements: int
    # Runs whose first decision (promote / revert / none, and at which look) differs.
    decision_disagreements: int

    @property
    def ok(self) -> bool:
        return (max(self.max_abs_diff.values()) <= TOLERANCE
                and self.flag_disagreements == 0 and self.decision_disagreements == 0)

    def as_json(self) -> dict[str, Any]:
        return {"looks": self.looks, "runs": self.runs, "max_abs_diff": self.max_abs_diff,
                "flag_disagreements": self.flag_disagreements,
                "decision_disagreements": self.decision_disagreements, "agree": self.ok}


def simulated_counts(runs: int, seed: int,
                     config: DecisionConfig | None = None) -> npt.NDArray[np.int64]:
    """Cumulative (n_a, x_a, n_b, x_b) at every look: shape (experiments, looks, 4).

    ``runs`` experiments per scenario and effect, exactly as the benchmark feeds its baselines.
    """
    from analytics.simulate import EFFECTS, SCENARIOS, simulate_arrays

    config = config or DecisionConfig()
    blocks = []
    for s_i, scenario in enumerate(SCENARIOS.values()):
        for e_i, effect in enumerate(EFFECTS.values()):
            rng = np.random.default_rng([seed, s_i, e_i])
            data = simulate_arrays(scenario, effect, runs, rng, config.max_votes_per_user_day)
            traj = evaluate(data, config)
            blocks.append(np.stack([traj.votes_a, traj.correct_a,
                                    traj.votes_b, traj.correct_b], axis=-1))
    return np.concatenate(blocks).astype(np.int64)


def compare(python: str | Path, counts: npt.NDArray[np.int64]) -> Agreement:
    """gbstats vs the reimplementation on ``counts`` of shape (runs, looks, 4)."""
    runs, looks, _ = counts.shape
    # Many looks repeat (quiet hours): gbstats sees each distinct count once.
    unique, back = np.unique(counts.reshape(-1, 4), axis=0, return_inverse=True)
    reference = gbstats_results(python, unique)[back.reshape(-1)].reshape(runs, looks, 3)
    return agreement(reference, counts)


def agreement(reference: npt.NDArray[np.float64], counts: npt.NDArray[np.int64]) -> Agreement:
    """How far the reimplementation is from ``reference`` (low, high, p per look)."""
    runs, looks, _ = counts.shape
    ours = growthbook_sequential(*counts.transpose(2, 0, 1))
    diffs = {
        name: float(np.max(np.abs(mine - reference[..., k])))
        for k, (name, mine) in enumerate((("low", ours.low), ("high", ours.high),
                                          ("p_value", ours.p_value)))
    }
    # gbstats' own flags, as the benchmark derives them: the interval excludes zero.
    ref_better, ref_worse = reference[..., 0] > 0, reference[..., 1] < 0
    flags = int(np.sum((ref_better != ours.better) | (ref_worse != ours.worse)))
    ref_outcome, ref_look = first_decision(ref_better, ref_worse)
    outcome, look = first_decision(ours.better, ours.worse)
    decisions = int(np.sum((ref_outcome != outcome) | (ref_look != look)))
    return Agreement(looks=runs * looks, runs=runs, max_abs_diff=diffs,
                     flag_disagreements=flags, decision_disagreements=decisions)
