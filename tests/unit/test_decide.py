"""The decision policy: each rule fires on the data it is about, and decide() = evaluate()."""

from __future__ import annotations

import dataclasses
import math
import typing

import numpy as np
import pytest

from analytics.decide import (
    ACTIONS,
    PROMOTE,
    Decision,
    DecisionConfig,
    DecisionStats,
    ExperimentSnapshot,
    HourStats,
    decide,
    evaluate,
    scorers_differ,
    snapshot_arrays,
)
from bot.texts.decisions import next_step, reason

START = 500_000  # an absolute hour index, as the store would use


def hours_of(
    n_hours: int,
    correct_a: typing.Callable[[int], int] | int = 8,
    correct_b: typing.Callable[[int], int] | int = 8,
    votes: int = 10,
    share: float = 0.5,
    **extra: typing.Callable[[int], float] | float,
) -> list[HourStats]:
    """Deterministic hourly strata: ``votes`` per arm, verdicts and new users split evenly."""
    def val(v: typing.Callable[[int], typing.Any] | typing.Any, h: int) -> typing.Any:
        return v(h) if callable(v) else v

    rows = []
    for h in range(n_hours):
        served_b = round(60 * share)
        fields: dict[str, typing.Any] = {
            "votes_a": votes, "correct_a": val(correct_a, h), "votes_b": votes,
            "correct_b": val(correct_b, h), "served_a": 60 - served_b, "served_b": served_b,
            "new_users_a": 20 - round(20 * share), "new_users_b": round(20 * share),
            "planned_share": share, "up_a": 4, "down_a": 1, "up_b": 4, "down_b": 1,
            "latency_n_a": 30, "latency_sum_a": 36.0, "latency_n_b": 30, "latency_sum_b": 36.0,
        }
        fields.update({k: val(v, h) for k, v in extra.items()})
        rows.append(HourStats(hour=START + h, **fields))
    return rows


def snap(rows: list[HourStats], n_hours: int | None = None, share: float = 0.5,
         **kw: typing.Any) -> ExperimentSnapshot:
    return ExperimentSnapshot(
        active_id="v1-zh", candidate_id="v2-zh", planned_share=share, start_hour=START,
        now_hour=START + (len(rows) if n_hours is None else n_hours), strata=rows, **kw)


CFG = DecisionConfig()


def why(decision: Decision, snapshot: ExperimentSnapshot) -> str:
    """What the admins read about the decision (written from its rule and numbers)."""
    return reason(decision, snapshot, CFG)


def stats_of(decision: Decision) -> DecisionStats:
    assert decision.stats is not None
    return decision.stats


def test_config_defaults_validate_and_use_yaml_friendly_types() -> None:
    CFG.validate()
    allowed = {int, float, str, bool}
    for f in dataclasses.fields(DecisionConfig):
        tp = typing.get_type_hints(DecisionConfig)[f.name]
        assert tp in allowed or (typing.get_origin(tp) is list
                                 and typing.get_args(tp)[0] in allowed), f.name
    assert CFG.interval_minutes == 60.0
    assert CFG.horizon_z() == pytest.approx(2.409, abs=1e-3)  # the remaining 0.8%


@pytest.mark.parametrize("change", [
    {"alpha_promote_sequential": 0.02},
    {"alpha_revert": 1.5},
    {"interval_minutes": 0},
    {"ramp_shares": [0.1], "ramp_after_hours": [0.0, 6.0]},
    {"ramp_after_hours": [6.0, 0.0]},
    {"prior_grid_min": 2.0},
    {"min_votes_per_arm": 0},
])
def test_config_rejects_nonsense(change: dict[str, typing.Any]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(CFG, **change).validate()


def test_promotes_a_clearly_better_candidate() -> None:
    d_snap = snap(hours_of(36, correct_a=7, correct_b=9))
    d = decide(d_snap, CFG)
    assert d.action == "promote" and d.rule == "evidence_better"
    assert stats_of(d).e_plus >= stats_of(d).promote_threshold == pytest.approx(
        1 / CFG.alpha_promote_sequential)
    assert stats_of(d).votes_a == stats_of(d).votes_b == 360
    assert "E⁺" in why(d, d_snap) and "90.0%" in why(d, d_snap) and "70.0%" in why(d, d_snap)


def test_reverts_a_clearly_worse_candidate_once_the_bands_could_tell() -> None:
    # Before min_revert_hours the deficit among voters could still be who votes: held.
    early = decide(snap(hours_of(int(CFG.min_revert_hours) - 1, correct_a=9, correct_b=7)), CFG)
    assert early.action == "hold"
    assert stats_of(early).e_minus >= stats_of(early).revert_threshold
    d_snap = snap(hours_of(int(CFG.min_revert_hours), correct_a=9, correct_b=7))
    d = decide(d_snap, CFG)
    assert d.action == "revert" and d.rule == "evidence_worse"
    assert stats_of(d).e_minus >= stats_of(d).revert_threshold


def test_promotion_waits_for_minimum_votes_per_arm() -> None:
    d_snap = snap(hours_of(36, correct_a=0, correct_b=2, votes=2))
    d = decide(d_snap, CFG)
    assert stats_of(d).e_plus >= stats_of(d).promote_threshold
    assert d.action == "hold" and d.rule == "min_votes"


def test_horizon_retires_without_difference_and_mh_can_promote() -> None:
    flat_snap = snap(hours_of(168))
    flat = decide(flat_snap, CFG)
    assert flat.action == "retire" and flat.rule == "horizon_retire"
    assert "retiring v2-zh" in why(flat, flat_snap)
    # A small consistent gain: not enough for the e-process, enough for MH at the horizon.
    rows = hours_of(168, correct_b=lambda h: 8 + (h % 25 < 9))
    d_snap = snap(rows)
    d = decide(d_snap, CFG)
    assert stats_of(d).e_plus < stats_of(d).promote_threshold
    assert d.action == "promote" and d.rule == "horizon_mh"
    assert stats_of(d).mh_z >= stats_of(d).horizon_z
    # The same data one day earlier: still collecting.
    assert decide(snap(rows[:144]), CFG).action == "hold"


def test_broken_split_freezes_the_test() -> None:
    rows = hours_of(24, new_users_a=14, new_users_b=6)
    d_snap = snap(rows)
    d = decide(d_snap, CFG)
    assert d.action == "freeze" and d.rule == "srm"
    assert "sample-ratio" in why(d, d_snap) and stats_of(d).srm_e >= 1000


GGUF = "gguf:qwen2.5-0.5b-instruct-q8_0.gguf:1a2b3c4d5e6f7a8b"
REMOTE = "remote:qwen2.5-7b-instruct"


@pytest.mark.parametrize(("scorers_a", "scorers_b"), [
    ({GGUF: 240}, {REMOTE: 240}),  # each arm scored by another model
    ({GGUF: 120, REMOTE: 120}, {GGUF: 240}),  # one arm mixes two
    ({"unrecorded": 120, REMOTE: 120}, {"unrecorded": 120, REMOTE: 120}),  # a test across
    # the upgrade that moved verdicts to a server: legacy (in-process) rows and remote ones
])
@pytest.mark.parametrize(("correct_a", "correct_b", "otherwise"),
                         [(7, 9, "promote"), (9, 7, "revert")])
def test_arms_scored_by_different_scorers_are_held_not_decided(
        scorers_a: dict[str, int], scorers_b: dict[str, int], correct_a: int, correct_b: int,
        otherwise: str) -> None:
    # Old enough for either decision (a revert waits min_revert_hours).
    rows = hours_of(int(CFG.min_revert_hours), correct_a=correct_a, correct_b=correct_b)
    same = decide(snap(rows, scorers_a={GGUF: 360}, scorers_b={GGUF: 360}), CFG)
    assert same.action == otherwise  # one scorer in both arms: decided as before
    assert same == decide(snap(rows), CFG)
    d_snap = snap(rows, scorers_a=scorers_a, scorers_b=scorers_b)
    d = decide(d_snap, CFG)
    assert (d.action, d.rule, d.new_share, d.restart) == ("hold", "scorer_mismatch", None,
                                                         False)
    assert d.stats == same.stats  # the numbers are still shown, only not acted on
    text = why(d, d_snap)
    for name in {*scorers_a, *scorers_b}:
        assert name in text
    assert "not comparable" in text and "neither promoted nor reverted" in text
    assert "/retire v2-zh and /canary v2-zh <percent> to start a fresh test" in text
    assert next_step(d, text).startswith("holding: the arms were not scored by the same")


def test_the_admins_read_which_scorer_scored_each_arm() -> None:
    d_snap = snap(hours_of(24, correct_a=7, correct_b=9), scorers_a={GGUF: 240},
                  scorers_b={REMOTE: 200, GGUF: 40})
    assert why(decide(d_snap, CFG), d_snap) == (
        f"the arms were not scored by the same scorer: v1-zh's 240 verdicts with feedback "
        f"were scored by {GGUF}; v2-zh's 240 verdicts with feedback were scored by "
        f"{REMOTE} (200) and {GGUF} (40). Verdict probabilities from different scorers "
        "(model files or inference servers) are not comparable, so the test is held: "
        "neither promoted nor reverted. Make every verdict come from one scorer (the same "
        "model file in every process, the same model on every inference server), then "
        "/retire v2-zh and /canary v2-zh <percent> to start a fresh test")


def test_scorers_differ_only_on_verdicts_counted() -> None:
    assert not scorers_differ({}, {})  # not known (the simulation, a replay)
    assert not scorers_differ({GGUF: 5}, {})  # one arm has no verdict with feedback yet
    assert not scorers_differ({GGUF: 5, REMOTE: 0}, {GGUF: 1})
    assert not scorers_differ({"unrecorded": 5}, {"unrecorded": 9})  # all legacy rows
    assert scorers_differ({GGUF: 5, REMOTE: 1}, {})
    assert scorers_differ({GGUF: 5}, {REMOTE: 5})
    # Legacy rows were scored in process: they match the one in-process scorer...
    assert not scorers_differ({"unrecorded": 5}, {GGUF: 5})
    assert not scorers_differ({"unrecorded": 5, GGUF: 3}, {GGUF: 5})
    # ...but not a server, nor two different model files.
    assert scorers_differ({"unrecorded": 5}, {REMOTE: 5})
    assert scorers_differ({"unrecorded": 5, GGUF: 3}, {"gguf:other.gguf:00": 5})


def test_a_broken_split_still_freezes_whatever_scored_the_arms() -> None:
    d_snap = snap(hours_of(24, new_users_a=14, new_users_b=6), scorers_a={GGUF: 240},
                  scorers_b={REMOTE: 240})
    d = decide(d_snap, CFG)
    assert d.action == "freeze" and d.rule == "srm"


def test_edited_candidate_restarts() -> None:
    d_snap = snap(hours_of(24, correct_a=7, correct_b=9), content_changed=True)
    d = decide(d_snap, CFG)
    assert d.restart and d.action == "hold" and d.rule == "restart"


SMOKE = {"votes_a": 18, "correct_a": 14, "votes_b": 2, "correct_b": 2}


def test_ramps_after_the_smoke_period() -> None:
    rows = hours_of(5, share=0.1, **SMOKE)
    assert decide(snap(rows, share=0.1), CFG).action == "hold"
    d_snap = snap(hours_of(6, share=0.1, **SMOKE), share=0.1)
    d = decide(d_snap, CFG)
    assert d.action == "ramp" and d.new_share == 0.5
    assert "10.0%" in why(d, d_snap) and "50.0%" in why(d, d_snap)
    # Already at 50%: nothing to do.
    assert decide(snap(hours_of(8)), CFG).action == "hold"


def test_concurrent_candidates_split_budget_and_traffic() -> None:
    d_snap = snap(hours_of(7, share=0.1, **SMOKE), share=0.1, concurrent_candidates=2)
    d = decide(d_snap, CFG)
    assert d.action == "ramp" and d.new_share == pytest.approx(1 / 3)
    assert stats_of(d).promote_threshold == pytest.approx(2 / CFG.alpha_promote_sequential)
    assert stats_of(d).revert_threshold == pytest.approx(2 / CFG.alpha_revert_sequential)


def test_stale_data_holds() -> None:
    rows = hours_of(30) + [HourStats(hour=START + 30 + i, served_a=30, served_b=30,
                                     planned_share=0.5) for i in range(6)]
    d_snap = snap(rows)
    d = decide(d_snap, CFG)
    assert d.action == "hold" and d.rule == "stale"


def test_more_thumbs_down_reverts() -> None:
    rows = hours_of(72, up_a=8, down_a=2, up_b=4, down_b=6)
    d_snap = snap(rows)
    d = decide(d_snap, CFG)
    assert d.action == "revert" and d.rule == "reactions"
    assert stats_of(d).down_ratio == pytest.approx(3.0)


def test_thumbs_down_on_the_candidate_only_reverts() -> None:
    # Not one 👎 on the active version's replies: the candidate's are infinitely worse.
    d_snap = snap(hours_of(72, up_a=10, down_a=0, up_b=4, down_b=6))
    d = decide(d_snap, CFG)
    assert d.action == "revert" and d.rule == "reactions"
    assert stats_of(d).down_ratio == math.inf
    assert "while the active version's replies got none" in why(d, d_snap)


def test_no_thumbs_down_anywhere_is_no_reason_to_revert() -> None:
    d_snap = snap(hours_of(72, up_a=10, down_a=0, up_b=10, down_b=0))
    d = decide(d_snap, CFG)
    assert d.rule != "reactions"


def test_a_ramp_stops_where_routing_has_no_room() -> None:
    rows = hours_of(7, share=0.1, **SMOKE)
    assert decide(dataclasses.replace(snap(rows, share=0.1), max_share=0.3), CFG).new_share == (
        pytest.approx(0.3))
    held = decide(dataclasses.replace(snap(rows, share=0.1), max_share=0.1), CFG)
    assert held.action == "hold" and held.new_share is None


def test_slower_candidate_reverts() -> None:
    d_snap = snap(hours_of(3, latency_sum_b=80.0))
    d = decide(d_snap, CFG)
    assert d.action == "revert" and d.rule == "latency"
    assert "2.22× slower" in why(d, d_snap)


def test_vote_rate_disparity_freezes_the_test() -> None:
    # Same verdicts served, but the candidate's verdicts are voted on 5× less often: who
    # votes differs too much to trust accuracy among voters, in either direction.
    rows = hours_of(48, correct_a=14, correct_b=4, votes=4)
    rows = [dataclasses.replace(r, votes_a=20, correct_a=14) for r in rows]
    d_snap = snap(rows)
    d = decide(d_snap, CFG)
    assert d.action == "freeze" and d.rule == "propensity"
    assert stats_of(d).vote_rate_ratio == pytest.approx(0.2)
    assert stats_of(d).propensity_bias >= CFG.propensity_tolerance
    text = why(d, d_snap)
    assert "vote" in text and "0.20×" in text and "points" in text


def test_partial_and_foreign_hours_are_ignored() -> None:
    rows = hours_of(24, correct_a=7, correct_b=9)
    extra = HourStats(hour=START + 24, votes_a=100, correct_a=100, votes_b=100, correct_b=0,
                      planned_share=0.5)
    early = HourStats(hour=START - 5, votes_a=100, correct_a=100, planned_share=0.5)
    assert decide(snap([*rows, extra, early], n_hours=24), CFG) == decide(snap(rows), CFG)


def test_no_completed_hour_holds() -> None:
    d_snap = snap([], n_hours=0)
    d = decide(d_snap, CFG)
    assert d.action == "hold" and d.rule == "collecting"


def test_decide_is_the_vectorised_engine_at_the_last_look() -> None:
    # The simulation calls evaluate(); the bot calls decide(): same decision at every hour.
    rng = np.random.default_rng(4)
    rows = [HourStats(hour=START + h, votes_a=int(va), correct_a=int(rng.binomial(va, 0.75)),
                      votes_b=int(vb), correct_b=int(rng.binomial(vb, 0.9)),
                      served_a=30, served_b=30, new_users_a=10, new_users_b=10,
                      planned_share=0.5)
            for h, (va, vb) in enumerate(rng.poisson(4, (60, 2)))]
    arrays, _ = snapshot_arrays(snap(rows))
    traj = evaluate(arrays, CFG)
    seen = set()
    for t in range(60):
        d_snap = snap(rows[: t + 1])
        d = decide(d_snap, CFG)
        assert d.action == ACTIONS[traj.action[0, t]]
        assert math.log(stats_of(d).e_plus) == pytest.approx(traj.log_e_plus[0, t])
        seen.add(d.action)
    assert "promote" in seen  # the comparison covered a decision, not only holds


def test_describe_next_step() -> None:
    hold_snap = snap(hours_of(10))
    hold = decide(hold_snap, CFG)
    text = next_step(hold, why(hold, hold_snap))
    assert text.startswith("holding: promotion needs") and "h until the horizon" in text
    promote_snap = snap(hours_of(36, correct_a=7, correct_b=9))
    promote = decide(promote_snap, CFG)
    assert next_step(promote, why(promote, promote_snap)).startswith("promote:")


def test_no_promotion_before_a_full_day_nor_on_the_first_day_alone() -> None:
    # Overwhelming evidence in the first 23 h: still collecting (a novelty cannot be told
    # from a lasting gain before a day-night cycle has passed) ...
    early = decide(snap(hours_of(23, correct_a=6, correct_b=10)), CFG)
    assert stats_of(early).e_plus >= stats_of(early).promote_threshold
    assert early.action == "hold" and early.rule == "collecting"
    # ... and when the gain is gone after the first day, E⁺ built up then is not acted on.
    rows = hours_of(36, correct_a=6, correct_b=lambda h: 10 if h < 24 else 6)
    d_snap = snap(rows)
    faded = decide(d_snap, CFG)
    assert stats_of(faded).e_plus >= stats_of(faded).promote_threshold
    assert faded.action == "hold" and faded.rule == "fading"
    assert stats_of(faded).settled_z == 0.0
    assert stats_of(faded).settled_e < 1.0  # the bets placed on the first day's gain lost
    assert "the hours after the first 24 h alone give e = " in why(faded, d_snap)
    assert "(needs 10): holding, the advantage may have faded" in why(faded, d_snap)
    # The same gain lasting: promoted.
    assert decide(snap(hours_of(36, correct_a=6, correct_b=10)), CFG).action == "promote"


def test_the_horizon_test_needs_the_hours_after_the_first_day_too() -> None:
    # A first day so much better that the whole week still clears the horizon bar, and
    # nothing after it: the week's z is the first day's, so the candidate is retired.
    rows = hours_of(168, correct_a=lambda h: 6 if h < 24 else 8,
                    correct_b=lambda h: 10 if h < 24 else 8)
    d = decide(snap(rows), CFG)
    s = stats_of(d)
    assert s.mh_z >= s.horizon_z and s.settled_z == 0.0 < CFG.settled_min_z
    assert s.settled_e < CFG.settled_min_e
    assert d.action == "retire" and d.rule == "horizon_retire"
    assert "after the first 24 h alone give z = 0.00 (needs 1.645): the gain did not last" in (
        why(d, snap(rows)))


@pytest.mark.parametrize(("first_day_gain", "design_effects"),
                         [(0.0, (1.0, 1.0)), (0.15, (1.0, 1.0)), (0.15, (2.0, 1.2))])
def test_the_hours_after_the_first_day_have_an_e_process_of_their_own(
        first_day_gain: float, design_effects: tuple[float, float]) -> None:
    # However large the first day's advantage, the later hours' e-value is a test
    # martingale when they carry none: it reaches 10 in at most 10% of tests (Ville), so a
    # first-day-only advantage is promoted before the horizon at most that often. That holds
    # when the design effect falls after the first day too (the first day's evidence must
    # not be handed to the later hours as the tempering eases).
    from analytics.simulate import SCENARIOS, simulate_traffic
    scenario = dataclasses.replace(SCENARIOS["S_novelty"], novelty=first_day_gain,
                                   votes_per_hour=60.0)
    arrays = simulate_traffic(scenario, 0.0, 400, np.random.default_rng(3), 10).arrays
    first, later = design_effects
    hours = np.arange(arrays.shape[1])[None, :]
    arrays = dataclasses.replace(arrays, design_effect=np.broadcast_to(
        np.where(hours < 25, first, later), arrays.shape).astype(np.float64))
    traj = evaluate(arrays, CFG)
    reached = (traj.log_e_settled.max(axis=1) >= math.log(CFG.settled_min_e)).mean()
    assert reached <= 1 / CFG.settled_min_e
    if first_day_gain:
        # ... while E⁺ itself, carried by the first day, clears its bar in most of them.
        assert (traj.log_e_plus[:, 30] >= math.log(1 / CFG.alpha_promote_sequential)).mean() > 0.5


def test_a_lasting_gain_is_not_slowed_by_a_larger_first_day() -> None:
    # A real +5 after a +15-point first day: the later hours' evidence does not bet only on
    # the first day's size (half of it starts afresh), so it is promoted about as soon as
    # the same +5 without the first-day bonus.
    from analytics.simulate import SCENARIOS, simulate_traffic
    hours = []
    for bonus in (0.0, 0.15):
        scenario = dataclasses.replace(SCENARIOS["S_novelty"], novelty=bonus,
                                       votes_per_hour=60.0)
        arrays = simulate_traffic(scenario, 0.05, 300, np.random.default_rng(5), 10).arrays
        action, hour = evaluate(arrays, CFG).first_terminal()
        assert (action == PROMOTE).mean() > 0.95
        hours.append(float(np.median(hour[action == PROMOTE])))
    assert hours[1] <= hours[0] + 12


def test_a_gain_lasting_the_week_clears_the_later_hours_bar() -> None:
    from analytics.simulate import SCENARIOS, simulate_traffic
    lasting = simulate_traffic(SCENARIOS["S1"], 0.10, 200, np.random.default_rng(4), 10)
    settled = evaluate(lasting.arrays, CFG).log_e_settled
    assert (settled.max(axis=1) >= math.log(CFG.settled_min_e)).mean() > 0.95


def banded_hours(n_hours: int, arm_a: tuple[tuple[int, int, int], ...],
                 arm_b: tuple[tuple[int, int, int], ...]) -> list[HourStats]:
    """Hours with confidence bands: per arm and band (served, correct, wrong observations)."""
    rows = []
    for h in range(n_hours):
        fields: dict[str, typing.Any] = {}
        for suffix, arm in (("a", arm_a), ("b", arm_b)):
            served = tuple(n for n, _, _ in arm)
            correct = tuple(c for _, c, _ in arm)
            observed = tuple(c + w for _, c, w in arm)
            fields |= {f"served_{suffix}": sum(served), f"votes_{suffix}": sum(observed),
                       f"correct_{suffix}": sum(correct), f"bands_served_{suffix}": served,
                       f"bands_observed_{suffix}": observed,
                       f"bands_correct_{suffix}": correct,
                       f"new_users_{suffix}": 10, f"latency_n_{suffix}": 30,
                       f"latency_sum_{suffix}": 36.0}
        rows.append(HourStats(hour=START + h, planned_share=0.5, **fields))
    return rows


# 80 verdicts per band and hour, right in 50%, 75% and 87.5% of them; every verdict is voted
# on with probability 0.5 (30 and 10 votes, ...). The candidate's voters: right verdicts
# 0.6, wrong ones 0.3 (θ twice the active's), so its accuracy among voters is 12 points
# higher with the same accuracy and nearly the same vote rate.
EVEN = ((80, 20, 20), (80, 30, 10), (80, 35, 5))
PICKY = ((80, 24, 12), (80, 36, 6), (80, 42, 3))
# Truly better, voters alike: 204 of 246 verdicts right instead of 170 of 240, each right
# (wrong) verdict landing in the bands as the active's right (wrong) ones do, so more of its
# verdicts are served with high confidence; every verdict voted on at 0.5. Its votes are
# PICKY's: only the served verdicts' confidence tells a real gain from selection.
BETTER = ((72, 24, 12), (84, 36, 6), (90, 42, 3))
# Truly worse, voters alike: 136 of 296 right (the active's right verdicts × 0.8, its wrong
# ones × 2, landing in the bands alike), every verdict voted on at 0.5.
EVEN_WORSE = ((112, 16, 40), (88, 24, 20), (76, 28, 10))


def test_selection_by_correctness_holds_then_freezes_and_says_how_much() -> None:
    # Blind the vote-rate guard: only the selection estimate through the bands can tell.
    cfg = dataclasses.replace(CFG, propensity_tolerance=0.99, propensity_freeze_z=50.0)
    d_snap = snap(banded_hours(36, EVEN, PICKY))
    held = decide(d_snap, cfg)
    s = stats_of(held)
    assert s.accuracy_a is not None and s.accuracy_b is not None
    assert s.e_plus >= s.promote_threshold and s.accuracy_b - s.accuracy_a > 0.1
    assert held.action == "hold" and held.rule == "parity"
    assert s.propensity_ratio == pytest.approx(2.0, rel=0.05) and s.propensity_z >= 2.5
    text = reason(held, d_snap, cfg)
    assert "holding" in text and f"{s.propensity_ratio:.2f}× what it is for v1-zh" in text
    assert "right verdicts are voted on than its wrong ones" in text
    # At the horizon the test freezes rather than promote on biased evidence.
    end = decide(snap(banded_hours(168, EVEN, PICKY)), cfg)
    assert end.action == "freeze" and end.rule == "propensity"
    # Far beyond the freeze bar it freezes at once, with the numbers in the admins' text.
    d_snap = snap(banded_hours(36, EVEN, PICKY))
    frozen = decide(d_snap, dataclasses.replace(cfg, propensity_freeze_z=4.0))
    assert frozen.action == "freeze" and frozen.rule == "propensity"
    text = reason(frozen, d_snap, cfg)
    ratio = stats_of(frozen).propensity_ratio
    assert "vote behaviour differs" in text and f"ones is {ratio:.2f}×" in text
    assert f"z = {stats_of(frozen).propensity_z:.2f}" in text


def test_selection_by_correctness_holds_a_revert_it_could_fake() -> None:
    cfg = dataclasses.replace(CFG, propensity_tolerance=0.99, propensity_freeze_z=50.0)
    d_snap = snap(banded_hours(int(CFG.min_revert_hours), PICKY, EVEN))
    held = decide(d_snap, cfg)
    assert stats_of(held).e_minus >= stats_of(held).revert_threshold
    assert held.action == "hold" and held.rule == "parity"
    ratio = stats_of(held).propensity_ratio
    assert ratio == pytest.approx(0.5, rel=0.05)
    text = reason(held, d_snap, cfg)
    assert f"wrong verdicts are voted on than its right ones is {1 / ratio:.2f}×" in text


def test_a_real_gain_with_voters_alike_is_promoted() -> None:
    d = decide(snap(banded_hours(36, EVEN, BETTER)), CFG)
    assert d.action == "promote" and d.rule == "evidence_better"
    assert abs(stats_of(d).propensity_z) < 1


def test_a_revert_is_held_while_selection_accounts_for_the_deficit() -> None:
    # The z bars out of the way: only the share of the deficit selection accounts for holds.
    cfg = dataclasses.replace(CFG, propensity_tolerance=0.99, propensity_revert_hold_z=40.0,
                              propensity_freeze_z=50.0)
    d_snap = snap(banded_hours(int(CFG.min_revert_hours), PICKY, EVEN))
    held = decide(d_snap, cfg)
    s = stats_of(held)
    assert s.e_minus >= s.revert_threshold and abs(s.propensity_z) < 40
    assert held.action == "hold" and held.rule == "parity"
    share = math.log(s.propensity_ratio) / math.log(s.mh_odds_ratio)
    assert share >= cfg.propensity_share
    assert f"account for {100 * share:.0f}% of the difference among voters" in reason(
        held, d_snap, cfg)
    # The same deficit with voters alike on both arms is reverted.
    assert decide(snap(banded_hours(int(CFG.min_revert_hours), EVEN, EVEN_WORSE)),
                  cfg).action == "revert"


def test_the_line_fit_alone_keeps_its_own_hold_bar() -> None:
    # The combined estimate's bars out of the way: the line fit, which does not assume that
    # the arms share calibration, still holds the promotion selection could fake.
    cfg = dataclasses.replace(CFG, propensity_tolerance=0.99, propensity_hold_z=40.0,
                              propensity_freeze_z=50.0)
    d_snap = snap(banded_hours(36, EVEN, PICKY))
    held = decide(d_snap, cfg)
    assert held.action == "hold" and held.rule == "parity"
    unguarded = dataclasses.replace(cfg, propensity_line_hold_z=40.0)
    assert decide(d_snap, unguarded).action == "promote"


def test_a_real_gain_with_a_little_selection_is_promoted() -> None:
    # Five times EVEN's traffic per hour; the candidate is truly better (shared calibration,
    # 1020 of 1230 right against 850 of 1200) and its right verdicts are voted a little more
    # readily (0.6 against 0.5): selection is certain (z > 4) but accounts for a fifth of the
    # gain, so the selection guard lets it through.
    active = ((400, 100, 100), (400, 150, 50), (400, 175, 25))
    candidate = ((360, 144, 60), (420, 216, 30), (450, 252, 15))
    d_snap = snap(banded_hours(36, active, candidate))
    # The worst-case vote-rate guard does not know where the extra votes fall: rates 1.17×
    # could hide 2.8 points, above its 2-point tolerance, so by default it freezes the test.
    frozen = decide(d_snap, CFG)
    assert (frozen.action, frozen.rule) == ("freeze", "propensity")
    assert stats_of(frozen).propensity_bias > CFG.propensity_tolerance
    cfg = dataclasses.replace(CFG, propensity_tolerance=0.99)
    d = decide(d_snap, cfg)
    s = stats_of(d)
    assert s.propensity_z >= cfg.propensity_freeze_z
    assert math.log(s.propensity_ratio) < cfg.propensity_share * math.log(s.mh_odds_ratio)
    assert d.action == "promote" and d.rule == "evidence_better"
    # Were a tenth of the gain enough to matter, the same data would be frozen.
    strict = decide(d_snap, dataclasses.replace(cfg, propensity_share=0.1))
    assert (strict.action, strict.rule) == ("freeze", "propensity")


# The paired comparison: every voted verdict also scored by the other arm's prompt.
def paired_hours(n_hours: int, arm_a: tuple[tuple[int, int, int], ...],
                 arm_b: tuple[tuple[int, int, int], ...],
                 pairs: tuple[int, int, int, int, int, int, int, int]) -> list[HourStats]:
    """``banded_hours`` with the paired counts of every hour: per arm (voted right, of which
    the other prompt is wrong, voted wrong, of which the other prompt is wrong too)."""
    names = ("right_a", "right_other_wrong_a", "wrong_a", "wrong_other_same_a", "right_b",
             "right_other_wrong_b", "wrong_b", "wrong_other_same_b")
    extra: dict[str, typing.Any] = {f"paired_{name}": n
                                    for name, n in zip(names, pairs, strict=True)}
    return [dataclasses.replace(row, **extra) for row in banded_hours(n_hours, arm_a, arm_b)]


# EVEN vs PICKY (same true accuracy, the candidate's right verdicts voted 1.2×, its wrong
# ones 0.6× as often) when the two prompts disagree on 20% of the texts, half each way:
# among verdicts voted right the other prompt is wrong on 0.1 / 0.708 of them in both arms,
# among those voted wrong it is wrong too on 0.192 / 0.292.
SELECTED_PAIRS = (85, 12, 35, 23, 102, 14, 21, 14)
# BETTER vs EVEN with the voters alike: the candidate is right where the active prompt is
# wrong on 15% of the texts, the reverse on 5% (so both are wrong on 14.2%).
BETTER_PAIRS = (85, 6, 35, 17, 102, 19, 21, 16)
NO_BAND_GUARD = dataclasses.replace(CFG, propensity_tolerance=0.99, propensity_hold_z=50.0,
                                    propensity_line_hold_z=50.0, propensity_freeze_z=50.0)


def test_the_paired_comparison_is_not_fooled_by_who_votes() -> None:
    # The bands' guard blinded: the votes alone would promote a candidate that is only
    # voted on differently; on the same texts it does no better, so it is held.
    d_snap = snap(paired_hours(36, EVEN, PICKY, SELECTED_PAIRS), paired=True, two_labels=True)
    held = decide(d_snap, NO_BAND_GUARD)
    s = stats_of(held)
    assert s.e_plus >= s.promote_threshold  # what the votes alone say
    assert s.paired_e is not None and s.paired_e < 1
    assert held.action == "hold" and held.rule == "paired"
    # The paired counts measure who votes directly: 1.2× on right verdicts, 0.6× on wrong.
    assert s.paired_right_vote_ratio == pytest.approx(1.2, rel=0.03)
    assert s.paired_wrong_vote_ratio == pytest.approx(0.6, rel=0.05)
    text = reason(held, d_snap, NO_BAND_GUARD)
    assert "who votes may differ between the arms" in text and "holding" in text
    assert "right verdicts are voted on 1.21× as often as v1-zh's, its wrong ones 0.61×" in text
    # At the horizon the test freezes for a person to look, saying so.
    end_snap = snap(paired_hours(168, EVEN, PICKY, SELECTED_PAIRS), paired=True,
                    two_labels=True)
    end = decide(end_snap, NO_BAND_GUARD)
    assert end.action == "freeze" and end.rule == "paired"
    assert "test frozen" in reason(end, end_snap, NO_BAND_GUARD)
    # Without the paired comparison the same votes promote (the bands' guard is blinded).
    assert decide(snap(banded_hours(36, EVEN, PICKY)), NO_BAND_GUARD).action == "promote"


def test_a_real_gain_is_promoted_on_the_paired_comparison() -> None:
    d_snap = snap(paired_hours(36, EVEN, BETTER, BETTER_PAIRS), paired=True, two_labels=True)
    d = decide(d_snap, CFG)
    s = stats_of(d)
    assert d.action == "promote" and d.rule == "evidence_better"
    assert s.paired_e is not None and s.paired_e >= s.promote_threshold
    assert "paired E⁺" in reason(d, d_snap, CFG)
    # The votes must agree: the same pairs with the votes pointing the other way hold.
    flipped = snap(paired_hours(36, BETTER, EVEN, BETTER_PAIRS), paired=True, two_labels=True)
    held = decide(flipped, CFG)
    assert held.action != "promote" and stats_of(held).mh_z < 0


def test_two_labels_make_the_wrong_votes_evidence_too() -> None:
    # With more labels a verdict voted wrong has no known true label: only the votes that say
    # "correct" count, so the same data is weaker evidence.
    rows = paired_hours(12, EVEN, BETTER, BETTER_PAIRS)
    two = decide(snap(rows, paired=True, two_labels=True), CFG)
    more = decide(snap(rows, paired=True, two_labels=False), CFG)
    e_two, e_more = stats_of(two).paired_e, stats_of(more).paired_e
    assert e_two is not None and e_more is not None and e_two > e_more > 1


def test_the_paired_comparison_can_be_switched_off() -> None:
    rows = paired_hours(36, EVEN, PICKY, SELECTED_PAIRS)
    off = dataclasses.replace(NO_BAND_GUARD, paired_comparison=False)
    d = decide(snap(rows, paired=True, two_labels=True), off)
    assert d.action == "promote" and stats_of(d).paired_e is None
    arrays, _ = snapshot_arrays(snap(rows))
    assert arrays.pairs is None  # an unpaired snapshot carries no pairs at all


def test_paired_counts_are_checked() -> None:
    rows = paired_hours(3, EVEN, PICKY, (10, 11, 0, 0, 0, 0, 0, 0))
    arrays, _ = snapshot_arrays(snap(rows, paired=True))
    with pytest.raises(ValueError, match="right_other_wrong_a"):
        arrays.validate()


def test_a_paired_test_without_labels_holds_and_says_why() -> None:
    # The bot scores the voted texts before each analysis; none scored (the scoring keeps
    # failing) means no paired evidence: the votes alone do not promote, and the admins
    # read that the labels are missing.
    d_snap = snap(banded_hours(36, EVEN, BETTER), paired=True, two_labels=True)
    held = decide(d_snap, CFG)
    assert held.action == "hold" and held.rule == "paired"
    assert stats_of(held).paired_scored == 0
    text = reason(held, d_snap, CFG)
    assert "on 0 of" in text and "lack the other prompt's label" in text
    assert "who votes" not in text  # missing labels are not a difference in who votes


def test_stats_show_the_paired_comparison() -> None:
    from bot.texts.decisions import arm_lines

    d_snap = snap(paired_hours(10, EVEN, BETTER, BETTER_PAIRS), paired=True, two_labels=True)
    d = decide(d_snap, CFG)
    s = stats_of(d)
    assert s.paired_scored == 10 * (85 + 35 + 102 + 21)
    assert s.paired_disagreement == pytest.approx((6 + 19) / (85 + 102))
    line = arm_lines(d_snap, d)[-1]
    assert "2430 voted texts scored by both prompts" in line
    assert "the prompts disagree on 13.4% of the texts voted right" in line


def test_one_paired_table_equal_to_the_votes_is_the_accuracy_evidence() -> None:
    """The paired comparison runs the accuracy evidence's own machinery (strata, e-process,
    persistence, horizon z): fed the votes as its one table, it gives the same numbers."""
    from analytics.decide import PairedVotes, _accuracy_evidence, _paired_evidence
    from analytics.simulate import SCENARIOS, simulate_traffic

    traffic = simulate_traffic(SCENARIOS["S2"], 0.1, 30, np.random.default_rng(3), 10, 3,
                               np.random.default_rng(4))
    data = traffic.arrays
    none = np.zeros_like(data.votes_a)
    as_pairs = dataclasses.replace(data, pairs=PairedVotes(
        right_a=data.votes_a, right_other_wrong_a=data.correct_a, wrong_a=none,
        wrong_other_same_a=none, right_b=data.votes_b, right_other_wrong_b=data.correct_b,
        wrong_b=none, wrong_other_same_b=none, two_labels=False))
    deff = np.maximum(data.design_effect, 1.0)
    paired = _paired_evidence(as_pairs, CFG, deff)
    votes = _accuracy_evidence(data, CFG, deff)
    np.testing.assert_allclose(paired.log_e_plus, votes.log_e_plus)
    np.testing.assert_allclose(paired.z, votes.mh_z)
    np.testing.assert_allclose(paired.log_e_settled, votes.log_e_settled)
    np.testing.assert_allclose(paired.settled_z, votes.settled_z)


def test_a_view_ahead_of_the_other_before_the_horizon_does_not_stop_a_ramp() -> None:
    # Eight hours of a 10% smoke period whose votes already clear the horizon's z bar (a
    # fixed-time bar, read only at the horizon) while the paired comparison finds nothing:
    # not a disagreement yet, so the plan's ramp goes ahead.
    rows = [dataclasses.replace(row, planned_share=0.1, new_users_a=18, new_users_b=2)
            for row in paired_hours(8, EVEN, PICKY, SELECTED_PAIRS)]
    d = decide(snap(rows, share=0.1, paired=True, two_labels=True), NO_BAND_GUARD)
    assert stats_of(d).mh_z >= stats_of(d).horizon_z
    assert d.action == "ramp"
