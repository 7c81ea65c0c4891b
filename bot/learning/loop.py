"""The improvement loop with its I/O: votes from the database → credible labelled set → error
report → candidate YAML in ``prompts/`` → offline check (stored) → canary via
:mod:`bot.versions`, where the decision engine takes over.

What a cycle does (the trigger, the vote window, one candidate at a time, which examples) is
decided by the pure :mod:`bot.learning.cycle`, which the loop simulation runs too; this module
does the I/O around it. ``loop.mode``: ``automatic`` canaries a candidate that passed the
offline check; ``suggest`` stores it and waits for an admin's ``/approve ID``; ``off`` does
nothing.

``loop.llm_endpoint``: empty (default) = no instruction rewriting; ``local`` = ask the bot's own
model; otherwise the base URL of an OpenAI-compatible API (``loop.llm_model`` names the model,
the key comes from the ``LOOPBOT_LLM_API_KEY`` environment variable).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analytics.credibility import CredibilityConfig, CredibilityResult, VoteRecord, summary
from analytics.mining import ImprovementReport
from bot import versions
from bot.config import Settings, prompts_directory
from bot.errors import LoopbotError
from bot.learning import cycle as loop_cycle
from bot.learning.candidates import (
    CandidateConfig,
    Complete,
    local_complete,
    openai_complete,
    propose_instruction,
    with_instruction,
)
from bot.learning.cycle import PROPOSAL_TTL_S, LoopState, PastProposal, Trigger
from bot.learning.offline_eval import OfflineResult, evaluate_offline
from bot.prompts import PromptError, load_version, write_version
from bot.store import proposals
from bot.store.db import Database

if TYPE_CHECKING:
    from bot.service import Service

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- reading votes


async def load_vote_records(db: Database, admins: Collection[int] = (), *,
                            since: float | None = None) -> list[VoteRecord]:
    """Every vote on a verdict (``since``: on a verdict made at or after that time), oldest
    first, with what credibility scoring needs."""
    rows = await proposals.vote_rows(db, since=since)
    admin_set = set(admins)
    records: list[VoteRecord] = []
    for r in rows:
        labels = tuple(json.loads(r["probabilities"]) or ())
        if r["label"] not in labels:
            labels = (*labels, r["label"])
        records.append(VoteRecord(
            interaction_id=int(r["interaction_id"]), voter_id=int(r["user_id"]),
            version_id=r["version_id"], labels=labels, verdict=r["label"],
            correct=bool(r["correct"]), correct_label=r["correct_label"],
            verdict_at=float(r["verdict_at"]), voted_at=float(r["voted"]), text=r["text"],
            is_admin=int(r["user_id"]) in admin_set,
        ))
    return records


# ----------------------------------------------------------------------------- stored results


@dataclass(frozen=True)
class StoredCheck:
    id: int
    at: float
    result: OfflineResult


@dataclass(frozen=True)
class Proposal:
    candidate_id: str
    parent_id: str
    created_at: float
    status: str
    path: str
    reason: str
    judged: int
    error_rate: float
    offline_check_id: int | None
    decided_by: str | None
    decided_at: float | None


async def store_offline_check(db: Database, result: OfflineResult, at: float) -> int:
    return await proposals.insert_offline_check(
        db, at=at, candidate_id=result.candidate_id, active_id=result.active_id, n=result.n,
        candidate_correct=result.candidate_correct, active_correct=result.active_correct,
        margin=result.margin, passed=result.passed, reason=result.reason,
        details=result.to_dict())


def _check(row: Any) -> StoredCheck:
    details = json.loads(row["details"])
    result = OfflineResult(
        candidate_id=row["candidate_id"], active_id=row["active_id"], n=int(row["n"]),
        candidate_correct=int(row["candidate_correct"]),
        active_correct=int(row["active_correct"]), wins=int(details.get("wins", 0)),
        losses=int(details.get("losses", 0)), margin=float(row["margin"]),
        passed=bool(row["passed"]), reason=row["reason"],
        p_value=float(details.get("p_value", 1.0)), errors=int(details.get("errors", 0)),
    )
    return StoredCheck(int(row["id"]), float(row["at"]), result)


async def last_offline_check(db: Database, candidate_id: str | None = None
                             ) -> StoredCheck | None:
    row = await proposals.last_offline_check(db, candidate_id)
    return _check(row) if row else None


def _proposal(row: Any) -> Proposal:
    return Proposal(
        candidate_id=row["candidate_id"], parent_id=row["parent_id"],
        created_at=float(row["created_at"]), status=row["status"], path=row["path"],
        reason=row["reason"], judged=int(row["judged"]), error_rate=float(row["error_rate"]),
        offline_check_id=row["offline_check_id"], decided_by=row["decided_by"],
        decided_at=row["decided_at"],
    )


async def list_proposals(db: Database, status: str | None = None, limit: int = 20
                         ) -> list[Proposal]:
    """Newest first."""
    rows = await proposals.list_proposals(db, status, limit)
    return [_proposal(r) for r in rows]


async def _set_status(db: Database, candidate_id: str, status: str, *, actor: str | None,
                      at: float) -> None:
    await proposals.set_status(db, candidate_id, status, actor=actor, at=at)


# ----------------------------------------------------------------------------- the cycle


@dataclass(frozen=True)
class LearningState:
    """What the loop knows now: the inputs of a cycle and of ``/report``."""

    loop: LoopState
    analysis: loop_cycle.Analysis
    trigger: Trigger

    @property
    def active_id(self) -> str | None:
        return self.loop.active_id

    @property
    def credibility(self) -> CredibilityResult:
        return self.analysis.credible

    @property
    def report(self) -> ImprovementReport:
        return self.analysis.report


@dataclass(frozen=True)
class CycleResult:
    action: loop_cycle.CycleOutcome
    message: str
    candidate_id: str | None = None
    check: OfflineResult | None = None


def _past(p: Proposal) -> PastProposal:
    return PastProposal(p.candidate_id, p.created_at, p.judged)


async def load_loop_state(db: Database) -> LoopState:
    """The deployment, the proposals waiting for /approve and the active version's last one."""
    deployment = await versions.load(db)
    active_id = deployment.active.version_id if deployment.active else None
    pending = await list_proposals(db, "proposed")
    last = None
    if active_id:
        row = await proposals.last_proposal_of(db, active_id)
        last = _past(_proposal(row)) if row else None
    return LoopState(active_id, tuple(c.version_id for c in deployment.candidates),
                     tuple(_past(p) for p in pending), last)


async def _analyse(db: Database, settings: Settings, state: LoopState, at: float,
                   config: CredibilityConfig | None = None) -> loop_cycle.Analysis:
    # Only the window's votes are read: the cycle's cost stays bounded as history grows.
    records = await load_vote_records(db, settings.telegram.admins,
                                      since=loop_cycle.window_start(at))
    # Seconds of CPU on a large window: off the event loop, so the bot keeps answering.
    return await asyncio.to_thread(
        loop_cycle.analyse, records, at, active_id=state.active_id,
        candidate_ids=state.in_canary, config=config)


async def learning_state(db: Database, settings: Settings, *,
                         config: CredibilityConfig | None = None,
                         now: float | None = None) -> LearningState:
    at = time.time() if now is None else now
    state = await load_loop_state(db)
    analysis = await _analyse(db, settings, state, at, config)
    return LearningState(state, analysis,
                         loop_cycle.check_trigger(analysis, state, settings.loop, at))


def _instruction_generator(service: Service, parent: Any) -> Complete | None:
    cfg = service.settings.loop
    if not cfg.llm_endpoint:
        return None
    if cfg.llm_endpoint == "local":
        return local_complete(service.runtime, parent)
    return openai_complete(cfg.llm_endpoint, cfg.llm_model,
                           api_key=os.environ.get("LOOPBOT_LLM_API_KEY", ""))


async def run_cycle(service: Service, *, actor: str = "loop", now: float | None = None,
                    candidate_config: CandidateConfig | None = None,
                    force: bool = False) -> CycleResult:
    """One pass of the loop (the scheduled job calls this; ``force`` skips the error-rate
    rule but never the one-candidate-at-a-time rule). The decisions are
    :mod:`bot.learning.cycle`'s; this does the reading, writing and checking."""
    at = time.time() if now is None else now
    settings = service.settings
    if settings.loop.mode == "off":
        return CycleResult("off", "the improvement loop is off (loop.mode: off)")
    db = service.store.db
    await _expire(db, at)
    state = await load_loop_state(db)
    blocked = loop_cycle.blocking_reason(state, settings.loop, at)
    if blocked is not None:  # no analysis needed (and none wasted while a canary runs)
        return CycleResult("idle", blocked.reason)
    analysis = await _analyse(db, settings, state, at)
    parent = service.versions.get(state.active_id) if state.active_id else None
    directory = prompts_directory(settings)
    on_disk = await asyncio.to_thread(lambda: {p.stem for p in Path(directory).glob("*.yaml")})
    taken = set(service.versions) | on_disk
    taken |= {p.candidate_id for p in await list_proposals(db, limit=10_000)}
    plan = await asyncio.to_thread(
        loop_cycle.plan_cycle, analysis, state, settings.loop, now=at, parent=parent,
        existing_ids=taken, force=force, candidates=candidate_config)
    if plan.candidate is None or parent is None:
        return CycleResult(plan.action, plan.reason)
    candidate, errors = plan.candidate, plan.errors
    complete = _instruction_generator(service, parent)
    if complete is not None and plan.train_errors is not None:
        try:
            # Only training mistakes: a quoted held-out text would bias the offline check.
            instruction = await propose_instruction(parent, plan.train_errors, complete)
        except Exception as exc:  # the optional generator must never stop the loop
            log.warning("instruction generator failed: %s", exc)
            instruction = None
        if instruction is not None:
            candidate = with_instruction(candidate, instruction)
    path = await asyncio.to_thread(write_version, candidate.version, directory)
    try:
        version = await asyncio.to_thread(load_version, path)
    except PromptError as exc:  # cannot happen for a validated candidate; keep the record
        return CycleResult("failed", f"{path}: {exc}")
    service.versions[version.id] = version
    # Background priority: hundreds of verdicts must not hold up users' replies.
    classifier = getattr(service.runtime, "background", None)
    result = await evaluate_offline(version, parent, plan.held_out,
                                    classifier() if callable(classifier) else service.runtime,
                                    margin=settings.loop.offline_margin)
    check_id = await store_offline_check(db, result, at)
    status = loop_cycle.status_after_check(result.passed, settings.loop.mode)
    await proposals.insert_proposal(
        db, candidate_id=version.id, parent_id=parent.id, at=at, status=status,
        path=str(path), reason=version.reason, judged=errors.judged if errors else 0,
        error_rate=errors.error_rate if errors else 0.0, offline_check_id=check_id,
        report=errors.to_dict() if errors else {},
        decided_by=actor if status == "canary" else None,
        decided_at=at if status == "canary" else None)
    if status == "refused":
        return CycleResult("refused", f"{version.id} refused offline: {result.reason}",
                           version.id, result)
    if status == "proposed":
        return CycleResult("proposed", f"{version.id} passed the offline check and waits for "
                           f"/approve {version.id}: {result.reason}", version.id, result)
    try:
        await _canary(service, version.id, actor=actor, result=result, why=plan.trigger.reason)
    except CanaryTaken as exc:
        # It passed its check: an admin can still /approve it once the other test ends.
        await _set_status(db, version.id, "proposed", actor="loop", at=at)
        return CycleResult("proposed", f"{version.id} passed the offline check but {exc}; "
                           f"/approve {version.id} once that test ends", version.id, result)
    return CycleResult("canary", f"{version.id} is in canary: {result.reason}", version.id,
                       result)


class CanaryTaken(versions.VersionError):
    """Another candidate went into canary meanwhile (e.g. an admin's /canary)."""


def _nothing_in_canary(candidate_id: str) -> versions.Expectation:
    def check(current: versions.Deployment) -> None:
        others = [c.version_id for c in current.candidates if c.version_id != candidate_id]
        if others:
            raise CanaryTaken("another candidate is in canary: " + ", ".join(others))
    return check


async def _canary(service: Service, candidate_id: str, *, actor: str, result: OfflineResult,
                  why: str) -> versions.AuditEntry:
    share = service.settings.experiment.ramp_shares[0]
    # Checked inside the write's transaction: the offline check takes minutes, and one
    # candidate at a time must hold whatever happened meanwhile.
    return await versions.set_canary(
        service.store.db, candidate_id, share * 100.0, service.versions, actor=actor,
        reason=f"mined candidate ({why}); offline check: {result.reason}",
        stats={"offline_check": result.to_dict()}, expect=_nothing_in_canary(candidate_id),
    )


async def _expire(db: Database, at: float) -> None:
    await proposals.expire_proposals(db, at=at, older_than=at - PROPOSAL_TTL_S)


class ApprovalError(LoopbotError, ValueError):
    """``/approve ID`` is not possible; the message says why, for the admin."""


async def approve(service: Service, candidate_id: str, *, actor: str,
                  now: float | None = None) -> versions.AuditEntry:
    """An admin's ``/approve ID``: a proposal that passed its offline check goes to canary."""
    at = time.time() if now is None else now
    db = service.store.db
    row = await proposals.get_proposal(db, candidate_id)
    if row is None:
        raise ApprovalError(f"no mined candidate '{candidate_id}' (see /report)")
    proposal = _proposal(row)
    if proposal.status != "proposed":
        raise ApprovalError(f"'{candidate_id}' is {proposal.status}, not waiting for approval")
    if proposal.created_at < at - PROPOSAL_TTL_S:
        # The job expires these too, but it does not run with loop.mode: off.
        await _set_status(db, candidate_id, "expired", actor="loop", at=at)
        raise ApprovalError(f"'{candidate_id}' is older than {PROPOSAL_TTL_S // 86400:.0f} "
                            "days: the votes it was mined from are stale")
    check = await last_offline_check(db, candidate_id)
    if check is None or not check.result.passed:
        raise ApprovalError(f"'{candidate_id}' has no passed offline check")
    deployment = await versions.load(db)
    if deployment.active is None or deployment.active.version_id != proposal.parent_id:
        raise ApprovalError(
            f"'{candidate_id}' was built from and checked against {proposal.parent_id}, which "
            f"no longer serves (active: "
            f"{deployment.active.version_id if deployment.active else 'none'})")
    if deployment.candidates:
        raise ApprovalError("another candidate is in canary: "
                            + ", ".join(c.version_id for c in deployment.candidates))
    if candidate_id not in service.versions:
        service.versions[candidate_id] = await asyncio.to_thread(load_version, proposal.path)
    try:
        entry = await _canary(service, candidate_id, actor=actor, result=check.result,
                              why=f"approved by {actor}")
    except CanaryTaken as exc:
        raise ApprovalError(str(exc)) from exc
    await _set_status(db, candidate_id, "canary", actor=actor, at=at)
    return entry


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class LearningReport:
    """Everything ``/report`` and ``loopbot report`` show."""

    mode: str
    active_id: str | None
    report: ImprovementReport
    credibility: Mapping[str, float | int]
    trigger: Trigger
    last_check: StoredCheck | None
    proposals: tuple[Proposal, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "active": self.active_id,
            "credibility": dict(self.credibility),
            "trigger": {"fire": self.trigger.fire, "reason": self.trigger.reason},
            "last_offline_check": (
                {"id": self.last_check.id, "at": self.last_check.at,
                 **self.last_check.result.to_dict()} if self.last_check else None),
            "proposals": [p.__dict__ for p in self.proposals],
            **self.report.to_dict(),
        }


async def build_report(db: Database, settings: Settings, *,
                       now: float | None = None) -> LearningReport:
    """``/report`` and ``loopbot report``: needs no model (the bot passes
    ``service.store.db`` and ``service.settings``); over the loop's vote window."""
    state = await learning_state(db, settings, now=now)
    return LearningReport(
        mode=settings.loop.mode, active_id=state.active_id, report=state.report,
        credibility=summary(state.credibility), trigger=state.trigger,
        last_check=await last_offline_check(db),
        proposals=tuple(await list_proposals(db, limit=5)),
    )
