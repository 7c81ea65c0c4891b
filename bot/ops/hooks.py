"""Where operations meet the running bot: one ``post_init`` hook and what it needs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from bot.config import Settings
from bot.ops.health import Components, HealthChecker, HealthServer
from bot.ops.jobs import schedule_ops_jobs

if TYPE_CHECKING:
    from telegram.ext import Application

    AnyApp = Application[Any, Any, Any, Any, Any, Any]

log = logging.getLogger(__name__)


def components_of(application: AnyApp) -> Components:
    """The model runtime and database of a running bot (empty while it starts)."""
    from bot.ops.health import RuntimeStatus
    from bot.telegram.state import KEY, BotState

    state = application.bot_data.get(KEY)
    service = state.service if isinstance(state, BotState) else None
    if service is None:
        return Components()
    runtime = service.runtime if isinstance(service.runtime, RuntimeStatus) else None
    return Components(runtime=runtime, db=service.store.db)


def health_checker(application: AnyApp, settings: Settings) -> HealthChecker:
    stuck = settings.health.stuck_after_s
    return HealthChecker(lambda: components_of(application), stuck_after_s=stuck)


async def start_health_server(application: AnyApp, settings: Settings) -> HealthServer | None:
    """Serve /healthz and /metrics on ``health.host:health.port`` (port 0 = off) from the
    bot's event loop until :meth:`HealthServer.stop`."""
    if not settings.health.port:
        return None
    server = HealthServer(health_checker(application, settings), host=settings.health.host,
                          port=settings.health.port)
    await server.start()
    return server


async def ops_post_init(application: AnyApp) -> None:
    """A ``post_init_hooks`` entry for :func:`bot.telegram.app.build_application`: the health
    server (stopped with the bot, through ``BotState.closers``) and the ops jobs."""
    from bot.telegram.state import KEY, BotState

    state = application.bot_data[KEY]
    assert isinstance(state, BotState)
    server = await start_health_server(application, state.settings)
    if server is not None:
        state.closers.append(server.stop)
    schedule_ops_jobs(application, state.settings)
