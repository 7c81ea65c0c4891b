"""The runtime the settings ask for: the model in process, on inference servers, or both
(verdicts in process, replies on the servers)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from bot.config import Settings
from bot.llm.types import UnsupportedModel

if TYPE_CHECKING:
    from bot.llm.remote.runtime import MixedRuntime, RemoteRuntime
    from bot.llm.runtime import ModelRuntime

    AnyRuntime = ModelRuntime | RemoteRuntime | MixedRuntime


def verdicts_in_process(settings: Settings) -> bool:
    """Whether this configuration scores verdicts with a local GGUF."""
    model = settings.model
    if model.backend != "remote":
        return True
    if model.verdicts == "auto":
        return model.remote_api != "llama-server"
    return model.verdicts == "local"


async def open_runtime(settings: Settings) -> AnyRuntime:
    """Not started yet: the caller starts it (and closes it)."""
    from bot.llm.model_path import resolve_model
    from bot.llm.runtime import ModelRuntime

    model = settings.model
    if model.backend != "remote":
        # May download the default model the first time: off the event loop.
        return ModelRuntime(await asyncio.to_thread(resolve_model, settings), model)
    from bot.llm.remote.runtime import MixedRuntime, RemoteRuntime

    remote = RemoteRuntime(model)
    if not verdicts_in_process(settings):
        if not remote.can_score:
            raise UnsupportedModel(f"model.remote_api '{model.remote_api}' cannot give exact "
                                   "label probabilities: set model.verdicts to 'local'")
        return remote
    local = ModelRuntime(await asyncio.to_thread(resolve_model, settings), model)
    return MixedRuntime(local, remote)
