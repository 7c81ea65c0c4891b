"""Fixtures for driving the real bot: a fake Bot API on loopback and a running bot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.devtools.fakebotapi import FakeBotAPI
from tests.e2e.botharness import BotHarness


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeBotAPI]:
    with FakeBotAPI() as api:
        yield api


@pytest.fixture(scope="module")
def bot(fake_api: FakeBotAPI, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[BotHarness]:
    """One running bot per test module (starting one costs about a second); tests keep
    apart by using their own user and chat ids."""
    harness = BotHarness(fake_api, tiny_gguf, tmp_path_factory.mktemp("bot") / "loopbot.db",
                         overrides={"telegram.user_rate_limit": 5})
    harness.start()
    yield harness
    harness.stop()
