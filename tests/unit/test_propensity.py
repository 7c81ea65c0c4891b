"""Who votes by correctness: the per-arm θ = r_right / r_wrong through the confidence bands."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analytics.propensity import propensity_contrast, propensity_ratio

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
