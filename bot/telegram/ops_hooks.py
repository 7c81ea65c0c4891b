"""Where operations meet the running bot: one ``post_init`` hook and what it needs."""

from __future__ import annotations

import logging

from bot.config import Settings
from bot.ops.health import Components, HealthChecker, HealthServer, RuntimeStatus
from bot.telegram.ops_jobs import schedule_ops_jobs
from bot.telegram.state import BotApp

log = logging.getLogger(__name__)


def components_of(application: BotApp) -> Components:
    """The model runtime and database of a running bot (empty while it starts)."""
    service = application.bot_data.service
    if service is None:
        return Components()
    runtime = service.runtime if isinstance(service.runtime, RuntimeStatus) else None
    return Components(runtime=runtime, db=service.store.db)


def health_checker(application: BotApp, settings: Settings) -> HealthChecker:
    stuck = settings.health.stuck_after_s
    return HealthChecker(lambda: components_of(application), stuck_after_s=stuck)


async def start_health_server(application: BotApp, settings: Settings) -> HealthServer | None:
    """Serve /healthz and /metrics on ``health.host:health.port`` (port 0 = off) from the
    bot's event loop until :meth:`HealthServer.stop`."""
    if not settings.health.port:
        return None
    server = HealthServer(health_checker(application, settings), host=settings.health.host,
                          port=settings.health.port)
    await server.start()
    return server


async def ops_post_init(application: BotApp) -> None:
    """A ``post_init_hooks`` entry for :func:`bot.telegram.app.build_application`: the health
    server (stopped with the bot, through ``BotState.closers``) and the ops jobs."""
    state = application.bot_data
    server = await start_health_server(application, state.settings)
    if server is not None:
        state.closers.append(server.stop)
    schedule_ops_jobs(application, state.settings)
