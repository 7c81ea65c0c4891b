"""Settings: file < environment < flags; unknown keys and wrong types are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from bot.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_a_file() -> None:
    settings = load_settings(None, env={})
    assert settings.model.backend == "llama_cpp"
    assert settings.prompts.default_version == "v1-zh"


def test_example_file_loads_and_documents_every_key() -> None:
    example = ROOT / "config.example.yaml"
    settings = load_settings(example, env={})
    data = yaml.safe_load(example.read_text(encoding="utf-8"))
    for section in dataclasses.fields(Settings):
        if section.name == "source":
            continue
        assert section.name in data, f"config.example.yaml lacks section {section.name}"
        keys = {f.name for f in dataclasses.fields(getattr(settings, section.name))}
        missing = keys - set(data[section.name] or {})
        assert not missing, f"config.example.yaml lacks {section.name}.{sorted(missing)}"


def test_example_file_is_generated_from_the_code() -> None:
    from bot.config_example import render

    committed = (ROOT / "config.example.yaml").read_text(encoding="utf-8")
    assert committed == render(), "run: python -m bot.config_example > config.example.yaml"


def test_environment_and_flags_override_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storage:\n  db: file.db\nmodel:\n  path: file.gguf\n", encoding="utf-8")
    env = {"LOOPBOT_DB": "env.db", "LOOPBOT_ADMINS": "1, 22,333",
           "TELEGRAM_BOT_TOKEN": "123:abc"}
    settings = load_settings(cfg, env=env, overrides={"model.path": "flag.gguf"})
    assert settings.storage.db == "env.db"
    assert settings.telegram.admins == [1, 22, 333]
    assert settings.telegram.token == "123:abc"
    assert settings.model.path == "flag.gguf"
    assert load_settings(None, env={"LOOPBOT_CONFIG": str(cfg)}).storage.db == "file.db"


@pytest.mark.parametrize(("text", "key"), [
    ("model:\n  n_thread: 2\n", "model.n_thread"),
    ("telegrm:\n  token: x\n", "telegrm"),
    ("model:\n  n_ctx: many\n", "model.n_ctx"),
    ("telegram:\n  admins: [1, two]\n", "telegram.admins[1]"),
    ("telegram:\n  respond_with: everything\n", "telegram.respond_with"),
    ("storage: [1, 2]\n", "storage"),
    ("model: 3\n", "model:"),
    ("logging:\n  level: chatty\n", "logging.level"),
])
def test_bad_settings_are_named(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg, env={})
    assert str(caught.value).startswith(key)


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="LOOPBOT_ADMINS"):
        load_settings(None, env={"LOOPBOT_ADMINS": "1,me"})


def test_missing_config_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", env={})


@pytest.mark.parametrize("argv", [
    ["console", "--config", "CFG"],
    ["--config", "CFG", "console"],
    ["report", "--config", "CFG"],
    ["prompts", "list", "--config", "CFG"],
])
def test_config_flag_is_read_before_or_after_the_command(
        tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_ctx: many\n", encoding="utf-8")
    assert main([str(cfg) if a == "CFG" else a for a in argv]) == 2
    assert "model.n_ctx: expected an integer, got 'many'" in capsys.readouterr().err


def test_a_command_level_config_overrides_the_global_one(tmp_path: Path) -> None:
    from bot.cli import build_parser

    args = build_parser().parse_args(["--config", "a.yaml", "console", "--config", "b.yaml"])
    assert args.config == "b.yaml"
    assert build_parser().parse_args(["--config", "a.yaml", "console"]).config == "a.yaml"


def test_a_bad_log_level_flag_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["--log-level", "bogus", "prompts", "list"])
    assert caught.value.code == 2
    assert "--log-level" in capsys.readouterr().err


def test_prompts_show_without_an_id_says_what_is_missing(
        capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    assert main(["prompts", "show", "--prompts", str(ROOT / "prompts")]) == 2
    assert "which version?" in capsys.readouterr().err

