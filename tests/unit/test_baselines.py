"""The benchmark's anchors: GrowthBook's sequential test reproduces gbstats 0.8.0."""

from __future__ import annotations

import numpy as np
import pytest

from analytics.baselines import first_decision, growthbook_sequential, naive_z


def test_growthbook_golden_values() -> None:
    res = growthbook_sequential(1000, 800, 1000, 840)
    assert float(res.low) == pytest.approx(-0.0136, abs=5e-5)
    assert float(res.high) == pytest.approx(0.0936, abs=5e-5)
    assert float(res.p_value) == pytest.approx(0.2587, abs=5e-5)
    assert not res.better and not res.worse


# (n_a, x_a, n_b, x_b) → gbstats 0.8.0 SequentialTwoSidedTTest(ProportionStatistic, ...,
# SequentialConfig(difference_type="absolute")).compute_result(): ci and p_value, computed
# with gbstats in a throwaway numpy<2 environment.
GBSTATS = [
    ((1422, 1176, 1537, 1266), (-0.04609489138138542, 0.03945144930972952, 1.0)),
    ((774, 602, 1230, 1016), (-0.00936573249267953, 0.10584269726232726, 0.1515089249737682)),
    ((376, 291, 913, 739), (-0.046427927544738484, 0.11739457945217482, 0.8960425994477885)),
    ((882, 704, 352, 295), (-0.038048693148672805, 0.11781317469886847, 0.6809471282500896)),
    ((1000, 800, 1000, 840), (-0.013598078020757388, 0.09359807802075723, 0.25873717461381723)),
]


def test_growthbook_matches_gbstats_vectorised() -> None:
    counts = np.array([c for c, _ in GBSTATS])
    res = growthbook_sequential(*counts.T)
    expected = np.array([e for _, e in GBSTATS])
    np.testing.assert_allclose(res.low, expected[:, 0], rtol=1e-9)
    np.testing.assert_allclose(res.high, expected[:, 1], rtol=1e-9)
    np.testing.assert_allclose(res.p_value, expected[:, 2], rtol=1e-9)


def test_growthbook_gives_no_result_on_zero_variance() -> None:
    res = growthbook_sequential([10, 10], [10, 0], [10, 10], [5, 5])
    np.testing.assert_array_equal(res.p_value, 1.0)
    assert not res.better.any() and not res.worse.any()


def test_naive_z_test() -> None:
    res = naive_z(1000, 800, 1000, 840)
    # Pooled two-proportion z = 0.04 / sqrt(0.82 · 0.18 · 2 / 1000) = 2.328
    assert float(res.p_value) == pytest.approx(0.01990, abs=1e-4)
    assert bool(res.better) and not bool(res.worse)


def test_first_decision() -> None:
    better = np.array([[False, True, False], [False, False, False], [False, False, True]])
    worse = np.array([[True, False, False], [False, False, False], [False, False, False]])
    outcome, look = first_decision(better, worse)
    assert outcome.tolist() == [-1, 0, 1]
    assert look.tolist() == [0, -1, 2]
