from __future__ import annotations

import math

import numpy as np
import pytest

from bot.llm import scoring


def test_log_softmax_matches_the_definition() -> None:
    logits = np.array([1.0, 2.0, 3.0, -50.0], dtype=np.float32)
    expected = logits - math.log(np.exp(logits.astype(np.float64)).sum())
    assert scoring.log_softmax_at(logits, [0, 3]) == pytest.approx([expected[0], expected[3]])


def test_normalise_sums_to_one_and_survives_tiny_values() -> None:
    probs = scoring.normalise({"a": -1000.0, "b": -1001.0, "c": -2000.0})
    assert sum(probs.values()) == pytest.approx(1.0)
    assert probs["a"] == pytest.approx(1 / (1 + math.exp(-1)))
    with pytest.raises(ValueError):
        scoring.normalise({"a": float("-inf")})


def test_pick_breaks_ties_by_label_order() -> None:
    assert scoring.pick({"x": 0.5, "y": 0.5}, ("y", "x")) == "y"
    assert scoring.pick({"x": 0.6, "y": 0.4}, ("y", "x")) == "x"
