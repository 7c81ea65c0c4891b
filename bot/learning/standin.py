"""A stand-in sentiment classifier for the loop simulation, when no model file is given.

It is a real classifier whose behaviour depends on a prompt version's few-shot examples, the
way a small chat model's does, so the loop's example selection is what moves its accuracy:

* **Prior knowledge** (what a pretrained model brings): a small hand-written Chinese/English
  sentiment lexicon. A handful of cues per text: positive and negative words, negated ones
  (不好, not good), the polarity after and before a turn word (但是, but), question and
  exclamation marks, length. The prior weights only say "positive words are positive".
* **In-context learning**: a logistic regression over those cues fitted to the version's
  few-shot examples, regularised towards the prior (ridge around it), so a few examples
  shift it a little and many consistent ones (e.g. mixed-sentiment texts labelled by their
  second clause, negations) teach it how to combine the cues.
* **Memory**: a k-nearest-neighbour vote over character bigrams of the examples, which wins
  when a text is near-identical to an example.

The first label of a version is taken as the positive one (true for the shipped versions);
versions with other than two labels are refused. ``classify`` has the runtime's signature
and returns a real :class:`bot.llm.types.Verdict`.
"""

from __future__ import annotations

import math
import re
import time
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from analytics.credibility import jaccard, ngrams
from bot.llm.types import InferenceError, Verdict
from bot.prompts import PromptVersion

FloatArray = npt.NDArray[np.float64]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_POS = _words(
    "好 不错 喜欢 满意 推荐 值得 漂亮 舒服 方便 快 赞 棒 精彩 感动 实用 划算 清晰 干净 热情 "
    "周到 超值 完美 开心 惊喜 流畅 好看 好用 经典 优秀 细致 温馨 安静 贴心 顺利 放心 支持 强 "
    "爱 美 可以 挺 合适 到位 便宜 耐心 专业 喜爱 good great love excellent nice happy "
    "wonderful recommend perfect fast best"
)
_NEG = _words(
    "差 失望 垃圾 退 坏 慢 后悔 不值 贵 脏 吵 旧 烂 假 问题 投诉 一般 郁闷 恶心 无语 可惜 "
    "遗憾 缺点 不足 浪费 折腾 麻烦 糟糕 难吃 难用 骗 破 错 卡 死机 噪音 异味 无聊 失败 "
    "bad terrible worst hate awful poor broken slow disappointing waste refund"
)
_NEGATORS = ("不", "没", "无", "别", "未", "非", "not ", "n't ", "never ", "no ")
_TURN = re.compile(r"但是|不过|可是|然而|但|却|\bbut\b|\bthough\b|\bhowever\b", re.IGNORECASE)
_QUESTION = re.compile(r"[?？]|吗")
_PRIOR = np.array([0.0, 1.0, -1.0, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
FEATURES = ("bias", "positive", "negative", "negated_positive", "negated_negative",
            "after_turn", "before_turn", "question", "exclamation", "length")


def _hits(text: str) -> tuple[int, int, int, int]:
    low = text.lower()
    counts = [0, 0, 0, 0]
    for words, plain, negated in ((_POS, 0, 2), (_NEG, 1, 3)):
        for word in words:
            start = low.find(word)
            while start != -1:
                before = low[max(0, start - 6):start]
                counts[negated if before.endswith(_NEGATORS) else plain] += 1
                start = low.find(word, start + len(word))
    return counts[0], counts[1], counts[2], counts[3]


def _polarity(text: str) -> int:
    p, n, np_, nn = _hits(text)
    return p - n - np_ + nn


@lru_cache(maxsize=200_000)
def features(text: str) -> tuple[float, ...]:
    p, n, np_, nn = _hits(text)
    parts = _TURN.split(text)
    after = before = 0
    if len(parts) > 1:
        after, before = _polarity(parts[-1]), _polarity("".join(parts[:-1]))
    return (1.0, math.tanh(p / 2), math.tanh(n / 2), math.tanh(np_), math.tanh(nn),
            math.tanh(after / 2), math.tanh(before / 2), float(bool(_QUESTION.search(text))),
            float("!" in text or "！" in text), math.log(max(len(text), 1)) / 4)


class StandInClassifier:
    """Prior-regularised logistic regression on lexicon cues + k-NN memory of the examples."""

    def __init__(self, ridge: float = 1.0, memory_similarity: float = 0.6,
                 memory_weight: float = 3.0) -> None:
        self.ridge = ridge
        self.memory_similarity = memory_similarity
        self.memory_weight = memory_weight
        self._fitted: dict[str, tuple[FloatArray, list[tuple[frozenset[str], float]]]] = {}
        # Chat traffic repeats texts; a bounded memo keeps the simulation fast.
        self._scores: dict[tuple[str, str], float] = {}

    def _fit(self, version: PromptVersion) -> tuple[FloatArray, list[tuple[frozenset[str],
                                                                          float]]]:
        key = f"{version.id}:{version.content_hash}"
        found = self._fitted.get(key)
        if found is not None:
            return found
        if len(version.labels) != 2:
            raise InferenceError("the stand-in classifier handles two-label versions only")
        positive = version.label_names[0]
        w = _PRIOR.copy()
        if version.examples:
            x = np.array([features(ex.text) for ex in version.examples])
            y = np.array([1.0 if ex.label == positive else 0.0 for ex in version.examples])
            eye = self.ridge * np.eye(len(w))
            for _ in range(25):  # Newton steps on the ridge-around-the-prior objective
                p = 1.0 / (1.0 + np.exp(-(x @ w)))
                grad = x.T @ (p - y) + self.ridge * (w - _PRIOR)
                hess = (x.T * (p * (1 - p))) @ x + eye
                step = np.linalg.solve(hess, grad)
                w = w - step
                if float(np.abs(step).max()) < 1e-8:
                    break
        memory = [(ngrams(ex.text), 1.0 if ex.label == positive else -1.0)
                  for ex in version.examples]
        self._fitted[key] = (w, memory)
        return w, memory

    def score(self, version: PromptVersion, text: str) -> float:
        """Log-odds of the first (positive) label."""
        key = (f"{version.id}:{version.content_hash}", text)
        found = self._scores.get(key)
        if found is None:
            if len(self._scores) > 500_000:
                self._scores.clear()
            found = self._scores[key] = self._score(version, text)
        return found

    def _score(self, version: PromptVersion, text: str) -> float:
        w, memory = self._fit(version)
        logit = float(np.dot(w, features(text)))
        grams = ngrams(text)
        near = sorted(((jaccard(grams, g), sign) for g, sign in memory), reverse=True)[:3]
        logit += sum(self.memory_weight * sim * sign for sim, sign in near
                     if sim >= self.memory_similarity)
        return logit

    def predict(self, version: PromptVersion, text: str) -> str:
        return version.label_names[0] if self.score(version, text) >= 0 else \
            version.label_names[1]

    async def classify(self, version: PromptVersion, text: str, *,
                       timeout: float | None = None) -> Verdict:
        started = time.perf_counter()
        logit = self.score(version, text)
        p = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, logit))))
        first, second = version.label_names
        probs = {first: p, second: 1.0 - p}
        return Verdict(label=first if p >= 0.5 else second, probabilities=probs,
                       version_id=version.id,
                       latency_ms=(time.perf_counter() - started) * 1000.0)
