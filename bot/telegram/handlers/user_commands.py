"""/start, /help, /privacy, /forget: for everybody."""

from __future__ import annotations

from telegram import Update

from bot import texts
from bot.telegram.handlers.messages import notice
from bot.telegram.state import BotContext


def _lang(update: Update) -> str:
    user = update.effective_user
    return texts.language_of(user.language_code if user else None)


async def start(update: Update, context: BotContext) -> None:
    if update.effective_chat is not None:
        await notice(context, update.effective_chat, texts.t("start", _lang(update)))


async def help_command(update: Update, context: BotContext) -> None:
    chat, user = update.effective_chat, update.effective_user
    if chat is None:
        return
    lang = _lang(update)
    text = texts.t("help", lang)
    if user is not None and user.id in context.state.settings.telegram.admins:
        text += "\n\n" + texts.t("help_admin", lang)
    await notice(context, chat, text)


async def privacy(update: Update, context: BotContext) -> None:
    if update.effective_chat is None:
        return
    lang = _lang(update)
    days = context.state.settings.storage.retention_days
    await notice(context, update.effective_chat,
                 texts.t("privacy", lang, retention=texts.retention_text(days, lang)))


async def forget(update: Update, context: BotContext) -> None:
    message, user = update.effective_message, update.effective_user
    if message is None or user is None:
        return
    if message.sender_chat is not None:
        # Sent on behalf of a chat: the shared service account it comes from is nobody's.
        await notice(context, message.chat, texts.t("forget_not_anonymous", _lang(update)))
        return
    result = await context.state.require_service().forget_user(user.id,
                                                               update_id=update.update_id)
    await notice(context, message.chat, texts.t(
        "forgotten", _lang(update), interactions=result.interactions, votes=result.votes,
        reactions=result.reactions))
