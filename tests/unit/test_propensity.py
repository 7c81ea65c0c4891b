"""Who votes by correctness: the per-arm θ = r_right / r_wrong through the confidence bands."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from analytics.propensity import (
    calibration_contrast,
    calibration_differs,
    propensity_contrast,
    propensity_ratio,
    selection_contrast,
)

# Bands of different accuracy (low, middle, high confidence), as the bot's are.
ACCURACY = np.array([0.45, 0.75, 0.92])


def expected_counts(served: float, accuracy: np.ndarray, r_right: float,
                    r_wrong: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.full(accuracy.shape, served)
    return n, n * accuracy * r_right, n * (1 - accuracy) * r_wrong


@pytest.mark.parametrize(("r_right", "r_wrong"), [(0.35, 0.35), (0.4, 0.2), (0.1, 0.5),
                                                  (0.9, 0.05)])
@pytest.mark.parametrize("accuracy", [ACCURACY, np.array([0.2, 0.5, 0.99]),
                                      np.array([0.6, 0.9])])
def test_recovers_theta_whatever_the_bands_accuracies(r_right: float, r_wrong: float,
                                                      accuracy: np.ndarray) -> None:
    log_theta, var = propensity_ratio(*expected_counts(1e7, accuracy, r_right, r_wrong))
    assert float(log_theta) == pytest.approx(math.log(r_right / r_wrong), abs=1e-3)
    assert 0 < float(var) < 1e-3


def test_the_contrast_ignores_a_real_accuracy_gain_and_a_common_vote_rate() -> None:
    # The candidate is right more often in every band and voted on twice as often, but its
    # voters pick right and wrong verdicts as the active's do: no bias, no evidence of one.
    arm_a = expected_counts(1e6, ACCURACY, 0.3, 0.45)
    arm_b = expected_counts(1e6, np.array([0.6, 0.85, 0.97]), 0.6, 0.9)
    log_ratio, z = propensity_contrast(arm_a, arm_b)
    assert abs(float(log_ratio)) < 0.01 and abs(float(z)) < 1
    # Right verdicts voted 1.125× and wrong ones 0.5×: equal overall rates, ratio 2.25.
    biased = expected_counts(1e6, ACCURACY, 0.35 * 1.125, 0.35 * 0.5)
    log_ratio, z = propensity_contrast(expected_counts(1e6, ACCURACY, 0.35, 0.35), biased)
    assert float(log_ratio) == pytest.approx(math.log(2.25), abs=0.01) and float(z) > 10
    _, z_down = propensity_contrast(biased, expected_counts(1e6, ACCURACY, 0.35, 0.35))
    assert float(z_down) == pytest.approx(-float(z))


def test_z_is_standard_normal_when_voters_select_alike() -> None:
    # Sampled counts, 1000 runs of about a week at 20 votes an hour, the arms alike except
    # for their accuracy and overall vote rate: the z the engine's hold bars assume.
    rng = np.random.default_rng(3)
    runs = 4000
    zs = []
    # Both arms' voters favour wrong verdicts alike (θ = 2/3); the candidate is more accurate
    # and voted on 1.4× as often overall.
    for accuracy, r_right, r_wrong, scale in ((ACCURACY, 0.3, 0.45, 1.0),
                                              (np.array([0.55, 0.8, 0.95]), 0.3, 0.45, 1.4)):
        served = np.full((runs, 3), 1500.0)
        right = rng.binomial(served.astype(np.int64), accuracy)
        correct = rng.binomial(right, min(1.0, r_right * scale))
        wrong = rng.binomial(served.astype(np.int64) - right, min(1.0, r_wrong * scale))
        zs.append((served, correct.astype(float), wrong.astype(float)))
    _, z = propensity_contrast(zs[0], zs[1])
    assert abs(z.mean()) < 0.1 and z.std() == pytest.approx(1.0, abs=0.1)
    assert (z >= 2.5).mean() < 0.015


def test_undetermined_bands_give_no_evidence() -> None:
    # One band only, bands of one accuracy, no votes: θ is not identified, z is 0.
    one = expected_counts(1e6, np.array([0.8]), 0.5, 0.2)
    flat = expected_counts(1e6, np.array([0.8, 0.8, 0.8]), 0.5, 0.2)
    empty = (np.full(3, 100.0), np.zeros(3), np.zeros(3))
    for arm in (one, flat, empty):
        log_theta, var = propensity_ratio(*arm)
        assert math.isnan(float(log_theta)) and math.isnan(float(var))
        log_ratio, z = propensity_contrast(arm, expected_counts(1e6, ACCURACY, 0.5, 0.2))
        assert float(log_ratio) == 0.0 and float(z) == 0.0


def test_vectorised_over_runs_and_hours() -> None:
    rng = np.random.default_rng(5)
    served = rng.poisson(400, (7, 11, 3)).astype(float)
    right = rng.binomial(served.astype(np.int64), ACCURACY)
    correct = rng.binomial(right, 0.4).astype(float)
    wrong = rng.binomial(served.astype(np.int64) - right, 0.3).astype(float)
    log_theta, var = propensity_ratio(served, correct, wrong)
    assert log_theta.shape == var.shape == (7, 11)
    single = propensity_ratio(served[2, 3], correct[2, 3], wrong[2, 3])
    assert float(single[0]) == pytest.approx(log_theta[2, 3])


# Shared calibration: where right and wrong verdicts fall among the bands, both arms alike.
BANDS_IF_RIGHT = np.array([0.10, 0.30, 0.60])
BANDS_IF_WRONG = np.array([0.45, 0.35, 0.20])


def calibrated_counts(served: float, accuracy: float, r_right: float,
                      r_wrong: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    right = served * accuracy * BANDS_IF_RIGHT
    wrong = served * (1 - accuracy) * BANDS_IF_WRONG
    return right + wrong, right * r_right, wrong * r_wrong


def sampled_arm(rng: np.random.Generator, runs: int, served: int, accuracy: float,
                r_right: float, r_wrong: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    right = rng.binomial(served, accuracy, runs)
    in_right = rng.multinomial(right, BANDS_IF_RIGHT)
    in_wrong = rng.multinomial(served - right, BANDS_IF_WRONG)
    return ((in_right + in_wrong).astype(float),
            rng.binomial(in_right, r_right).astype(float),
            rng.binomial(in_wrong, r_wrong).astype(float))


@pytest.mark.parametrize(("accuracy_b", "theta_a", "theta_b"),
                         [(0.8, 1.0, 1.0), (0.9, 1.0, 1.0), (0.75, 0.5, 0.5), (0.8, 1.0, 2.25),
                          (0.85, 0.5, 1.5), (0.8, 1.0, 1 / 1.5)])
def test_calibration_contrast_is_the_voters_odds_ratio_less_the_served_one(
        accuracy_b: float, theta_a: float, theta_b: float) -> None:
    # Exact counts: the served verdicts' bands place each arm's accuracy, and what is left of
    # the voters' odds ratio is selection, whatever the real gain.
    arm_a = calibrated_counts(1e6, 0.8, 0.3 * theta_a, 0.3)
    arm_b = calibrated_counts(1e6, accuracy_b, 0.2 * theta_b, 0.2)
    log_ratio, z = calibration_contrast(arm_a, arm_b)
    assert float(log_ratio) == pytest.approx(math.log(theta_b / theta_a), abs=1e-6)
    assert (abs(float(z)) > 10) == (theta_a != theta_b)


@pytest.mark.parametrize("contrast", [calibration_contrast, selection_contrast])
def test_z_is_standard_normal_under_shared_calibration(contrast: Any) -> None:
    # About two days at 20 votes an hour; the candidate 5 points better, both arms' voters
    # favouring wrong verdicts alike and the candidate voted more overall.
    rng = np.random.default_rng(11)
    arm_a = sampled_arm(rng, 6000, 1400, 0.8, 0.3, 0.45)
    arm_b = sampled_arm(rng, 6000, 1400, 0.85, 0.36, 0.54)
    _, z = contrast(arm_a, arm_b)
    assert abs(z.mean()) < 0.1 and z.std() == pytest.approx(1.0, abs=0.1)
    assert (z >= 2.5).mean() < 0.015


def test_both_estimates_together_see_selection_sooner_than_either() -> None:
    # Right verdicts voted 1.125× and wrong ones 0.5× on the candidate (equal overall rates,
    # a fake 10-point gain), two days at 20 votes an hour.
    rng = np.random.default_rng(12)
    arm_a = sampled_arm(rng, 4000, 1400, 0.8, 0.35, 0.35)
    arm_b = sampled_arm(rng, 4000, 1400, 0.8, 0.35 * 1.125, 0.35 * 0.5)
    means = {f.__name__: float(np.mean(f(arm_a, arm_b)[1]))
             for f in (propensity_contrast, calibration_contrast, selection_contrast)}
    assert means["propensity_contrast"] < means["calibration_contrast"] < means[
        "selection_contrast"]
    assert means["selection_contrast"] > 3.0


def test_calibration_contrast_undetermined_gives_no_evidence() -> None:
    good = calibrated_counts(1e6, 0.8, 0.3, 0.3)
    no_votes = (good[0], np.zeros(3), np.zeros(3))
    # Bands that say nothing about rightness: right and wrong verdicts spread alike.
    flat = (np.full(3, 1e6), np.full(3, 3e5), np.full(3, 1e5))
    for arm in (no_votes, flat):
        log_ratio, z = calibration_contrast(arm, flat if arm is flat else good)
        assert float(log_ratio) == 0.0 and float(z) == 0.0


def test_selection_contrast_uses_what_is_determined() -> None:
    # Three bands of different accuracy: both estimates, combined; the same verdicts in one
    # band: neither is determined, so no evidence.
    arm_a = calibrated_counts(1e6, 0.8, 0.3, 0.3)
    arm_b = calibrated_counts(1e6, 0.8, 0.3 * 1.5, 0.3)
    log_ratio, z = selection_contrast(arm_a, arm_b)
    assert float(log_ratio) == pytest.approx(math.log(1.5), abs=1e-3) and float(z) > 10
    def one_band(arm: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
        return tuple(np.array([x.sum()]) for x in arm)

    n_a, c_a, w_a = one_band(arm_a)
    n_b, c_b, w_b = one_band(arm_b)
    log_ratio, z = selection_contrast((n_a, c_a, w_a), (n_b, c_b, w_b))
    assert float(log_ratio) == 0.0 and float(z) == 0.0


def test_a_candidate_calibrated_otherwise_falls_back_to_the_line_fit() -> None:
    # The candidate's wrong verdicts land in the high band as often as its right ones: its
    # served bands no longer measure its accuracy the way the active's do. The votes' band
    # profiles show it, and only the line fit (which does not assume it) speaks.
    rng = np.random.default_rng(13)
    runs, served = 2000, 3000
    arm_a = sampled_arm(rng, runs, served, 0.8, 0.35, 0.35)
    right = rng.binomial(served, 0.8, runs)
    in_right = rng.multinomial(right, BANDS_IF_RIGHT)
    in_wrong = rng.multinomial(served - right, BANDS_IF_RIGHT)  # as sure when wrong
    arm_b = ((in_right + in_wrong).astype(float), rng.binomial(in_right, 0.35).astype(float),
             rng.binomial(in_wrong, 0.35).astype(float))
    assert calibration_differs(arm_a, arm_b).mean() > 0.95
    log_cal, z_cal = calibration_contrast(arm_a, arm_b)
    differs = calibration_differs(arm_a, arm_b)
    assert (z_cal[differs] == 0).all() and (log_cal[differs] == 0).all()
    line = propensity_contrast(arm_a, arm_b)
    combined = selection_contrast(arm_a, arm_b)
    np.testing.assert_array_equal(combined[1][differs], line[1][differs])


def test_the_calibration_check_rarely_rejects_shared_calibration() -> None:
    rng = np.random.default_rng(14)
    arm_a = sampled_arm(rng, 20000, 3000, 0.8, 0.3, 0.45)
    arm_b = sampled_arm(rng, 20000, 3000, 0.85, 0.4, 0.6)
    assert calibration_differs(arm_a, arm_b).mean() < 0.003


def test_too_few_observations_give_no_calibration_evidence() -> None:
    # A handful of votes: the delta-method variance, a sum of terms of both signs, would come
    # out near zero (z ≈ −14 here before the minimum was required).
    arm_a = (np.array([1.0, 3, 6]), np.array([0.0, 1, 2]), np.array([1.0, 0, 0]))
    arm_b = (np.array([0.0, 4, 6]), np.array([0.0, 0, 1]), np.array([0.0, 1, 0]))
    log_ratio, z = calibration_contrast(arm_a, arm_b)
    assert float(log_ratio) == 0.0 and float(z) == 0.0
