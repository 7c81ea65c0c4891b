"""The decision engine over an event log: "what would the engine have decided?" (pure).

A log holds one or more runs (experiments), each a time-ordered list of events:

- ``share``: the candidate's share in force from ``at``;
- ``verdict``: a verdict served (``arm`` active or candidate, ``interaction``, ``user``,
  ``text`` — any key equal for the same or near-identical text —, ``label``,
  ``confidence``; optionally ``other_label``, the label the other arm's prompt gives the same
  text (null: not scored yet; the key on any verdict makes the run paired), and ``labels``,
  how many labels the prompts choose from);
- ``vote``: feedback on an interaction (``user``, ``correct``);
- ``reaction``: 👍/👎 on an interaction's reply (``user``, ``polarity`` ±1).

Each run is aggregated exactly as the bot aggregates its database: hours from the run's first
event, served verdicts and new users in the hour they were served, one observation per voted
verdict (:mod:`analytics.observations`) with the per-user and per-text daily caps, the design
effect over voters and text clusters so far, reactions in the hour first given. When
verdicts carry ``other_label``, the observations also make the paired comparison
(:class:`analytics.decide.PairedVotes`; with ``labels`` 2 on every such verdict, its
two-label form), as the bot's does. The engine's
vectorised core (:func:`analytics.decide.evaluate`, which the bot's ``decide`` calls) then
takes every hourly look; the run's result is its first promote, revert, retire or freeze.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analytics.decide import (
    ACTIONS,
    BAND_EDGES,
    HOLD,
    PAIRED_FIELDS,
    RULES,
    DecisionConfig,
    ExperimentArrays,
    PairedVotes,
    Trajectory,
    VoteBands,
    band_of,
    evaluate,
)
from analytics.observations import (
    Observation,
    RunningDesignEffect,
    VoteEvent,
    cap_per_text_day,
    observations,
)
from analytics.stats import cap_vote_records

HOUR_S = 3600.0
DAY_S = 86400.0
KINDS = ("share", "verdict", "vote", "reaction")


class ReplayError(ValueError):
    """An event the replay cannot use; the message names the line."""


@dataclass
class RunLog:
    """One run's events, checked and in time order."""

    run: str
    shares: list[tuple[float, float]] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    votes: list[dict[str, Any]] = field(default_factory=list)
    reactions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def start(self) -> float:
        times = [t for t, _ in self.shares] + [float(v["at"]) for v in self.verdicts]
        return min(times) if times else 0.0


@dataclass(frozen=True)
class RunResult:
    """The first terminal decision of a run (action "hold" and hour -1: none)."""

    run: str
    action: str
    rule: str
    hour: int
    votes: int
    trajectory: Trajectory
    arrays: ExperimentArrays


def group_runs(events: Iterable[tuple[int, Mapping[str, Any]]]) -> dict[str, RunLog]:
    """Events (with their line numbers) by run, checked; runs in order of appearance."""
    return {log.run: log for log in iter_runs(events)}


def iter_runs(events: Iterable[tuple[int, Mapping[str, Any]]]) -> Iterator[RunLog]:
    """One run at a time, so a log of thousands of runs never sits in memory whole: each
    run's events must come together (in time order within the run)."""
    current: RunLog | None = None
    finished: set[str] = set()
    for line, event in events:
        run = _checked(line, event)
        if current is None or run != current.run:
            if run in finished:
                raise ReplayError(f"line {line}: run {run} continues after other runs; put "
                                  "each run's events together (sorted by run, then time)")
            if current is not None:
                finished.add(current.run)
                yield _sorted(current)
            current = RunLog(run)
        _add(current, line, event)
    if current is not None:
        yield _sorted(current)


def _checked(line: int, event: Mapping[str, Any]) -> str:
    kind = event.get("kind")
    if kind not in KINDS:
        raise ReplayError(f"line {line}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    for key in _REQUIRED[str(kind)]:
        if key not in event:
            raise ReplayError(f"line {line}: a {kind} event needs {key!r}")
    return str(event["run"])


def _add(log: RunLog, line: int, event: Mapping[str, Any]) -> None:
    try:
        at = float(event["at"])
    except (TypeError, ValueError):
        raise ReplayError(f"line {line}: 'at' must be a number of seconds") from None
    kind = event["kind"]
    if kind == "share":
        log.shares.append((at, _share(line, event["share"])))
    elif kind == "verdict":
        if event["arm"] not in ("active", "candidate"):
            raise ReplayError(f"line {line}: arm must be active or candidate")
        log.verdicts.append(dict(event, at=at))
    elif kind == "vote":
        log.votes.append(dict(event, at=at))
    else:
        log.reactions.append(dict(event, at=at))


def _sorted(log: RunLog) -> RunLog:
    for items in (log.verdicts, log.votes, log.reactions):
        items.sort(key=lambda e: float(e["at"]))
    log.shares.sort()
    return log


_REQUIRED = {
    "share": ("run", "at", "share"),
    "verdict": ("run", "at", "arm", "interaction", "user"),
    "vote": ("run", "at", "interaction", "user", "correct"),
    "reaction": ("run", "at", "interaction", "user", "polarity"),
}


def _share(line: int, value: Any) -> float:
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise ReplayError(f"line {line}: share must be a number in (0, 1)") from None
    if not 0.0 < share < 1.0:
        raise ReplayError(f"line {line}: share must be in (0, 1), got {share}")
    return share


def arrays_of(log: RunLog, config: DecisionConfig, hours: int | None = None
              ) -> ExperimentArrays:
    """The run's hourly aggregates, as the bot's reader makes them from its database."""
    start = log.start
    horizon = math.ceil(config.max_duration_hours)
    last = max([float(e["at"]) for e in (*log.verdicts, *log.votes, *log.reactions)],
               default=start)
    n = hours if hours is not None else min(horizon, int((last - start) // HOUR_S) + 1)
    n = max(n, 1)
    agg = _Aggregates(n)
    arm_of = {e["interaction"]: 0 if e["arm"] == "active" else 1 for e in log.verdicts}
    _served(agg, log, start)
    _feedback(agg, log, start, arm_of, config)
    _reactions(agg, log, start, arm_of)
    return agg.arrays(_shares(log, start, n))


class _Aggregates:
    def __init__(self, hours: int) -> None:
        self.hours = hours
        width = len(BAND_EDGES) + 1
        self.ints = {k: np.zeros((1, hours), dtype=np.int64) for k in (
            "votes_a", "correct_a", "votes_b", "correct_b", "served_a", "served_b",
            "new_users_a", "new_users_b", "up_a", "down_a", "up_b", "down_b")}
        self.bands = {k: np.zeros((1, hours, width), dtype=np.int64) for k in (
            "served_a", "observed_a", "correct_a", "served_b", "observed_b", "correct_b")}
        self.deff = np.ones((1, hours))
        self.clusters = np.zeros((1, hours))
        self.pairs = {k: np.zeros((1, hours), dtype=np.int64) for k in PAIRED_FIELDS}
        # Whether the log carries the paired comparison, and in its two-label form.
        self.paired = False
        self.two_labels = False

    def hour(self, at: float, start: float) -> int | None:
        h = int((at - start) // HOUR_S)
        return h if 0 <= h < self.hours else None

    def arrays(self, share: np.ndarray) -> ExperimentArrays:
        i, b = self.ints, self.bands
        zeros = np.zeros((1, self.hours))
        return ExperimentArrays(
            votes_a=i["votes_a"], correct_a=i["correct_a"], votes_b=i["votes_b"],
            correct_b=i["correct_b"], served_a=i["served_a"], served_b=i["served_b"],
            new_users_a=i["new_users_a"], new_users_b=i["new_users_b"], planned_share=share,
            up_a=i["up_a"], down_a=i["down_a"], up_b=i["up_b"], down_b=i["down_b"],
            latency_n_a=np.zeros((1, self.hours), dtype=np.int64), latency_sum_a=zeros,
            latency_n_b=np.zeros((1, self.hours), dtype=np.int64), latency_sum_b=zeros,
            design_effect=self.deff, clusters=self.clusters,
            bands=VoteBands(served_a=b["served_a"], observed_a=b["observed_a"],
                            correct_a=b["correct_a"], served_b=b["served_b"],
                            observed_b=b["observed_b"], correct_b=b["correct_b"]),
            pairs=PairedVotes(**self.pairs, two_labels=self.two_labels) if self.paired
            else None)


def _served(agg: _Aggregates, log: RunLog, start: float) -> None:
    seen: set[Hashable] = set()
    for e in log.verdicts:
        h = agg.hour(float(e["at"]), start)
        arm = "a" if e["arm"] == "active" else "b"
        if e["user"] not in seen:
            seen.add(e["user"])
            if h is not None:
                agg.ints[f"new_users_{arm}"][0, h] += 1
        if h is None:
            continue
        agg.ints[f"served_{arm}"][0, h] += 1
        agg.bands[f"served_{arm}"][0, h, band_of(_confidence(e))] += 1


def _confidence(event: Mapping[str, Any]) -> float | None:
    value = event.get("confidence")
    return None if value is None else float(value)


def _feedback(agg: _Aggregates, log: RunLog, start: float, arm_of: Mapping[Any, int],
              config: DecisionConfig) -> None:
    votes = [v for v in log.votes if v["interaction"] in arm_of]
    keep = cap_vote_records([(v["user"], int(float(v["at"]) // DAY_S)) for v in votes],
                            config.max_votes_per_user_day)
    kept = [v for v, k in zip(votes, keep, strict=True) if k]
    ids = {key: i for i, key in enumerate(arm_of)}
    arm_by_id = {ids[key]: arm for key, arm in arm_of.items()}
    text_of = {ids[e["interaction"]]: e.get("text") for e in log.verdicts}
    cluster_of = {i: ("text", t) for i, t in text_of.items() if t is not None}
    band = {ids[e["interaction"]]: band_of(_confidence(e)) for e in log.verdicts}
    other = {ids[e["interaction"]]: e.get("label") != e["other_label"]
             for e in log.verdicts if e.get("other_label") is not None}
    # A run is paired when its verdicts carry the key, even with no label yet (the bot then
    # holds rather than decide on votes alone, and so must the replay).
    keyed = [e for e in log.verdicts if "other_label" in e]
    if keyed:
        agg.paired = True
        agg.two_labels = all(e.get("labels") == 2 for e in keyed)
    obs = cap_per_text_day(
        observations([VoteEvent(ids[v["interaction"]], _user(v["user"]), float(v["at"]),
                                bool(v["correct"])) for v in kept]),
        cluster_of, arm_by_id, config.max_observations_per_text_day)
    _file(agg, obs, start, arm_by_id, band, other)
    _running_clusters(agg, obs, start, arm_by_id, cluster_of)


def _user(value: Any) -> int:
    return value if isinstance(value, int) else hash(str(value))


def _file(agg: _Aggregates, obs: Sequence[Observation], start: float,
          arm_by_id: Mapping[int, int], band: Mapping[int, int],
          other_differs: Mapping[int, bool]) -> None:
    for o in obs:
        h = agg.hour(o.at, start)
        if h is None:
            continue
        arm = "a" if arm_by_id[o.interaction] == 0 else "b"
        agg.ints[f"votes_{arm}"][0, h] += 1
        agg.ints[f"correct_{arm}"][0, h] += int(o.correct)
        agg.bands[f"observed_{arm}"][0, h, band[o.interaction]] += 1
        agg.bands[f"correct_{arm}"][0, h, band[o.interaction]] += int(o.correct)
        differs = other_differs.get(o.interaction)
        if differs is None:
            continue
        if o.correct:
            agg.pairs[f"right_{arm}"][0, h] += 1
            agg.pairs[f"right_other_wrong_{arm}"][0, h] += int(differs)
        else:
            agg.pairs[f"wrong_{arm}"][0, h] += 1
            agg.pairs[f"wrong_other_same_{arm}"][0, h] += int(not differs)


def _running_clusters(agg: _Aggregates, obs: Sequence[Observation], start: float,
                      arm_by_id: Mapping[int, int], cluster_of: Mapping[int, Hashable]) -> None:
    """The design effect and the distinct voters as the bot would compute them at each look
    (from the observations up to that hour)."""
    by_voter, by_text = RunningDesignEffect(), RunningDesignEffect()
    voters: set[int] = set()
    position = 0
    for h in range(agg.hours):
        end = start + (h + 1) * HOUR_S
        while position < len(obs) and obs[position].at < end:
            o = obs[position]
            arm = arm_by_id[o.interaction]
            by_voter.add(o.voter, arm, o.correct)
            by_text.add(cluster_of.get(o.interaction, ("own", o.interaction)), arm, o.correct)
            voters.add(o.voter)
            position += 1
        agg.deff[0, h] = max(by_voter.value(), by_text.value())
        agg.clusters[0, h] = len(voters)


def _reactions(agg: _Aggregates, log: RunLog, start: float,
               arm_of: Mapping[Any, int]) -> None:
    first: set[tuple[Any, Any]] = set()
    for e in log.reactions:
        key = (e["interaction"], e["user"])
        if key in first or e["interaction"] not in arm_of or int(e["polarity"]) == 0:
            continue
        first.add(key)
        h = agg.hour(float(e["at"]), start)
        if h is None:
            continue
        arm = "a" if arm_of[e["interaction"]] == 0 else "b"
        agg.ints[f"{'up' if int(e['polarity']) > 0 else 'down'}_{arm}"][0, h] += 1


def _shares(log: RunLog, start: float, hours: int) -> np.ndarray:
    share = np.full((1, hours), log.shares[0][1] if log.shares else 0.5)
    for at, value in log.shares:
        h = max(0, int((at - start) // HOUR_S))
        share[0, h:] = value
    return share


def replay_run(log: RunLog, config: DecisionConfig, concurrent_candidates: int = 1
               ) -> RunResult:
    """The engine's first terminal decision over one run (hold if none by the horizon)."""
    arrays = arrays_of(log, config)
    traj = evaluate(arrays, config, concurrent_candidates)
    action, idx = traj.first_terminal()
    hour = int(idx[0])
    at = hour if hour >= 0 else arrays.shape[1] - 1
    votes = int(traj.votes_a[0, at] + traj.votes_b[0, at])
    return RunResult(log.run, str(ACTIONS[int(action[0])]) if hour >= 0 else str(ACTIONS[HOLD]),
                     str(RULES[int(traj.rule[0, at])]), hour, votes, traj, arrays)
