"""The exact conditional e-process: unbiased per-stratum factors, validity, blocks, SRM."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from analytics.sequential import (
    PsiPrior,
    binomial_shift_log_evalue,
    block_strata,
    fisher_e_process,
    fisher_log_lr,
    fisher_log_lr_expectation,
    pooled_binomial_shift_log_evalue,
)


def test_per_hour_factor_has_expectation_one_under_no_difference() -> None:
    assert fisher_log_lr_expectation(7, 5, 9, math.log(1.8)) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(3)
    for _ in range(20):
        n_a, n_b = (int(v) for v in rng.integers(1, 40, 2))
        s = int(rng.integers(0, n_a + n_b + 1))
        log_psi = float(rng.normal(0, 1))
        assert fisher_log_lr_expectation(n_a, n_b, s, log_psi) == pytest.approx(1.0, abs=1e-9)


def test_factor_is_noncentral_hypergeometric_likelihood_ratio() -> None:
    n_a, n_b, s, psi = 12, 9, 14, 2.3
    for x_b in range(max(0, s - n_a), min(n_b, s) + 1):
        lr = math.exp(float(fisher_log_lr(n_a, s - x_b, n_b, x_b, [math.log(psi)])[0]))
        alt = sps.nchypergeom_fisher(n_a + n_b, n_b, s, psi).pmf(x_b)
        null = sps.hypergeom(n_a + n_b, n_b, s).pmf(x_b)
        assert lr == pytest.approx(alt / null, rel=1e-9)


def test_uninformative_strata_have_factor_one() -> None:
    out = fisher_log_lr([0, 5, 5, 4], [0, 5, 0, 2], [7, 0, 6, 3], [3, 0, 0, 1], [0.5, -0.5])
    assert out.shape == (4, 2)
    np.testing.assert_array_equal(out[:3], 0.0)  # one arm empty; all correct; none correct
    assert np.all(out[3] != 0.0)


def test_e_process_is_symmetric_and_detects_effects() -> None:
    prior = PsiPrior()
    rng = np.random.default_rng(5)
    n_a, n_b = rng.poisson(10, (1, 100)), rng.poisson(10, (1, 100))
    x_a, x_b = rng.binomial(n_a, 0.7), rng.binomial(n_b, 0.9)
    fwd = fisher_e_process(n_a, x_a, n_b, x_b, prior)
    rev = fisher_e_process(n_b, x_b, n_a, x_a, prior)
    np.testing.assert_allclose(fwd.log_e_plus, rev.log_e_minus)
    assert fwd.log_e_plus[0, -1] > math.log(1e4)
    assert fwd.log_e_minus[0, -1] < 0


def test_e_process_valid_under_ramp_and_drift() -> None:
    # Share ramps 10% → 50% while base accuracy climbs 60% → 95%: pooled tests are fooled,
    # the stratified e-process must cross 1/α in at most ~α of runs.
    rng = np.random.default_rng(7)
    runs, hours = 2000, 96
    share = np.where(np.arange(hours) < 48, 0.1, 0.5)
    base = np.linspace(0.6, 0.95, hours)
    n = rng.poisson(20, (runs, hours))
    n_b = rng.binomial(n, share)
    n_a = n - n_b
    x_a, x_b = rng.binomial(n_a, base), rng.binomial(n_b, base)
    e = fisher_e_process(n_a, x_a, n_b, x_b, PsiPrior())
    crossed = (e.log_e_plus.max(axis=1) >= math.log(20)).mean()
    assert crossed <= 0.05
    pooled = x_b.sum(1) / n_b.sum(1) - x_a.sum(1) / n_a.sum(1)
    assert pooled.mean() > 0.03  # the confounding this test is about is really there


def test_design_effect_tempering_never_exceeds_untempered() -> None:
    rng = np.random.default_rng(9)
    n_a, n_b = rng.poisson(10, (50, 60)), rng.poisson(10, (50, 60))
    x_a, x_b = rng.binomial(n_a, 0.75), rng.binomial(n_b, 0.8)
    raw = fisher_e_process(n_a, x_a, n_b, x_b, PsiPrior())
    tempered = fisher_e_process(n_a, x_a, n_b, x_b, PsiPrior(),
                                design_effect=rng.uniform(1, 3, (50, 60)))
    assert np.all(tempered.log_e_plus <= np.maximum(0.0, raw.log_e_plus) + 1e-12)
    assert np.all(tempered.log_e_minus <= np.maximum(0.0, raw.log_e_minus) + 1e-12)


def test_binomial_shift_detects_broken_split_and_not_a_fair_one() -> None:
    rng = np.random.default_rng(11)
    trials = rng.poisson(30, (500, 100))
    fair = binomial_shift_log_evalue(rng.binomial(trials, 0.5), trials, 0.5, PsiPrior(0.2))
    assert (fair.max(axis=1) >= math.log(100)).mean() <= 0.01
    broken = binomial_shift_log_evalue(rng.binomial(trials[:5], 0.4), trials[:5], 0.5,
                                       PsiPrior(0.2))
    assert np.all(broken[:, -1] >= math.log(1000))
    # Undefined nulls (no trials, p outside (0, 1)) contribute nothing.
    assert binomial_shift_log_evalue([[3]], [[0 + 3]], [[1.0]], PsiPrior())[0, 0] == 0.0


def test_pooled_binomial_shift_is_an_e_process_that_pools_a_common_shift() -> None:
    rng = np.random.default_rng(12)
    null_p = np.array([0.3, 0.5, 0.7])[None, :, None]
    trials = rng.poisson(10, (2000, 3, 80))
    fair = pooled_binomial_shift_log_evalue(rng.binomial(trials, null_p), trials, null_p,
                                            PsiPrior(0.2))
    # Ville: P(ever E ≥ 20) ≤ 1/20 under the null, each group at its own share.
    assert (fair.max(axis=1) >= math.log(20)).mean() <= 0.05
    # One group alone is the ordinary test.
    one = trials[:3, :1]
    hits = rng.binomial(one, 0.5)
    assert np.allclose(pooled_binomial_shift_log_evalue(hits, one, 0.5, PsiPrior(0.2)),
                       binomial_shift_log_evalue(hits[:, 0], one[:, 0], 0.5, PsiPrior(0.2)))
    # A shift common to the groups: pooled beats the product of the groups' own e-values.
    shifted_p = 1 / (1 + (1 - null_p) / null_p * math.exp(-0.3))
    x = rng.binomial(trials[:200], shifted_p)
    pooled = pooled_binomial_shift_log_evalue(x, trials[:200], null_p, PsiPrior(0.2))
    separate = binomial_shift_log_evalue(x, trials[:200], null_p, PsiPrior(0.2)).sum(axis=1)
    assert np.median(pooled[:, -1] - separate[:, -1]) > 0


def test_blocks_are_hours_when_votes_are_plentiful() -> None:
    va = np.array([[5, 6, 7]])
    b = block_strata({"va": va, "vb": va + 1}, np.full((1, 3), 0.5), ("va", "vb"), 3, 6)
    np.testing.assert_array_equal(b.closed["va"][:, 1::2], va)
    np.testing.assert_array_equal(b.closed["va"][:, 0::2], 0)
    np.testing.assert_array_equal(b.open["va"], 0)


def test_blocks_merge_sparse_hours_but_never_across_a_share_change() -> None:
    va = np.array([[1, 1, 1, 1, 0, 2]])
    vb = np.array([[0, 2, 1, 1, 0, 1]])
    share = np.array([[0.1, 0.1, 0.1, 0.5, 0.5, 0.5]])
    b = block_strata({"va": va, "vb": vb}, share, ("va", "vb"), 3, 6)
    # At 10% the minority arm expects 3 votes only after 30 in total: hours 0-2 stay open
    # until the share changes, then close on their own in the even slot of look 3.
    assert b.closed["va"][0, 6] == 3 and b.closed["vb"][0, 6] == 3
    assert b.closed["va"][0, 7] == 0
    # At 50% a block needs 6 votes in total: hours 3-5 only have 5, so they remain open.
    assert b.closed["va"][0, 7:].sum() == 0
    assert (b.open["va"][0, -1], b.open["vb"][0, -1]) == (3, 2)
    for key, arr in (("va", va), ("vb", vb)):
        assert b.closed[key].sum() + b.open[key][0, -1] == arr.sum()
    # max_hours closes a block whatever the votes.
    b3 = block_strata({"va": va, "vb": vb}, np.full((1, 6), 0.5), ("va", "vb"), 100, 2)
    np.testing.assert_array_equal(b3.closed["va"][0, 1::2], [0, 2, 0, 2, 0, 2])


def test_blocked_e_process_valid_with_a_sparse_arm_and_drift() -> None:
    # 10% canary, base accuracy climbing 60% → 95%: blocks span a few hours each, and the
    # closing rule must not hand the canary the later (better) hours of its blocks.
    rng = np.random.default_rng(13)
    runs, hours = 2000, 96
    base = np.linspace(0.6, 0.95, hours)
    n = rng.poisson(20, (runs, hours))
    n_b = rng.binomial(n, 0.1)
    n_a = n - n_b
    x_a, x_b = rng.binomial(n_a, base), rng.binomial(n_b, base)
    b = block_strata({"va": n_a, "xa": x_a, "vb": n_b, "xb": x_b}, 0.1, ("va", "vb"), 3, 6)
    assert 0 < (b.closed["vb"][:, 1::2] > 0).mean() < 0.7  # blocks really merge hours
    c = b.closed
    e = fisher_e_process(c["va"], c["xa"], c["vb"], c["xb"], PsiPrior())
    assert (e.log_e_plus.max(axis=1) >= math.log(20)).mean() <= 0.05
    assert (e.log_e_minus.max(axis=1) >= math.log(20)).mean() <= 0.05
