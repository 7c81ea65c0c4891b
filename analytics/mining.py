"""Error mining: the active version's corrected mistakes, grouped into patterns (pure).

Input is the credible labelled set (:mod:`analytics.credibility`): a mistake is a verdict of the
version that differs from the text's credible label. Each mistake is tagged with every pattern
it shows (a text can be mixed *and* negated); patterns are ranked by how many mistakes show
them. The result is the "prompt improvement report" that ``/report`` and ``loopbot report``
show and that the candidate generator uses to pick few-shot examples.

Public API
----------
- ``PATTERNS``: the pattern names in report order with a one-line description each.
- ``patterns_of(text) -> tuple[str, ...]``: the patterns a text shows.
- ``mine(labelled, version_ids=None, examples_per_pattern=3) -> ImprovementReport``
- ``ImprovementReport.to_dict()`` / ``.to_text()``; ``VersionErrors.error_rate``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from analytics.credibility import NEGATION, LabelledText, normalize

PATTERNS: dict[str, str] = {
    "mixed": "mixed sentiment with a turn (但是/不过/but/though)",
    "negation": "negation (不/没/not/n't/never)",
    "sarcasm": "sarcasm or irony markers (呵呵/真是…/yeah right/🙄)",
    "emoji_only": "emoji or symbols only, no words",
    "very_short": "very short (≤ 4 characters of text)",
    "long": "long (> 120 characters)",
    "question": "question (?/吗/呢/难道)",
    "intensified": "intensifiers or repeated punctuation (太/非常/so/!!!)",
    "other": "none of the above",
}

_TURN = re.compile(
    r"但是|不过|可是|然而|只是|就是有点|却|但|"
    r"\b(?:but|though|although|however|yet|except|still)\b",
    re.IGNORECASE,
)
_NEGATION = NEGATION
_SARCASM = re.compile(
    r"呵呵|呵|真是.{0,6}[啊呀]|可真.{0,4}|真行|好一个|服了|醉了|佩服佩服|厉害了|谢谢你啊|"
    r"笑死|我真是谢谢|"
    r"\byeah,? right\b|\boh,? great\b|\bjust great\b|\bthanks a lot\b|\bwhat a (?:joke|"
    r"surprise)\b|\bsure,|/s\b|🙄|😒|🙃|😏",
    re.IGNORECASE,
)
_QUESTION = re.compile(r"[?？]|吗|呢[。！!]?$|难道|怎么(?:会|能)|\b(?:why|how come)\b",
                       re.IGNORECASE)
_INTENSE = re.compile(r"太|非常|超级|特别|极其|十分|!{2,}|！{2,}|\b(?:so|very|really|extremely|"
                      r"totally)\b", re.IGNORECASE)

SHORT_CHARS = 4
LONG_CHARS = 120


def _has_words(text: str) -> bool:
    return any(unicodedata.category(ch).startswith(("L", "N")) for ch in text)


def patterns_of(text: str) -> tuple[str, ...]:
    """Every pattern the text shows, in ``PATTERNS`` order (``other`` when none)."""
    found: list[str] = []
    stripped = text.strip()
    if _TURN.search(stripped):
        found.append("mixed")
    if _NEGATION.search(stripped):
        found.append("negation")
    if _SARCASM.search(stripped):
        found.append("sarcasm")
    if stripped and not _has_words(stripped):
        found.append("emoji_only")
    elif len(normalize(stripped)) <= SHORT_CHARS:
        found.append("very_short")
    if len(stripped) > LONG_CHARS:
        found.append("long")
    if _QUESTION.search(stripped):
        found.append("question")
    if _INTENSE.search(stripped):
        found.append("intensified")
    return tuple(found) or ("other",)


@dataclass(frozen=True)
class MinedExample:
    text: str
    label: str  # the credible label
    verdict: str  # what the version said
    confidence: float


@dataclass(frozen=True)
class PatternStat:
    name: str
    description: str
    count: int
    # Share of the version's mistakes that show this pattern.
    share: float
    examples: tuple[MinedExample, ...]


@dataclass(frozen=True)
class VersionErrors:
    version_id: str
    # Verdicts of this version with a credible label, and how many were wrong.
    judged: int
    mistakes: int
    patterns: tuple[PatternStat, ...]
    # "true label -> verdict": count.
    confusion: dict[str, int]

    @property
    def error_rate(self) -> float:
        return self.mistakes / self.judged if self.judged else 0.0

    def pattern_counts(self) -> dict[str, int]:
        return {p.name: p.count for p in self.patterns}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version_id": self.version_id,
            "judged": self.judged,
            "mistakes": self.mistakes,
            "error_rate": round(self.error_rate, 4),
            "confusion": dict(self.confusion),
            "patterns": [
                {"name": p.name, "description": p.description, "count": p.count,
                 "share": round(p.share, 4),
                 "examples": [{"text": e.text, "label": e.label, "verdict": e.verdict,
                               "confidence": round(e.confidence, 3)} for e in p.examples]}
                for p in self.patterns
            ],
        }


@dataclass(frozen=True)
class ImprovementReport:
    versions: tuple[VersionErrors, ...]
    labelled_texts: int

    def get(self, version_id: str) -> VersionErrors | None:
        return next((v for v in self.versions if v.version_id == version_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {"labelled_texts": self.labelled_texts,
                "versions": [v.to_dict() for v in self.versions]}

    def to_text(self, *, max_patterns: int = 8, max_examples: int = 2,
                example_chars: int = 60) -> str:
        """Plain text for a terminal or a chat message."""
        lines = [f"Prompt improvement report ({self.labelled_texts} credible labelled texts)"]
        if not self.versions:
            lines.append("No credible votes on any version yet.")
        for v in self.versions:
            lines.append("")
            lines.append(f"{v.version_id}: {v.mistakes} mistakes of {v.judged} credibly "
                         f"judged verdicts (error rate {100 * v.error_rate:.1f}%)")
            if v.confusion:
                lines.append("  confusions: " + ", ".join(
                    f"{k} {n}" for k, n in sorted(v.confusion.items(), key=lambda kv: -kv[1])))
            for p in v.patterns[:max_patterns]:
                lines.append(f"  {p.name:<12} {p.count:>5}  ({100 * p.share:.0f}%)  "
                             f"{p.description}")
                for e in p.examples[:max_examples]:
                    lines.append(f"      “{_clip(e.text, example_chars)}” is {e.label}, "
                                 f"said {e.verdict}")
        return "\n".join(lines)


def _clip(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def mine(labelled: Iterable[LabelledText], version_ids: Sequence[str] | None = None,
         examples_per_pattern: int = 3) -> ImprovementReport:
    """Mistakes per version (``version_ids``: those, in that order; default: every version
    with credible judgements, most judged first)."""
    items = list(labelled)
    judged: Counter[str] = Counter()
    mistakes: dict[str, list[tuple[LabelledText, str]]] = defaultdict(list)
    for item in items:
        # One judgement per (version, item) even if the text was sent several times.
        verdicts: dict[str, Counter[str]] = defaultdict(Counter)
        for j in item.judged:
            verdicts[j.version_id][j.verdict] += 1
        for vid, counter in verdicts.items():
            judged[vid] += 1
            verdict, _ = counter.most_common(1)[0]
            wrong = [v for v in counter if v != item.label]
            if wrong:
                mistakes[vid].append((item, verdict if verdict != item.label else wrong[0]))
    order = list(version_ids) if version_ids is not None else [
        vid for vid, _ in sorted(judged.items(), key=lambda kv: (-kv[1], kv[0]))]
    reports: list[VersionErrors] = []
    for vid in order:
        errs = mistakes.get(vid, [])
        by_pattern: dict[str, list[tuple[LabelledText, str]]] = defaultdict(list)
        confusion: Counter[str] = Counter()
        for item, verdict in errs:
            confusion[f"{item.label} -> {verdict}"] += 1
            for name in patterns_of(item.text):
                by_pattern[name].append((item, verdict))
        stats: list[PatternStat] = []
        for name, hits in by_pattern.items():
            # The most credible, then shortest, examples read best in a report.
            best = sorted(hits, key=lambda h: (-h[0].confidence, len(h[0].text), h[0].text))
            stats.append(PatternStat(
                name=name, description=PATTERNS[name], count=len(hits),
                share=len(hits) / len(errs),
                examples=tuple(MinedExample(h[0].text, h[0].label, h[1], h[0].confidence)
                               for h in best[:examples_per_pattern]),
            ))
        stats.sort(key=lambda p: (-p.count, list(PATTERNS).index(p.name)))
        reports.append(VersionErrors(vid, judged.get(vid, 0), len(errs), tuple(stats),
                                     dict(confusion)))
    return ImprovementReport(tuple(reports), len(items))
