"""How much more readily users vote on an arm's right verdicts than on its wrong ones (pure).

Why this is the quantity that matters
-------------------------------------
Votes are a self-selected sample. If users vote on a right verdict with probability r_right
and on a wrong one with r_wrong, the odds of accuracy among voters are the true odds times
θ = r_right / r_wrong. The odds ratio between the arms among voters is therefore the true
odds ratio times θ_candidate / θ_active: unbiased when the two arms' θ are equal, whatever
they are (users may well vote more on wrong verdicts, in both arms alike), and biased by
exactly log(θ_candidate / θ_active) on the log-odds scale when they are not. A candidate
whose right verdicts are voted more readily (a friendlier confidence display, say) looks
better than it is; one whose wrong verdicts are voted more looks worse.

What the data can say about θ
-----------------------------
Whether an unvoted verdict was right is never known, so θ cannot be read off the votes of
one pool of verdicts: the accuracy among voters mixes θ with the unknown accuracy. It is
identified through the confidence bands both arms share, because the bands differ in
accuracy. In band k with n_k served verdicts of which a share q_k is right, the expected share
of verdicts that get a *correct* vote is a_k = r_right · q_k and that get a *wrong* vote is
b_k = r_wrong · (1 − q_k), so for every band

    a_k / r_right + b_k / r_wrong = 1,

a straight line through the bands' points (a_k, b_k) whose slope is −r_wrong / r_right =
−1/θ, whatever the bands' accuracies q_k are (they may differ between the arms: a better
candidate has more right verdicts in every band). Fitting that line per arm (weighted least
squares of the identity over the bands, corrected for the noise in a_k and b_k) estimates
θ per arm with a standard error; the difference of the two logs, over its standard error, is
a z statistic for "the arms' voters select alike". It assumes only that a verdict's chance of
a vote depends on its arm and on whether it is right, not otherwise on its band; it needs
bands of different accuracy (with a single informative band, or bands of equal accuracy,
the line is not determined and the statistic reports no evidence rather than a guess).

What it cannot do
-----------------
The line is fitted through three points, so θ is known much less precisely than the odds
ratio among voters: at 20 votes an hour, the standard error of log(θ_b / θ_a) is about 0.35
after 50 hours, twice that of the odds ratio the engine tests. A propensity difference large
enough to fake a 10-point effect (log ratio 0.8) is then only about 2.3 standard errors away
from none. The engine therefore uses it where blocking an action costs little: it holds a
promotion or revert while the estimate points the harmful way by ``propensity_hold_z`` and
freezes the test when it does so by ``propensity_freeze_z`` (see ``analytics.decide``).

Public API
----------
- ``propensity_ratio(served, correct, wrong) -> (log_theta, variance)``: per arm, arrays with
  the bands on the last axis (cumulative counts), any leading shape.
- ``propensity_contrast(arm_a, arm_b) -> (log_ratio, z)``: log(θ_b / θ_a) and its z.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# A band enters the fit only with at least this many correct and this many wrong observations
# in the arm: below that its point is too noisy for the bias correction to hold.
MIN_BAND_OBSERVATIONS = 5
# Refits of the weights (the variance of a_k x + b_k y depends on the fit itself).
ITERATIONS = 3


def propensity_ratio(served: npt.ArrayLike, correct: npt.ArrayLike,
                     wrong: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """log θ = log(r_right / r_wrong) of one arm and its variance, from per-band counts.

    ``served``, ``correct`` and ``wrong`` have the bands on the last axis: verdicts served,
    observations that found the verdict right and that found it wrong. Returns arrays of the
    leading shape; NaN where the bands do not determine θ (fewer than two usable bands, bands
    of one accuracy, a fit outside the positive quadrant).

    The identity a_k x + b_k y = 1 (x = 1/r_right, y = 1/r_wrong) is fitted by weighted least
    squares over the bands with weights n_k / Var(a_k x + b_k y) per served verdict, and the
    moment matrix Σ w g gᵀ is corrected for the multinomial noise in g = (a_k, b_k), which
    would otherwise pull the line towards flatter slopes in sparse bands.
    """
    n = np.asarray(served, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    w = np.asarray(wrong, dtype=np.float64)
    usable = (n > 0) & (c >= MIN_BAND_OBSERVATIONS) & (w >= MIN_BAND_OBSERVATIONS)
    safe_n = np.where(usable, n, 1.0)
    a = np.where(usable, c / safe_n, 0.0)
    b = np.where(usable, w / safe_n, 0.0)
    # Per served verdict: Var(a) = a(1 − a), Var(b) = b(1 − b), Cov(a, b) = −ab (multinomial).
    var_a, var_b, cov_ab = a * (1 - a), b * (1 - b), -a * b
    rate = (np.where(usable, c + w, 0.0).sum(axis=-1)
            / np.maximum(np.where(usable, n, 0.0).sum(axis=-1), 1.0))
    start = np.where(rate > 0, 1.0 / np.where(rate > 0, rate, 1.0), 1.0)
    x = start.copy()
    y = start.copy()
    m_xx = m_xy = m_yy = np.zeros_like(x)
    for _ in range(ITERATIONS):
        xs, ys = x[..., None], y[..., None]
        v = xs**2 * var_a + ys**2 * var_b + 2 * xs * ys * cov_ab
        weight = np.where(usable & (v > 0), n / np.where(v > 0, v, 1.0), 0.0)
        m_xx = (weight * (a * a - var_a / safe_n)).sum(axis=-1)
        m_xy = (weight * (a * b - cov_ab / safe_n)).sum(axis=-1)
        m_yy = (weight * (b * b - var_b / safe_n)).sum(axis=-1)
        r_x = (weight * a).sum(axis=-1)
        r_y = (weight * b).sum(axis=-1)
        det = m_xx * m_yy - m_xy**2
        ok = det > 1e-12 * np.maximum(m_xx * m_yy, 1e-300)
        safe_det = np.where(ok, det, 1.0)
        new_x = (m_yy * r_x - m_xy * r_y) / safe_det
        new_y = (m_xx * r_y - m_xy * r_x) / safe_det
        good = ok & (new_x > 0) & (new_y > 0)
        x = np.where(good, new_x, x)
        y = np.where(good, new_y, y)
    det = m_xx * m_yy - m_xy**2
    valid = (det > 1e-12 * np.maximum(m_xx * m_yy, 1e-300)) & (x > 0) & (y > 0) & (
        usable.sum(axis=-1) >= 2)
    safe_det = np.where(valid, det, 1.0)
    # Cov(x, y) = M⁻¹ (the weights are inverse variances of the identity's residuals).
    var_x, var_y, cov_xy = m_yy / safe_det, m_xx / safe_det, -m_xy / safe_det
    safe_x, safe_y = np.where(valid, x, 1.0), np.where(valid, y, 1.0)
    var_log = var_x / safe_x**2 + var_y / safe_y**2 - 2 * cov_xy / (safe_x * safe_y)
    valid &= var_log > 0
    log_theta = np.where(valid, np.log(safe_y) - np.log(safe_x), np.nan)
    return (np.asarray(log_theta, dtype=np.float64),
            np.asarray(np.where(valid, var_log, np.nan), dtype=np.float64))


def propensity_contrast(
    arm_a: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
    arm_b: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
) -> tuple[FloatArray, FloatArray]:
    """log(θ_b / θ_a) and its z statistic from each arm's (served, correct, wrong) per band.

    Positive: the candidate's right verdicts are voted relatively more readily than the
    active's, which inflates its accuracy among voters (fakes a promotion); negative: its
    wrong ones are, which fakes a revert. Where either arm's θ is not determined the contrast
    is 0 with z = 0 (no evidence either way)."""
    log_a, var_a = propensity_ratio(*arm_a)
    log_b, var_b = propensity_ratio(*arm_b)
    diff = log_b - log_a
    var = var_a + var_b
    valid = np.isfinite(diff) & np.isfinite(var) & (var > 0)
    safe_var = np.where(valid, var, 1.0)
    z = np.where(valid, diff / np.sqrt(safe_var), 0.0)
    return (np.asarray(np.where(valid, diff, 0.0), dtype=np.float64),
            np.asarray(z, dtype=np.float64))
