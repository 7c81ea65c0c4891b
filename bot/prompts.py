"""Prompt versions: YAML files in ``prompts/``, validated on load, identified by a content hash.

A malformed file is refused with its path and the offending field named, because an operator
editing YAML by hand needs to know exactly where the mistake is.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bot.errors import LoopbotError

# Ids become file names, audit-log keys and callback-free identifiers: keep them boring.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
MAX_EXAMPLE_CHARS = 400
MAX_EXAMPLES = 64


class PromptError(LoopbotError, ValueError):
    """A prompt version file is unreadable or invalid; the message names file and field."""

    def __init__(self, path: Path | str, field_name: str, problem: str) -> None:
        self.path = str(path)
        self.field = field_name
        self.problem = problem
        # A syntax error has no field yet: its place is a line.
        place = field_name if field_name.startswith(("line ", "<")) else f"field '{field_name}'"
        super().__init__(f"{path}: {place}: {problem}")


@dataclass(frozen=True)
class Label:
    """One class the verdict can take; ``name`` is what the model is scored on."""

    name: str
    display: str
    emoji: str = ""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class Generation:
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repeat_penalty: float = 1.1
    history_turns: int = 4
    seed: int = -1


@dataclass(frozen=True)
class PromptVersion:
    id: str
    parent: str | None
    description: str
    language: str
    labels: tuple[Label, ...]
    system: str
    examples: tuple[Example, ...]
    chat_system: str
    generation: Generation
    reason: str = ""
    path: str = ""
    content_hash: str = field(default="", compare=False)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    def label(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The YAML shape (without derived fields), used to write candidates and to hash."""
        data: dict[str, Any] = {
            "id": self.id,
            "parent": self.parent,
            "description": self.description,
            "language": self.language,
            "labels": [
                {"name": lb.name, "display": lb.display, "emoji": lb.emoji} for lb in self.labels
            ],
            "system": self.system,
            "examples": [{"text": ex.text, "label": ex.label} for ex in self.examples],
            "chat_system": self.chat_system,
            "generation": {
                "max_tokens": self.generation.max_tokens,
                "temperature": self.generation.temperature,
                "top_p": self.generation.top_p,
                "top_k": self.generation.top_k,
                "repeat_penalty": self.generation.repeat_penalty,
                "history_turns": self.generation.history_turns,
                "seed": self.generation.seed,
            },
        }
        if self.reason:
            data["reason"] = self.reason
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), allow_unicode=True, sort_keys=False, width=100)


def content_hash(data: dict[str, Any]) -> str:
    """Hash of what changes the model's behaviour, so a file edit is detected as a new test."""
    behaviour = {k: v for k, v in data.items() if k not in {"description", "reason"}}
    blob = json.dumps(behaviour, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def label_correspondence(own: PromptVersion, other: PromptVersion) -> dict[str, str] | None:
    """``other``'s label names → the label of ``own`` each stands for, one to one, or None
    when the two versions' labels cannot be matched.

    Labels with the same names match by name. Versions that name their labels differently
    (a Chinese and an English prompt: 正面 / positive) match by emoji when every label of
    both has one, no two labels of a version share one, and both use the same emojis (the
    emoji is what users see as the verdict: 😊 正面 and 😊 positive are one verdict)."""
    if set(own.label_names) == set(other.label_names):
        return {name: name for name in other.label_names}

    def emojis(version: PromptVersion) -> dict[str, str]:
        return {label.emoji.replace("\ufe0f", ""): label.name for label in version.labels}

    mine, theirs = emojis(own), emojis(other)
    if ("" in mine or len(mine) != len(own.labels) or len(theirs) != len(other.labels)
            or set(mine) != set(theirs)):
        return None
    return {name: mine[emoji] for emoji, name in theirs.items()}


_TOP_KEYS = {
    "id", "parent", "description", "language", "labels", "system", "examples",
    "chat_system", "generation", "reason",
}
_GEN_TYPES: dict[str, type | tuple[type, ...]] = {
    "max_tokens": int,
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": int,
    "repeat_penalty": (int, float),
    "history_turns": int,
    "seed": int,
}


def _require_str(path: Path | str, data: dict[str, Any], key: str, *, allow_empty: bool = False
                 ) -> str:
    if key not in data:
        raise PromptError(path, key, "is required")
    value = data[key]
    if not isinstance(value, str):
        raise PromptError(path, key, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise PromptError(path, key, "must not be empty")
    return value


def parse_version(data: Any, path: Path | str = "<memory>") -> PromptVersion:
    """Validate the parsed YAML mapping of one version.

    Fields are checked in a fixed order (identity, labels, prompts, examples, generation,
    reason) and the first problem stops the check, so the same file always reports the same
    mistake first.
    """
    _check_keys(data, path)
    vid, parent, description, language = _parse_identity(data, path)
    labels = _parse_labels(data, path)
    system = _require_str(path, data, "system")
    chat_system = _require_str(path, data, "chat_system")
    examples = _parse_examples(data, path, [lb.name for lb in labels])
    generation = _parse_generation(data, path)
    reason = data.get("reason", "")
    if not isinstance(reason, str):
        raise PromptError(path, "reason", "must be a string")
    return PromptVersion(
        id=vid, parent=parent, description=description, language=language,
        labels=tuple(labels), system=system, examples=tuple(examples),
        chat_system=chat_system, generation=generation, reason=reason, path=str(path),
        content_hash=content_hash(data),
    )


def _check_keys(data: Any, path: Path | str) -> None:
    if not isinstance(data, dict):
        raise PromptError(path, "<root>", "the file must hold a mapping (key: value lines)")
    unknown = sorted(map(str, set(data) - _TOP_KEYS))
    if unknown:
        allowed = ", ".join(sorted(_TOP_KEYS))
        raise PromptError(path, unknown[0], f"unknown key (allowed: {allowed})")


def _parse_identity(data: dict[str, Any], path: Path | str
                    ) -> tuple[str, str | None, str, str]:
    """id, parent, description and language."""
    vid = _require_str(path, data, "id")
    if not _ID_RE.match(vid):
        raise PromptError(path, "id", "use 1-48 letters, digits, '.', '_' or '-'")
    parent = data.get("parent")
    if parent is not None and (not isinstance(parent, str) or not _ID_RE.match(parent)):
        raise PromptError(path, "parent", "must be a version id or null")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise PromptError(path, "description", "must be a string")
    language = _require_str(path, data, "language")
    if language not in {"zh", "en"}:
        raise PromptError(path, "language", "must be 'zh' or 'en'")
    return vid, parent, description, language


def _parse_labels(data: dict[str, Any], path: Path | str) -> list[Label]:
    raw_labels = data.get("labels")
    if not isinstance(raw_labels, list) or len(raw_labels) < 2:
        raise PromptError(path, "labels", "must be a list of at least two labels")
    labels = [_parse_label(raw, f"labels[{i}]", path) for i, raw in enumerate(raw_labels)]
    names = [lb.name for lb in labels]
    if len(set(names)) != len(names):
        raise PromptError(path, "labels", "label names must be unique")
    return labels


def _parse_label(raw: Any, where: str, path: Path | str) -> Label:
    """One label: a bare name, or a mapping with ``name`` and optional display and emoji."""
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise PromptError(path, where, "must be a string or a mapping with 'name'")
    extra = sorted(map(str, set(raw) - {"name", "display", "emoji"}))
    if extra:
        raise PromptError(path, f"{where}.{extra[0]}", "unknown key")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise PromptError(path, f"{where}.name", "must be a non-empty string without "
                          "leading or trailing spaces")
    if "<|" in name:
        raise PromptError(path, f"{where}.name", "must not contain control tokens")
    display = raw.get("display", name)
    emoji = raw.get("emoji", "")
    if not isinstance(display, str) or not isinstance(emoji, str):
        raise PromptError(path, where, "display and emoji must be strings")
    return Label(name=name, display=display, emoji=emoji)


def _parse_examples(data: dict[str, Any], path: Path | str, names: list[str]) -> list[Example]:
    """The few-shot examples; each label must be one of ``names``."""
    raw_examples = data.get("examples", [])
    if not isinstance(raw_examples, list):
        raise PromptError(path, "examples", "must be a list")
    if len(raw_examples) > MAX_EXAMPLES:
        raise PromptError(path, "examples", f"at most {MAX_EXAMPLES} examples")
    examples: list[Example] = []
    for i, raw in enumerate(raw_examples):
        where = f"examples[{i}]"
        if not isinstance(raw, dict) or set(raw) != {"text", "label"}:
            raise PromptError(path, where, "must be a mapping with exactly 'text' and 'label'")
        text, label = raw["text"], raw["label"]
        if not isinstance(text, str) or not text.strip():
            raise PromptError(path, f"{where}.text", "must be a non-empty string")
        if len(text) > MAX_EXAMPLE_CHARS:
            raise PromptError(path, f"{where}.text", f"longer than {MAX_EXAMPLE_CHARS} characters")
        if "<|" in text:
            raise PromptError(path, f"{where}.text", "must not contain control tokens")
        if label not in names:
            raise PromptError(path, f"{where}.label", f"'{label}' is not one of {names}")
        examples.append(Example(text=text, label=label))
    return examples


def _parse_generation(data: dict[str, Any], path: Path | str) -> Generation:
    """Sampling settings: known keys of the right type (defaults for the rest), in range."""
    raw_gen = data.get("generation", {}) or {}
    if not isinstance(raw_gen, dict):
        raise PromptError(path, "generation", "must be a mapping")
    gen_kwargs: dict[str, Any] = {}
    for key, value in raw_gen.items():
        if key not in _GEN_TYPES:
            raise PromptError(path, f"generation.{key}", "unknown key")
        if isinstance(value, bool) or not isinstance(value, _GEN_TYPES[key]):
            raise PromptError(path, f"generation.{key}", "has the wrong type")
        gen_kwargs[key] = value
    generation = Generation(**gen_kwargs)
    _check_generation_ranges(generation, path)
    return generation


def _check_generation_ranges(generation: Generation, path: Path | str) -> None:
    if not 1 <= generation.max_tokens <= 2048:
        raise PromptError(path, "generation.max_tokens", "must be between 1 and 2048")
    if not 0.0 <= generation.temperature <= 2.0:
        raise PromptError(path, "generation.temperature", "must be between 0 and 2")
    if not 0.0 < generation.top_p <= 1.0:
        raise PromptError(path, "generation.top_p", "must be in (0, 1]")
    if not 0 <= generation.top_k <= 1000:
        raise PromptError(path, "generation.top_k", "must be between 0 and 1000")
    if not 0.5 <= generation.repeat_penalty <= 2.0:
        raise PromptError(path, "generation.repeat_penalty", "must be between 0.5 and 2")
    if not -1 <= generation.seed < 2**32 - 1:
        raise PromptError(path, "generation.seed", "must be -1 (random) or in [0, 2^32 - 1)")
    if not 0 <= generation.history_turns <= 20:
        raise PromptError(path, "generation.history_turns", "must be between 0 and 20")


def load_version(path: Path | str) -> PromptVersion:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(path, "<file>", f"cannot be read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<yaml>"
        raise PromptError(path, where, f"is not valid YAML: {getattr(exc, 'problem', exc)}"
                          ) from exc
    version = parse_version(data, path)
    if path.stem != version.id:
        raise PromptError(path, "id", f"'{version.id}' must match the file name '{path.stem}'")
    return version


def load_directory(directory: Path | str) -> dict[str, PromptVersion]:
    """Every ``*.yaml`` in ``directory``; the first invalid file stops the load."""
    versions: dict[str, PromptVersion] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        version = load_version(path)
        versions[version.id] = version
    return versions


def validate_directory(directory: Path | str) -> list[PromptError]:
    """Every problem in the directory, for ``loopbot prompts validate``."""
    errors: list[PromptError] = []
    for path in sorted(Path(directory).glob("*.yaml")):
        try:
            load_version(path)
        except PromptError as exc:
            errors.append(exc)
    return errors


def write_version(version: PromptVersion, directory: Path | str) -> Path:
    """Write a new version file atomically; refuses to overwrite an existing id."""
    directory = Path(directory)
    target = directory / f"{version.id}.yaml"
    if target.exists():
        raise FileExistsError(target)
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(version.to_yaml(), encoding="utf-8")
    tmp.replace(target)
    return target


def few_shot_pairs(version: PromptVersion) -> Iterable[tuple[str, str]]:
    return ((ex.text, ex.label) for ex in version.examples)
