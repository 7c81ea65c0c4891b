"""What one cycle of the improvement loop does, decided without I/O (pure).

The bot (:func:`bot.learning.loop.run_cycle`) and the loop simulation
(:mod:`bot.learning.simulation`) both call these functions, so the simulation measures the
rules the bot runs. The callers keep the I/O: reading votes and the deployment, writing the
candidate's YAML, the offline check with their classifier, and starting the canary.

A cycle:

1. :func:`blocking_reason`: the loop is off, a candidate is in canary, or one waits for
   ``/approve`` (proposals expire after :data:`PROPOSAL_TTL_S`): nothing to do, and nothing
   needs the (CPU-heavy) credibility analysis.
2. :func:`analyse`: credibility scoring and mining over the votes on verdicts of the last
   :data:`VOTE_WINDOW_S`.
3. :func:`check_trigger`: the active version's error rate over credible votes above
   ``loop.error_rate_trigger`` with at least ``loop.min_credible_votes`` of them, and
   :func:`evidence_needed` credibly judged verdicts newer than the last proposal for it.
4. :func:`plan_cycle`: idle, failed, no candidate, or a generated candidate with the held-out
   texts of its offline check.
5. :func:`status_after_check`: refused, canary or proposed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from analytics.credibility import (
    CredibilityConfig,
    CredibilityResult,
    LabelledText,
    VoteRecord,
    build_credible_set,
)
from analytics.mining import ImprovementReport, VersionErrors, mine
from bot.learning.candidates import Candidate, CandidateConfig, CandidateError, generate_candidate
from bot.learning.offline_eval import split_holdout
from bot.prompts import PromptError, PromptVersion

LoopMode = Literal["automatic", "suggest", "off"]
# What a cycle planned before the offline check.
PlanAction = Literal["idle", "failed", "no_candidate", "generate"]
# A checked candidate's fate.
CheckedStatus = Literal["refused", "canary", "proposed"]
# How a whole cycle ended (what the admins are told).
CycleOutcome = Literal["off", "idle", "no_candidate", "refused", "proposed", "canary", "failed",
                       "generate"]


@dataclass
class LoopConfig:
    # "automatic": mined candidates go to canary after the offline check;
    # "suggest": they wait for an admin's /approve; "off": no mining.
    mode: LoopMode = "suggest"
    error_rate_trigger: float = 0.15
    min_credible_votes: int = 100
    offline_margin: float = 0.0
    # Optional OpenAI-compatible endpoint proposing revised instructions (empty = off).
    llm_endpoint: str = ""
    llm_model: str = ""


# Votes on verdicts of the last 28 days: credibility scoring is superlinear in the votes, so
# an unbounded history would make every cycle slower; four weeks still hold thousands of votes
# at a modest traffic, and old votes judged versions and habits that have moved on.
VOTE_WINDOW_S = 28 * 86400.0
# A proposal nobody approved within a week is stale: the votes it was mined from are old.
PROPOSAL_TTL_S = 7 * 86400.0
# Share of the credible texts kept out of the candidate's examples for its offline check.
HOLDOUT_FRACTION = 0.3


@dataclass(frozen=True)
class PastProposal:
    """A candidate the loop proposed earlier (``judged``: credibly judged verdicts of its
    parent it was mined from)."""

    candidate_id: str
    created_at: float
    judged: int


@dataclass(frozen=True)
class LoopState:
    """The deployment as the loop sees it."""

    active_id: str | None
    # Candidates serving a canary slice now.
    in_canary: tuple[str, ...] = ()
    # Proposals waiting for an admin's /approve.
    waiting: tuple[PastProposal, ...] = ()
    # The newest proposal whose parent is the active version, whatever became of it.
    last_proposal: PastProposal | None = None


@dataclass(frozen=True)
class Trigger:
    fire: bool
    reason: str
    # True when another candidate is in the way: even a forced cycle must not start one.
    blocking: bool = False


@dataclass(frozen=True)
class Analysis:
    """The credible set and the mined report of the votes in the window."""

    votes: int
    credible: CredibilityResult
    report: ImprovementReport
    # interaction id -> when its verdict was made (for "new evidence since").
    verdict_at: dict[int, float]


@dataclass(frozen=True)
class CyclePlan:
    action: PlanAction
    reason: str
    trigger: Trigger
    errors: VersionErrors | None = None
    candidate: Candidate | None = None
    # The offline check's texts: never among the candidate's examples.
    held_out: tuple[LabelledText, ...] = ()
    # The mistakes of the training part only: what may shape the candidate (its examples and
    # a proposed instruction), so no held-out text can leak into what is checked on it.
    train_errors: VersionErrors | None = None

    @property
    def patterns(self) -> tuple[str, ...]:
        """The active version's most frequent error patterns, most frequent first."""
        return tuple(p.name for p in self.errors.patterns) if self.errors else ()


def window_start(now: float, window_s: float = VOTE_WINDOW_S) -> float:
    return now - window_s


def recent_votes(votes: Iterable[VoteRecord], now: float,
                 window_s: float = VOTE_WINDOW_S) -> list[VoteRecord]:
    """Votes on verdicts made within the window (the bot's query applies the same cut)."""
    since = window_start(now, window_s)
    return [v for v in votes if v.verdict_at >= since]


def evidence_needed(config: LoopConfig) -> int:
    """Credibly judged verdicts newer than the last proposal before mining the same parent
    again: fewer would give nearly the same examples and the same verdict."""
    return max(25, config.min_credible_votes // 4)


def open_proposals(state: LoopState, now: float) -> tuple[PastProposal, ...]:
    return tuple(p for p in state.waiting if p.created_at >= now - PROPOSAL_TTL_S)


def blocking_reason(state: LoopState, config: LoopConfig, now: float) -> Trigger | None:
    """Why no cycle may start a candidate now, or None (needs no votes)."""
    if config.mode == "off":
        return Trigger(False, "the loop is off (loop.mode: off)", blocking=True)
    if state.in_canary:
        return Trigger(False, f"a candidate is already in canary ({', '.join(state.in_canary)})",
                       blocking=True)
    waiting = open_proposals(state, now)
    if waiting:
        ids = ", ".join(p.candidate_id for p in waiting)
        return Trigger(False, f"a candidate is waiting for /approve ({ids})", blocking=True)
    return None


def _version_order(labelled: Sequence[LabelledText], first: Sequence[str]) -> list[str]:
    """``first``, then every other judged version, most judged first (as /report lists
    them)."""
    judged: Counter[str] = Counter()
    for item in labelled:
        for vid in {j.version_id for j in item.judged}:
            judged[vid] += 1
    rest = sorted((v for v in judged if v not in first), key=lambda v: (-judged[v], v))
    return [*first, *rest]


def analyse(votes: Iterable[VoteRecord], now: float, *, active_id: str | None,
            candidate_ids: Sequence[str] = (), config: CredibilityConfig | None = None,
            window_s: float = VOTE_WINDOW_S) -> Analysis:
    """Credibility and mining over the window's votes (seconds of CPU on a large window)."""
    recent = recent_votes(votes, now, window_s)
    credible = build_credible_set(recent, config)
    first = [v for v in (active_id, *candidate_ids) if v]
    report = mine(credible.labelled, _version_order(credible.labelled, first))
    return Analysis(len(recent), credible, report, {v.interaction_id: v.verdict_at
                                                    for v in recent})


def fresh_judgements(analysis: Analysis, version_id: str, since: float) -> int:
    """Credible texts with a verdict of ``version_id`` made after ``since`` (counted per text,
    as mining counts ``judged``)."""
    n = 0
    for item in analysis.credible.labelled:
        n += any(j.version_id == version_id
                 and analysis.verdict_at.get(j.interaction_id, since) > since
                 for j in item.judged)
    return n


def check_trigger(analysis: Analysis, state: LoopState, config: LoopConfig,
                  now: float) -> Trigger:
    """The seed design's rule: error rate over credible votes above the threshold with enough
    votes, no candidate in canary or awaiting approval, and new evidence since the last
    proposal for the active version."""
    blocked = blocking_reason(state, config, now)
    if blocked is not None:
        return blocked
    active = state.active_id
    errors = analysis.report.get(active) if active else None
    if active is None or errors is None or errors.judged < config.min_credible_votes:
        judged = errors.judged if errors else 0
        return Trigger(False, f"{judged} credibly judged verdicts of the active version, "
                       f"need {config.min_credible_votes}")
    if errors.error_rate <= config.error_rate_trigger:
        return Trigger(False, f"error rate {100 * errors.error_rate:.1f}% over {errors.judged} "
                       f"credible votes is within {100 * config.error_rate_trigger:.0f}%")
    last = state.last_proposal
    if last is not None:
        # Counted since the proposal, not as growth of ``judged``: in a sliding window the
        # count stops growing once the window is full, and the loop would never retry.
        fresh = fresh_judgements(analysis, active, last.created_at)
        needed = evidence_needed(config)
        if fresh < needed:
            return Trigger(False, f"{last.candidate_id} was mined from {last.judged} judged "
                           f"verdicts; {fresh} judged since, waiting for {needed}")
    return Trigger(True, f"error rate {100 * errors.error_rate:.1f}% over {errors.judged} "
                   f"credible votes exceeds {100 * config.error_rate_trigger:.0f}%")


def plan_cycle(analysis: Analysis, state: LoopState, config: LoopConfig, *, now: float,
               parent: PromptVersion | None, existing_ids: Collection[str] = (),
               force: bool = False, candidates: CandidateConfig | None = None,
               holdout_seed: int = 0) -> CyclePlan:
    """What this cycle does. ``parent``: the active version's prompt (None when its file is
    missing); ``force`` skips the error-rate and new-evidence rules, never the
    one-candidate-at-a-time rule."""
    trigger = check_trigger(analysis, state, config, now)
    if not trigger.fire and (not force or trigger.blocking or state.active_id is None):
        return CyclePlan("idle", trigger.reason, trigger)
    if parent is None or parent.id != state.active_id:
        return CyclePlan("failed", f"the active version {state.active_id} has no file", trigger)
    errors = analysis.report.get(parent.id)
    train, held = split_holdout(analysis.credible.labelled, HOLDOUT_FRACTION, holdout_seed)
    train_errors = mine(train, [parent.id]).get(parent.id)
    try:
        candidate = generate_candidate(parent, train, train_errors, existing_ids=existing_ids,
                                       config=candidates)
    except (CandidateError, PromptError) as exc:
        # PromptError: a candidate that does not validate must cost one cycle, not stop the
        # loop for as long as the text that caused it stays in the vote window.
        return CyclePlan("no_candidate", f"no candidate from {parent.id}: {exc}", trigger,
                         errors)
    return CyclePlan("generate", trigger.reason, trigger, errors, candidate, tuple(held),
                     train_errors)


def status_after_check(passed: bool, mode: LoopMode) -> CheckedStatus:
    """A checked candidate's fate: refused, canary (``automatic``) or proposed (waits for
    /approve)."""
    if not passed:
        return "refused"
    return "canary" if mode == "automatic" else "proposed"


__all__ = [
    "HOLDOUT_FRACTION",
    "PROPOSAL_TTL_S",
    "VOTE_WINDOW_S",
    "Analysis",
    "CheckedStatus",
    "CycleOutcome",
    "CyclePlan",
    "LoopConfig",
    "LoopMode",
    "LoopState",
    "PastProposal",
    "PlanAction",
    "Trigger",
    "analyse",
    "blocking_reason",
    "check_trigger",
    "evidence_needed",
    "fresh_judgements",
    "open_proposals",
    "plan_cycle",
    "recent_votes",
    "status_after_check",
    "window_start",
]
