"""Fixed-sample statistics: intervals, Mantel–Haenszel, the vote cap, SRM, design effect."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from analytics.stats import (
    accuracy_summary,
    cap_vote_records,
    cap_votes_per_user_day,
    design_effect,
    exact_interval,
    mantel_haenszel,
    mantel_haenszel_running,
    srm_test,
    wilson_interval,
)


@pytest.mark.parametrize(("correct", "votes"), [(80, 100), (0, 12), (12, 12), (517, 600), (1, 3)])
def test_intervals_match_scipy(correct: int, votes: int) -> None:
    ci = sps.binomtest(correct, votes).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(correct, votes) == pytest.approx((ci.low, ci.high), abs=1e-9)
    ci = sps.binomtest(correct, votes).proportion_ci(confidence_level=0.95, method="exact")
    assert exact_interval(correct, votes) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_accuracy_summary_for_stats_view() -> None:
    empty = accuracy_summary(0, 0)
    assert empty.accuracy is None and (empty.low, empty.high) == (0.0, 1.0)
    small = accuracy_summary(10, 9)
    assert small.method == "exact" and small.low < 0.9 < small.high
    big = accuracy_summary(1000, 800)
    assert big.method == "wilson" and big.accuracy == 0.8
    assert (big.low, big.high) == pytest.approx((0.7740, 0.8237), abs=1e-3)
    with pytest.raises(ValueError):
        accuracy_summary(5, 6)


def test_mantel_haenszel_removes_simpson_confounding() -> None:
    # Hour 1: base 90%, candidate at 90% share; hour 2: base 50%, candidate at 10% share.
    # Within hours the arms are identical, but pooling makes the candidate look far better.
    n_a, x_a = np.array([100, 900]), np.array([90, 450])
    n_b, x_b = np.array([900, 100]), np.array([810, 50])
    pooled_diff = x_b.sum() / n_b.sum() - x_a.sum() / n_a.sum()
    assert pooled_diff > 0.3
    res = mantel_haenszel(n_a, x_a, n_b, x_b)
    assert abs(float(res.z)) < 1e-9
    assert float(res.odds_ratio) == pytest.approx(1.0)


def test_mantel_haenszel_single_stratum_is_hypergeometric_z() -> None:
    n_a, x_a, n_b, x_b = 40, 28, 60, 51
    res = mantel_haenszel([n_a], [x_a], [n_b], [x_b])
    dist = sps.hypergeom(n_a + n_b, x_a + x_b, n_b)
    assert float(res.z) == pytest.approx((x_b - dist.mean()) / dist.std())
    assert float(res.p_one_sided) == pytest.approx(sps.norm.sf(float(res.z)))


def test_mantel_haenszel_vectorised_and_running() -> None:
    rng = np.random.default_rng(0)
    n_a, n_b = rng.poisson(10, (5, 24)), rng.poisson(10, (5, 24))
    x_a, x_b = rng.binomial(n_a, 0.8), rng.binomial(n_b, 0.85)
    batch = mantel_haenszel(n_a, x_a, n_b, x_b)
    running = mantel_haenszel_running(n_a, x_a, n_b, x_b)
    assert batch.z.shape == (5,) and running.z.shape == (5, 24)
    np.testing.assert_allclose(running.z[:, -1], batch.z)
    one = mantel_haenszel(n_a[2, :10], x_a[2, :10], n_b[2, :10], x_b[2, :10])
    assert float(one.z) == pytest.approx(running.z[2, 9])


def test_vote_cap_keeps_first_votes_per_user_per_day() -> None:
    users = [1] * 15 + [2] * 3 + [1] * 4
    days = [0] * 15 + [0] * 3 + [1] * 4
    keep = cap_votes_per_user_day(users, days, cap=10)
    assert keep[:10].all() and not keep[10:15].any()
    assert keep[15:].all()  # user 2, and user 1 on the next day
    # Interleaved order: the cap follows time order, not grouping.
    keep = cap_votes_per_user_day([5, 6, 5, 6, 5], [0, 0, 0, 0, 0], cap=2)
    assert keep.tolist() == [True, True, True, True, False]
    assert cap_votes_per_user_day([1, 1], [0, 0], cap=0).all()
    assert cap_vote_records([("alice", 3), ("alice", 3), ("bob", 3)], cap=1) == [True, False, True]


def test_srm_fixed_sample_p_value() -> None:
    assert srm_test(500, 500, 0.5) == pytest.approx(1.0)
    assert srm_test(600, 400, 0.5) < 1e-9
    assert srm_test(900, 100, 0.1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        srm_test(1, 1, 1.0)


def test_design_effect() -> None:
    rng = np.random.default_rng(1)
    # One vote per user: independent votes, no inflation.
    ones = np.ones(2000)
    indep = design_effect(ones, rng.binomial(1, 0.8, 2000), ones, rng.binomial(1, 0.8, 2000))
    assert float(indep) == pytest.approx(1.0, abs=0.01)
    # 40 users per arm with 30 votes each and personal accuracy between 50% and 100%.
    votes = np.full(40, 30)
    p_a, p_b = rng.uniform(0.5, 1.0, 40), rng.uniform(0.5, 1.0, 40)
    clustered = design_effect(votes, rng.binomial(votes, p_a), votes, rng.binomial(votes, p_b))
    assert float(clustered) > 3.0
    # Vectorised over runs.
    assert design_effect(np.ones((3, 5)), np.ones((3, 5)), np.ones((3, 5)),
                         np.zeros((3, 5))).shape == (3,)
