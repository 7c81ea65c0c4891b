"""What the handlers share, typed: python-telegram-bot's ``bot_data`` *is* a :class:`BotState`
(through ``ContextTypes``), and every handler and job gets a :class:`BotContext` whose
:attr:`BotContext.state` is it, so nobody looks state up by key or checks its type."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from telegram.ext import Application, CallbackContext, ContextTypes, ExtBot, JobQueue

from bot.config import Settings
from bot.service import Service
from bot.store.outbox import Outbox

if TYPE_CHECKING:
    from bot.telegram.sender import Sender


@dataclass
class BotState:
    # Replaced by build_application (PTB creates bot_data with no arguments).
    settings: Settings = field(default_factory=Settings)
    # Set in post_init, once the store and the model are up.
    service: Service | None = None
    loop: asyncio.AbstractEventLoop | None = None
    # Run after the service is up: scheduled jobs of other features register here.
    post_init_hooks: list[PostInitHook] = field(default_factory=list)
    # Coroutine functions closing what post_init opened, in opening order.
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # What the bot must send, and who sends it (set once the service is up).
    outbox: Outbox | None = None
    sender: Sender | None = None
    # Set while the bot runs: ask it to stop (thread-safe).
    request_stop: Callable[[], None] | None = None

    def require_service(self) -> Service:
        if self.service is None:
            raise RuntimeError("the bot is not started yet")
        return self.service

    def require_outbox(self) -> Outbox:
        if self.outbox is None:
            raise RuntimeError("the bot is not started yet")
        return self.outbox

    def require_sender(self) -> Sender:
        if self.sender is None:
            raise RuntimeError("the bot is not started yet")
        return self.sender


class BotContext(CallbackContext[ExtBot[Any], dict[Any, Any], dict[Any, Any], BotState]):
    """The context every handler and job of loopbot receives."""

    @property
    def state(self) -> BotState:
        return self.bot_data


BotApp: TypeAlias = Application[
    ExtBot[Any], BotContext, dict[Any, Any], dict[Any, Any], BotState, JobQueue[BotContext]
]
PostInitHook: TypeAlias = Callable[[BotApp], Awaitable[None]]
CONTEXT_TYPES = ContextTypes(context=BotContext, bot_data=BotState)


def new_job_queue() -> JobQueue[BotContext]:
    """A job queue typed for :class:`BotContext` (PTB's default one is typed for its default
    context, although ``CONTEXT_TYPES`` makes it pass ours)."""
    return JobQueue()
