"""Fixed-sample statistics over plain counts (pure, numpy/scipy only).

Public API
----------
- ``wilson_interval(correct, votes, confidence=0.95) -> (low, high)``
- ``exact_interval(correct, votes, confidence=0.95) -> (low, high)`` (Clopper–Pearson)
- ``accuracy_summary(votes, correct, confidence=0.95) -> AccuracySummary``: what the admin
  ``/stats`` shows per version (Wilson interval; the exact interval below 30 votes, where the
  Wilson interval's coverage is least reliable).
- ``mantel_haenszel(votes_a, correct_a, votes_b, correct_b) -> MHResult``: the stratified
  Cochran–Mantel–Haenszel test of "candidate (b) better than active (a)", one stratum per
  hour. Inputs are arrays ``(..., hours)``; the result is vectorised over the leading axes.
  ``mantel_haenszel_running`` gives the same test after every hour.
- ``cap_votes_per_user_day(user_ids, day_ids, cap) -> bool mask``: keeps each user's first
  ``cap`` votes per day (rows in time order), so one enthusiastic user cannot swing a test.
- ``design_effect(user_votes_a, user_correct_a, user_votes_b, user_correct_b) -> array``:
  how much users' personal vote biases inflate the variance (≥ 1); the engine discounts its
  evidence by it.
- ``srm_test(served_a, served_b, planned_share) -> float``: the classic fixed-sample
  chi-square p-value of the split (for display; the engine's guard is the always-valid
  e-process in ``analytics.sequential``).

Why stratify: the candidate's share ramps while the base accuracy drifts with the time of day,
so votes pooled across hours compare different mixes of hours between the arms. Conditioning
on each hour's margins removes that confounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(sps.norm.ppf(0.5 + confidence / 2.0))


def _check_counts(correct: int, votes: int) -> None:
    if votes < 0 or correct < 0 or correct > votes:
        raise ValueError(f"need 0 <= correct <= votes, got correct={correct}, votes={votes}")


def wilson_interval(correct: int, votes: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion; (0, 1) when there are no votes."""
    _check_counts(correct, votes)
    if votes == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = correct / votes
    denom = 1.0 + z * z / votes
    centre = (p + z * z / (2 * votes)) / denom
    half = z * np.sqrt(p * (1 - p) / votes + z * z / (4 * votes * votes)) / denom
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def exact_interval(correct: int, votes: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson interval: conservative, exact coverage for any sample size."""
    _check_counts(correct, votes)
    if votes == 0:
        return 0.0, 1.0
    a = 1.0 - confidence
    low = 0.0 if correct == 0 else float(sps.beta.ppf(a / 2, correct, votes - correct + 1))
    high = 1.0 if correct == votes else float(sps.beta.ppf(1 - a / 2, correct + 1, votes - correct))
    return low, high


@dataclass(frozen=True)
class AccuracySummary:
    votes: int
    correct: int
    accuracy: float | None  # None without votes: "no data" is not 0%
    low: float
    high: float
    method: str  # "wilson" or "exact"


# Below this the Wilson interval can undercover near 0/1; the exact one is cheap anyway.
EXACT_BELOW_VOTES = 30


def accuracy_summary(votes: int, correct: int, confidence: float = 0.95) -> AccuracySummary:
    """Accuracy = correct / votes with a 95% interval, as the admin ``/stats`` shows it."""
    _check_counts(correct, votes)
    if votes < EXACT_BELOW_VOTES:
        low, high = exact_interval(correct, votes, confidence)
        method = "exact"
    else:
        low, high = wilson_interval(correct, votes, confidence)
        method = "wilson"
    return AccuracySummary(
        votes=votes,
        correct=correct,
        accuracy=correct / votes if votes else None,
        low=low,
        high=high,
        method=method,
    )


@dataclass(frozen=True)
class MHResult:
    """Cochran–Mantel–Haenszel test, vectorised over the leading axes of the inputs.

    ``z`` > 0 means the candidate (b) is more often correct than the active version (a) within
    hours; ``odds_ratio`` is the Mantel–Haenszel common odds ratio of b vs a.
    """

    z: FloatArray
    odds_ratio: FloatArray
    p_one_sided: FloatArray  # P(Z >= z) under no difference: the promotion p-value


def mh_terms(
    votes_a: npt.ArrayLike,
    correct_a: npt.ArrayLike,
    votes_b: npt.ArrayLike,
    correct_b: npt.ArrayLike,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
    """Per-stratum observed, expected, variance, and the MH odds-ratio numerator/denominator.

    Sums of these over strata, passed to ``mh_from_sums``, give the test on those strata.
    """
    n_a = np.asarray(votes_a, dtype=np.float64)
    x_a = np.asarray(correct_a, dtype=np.float64)
    n_b = np.asarray(votes_b, dtype=np.float64)
    x_b = np.asarray(correct_b, dtype=np.float64)
    n = n_a + n_b
    s = x_a + x_b
    safe_n = np.where(n > 0, n, 1.0)
    safe_n1 = np.where(n > 1, n, 2.0)
    expected = n_b * s / safe_n
    # Conditional (hypergeometric) variance of x_b given the hour's margins.
    var = np.where(n > 1, n_a * n_b * s * (n - s) / (safe_n1**2 * (safe_n1 - 1)), 0.0)
    num = x_b * (n_a - x_a) / safe_n
    den = x_a * (n_b - x_b) / safe_n
    return x_b, expected, var, num, den


def mh_from_sums(
    obs: FloatArray, expected: FloatArray, var: FloatArray, num: FloatArray, den: FloatArray
) -> MHResult:
    root = np.sqrt(np.where(var > 0, var, 1.0))
    z = np.asarray(np.where(var > 0, (obs - expected) / root, 0.0), dtype=np.float64)
    odds = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 1.0))
    return MHResult(
        z=z,
        odds_ratio=np.asarray(odds, dtype=np.float64),
        p_one_sided=np.asarray(sps.norm.sf(z), dtype=np.float64),
    )


def mantel_haenszel(
    votes_a: npt.ArrayLike,
    correct_a: npt.ArrayLike,
    votes_b: npt.ArrayLike,
    correct_b: npt.ArrayLike,
    axis: int = -1,
) -> MHResult:
    """Stratified test over the strata along ``axis`` (one stratum per hour).

    Uses the conditional (hypergeometric) mean and variance of ``correct_b`` given each hour's
    margins, which stays valid when strata are sparse (a few votes per hour) as long as the
    total is large: the sparse-data asymptotics that make MH the right tool here.
    """
    terms = mh_terms(votes_a, correct_a, votes_b, correct_b)
    obs, exp_, var, num, den = (np.asarray(t.sum(axis=axis), dtype=np.float64) for t in terms)
    return mh_from_sums(obs, exp_, var, num, den)


def mantel_haenszel_running(
    votes_a: npt.ArrayLike,
    correct_a: npt.ArrayLike,
    votes_b: npt.ArrayLike,
    correct_b: npt.ArrayLike,
) -> MHResult:
    """The MH test after every hour (hours on the last axis): what each look would compute."""
    terms = mh_terms(votes_a, correct_a, votes_b, correct_b)
    obs, exp_, var, num, den = (np.cumsum(t, axis=-1) for t in terms)
    return mh_from_sums(obs, exp_, var, num, den)


def cap_votes_per_user_day(
    user_ids: npt.ArrayLike, day_ids: npt.ArrayLike, cap: int
) -> npt.NDArray[np.bool_]:
    """Mask keeping each (user, day)'s first ``cap`` votes; rows must be in time order.

    Vectorised (a stable sort and a group rank), so the bot's per-hour aggregation and the
    simulation's millions of simulated votes use the same rule. ``cap`` <= 0 disables it.
    Extra leading keys (e.g. a simulation run index) can be folded into ``user_ids``.
    """
    users = np.asarray(user_ids, dtype=np.int64).ravel()
    days = np.asarray(day_ids, dtype=np.int64).ravel()
    if users.shape != days.shape:
        raise ValueError("user_ids and day_ids must have the same length")
    if cap <= 0 or users.size == 0:
        return np.ones(users.shape, dtype=bool)
    order = np.lexsort((np.arange(users.size), days, users))
    su, sd = users[order], days[order]
    new_group = np.ones(users.size, dtype=bool)
    new_group[1:] = (su[1:] != su[:-1]) | (sd[1:] != sd[:-1])
    starts = np.flatnonzero(new_group)
    group_start = np.repeat(starts, np.diff(np.append(starts, users.size)))
    rank = np.arange(users.size) - group_start
    keep = np.empty(users.size, dtype=bool)
    keep[order] = rank < cap
    return keep


def cap_vote_records(
    records: list[tuple[Any, int]], cap: int
) -> list[bool]:
    """List form for the store: ``records`` are (user key, day index) in time order."""
    if not records:
        return []
    keys: dict[Any, int] = {}
    users = [keys.setdefault(user, len(keys)) for user, _ in records]
    days = [day for _, day in records]
    return [bool(k) for k in cap_votes_per_user_day(users, days, cap)]


def srm_test(served_a: int, served_b: int, planned_share: float) -> float:
    """Fixed-sample chi-square p-value of the split ``served_b / total`` vs ``planned_share``."""
    if not 0.0 < planned_share < 1.0:
        raise ValueError(f"planned_share must be in (0, 1), got {planned_share}")
    total = served_a + served_b
    if total == 0:
        return 1.0
    expected = np.array([total * (1 - planned_share), total * planned_share])
    chi2 = float((((np.array([served_a, served_b]) - expected) ** 2) / expected).sum())
    return float(sps.chi2.sf(chi2, df=1))


def design_effect(
    user_votes_a: npt.ArrayLike,
    user_correct_a: npt.ArrayLike,
    user_votes_b: npt.ArrayLike,
    user_correct_b: npt.ArrayLike,
    axis: int = -1,
) -> FloatArray:
    """Variance inflation of the accuracy difference caused by votes clustering by user.

    Inputs are per-user (capped) vote and correct counts of each arm along ``axis``. The
    cluster-robust (user-level) variance of each arm's accuracy is compared with the binomial
    one that treats votes as independent; the result is ``(V_a + V_b) / (B_a + B_b)``, at
    least 1 (evidence is only ever discounted, never inflated). Independent votes — one per
    user — give 1 (up to the small-sample factor C / (C − 1)).
    """
    parts = []
    for votes, correct in ((user_votes_a, user_correct_a), (user_votes_b, user_correct_b)):
        n = np.asarray(votes, dtype=np.float64)
        x = np.asarray(correct, dtype=np.float64)
        total = n.sum(axis=axis)
        safe = np.where(total > 0, total, 1.0)
        p = x.sum(axis=axis) / safe
        users = (n > 0).sum(axis=axis).astype(np.float64)
        resid = ((x - np.expand_dims(p, axis) * n) ** 2).sum(axis=axis)
        robust = np.where(users > 1, users / np.maximum(users - 1, 1) * resid / safe**2, 0.0)
        binom = np.where(total > 0, p * (1 - p) / safe, 0.0)
        parts.append((robust, binom))
    robust = parts[0][0] + parts[1][0]
    binom = parts[0][1] + parts[1][1]
    deff = np.where(binom > 0, robust / np.where(binom > 0, binom, 1.0), 1.0)
    return np.asarray(np.maximum(deff, 1.0), dtype=np.float64)
