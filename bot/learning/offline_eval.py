"""The offline check before canary: candidate and active version classify the same held-out
credible texts; the candidate may go to users only if it is not worse by more than a margin.

Users already told us the right labels of these texts, so a candidate that gets fewer of them
right than the active version would only waste users' time (and risk) in a canary. The
held-out texts must be ones the candidate's examples were *not* drawn from:
:func:`split_holdout` splits deterministically by text, so near-identical copies of a text
always fall on the same side.

The classifier is anything with ``async classify(version, text)`` returning an object with a
``label`` (the real :class:`bot.llm.runtime.ModelRuntime`, or the simulation's stand-in).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from scipy import stats as sps

from analytics.credibility import LabelledText, jaccard, ngrams, normalize
from bot.prompts import PromptVersion


class HasLabel(Protocol):
    @property
    def label(self) -> str: ...


class Classifier(Protocol):
    async def classify(self, version: PromptVersion, text: str) -> HasLabel: ...


@dataclass(frozen=True)
class OfflineResult:
    candidate_id: str
    active_id: str
    n: int
    candidate_correct: int
    active_correct: int
    # Texts only the candidate / only the active version got right.
    wins: int
    losses: int
    margin: float
    passed: bool
    reason: str
    # Exact two-sided McNemar p-value of the paired difference (information for admins; the
    # decision is the margin rule, the canary test decides the rest).
    p_value: float
    errors: int = 0

    @property
    def candidate_accuracy(self) -> float:
        return self.candidate_correct / self.n if self.n else 0.0

    @property
    def active_accuracy(self) -> float:
        return self.active_correct / self.n if self.n else 0.0

    @property
    def difference(self) -> float:
        return self.candidate_accuracy - self.active_accuracy

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(candidate_accuracy=self.candidate_accuracy,
                    active_accuracy=self.active_accuracy, difference=self.difference)
        return data


def _bucket(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x1f{normalize(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_holdout(labelled: Sequence[LabelledText], fraction: float = 0.3, seed: int = 0
                  ) -> tuple[list[LabelledText], list[LabelledText]]:
    """(train, held-out) split by a hash of the normalised text: stable across runs, so a text
    never moves from the held-out side into a prompt later."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    train: list[LabelledText] = []
    held: list[LabelledText] = []
    for item in labelled:
        (held if _bucket(item.text, seed) < fraction else train).append(item)
    return train, held


def mcnemar_p(wins: int, losses: int) -> float:
    n = wins + losses
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * sps.binom.cdf(min(wins, losses), n, 0.5)))


async def evaluate_offline(
    candidate: PromptVersion,
    active: PromptVersion,
    held_out: Sequence[LabelledText],
    classifier: Classifier,
    *,
    margin: float = 0.0,
    min_texts: int = 20,
    max_texts: int = 400,
    # Below the credible set's own near-duplicate bar (0.7): grouping may miss a pair whose
    # shared bigrams are all very common, and such a pair must not straddle the split.
    overlap_similarity: float = 0.6,
) -> OfflineResult:
    """Classify the held-out texts with both versions and apply the margin rule: pass when
    ``candidate_accuracy >= active_accuracy - margin`` on at least ``min_texts`` texts.

    Texts near-identical to one of the candidate's examples are left out (the candidate would
    be graded on its own answer key). A text the runtime fails on counts against nobody.
    """
    example_grams = [ngrams(ex.text) for ex in candidate.examples]
    texts: list[LabelledText] = []
    for item in held_out:
        if item.label not in candidate.label_names or item.label not in active.label_names:
            continue
        grams = ngrams(item.text)
        if any(jaccard(grams, g) >= overlap_similarity for g in example_grams):
            continue
        texts.append(item)
    # When capped, a hash order is a uniform sample. Ordering by confidence would not be:
    # the surest labels are the texts every version already gets right.
    texts.sort(key=lambda t: (_bucket(t.text, 1), t.text))
    texts = texts[:max_texts]
    cand_ok = act_ok = wins = losses = errors = 0
    n = 0
    for item in texts:
        try:
            c = (await classifier.classify(candidate, item.text)).label == item.label
            a = (await classifier.classify(active, item.text)).label == item.label
        except Exception:  # one bad text must not sink the whole check
            errors += 1
            continue
        n += 1
        cand_ok += c
        act_ok += a
        wins += c and not a
        losses += a and not c
    p = mcnemar_p(wins, losses)
    if n < min_texts:
        passed = False
        reason = (f"only {n} held-out credible texts (need {min_texts}): not enough to check "
                  f"{candidate.id} offline")
    else:
        acc_c, acc_a = cand_ok / n, act_ok / n
        passed = acc_c >= acc_a - margin - 1e-12
        verb = "passes" if passed else "refused"
        reason = (f"{candidate.id} {100 * acc_c:.1f}% vs {active.id} {100 * acc_a:.1f}% on {n} "
                  f"held-out credible texts ({wins} won, {losses} lost, McNemar p = "
                  f"{p:.3g}); margin {100 * margin:.1f} points: {verb}")
    return OfflineResult(
        candidate_id=candidate.id, active_id=active.id, n=n, candidate_correct=cand_ok,
        active_correct=act_ok, wins=wins, losses=losses, margin=margin, passed=passed,
        reason=reason, p_value=p if not math.isnan(p) else 1.0, errors=errors,
    )
