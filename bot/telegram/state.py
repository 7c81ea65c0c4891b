"""What the handlers share: settings, the service, and the event loop the bot runs on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from telegram.ext import ContextTypes

from bot.config import Settings
from bot.service import Service

KEY = "loopbot"


@dataclass
class BotState:
    settings: Settings
    # Set in post_init, once the store and the model are up.
    service: Service | None = None
    loop: asyncio.AbstractEventLoop | None = None
    # Run after the service is up: scheduled jobs of other features register here.
    post_init_hooks: list[Any] = field(default_factory=list)
    # Coroutine functions closing what post_init opened, in opening order.
    closers: list[Any] = field(default_factory=list)

    def require_service(self) -> Service:
        if self.service is None:
            raise RuntimeError("the bot is not started yet")
        return self.service


def state_of(context: ContextTypes.DEFAULT_TYPE) -> BotState:
    state = context.application.bot_data[KEY]
    assert isinstance(state, BotState)
    return state
