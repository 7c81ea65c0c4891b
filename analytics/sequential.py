"""Always-valid sequential evidence (e-processes) over hourly strata (pure, numpy/scipy).

The candidate-vs-active comparison is looked at every hour for up to weeks while the traffic
share ramps and the base accuracy drifts. A test that pools votes across hours is confounded
by that; a test re-run at every look inflates its error. Both problems vanish with:

* **One stratum per hour, conditioned on its margins.** In hour h with ``n_a``, ``n_b`` votes
  and ``s`` correct in total, under "no difference" (odds ratio ψ = 1) the candidate's correct
  count ``x_b`` given the margins is hypergeometric whatever the hour's base accuracy is;
  under ψ it is Fisher's noncentral hypergeometric. The hour's likelihood ratio is
  ``LR_h(ψ) = ψ^x_b · Z_h(1) / Z_h(ψ)``, ``Z_h(ψ) = Σ_x C(n_b, x) C(n_a, s - x) ψ^x``, and its
  expectation under ψ = 1 is exactly 1 (exact, no normal approximation).
* **A mixture e-process.** ``E⁺_t = Σ_g π_g Π_{h ≤ t} LR_h(ψ_g)`` over a grid of log ψ > 0
  (and the mirror ``E⁻`` over log ψ < 0) is a nonnegative martingale under no difference, so
  ``P(ever E ≥ 1/α) ≤ α`` at any look schedule (Ville's inequality).

The same construction with a binomial stratum gives an always-valid sample-ratio-mismatch
(SRM) test: given the verdicts served in hour h, the candidate's count is Binomial with the
planned share; the alternatives shift its log-odds by δ.

Public API (arrays have the hours on the last axis; leading axes are batch, e.g. runs)
----------------------------------------------------------------------------------------
- ``PsiPrior(sd, grid_min, grid_max, points)``: a half-normal prior on |log ψ| on a grid.
- ``fisher_log_lr(votes_a, correct_a, votes_b, correct_b, log_psi) -> (..., hours, G)``
- ``fisher_log_lr_expectation(n_a, n_b, s, log_psi) -> float``: Σ_x f₀(x) LR(x) (= 1); a
  self-check used by the tests.
- ``fisher_e_process(votes_a, correct_a, votes_b, correct_b, prior) -> EProcess``: cumulative
  log E⁺ / log E⁻ after every hour.
- ``binomial_shift_log_evalue(successes, trials, null_p, prior) -> (..., hours)``: two-sided
  always-valid test that the success share departs from ``null_p`` (SRM, vote-rate parity).
- ``pooled_binomial_shift_log_evalue(successes, trials, null_p, prior) -> (..., hours)``: the
  same with one shift common to several groups (axis −2: the confidence bands).
- ``block_strata(counts, share, total_keys, min_votes, max_hours) -> Blocks``: merges sparse
  hours into strata by vote counts only (see its docstring for why that keeps validity).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from scipy.special import gammaln, logsumexp

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PsiPrior:
    """Half-normal mixing prior on |log ψ| (or |δ|), discretised on an even grid.

    The grid bounds matter more than they look: ``grid_min`` > 0 keeps the prior off the null
    (where it would only dilute the evidence), ``grid_max`` bounds the alternatives worth
    betting on (odds ratio e^1.6 ≈ 5 is already an enormous prompt effect).
    """

    sd: float = 0.3
    grid_min: float = 0.02
    grid_max: float = 1.6
    points: int = 40

    def validate(self) -> None:
        if self.sd <= 0:
            raise ValueError("prior sd must be positive")
        if not 0 < self.grid_min < self.grid_max:
            raise ValueError("need 0 < grid_min < grid_max")
        if self.points < 2:
            raise ValueError("the grid needs at least 2 points")

    def grid(self) -> tuple[FloatArray, FloatArray]:
        """Positive grid of |log ψ| and the log prior weights (summing to 1)."""
        return _grid(self.sd, self.grid_min, self.grid_max, self.points)


@lru_cache(maxsize=32)
def _grid(sd: float, lo: float, hi: float, points: int) -> tuple[FloatArray, FloatArray]:
    values = np.linspace(lo, hi, points)
    log_w = -0.5 * (values / sd) ** 2
    log_w = log_w - logsumexp(log_w)
    values.setflags(write=False)
    log_w.setflags(write=False)
    return values, log_w


def _log_comb(n: FloatArray, k: FloatArray) -> FloatArray:
    out: FloatArray = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
    return out


def _fisher_log_norm(
    n_a: FloatArray, n_b: FloatArray, s: FloatArray, log_psi: FloatArray
) -> FloatArray:
    """log Z(ψ) − log Z(1) for each (n_a, n_b, s) row; shape (rows, G).

    Rows are the *distinct* margin triples (a few thousand even for a million strata), padded
    to the longest support so the whole batch is three array operations.
    """
    lo = np.maximum(0.0, s - n_a)
    hi = np.minimum(n_b, s)
    length = int((hi - lo).max()) + 1 if n_a.size else 1
    j = np.arange(length, dtype=np.float64)
    x = lo[:, None] + j[None, :]  # (rows, L)
    valid = x <= hi[:, None]
    xs = np.where(valid, x, lo[:, None])
    log_w = _log_comb(n_b[:, None], xs) + _log_comb(n_a[:, None], s[:, None] - xs)
    log_w = np.where(valid, log_w, -np.inf)
    log_z1 = logsumexp(log_w, axis=1)  # (rows,)
    # Offsets from lo keep ψ^x moderate; the lo·log ψ term is added back analytically.
    terms = log_w[:, :, None] + j[None, :, None] * log_psi[None, None, :]
    log_zpsi = logsumexp(terms, axis=1) + lo[:, None] * log_psi[None, :]
    out: FloatArray = log_zpsi - log_z1[:, None]
    return out


def fisher_log_lr(
    votes_a: npt.ArrayLike,
    correct_a: npt.ArrayLike,
    votes_b: npt.ArrayLike,
    correct_b: npt.ArrayLike,
    log_psi: npt.ArrayLike,
) -> FloatArray:
    """Per-stratum log LR(ψ) for every grid value: shape ``inputs.shape + (G,)``.

    A stratum where either arm has no votes carries no information about ψ and gets LR = 1.
    """
    n_a = np.asarray(votes_a, dtype=np.int64)
    x_a = np.asarray(correct_a, dtype=np.int64)
    n_b = np.asarray(votes_b, dtype=np.int64)
    x_b = np.asarray(correct_b, dtype=np.int64)
    grid = np.asarray(log_psi, dtype=np.float64).ravel()
    if np.any((x_a < 0) | (x_a > n_a) | (x_b < 0) | (x_b > n_b)):
        raise ValueError("need 0 <= correct <= votes in every stratum")
    shape = np.broadcast_shapes(n_a.shape, x_a.shape, n_b.shape, x_b.shape)
    n_a, x_a, n_b, x_b = (np.broadcast_to(v, shape).ravel() for v in (n_a, x_a, n_b, x_b))
    s = x_a + x_b
    out = np.zeros((n_a.size, grid.size), dtype=np.float64)
    informative = (n_a > 0) & (n_b > 0) & (s > 0) & (s < n_a + n_b)
    if informative.any():
        ia, ib, iss, ixb = n_a[informative], n_b[informative], s[informative], x_b[informative]
        base = int(max(ia.max(), ib.max(), iss.max())) + 1
        key = (ia * base + ib) * base + iss
        uniq, inverse = np.unique(key, return_inverse=True)
        u_s = uniq % base
        u_b = (uniq // base) % base
        u_a = uniq // (base * base)
        norm = _fisher_log_norm(
            u_a.astype(np.float64), u_b.astype(np.float64), u_s.astype(np.float64), grid
        )
        out[informative] = ixb[:, None] * grid[None, :] - norm[inverse.ravel()]
    return out.reshape(*shape, grid.size)


def fisher_log_lr_expectation(n_a: int, n_b: int, s: int, log_psi: float) -> float:
    """Σ_x f₀(x) · LR(ψ)(x) under the null hypergeometric f₀: exactly 1 by construction."""
    lo, hi = max(0, s - n_a), min(n_b, s)
    xs = np.arange(lo, hi + 1)
    log_f0 = _log_comb(np.full(xs.size, float(n_b)), xs.astype(np.float64)) + _log_comb(
        np.full(xs.size, float(n_a)), (s - xs).astype(np.float64)
    )
    log_f0 -= logsumexp(log_f0)
    lr = fisher_log_lr(
        np.full(xs.size, n_a), s - xs, np.full(xs.size, n_b), xs, np.array([log_psi])
    )[:, 0]
    return float(np.exp(logsumexp(log_f0 + lr)))


@dataclass(frozen=True)
class EProcess:
    """Cumulative evidence after each hour (last axis): log E⁺ (b better), log E⁻ (b worse).

    With ``since`` given to :func:`fisher_e_process`, ``log_e_plus_later`` is the evidence
    that b is better in the strata after that one alone (0 up to it); see there."""

    log_e_plus: FloatArray
    log_e_minus: FloatArray
    log_e_plus_later: FloatArray | None = None


def fisher_e_process(
    votes_a: npt.ArrayLike,
    correct_a: npt.ArrayLike,
    votes_b: npt.ArrayLike,
    correct_b: npt.ArrayLike,
    prior: PsiPrior,
    design_effect: npt.ArrayLike | None = None,
    since: int | None = None,
) -> EProcess:
    """E⁺ and E⁻ after every hour; hours are the last axis of the inputs.

    ``design_effect`` (same shape, ≥ 1) tempers each look's running likelihood ratios:
    ``Σ_g π_g (Π_h LR_h(ψ_g))^(1/d_t)``. By Jensen (x ↦ x^(1/d) is concave) that is at most
    ``max(1, E_t)``, so the untempered guarantee carries over for any thresholds ≥ 1 even
    with d_t chosen from the data; when users' votes cluster, dividing by the variance
    inflation restores the calibration the independence model loses (an approximation: no
    vote-level test is exact under clustering).
    """
    values, log_w = prior.grid()
    grid = np.concatenate([values, -values])
    log_lr = fisher_log_lr(votes_a, correct_a, votes_b, correct_b, grid)
    raw = np.cumsum(log_lr, axis=-2)
    d = (np.ones(raw.shape[:-1]) if design_effect is None else np.broadcast_to(
        np.maximum(np.asarray(design_effect, dtype=np.float64), 1.0), raw.shape[:-1]))
    cum = raw / d[..., None]
    g = values.size
    log_e_plus = np.asarray(logsumexp(cum[..., :g] + log_w, axis=-1), dtype=np.float64)
    return EProcess(
        log_e_plus=log_e_plus,
        log_e_minus=np.asarray(logsumexp(cum[..., g:] + log_w, axis=-1), dtype=np.float64),
        log_e_plus_later=(None if since is None else _later_log_e(
            raw[..., :g], log_e_plus, log_w, d, since)),
    )


def _later_log_e(cum: FloatArray, log_e_plus: FloatArray, log_w: FloatArray, d: FloatArray,
                 since: int) -> FloatArray:
    """Evidence that b is better from the strata after stratum ``since`` alone (persistence:
    an advantage confined to the strata up to ``since`` must not count).

    The average of two e-processes of the later strata, each a mixture over the grid of
    their running likelihood ratios with weights fixed when stratum ``since`` closed:

    - the posterior after the strata up to ``since`` as the weights: E⁺(t) / E⁺(since). It
      keeps the head start an early advantage gave a lasting gain of the same size;
    - the prior itself: a fresh start. It does not bet against a lasting gain smaller than
      the early one, which the posterior would (measured by a review: +5 points lasting
      after a +15-point first day waited until the horizon with the posterior alone).

    An average of test martingales is one, so by Ville's inequality it reaches 1/α with
    probability ≤ α when the later strata carry no effect, whatever the earlier ones
    carried. Both parts are tempered by the look's own design effect, the posterior's
    numerator and denominator alike: tempering them with different effects would hand part
    of the early evidence to the later strata whenever the effect falls. (The look's own
    effect in both makes the posterior's weights move with it: an approximation, as the
    tempering of E⁺ is, measured to stay within the bound.) A stratum still open when
    stratum ``since`` closes counts as later: sparse traffic merges hours across the first
    day's end (in half the tests at 4 votes/h), which a review measured to change how often
    the bar is reached by 0.2 points at most."""
    out = np.zeros(cum.shape[:-1])
    first = max(since + 1, 0)
    if first >= cum.shape[-2]:
        return out
    # Only the later strata are computed; up to ``since`` the evidence is 0 by definition.
    later, d_later = cum[..., first:, :], d[..., first:, None]
    reference = (cum[..., first - 1:first, :] if first > 0
                 else np.zeros_like(later[..., :1, :]))
    # E⁺ (tempered by d_t) over the reference tempered by the same d_t.
    posterior = log_e_plus[..., first:] - logsumexp(reference / d_later + log_w, axis=-1)
    fresh = logsumexp((later - reference) / d_later + log_w, axis=-1)
    out[..., first:] = np.logaddexp(posterior, fresh) - np.log(2.0)
    return out


def _binomial_shift_terms(
    successes: npt.ArrayLike, trials: npt.ArrayLike, null_p: npt.ArrayLike, prior: PsiPrior,
) -> tuple[FloatArray, FloatArray]:
    """Per stratum, the log likelihood ratio of every alternative of the two-sided grid
    (shape (..., G)), and the grid's log weights (half the prior mass on each side)."""
    x = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    q = np.asarray(null_p, dtype=np.float64)
    if np.any((x < 0) | (x > n)):
        raise ValueError("need 0 <= successes <= trials")
    values, log_w = prior.grid()
    deltas = np.concatenate([values, -values])
    log_w2 = np.concatenate([log_w, log_w]) - np.log(2.0)
    ok = (q > 0) & (q < 1) & (n > 0)
    qs = np.where(ok, q, 0.5)[..., None]
    logit = np.log(qs) - np.log1p(-qs)
    alt_logit = logit + deltas
    # log q' − log q and log(1−q') − log(1−q) via log-sigmoid for stability.
    log_q_alt = -np.logaddexp(0.0, -alt_logit)
    log_1mq_alt = -np.logaddexp(0.0, alt_logit)
    log_q = -np.logaddexp(0.0, -logit)
    log_1mq = -np.logaddexp(0.0, logit)
    per_hour = x[..., None] * (log_q_alt - log_q) + (n - x)[..., None] * (log_1mq_alt - log_1mq)
    return np.where(ok[..., None], per_hour, 0.0), log_w2


def binomial_shift_log_evalue(
    successes: npt.ArrayLike,
    trials: npt.ArrayLike,
    null_p: npt.ArrayLike,
    prior: PsiPrior,
) -> FloatArray:
    """Two-sided always-valid log e-value that successes/trials departs from ``null_p``.

    Per stratum the alternative shifts the null's log-odds by ±δ; the mixture over the grid
    (half the prior mass on each side) of the running products is a martingale under the
    null, whatever ``null_p`` is hour by hour (it only has to be fixed before the hour's data).
    Strata with ``null_p`` outside (0, 1) or no trials contribute nothing.
    """
    per_hour, log_w2 = _binomial_shift_terms(successes, trials, null_p, prior)
    cum = np.cumsum(per_hour, axis=-2)
    return np.asarray(logsumexp(cum + log_w2, axis=-1), dtype=np.float64)


def pooled_binomial_shift_log_evalue(
    successes: npt.ArrayLike,
    trials: npt.ArrayLike,
    null_p: npt.ArrayLike,
    prior: PsiPrior,
) -> FloatArray:
    """:func:`binomial_shift_log_evalue` with one shift common to several groups, shape
    (..., groups, hours) in, (..., hours) out.

    Each group (e.g. a confidence band) keeps its own null share; the alternative shifts
    every group's log-odds by the same ±δ. Under the null the groups' strata are independent
    binomials given the past, so the product over groups of each alternative's likelihood
    ratio is still a martingale and so is the mixture. Why not the average of the groups'
    own e-values: a shift common to all groups (one arm voted more throughout) is then
    pooled, not diluted, and reaches the same evidence with a third of the data per group.
    """
    per_hour, log_w2 = _binomial_shift_terms(successes, trials, null_p, prior)
    cum = np.cumsum(per_hour.sum(axis=-3), axis=-2)
    return np.asarray(logsumexp(cum + log_w2, axis=-1), dtype=np.float64)


@dataclass(frozen=True)
class Blocks:
    """Hourly counts merged into strata ("blocks"), aligned to the looks.

    ``closed[name]`` has shape (batch, 2 · hours): slot 2t holds a block closed at look t
    because the planned share changed, slot 2t + 1 a block closed at look t because it was
    full; empty slots are zeros (likelihood ratio 1). ``open[name]`` (batch, hours) is the
    still-open block after look t, which only a fixed-time test at the horizon may use.
    """

    closed: dict[str, npt.NDArray[np.int64]]
    open: dict[str, npt.NDArray[np.int64]]


def block_strata(
    counts: dict[str, npt.ArrayLike],
    share: npt.ArrayLike,
    total_keys: tuple[str, str],
    min_votes: int,
    max_hours: int,
) -> Blocks:
    """Merge consecutive hours until the smaller arm *expects* ``min_votes`` votes.

    Why: an hour in which one arm got no vote carries no information about the odds ratio,
    so at a few votes per hour strict hourly strata waste a quarter of the data.

    A block closes when (votes of both arms) × min(share, 1 − share) ≥ ``min_votes``, or
    after ``max_hours``, and never spans a change of the planned share (the ramp is what
    confounds pooled comparisons). The rule reads the *total* count only, never which arm a
    vote went to nor whether it was correct: within a block each vote's arm is then an
    independent draw with the block's share, so both arms sample the block's hours alike and
    a drifting base accuracy cannot favour either. (Closing when the minority arm reaches a
    count would end blocks right after its votes, i.e. in the block's latest hours, which a
    drifting base rate turns into a bias.) With plenty of votes per hour (e.g. 20 votes/h at
    50/50) the blocks are exactly the hours.
    """
    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in counts.items()}
    first = next(iter(arrays.values()))
    batch, hours = first.shape
    sh = np.broadcast_to(np.asarray(share, dtype=np.float64), (batch, hours))
    acc = {k: np.zeros(batch, dtype=np.int64) for k in arrays}
    closed = {k: np.zeros((batch, 2 * hours), dtype=np.int64) for k in arrays}
    opened = {k: np.zeros((batch, hours), dtype=np.int64) for k in arrays}
    length = np.zeros(batch, dtype=np.int64)
    block_share = sh[:, 0].copy()
    key_a, key_b = total_keys
    for h in range(hours):
        changed = (length > 0) & (sh[:, h] != block_share)
        for k in arrays:
            closed[k][:, 2 * h] = np.where(changed, acc[k], 0)
            acc[k] = np.where(changed, 0, acc[k]) + arrays[k][:, h]
        length = np.where(changed, 0, length) + 1
        block_share = np.where(length == 1, sh[:, h], block_share)
        minority = np.minimum(block_share, 1.0 - block_share)
        full = ((acc[key_a] + acc[key_b]) * minority >= min_votes) | (length >= max_hours)
        for k in arrays:
            closed[k][:, 2 * h + 1] = np.where(full, acc[k], 0)
            acc[k] = np.where(full, 0, acc[k])
            opened[k][:, h] = acc[k]
        length = np.where(full, 0, length)
    return Blocks(closed=closed, open=opened)
