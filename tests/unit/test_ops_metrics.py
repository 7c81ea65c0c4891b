"""The metric helpers and the gauges recomputed from a real database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.ops.metrics import Metrics
from bot.store.queries import NewInteraction, Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "m.db")
    yield s
    await s.close()


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.exposition()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


async def _vote(store: Store, message_id: int, version: str, user: int, correct: bool) -> None:
    interaction, _ = await store.insert_interaction(NewInteraction(
        chat_id=user, user_id=user, message_id=message_id, text="hello", version_id=version,
        arm="active", bucket=1, label="pos", probabilities={"pos": 0.6, "neg": 0.4}))
    await store.upsert_vote(interaction.id, user, correct=correct, correct_label=None)


class _Queue:
    queue_depth = 3


async def test_accuracy_and_queue_depth_come_from_the_database_and_the_runtime(
        store: Store) -> None:
    for i, correct in enumerate([True, True, True, False]):
        await _vote(store, i, "v1-en", 10 + i, correct)
    await _vote(store, 99, "v2-en", 50, False)
    metrics = Metrics(process_metrics=False)
    await metrics.refresh(store.db, _Queue(), clock=lambda: 0.0)
    got = samples(metrics)
    assert got[("loopbot_accuracy", (("version", "v1-en"),))] == 0.75
    assert got[("loopbot_accuracy", (("version", "v2-en"),))] == 0.0
    assert got[("loopbot_stored_votes", (("version", "v1-en"),))] == 4
    assert got[("loopbot_inference_queue_depth", ())] == 3

    # A forgotten user takes the only vote of v2-en with them: its gauge disappears.
    await store.forget_user(50)
    clock = iter([1000.0, 1010.0, 2000.0])
    await metrics.refresh(store.db, clock=lambda: next(clock))
    await metrics.refresh(store.db, clock=lambda: next(clock))  # within 30 s: cached
    await metrics.refresh(store.db, clock=lambda: next(clock))
    got = samples(metrics)
    assert ("loopbot_accuracy", (("version", "v2-en"),)) not in got
    assert got[("loopbot_accuracy", (("version", "v1-en"),))] == 0.75
    assert got[("loopbot_inference_queue_depth", ())] == 0


async def test_refreshes_closer_than_the_interval_reuse_the_last_scan(store: Store) -> None:
    metrics = Metrics(process_metrics=False)
    await metrics.refresh(store.db, clock=lambda: 100.0)
    await _vote(store, 1, "v1-zh", 7, True)
    await metrics.refresh(store.db, clock=lambda: 110.0)
    assert ("loopbot_accuracy", (("version", "v1-zh"),)) not in samples(metrics)
    await metrics.refresh(store.db, clock=lambda: 110.0, force=True)
    assert samples(metrics)[("loopbot_accuracy", (("version", "v1-zh"),))] == 1.0


def test_counters_and_histograms_use_the_documented_names() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.observe_verdict(0.2)
    metrics.observe_reply(4.0)
    metrics.count_message()
    metrics.count_message()
    metrics.count_vote("v1-zh", False)
    metrics.count_decision("revert")
    got = samples(metrics)
    assert got[("loopbot_verdict_latency_seconds_count", ())] == 1
    assert got[("loopbot_verdict_latency_seconds_bucket", (("le", "0.25"),))] == 1
    assert got[("loopbot_verdict_latency_seconds_bucket", (("le", "0.1"),))] == 0
    assert got[("loopbot_reply_latency_seconds_sum", ())] == 4.0
    assert got[("loopbot_messages_total", ())] == 2
    assert got[("loopbot_votes_total", (("correct", "false"), ("version", "v1-zh")))] == 1
    assert got[("loopbot_decisions_total", (("action", "revert"),))] == 1
