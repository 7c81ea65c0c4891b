"""Build the python-telegram-bot Application: handlers, rate limiter, start-up and shutdown.

The store and the model are opened in ``post_init`` (inside the bot's event loop) and closed in
``post_shutdown``, so every way of stopping the bot (signal, ``stop_running``, an error during
start-up) closes the model and the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from telegram import BotCommand, Update
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    MessageHandler,
    MessageReactionHandler,
    filters,
)

from bot import texts
from bot.config import Settings, prompts_directory, replica_name, shared_database
from bot.ops.metrics import METRICS
from bot.prompts import load_directory
from bot.service import Service
from bot.store.db import DB_ERRORS
from bot.store.outbox import Outbox
from bot.store.queries import Store
from bot.telegram import runner
from bot.telegram.handlers import admin, callbacks, messages, reactions, user_commands
from bot.telegram.jobs import schedule_experiment_job, schedule_learning_job
from bot.telegram.ops_hooks import ops_post_init
from bot.telegram.sender import SENDER_SWEEP_S, Sender, SendLimits
from bot.telegram.state import CONTEXT_TYPES, BotApp, BotContext, PostInitHook, new_job_queue
from bot.telegram.webhook import ALLOWED_UPDATES, plan_webhook

log = logging.getLogger(__name__)

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


async def post_init(app: BotApp) -> None:
    """Open what the bot needs, inside its event loop: the store, the model, the service and
    the sender; then the post-init hooks (scheduled jobs)."""
    from bot.llm.factory import open_runtime

    state = app.bot_data
    settings = state.settings
    state.loop = asyncio.get_running_loop()
    prompt_versions = load_directory(prompts_directory(settings))
    # May download the default model the first time (off the event loop).
    runtime = await open_runtime(settings)
    from bot.store.backup import open_configured_database

    # An upgrade's migrations run at start: the database is copied first, so it can be undone.
    store = Store(await open_configured_database(settings))
    state.closers.append(store.close)
    state.closers.append(runtime.close)
    await runtime.start()
    service = Service(settings, store, runtime, prompt_versions, metrics=METRICS)
    active = await service.start()
    state.service = service
    state.outbox = Outbox(store.db)
    replicas = settings.telegram.replicas
    state.sender = Sender(
        app.bot, state.outbox, metrics=METRICS,
        limits=SendLimits.for_replicas(replicas, settings.telegram.group_backlog_limit),
        owner=replica_name(settings),
        # Replicas look for rows the others stored (a job's admin notes) or left behind.
        sweep_s=SENDER_SWEEP_S if shared_database(settings) else None)
    try:
        await app.bot.set_my_commands([BotCommand(c, d) for c, d in USER_COMMANDS])
    except Exception as exc:  # a cosmetic call must not keep the bot from starting
        log.warning("could not set the command list: %s", exc)
    log.info("loopbot started as @%s: active version %s, %d prompt versions, db %s",
             app.bot.username, active, len(prompt_versions), store.db.path)
    for hook in state.post_init_hooks:
        await hook(app)


async def post_shutdown(app: BotApp) -> None:
    """Close what :func:`post_init` opened, model first."""
    state = app.bot_data
    state.service = None
    state.sender = None
    # Model first (it may still be finishing a job that the store would record), then the DB.
    for close in reversed(state.closers):
        try:
            await close()
        except Exception:
            log.exception("error while closing %s", close)
    state.closers.clear()
    log.info("loopbot stopped: model and database closed")


async def _on_error(update: object, context: BotContext) -> None:
    if isinstance(context.error, DB_ERRORS) and isinstance(update, Update):
        # The database refuses writes: say so at once (the outbox cannot be written either),
        # instead of leaving the user in silence; /healthz reports the failure.
        log.error("update %s: the database refused (%s)", update.update_id, context.error)
        chat, user = update.effective_chat, update.effective_user
        if chat is not None:
            lang = texts.language_of(user.language_code if user else None)
            with contextlib.suppress(TelegramError):
                await context.bot.send_message(chat.id, texts.t("temporarily_unavailable", lang))
        return
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
        # No PTB updater: updates come in through the durable inbox (bot/telegram/intake.py),
        # and answers go out through the outbox's sender, which paces them per chat.
        .updater(None)
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


def run_polling(app: BotApp, *, handle_signals: bool = True) -> None:
    """Long polling until SIGINT/SIGTERM (or ``BotState.request_stop``); then a graceful stop.
    ``handle_signals=False`` when not on the main thread (tests run the bot in a thread)."""
    runner.run(app, start=post_init, stop=post_shutdown, allowed_updates=list(ALLOWED_UPDATES),
               handle_signals=handle_signals)


def run_webhook(app: BotApp, settings: Settings, *, handle_signals: bool = True) -> None:
    """Serve updates over a webhook until SIGINT/SIGTERM (or ``BotState.request_stop``), like
    :func:`run_polling`. Registers the webhook with Telegram at start and leaves it
    registered at exit (a restart re-registers it; polling deletes it), unless
    ``telegram.webhook_register`` is false: then ``loopbot webhook set`` registered it for
    all replicas, and the start only checks it (:mod:`bot.telegram.webhook`). Each update is
    stored before it is answered with 200 (:mod:`bot.telegram.webhook_server`)."""
    runner.run(app, start=post_init, stop=post_shutdown, allowed_updates=list(ALLOWED_UPDATES),
               webhook=plan_webhook(settings.telegram), handle_signals=handle_signals,
               max_body_bytes=settings.telegram.webhook_max_body_bytes)
