"""Build the python-telegram-bot Application: handlers, rate limiter, start-up and shutdown.

The store and the model are opened in ``post_init`` (inside the bot's event loop) and closed in
``post_shutdown``, so every way of stopping the bot (signal, ``stop_running``, an error during
start-up) closes the model and the database.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable, Sequence

from telegram import BotCommand, Update
from telegram.error import TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    CallbackQueryHandler,
    CommandHandler,
    MessageHandler,
    MessageReactionHandler,
    filters,
)

from bot.config import Settings, prompts_directory
from bot.ops.metrics import METRICS
from bot.prompts import load_directory
from bot.service import Service
from bot.store.queries import Store
from bot.telegram.handlers import admin, callbacks, messages, reactions, user_commands
from bot.telegram.jobs import schedule_experiment_job, schedule_learning_job
from bot.telegram.ops_hooks import ops_post_init
from bot.telegram.state import CONTEXT_TYPES, BotApp, BotContext, PostInitHook, new_job_queue

log = logging.getLogger(__name__)

ALLOWED_UPDATES = (Update.MESSAGE, Update.CALLBACK_QUERY, Update.MESSAGE_REACTION)
# Hooks every bot gets; each runs in post_init once the service is up.
DEFAULT_POST_INIT_HOOKS: tuple[PostInitHook, ...] = (
    ops_post_init,  # health endpoint, retention and backup jobs
    schedule_experiment_job,  # the experiment analysis (decision engine)
    schedule_learning_job,  # mining corrected mistakes into candidates
)
USER_COMMANDS = (
    ("start", "start / 开始"),
    ("help", "help / 帮助"),
    ("privacy", "what is stored / 隐私说明"),
    ("forget", "delete my data / 删除我的数据"),
)


async def _post_init(app: BotApp) -> None:
    from bot.llm.model_path import resolve_model
    from bot.llm.runtime import ModelRuntime

    state = app.bot_data
    settings = state.settings
    state.loop = asyncio.get_running_loop()
    prompt_versions = load_directory(prompts_directory(settings))
    # May download the default model the first time: off the event loop.
    model = await asyncio.to_thread(resolve_model, settings)
    from bot.store.backup import open_configured_database

    # An upgrade's migrations run at start: the database is copied first, so it can be undone.
    store = Store(await open_configured_database(settings))
    state.closers.append(store.close)
    runtime = ModelRuntime(model, settings.model)
    state.closers.append(runtime.close)
    await runtime.start()
    service = Service(settings, store, runtime, prompt_versions, metrics=METRICS)
    active = await service.start()
    state.service = service
    try:
        await app.bot.set_my_commands([BotCommand(c, d) for c, d in USER_COMMANDS])
    except Exception as exc:  # a cosmetic call must not keep the bot from starting
        log.warning("could not set the command list: %s", exc)
    log.info("loopbot started as @%s: active version %s, %d prompt versions, db %s",
             app.bot.username, active, len(prompt_versions), store.db.path)
    for hook in state.post_init_hooks:
        await hook(app)


async def _post_shutdown(app: BotApp) -> None:
    state = app.bot_data
    state.service = None
    # Model first (it may still be finishing a job that the store would record), then the DB.
    for close in reversed(state.closers):
        try:
            await close()
        except Exception:
            log.exception("error while closing %s", close)
    state.closers.clear()
    log.info("loopbot stopped: model and database closed")


async def _on_error(update: object, context: BotContext) -> None:
    log.error("error while handling update %s", getattr(update, "update_id", update),
              exc_info=context.error)


def build_application(
    settings: Settings, *, post_init_hooks: Sequence[PostInitHook] | None = None
) -> BotApp:
    """The bot, ready for ``run_polling``. ``post_init_hooks`` run after the service is up
    (scheduled jobs of other features register there); ``None`` means
    :data:`DEFAULT_POST_INIT_HOOKS`."""
    if post_init_hooks is None:
        post_init_hooks = DEFAULT_POST_INIT_HOOKS
    tg = settings.telegram
    if not tg.token:
        raise ValueError("no bot token: set TELEGRAM_BOT_TOKEN (from @BotFather)")
    app = (
        Application.builder()
        .context_types(CONTEXT_TYPES)
        .job_queue(new_job_queue())
        .token(tg.token)
        .base_url(tg.base_url)
        .base_file_url(tg.base_file_url)
        # Retries a 429 after Telegram's retry_after, and paces sends under the flood limits.
        .rate_limiter(AIORateLimiter(max_retries=3))
        # Votes must be answered while a reply is still being generated for someone else.
        .concurrent_updates(True)
        .get_updates_read_timeout(tg.poll_timeout_s + 10.0)
        .post_init(_post_init)
        .post_shutdown(_post_shutdown)
        .build()
    )
    app.bot_data.settings = settings
    app.bot_data.post_init_hooks = list(post_init_hooks)
    add_handlers(app)
    return app


def add_handlers(app: BotApp) -> None:
    for name, callback in (
        ("start", user_commands.start),
        ("help", user_commands.help_command),
        ("privacy", user_commands.privacy),
        ("forget", user_commands.forget),
        ("stats", admin.stats),
        ("versions", admin.list_versions),
        ("rollback", admin.rollback),
        ("promote", admin.promote),
        ("canary", admin.canary),
        ("retire", admin.retire),
        ("export", admin.export),
        ("report", admin.report),
        ("approve", admin.approve),
    ):
        app.add_handler(CommandHandler(name, callback))
    app.add_handler(MessageHandler(
        filters.UpdateType.MESSAGE & filters.TEXT & ~filters.COMMAND, messages.on_text))
    app.add_handler(MessageHandler(
        filters.UpdateType.MESSAGE & ~filters.TEXT & ~filters.COMMAND
        & ~filters.StatusUpdate.ALL, messages.on_other))
    app.add_handler(CallbackQueryHandler(callbacks.on_vote))
    app.add_handler(MessageReactionHandler(reactions.on_reaction))
    app.add_error_handler(_on_error)


def run_polling(app: BotApp, *, handle_signals: bool = True,
                close_loop: bool = True) -> None:
    """Long polling until SIGINT/SIGTERM (or ``stop_running``); then a graceful shutdown.
    ``handle_signals=False`` when not on the main thread (tests run the bot in a thread)."""
    state = app.bot_data
    run_until_stopped(app, functools.partial(
        app.run_polling, allowed_updates=list(ALLOWED_UPDATES),
        timeout=state.settings.telegram.poll_timeout_s), handle_signals=handle_signals,
        close_loop=close_loop)


def run_until_stopped(app: BotApp, start: Callable[..., None], *,
                      handle_signals: bool = True, close_loop: bool = True) -> None:
    """Run PTB's ``run_polling``/``run_webhook`` (``start``) and make sure the model and the
    database are closed however it ends.

    A stop signal that arrives while PTB is still starting its updater makes PTB's own
    teardown fail (closing the half-started request raises) before ``post_shutdown``; the
    open database thread would then keep the process from exiting. So the signals are ours:
    we note the stop, and close what ``post_shutdown`` did not."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stop_requested = False

    def request_stop() -> None:
        nonlocal stop_requested
        stop_requested = True
        raise SystemExit  # what PTB's own handler does: unwinds run_until_complete/forever

    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, request_stop)
    try:
        start(stop_signals=None, close_loop=False)
    except TelegramError as exc:
        if not stop_requested:
            raise
        log.warning("stopped while starting up (%s); closing what was opened", exc)
    finally:
        if app.bot_data.closers:
            loop.run_until_complete(_post_shutdown(app))
        if close_loop:
            loop.close()
