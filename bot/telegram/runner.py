"""Run the bot: start-up, updates in (polling or webhook, both through the durable inbox),
the sender, and a stop that ends within its time limit.

python-telegram-bot's ``run_polling``/``run_webhook`` confirm updates before they are handled
and answer a webhook before anything is stored; this runner keeps PTB's ``Application`` (its
handlers, job queue and bot) and replaces only the way updates come in and messages go out.

A stop (SIGINT/SIGTERM, or :attr:`BotState.request_stop`) stops taking updates, gives running
handlers ``stop_grace_s`` to finish and cancels the rest: what they had not finished stays
pending in the inbox, and whatever is not sent stays in the outbox, so the next start
completes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from telegram.error import TelegramError

from bot.config import replica_name, shared_database
from bot.store.inbox import Inbox
from bot.telegram.intake import Dispatcher, Poller
from bot.telegram.state import BotApp
from bot.telegram.webhook import WebhookPlan, registration_problems
from bot.telegram.webhook_server import WebhookServer

log = logging.getLogger(__name__)

# Longest a stop waits for handlers still running; the rest is redone at the next start.
STOP_GRACE_S = 5.0
# Replicas: how often each looks for updates whose claim ran out (another replica died).
RESUME_EVERY_S = 30.0
# Longest the start of a replica waits for getWebhookInfo (the check only warns).
REGISTRATION_CHECK_TIMEOUT_S = 15.0


def run(app: BotApp, *, start: Callable[[BotApp], Awaitable[None]],
        stop: Callable[[BotApp], Awaitable[None]], allowed_updates: list[str],
        webhook: WebhookPlan | None = None, handle_signals: bool = True,
        max_body_bytes: int = 1_048_576) -> None:
    """Serve until stopped. ``start``/``stop`` open and close what the bot needs (the store,
    the model, the sender: :func:`bot.telegram.app.post_init` / ``post_shutdown``)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(app, start, stop, allowed_updates, webhook,
                                       handle_signals, max_body_bytes))
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _serve(app: BotApp, start: Callable[[BotApp], Awaitable[None]],
                 stop: Callable[[BotApp], Awaitable[None]], allowed_updates: list[str],
                 webhook: WebhookPlan | None, handle_signals: bool,
                 max_body_bytes: int) -> None:
    state = app.bot_data
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def request_stop() -> None:
        loop.call_soon_threadsafe(stopping.set)

    state.request_stop = request_stop
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
    intake: asyncio.Task[None] | None = None
    server: WebhookServer | None = None
    dispatcher: Dispatcher | None = None
    sweep: asyncio.Task[None] | None = None
    try:
        await app.initialize()
        await start(app)
        await app.start()  # the job queue
        if stopping.is_set():
            return
        # Each replica claims updates under its own name (telegram.replica_id).
        inbox = Inbox(state.require_service().store.db, owner=replica_name(state.settings))
        dispatcher = Dispatcher(app, inbox)
        await state.require_sender().start()
        await dispatcher.resume()
        if shared_database(state.settings):
            sweep = asyncio.create_task(dispatcher.resume_forever(RESUME_EVERY_S),
                                        name="loopbot-inbox-sweep")
        if webhook is None:
            intake = asyncio.create_task(Poller(
                app, inbox, dispatcher, timeout_s=state.settings.telegram.poll_timeout_s,
                allowed_updates=allowed_updates).run(), name="loopbot-polling")
        else:
            server = await _start_webhook(app, inbox, dispatcher, webhook, allowed_updates,
                                          max_body_bytes)
        await _until_stopped(stopping, intake)
    finally:
        log.info("stopping: no new updates; running handlers get %.0fs", STOP_GRACE_S)
        if sweep is not None:
            sweep.cancel()
        await _close(app, stop, intake, server, dispatcher)


async def _start_webhook(app: BotApp, inbox: Inbox, dispatcher: Dispatcher,
                         plan: WebhookPlan, allowed_updates: list[str],
                         max_body_bytes: int) -> WebhookServer:
    async def accept(update: dict[str, object]) -> None:
        # Answered 200 only after this commit: Telegram redelivers anything not stored.
        dispatcher.submit(await inbox.add([update]))

    server = WebhookServer(path="/" + plan.url_path, secret=plan.secret_token, accept=accept,
                           host=plan.listen_host, port=plan.listen_port,
                           max_body_bytes=max_body_bytes)
    await server.start()
    if plan.register:
        await app.bot.set_webhook(plan.webhook_url, secret_token=plan.secret_token,
                                  allowed_updates=allowed_updates, drop_pending_updates=False)
        how = " (secret token generated for this run)" if plan.secret_generated else ""
    else:
        await _check_registration(app, plan, allowed_updates)
        how = " (registered by `loopbot webhook set`, not by this start)"
    log.info("webhook mode: listening on %s:%d/%s for %s%s", plan.listen_host, server.port,
             plan.url_path, plan.webhook_url, how)
    return server


async def _check_registration(app: BotApp, plan: WebhookPlan,
                              allowed_updates: list[str]) -> None:
    """Replicas leave the registration to ``loopbot webhook set``: look once whether Telegram
    delivers to this URL with the update types handled here, and warn if not. Never fails:
    Telegram may be out of reach for a moment, and the updates wait there meanwhile."""
    try:
        async with asyncio.timeout(REGISTRATION_CHECK_TIMEOUT_S):
            info = await app.bot.get_webhook_info()
    except (TelegramError, TimeoutError, OSError) as exc:
        log.warning("webhook: could not check the registration with getWebhookInfo (%s: %s); "
                    "starting anyway", type(exc).__name__, exc)
        return
    for problem in registration_problems(info.url, info.allowed_updates or (),
                                         plan.webhook_url, allowed_updates):
        log.warning("webhook: %s", problem)


async def _until_stopped(stopping: asyncio.Event, intake: asyncio.Task[None] | None) -> None:
    waiter = asyncio.create_task(stopping.wait())
    try:
        done, _ = await asyncio.wait({waiter} | ({intake} if intake else set()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if intake is not None and intake in done:
        intake.result()  # polling ended: a rejected token or a competing bot; raise it


async def _close(app: BotApp, stop: Callable[[BotApp], Awaitable[None]],
                 intake: asyncio.Task[None] | None, server: WebhookServer | None,
                 dispatcher: Dispatcher | None) -> None:
    """Each step on its own: one failing must not keep the others (and the database) open."""
    if intake is not None and not intake.done():
        intake.cancel()
        await asyncio.gather(intake, return_exceptions=True)
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    if server is not None:
        steps.append(("webhook server", server.stop))
    if dispatcher is not None:
        steps.append(("handlers", lambda: dispatcher.stop(STOP_GRACE_S)))
    sender = app.bot_data.sender
    if sender is not None:
        steps.append(("sender", sender.stop))
    if app.running:
        steps.append(("application", app.stop))
    steps.append(("model and database", lambda: stop(app)))
    steps.append(("bot", app.shutdown))
    for name, step in steps:
        try:
            await step()
        except Exception:
            log.exception("error while stopping the %s", name)
