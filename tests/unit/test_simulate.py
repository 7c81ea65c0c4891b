"""`loopbot simulate`: scenario definitions, JSON shape, and sanity of a small benchmark."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from analytics.decide import DecisionConfig
from analytics.simulate import HOURS, METHODS, SCENARIOS, simulate_arrays
from bot.cli import main as cli_main
from bot.simulate_cli import register

KEYS = {"false_promotion_rate", "false_rollback_rate", "power_plus5", "power_plus10",
        "rollback_power_minus5", "mean_votes_plus5", "mean_votes_plus10"}


def test_scenarios_follow_the_issue() -> None:
    assert set(SCENARIOS) == {"S1", "S2", "S3_up", "S3_down", "S5", "S1_clustered",
                              "S_group_votes", "S_viral", "S_propensity_right",
                              "S_propensity_wrong", "S_propensity_equal_rate", "S_novelty",
                              "S_1_vote_per_hour", "S_few_heavy_voters", "S_propensity_subtle"}
    # Equal overall vote rates at the base accuracy, selection that fakes +10 and +5 points.
    for name, fake in (("S_propensity_equal_rate", 0.10), ("S_propensity_subtle", 0.05)):
        sc = SCENARIOS[name]
        p = sc.base_accuracy
        rate = p * sc.propensity_right_b + (1 - p) * sc.propensity_wrong_b
        assert rate == pytest.approx(1.0)
        assert p * sc.propensity_right_b / rate - p == pytest.approx(fake)
    s3 = SCENARIOS["S3_up"].share()
    assert (s3[0], s3[24], s3[48], s3[-1]) == (0.10, 0.25, 0.50, 0.50)
    assert np.all(SCENARIOS["S5"].share() == 0.10)
    up, down = SCENARIOS["S3_up"].accuracy(), SCENARIOS["S3_down"].accuracy()
    hours = np.arange(HOURS)
    # Linear trend over the week (the daily wave leaks a little into the fit).
    assert np.polyfit(hours, up, 1)[0] * HOURS == pytest.approx(0.10, abs=0.015)
    assert np.polyfit(hours, down, 1)[0] * HOURS == pytest.approx(-0.10, abs=0.015)
    assert np.ptp(up[:24]) > 0.05  # plus a daily wave


@pytest.mark.parametrize("name", ["S1", "S2", "S1_clustered"])
def test_simulated_traffic_rates(name: str) -> None:
    rng = np.random.default_rng(0)
    data = simulate_arrays(SCENARIOS[name], 0.05, 40, rng, cap=10)
    data.validate()
    assert data.votes_a.shape == (40, HOURS)
    per_hour = (data.votes_a + data.votes_b).mean()
    assert per_hour == pytest.approx(SCENARIOS[name].votes_per_hour, rel=0.1)
    acc_a = data.correct_a.sum() / data.votes_a.sum()
    acc_b = data.correct_b.sum() / data.votes_b.sum()
    assert 0.03 < acc_b - acc_a < 0.07
    if name == "S1_clustered":
        assert data.design_effect[:, -1].mean() > 1.1  # users' biases really cluster votes
    else:
        # Independent voters: the estimate's small-sample factor C / (C − 1) only, → 1.
        assert np.all(data.design_effect >= 1.0)
        assert np.all(data.design_effect[:, -1] < 1.01)


def test_register_adds_the_subcommand() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", "--json", "--runs", "5", "--seed", "3",
                              "--scenarios", "S1", "S5"])
    assert args.json and args.runs == 5 and args.seed == 3 and args.scenarios == ["S1", "S5"]
    assert callable(args.func)


@pytest.mark.slow
def test_small_benchmark_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["simulate", "--json", "--runs", "30", "--seed", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"scenarios"}
    assert set(report["scenarios"]) == set(SCENARIOS)
    for methods in report["scenarios"].values():
        assert set(methods) == set(METHODS)
        for metrics in methods.values():
            assert set(metrics) == KEYS
            for key in KEYS - {"mean_votes_plus5", "mean_votes_plus10"}:
                assert 0.0 <= metrics[key] <= 1.0
    s1 = report["scenarios"]["S1"]
    # Sanity, not the acceptance figures (those need 1000 runs): a +10 point gain is found
    # by every method, and the engine promotes a no-difference candidate rarely.
    assert s1["engine"]["power_plus10"] >= 0.9
    assert s1["engine"]["false_promotion_rate"] <= 0.1
    assert s1["engine"]["mean_votes_plus10"] < s1["engine"]["mean_votes_plus5"]
    assert s1["naive"]["false_promotion_rate"] >= s1["engine"]["false_promotion_rate"]


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["simulate", "--runs", "0"]) == 2
    assert "--runs" in capsys.readouterr().err


def test_same_seed_same_report() -> None:
    from analytics.simulate import simulate

    cfg = DecisionConfig()
    a = simulate(8, seed=5, scenarios=["S2"], config=cfg)
    b = simulate(8, seed=5, scenarios=["S2"], config=cfg)
    assert a == b


def test_the_other_prompts_labels_are_drawn_apart_and_as_modelled() -> None:
    """The paired comparison's draws come from their own stream (adding them left every
    other simulated figure as it was) and follow the two prompts' joint correctness."""
    from analytics.simulate import simulate_traffic

    scenario = SCENARIOS["S1"]
    one = simulate_traffic(scenario, 0.10, 200, np.random.default_rng(5), 10, 3,
                           np.random.default_rng(1))
    two = simulate_traffic(scenario, 0.10, 200, np.random.default_rng(5), 10, 3,
                           np.random.default_rng(2))
    np.testing.assert_array_equal(one.arrays.votes_b, two.arrays.votes_b)
    np.testing.assert_array_equal(one.arrays.correct_a, two.arrays.correct_a)
    p1, p2 = one.arrays.pairs, two.arrays.pairs
    assert p1 is not None and p2 is not None and p1.two_labels
    assert not np.array_equal(p1.right_other_wrong_b, p2.right_other_wrong_b)
    # 80% vs 90%, disagreeing on 20% of texts: n10 = 5%, n01 = 15%, n00 = 5%.
    assert p1.right_other_wrong_a.sum() / p1.right_a.sum() == pytest.approx(0.05 / 0.8,
                                                                           rel=0.05)
    assert p1.right_other_wrong_b.sum() / p1.right_b.sum() == pytest.approx(0.15 / 0.9,
                                                                           rel=0.05)
    assert p1.wrong_other_same_a.sum() / p1.wrong_a.sum() == pytest.approx(0.05 / 0.2,
                                                                          rel=0.08)
    assert p1.wrong_other_same_b.sum() / p1.wrong_b.sum() == pytest.approx(0.05 / 0.1,
                                                                          rel=0.08)


@pytest.mark.slow
def test_a_candidate_only_voted_on_differently_is_not_promoted() -> None:
    """With the paired comparison, a selection that fakes +5 or +10 points among voters
    stays within the false-promotion budget; on the votes alone it would not."""
    from analytics.decide import PROMOTE, evaluate
    from analytics.simulate import simulate_traffic

    for name in ("S_propensity_subtle", "S_propensity_equal_rate"):
        traffic = simulate_traffic(SCENARIOS[name], 0.0, 1000, np.random.default_rng(11), 10,
                                   3, np.random.default_rng(12))
        action, _ = evaluate(traffic.arrays, DecisionConfig()).first_terminal()
        assert (action == PROMOTE).mean() <= 0.01, name
        votes_only = evaluate(traffic.arrays, DecisionConfig(paired_comparison=False))
        assert (votes_only.first_terminal()[0] == PROMOTE).mean() >= 0.04, name
