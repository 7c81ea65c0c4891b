"""The unit of analysis is the verdict, not the vote (pure).

In a group one verdict can collect a vote from every member, and one text can be pasted by
many people: counted vote by vote, a single text decides a test. So each verdict (interaction)
that got feedback is **one observation**: the majority of the votes cast on it within the hour
of its first vote (a tie goes to the first vote). Votes that come later do not change it: the
hour it is filed in has closed, and the e-process must never see a closed stratum rewritten.
The observation is attributed to its first voter, whose other observations cluster with it.

Texts that are the same or near-identical form one cluster: at most
``max_observations_per_text_day`` observations per text cluster, arm and UTC day count
(:func:`analytics.stats.cap_vote_records`), and the design effect is taken over text clusters
as well as over voters (the larger of the two discounts the evidence).

The bot's experiment reader (:mod:`bot.experiment`) and ``loopbot replay`` both call these.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from analytics.stats import cap_vote_records, design_effect

HOUR_S = 3600
DAY_S = 86400


@dataclass(frozen=True)
class VoteEvent:
    interaction: int
    user: int
    at: float
    correct: bool


@dataclass(frozen=True)
class Observation:
    """One verdict's feedback: filed at ``at`` (its first vote), from ``voter`` (the first
    voter), ``votes`` the votes it stands for."""

    interaction: int
    at: float
    correct: bool
    voter: int
    votes: int


def observations(votes: Sequence[VoteEvent]) -> list[Observation]:
    """One observation per interaction, from votes in time order; returned in time order."""
    by_interaction: dict[int, list[VoteEvent]] = defaultdict(list)
    for vote in votes:
        by_interaction[vote.interaction].append(vote)
    out = []
    for interaction, cast in by_interaction.items():
        first = cast[0]
        hour = int(first.at // HOUR_S)
        same_hour = [v for v in cast if int(v.at // HOUR_S) == hour]
        right = sum(v.correct for v in same_hour)
        wrong = len(same_hour) - right
        correct = first.correct if right == wrong else right > wrong
        out.append(Observation(interaction, first.at, correct, first.user, len(cast)))
    out.sort(key=lambda o: (o.at, o.interaction))
    return out


def cap_per_text_day(obs: Sequence[Observation], cluster_of: Mapping[int, Hashable],
                     arm_of: Mapping[int, int], cap: int) -> list[Observation]:
    """Keep at most ``cap`` observations per text cluster, arm and UTC day (0 = no cap);
    interactions without a known text are clusters of their own."""
    if cap <= 0:
        return list(obs)
    keep = cap_vote_records(
        [((cluster_of.get(o.interaction, ("own", o.interaction)), arm_of[o.interaction]),
          int(o.at // DAY_S)) for o in obs], cap)
    return [o for o, kept in zip(obs, keep, strict=True) if kept]


def clustered_design_effect(obs: Sequence[Observation], arm_of: Mapping[int, int],
                            cluster_of: Mapping[int, Hashable]) -> float:
    """The larger of the design effects by voter and by text cluster (≥ 1)."""
    worst = 1.0
    keys: tuple[Mapping[int, Hashable] | None, ...] = (None, cluster_of)
    for clusters in keys:
        counts: dict[Hashable, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for o in obs:
            key = o.voter if clusters is None else clusters.get(
                o.interaction, ("own", o.interaction))
            arm = arm_of[o.interaction]
            counts[key][2 * arm] += 1
            counts[key][2 * arm + 1] += int(o.correct)
        if counts:
            table = np.array(list(counts.values()), dtype=np.float64)
            worst = max(worst, float(design_effect(table[:, 0], table[:, 1], table[:, 2],
                                                   table[:, 3])))
    return worst


class RunningDesignEffect:
    """:func:`analytics.stats.design_effect` over clusters that grow one observation at a
    time, in O(1) per observation (a replay asks for it at every hourly look).

    Per arm it keeps Σn, Σx, Σn², Σx², Σxn over the clusters and their number, since
    Σ(x − p·n)² = Σx² − 2p·Σxn + p²·Σn²."""

    def __init__(self) -> None:
        self._cells: dict[tuple[Hashable, int], list[int]] = {}
        # Per arm: n, x, n², x², xn, clusters.
        self._sums = [[0.0] * 6 for _ in range(2)]

    def add(self, key: Hashable, arm: int, correct: bool) -> None:
        cell = self._cells.setdefault((key, arm), [0, 0])
        n, x = cell
        c = int(correct)
        s = self._sums[arm]
        s[0] += 1
        s[1] += c
        s[2] += 2 * n + 1
        s[3] += 2 * x * c + c
        s[4] += x + c * n + c
        s[5] += n == 0
        cell[0], cell[1] = n + 1, x + c

    def value(self) -> float:
        robust = binom = 0.0
        for total, right, nn, xx, xn, clusters in self._sums:
            if total <= 0:
                continue
            p = right / total
            resid = xx - 2 * p * xn + p * p * nn
            if clusters > 1:
                robust += clusters / (clusters - 1) * resid / total**2
            binom += p * (1 - p) / total
        return max(1.0, robust / binom) if binom > 0 else 1.0
