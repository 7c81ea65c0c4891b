"""The loop's orchestration on a real database, real prompt files and the real runtime."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import versions
from bot.config import ModelConfig, Settings
from bot.learning import loop as learning
from bot.learning.cycle import PROPOSAL_TTL_S, VOTE_WINDOW_S, LoopMode
from bot.learning.offline_eval import evaluate_offline
from bot.llm.runtime import ModelRuntime
from bot.prompts import load_directory, load_version
from bot.service import Service
from bot.store.queries import NewInteraction, Store
from bot.texts.learning import cycle_text, report_messages

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
POS, NEG = "正面", "负面"
OTHER = {POS: NEG, NEG: POS}
GOOD = ("很好", "不错", "推荐", "满意", "喜欢", "值得")
TEXTS = [(f"{a}{b}", POS if b in GOOD else NEG)
         for a in ("物流", "客服", "质量", "包装", "价格", "屏幕", "电池", "味道", "房间", "音质")
         for b in (*GOOD, "太差", "失望", "坏了", "很慢", "退货", "后悔")]


# The seeded votes are a day old: inside the loop's vote window for cycles run "now".
SEEDED_AT = time.time() - 86400.0


async def _seed(store: Store, start: float = SEEDED_AT, first_message: int = 1) -> None:
    rng = random.Random(9)
    for i, (text, truth) in enumerate(TEXTS):
        verdict = truth if rng.random() < 0.7 else OTHER[truth]
        interaction, _ = await store.insert_interaction(NewInteraction(
            chat_id=-5, user_id=500 + i, message_id=first_message + i, text=text,
            version_id="v1-zh", arm="active", bucket=7, chat_type="group", label=verdict,
            probabilities={POS: 0.5, NEG: 0.5}, created_at=start + 60 * i))
        for voter in rng.sample(range(1, 13), 3):
            await store.upsert_vote(interaction.id, voter, correct=verdict == truth,
                                    correct_label=None if verdict == truth else truth,
                                    now=start + 60 * i + 9)


@pytest.fixture()
async def runtime(tiny_gguf: Path) -> AsyncIterator[ModelRuntime]:
    rt = ModelRuntime(tiny_gguf, ModelConfig(n_threads=2, n_ctx=1024))
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


async def _service(tmp_path: Path, runtime: ModelRuntime, *, mode: LoopMode,
                   margin: float) -> Service:
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    shutil.copy(PROMPTS / "v1-zh.yaml", prompts)
    settings = Settings()
    settings.prompts.directory = str(prompts)
    settings.loop.mode = mode
    settings.loop.min_credible_votes = 20
    settings.loop.offline_margin = margin
    store = await Store.open(tmp_path / "loop.db")
    await _seed(store)
    service = Service(settings, store, runtime, load_directory(prompts))
    await service.start()
    return service


async def test_automatic_mode_canaries_a_checked_candidate(tmp_path: Path,
                                                           runtime: ModelRuntime) -> None:
    service = await _service(tmp_path, runtime, mode="automatic", margin=1.0)
    try:
        result = await learning.run_cycle(service, now=SEEDED_AT + 86400.0)
        assert result.action == "canary", result.message
        cid = result.candidate_id
        assert cid == "v1-zh-c1" and result.check is not None and result.check.n > 0
        # The file is a valid version with its parent, and the runtime serves it.
        version = load_version(tmp_path / "prompts" / f"{cid}.yaml")
        assert version.parent == "v1-zh" and version.reason
        state = await versions.load(service.store.db)
        (cand,) = state.candidates
        assert cand.version_id == cid
        assert cand.share == service.settings.experiment.ramp_shares[0]
        (entry, *_) = await versions.audit_log(service.store.db, version_id=cid)
        assert entry.action == "canary" and "offline check" in entry.reason
        assert entry.stats["offline_check"]["candidate_id"] == cid
        # At most one candidate at a time.
        again = await learning.run_cycle(service, now=SEEDED_AT + 86500.0)
        assert again.action == "idle" and "already in canary" in again.message
        report = await learning.build_report(service.store.db, service.settings)
        assert report.last_check is not None and report.last_check.result.candidate_id == cid
        text = "\n".join(report_messages(report))
        assert "v1-zh:" in text and f"{cid} vs v1-zh passed" in text
        assert cycle_text(result) is not None
    finally:
        await service.store.close()


async def test_suggest_mode_waits_for_approve(tmp_path: Path, runtime: ModelRuntime) -> None:
    service = await _service(tmp_path, runtime, mode="suggest", margin=1.0)
    try:
        result = await learning.run_cycle(service)
        assert result.action == "proposed" and result.candidate_id
        cid = result.candidate_id
        assert (await versions.load(service.store.db)).candidates == ()
        assert "/approve" in (cycle_text(result) or "")
        idle = await learning.run_cycle(service)
        assert idle.action == "idle" and "waiting for /approve" in idle.message
        entry = await learning.approve(service, cid, actor="admin:1")
        assert entry.version_id == cid and entry.actor == "admin:1"
        (cand,) = (await versions.load(service.store.db)).candidates
        assert cand.version_id == cid
        with pytest.raises(learning.ApprovalError, match="canary"):
            await learning.approve(service, cid, actor="admin:1")
        with pytest.raises(learning.ApprovalError, match="no mined candidate"):
            await learning.approve(service, "v9", actor="admin:1")
    finally:
        await service.store.close()


async def test_approve_refuses_stale_or_orphaned_proposals(tmp_path: Path,
                                                         runtime: ModelRuntime) -> None:
    service = await _service(tmp_path, runtime, mode="suggest", margin=1.0)
    try:
        result = await learning.run_cycle(service)
        assert result.action == "proposed" and result.candidate_id
        cid = result.candidate_id
        (proposal,) = await learning.list_proposals(service.store.db)
        # A week and a day later, with the loop off (no job expires it): too old.
        late = proposal.created_at + PROPOSAL_TTL_S + 86400
        with pytest.raises(learning.ApprovalError, match="older than"):
            await learning.approve(service, cid, actor="admin:1", now=late)
        (proposal,) = await learning.list_proposals(service.store.db)
        assert proposal.status == "expired"
        assert (await versions.load(service.store.db)).candidates == ()
    finally:
        await service.store.close()


async def test_a_candidate_checked_against_a_version_no_longer_active_is_refused(
        tmp_path: Path, runtime: ModelRuntime) -> None:
    service = await _service(tmp_path, runtime, mode="suggest", margin=1.0)
    try:
        result = await learning.run_cycle(service)
        assert result.action == "proposed" and result.candidate_id
        shutil.copy(PROMPTS / "v1-en.yaml", tmp_path / "prompts")
        service.versions.update(load_directory(tmp_path / "prompts"))
        await versions.promote(service.store.db, "v1-en", service.versions, actor="admin:1",
                               reason="switching language")
        with pytest.raises(learning.ApprovalError, match="no longer serves"):
            await learning.approve(service, result.candidate_id, actor="admin:1")
    finally:
        await service.store.close()


async def test_a_canary_started_during_the_offline_check_keeps_the_candidate_waiting(
        tmp_path: Path, runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    service = await _service(tmp_path, runtime, mode="automatic", margin=1.0)
    real = evaluate_offline

    async def admin_canaries_meanwhile(*args: object, **kwargs: object) -> object:
        # An admin's /canary lands while the (minutes long) offline check runs.
        shutil.copy(PROMPTS / "v1-en.yaml", tmp_path / "prompts")
        service.versions.update(load_directory(tmp_path / "prompts"))
        await versions.set_canary(service.store.db, "v1-en", 10, service.versions,
                                  actor="admin:1", reason="by hand")
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(learning, "evaluate_offline", admin_canaries_meanwhile)
    try:
        result = await learning.run_cycle(service)
        assert result.action == "proposed" and "another candidate is in canary" in result.message
        state = await versions.load(service.store.db)
        assert [c.version_id for c in state.candidates] == ["v1-en"]
        (proposal,) = await learning.list_proposals(service.store.db)
        assert proposal.status == "proposed"
    finally:
        await service.store.close()


async def test_refused_candidate_is_stored_and_not_retried_without_new_votes(
        tmp_path: Path, runtime: ModelRuntime) -> None:
    # A negative margin demands the candidate be 100 points better: always refused.
    service = await _service(tmp_path, runtime, mode="automatic", margin=-1.0)
    try:
        result = await learning.run_cycle(service)
        assert result.action == "refused" and result.check is not None
        assert not result.check.passed
        assert (await versions.load(service.store.db)).candidates == ()
        (proposal,) = await learning.list_proposals(service.store.db)
        assert proposal.status == "refused" and proposal.offline_check_id is not None
        again = await learning.run_cycle(service)
        assert again.action == "idle" and "waiting for" in again.message
    finally:
        await service.store.close()


async def test_new_votes_after_a_refusal_trigger_a_new_candidate(
        tmp_path: Path, runtime: ModelRuntime) -> None:
    service = await _service(tmp_path, runtime, mode="automatic", margin=-1.0)
    try:
        first = await learning.run_cycle(service, now=SEEDED_AT + 8000.0)
        assert first.action == "refused"
        # As many fresh verdicts again, judged after the proposal: new evidence.
        await _seed(service.store, start=SEEDED_AT + 9000.0, first_message=1000)
        again = await learning.run_cycle(service, now=SEEDED_AT + 86400.0)
        assert again.action == "refused" and again.candidate_id == "v1-zh-c2", again.message
    finally:
        await service.store.close()


async def test_votes_older_than_the_window_are_not_read(tmp_path: Path,
                                                       runtime: ModelRuntime) -> None:
    service = await _service(tmp_path, runtime, mode="automatic", margin=1.0)
    try:
        later = SEEDED_AT + VOTE_WINDOW_S + 8000.0  # after the last seeded verdict
        result = await learning.run_cycle(service, now=later)
        assert result.action == "idle" and result.message.startswith("0 credibly judged")
        report = await learning.build_report(service.store.db, service.settings, now=later)
        assert report.credibility["votes"] == 0
        assert (await learning.run_cycle(service, now=SEEDED_AT + 8000.0)).action == "canary"
    finally:
        await service.store.close()


async def test_off_mode_does_nothing(tmp_path: Path, runtime: ModelRuntime) -> None:
    service = await _service(tmp_path, runtime, mode="off", margin=1.0)
    try:
        assert (await learning.run_cycle(service)).action == "off"
        assert not list((tmp_path / "prompts").glob("*-c*.yaml"))
    finally:
        await service.store.close()
