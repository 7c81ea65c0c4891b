"""Label scoring: turn per-token log-probabilities into a verdict over the configured labels.

Kept apart from the backends so that the arithmetic is tested without a model, and every
backend normalises the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt


def log_softmax_at(logits: npt.NDArray[np.float32], token_ids: Sequence[int]) -> list[float]:
    """log p(token) under softmax(logits) for a few tokens, without materialising the softmax."""
    row = logits.astype(np.float64, copy=False)
    peak = float(row.max())
    log_norm = peak + math.log(float(np.exp(row - peak).sum()))
    return [float(row[t]) - log_norm for t in token_ids]


def normalise(label_logprobs: Mapping[str, float]) -> dict[str, float]:
    """Softmax over whole-label sequence log-probabilities: the labels' shares sum to 1."""
    if not label_logprobs:
        raise ValueError("no labels to normalise")
    peak = max(label_logprobs.values())
    if not math.isfinite(peak):
        raise ValueError("label log-probabilities are not finite")
    weights = {label: math.exp(lp - peak) for label, lp in label_logprobs.items()}
    total = sum(weights.values())
    return {label: w / total for label, w in weights.items()}


def pick(probabilities: Mapping[str, float], order: Sequence[str]) -> str:
    """The most probable label; ties go to the label listed first (deterministic)."""
    return max(order, key=lambda label: (probabilities[label], -order.index(label)))
