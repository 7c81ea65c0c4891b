"""Error mining: mistakes grouped into patterns, counted, with examples."""

from __future__ import annotations

import pytest

from analytics.credibility import Judged, LabelledText
from analytics.mining import mine, patterns_of

POS, NEG = "正面", "负面"


@pytest.mark.parametrize(("text", "pattern"), [
    ("有点失望，但是还能接受", "mixed"),
    ("Disappointing, but acceptable.", "mixed"),
    ("不好吃", "negation"),
    ("It wasn't worth it", "negation"),
    ("I will never buy it again", "negation"),
    ("呵呵，真是好服务啊", "sarcasm"),
    ("Oh great, it broke again 🙄", "sarcasm"),
    ("👍👍👍", "emoji_only"),
    ("😡!!", "emoji_only"),
    ("还行", "very_short"),
    ("这个东西好用吗？", "question"),
    ("太棒了！！", "intensified"),
    ("配送准时，包装完好，商品与描述一致", "other"),
])
def test_patterns_of(text: str, pattern: str) -> None:
    found = patterns_of(text)
    assert pattern in found
    if pattern == "other":
        assert found == ("other",)


def test_long_texts_are_tagged() -> None:
    assert "long" in patterns_of("物流" * 70)
    assert "long" not in patterns_of("物流很快")


def _item(text: str, label: str, *verdicts: tuple[str, str]) -> LabelledText:
    judged = tuple(Judged(i, vid, verdict) for i, (vid, verdict) in enumerate(verdicts))
    return LabelledText(text=text, label=label, labels=(POS, NEG), confidence=0.95,
                        support=1.0, voters=1, admin_confirmed=False, judged=judged)


def test_mine_counts_mistakes_per_version_and_pattern() -> None:
    labelled = [
        _item("有点失望，但是还能接受", POS, ("v1", NEG)),
        _item("不贵，但是不好用", NEG, ("v1", POS)),
        _item("不是很满意", NEG, ("v1", POS), ("v2", NEG)),
        _item("没有想象中那么差", POS, ("v1", NEG), ("v1", NEG)),
        _item("很好", POS, ("v1", POS)),
        _item("质量很差", NEG, ("v1", NEG), ("v2", NEG)),
        _item("👍", POS, ("v2", NEG)),
    ]
    report = mine(labelled)
    v1 = report.get("v1")
    v2 = report.get("v2")
    assert v1 is not None and v2 is not None
    # A text sent twice is one judgement of the version.
    assert (v1.judged, v1.mistakes) == (6, 4)
    assert v1.error_rate == pytest.approx(4 / 6)
    counts = v1.pattern_counts()
    assert counts["negation"] == 3
    assert counts["mixed"] == 2
    # Most frequent first.
    assert v1.patterns[0].name == "negation"
    assert v1.confusion == {f"{POS} -> {NEG}": 2, f"{NEG} -> {POS}": 2}
    negation = v1.patterns[0]
    assert negation.share == pytest.approx(3 / 4)
    assert {e.text for e in negation.examples} <= {"不贵，但是不好用", "不是很满意",
                                                   "没有想象中那么差"}
    assert (v2.judged, v2.mistakes) == (3, 1)
    assert v2.pattern_counts() == {"emoji_only": 1}

    text = report.to_text()
    assert "v1: 4 mistakes of 6" in text and "negation" in text and "“不是很满意”" in text
    data = report.to_dict()
    assert data["versions"][0]["patterns"][0]["count"] == 3


def test_mine_keeps_the_requested_versions_even_without_votes() -> None:
    report = mine([], ["v9"])
    (only,) = report.versions
    assert (only.version_id, only.judged, only.mistakes, only.error_rate) == ("v9", 0, 0, 0.0)
