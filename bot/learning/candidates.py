"""Candidate prompt versions from the credible labelled set (pure, except the optional LLM call).

The main generator keeps the parent's instruction and rebuilds its few-shot examples: new
examples come from the credible labelled set, balanced across labels, deduplicated (against each
other and the parent's examples), diverse (greedy selection that penalises similarity to what
is already chosen), short, and favouring texts that show the parent's most frequent error
patterns and that the parent itself got wrong. Parent examples fill the remaining slots so the
prompt keeps what already worked.

The optional second generator asks a model (the local runtime, or an OpenAI-compatible
endpoint over HTTP) to propose a revised instruction from the error patterns; its answer is
sanitised and must name every label, else it is not used.

Everything from users that enters a prompt goes through :func:`sanitize_text`: control-token
syntax (``<|...|>``) and invisible/control characters are removed, whitespace is folded and the
length is bounded, so user text can never become a chat-template token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import unicodedata
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from analytics.credibility import LabelledText, jaccard, ngrams, normalize
from analytics.mining import PATTERNS, VersionErrors, patterns_of
from bot.errors import LoopbotError
from bot.prompts import MAX_EXAMPLE_CHARS, Example, PromptVersion, parse_version

_CONTROL_SPAN = re.compile(r"<\|[^<>|]{0,64}\|>")
_ID_SUFFIX = re.compile(r"-c\d+$")


_INVISIBLE = ("Cc", "Cf", "Cs", "Co", "Cn")  # control, format (zero-width, bidi), private use


def _defuse(text: str, keep: str) -> str:
    """``text`` without invisible characters (those in ``keep`` stay) and without anything
    that reads as a control token. Invisible characters go first: left in, they would hide
    a token from the pattern ("<\u200b|im_start|>") and let it reappear once removed."""
    visible = "".join(ch for ch in text
                      if ch in keep or unicodedata.category(ch) not in _INVISIBLE)
    cleaned = _CONTROL_SPAN.sub(" ", visible)
    # What is left of the syntax must not recombine into "<|" (e.g. "<<||" → "<|").
    while "<|" in cleaned or "|>" in cleaned:
        cleaned = cleaned.replace("<|", "<").replace("|>", ">")
    return cleaned


def sanitize_text(text: str, max_chars: int = MAX_EXAMPLE_CHARS) -> str | None:
    """User text made safe for a prompt, or None when nothing usable is left or it is longer
    than ``max_chars`` (cutting a review can flip its sentiment, so long texts are skipped,
    not truncated)."""
    # Zero-width joiners hold emoji sequences together; line breaks become spaces.
    folded = " ".join(_defuse(text, keep="\n\t\r\u200d").split())
    if not folded or len(folded) > max_chars:
        return None
    return folded


def sanitize_instruction(text: str, labels: Sequence[str], max_chars: int = 800) -> str | None:
    """A model-proposed instruction, if it is usable: cleaned like user text (newlines kept),
    bounded, and naming every label (label scoring needs the model to know them)."""
    cleaned = _defuse(text, keep="\n")
    lines = [" ".join(line.split()) for line in cleaned.strip().splitlines()]
    result = "\n".join(line for line in lines if line).strip().strip("\"'`")
    if not result or len(result) > max_chars:
        return None
    if any(label not in result for label in labels):
        return None
    return result


@dataclass(frozen=True)
class CandidateConfig:
    # New examples per candidate (split evenly over the labels) and the prompt's total.
    new_examples: int = 8
    max_examples: int = 16
    # Longest text used as an example (characters, after sanitising).
    max_chars: int = 80
    # Minimum posterior of an example's label.
    min_confidence: float = 0.9
    # Two examples this similar (character-bigram Jaccard) are duplicates.
    duplicate_similarity: float = 0.6
    # Selection score weights: error-pattern frequency, being a parent mistake, brevity,
    # redundancy with the examples already chosen (maximal marginal relevance).
    pattern_weight: float = 1.0
    mistake_weight: float = 0.5
    brevity_weight: float = 0.3
    redundancy_weight: float = 1.0
    # Share of each label's new examples chosen for the error patterns; the rest cover
    # typical texts. Only hard cases would skew what the model learns from the examples
    # (it would see "positive words" mostly in negative examples).
    focus_share: float = 0.5


@dataclass(frozen=True)
class Candidate:
    version: PromptVersion
    new_examples: tuple[Example, ...]
    kept_examples: tuple[Example, ...]
    reason: str


class CandidateError(LoopbotError, ValueError):
    """No candidate can be made (e.g. too few credible examples of some label)."""


def next_id(parent_id: str, existing: Iterable[str]) -> str:
    """``<root>-c<N>`` with the smallest free N; ``root`` is the parent id without an earlier
    ``-c<N>`` suffix, so ids stay short along a lineage (v1-zh → v1-zh-c1 → v1-zh-c2)."""
    root = _ID_SUFFIX.sub("", parent_id)[:40]
    taken = set(existing)
    n = 1
    while f"{root}-c{n}" in taken:
        n += 1
    return f"{root}-c{n}"


def _pattern_weights(errors: VersionErrors | None) -> dict[str, float]:
    if errors is None or not errors.mistakes:
        return {}
    return {p.name: p.count / errors.mistakes for p in errors.patterns if p.name != "other"}


def _select(pool: list[tuple[str, str, float]], label_quota: Mapping[str, int],
            avoid: list[frozenset[str]], cfg: CandidateConfig) -> list[Example]:
    """Greedy maximal-marginal-relevance choice per label: best score minus the similarity to
    what is already chosen; near-duplicates are never chosen."""
    chosen: list[Example] = []
    grams_chosen = list(avoid)
    remaining = {label: quota for label, quota in label_quota.items()}
    candidates = [(text, label, score, ngrams(text)) for text, label, score in pool]
    while any(q > 0 for q in remaining.values()):
        best: tuple[float, int] | None = None
        for i, (_text, label, score, grams) in enumerate(candidates):
            if remaining.get(label, 0) <= 0:
                continue
            sim = max((jaccard(grams, g) for g in grams_chosen), default=0.0)
            if sim >= cfg.duplicate_similarity:
                continue
            value = score - cfg.redundancy_weight * sim
            if best is None or value > best[0]:
                best = (value, i)
        if best is None:
            break
        text, label, _, grams = candidates.pop(best[1])
        chosen.append(Example(text=text, label=label))
        grams_chosen.append(grams)
        remaining[label] -= 1
    return chosen


_Scored = tuple[str, str, float]  # (text, label, selection score)


def generate_candidate(
    parent: PromptVersion,
    labelled: Sequence[LabelledText],
    errors: VersionErrors | None,
    *,
    existing_ids: Iterable[str] = (),
    config: CandidateConfig | None = None,
    new_id: str | None = None,
) -> Candidate:
    """A new version: the parent's instruction with few-shot examples rebuilt from
    ``labelled`` (which must not hold the offline check's held-out texts)."""
    cfg = config or CandidateConfig()
    labels = parent.label_names
    weights = _pattern_weights(errors)
    parent_mistakes = _parent_mistakes(parent, labelled)
    parent_grams = [ngrams(ex.text) for ex in parent.examples]
    pool, coverage_pool = _scored_pools(labelled, labels, weights, parent_mistakes, cfg)
    new = _new_examples(pool, coverage_pool, labels, parent_grams, cfg)
    kept_in_order = _kept_examples(parent, labelled, labels, max(0, cfg.max_examples - len(new)))
    examples = (*kept_in_order, *_interleave(new, labels))

    vid = new_id or next_id(parent.id, existing_ids)
    reason = _reason(parent, errors, new, kept_in_order)
    data = dataclasses.replace(parent, id=vid, parent=parent.id,
                               description=f"candidate from {parent.id}: few-shot examples "
                               "chosen from credible user corrections",
                               examples=examples, reason=reason, path="").to_dict()
    # Round-trip through the validator: a candidate is only ever a valid version file.
    version = parse_version(data, f"<candidate {vid}>")
    return Candidate(version, tuple(new), tuple(kept_in_order), reason)


def _parent_mistakes(parent: PromptVersion, labelled: Sequence[LabelledText]) -> set[str]:
    """Normalised texts the parent itself got wrong."""
    mistakes: set[str] = set()
    for item in labelled:
        if item.mistakes_of(parent.id):
            mistakes.add(normalize(item.text))
    return mistakes


def _scored_pools(labelled: Sequence[LabelledText], labels: Sequence[str],
                  weights: Mapping[str, float], parent_mistakes: set[str],
                  cfg: CandidateConfig) -> tuple[list[_Scored], list[_Scored]]:
    """The usable credible texts, sanitised and deduplicated, scored twice: with the error
    focus (pattern frequency, parent mistakes) and without it (for coverage picks)."""
    pool: list[_Scored] = []
    coverage_pool: list[_Scored] = []
    seen: set[str] = set()
    for item in labelled:
        if item.label not in labels or item.confidence < cfg.min_confidence:
            continue
        text = sanitize_text(item.text, cfg.max_chars)
        if text is None:
            continue
        key = normalize(text)
        if not key or key in seen:
            continue
        seen.add(key)
        found = patterns_of(text)
        # Brevity, then credibility (a confirmed label beats a barely credible one).
        base = (cfg.brevity_weight * (1.0 - len(text) / cfg.max_chars)
                + 0.1 * item.confidence + (0.1 if item.admin_confirmed else 0.0))
        focus = cfg.pattern_weight * sum(weights.get(p, 0.0) for p in found)
        if key in parent_mistakes:
            focus += cfg.mistake_weight
        pool.append((text, item.label, base + focus))
        coverage_pool.append((text, item.label, base))
    return pool, coverage_pool


def _new_examples(pool: list[_Scored], coverage_pool: list[_Scored], labels: Sequence[str],
                  parent_grams: list[frozenset[str]], cfg: CandidateConfig) -> list[Example]:
    """The new examples: per label, ``focus_share`` of them for the error patterns, the rest
    covering typical texts; none a near-duplicate of another or of a parent example."""
    per_label = max(1, cfg.new_examples // len(labels))
    available = Counter(label for _, label, _ in pool)
    short = [lb for lb in labels if available[lb] == 0]
    if short:
        raise CandidateError(f"no credible example for label(s) {', '.join(short)}")
    focus_n = max(1, round(per_label * cfg.focus_share))
    quota = {lb: min(focus_n, available[lb]) for lb in labels}
    new = _select(sorted(pool, key=lambda p: (-p[2], p[0])), quota, parent_grams, cfg)
    taken = {normalize(ex.text) for ex in new}
    rest = {lb: min(per_label - quota[lb], available[lb] - quota[lb]) for lb in labels}
    if any(n > 0 for n in rest.values()):
        # Coverage picks are ordered by a hash of the text: a spread-out sample of typical
        # credible texts, not the shortest ones only.
        spread = sorted((p for p in coverage_pool if normalize(p[0]) not in taken),
                        key=lambda p: (-p[2] - 0.5 * _hash01(p[0]), p[0]))
        new += _select(spread, rest, parent_grams + [ngrams(ex.text) for ex in new], cfg)
    if not new:
        raise CandidateError("no new example survived deduplication")
    return new


def _kept_examples(parent: PromptVersion, labelled: Sequence[LabelledText],
                   labels: Sequence[str], room: int) -> list[Example]:
    """Parent examples for the ``room`` slots left, in the parent's order."""
    # Keep parent examples (balanced, newest last) in the remaining slots; a parent example
    # whose text now has a different credible label is dropped.
    contradicted = {normalize(item.text): item.label for item in labelled}
    kept_by_label: dict[str, list[Example]] = {lb: [] for lb in labels}
    for ex in parent.examples:
        if contradicted.get(normalize(ex.text), ex.label) == ex.label and ex.label in labels:
            kept_by_label[ex.label].append(ex)
    kept: list[Example] = []
    # Round-robin over labels, newest parent examples first (they came from recent mistakes).
    queues = {lb: list(reversed(exs)) for lb, exs in kept_by_label.items()}
    while len(kept) < room and any(queues.values()):
        for lb in labels:
            if queues[lb] and len(kept) < room:
                kept.append(queues[lb].pop(0))
    return [ex for ex in parent.examples if ex in kept]


def _reason(parent: PromptVersion, errors: VersionErrors | None, new: Sequence[Example],
            kept: Sequence[Example]) -> str:
    """The candidate's ``reason``: the evidence it was mined from and what changed."""
    top = [p for p in (errors.patterns if errors else ()) if p.name != "other"][:3]
    counts = Counter(ex.label for ex in new)
    return (
        f"mined from {errors.mistakes if errors else 0} credible corrections of {parent.id}"
        + (f" (error rate {100 * errors.error_rate:.1f}% over {errors.judged} credibly judged "
           "verdicts)" if errors else "")
        + (f"; top error patterns: {', '.join(f'{p.name} {p.count}' for p in top)}" if top
           else "")
        + f"; {len(new)} new examples ("
        + ", ".join(f"{counts[lb]} {lb}" for lb in parent.label_names)
        + f"), {len(kept)} kept from {parent.id}"
    )


def _hash01(text: str) -> float:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _interleave(examples: Sequence[Example], labels: Sequence[str]) -> list[Example]:
    """Alternate labels so no label dominates the end of the prompt (recency bias)."""
    queues = {lb: [ex for ex in examples if ex.label == lb] for lb in labels}
    out: list[Example] = []
    while any(queues.values()):
        for lb in labels:
            if queues[lb]:
                out.append(queues[lb].pop(0))
    return out


# ------------------------------------------------------------------ the instruction generator

Complete = Callable[[list[dict[str, str]]], Awaitable[str]]


def instruction_request(parent: PromptVersion, errors: VersionErrors,
                        max_patterns: int = 5) -> list[dict[str, str]]:
    """The chat messages asking a model for a revised instruction."""
    labels = " / ".join(parent.label_names)
    lines = []
    for p in errors.patterns[:max_patterns]:
        example = p.examples[0] if p.examples else None
        sample = ""
        if example is not None:
            text = sanitize_text(example.text, 120)
            if text:
                sample = f' e.g. "{text}" is {example.label}, not {example.verdict}'
        lines.append(f"- {PATTERNS.get(p.name, p.name)}: {p.count} mistakes{sample}")
    user = (
        f"A sentiment classifier uses this instruction:\n---\n{parent.system}\n---\n"
        f"It answers with exactly one of: {labels}. Users corrected {errors.mistakes} of its "
        f"{errors.judged} verdicts. Its most frequent mistakes:\n" + "\n".join(lines) +
        f"\nWrite an improved instruction (at most 5 sentences, in the same language as the "
        f"original) that handles these cases and still tells it to answer with exactly one "
        f"of: {labels}. Reply with the instruction only."
    )
    return [{"role": "system", "content": "You improve prompts for text classifiers."},
            {"role": "user", "content": user}]


def openai_complete(endpoint: str, model: str, *, api_key: str = "", timeout: float = 60.0,
                    max_tokens: int = 300) -> Complete:
    """A ``Complete`` over an OpenAI-compatible ``/chat/completions`` endpoint (urllib, no
    SDK). ``endpoint`` is the base URL (``.../v1``) or the full completions URL."""
    url = endpoint.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"

    def post(messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": model, "messages": messages, "temperature": 0.3,
                           "max_tokens": max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload: Any = json.loads(response.read().decode("utf-8"))
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
            raise CandidateError(f"instruction endpoint {url} failed: {exc}") from exc
        try:
            return str(payload["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as exc:
            raise CandidateError(f"instruction endpoint {url}: unexpected answer") from exc

    async def complete(messages: list[dict[str, str]]) -> str:
        import asyncio

        return await asyncio.to_thread(post, messages)

    return complete


def local_complete(runtime: Any, parent: PromptVersion, *, max_tokens: int = 200) -> Complete:
    """A ``Complete`` on the local model: the request's system message becomes the chat
    system prompt of a throwaway copy of ``parent``, the user message its input."""

    async def complete(messages: list[dict[str, str]]) -> str:
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = "\n".join(m["content"] for m in messages if m["role"] == "user")
        probe = dataclasses.replace(
            parent, id=f"{_ID_SUFFIX.sub('', parent.id)[:40]}-meta", chat_system=system,
            generation=dataclasses.replace(parent.generation, max_tokens=max_tokens,
                                           temperature=0.3, history_turns=0),
            content_hash=f"meta-{parent.content_hash}")
        reply = await runtime.reply(probe, [], user)
        return str(reply.text)

    return complete


async def propose_instruction(parent: PromptVersion, errors: VersionErrors,
                              complete: Complete) -> str | None:
    """A revised instruction from a model, or None when its answer is not usable."""
    if not errors.mistakes:
        return None
    answer = await complete(instruction_request(parent, errors))
    return sanitize_instruction(answer, parent.label_names)


def with_instruction(candidate: Candidate, instruction: str) -> Candidate:
    """The candidate with a model-proposed instruction (validated again)."""
    version = candidate.version
    reason = f"{candidate.reason}; instruction revised by a model from the error patterns"
    data = dataclasses.replace(version, system=instruction, reason=reason).to_dict()
    return dataclasses.replace(candidate, version=parse_version(data, f"<candidate {version.id}>"),
                               reason=reason)

