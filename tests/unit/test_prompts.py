"""Prompt version files: the shipped ones load; malformed ones are refused by file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bot.prompts import PromptError, load_directory, load_version, validate_directory

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"


def test_shipped_versions_load() -> None:
    versions = load_directory(PROMPTS)
    assert {"v1-zh", "v1-en"} <= set(versions)
    assert versions["v1-zh"].label_names == ("正面", "负面")
    assert versions["v1-en"].label_names == ("positive", "negative")
    assert validate_directory(PROMPTS) == []


def write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True),
                    encoding="utf-8")
    return path


def base() -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load((PROMPTS / "v1-en.yaml").read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d: d.pop("system"), "system"),
    (lambda d: d.update(labels=["positive"]), "labels"),
    (lambda d: d.update(labels=["a", "a"]), "labels"),
    (lambda d: d.update(examples=[{"text": "x", "label": "neutral"}]), "examples[0].label"),
    (lambda d: d.update(examples=[{"text": "", "label": "positive"}]), "examples[0].text"),
    (lambda d: d.update(examples=[{"text": "<|im_start|>x", "label": "positive"}]),
     "examples[0].text"),
    (lambda d: d.update(generation={"max_tokens": "many"}), "generation.max_tokens"),
    (lambda d: d.update(generation={"temprature": 0.5}), "generation.temprature"),
    (lambda d: d.update(colour="blue"), "colour"),
    (lambda d: d.update(language="fr"), "language"),
    (lambda d: d.update(id="v1 en"), "id"),
])
def test_malformed_versions_name_file_and_field(tmp_path: Path, mutate: object,
                                                field: str) -> None:
    data = base()
    mutate(data)  # type: ignore[operator]
    path = write(tmp_path, "v1-en" if data.get("id") in (None, "v1-en") else "x", data)
    with pytest.raises(PromptError) as caught:
        load_version(path)
    assert caught.value.field == field
    assert str(path) in str(caught.value) and f"'{field}'" in str(caught.value)


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "v9", "id: v9\nlabels: [a, b\nsystem: x\n")
    with pytest.raises(PromptError, match=r"v9\.yaml: line \d+: is not valid YAML"):
        load_version(path)
    assert len(validate_directory(tmp_path)) == 1


def test_id_must_match_file_name(tmp_path: Path) -> None:
    path = write(tmp_path, "other", base())
    with pytest.raises(PromptError, match="file name"):
        load_version(path)


def test_hash_ignores_description_but_not_examples(tmp_path: Path) -> None:
    data = base()
    first = load_version(write(tmp_path, "v1-en", data)).content_hash
    data["description"] = "reworded"
    assert load_version(write(tmp_path, "v1-en", data)).content_hash == first
    data["examples"] = [{"text": "ok", "label": "positive"}]
    assert load_version(write(tmp_path, "v1-en", data)).content_hash != first
