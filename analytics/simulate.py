"""The decision engine vs the anchors on simulated hourly traffic (the library behind
``loopbot simulate``, whose command line is :mod:`bot.simulate_cli`).

Every run simulates 7 days of hourly aggregates for one experiment (active "a" vs candidate
"b"): verdicts served per arm, votes (after the real per-user daily cap where users are
modelled), correct votes, 👍/👎 reactions and latency. The engine's column is produced by
``analytics.decide.evaluate`` — the function ``decide()`` runs for the bot — so the benchmark
measures the code that acts on users, vectorised over runs. The naive and GrowthBook columns
see exactly the same votes.

Scenarios (issue 4): S1 (80% base, 20 votes/h, 50/50), S2 (S1 at 4 votes/h), S3_up /
S3_down (share 10% → 25% → 50% at 24 h and 48 h, daily vote-rate cycle, base accuracy drifting
±10 points over the week plus a daily wave), S5 (fixed 10% canary), S1_clustered (S1 with a
population of users who each have their own vote bias and activity, capped per day).

Effects: the candidate's accuracy is the active one's + 0 (false promotion / rollback),
+5 and +10 points (power, votes to promotion) and −5 points (rollback power).

Metrics per method: ``false_promotion_rate`` and ``false_rollback_rate`` (no difference),
``power_plus5`` / ``power_plus10`` (share of runs promoted), ``rollback_power_minus5``
(share reverted), ``mean_votes_plus5`` / ``mean_votes_plus10``: mean votes (both arms) at the
moment of promotion over the promoted runs (null if none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from analytics.baselines import first_decision, growthbook_sequential, naive_z
from analytics.decide import PROMOTE, REVERT, DecisionConfig, ExperimentArrays, evaluate
from analytics.stats import cap_votes_per_user_day, design_effect

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

HOURS = 168
METHODS = ("engine", "naive", "growthbook")
EFFECTS = {"zero": 0.0, "plus5": 0.05, "plus10": 0.10, "minus5": -0.05}
# A served verdict gets a correct/incorrect vote with this probability; reactions are rarer.
VOTE_PROB = 0.35
REACTION_PROB = 0.06
# New users (first seen in the experiment) per served verdict: the SRM test's units.
NEW_USER_PROB = 0.3
DOWN_SHARE = 0.3
LATENCY_MEAN_S, LATENCY_SD_S = 1.2, 0.4


@dataclass(frozen=True)
class Scenario:
    name: str
    votes_per_hour: float
    # (from hour, share) steps of the candidate's planned share.
    shares: tuple[tuple[int, float], ...] = ((0, 0.5),)
    base_accuracy: float = 0.80
    # Relative amplitude of the daily vote-rate cycle (0 = flat).
    vote_cycle: float = 0.0
    # Base accuracy change over the whole week (points), and the daily wave's amplitude.
    drift: float = 0.0
    wave: float = 0.0
    # Users (0 = every vote independent); per-user logit bias sd and activity spread.
    users: int = 0
    user_bias_sd: float = 0.0
    user_activity_sd: float = 0.0

    def share(self) -> FloatArray:
        out = np.zeros(HOURS)
        for start, value in self.shares:
            out[start:] = value
        return out

    def vote_rate(self) -> FloatArray:
        h = np.arange(HOURS)
        # Peak in the evening, trough at night: the cycle a chat bot's traffic follows.
        return self.votes_per_hour * (1 + self.vote_cycle * np.sin(2 * np.pi * (h - 12) / 24))

    def accuracy(self) -> FloatArray:
        h = np.arange(HOURS)
        return (self.base_accuracy + self.drift * h / HOURS
                + self.wave * np.sin(2 * np.pi * (h - 12) / 24))


SCENARIOS: dict[str, Scenario] = {
    "S1": Scenario("S1", 20.0),
    "S2": Scenario("S2", 4.0),
    "S3_up": Scenario("S3_up", 20.0, ((0, 0.10), (24, 0.25), (48, 0.50)), vote_cycle=0.6,
                      drift=0.10, wave=0.04),
    "S3_down": Scenario("S3_down", 20.0, ((0, 0.10), (24, 0.25), (48, 0.50)), vote_cycle=0.6,
                        drift=-0.10, wave=0.04),
    "S5": Scenario("S5", 20.0, ((0, 0.10),)),
    "S1_clustered": Scenario("S1_clustered", 20.0, users=1500, user_bias_sd=0.6,
                             user_activity_sd=1.0),
}


def _logit(p: FloatArray) -> FloatArray:
    out: FloatArray = np.log(p) - np.log1p(-p)
    return out


def simulate_arrays(
    scenario: Scenario, effect: float, runs: int, rng: np.random.Generator, cap: int
) -> ExperimentArrays:
    """Hourly aggregates of ``runs`` simulated experiments (shape (runs, HOURS))."""
    share = scenario.share()
    p_a = np.clip(scenario.accuracy(), 0.01, 0.99)
    p_b = np.clip(p_a + effect, 0.01, 0.99)
    served = rng.poisson(np.broadcast_to(scenario.vote_rate() / VOTE_PROB, (runs, HOURS)))
    served_b = rng.binomial(served, share)
    served_a = served - served_b
    votes_a = rng.binomial(served_a, VOTE_PROB)
    votes_b = rng.binomial(served_b, VOTE_PROB)
    new_users = rng.poisson(np.broadcast_to(scenario.vote_rate() / VOTE_PROB * NEW_USER_PROB,
                                            (runs, HOURS)))
    new_b = rng.binomial(new_users, share)
    if scenario.users:
        votes_a, correct_a, votes_b, correct_b, deff = _clustered_votes(
            scenario, votes_a, votes_b, share, p_a, p_b, rng, cap)
    else:
        # Every vote from a different user: no clustering to correct for.
        correct_a = rng.binomial(votes_a, p_a)
        correct_b = rng.binomial(votes_b, p_b)
        deff = np.ones((runs, HOURS))
    react_a = rng.binomial(served_a, REACTION_PROB)
    react_b = rng.binomial(served_b, REACTION_PROB)
    down_a = rng.binomial(react_a, DOWN_SHARE)
    down_b = rng.binomial(react_b, DOWN_SHARE)
    lat_a = np.maximum(0.0, rng.normal(served_a * LATENCY_MEAN_S, LATENCY_SD_S * np.sqrt(served_a)))
    lat_b = np.maximum(0.0, rng.normal(served_b * LATENCY_MEAN_S, LATENCY_SD_S * np.sqrt(served_b)))
    return ExperimentArrays(
        votes_a=votes_a, correct_a=correct_a, votes_b=votes_b, correct_b=correct_b,
        served_a=served_a, served_b=served_b, new_users_a=new_users - new_b, new_users_b=new_b,
        planned_share=np.broadcast_to(share, (runs, HOURS)).astype(np.float64),
        up_a=react_a - down_a, down_a=down_a, up_b=react_b - down_b, down_b=down_b,
        latency_n_a=served_a, latency_sum_a=lat_a, latency_n_b=served_b, latency_sum_b=lat_b,
        design_effect=deff,
    )


def _clustered_votes(
    scenario: Scenario,
    votes_a: IntArray,
    votes_b: IntArray,
    share: FloatArray,
    p_a: FloatArray,
    p_b: FloatArray,
    rng: np.random.Generator,
    cap: int,
) -> tuple[IntArray, IntArray, IntArray, IntArray, FloatArray]:
    """Votes from a user population: sticky arms, personal bias, heavy voters, daily cap.

    Also returns the design effect the bot would estimate at each look from the per-user
    counts so far (``analytics.stats.design_effect``), computed hour by hour.
    """
    runs, users = votes_a.shape[0], scenario.users
    bucket = rng.random((runs, users))
    bias = rng.normal(0.0, scenario.user_bias_sd, (runs, users))
    activity = rng.lognormal(0.0, scenario.user_activity_sd, (runs, users))
    if np.ptp(share) > 0:
        raise ValueError("the clustered model assumes a fixed share")
    in_b = bucket < share[0]
    out_votes: list[IntArray] = []
    out_correct: list[IntArray] = []
    per_vote: list[tuple[IntArray, IntArray, npt.NDArray[np.bool_]]] = []
    for arm_votes, arm_mask, p in ((votes_a, ~in_b, p_a), (votes_b, in_b, p_b)):
        weights = np.where(arm_mask, activity, 0.0)
        totals = weights.sum(axis=1, keepdims=True)
        cdf = np.cumsum(weights, axis=1) / np.where(totals > 0, totals, 1.0)
        # Offsetting run r's CDF by r makes one sorted array for a single searchsorted.
        flat = (cdf + np.arange(runs)[:, None]).ravel()
        cells = np.repeat(np.arange(runs * HOURS), arm_votes.ravel())
        run_of, hour_of = cells // HOURS, cells % HOURS
        draw = run_of + rng.random(cells.size) * 0.999999
        user = np.minimum(np.searchsorted(flat, draw, side="right"), runs * users - 1)
        logit = _logit(p)[hour_of] + bias.ravel()[user]
        correct = rng.random(cells.size) < 1 / (1 + np.exp(-logit))
        keep = cap_votes_per_user_day(user, hour_of // 24, cap)
        counts = np.bincount(cells[keep], minlength=runs * HOURS).reshape(runs, HOURS)
        right = np.bincount(cells[keep & correct], minlength=runs * HOURS).reshape(runs, HOURS)
        out_votes.append(counts.astype(np.int64))
        out_correct.append(right.astype(np.int64))
        order = np.argsort(hour_of[keep], kind="stable")
        per_vote.append((hour_of[keep][order], user[keep][order], correct[keep][order]))
    deff = np.ones((runs, HOURS))
    size = runs * users
    running = [[np.zeros(size), np.zeros(size)] for _ in range(2)]
    bounds = [np.searchsorted(h, np.arange(HOURS + 1)) for h, _, _ in per_vote]
    for hour in range(HOURS):
        for arm, (_, user_ids, is_correct) in enumerate(per_vote):
            lo, hi = bounds[arm][hour], bounds[arm][hour + 1]
            if hi > lo:
                running[arm][0] += np.bincount(user_ids[lo:hi], minlength=size)
                running[arm][1] += np.bincount(user_ids[lo:hi], weights=is_correct[lo:hi],
                                               minlength=size)
        deff[:, hour] = design_effect(
            running[0][0].reshape(runs, users), running[0][1].reshape(runs, users),
            running[1][0].reshape(runs, users), running[1][1].reshape(runs, users))
    return out_votes[0], out_correct[0], out_votes[1], out_correct[1], deff


@dataclass(frozen=True)
class Outcomes:
    """Per run: +1 promoted, −1 reverted, 0 neither; votes (both arms) at that look."""

    outcome: IntArray
    votes: IntArray


def _votes_at(total: IntArray, idx: IntArray) -> IntArray:
    at = np.take_along_axis(total, np.maximum(idx, 0)[:, None], axis=1)[:, 0]
    return np.where(idx >= 0, at, total[:, -1]).astype(np.int64)


def run_methods(data: ExperimentArrays, config: DecisionConfig) -> dict[str, Outcomes]:
    """Every method on the same simulated data."""
    traj = evaluate(data, config)
    action, idx = traj.first_terminal()
    total = traj.votes_a + traj.votes_b
    engine = np.where(action == PROMOTE, 1, np.where(action == REVERT, -1, 0))
    out = {"engine": Outcomes(engine.astype(np.int64), _votes_at(total, idx))}
    baselines: dict[str, Callable[..., Any]] = {"naive": naive_z,
                                                "growthbook": growthbook_sequential}
    for name, method in baselines.items():
        res = method(traj.votes_a, traj.correct_a, traj.votes_b, traj.correct_b)
        outcome, look = first_decision(res.better, res.worse)
        out[name] = Outcomes(outcome, _votes_at(total, look))
    return out


def _mean_votes(o: Outcomes) -> float | None:
    promoted = o.outcome == 1
    return round(float(o.votes[promoted].mean()), 1) if promoted.any() else None


def summarise(results: dict[str, dict[str, Outcomes]]) -> dict[str, dict[str, Any]]:
    """results[effect][method] → the issue's metric object per method."""
    table: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        zero, p5 = results["zero"][method], results["plus5"][method]
        p10, m5 = results["plus10"][method], results["minus5"][method]
        table[method] = {
            "false_promotion_rate": round(float((zero.outcome == 1).mean()), 4),
            "false_rollback_rate": round(float((zero.outcome == -1).mean()), 4),
            "power_plus5": round(float((p5.outcome == 1).mean()), 4),
            "power_plus10": round(float((p10.outcome == 1).mean()), 4),
            "rollback_power_minus5": round(float((m5.outcome == -1).mean()), 4),
            "mean_votes_plus5": _mean_votes(p5),
            "mean_votes_plus10": _mean_votes(p10),
        }
    return table


def simulate(
    runs: int,
    seed: int = 0,
    scenarios: Sequence[str] | None = None,
    config: DecisionConfig | None = None,
    chunk: int = 250,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The whole benchmark: ``{"scenarios": {name: {method: metrics}}}``."""
    config = config or DecisionConfig()
    config.validate()
    names = list(scenarios or SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}")
    out: dict[str, Any] = {}
    for name in names:
        scenario = SCENARIOS[name]
        results: dict[str, dict[str, Outcomes]] = {}
        for e_i, (effect_name, effect) in enumerate(EFFECTS.items()):
            # One seed per (scenario, effect): results do not depend on which scenarios run.
            rng = np.random.default_rng([seed, list(SCENARIOS).index(name), e_i])
            parts: list[dict[str, Outcomes]] = []
            for start in range(0, runs, chunk):
                n = min(chunk, runs - start)
                data = simulate_arrays(scenario, effect, n, rng, config.max_votes_per_user_day)
                parts.append(run_methods(data, config))
            results[effect_name] = {
                m: Outcomes(np.concatenate([p[m].outcome for p in parts]),
                            np.concatenate([p[m].votes for p in parts]))
                for m in METHODS
            }
            if progress:
                progress(f"{name} {effect_name}: done")
        out[name] = summarise(results)
    return {"scenarios": out}
