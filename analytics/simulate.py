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
from analytics.decide import (
    PROMOTE,
    REVERT,
    DecisionConfig,
    ExperimentArrays,
    PairedVotes,
    VoteBands,
    evaluate,
)
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
    # Novelty: the candidate is this much better (points) in its first ``novelty_hours``
    # only, on top of the effect under test.
    novelty: float = 0.0
    novelty_hours: int = 24
    # Vote propensity of the candidate's verdicts relative to the active's, when the verdict
    # is right / wrong (1 = users vote on both arms alike). Needs the confidence bands.
    propensity_right_b: float = 1.0
    propensity_wrong_b: float = 1.0
    # Group chats: this many times in the week, one verdict per arm is voted on by a whole
    # group of ``group_size`` members (who all see its truth alike).
    group_bursts: int = 0
    group_size: int = 0
    # Viral copies: this many times in the week, one text is sent ``viral_factor`` × an
    # hour's traffic in one hour; each arm classifies every copy the same way.
    viral_bursts: int = 0
    viral_factor: float = 0.0
    # The paired comparison: the share of texts the two prompts label differently when they
    # are equally accurate (at least the accuracy difference). Two prompts of one model
    # disagree on a minority of texts; 20% is on the cautious side (more disagreement makes
    # the paired test weaker, not biased).
    discordance: float = 0.20

    @property
    def banded(self) -> bool:
        """Verdicts carry confidence bands (as the bot's do); a population of users with
        their own biases draws its votes in another model, without bands."""
        return not self.users

    def effect_curve(self, effect: float) -> FloatArray:
        h = np.arange(HOURS)
        return effect + np.where(h < self.novelty_hours, self.novelty, 0.0)

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
    # Crowds and biased voting (issue 9): each breaks a vote-counting test.
    "S_group_votes": Scenario("S_group_votes", 20.0, group_bursts=3, group_size=60),
    "S_viral": Scenario("S_viral", 20.0, viral_bursts=2, viral_factor=5.0),
    "S_propensity_right": Scenario("S_propensity_right", 20.0, propensity_right_b=1.5),
    "S_propensity_wrong": Scenario("S_propensity_wrong", 20.0, propensity_wrong_b=1.5),
    # Same overall vote rate in both arms: only the confidence bands can tell.
    "S_propensity_equal_rate": Scenario("S_propensity_equal_rate", 20.0,
                                        propensity_right_b=1.125, propensity_wrong_b=0.5),
    "S_novelty": Scenario("S_novelty", 20.0, novelty=0.05),
    "S_1_vote_per_hour": Scenario("S_1_vote_per_hour", 1.0),
    "S_few_heavy_voters": Scenario("S_few_heavy_voters", 20.0, users=200, user_bias_sd=0.6,
                                   user_activity_sd=1.5),
    # Equal overall vote rates again, with a subtler selection that fakes +5 points, the
    # size of a real gain the engine must find: the hardest case for the bands (at the
    # horizon the selection estimate puts a fake +5 only about 2.8 standard errors from a
    # real one). Last in the table, so the other scenarios keep their seeds.
    "S_propensity_subtle": Scenario("S_propensity_subtle", 20.0,
                                    propensity_right_b=1.0625, propensity_wrong_b=0.75),
}
# A verdict's confidence band depends on whether it is right, the same way in both arms
# (the model's probability is informative): P(band | right), P(band | wrong); bands are
# low (< 0.7), middle and high (≥ 0.9) confidence.
BANDS_IF_RIGHT = (0.10, 0.30, 0.60)
BANDS_IF_WRONG = (0.45, 0.35, 0.20)


def _logit(p: FloatArray) -> FloatArray:
    out: FloatArray = np.log(p) - np.log1p(-p)
    return out


@dataclass(frozen=True)
class Traffic:
    """One batch of simulated experiments: what the engine reads (observations, one per
    verdict that got feedback, capped per user and per text and day) and what a test that
    counts votes sees (every vote)."""

    arrays: ExperimentArrays
    votes_a: IntArray
    correct_a: IntArray
    votes_b: IntArray
    correct_b: IntArray


def simulate_arrays(
    scenario: Scenario, effect: float, runs: int, rng: np.random.Generator, cap: int
) -> ExperimentArrays:
    """Hourly aggregates of ``runs`` simulated experiments (shape (runs, HOURS))."""
    return simulate_traffic(scenario, effect, runs, rng, cap).arrays


def simulate_traffic(
    scenario: Scenario, effect: float, runs: int, rng: np.random.Generator, cap: int,
    text_cap: int = 3, pair_rng: np.random.Generator | None = None,
) -> Traffic:
    """The scenario's traffic for ``runs`` experiments: the engine's observations and the
    raw votes, drawn from one model of who is served, who votes and what is right.

    The paired comparison (what the other arm's prompt says on each voted text) is drawn
    last, from ``pair_rng`` when given (so adding it left every other draw as it was)."""
    share = scenario.share()
    p_a = np.clip(scenario.accuracy(), 0.01, 0.99)
    p_b = np.clip(p_a + scenario.effect_curve(effect), 0.01, 0.99)
    served = rng.poisson(np.broadcast_to(scenario.vote_rate() / VOTE_PROB, (runs, HOURS)))
    served_b = rng.binomial(served, share)
    served_a = served - served_b
    bands: VoteBands | None = None
    if scenario.banded:
        (votes_a, correct_a), (votes_b, correct_b), bands = _banded_votes(
            scenario, served_a, served_b, p_a, p_b, rng)
    else:
        votes_a = rng.binomial(served_a, VOTE_PROB)
        votes_b = rng.binomial(served_b, VOTE_PROB)
    # New users are among the served: each served verdict's user is new with this chance
    # (everyone is new in the first hour).
    new_a = rng.binomial(served_a, NEW_USER_PROB)
    new_b = rng.binomial(served_b, NEW_USER_PROB)
    new_a[:, 0], new_b[:, 0] = served_a[:, 0], served_b[:, 0]
    new_users = new_a + new_b
    clusters: FloatArray | None = None
    if scenario.users:
        votes_a, correct_a, votes_b, correct_b, deff, clusters = _clustered_votes(
            scenario, votes_a, votes_b, share, p_a, p_b, rng, cap)
    elif not scenario.banded:
        # Every vote from a different user: no clustering to correct for.
        correct_a = rng.binomial(votes_a, p_a)
        correct_b = rng.binomial(votes_b, p_b)
    if not scenario.users:
        # One vote per voter: what the bot's estimate gives for independent votes.
        deff, clusters = _independent_design_effect(votes_a, correct_a, votes_b, correct_b)
    react_a = rng.binomial(served_a, REACTION_PROB)
    react_b = rng.binomial(served_b, REACTION_PROB)
    down_a = rng.binomial(react_a, DOWN_SHARE)
    down_b = rng.binomial(react_b, DOWN_SHARE)
    lat_a = np.maximum(0.0, rng.normal(served_a * LATENCY_MEAN_S, LATENCY_SD_S * np.sqrt(served_a)))
    lat_b = np.maximum(0.0, rng.normal(served_b * LATENCY_MEAN_S, LATENCY_SD_S * np.sqrt(served_b)))
    counts = {"va": votes_a, "xa": correct_a, "vb": votes_b, "xb": correct_b,
              "sa": served_a, "sb": served_b}
    raw = {k: v.copy() for k, v in counts.items()}
    if scenario.group_bursts:
        _group_bursts(scenario, counts, raw, p_a, p_b, rng)
    if scenario.viral_bursts:
        _viral_bursts(scenario, counts, raw, share, p_a, p_b, rng, text_cap)
    arrays = ExperimentArrays(
        votes_a=counts["va"], correct_a=counts["xa"], votes_b=counts["vb"],
        correct_b=counts["xb"], served_a=counts["sa"], served_b=counts["sb"],
        new_users_a=new_users - new_b, new_users_b=new_b,
        planned_share=np.broadcast_to(share, (runs, HOURS)).astype(np.float64),
        up_a=react_a - down_a, down_a=down_a, up_b=react_b - down_b, down_b=down_b,
        latency_n_a=served_a, latency_sum_a=lat_a, latency_n_b=served_b, latency_sum_b=lat_b,
        design_effect=deff, clusters=clusters, bands=bands,
        pairs=_paired_votes(scenario, counts, p_a, p_b, pair_rng or rng),
    )
    return Traffic(arrays, raw["va"], raw["xa"], raw["vb"], raw["xb"])


def _paired_votes(scenario: Scenario, counts: dict[str, IntArray], p_a: FloatArray,
                  p_b: FloatArray, rng: np.random.Generator) -> PairedVotes:
    """What the other arm's prompt says on each observation's text, every one scored.

    The two prompts' joint correctness per hour: they disagree on d = max(discordance,
    |p_b − p_a|) of the texts, at most what the accuracies allow; n01 = (d + Δ)/2 where only
    the candidate is right and n10 = (d − Δ)/2 where only the active prompt is. Given that
    an arm's verdict was voted right, the other prompt is wrong with n10 / p_a (arm a) or
    n01 / p_b (arm b); given it was voted wrong, the other is wrong too with n00 / (1 − p).
    Who votes depends only on the shown verdict's correctness (as in the scenarios), so these
    are the true conditional shares. Each observation is drawn on its own (a viral text's
    copies are not tied)."""
    delta = p_b - p_a
    # At most what both accuracies allow (n00 and n11 not negative: a base accuracy drifting
    # towards 90% leaves the two prompts few texts to disagree on).
    d = np.minimum(np.maximum(scenario.discordance, np.abs(delta)),
                   np.minimum((1 - p_a) + (1 - p_b), p_a + p_b))
    n01, n10 = (d + delta) / 2, (d - delta) / 2
    n00 = np.clip(1.0 - p_a - n01, 0.0, 1.0)
    right_a, right_b = counts["xa"], counts["xb"]
    wrong_a, wrong_b = counts["va"] - right_a, counts["vb"] - right_b
    return PairedVotes(
        right_a=right_a, right_other_wrong_a=rng.binomial(right_a, np.clip(n10 / p_a, 0, 1)),
        wrong_a=wrong_a, wrong_other_same_a=rng.binomial(wrong_a, np.clip(n00 / (1 - p_a), 0, 1)),
        right_b=right_b, right_other_wrong_b=rng.binomial(right_b, np.clip(n01 / p_b, 0, 1)),
        wrong_b=wrong_b, wrong_other_same_b=rng.binomial(wrong_b, np.clip(n00 / (1 - p_b), 0, 1)),
        two_labels=True,
    )


def _independent_design_effect(
    votes_a: IntArray, correct_a: IntArray, votes_b: IntArray, correct_b: IntArray,
) -> tuple[FloatArray, FloatArray]:
    """``analytics.stats.design_effect`` when every vote comes from a voter of its own, in
    closed form (per arm, the cluster-robust variance is the binomial one times C / (C − 1)),
    and the number of voters so far."""
    robust = np.zeros(votes_a.shape)
    binom = np.zeros(votes_a.shape)
    for votes, correct in ((votes_a, correct_a), (votes_b, correct_b)):
        n = np.cumsum(votes, axis=1).astype(np.float64)
        x = np.cumsum(correct, axis=1).astype(np.float64)
        safe = np.where(n > 0, n, 1.0)
        p = x / safe
        resid = x * (1 - p) ** 2 + (n - x) * p**2
        robust += np.where(n > 1, n / np.maximum(n - 1, 1) * resid / safe**2, 0.0)
        binom += np.where(n > 0, p * (1 - p) / safe, 0.0)
    deff = np.where(binom > 0, robust / np.where(binom > 0, binom, 1.0), 1.0)
    voters = (np.cumsum(votes_a, axis=1) + np.cumsum(votes_b, axis=1)).astype(np.float64)
    return np.maximum(deff, 1.0), voters


def _banded_votes(
    scenario: Scenario, served_a: IntArray, served_b: IntArray, p_a: FloatArray,
    p_b: FloatArray, rng: np.random.Generator,
) -> tuple[tuple[IntArray, IntArray], tuple[IntArray, IntArray], VoteBands]:
    """Who votes depends on whether the verdict is right, differently per arm; each served
    verdict falls in a confidence band that depends on whether it is right (both arms
    alike). One vote per voted verdict."""
    out = []
    for served, p, right_x, wrong_x in (
            (served_a, p_a, 1.0, 1.0),
            (served_b, p_b, scenario.propensity_right_b, scenario.propensity_wrong_b)):
        right = rng.binomial(served, p)
        in_bands_right = rng.multinomial(right, BANDS_IF_RIGHT)
        in_bands_wrong = rng.multinomial(served - right, BANDS_IF_WRONG)
        voted_right = rng.binomial(in_bands_right, min(1.0, VOTE_PROB * right_x))
        voted_wrong = rng.binomial(in_bands_wrong, min(1.0, VOTE_PROB * wrong_x))
        out.append((in_bands_right + in_bands_wrong, voted_right + voted_wrong, voted_right))
    (s_a, o_a, x_a), (s_b, o_b, x_b) = out
    bands = VoteBands(served_a=s_a, observed_a=o_a, correct_a=x_a, served_b=s_b,
                      observed_b=o_b, correct_b=x_b)
    return ((o_a.sum(axis=-1), x_a.sum(axis=-1)), (o_b.sum(axis=-1), x_b.sum(axis=-1)), bands)


def _group_bursts(scenario: Scenario, counts: dict[str, IntArray], raw: dict[str, IntArray],
                  p_a: FloatArray, p_b: FloatArray, rng: np.random.Generator) -> None:
    """A verdict per arm voted on by a whole group: one observation each for the engine (the
    members' majority), ``group_size`` votes each for a vote-counting test."""
    runs = counts["va"].shape[0]
    rows = np.arange(runs)
    for _ in range(scenario.group_bursts):
        hour = rng.integers(0, HOURS, runs)
        for arm, p in (("a", p_a), ("b", p_b)):
            right = (rng.random(runs) < p[hour]).astype(np.int64)
            counts[f"s{arm}"][rows, hour] += 1
            raw[f"s{arm}"][rows, hour] += 1
            counts[f"v{arm}"][rows, hour] += 1
            counts[f"x{arm}"][rows, hour] += right
            raw[f"v{arm}"][rows, hour] += scenario.group_size
            raw[f"x{arm}"][rows, hour] += scenario.group_size * right


def _viral_bursts(scenario: Scenario, counts: dict[str, IntArray], raw: dict[str, IntArray],
                  share: FloatArray, p_a: FloatArray, p_b: FloatArray,
                  rng: np.random.Generator, text_cap: int) -> None:
    """One text sent by many in one hour. Each arm classifies every copy alike (right or
    wrong together); each sender votes as usual. The engine counts the text at most
    ``text_cap`` times per arm that day; a vote-counting test counts every vote."""
    runs = counts["va"].shape[0]
    rows = np.arange(runs)
    hourly_served = scenario.votes_per_hour / VOTE_PROB
    for _ in range(scenario.viral_bursts):
        hour = rng.integers(0, HOURS, runs)
        copies = rng.poisson(scenario.viral_factor * hourly_served, runs)
        copies_b = rng.binomial(copies, share[hour])
        for arm, n, p in (("a", copies - copies_b, p_a), ("b", copies_b, p_b)):
            right = (rng.random(runs) < p[hour]).astype(np.int64)
            voted = rng.binomial(n, VOTE_PROB)
            kept = np.minimum(voted, text_cap) if text_cap > 0 else voted
            for target, votes in ((counts, kept), (raw, voted)):
                target[f"s{arm}"][rows, hour] += n
                target[f"v{arm}"][rows, hour] += votes
                target[f"x{arm}"][rows, hour] += votes * right


def _clustered_votes(
    scenario: Scenario,
    votes_a: IntArray,
    votes_b: IntArray,
    share: FloatArray,
    p_a: FloatArray,
    p_b: FloatArray,
    rng: np.random.Generator,
    cap: int,
) -> tuple[IntArray, IntArray, IntArray, IntArray, FloatArray, FloatArray]:
    """Votes from a user population: sticky arms, personal bias, heavy voters, daily cap.

    Also returns the design effect the bot would estimate at each look from the per-user
    counts so far (``analytics.stats.design_effect``) and the number of distinct voters so
    far (the clusters of the horizon test), computed hour by hour.
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
    clusters = np.zeros((runs, HOURS))
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
        clusters[:, hour] = ((running[0][0] + running[1][0]) > 0).reshape(runs, users).sum(
            axis=1)
    return out_votes[0], out_correct[0], out_votes[1], out_correct[1], deff, clusters


@dataclass(frozen=True)
class Outcomes:
    """Per run: +1 promoted, −1 reverted, 0 neither; votes (both arms) at that look."""

    outcome: IntArray
    votes: IntArray


def _votes_at(total: IntArray, idx: IntArray) -> IntArray:
    at = np.take_along_axis(total, np.maximum(idx, 0)[:, None], axis=1)[:, 0]
    return np.where(idx >= 0, at, total[:, -1]).astype(np.int64)


def run_methods(traffic: Traffic | ExperimentArrays,
                config: DecisionConfig) -> dict[str, Outcomes]:
    """Every method on the same simulated traffic: the engine on its observations, the
    vote-counting tests on the votes (what they would count in a real bot)."""
    if isinstance(traffic, ExperimentArrays):
        data = traffic
        votes = (data.votes_a, data.correct_a, data.votes_b, data.correct_b)
    else:
        data = traffic.arrays
        votes = (traffic.votes_a, traffic.correct_a, traffic.votes_b, traffic.correct_b)
    traj = evaluate(data, config)
    action, idx = traj.first_terminal()
    cum_votes = [np.cumsum(v, axis=1) for v in votes]
    total = cum_votes[0] + cum_votes[2]
    engine = np.where(action == PROMOTE, 1, np.where(action == REVERT, -1, 0))
    out = {"engine": Outcomes(engine.astype(np.int64), _votes_at(total, idx))}
    baselines: dict[str, Callable[..., Any]] = {"naive": naive_z,
                                                "growthbook": growthbook_sequential}
    for name, method in baselines.items():
        res = method(*cum_votes)
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
            pair_rng = np.random.default_rng([seed, list(SCENARIOS).index(name), e_i, 1])
            parts: list[dict[str, Outcomes]] = []
            for start in range(0, runs, chunk):
                n = min(chunk, runs - start)
                traffic = simulate_traffic(scenario, effect, n, rng,
                                           config.max_votes_per_user_day,
                                           config.max_observations_per_text_day, pair_rng)
                parts.append(run_methods(traffic, config))
            results[effect_name] = {
                m: Outcomes(np.concatenate([p[m].outcome for p in parts]),
                            np.concatenate([p[m].votes for p in parts]))
                for m in METHODS
            }
            if progress:
                progress(f"{name} {effect_name}: done")
        out[name] = summarise(results)
    return {"scenarios": out}


# Band representatives: a confidence inside each band (low < 0.7 ≤ middle < 0.9 ≤ high).
BAND_CONFIDENCE = (0.6, 0.8, 0.95)
LOG_START = 1_700_006_400.0  # an hour boundary: the log's hours are the simulation's


def run_events(traffic: Traffic, scenario: Scenario, run: int) -> list[dict[str, Any]]:
    """One simulated run as the event log ``loopbot replay`` reads: the same served verdicts
    (with their confidence bands and, on voted ones, the other prompt's label), new users,
    votes and 👍/👎 hour by hour, so the replay
    aggregates back exactly to what the simulation handed the engine. Only for scenarios
    whose every vote comes from a voter of its own (no user population, groups or viral
    copies: their vote-level structure is not kept by the simulation)."""
    if scenario.users or scenario.group_bursts or scenario.viral_bursts:
        raise ValueError(f"{scenario.name}: its votes are not simulated one by one; write "
                         "logs of scenarios without users, groups or viral copies")
    data = traffic.arrays
    assert data.bands is not None
    events: list[dict[str, Any]] = []
    run_key = str(run)
    previous = None
    for hour in range(HOURS):
        share = float(data.planned_share[run, hour])
        if share != previous:
            events.append({"kind": "share", "run": run_key, "at": LOG_START + hour * 3600.0,
                           "share": share})
            previous = share
    ids = _Ids()
    for hour in range(HOURS):
        for arm, suffix in (("active", "a"), ("candidate", "b")):
            events += _hour_events(data, run, hour, arm, suffix, ids)
    return events


class _Ids:
    """Fresh ids, and the users seen so far (returning users are drawn from them)."""

    def __init__(self) -> None:
        self.next = 0
        self.seen: list[int] = []

    def new(self) -> int:
        self.next += 1
        return self.next

    def returning(self) -> int:
        user = self.seen[self.next % len(self.seen)]
        self.next += 1
        return user


def _hour_events(data: ExperimentArrays, run: int, hour: int, arm: str, suffix: str,
                 ids: _Ids) -> list[dict[str, Any]]:
    bands = data.bands
    assert bands is not None
    served = getattr(bands, f"served_{suffix}")[run, hour]
    observed = getattr(bands, f"observed_{suffix}")[run, hour]
    correct = getattr(bands, f"correct_{suffix}")[run, hour]
    new_users = int(getattr(data, f"new_users_{suffix}")[run, hour])
    up = int(getattr(data, f"up_{suffix}")[run, hour])
    down = int(getattr(data, f"down_{suffix}")[run, hour])
    base = LOG_START + hour * 3600.0
    pairs = data.pairs
    # The paired comparison's counts of the hour, handed out to the hour's observations in
    # order: the first ones voted right get another label from the other prompt, the first
    # ones voted wrong the same label.
    right_differs = 0 if pairs is None else int(
        getattr(pairs, f"right_other_wrong_{suffix}")[run, hour])
    wrong_same = 0 if pairs is None else int(
        getattr(pairs, f"wrong_other_same_{suffix}")[run, hour])
    seen_right = seen_wrong = 0
    out: list[dict[str, Any]] = []
    verdicts: list[int] = []
    fresh: list[int] = []
    count = 0
    for band, (n, voted, right) in enumerate(zip(served.tolist(), observed.tolist(),
                                                 correct.tolist(), strict=True)):
        for k in range(n):
            interaction = ids.new()
            if count < new_users:
                user = ids.new()
                fresh.append(user)
            else:
                user = ids.returning() if ids.seen else fresh[count % len(fresh)]
            at = base + 1.0 + count * 0.5 + (0.25 if suffix == "b" else 0.0)
            count += 1
            verdicts.append(interaction)
            verdict = {"kind": "verdict", "run": str(run), "at": at, "arm": arm,
                       "interaction": interaction, "user": user, "text": f"t{interaction}",
                       "label": "positive", "confidence": BAND_CONFIDENCE[band]}
            out.append(verdict)
            if k < voted:
                is_right = k < right
                if pairs is not None:
                    if is_right:
                        differs = seen_right < right_differs
                        seen_right += 1
                    else:
                        differs = seen_wrong >= wrong_same
                        seen_wrong += 1
                    verdict["other_label"] = "negative" if differs else "positive"
                    verdict["labels"] = 2
                out.append({"kind": "vote", "run": str(run), "at": at + 1800.0,
                            "interaction": interaction, "user": ids.new(),
                            "correct": is_right})
    ids.seen += fresh
    for i, polarity in enumerate([1] * up + [-1] * down):
        out.append({"kind": "reaction", "run": str(run), "at": base + 3000.0 + i * 0.1,
                    "interaction": verdicts[i % len(verdicts)] if verdicts else 0,
                    "user": ids.new(), "polarity": polarity})
    return out
