"""The anchors the engine is benchmarked against, vectorised over runs and looks (pure).

- ``naive_z``: the two-proportion z-test at α = 0.05 (pooled standard error), re-run at every
  look on the votes pooled since the start: what a dashboard with a "significant" badge does.
- ``growthbook_sequential``: GrowthBook's sequential test (``gbstats`` 0.8.0,
  ``SequentialTwoSidedTTest`` on ``ProportionStatistic``s, absolute difference, α = 0.05,
  tuning N* = 5000): the asymptotic confidence sequence of Waudby-Smith et al. (eq. 9 for the
  interval, eq. 155 for the p-value), variance p̂(1 − p̂) per arm, no result when an arm has
  zero variance or the control's mean is 0. Reimplemented here because gbstats pins numpy<2 /
  pandas<2 and because its per-call objects would be far too slow for a million looks; the
  golden values (800/1000 vs 840/1000 → (−0.0136, 0.0936), p = 0.2587) are tested, and
  ``bot.gbstats_check`` compares every look of simulated runs with gbstats itself.
- ``first_decision(upper, lower)``: turns per-look "significantly better / worse" flags into
  the first terminal decision per run, as the simulation needs.

Inputs are cumulative counts with any shape (e.g. (runs, looks)); outputs have that shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class LookResult:
    """One method at every look: point estimate (b − a), interval, p-value, verdict flags."""

    estimate: FloatArray
    low: FloatArray
    high: FloatArray
    p_value: FloatArray
    better: BoolArray  # significant and b > a
    worse: BoolArray  # significant and b < a


def _as_float(*arrays: npt.ArrayLike) -> list[FloatArray]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def naive_z(
    votes_a: npt.ArrayLike,
    correct_a: npt.ArrayLike,
    votes_b: npt.ArrayLike,
    correct_b: npt.ArrayLike,
    alpha: float = 0.05,
) -> LookResult:
    """Pooled two-proportion z-test, two-sided at ``alpha``, with no correction for looks."""
    n_a, x_a, n_b, x_b = _as_float(votes_a, correct_a, votes_b, correct_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_a = np.where(n_a > 0, x_a / n_a, np.nan)
        p_b = np.where(n_b > 0, x_b / n_b, np.nan)
        pooled = (x_a + x_b) / (n_a + n_b)
        se = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
        diff = p_b - p_a
        z = np.where(se > 0, diff / se, np.nan)
        se_unpooled = np.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    crit = float(sps.norm.isf(alpha / 2))
    p = np.where(np.isnan(z), 1.0, 2 * sps.norm.sf(np.abs(np.nan_to_num(z))))
    valid = ~np.isnan(z)
    return LookResult(
        estimate=diff,
        low=diff - crit * se_unpooled,
        high=diff + crit * se_unpooled,
        p_value=np.asarray(p, dtype=np.float64),
        better=valid & (np.nan_to_num(z) > crit),
        worse=valid & (np.nan_to_num(z) < -crit),
    )


GROWTHBOOK_TUNING = 5000.0


def growthbook_rho(alpha: float = 0.05, tuning: float = GROWTHBOOK_TUNING) -> float:
    """Eq. 161 of Waudby-Smith et al., as gbstats computes it."""
    return float(np.sqrt((-2 * np.log(alpha) + np.log(-2 * np.log(alpha) + 1)) / tuning))


def growthbook_sequential(
    votes_a: npt.ArrayLike,
    correct_a: npt.ArrayLike,
    votes_b: npt.ArrayLike,
    correct_b: npt.ArrayLike,
    alpha: float = 0.05,
    tuning: float = GROWTHBOOK_TUNING,
) -> LookResult:
    """gbstats' ``SequentialTwoSidedTTest`` (absolute difference) at every look."""
    n_a, x_a, n_b, x_b = _as_float(votes_a, correct_a, votes_b, correct_b)
    rho = growthbook_rho(alpha, tuning)
    with np.errstate(divide="ignore", invalid="ignore"):
        m_a = np.where(n_a > 0, x_a / n_a, 0.0)
        m_b = np.where(n_b > 0, x_b / n_b, 0.0)
        var_a, var_b = m_a * (1 - m_a), m_b * (1 - m_b)
        variance = var_a / n_a + var_b / n_b
        n = n_a + n_b
        estimate = m_b - m_a
        s2 = variance * n
        tr2p1 = n * rho**2 + 1
        width = np.sqrt(s2) * np.sqrt(
            2 * tr2p1 * np.log(np.sqrt(tr2p1) / alpha) / (n * rho) ** 2
        )
        st2 = estimate**2 * n / variance
        log_e = rho**2 * st2 / (2 * tr2p1) - 0.5 * np.log(tr2p1)
    # gbstats returns its default (no effect, p = 1) when the baseline mean is 0 or either
    # arm has zero variance; a proportion of 0 or 1 is exactly that case.
    valid = (m_a > 0) & (var_a > 0) & (var_b > 0) & (n_a > 0) & (n_b > 0)
    p = np.where(valid, np.minimum(1.0, np.exp(-np.where(valid, log_e, 0.0))), 1.0)
    low = np.where(valid, estimate - width, 0.0)
    high = np.where(valid, estimate + width, 0.0)
    return LookResult(
        estimate=np.where(valid, estimate, 0.0),
        low=low,
        high=high,
        p_value=np.asarray(p, dtype=np.float64),
        better=valid & (low > 0),
        worse=valid & (high < 0),
    )


def first_decision(
    better: BoolArray, worse: BoolArray
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per run (looks on the last axis): +1 promoted / −1 reverted / 0 none, and the look index.

    The first significant look decides, as in a team that acts on the first green or red
    badge; ties at one look cannot happen (one estimate has one sign).
    """
    hit = better | worse
    any_hit = hit.any(axis=-1)
    idx = np.where(any_hit, hit.argmax(axis=-1), -1)
    first_better = np.take_along_axis(better, np.maximum(idx, 0)[..., None], axis=-1)[..., 0]
    outcome = np.where(any_hit, np.where(first_better, 1, -1), 0)
    return outcome.astype(np.int64), idx.astype(np.int64)
