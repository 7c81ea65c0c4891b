"""Which GGUF file to run: the configured one, else the default one, fetched when missing."""

from __future__ import annotations

from pathlib import Path

from bot.config import Settings, resolve_path
from bot.llm.types import InferenceError


def resolve_model(settings: Settings, *, fetch_if_missing: bool = True) -> Path:
    """``model.path`` when set (it must exist); else ``model_dir/fetch_file``, downloaded
    with a progress bar the first time. Offline, the download error says what to do."""
    cfg = settings.model
    if cfg.path:
        path = resolve_path(settings, cfg.path)
        if not path.is_file():
            raise InferenceError(
                f"model file {path} does not exist: fix model.path (LOOPBOT_MODEL / --model), "
                "or leave it empty to use the default model (`loopbot model fetch`)")
        return path
    directory = resolve_path(settings, cfg.model_dir)
    default = directory / cfg.fetch_file
    if default.is_file():
        return default
    if not fetch_if_missing:
        raise InferenceError(
            f"no model: {default} is missing. Run `loopbot model fetch`, or set model.path "
            "(LOOPBOT_MODEL / --model) to a GGUF file")
    from bot.llm.fetch import FetchError, fetch_model

    try:
        return fetch_model(cfg.fetch_repo, cfg.fetch_file, directory,
                           sha256=cfg.fetch_sha256 or None, base_url=cfg.fetch_base_url)
    except FetchError as exc:
        raise InferenceError(str(exc)) from exc
