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

More precise with shared calibration
------------------------------------
If a right verdict has the same chance to land in each band in both arms (and a wrong one
likewise), the served verdicts' band shares place each arm's accuracy without any vote, and
the voters' odds ratio less that vote-free one is log(θ_b / θ_a) directly
(:func:`calibration_contrast`). The served verdicts are three times as many as the votes,
so this is about 1.4 times as precise as the line fit. The two are only loosely correlated
and are combined by precision (:func:`selection_contrast`), which is what the engine uses.

What it cannot do
-----------------
Even combined, θ is known less precisely than the odds ratio among voters: at 20 votes an
hour a propensity difference that fakes a 10-point effect (log ratio 0.81) is 3.4 standard
errors from none after 48 hours (line fit alone 2.3), while a real 10-point gain must be
promoted by then; and the combined estimate's standard error is already at the Cramér–Rao
bound of the banded counts with shared calibration (0.81 / SE = 3.7), so no estimator can
do better with this data. Nor is the shared calibration it leans on guaranteed: a candidate
surer of its verdicts than the active one pulls the calibration contrast towards "better
than the votes say" and so its z down (a small shift can hide half of a fake +10 at 48 h),
which the votes' band-profile check sees only when the shift is large; the line fit alone
therefore keeps its own hold bar.

The engine therefore uses it where blocking an action costs little: it holds a promotion or
revert while the estimate points the harmful way by ``propensity_hold_z`` and accounts for
``propensity_share`` of the effect among voters (a revert also on the share alone), and
freezes the test when it does so by ``propensity_freeze_z`` (see ``analytics.decide``).

Public API
----------
- ``propensity_ratio(served, correct, wrong) -> (log_theta, variance)``: per arm, arrays with
  the bands on the last axis (cumulative counts), any leading shape.
- ``propensity_contrast(arm_a, arm_b) -> (log_ratio, z)``: log(θ_b / θ_a) and its z from the
  line fits.
- ``calibration_contrast(arm_a, arm_b) -> (log_ratio, z)``: the same from the voters' odds
  ratio against the served verdicts' confidence (shared calibration).
- ``calibration_differs(arm_a, arm_b) -> bool array``: the votes' band profiles show that
  the arms do not share calibration (then only the line fit is used).
- ``selection_contrast(arm_a, arm_b) -> (log_ratio, z)``: both, combined by precision.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

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


# The calibration contrast needs at least this many correct and this many wrong observations
# in each arm: with fewer, its delta-method variance (a sum of terms of both signs) can come
# out near zero and the z absurdly large.
MIN_ARM_OBSERVATIONS = 10
# The shares of served verdicts a calibration estimate of accuracy needs to be kept in (0, 1):
# outside, the estimate says the bands cannot place the arm (too few served or votes).
_ACCURACY_EDGE = 1e-3


def calibration_contrast(
    arm_a: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
    arm_b: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
) -> tuple[FloatArray, FloatArray]:
    """log(θ_b / θ_a) and its z from the voters' odds ratio against the served verdicts'
    confidence, each arm given as (served, correct, wrong) per band (bands on the last axis).

    Why: the odds ratio among voters is the true odds ratio times θ_b / θ_a. The true odds
    ratio can also be read without a single vote, from the confidence of *every* served
    verdict, if a right verdict has the same chance to land in each confidence band in both
    arms (and a wrong one likewise: the arms share the model, and the bands are cut-offs of
    its own probability). Then arm X's served verdicts fall in band k with share
    π_k = p_X R_k + (1 − p_X) W_k, where R and W (the bands of right and of wrong verdicts)
    are the band profiles of the correct and of the wrong observations, pooled over the arms
    (selection that depends on the arm and on rightness, not on the band, leaves those
    profiles alone). Projecting each arm's π onto the line from W to R estimates its
    accuracy p_X; the difference between the voters' log odds ratio and logit p_b − logit p_a
    is selection, log(θ_b / θ_a).

    Its variance is the voters' (1/x summed over the four cells), plus the projections'
    (multinomial band shares), less twice their covariance: both rise when an arm happens to
    serve more right verdicts, by 1 / (n p (1 − p)) per arm. With the bands of the simulated
    traffic this is about 1.4 times as precise as the line fit of :func:`propensity_ratio`
    (standard error 0.25 against 0.35 after 48 h at 20 votes an hour), because the served
    verdicts, three times as many as the votes, carry the accuracy.

    What it assumes beyond the line fit: shared calibration. A candidate prompt that makes
    the model surer of its wrong verdicts than the active one is would look like selection
    in one direction and hide it in the other: surer of its right verdicts, the candidate's
    accuracy is overestimated and a selection that fakes a gain is partly hidden. Where the
    votes' band profiles show it (:func:`calibration_differs`, which needs a large shift)
    the contrast is not used; otherwise the engine keeps the line fit's own hold bar. Its
    variance leaves out the noise of the pooled profiles R and W, and with a real gain at
    high accuracy (0.9 against 0.97) its z leans positive (mean about +0.4), holding some
    real promotions: a cost in speed, not in error rate. Where the bands do not place an arm
    (no served verdicts, bands of one accuracy, no votes either way) the contrast is 0 with
    z = 0."""
    n_a, c_a, w_a = (np.asarray(x, dtype=np.float64) for x in arm_a)
    n_b, c_b, w_b = (np.asarray(x, dtype=np.float64) for x in arm_b)
    correct_pool, wrong_pool = c_a + c_b, w_a + w_b
    profile_right = correct_pool / np.maximum(correct_pool.sum(axis=-1, keepdims=True), 1.0)
    profile_wrong = wrong_pool / np.maximum(wrong_pool.sum(axis=-1, keepdims=True), 1.0)
    total_a = n_a.sum(axis=-1)
    total_b = n_b.sum(axis=-1)
    both = n_a + n_b
    pooled = both / np.maximum(both.sum(axis=-1, keepdims=True), 1.0)
    gap = profile_right - profile_wrong
    # Weighted least squares of π − W on R − W with multinomial weights 1/π̄.
    u = np.where(pooled > 0, gap / np.where(pooled > 0, pooled, 1.0), 0.0)
    norm = (u * gap).sum(axis=-1)
    safe_norm = np.where(norm > 0, norm, 1.0)
    u = u / safe_norm[..., None]

    def accuracy(n: FloatArray, total: FloatArray) -> tuple[FloatArray, FloatArray]:
        share = n / np.maximum(total, 1.0)[..., None]
        p = ((share - profile_wrong) * u).sum(axis=-1)
        var = ((u**2 * share).sum(axis=-1) - (u * share).sum(axis=-1) ** 2) / np.maximum(
            total, 1.0)
        return p, var

    p_a, var_pa = accuracy(n_a, total_a)
    p_b, var_pb = accuracy(n_b, total_b)
    x_a, o_a = c_a.sum(axis=-1), (c_a + w_a).sum(axis=-1)
    x_b, o_b = c_b.sum(axis=-1), (c_b + w_b).sum(axis=-1)
    enough = MIN_ARM_OBSERVATIONS
    valid = ((norm > 0) & (x_a >= enough) & (o_a - x_a >= enough) & (x_b >= enough)
             & (o_b - x_b >= enough)
             & (p_a > _ACCURACY_EDGE) & (p_a < 1 - _ACCURACY_EDGE)
             & (p_b > _ACCURACY_EDGE) & (p_b < 1 - _ACCURACY_EDGE))
    one = np.ones_like(p_a)
    pa, pb = np.where(valid, p_a, 0.5 * one), np.where(valid, p_b, 0.5 * one)
    xa, xb = np.where(valid, x_a, one), np.where(valid, x_b, one)
    fa, fb = np.where(valid, o_a - x_a, one), np.where(valid, o_b - x_b, one)
    voters = np.log(xb / fb) - np.log(xa / fa)
    served = np.log(pb / (1 - pb)) - np.log(pa / (1 - pa))
    var = (1 / xa + 1 / fa + 1 / xb + 1 / fb
           + var_pa / (pa * (1 - pa)) ** 2 + var_pb / (pb * (1 - pb)) ** 2
           - 2 / (np.maximum(total_a, 1.0) * pa * (1 - pa))
           - 2 / (np.maximum(total_b, 1.0) * pb * (1 - pb)))
    valid &= (var > 0) & ~calibration_differs(arm_a, arm_b)
    diff = voters - served
    z = np.where(valid, diff / np.sqrt(np.where(valid, var, 1.0)), 0.0)
    return (np.asarray(np.where(valid, diff, 0.0), dtype=np.float64),
            np.asarray(z, dtype=np.float64))


# The shared-calibration check rejects at this level: strict, because it is repeated at
# every hourly look and a rejection only falls back to the assumption-light line fit.
CALIBRATION_CHECK_ALPHA = 0.001


def calibration_differs(
    arm_a: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
    arm_b: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
) -> npt.NDArray[np.bool_]:
    """Whether the votes show that the arms do not share calibration.

    Why: :func:`calibration_contrast` assumes that a right verdict lands in each band with
    the same chance in both arms, and a wrong one likewise. Votes on right verdicts fall in
    the bands as right verdicts do (the chance of a vote depends on the arm and on
    rightness, not on the band), so under the assumption the band profile of the correct
    observations is the same in both arms, and so is that of the wrong ones. A candidate
    prompt that makes the model surer of its wrong verdicts shifts its wrong observations
    towards the high bands. Pearson's homogeneity test of both profiles (2 × bands tables,
    2(K − 1) degrees of freedom together) at ``CALIBRATION_CHECK_ALPHA``: where it rejects,
    the calibration contrast is not used."""
    c = [np.asarray(arm[1], dtype=np.float64) for arm in (arm_a, arm_b)]
    w = [np.asarray(arm[2], dtype=np.float64) for arm in (arm_a, arm_b)]
    statistic = np.zeros(np.broadcast_shapes(c[0].shape, c[1].shape)[:-1])
    dof = np.zeros_like(statistic)
    for first, second in ((c[0], c[1]), (w[0], w[1])):
        bands = first + second
        used = bands > 0
        total_first = first.sum(axis=-1, keepdims=True)
        total_second = second.sum(axis=-1, keepdims=True)
        total = np.maximum(total_first + total_second, 1.0)
        for count, arm_total in ((first, total_first), (second, total_second)):
            expected = bands * arm_total / total
            safe = np.where(expected > 0, expected, 1.0)
            statistic += np.where(used & (expected > 0), (count - expected) ** 2 / safe,
                                  0.0).sum(axis=-1)
        informative = (total_first[..., 0] > 0) & (total_second[..., 0] > 0)
        dof += np.where(informative, np.maximum(used.sum(axis=-1) - 1, 0), 0)
    p_value = np.where(dof > 0, sps.chi2.sf(statistic, np.maximum(dof, 1)), 1.0)
    return np.asarray(p_value < CALIBRATION_CHECK_ALPHA, dtype=np.bool_)


# Correlation of the two estimates of log(θ_b / θ_a) when the arms select alike, measured on
# simulated traffic: 0.17-0.35 across effects of −5 to +10 points and 24 to 168 hours. With
# 0.2 the combined z has a standard deviation of 0.96-1.03 there (0.91-0.99 with 0.3, which
# would blunt the guard). A larger true correlation makes z slightly too large: the guard
# then holds a little more often, which costs speed, never error rate.
ESTIMATE_CORRELATION = 0.2


def selection_contrast(
    arm_a: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
    arm_b: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
) -> tuple[FloatArray, FloatArray]:
    """log(θ_b / θ_a) and its z from both estimates, weighted by their precision.

    The line fit (:func:`propensity_contrast`) assumes only that the chance of a vote
    depends on the arm and on rightness; the calibration contrast
    (:func:`calibration_contrast`) adds that the arms share calibration and is the more
    precise. They use the data differently (the slope of the bands' vote shares against the
    voters' odds ratio set beside the served verdicts' confidence) and are only loosely
    correlated, so together they are more precise than either: a selection difference that
    fakes a 10-point gain is 3.4 standard errors from none after 48 h at 20 votes an hour
    (line fit alone 2.3, calibration alone 3.0). Where only one is determined, it is used
    alone; where neither is, the contrast is 0 with z = 0."""
    return combine_contrasts(propensity_contrast(arm_a, arm_b),
                             calibration_contrast(arm_a, arm_b))


def combine_contrasts(line: tuple[FloatArray, FloatArray],
                      calibration: tuple[FloatArray, FloatArray],
                      ) -> tuple[FloatArray, FloatArray]:
    """The line fit's and the calibration contrast's (log ratio, z), combined by precision
    (what :func:`selection_contrast` returns; separate so a caller that also needs the line
    fit alone computes it once)."""
    log_line, z_line = line
    log_cal, z_cal = calibration
    has_line, has_cal = z_line != 0, z_cal != 0
    # Variances back from estimate / z (both zero where undetermined).
    var_line = np.where(has_line, (log_line / np.where(has_line, z_line, 1.0)) ** 2, np.inf)
    var_cal = np.where(has_cal, (log_cal / np.where(has_cal, z_cal, 1.0)) ** 2, np.inf)
    rho = ESTIMATE_CORRELATION
    both = has_line & has_cal
    safe_line = np.where(both, var_line, 1.0)
    safe_cal = np.where(both, var_cal, 1.0)
    cov = rho * np.sqrt(safe_line * safe_cal)
    det = safe_line * safe_cal - cov**2
    # Generalised least squares of two estimates of one quantity: weights Σ⁻¹1 / (1ᵀΣ⁻¹1).
    w_line = (safe_cal - cov) / det
    w_cal = (safe_line - cov) / det
    precision = w_line + w_cal
    combined = (w_line * log_line + w_cal * log_cal) / precision
    z_both = combined * np.sqrt(precision)
    # One estimate far noisier than the other (variance ratio above 1/ρ²) would get a
    # negative weight: the precise one is then used alone.
    use_both = both & (w_line > 0) & (w_cal > 0)
    only_cal = has_cal & ~use_both & ((var_cal <= var_line) | ~has_line)
    log_ratio = np.where(use_both, combined, np.where(only_cal, log_cal, log_line))
    z = np.where(use_both, z_both, np.where(only_cal, z_cal, z_line))
    return (np.asarray(log_ratio, dtype=np.float64), np.asarray(z, dtype=np.float64))

