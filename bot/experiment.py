"""The I/O half of the decision engine: database -> snapshots -> ``decide`` -> version state.

:mod:`analytics.decide` is pure (hourly aggregates in, a decision out). This module reads what
it needs from the store, one :class:`~analytics.decide.ExperimentSnapshot` per candidate, and
applies the decision through :mod:`bot.versions`, the only writer of version state, so every
change commits in one transaction together with its audit entry and the statistics behind it.
The scheduled job (:mod:`bot.telegram.jobs`), ``loopbot analyze`` and ``/stats`` all call
:func:`analyze`, so they reach the same decision on the same data.

What an experiment is, as read from the database
------------------------------------------------
- Arm A = the active version, arm B = the candidate. The test starts at the later of the
  candidate's ``state_since`` (set by ``/canary`` on a new candidate and reset when its file
  changes) and the active version's ``state_since``: after a promotion the other candidates
  are compared with a different active version, so their old evidence does not count.
- Hours are absolute UTC hours (Unix time // 3600). Only completed hours enter: the current
  hour is still filling up, and the e-process multiplies one factor per closed stratum.
- Verdicts served, new users and reply latency are counted in the hour of the interaction;
  votes and reactions in the hour they were cast. Late feedback therefore lands in a later
  stratum instead of rewriting a closed one, which keeps the e-process a process over time.
- Each voter's votes per UTC day beyond ``max_votes_per_user_day`` are dropped (across both
  arms, in time order): one enthusiastic user must not swing a test.
- New users (first interaction with A or B since the test started) feed the sample-ratio
  test. Their planned share is the candidate's share when they arrived, taken from the audit
  log, conditioned on landing in A or B (other candidates take their own slices).
- Each arm's scorers: which scorer (model file or inference server, ``interactions.scorer``)
  produced the verdicts the evidence counts, and how many each. Verdicts stored before
  scorers were recorded count as one scorer, "unrecorded". Arms scored differently are held,
  not decided (:func:`analytics.decide.decide`, rule ``SCORER_MISMATCH``), and the admins
  are told once.
- The paired comparison (``experiment.paired_comparison``): the scheduled job first scores
  every voted verdict of the test with the other arm's prompt (:mod:`bot.pairing`, table
  ``paired_labels``). Each observation counted above whose verdict was so scored, by the
  scorer that made the verdict, is counted again by its vote and by whether the other prompt
  gave the same label (``HourStats.paired_*``, in the observation's hour). It needs prompts
  whose labels correspond (:func:`bot.prompts.label_correspondence`); without, the test is
  decided on its votes alone (``ExperimentSnapshot.paired`` False).

How decisions are applied
-------------------------
- promote -> :func:`bot.versions.promote` (the candidate becomes active, the old active is
  retired and remembered as the rollback target);
- revert and retire -> :func:`bot.versions.retire` of the candidate (the active version
  stays);
- ramp -> :func:`bot.versions.set_canary` with the new share (the range grows, users stay);
- freeze -> :func:`bot.versions.retire` too: share 0. A sample-ratio mismatch means routing
  or logging is broken, so nobody knows what the candidate's users really got; serving the
  active version to everyone is the known-safe state until a person has looked, and a frozen
  candidate that kept its share would trip the same alarm every hour. ``/canary`` starts a
  fresh test once the cause is fixed. The audit entry's ``stats.decision`` says "freeze";
- hold that restarts a test (the candidate's file changed) ->
  :func:`bot.versions.restart_edited`;
- hold -> nothing is written.

Every audit entry's ``stats`` holds the decision's statistics plus ``decision`` (the engine's
action), ``rule`` and ``now_hour``. The state is re-read right before a write and the write
is skipped if the experiment changed since the snapshot (an admin acted meanwhile).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from analytics.credibility import group_texts
from analytics.decide import (
    BAND_EDGES,
    Action,
    Decision,
    DecisionConfig,
    ExperimentSnapshot,
    HourStats,
    Rule,
    band_of,
    decide,
)
from analytics.observations import (
    Observation,
    VoteEvent,
    cap_per_text_day,
    clustered_design_effect,
    observations,
)
from analytics.stats import cap_vote_records
from bot import routing, versions
from bot.prompts import PromptVersion, label_correspondence
from bot.store.db import Database
from bot.store.experiments import (
    ExperimentReader,
    PairedRow,
    ReactionRow,
    ServedRow,
    VoteRow,
)
from bot.store.outbox import Outgoing
from bot.texts import decisions as texts

log = logging.getLogger(__name__)

HOUR_S = 3600
DAY_S = 86400
ENGINE_ACTOR = "engine"
# Texts this similar (Jaccard of character bigrams) are one cluster, as in credibility.
NEAR_DUPLICATE = 0.7
# Audit actions the share timeline reads: these set a candidate's share, all others end it.
_SHARE_ACTIONS = ("canary", "restart")
# Holds the admins are told about once per test (and bot run), not at every look: the test
# stays held until a person acts, and saying so every hour would drown the other messages.
TELL_ONCE = (Rule.SCORER_MISMATCH,)


@dataclass(frozen=True)
class Experiment:
    """One candidate's test as the database describes it, and its snapshot for ``decide``."""

    snapshot: ExperimentSnapshot
    # Unix time the comparison starts (see the module docstring).
    start: float
    # What the write is checked against: the state must still be this when it is applied.
    candidate: versions.VersionState
    active: versions.VersionState
    # Per arm (active, candidate): votes cast after the per-user cap, and the observations
    # (one per verdict, after the per-text cap) the engine counts.
    raw_votes: tuple[int, int] = (0, 0)
    observations: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Outcome:
    """What the engine decided for one candidate and what it did about it."""

    candidate_id: str
    active_id: str
    decision: Decision
    # Why, in words (from the decision's rule and numbers).
    reason: str
    # True when the decision was written (dry runs and holds write nothing).
    applied: bool
    audit_id: int | None
    # The admin message: action, reason and the numbers behind it.
    message: str
    # Set when applying failed (the state is unchanged: each write is one transaction).
    error: str | None = None
    snapshot: ExperimentSnapshot | None = None
    # Per arm (active, candidate): votes cast (after the per-user cap) and the
    # observations the engine counts (one per verdict, after the per-text cap).
    raw_votes: tuple[int, int] = (0, 0)
    observations: tuple[int, int] = (0, 0)
    # The admins' message went into the outbox with the decision (``analyze(notify=...)``):
    # the sender delivers it, nobody sends it again.
    noted: bool = False

    @property
    def action(self) -> Action:
        return self.decision.action

    @property
    def notable(self) -> bool:
        """Worth a message to the admins: anything but a plain hold (a hold that needs a
        person, e.g. arms scored by different scorers, is worth one: see :attr:`tell_once`)."""
        return self.error is not None or self.decision.action is not Action.HOLD or (
            self.decision.restart) or self.decision.rule in TELL_ONCE

    @property
    def tell_once(self) -> tuple[str, str, int, str] | None:
        """For a hold that repeats at every look until a person acts: what identifies it
        (candidate, active, the test's start hour, rule), so that the admins are told once
        per test, not every hour. None: tell every time it is notable."""
        if (self.error is not None or self.decision.action is not Action.HOLD
                or self.decision.rule not in TELL_ONCE):
            return None
        start = self.snapshot.start_hour if self.snapshot is not None else -1
        return (self.candidate_id, self.active_id, start, str(self.decision.rule))

    @property
    def scorers(self) -> tuple[Mapping[str, int], Mapping[str, int]]:
        """Per arm (active, candidate): scorer → verdicts it scored among the observations."""
        if self.snapshot is None:
            return {}, {}
        return self.snapshot.scorers_a, self.snapshot.scorers_b

    def stats_lines(self) -> list[str]:
        """The ``/stats`` block of this experiment: arms, evidence, the next step."""
        return texts.stats_lines(self.candidate_id, self.active_id, self.snapshot,
                                 self.decision, self.reason)

    def to_json(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate_id, "active": self.active_id,
            "action": self.decision.action, "rule": self.decision.rule,
            "reason": self.reason, "new_share": self.decision.new_share,
            "restart": self.decision.restart, "applied": self.applied,
            "audit_id": self.audit_id, "error": self.error, "message": self.message,
            "next_step": texts.next_step(self.decision, self.reason),
            "stats": self.decision.stats_json(),
            "observations": {"active": self.observations[0], "candidate": self.observations[1]},
            "raw_votes": {"active": self.raw_votes[0], "candidate": self.raw_votes[1]},
            "scorers": {"active": dict(self.scorers[0]), "candidate": dict(self.scorers[1])},
        }


# ------------------------------------------------------------------------------ share timeline


@dataclass(frozen=True)
class ShareTimeline:
    """Each version's candidate share over time, replayed from the audit log."""

    changes: Mapping[str, Sequence[tuple[float, float]]]

    @classmethod
    def from_audit(cls, entries: Iterable[versions.AuditEntry]) -> ShareTimeline:
        changes: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for e in sorted(entries, key=lambda e: e.id):
            changes[e.version_id].append(
                (e.at, e.share if e.action in _SHARE_ACTIONS and e.to_state == versions.CANDIDATE
                 else 0.0))
            if e.previous_active and e.previous_active != e.version_id and e.action in (
                    "promote", "rollback"):
                changes[e.previous_active].append((e.at, 0.0))
        return cls(dict(changes))

    def share_at(self, version_id: str, at: float, default: float = 0.0) -> float:
        share = default
        for when, value in self.changes.get(version_id, ()):
            if when > at:
                break
            share = value
        return share

    def max_concurrent(self, since: float, until: float) -> int:
        """Most candidates served at once in [since, until]: the error budget is split by
        this, so every look of a test used the same, valid threshold."""
        moments = [since] + [when for changes in self.changes.values()
                             for when, _ in changes if since <= when <= until]
        return max(sum(self.share_at(v, at) > 0 for v in self.changes) for at in moments)

    def conditional_share(self, candidate: versions.VersionState, others: Sequence[str],
                          at: float) -> float:
        """P(arm B | the user is served by A or B) at ``at``: other candidates' slices are
        outside this comparison."""
        own = self.share_at(candidate.version_id, at, default=candidate.share)
        rest = 1.0 - sum(self.share_at(o, at) for o in others)
        return own / rest if rest > 0 else own


# ------------------------------------------------------------------------------ snapshots


@dataclass
class _Hour:
    votes: list[int]
    correct: list[int]
    served: list[int]
    new_users: list[int]
    new_share_sum: float
    up: list[int]
    down: list[int]
    latency_n: list[int]
    latency_sum: list[float]
    # [arm][band]: served verdicts, observations, correct observations.
    band_served: list[list[int]]
    band_observed: list[list[int]]
    band_correct: list[list[int]]
    # [arm]: the paired comparison's counts (HourStats.paired_*): observations voted right
    # and scored by the other prompt, those it gave another label; voted wrong and scored,
    # those it gave the same label.
    paired: list[list[int]]

    @classmethod
    def empty(cls) -> _Hour:
        width = len(BAND_EDGES) + 1
        return cls([0, 0], [0, 0], [0, 0], [0, 0], 0.0, [0, 0], [0, 0], [0, 0], [0.0, 0.0],
                    [[0] * width, [0] * width], [[0] * width, [0] * width],
                    [[0] * width, [0] * width], [[0] * 4, [0] * 4])


def experiment_start(candidate: versions.VersionState, active: versions.VersionState) -> float:
    return max(candidate.since, active.since)


async def build_experiment(
    db: Database, deployment: versions.Deployment, candidate: versions.VersionState,
    prompt_versions: Mapping[str, PromptVersion], config: DecisionConfig, now: float,
    timeline: ShareTimeline,
) -> Experiment:
    """The candidate's experiment at ``now``: completed hours since the test started."""
    active = deployment.active
    assert active is not None
    a_id, b_id = active.version_id, candidate.version_id
    start = experiment_start(candidate, active)
    now_hour = int(now // HOUR_S)
    end = now_hour * HOUR_S
    reader = ExperimentReader(db)
    arms = _Arms({a_id: 0, b_id: 1}, candidate,
                 # Every other version that held a candidate share at some time, running now
                 # or not: a past hour is judged by the slices served then (share_at is 0
                 # outside their periods).
                 [v for v in timeline.changes if v not in (a_id, b_id)], timeline)
    hours: dict[int, _Hour] = defaultdict(_Hour.empty)
    served = await reader.served(a_id, b_id, start, end)
    _count_served(hours, arms, served,
                  await reader.first_interaction_ids(a_id, b_id, start, end))
    pairing = Pairing.of(prompt_versions.get(a_id), prompt_versions.get(b_id))
    paired = config.paired_comparison and pairing.comparable
    other_labels = (pairing.other_labels(
        served, await reader.paired_labels(a_id, b_id, start, end)) if paired else {})
    evidence = _observe(hours, arms, served, await reader.votes(a_id, b_id, start, end),
                        config, other_labels)
    _count_reactions(hours, arms, await reader.reply_reactions(a_id, b_id, start, end))
    version = prompt_versions.get(b_id)
    snapshot = ExperimentSnapshot(
        active_id=a_id, candidate_id=b_id, planned_share=candidate.share,
        start_hour=int(start // HOUR_S), now_hour=now_hour, strata=_strata(hours, arms),
        concurrent_candidates=max(len(deployment.candidates),
                                  timeline.max_concurrent(start, now)),
        content_changed=version is not None and candidate.content_hash not in (
            "", version.content_hash),
        design_effect=evidence.design_effect, clusters=evidence.clusters,
        max_share=routing.room([s for s in deployment.slices() if s.version_id != b_id],
                               candidate.range_start),
        scorers_a=evidence.scorers[0], scorers_b=evidence.scorers[1],
        paired=paired, two_labels=paired and pairing.labels == 2,
    )
    return Experiment(snapshot, start, candidate, active, evidence.raw_votes,
                      evidence.observations)


@dataclass(frozen=True)
class Pairing:
    """How a test's paired comparison reads the other prompt's labels (:mod:`bot.pairing`).

    ``maps[arm]`` turns the other arm's label names into the arm's own: the prompts may name
    their labels differently (:func:`bot.prompts.label_correspondence`). Without a
    correspondence (or without both prompt files), "the other prompt gave the same label"
    has no meaning: ``comparable`` is False and the test is decided on its votes alone."""

    active_id: str = ""
    maps: tuple[Mapping[str, str], Mapping[str, str]] | None = None
    # How many labels the prompts choose from (0: unknown).
    labels: int = 0

    @property
    def comparable(self) -> bool:
        return self.maps is not None

    @classmethod
    def of(cls, active: PromptVersion | None, candidate: PromptVersion | None) -> Pairing:
        if active is None or candidate is None:
            return cls()
        to_a = label_correspondence(active, candidate)
        to_b = label_correspondence(candidate, active)
        if to_a is None or to_b is None:
            return cls(active.id)
        return cls(active.id, (to_a, to_b), len(active.labels))

    def other_labels(self, served: Sequence[ServedRow],
                     stored: Mapping[int, PairedRow]) -> dict[int, str]:
        """interaction id → the other prompt's label for its text, in the verdict's own
        label names. Only labels from the scorer that made the verdict count: from another
        model file or server, a different label would measure the scorer, not the prompt."""
        if self.maps is None:
            return {}
        out: dict[int, str] = {}
        for row in served:
            pair = stored.get(row.id)
            if pair is None or row.label is None or pair.scorer != (row.scorer or ""):
                continue
            label = self.maps[0 if row.version_id == self.active_id else 1].get(pair.label)
            if label is not None:
                out[row.id] = label
        return out


@dataclass(frozen=True)
class _Evidence:
    design_effect: float
    clusters: int
    # Per arm: the votes cast (after the per-user cap) and the observations they make.
    raw_votes: tuple[int, int]
    observations: tuple[int, int]
    # Per arm: scorer → observations whose verdict it scored.
    scorers: tuple[dict[str, int], dict[str, int]]


@dataclass(frozen=True)
class _Arms:
    """Which arm a version is (0 = A, 1 = B) and the candidate's share over time."""

    index: Mapping[str, int]
    candidate: versions.VersionState
    others: Sequence[str]
    timeline: ShareTimeline

    def share_at(self, at: float) -> float:
        return self.timeline.conditional_share(self.candidate, self.others, at)


def _count_served(hours: dict[int, _Hour], arms: _Arms, rows: Sequence[ServedRow],
                  first_ids: Mapping[int, int]) -> None:
    """Verdicts served, new users and reply latency, in the hour of the interaction.

    The sample-ratio test counts new users only: one whose first message ever is in this
    test has a uniformly hashed bucket. A returning user's bucket is not uniform given their
    history (e.g. the users of a retired candidate all come back to the active arm)."""
    for r in rows:
        arm = arms.index[r.version_id]
        h = hours[int(r.created_at // HOUR_S)]
        if r.verdict:
            h.served[arm] += 1
        if first_ids.get(r.user_id) == r.id:
            h.new_users[arm] += 1
            h.new_share_sum += arms.share_at(r.created_at)
        if r.reply_latency_ms is not None:
            h.latency_n[arm] += 1
            h.latency_sum[arm] += r.reply_latency_ms / 1000.0


def _observe(hours: dict[int, _Hour], arms: _Arms, served: Sequence[ServedRow],
             votes: Sequence[VoteRow], config: DecisionConfig,
             other_labels: Mapping[int, str] | None = None) -> _Evidence:
    """Votes → one observation per verdict (see :mod:`analytics.observations`), filed in
    the hour of its first vote; each voter's votes beyond the daily cap and each text
    cluster's observations beyond its daily cap dropped.

    ``other_labels``: interaction → the label the other arm's prompt gives its text (in the
    verdict's own label names, :meth:`Pairing.other_labels`); the observations counted
    above whose verdict has one also make the paired comparison (``HourStats.paired_*``)."""
    keep = cap_vote_records([(v.user_id, int(v.created_at // DAY_S)) for v in votes],
                            config.max_votes_per_user_day)
    kept = [v for v, k in zip(votes, keep, strict=True) if k]
    arm_of = {r.id: arms.index[r.version_id] for r in served}
    arm_of.update({v.interaction_id: arms.index[v.version_id] for v in kept})
    band = {r.id: band_of(r.confidence) for r in served}
    with_text = [r for r in served if r.text]
    cluster_of = dict(zip((r.id for r in with_text),
                          group_texts([r.text or "" for r in with_text], NEAR_DUPLICATE),
                          strict=True))
    obs = cap_per_text_day(
        observations([VoteEvent(v.interaction_id, v.user_id, v.created_at, v.correct)
                      for v in kept]),
        cluster_of, arm_of, config.max_observations_per_text_day)
    for r in served:
        if r.verdict:
            hours[int(r.created_at // HOUR_S)].band_served[arm_of[r.id]][band[r.id]] += 1
    own_label = {r.id: r.label for r in served}
    others = other_labels or {}
    for o in obs:
        other = others.get(o.interaction)
        own = own_label.get(o.interaction)
        _file(hours[int(o.at // HOUR_S)], arm_of[o.interaction], band.get(o.interaction, 0), o,
              None if other is None or own is None else other != own)
    raw = [0, 0]
    for v in kept:
        raw[arm_of[v.interaction_id]] += 1
    counted = [0, 0]
    scorer_of = {v.interaction_id: v.scorer for v in kept}
    scorers: tuple[Counter[str], Counter[str]] = (Counter(), Counter())
    for o in obs:
        counted[arm_of[o.interaction]] += 1
        scorers[arm_of[o.interaction]][scorer_of[o.interaction]] += 1
    return _Evidence(clustered_design_effect(obs, arm_of, cluster_of),
                     len({o.voter for o in obs}), (raw[0], raw[1]), (counted[0], counted[1]),
                     (dict(scorers[0]), dict(scorers[1])))


def _file(h: _Hour, arm: int, band: int, o: Observation, other_differs: bool | None = None
          ) -> None:
    """One observation into its hour; ``other_differs``: whether the other arm's prompt
    gives its text another label than the verdict's (None: not scored so)."""
    h.votes[arm] += 1
    h.correct[arm] += int(o.correct)
    h.band_observed[arm][band] += 1
    h.band_correct[arm][band] += int(o.correct)
    if other_differs is None:
        return
    paired = h.paired[arm]
    if o.correct:
        paired[0] += 1
        paired[1] += int(other_differs)
    else:
        paired[2] += 1
        paired[3] += int(not other_differs)


def _count_reactions(hours: dict[int, _Hour], arms: _Arms,
                     reactions: Sequence[ReactionRow]) -> None:
    for r in reactions:
        arm = arms.index[r.version_id]
        h = hours[int(r.at // HOUR_S)]
        if r.polarity > 0:
            h.up[arm] += 1
        else:
            h.down[arm] += 1


def _strata(hours: Mapping[int, _Hour], arms: _Arms) -> tuple[HourStats, ...]:
    strata = []
    for hour in sorted(hours):
        h = hours[hour]
        new = h.new_users[0] + h.new_users[1]
        # Hours without a new user still need a share for the strata boundaries.
        share = h.new_share_sum / new if new else arms.share_at((hour + 1) * HOUR_S - 1e-3)
        # An average of equal shares is not always bit-equal to them (3 × 0.1 / 3); the
        # strata split where the share changes, so float noise must not look like a change.
        share = round(share, 9)
        strata.append(HourStats(
            hour=hour, votes_a=h.votes[0], correct_a=h.correct[0], votes_b=h.votes[1],
            correct_b=h.correct[1], served_a=h.served[0], served_b=h.served[1],
            new_users_a=h.new_users[0], new_users_b=h.new_users[1], planned_share=share,
            up_a=h.up[0], down_a=h.down[0], up_b=h.up[1], down_b=h.down[1],
            latency_n_a=h.latency_n[0], latency_sum_a=h.latency_sum[0],
            latency_n_b=h.latency_n[1], latency_sum_b=h.latency_sum[1],
            bands_served_a=tuple(h.band_served[0]), bands_observed_a=tuple(h.band_observed[0]),
            bands_correct_a=tuple(h.band_correct[0]), bands_served_b=tuple(h.band_served[1]),
            bands_observed_b=tuple(h.band_observed[1]),
            bands_correct_b=tuple(h.band_correct[1]),
            paired_right_a=h.paired[0][0], paired_right_other_wrong_a=h.paired[0][1],
            paired_wrong_a=h.paired[0][2], paired_wrong_other_same_a=h.paired[0][3],
            paired_right_b=h.paired[1][0], paired_right_other_wrong_b=h.paired[1][1],
            paired_wrong_b=h.paired[1][2], paired_wrong_other_same_b=h.paired[1][3],
        ))
    return tuple(strata)


async def replay_events(
    db: Database, prompt_versions: Mapping[str, PromptVersion], config: DecisionConfig,
    now: float,
) -> list[dict[str, Any]]:
    """Every running test as the event log ``loopbot replay`` reads (one run per candidate):
    the shares it was served at, its verdicts (the text as a cluster key, never the words),
    votes and reply reactions, so the engine's decisions can be checked on real history."""
    events: list[dict[str, Any]] = []
    for exp in await build_experiments(db, prompt_versions, config, now):
        events += await _run_events(db, exp, now, prompt_versions)
    return events


async def _run_events(db: Database, exp: Experiment, now: float,
                      prompt_versions: Mapping[str, PromptVersion] | None = None,
                      ) -> list[dict[str, Any]]:
    """One test's events. A verdict carries its label, how many labels its prompt has, and
    (``other_label``) the label the other arm's prompt gives its text, when it was scored so
    by the verdict's own scorer (in the verdict's label names, as the engine compares
    them: :meth:`Pairing.other_labels`)."""
    snap = exp.snapshot
    catalog = prompt_versions or {}
    run = snap.candidate_id
    reader = ExperimentReader(db)
    end = int(now // HOUR_S) * HOUR_S
    timeline = ShareTimeline.from_audit(await versions.audit_log(db, limit=1_000_000))
    others = [v for v in timeline.changes if v not in (snap.active_id, run)]
    moments = sorted({exp.start, *(t for changes in timeline.changes.values()
                                   for t, _ in changes if exp.start <= t < end)})
    events: list[dict[str, Any]] = []
    previous = None
    for at in moments:
        share = round(timeline.conditional_share(exp.candidate, others, at), 9)
        if share != previous and 0 < share < 1:
            events.append({"kind": "share", "run": run, "at": at, "share": share})
            previous = share
    served = await reader.served(snap.active_id, run, exp.start, end)
    groups = group_texts([r.text or "" for r in served], NEAR_DUPLICATE)
    pairing = Pairing.of(catalog.get(snap.active_id), catalog.get(run))
    other_labels = (pairing.other_labels(
        served, await reader.paired_labels(snap.active_id, run, exp.start, end))
        if pairing.comparable else {})
    labels = {vid: len(v.labels) for vid, v in catalog.items()}
    for r, group in zip(served, groups, strict=True):
        if r.verdict:
            event = {"kind": "verdict", "run": run, "at": r.created_at,
                     "arm": "active" if r.version_id == snap.active_id else "candidate",
                     "interaction": r.id, "user": r.user_id,
                     "text": f"k{group}" if r.text else None, "label": r.label,
                     "confidence": r.confidence, "labels": labels.get(r.version_id)}
            if snap.paired:
                # Every verdict of a paired test carries the key (null while unscored), so
                # the replay decides it paired, as the bot did, even before any label.
                event["other_label"] = other_labels.get(r.id)
            events.append(event)
    for v in await reader.votes(snap.active_id, run, exp.start, end):
        events.append({"kind": "vote", "run": run, "at": v.created_at,
                       "interaction": v.interaction_id, "user": v.user_id,
                       "correct": v.correct})
    for reaction in await reader.reply_reactions(snap.active_id, run, exp.start, end):
        events.append({"kind": "reaction", "run": run, "at": reaction.at,
                       "interaction": reaction.interaction_id, "user": reaction.user_id,
                       "polarity": reaction.polarity})
    events.sort(key=lambda e: float(e["at"]))
    return events


async def build_experiments(
    db: Database, prompt_versions: Mapping[str, PromptVersion], config: DecisionConfig,
    now: float,
) -> list[Experiment]:
    """One experiment per running candidate (none without an active version)."""
    deployment = await versions.load(db)
    if deployment.active is None or not deployment.candidates:
        return []
    timeline = ShareTimeline.from_audit(await versions.audit_log(db, limit=1_000_000))
    return [await build_experiment(db, deployment, c, prompt_versions, config, now, timeline)
            for c in deployment.candidates]


# ------------------------------------------------------------------------------ applying


def audit_stats(decision: Decision, snapshot: ExperimentSnapshot) -> dict[str, Any]:
    return {**decision.stats_json(), "decision": str(decision.action),
            "rule": str(decision.rule), "now_hour": snapshot.now_hour,
            "start_hour": snapshot.start_hour}


async def apply_decision(
    db: Database, experiment: Experiment, decision: Decision,
    prompt_versions: Mapping[str, PromptVersion], *, reason: str, actor: str = ENGINE_ACTOR,
    now: float | None = None, notes: versions.Notes | None = None,
) -> versions.AuditEntry | None:
    """Write ``decision`` through :mod:`bot.versions` (one transaction with its audit entry).

    Returns the audit entry, or None when nothing is written (a hold, or the experiment
    changed since the snapshot was taken). Raises :class:`bot.versions.VersionError` or a
    database error when the write fails; the state is then unchanged."""
    snap = experiment.snapshot

    def unchanged(current: versions.Deployment) -> None:
        cand = current.get(snap.candidate_id)
        if (current.active is None or current.active.version_id != snap.active_id
                or current.active.since != experiment.active.since
                or cand is None or cand.state != versions.CANDIDATE
                or cand.since != experiment.candidate.since
                or cand.share != experiment.candidate.share):
            raise _StaleSnapshot

    try:
        if decision.restart:  # the restart re-reads the files itself; check first
            unchanged(await versions.load(db))
        return await _write_decision(db, experiment, decision, prompt_versions,
                                     reason=f"{decision.action}: {reason}", actor=actor,
                                     now=now, expect=unchanged, notes=notes)
    except _StaleSnapshot:
        log.warning("experiment %s vs %s changed since its snapshot: %s not applied",
                    snap.candidate_id, snap.active_id, decision.action)
        return None


class _StaleSnapshot(versions.VersionError):
    """The test changed (e.g. an admin's /promote) between the snapshot and the write."""


async def _write_decision(
    db: Database, experiment: Experiment, decision: Decision,
    prompt_versions: Mapping[str, PromptVersion], *, reason: str, actor: str,
    now: float | None, expect: versions.Expectation, notes: versions.Notes | None,
) -> versions.AuditEntry | None:
    snap = experiment.snapshot
    stats = audit_stats(decision, snap)
    b = snap.candidate_id
    if decision.restart:
        entries = await versions.restart_edited(db, prompt_versions, actor=actor, now=now,
                                                stats=stats, notes=notes)
        return next((e for e in entries if e.version_id == b), None)
    if decision.action is Action.PROMOTE:
        return await versions.promote(db, b, prompt_versions, actor=actor, reason=reason,
                                      stats=stats, now=now, expect=expect, notes=notes)
    if decision.action in (Action.REVERT, Action.RETIRE, Action.FREEZE):
        return await versions.retire(db, b, actor=actor, reason=reason, stats=stats, now=now,
                                     expect=expect, notes=notes)
    if decision.action is Action.RAMP:
        if decision.new_share is None:
            raise ValueError("a ramp decision without a new share")
        return await versions.set_canary(db, b, decision.new_share * 100.0, prompt_versions,
                                         actor=actor, reason=reason, stats=stats, now=now,
                                         expect=expect, notes=notes)
    return None


async def analyze(
    db: Database, prompt_versions: Mapping[str, PromptVersion], config: DecisionConfig, *,
    now: float | None = None, apply: bool = True, actor: str = ENGINE_ACTOR,
    apply_restarts: bool = True, notify: Sequence[int] = (),
) -> list[Outcome]:
    """Decide for every running candidate and (``apply``) write each decision.

    Candidates are handled one at a time on a fresh read of the state, so a promotion is seen
    by the next candidate (whose test then restarts against the new active version). A failed
    write is reported in its outcome (``error``) and does not stop the others.

    ``apply_restarts=False`` is for callers that do not serve the prompt files they read (the
    command line): a file edited on disk is not what the running bot serves yet, so the test
    is restarted by the bot when it loads the file, not here.

    ``notify``: chats (the admins) told of each applied decision through the outbox, in the
    decision's own transaction (:attr:`Outcome.noted`)."""
    at = time.time() if now is None else now
    outcomes: list[Outcome] = []
    done: set[str] = set()
    while True:
        deployment = await versions.load(db)
        pending = [c for c in deployment.candidates if c.version_id not in done]
        if deployment.active is None or not pending:
            return outcomes
        timeline = ShareTimeline.from_audit(await versions.audit_log(db, limit=1_000_000))
        exp = await build_experiment(db, deployment, pending[0], prompt_versions, config, at,
                                     timeline)
        snap = exp.snapshot
        done.add(snap.candidate_id)
        if snap.candidate_id not in prompt_versions:
            decision = Decision(Action.HOLD, Rule.MISSING_FILE,
                                max(0, snap.now_hour - snap.start_hour))
        else:
            decision = decide(snap, config)
        reason = texts.reason(decision, snap, config)
        entry: versions.AuditEntry | None = None
        error: str | None = None
        skipped: str | None = None
        if apply and decision.restart and not apply_restarts:
            skipped = ("the file on disk is not what the bot serves yet; the bot restarts "
                       "this test when it starts with the edited file")
        elif apply and (decision.action is not Action.HOLD or decision.restart):
            notes = _admin_notes(snap, decision, reason, notify) if notify else None
            try:
                entry = await apply_decision(db, exp, decision, prompt_versions,
                                             reason=reason, actor=actor, now=at, notes=notes)
            except Exception as exc:
                log.exception("could not apply %s for %s", decision.action, snap.candidate_id)
                error = f"{type(exc).__name__}: {exc}"
        outcomes.append(Outcome(
            candidate_id=snap.candidate_id, active_id=snap.active_id, decision=decision,
            reason=reason, applied=entry is not None, audit_id=entry.id if entry else None,
            message=texts.admin_message(snap, decision, reason, applied=entry is not None,
                                        dry_run=not apply, error=error, skipped=skipped),
            error=error, snapshot=snap, raw_votes=exp.raw_votes,
            observations=exp.observations,
            noted=entry is not None and bool(notify),
        ))


def _admin_notes(snap: ExperimentSnapshot, decision: Decision, reason: str,
                 admins: Sequence[int]) -> versions.Notes:
    """The admins' message about an applied decision, as outbox rows of its transaction."""
    def notes(entry: versions.AuditEntry) -> list[Outgoing]:
        if entry.version_id != snap.candidate_id:
            return []  # a restart also writes the active version's entry: one message
        text = texts.admin_message(snap, decision, reason, applied=True, dry_run=False,
                                   error=None, skipped=None)
        return [Outgoing(chat_id=admin, chat_type="private", kind="notice",
                         payload={"text": text}) for admin in admins]
    return notes
