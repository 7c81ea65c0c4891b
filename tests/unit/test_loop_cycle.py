"""The loop cycle's decisions on generated votes (pure: no database, no model)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from analytics.credibility import VoteRecord, normalize
from bot.learning.cycle import (
    PROPOSAL_TTL_S,
    VOTE_WINDOW_S,
    LoopConfig,
    LoopMode,
    LoopState,
    PastProposal,
    analyse,
    blocking_reason,
    check_trigger,
    evidence_needed,
    fresh_judgements,
    plan_cycle,
    recent_votes,
    status_after_check,
)
from bot.prompts import load_version

PARENT = load_version(Path(__file__).resolve().parents[2] / "prompts" / "v1-zh.yaml")
POS, NEG = "正面", "负面"
OTHER = {POS: NEG, NEG: POS}
GOOD = ("很好", "不错", "推荐", "满意", "喜欢", "值得")
TEXTS = [(f"{a}{b}", POS if b in GOOD else NEG)
         for a in ("物流", "客服", "质量", "包装", "价格", "屏幕", "电池", "味道", "房间", "音质")
         for b in (*GOOD, "太差", "失望", "坏了", "很慢", "退货", "后悔")]
DAY = 86400.0
LOOP = LoopConfig(mode="automatic", min_credible_votes=40)


def _votes(start: float, *, accuracy: float = 0.7, first_id: int = 1,
           texts: list[tuple[str, str]] = TEXTS, seed: int = 3) -> list[VoteRecord]:
    """Every text once, a verdict of v1-zh right with ``accuracy``, three honest votes."""
    rng = random.Random(seed)
    out: list[VoteRecord] = []
    for i, (text, truth) in enumerate(texts):
        verdict = truth if rng.random() < accuracy else OTHER[truth]
        at = start + 60 * i
        for voter in rng.sample(range(1, 13), 3):
            out.append(VoteRecord(
                interaction_id=first_id + i, voter_id=voter, version_id=PARENT.id,
                labels=(POS, NEG), verdict=verdict, correct=verdict == truth,
                correct_label=None if verdict == truth else truth, verdict_at=at,
                voted_at=at + 9, text=text))
    return out


def test_one_candidate_at_a_time_and_stale_proposals_expire() -> None:
    now = 100 * DAY
    assert blocking_reason(LoopState(PARENT.id), LOOP, now) is None
    off = blocking_reason(LoopState(PARENT.id), LoopConfig(mode="off"), now)
    assert off is not None and off.blocking and "off" in off.reason
    canary = blocking_reason(LoopState(PARENT.id, in_canary=("v1-zh-c1",)), LOOP, now)
    assert canary is not None and "already in canary (v1-zh-c1)" in canary.reason
    waiting = LoopState(PARENT.id, waiting=(PastProposal("v1-zh-c2", now - DAY, 50),))
    blocked = blocking_reason(waiting, LOOP, now)
    assert blocked is not None and "waiting for /approve (v1-zh-c2)" in blocked.reason
    assert blocking_reason(waiting, LOOP, now - DAY + PROPOSAL_TTL_S + 1) is None


def test_only_the_windows_votes_are_analysed() -> None:
    old, new = _votes(0.0), _votes(40 * DAY, first_id=1000)
    now = 41 * DAY
    assert max(v.verdict_at for v in old) < now - VOTE_WINDOW_S < 40 * DAY
    assert recent_votes(old + new, now) == new
    analysis = analyse(old + new, now, active_id=PARENT.id)
    assert analysis.votes == len(new)
    assert set(analysis.verdict_at) == {v.interaction_id for v in new}


def test_trigger_needs_votes_errors_and_new_evidence() -> None:
    votes = _votes(DAY)
    now = 2 * DAY
    analysis = analyse(votes, now, active_id=PARENT.id, candidate_ids=("v1-zh-c1",))
    errors = analysis.report.get(PARENT.id)
    assert analysis.report.versions[0].version_id == PARENT.id
    assert errors is not None and errors.judged >= LOOP.min_credible_votes
    assert errors.error_rate > LOOP.error_rate_trigger
    assert check_trigger(analysis, LoopState(PARENT.id), LOOP, now).fire
    strict = LoopConfig(mode="automatic", min_credible_votes=errors.judged + 1)
    assert not check_trigger(analysis, LoopState(PARENT.id), strict, now).fire
    lenient = LoopConfig(mode="automatic", min_credible_votes=40, error_rate_trigger=0.9)
    calm = check_trigger(analysis, LoopState(PARENT.id), lenient, now)
    assert not calm.fire and "within 90%" in calm.reason

    # A proposal after all these verdicts: nothing new to mine until more are judged.
    mined = LoopState(PARENT.id, last_proposal=PastProposal("v1-zh-c1", now, errors.judged))
    wait = check_trigger(analysis, mined, LOOP, now)
    assert not wait.fire and not wait.blocking and "0 judged since" in wait.reason
    # New verdicts on the same texts: the window's ``judged`` stays the same, yet they are
    # new evidence.
    later = analyse(votes + _votes(now + 60, first_id=1000, seed=4), now + DAY,
                    active_id=PARENT.id)
    again = later.report.get(PARENT.id)
    assert again is not None and again.judged == errors.judged
    assert fresh_judgements(later, PARENT.id, now) >= evidence_needed(LOOP)
    assert check_trigger(later, mined, LOOP, now + DAY).fire


def test_plan_generates_from_training_texts_only() -> None:
    now = 2 * DAY
    analysis = analyse(_votes(DAY), now, active_id=PARENT.id)
    plan = plan_cycle(analysis, LoopState(PARENT.id), LOOP, now=now, parent=PARENT,
                      existing_ids={PARENT.id, "v1-zh-c1"})
    assert plan.action == "generate" and plan.candidate is not None, plan.reason
    version = plan.candidate.version
    assert version.id == "v1-zh-c2" and version.parent == PARENT.id
    assert plan.held_out and plan.errors is not None and plan.errors.version_id == PARENT.id
    assert plan.patterns == tuple(p.name for p in plan.errors.patterns)
    held = {normalize(item.text) for item in plan.held_out}
    assert not held & {normalize(ex.text) for ex in plan.candidate.new_examples}
    # Another hold-out seed holds out other texts.
    other = plan_cycle(analysis, LoopState(PARENT.id), LOOP, now=now, parent=PARENT,
                       holdout_seed=1)
    assert {normalize(i.text) for i in other.held_out} != held


def test_plan_idle_failed_forced_and_no_candidate() -> None:
    now = 2 * DAY
    analysis = analyse(_votes(DAY, accuracy=0.95), now, active_id=PARENT.id)
    calm = plan_cycle(analysis, LoopState(PARENT.id), LOOP, now=now, parent=PARENT)
    assert calm.action == "idle" and "within" in calm.reason
    forced = plan_cycle(analysis, LoopState(PARENT.id), LOOP, now=now, parent=PARENT,
                        force=True)
    assert forced.action == "generate"
    # Forcing never starts a second candidate.
    busy = LoopState(PARENT.id, in_canary=("v1-zh-c1",))
    assert plan_cycle(analysis, busy, LoopConfig(mode="automatic"), now=now, parent=PARENT,
                      force=True).action == "idle"
    missing = plan_cycle(analysis, LoopState(PARENT.id), LOOP, now=now, parent=None,
                         force=True)
    assert missing.action == "failed" and "has no file" in missing.reason
    # Only negative texts judged: no balanced set of examples can be made.
    negative = [(t, label) for t, label in TEXTS if label == NEG]
    one_sided = analyse(_votes(DAY, accuracy=0.5, texts=negative), now, active_id=PARENT.id)
    none = plan_cycle(one_sided, LoopState(PARENT.id), LOOP, now=now, parent=PARENT,
                      force=True)
    assert none.action == "no_candidate" and none.candidate is None, none.reason


@pytest.mark.parametrize(("passed", "mode", "status"), [
    (False, "automatic", "refused"), (True, "automatic", "canary"),
    (True, "suggest", "proposed"), (False, "suggest", "refused"),
])
def test_status_after_the_offline_check(passed: bool, mode: LoopMode, status: str) -> None:
    assert status_after_check(passed, mode) == status
