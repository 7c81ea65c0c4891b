"""The offline check refuses a candidate that is worse on held-out credible texts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from analytics.credibility import LabelledText
from bot.config import ModelConfig
from bot.learning.offline_eval import evaluate_offline, mcnemar_p, split_holdout
from bot.learning.standin import StandInClassifier
from bot.llm.runtime import ModelRuntime
from bot.prompts import Example, PromptVersion, load_version

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
POS, NEG = "正面", "负面"

HELD_OUT = [
    ("服务很好，很满意", POS), ("质量不错，推荐购买", POS), ("非常喜欢，值得", POS),
    ("包装漂亮，物流快", POS), ("好用，方便", POS), ("房间干净舒服", POS),
    ("味道很棒，下次还来", POS), ("性价比高，划算", POS), ("屏幕清晰，流畅", POS),
    ("客服热情周到", POS), ("效果很好，开心", POS), ("做工精致，好看", POS),
    ("太差了，很失望", NEG), ("质量差，退货", NEG), ("垃圾，后悔买了", NEG),
    ("很慢，态度差", NEG), ("坏了，麻烦", NEG), ("房间脏，很吵", NEG),
    ("难吃，浪费钱", NEG), ("卡顿，死机", NEG), ("有异味，糟糕", NEG),
    ("太贵了，不值", NEG), ("无聊，失败", NEG), ("破的，骗人", NEG),
]


def _labelled(pairs: list[tuple[str, str]]) -> list[LabelledText]:
    return [LabelledText(text=t, label=lb, labels=(POS, NEG), confidence=0.95, support=1.0,
                         voters=2, admin_confirmed=False, judged=()) for t, lb in pairs]


def _poisoned(active: PromptVersion) -> PromptVersion:
    """Examples that teach the opposite of the truth: clearly worse."""
    flipped = (
        Example("很好，很满意，推荐", NEG), Example("喜欢，值得，不错", NEG),
        Example("漂亮，方便，好用", NEG), Example("干净舒服，开心", NEG),
        Example("太差，失望，垃圾", POS), Example("坏了，退货，后悔", POS),
        Example("很慢，麻烦，糟糕", POS), Example("脏，吵，浪费", POS),
    )
    return dataclasses.replace(active, id="v1-zh-c9", parent=active.id, examples=flipped,
                               content_hash="poisoned")


async def test_worse_candidate_is_refused_and_an_equal_one_passes() -> None:
    active = load_version(PROMPTS / "v1-zh.yaml")
    classifier = StandInClassifier()
    held = _labelled(HELD_OUT)
    result = await evaluate_offline(_poisoned(active), active, held, classifier, margin=0.02)
    assert result.n == len(HELD_OUT)
    assert result.active_accuracy > 0.8
    assert result.candidate_accuracy < result.active_accuracy - 0.02
    assert not result.passed and "refused" in result.reason
    assert result.losses > result.wins
    assert result.p_value < 0.05

    same = dataclasses.replace(active, id="v1-zh-c8", parent=active.id)
    ok = await evaluate_offline(same, active, held, classifier, margin=0.0)
    assert ok.passed and ok.difference == 0.0 and ok.wins == ok.losses == 0


async def test_a_large_margin_tolerates_a_worse_candidate_and_too_few_texts_refuse() -> None:
    active = load_version(PROMPTS / "v1-zh.yaml")
    classifier = StandInClassifier()
    held = _labelled(HELD_OUT)
    tolerant = await evaluate_offline(_poisoned(active), active, held, classifier, margin=1.0)
    assert tolerant.passed
    few = await evaluate_offline(active, active, held[:5], classifier, min_texts=20)
    assert not few.passed and "only 5" in few.reason


async def test_texts_copied_into_the_candidate_are_not_graded() -> None:
    active = load_version(PROMPTS / "v1-zh.yaml")
    held = _labelled(HELD_OUT)
    cand = dataclasses.replace(active, id="v1-zh-c7", parent=active.id,
                               examples=(*active.examples, Example(HELD_OUT[0][0], POS)),
                               content_hash="copied")
    result = await evaluate_offline(cand, active, held, StandInClassifier())
    assert result.n == len(HELD_OUT) - 1


async def test_offline_check_with_the_real_runtime(tiny_gguf: Path) -> None:
    active = load_version(PROMPTS / "v1-zh.yaml")
    runtime = ModelRuntime(tiny_gguf, ModelConfig(n_threads=2, n_ctx=1024))
    await runtime.start()
    try:
        result = await evaluate_offline(active, active, _labelled(HELD_OUT), runtime)
    finally:
        await runtime.close()
    # The same prompt on the same deterministic model: identical answers, so it passes.
    assert result.n == len(HELD_OUT) and result.errors == 0
    assert result.wins == result.losses == 0 and result.passed


def test_holdout_split_is_stable_and_keeps_duplicates_together() -> None:
    items = _labelled([(f"第{i}条评论，还不错", POS) for i in range(200)]
                      + [("第1条评论，还不错！！", POS)])
    train, held = split_holdout(items, 0.3, seed=0)
    assert 30 < len(held) < 90 and len(train) + len(held) == len(items)
    assert split_holdout(items, 0.3, seed=0) == (train, held)
    sides = {("held" if it in held else "train") for it in items
             if it.text.startswith("第1条评论")}
    assert len(sides) == 1


def test_mcnemar() -> None:
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 * 0.5**10)
