"""A text message gets a verdict with vote buttons, then a chat reply; other messages get a
short polite answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from telegram import Bot, Message, MessageEntity, ReplyParameters, Update, User
from telegram.constants import ChatAction, ChatType
from telegram.error import BadRequest, TelegramError

from bot import texts
from bot.llm.types import InferenceError, InferenceTimeout, RuntimeBusy
from bot.service import Classified, IncomingText, Service
from bot.telegram import keyboards
from bot.telegram.state import BotContext

log = logging.getLogger(__name__)

TYPING_EVERY_S = 4.5  # Telegram shows "typing" for about 5 s per action


def addressed_text(message: Message, bot_id: int, bot_username: str) -> str | None:
    """In a group: the text if the bot is mentioned or replied to (the mention removed),
    else ``None``: the bot stays quiet in conversations it is not part of."""
    text = message.text or ""
    replied = message.reply_to_message
    if replied is not None and replied.from_user is not None and replied.from_user.id == bot_id:
        return text
    handle = f"@{bot_username}".lower()
    for entity, value in message.parse_entities(
            [MessageEntity.MENTION, MessageEntity.TEXT_MENTION]).items():
        if (entity.type == MessageEntity.MENTION and value.lower() == handle) or (
                entity.type == MessageEntity.TEXT_MENTION and entity.user is not None
                and entity.user.id == bot_id):
            return text.replace(value, " ").strip()
    return None


def sender_id(message: Message, user: User) -> int:
    """Whose message it is. Anonymous group admins and users posting as a channel all
    arrive from one shared service account; the chat they speak for is the sender."""
    return message.sender_chat.id if message.sender_chat is not None else user.id


async def over_the_limit(service: Service, message: Message, sender: int, lang: str) -> bool:
    """Whether ``sender`` is sending too fast; told so once per window, not per message."""
    if service.allow(sender):
        return False
    if service.warn_once(sender):
        await message.reply_text(texts.t("rate_limited", lang), do_quote=False)
    return True


def _reply_to(message: Message) -> ReplyParameters:
    return ReplyParameters(message_id=message.message_id, allow_sending_without_reply=True)


def verdict_text(classified: Classified, lang: str) -> str:
    verdict = classified.verdict
    assert verdict is not None
    try:
        label = classified.version.label(verdict.label)
        emoji, display = label.emoji, label.display
    except KeyError:
        emoji, display = "", verdict.label
    percent = round(verdict.confidence * 100)
    return texts.t("verdict", lang, emoji=emoji, label=display, percent=percent).strip()


async def on_text(update: Update, context: BotContext) -> None:
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    if message is None or user is None or chat is None or message.text is None:
        return
    state = context.state
    service = state.require_service()
    lang = texts.language_of(user.language_code)
    text: str | None = message.text
    if chat.type != ChatType.PRIVATE:
        text = addressed_text(message, context.bot.id, context.bot.username)
        if text is None:
            return
    if not text or not text.strip():
        return
    sender = sender_id(message, user)
    if await over_the_limit(service, message, sender, lang):
        return
    respond = state.settings.telegram.respond_with
    try:
        classified = await service.classify(
            IncomingText(chat_id=chat.id, user_id=sender, message_id=message.message_id,
                         text=text, chat_type=chat.type, update_id=update.update_id),
            with_verdict=respond != "reply",
        )
    except InferenceError as exc:
        await _model_failed(message, exc, lang)
        return
    if classified.duplicate:
        log.info("update %s: message %s/%s was handled before; not answering again",
                 update.update_id, chat.id, message.message_id)
        return
    interaction = classified.interaction
    group = chat.type != ChatType.PRIVATE
    if classified.truncated:
        await message.reply_text(
            texts.t("truncated", lang, chars=state.settings.telegram.max_message_chars),
            do_quote=False)
    if classified.verdict is not None:
        sent = await context.bot.send_message(
            chat.id, verdict_text(classified, lang),
            reply_markup=keyboards.verdict_keyboard(interaction.id, lang),
            reply_parameters=_reply_to(message) if group else None,
        )
        await service.note_messages(interaction.id, chat.id, "verdict", [sent.message_id])
    if respond != "verdict":
        await send_reply(context.bot, service, classified, message, lang,
                         stream_every_s=state.settings.telegram.stream_edit_interval_s)


async def _model_failed(message: Message, exc: InferenceError, lang: str) -> None:
    if isinstance(exc, RuntimeBusy):
        key = "busy"
    elif isinstance(exc, InferenceTimeout):
        key = "timeout"
    else:
        key = "error"
        log.error("inference failed: %s", exc)
    await message.reply_text(texts.t(key, lang), do_quote=False)


async def _keep_typing(bot: Bot, chat_id: int) -> None:
    while True:
        with contextlib.suppress(TelegramError):
            await bot.send_chat_action(chat_id, ChatAction.TYPING)
        await asyncio.sleep(TYPING_EVERY_S)


class _Stream:
    """Shows the reply while it is generated by editing one message, at most once per
    ``every_s`` (Telegram's flood limits allow about one edit per second per chat)."""

    def __init__(self, bot: Bot, chat_id: int, reply_to: Message, every_s: float) -> None:
        self.bot, self.chat_id, self.reply_to, self.every_s = bot, chat_id, reply_to, every_s
        self.latest = ""
        self.shown = ""
        self.message: Message | None = None

    def on_text(self, text: str) -> None:
        self.latest = text

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.show(texts.split_message(self.latest)[0] if self.latest.strip() else "")

    async def show(self, text: str) -> None:
        if not text or text == self.shown:
            return
        try:
            if self.message is None:
                self.message = await self.bot.send_message(
                    self.chat_id, text, reply_parameters=_reply_to(self.reply_to))
            else:
                await self.message.edit_text(text)
            self.shown = text
        except BadRequest as exc:  # e.g. "message is not modified"
            log.debug("stream edit refused: %s", exc)


async def send_reply(bot: Bot, service: Service, classified: Classified, message: Message,
                     lang: str, *, stream_every_s: float = 0.0) -> list[int]:
    """Generate the reply with a typing indicator, send it in pieces below Telegram's limit,
    and remember the message ids (reactions on them are chat feedback)."""
    chat_id = message.chat_id
    stream = _Stream(bot, chat_id, message, stream_every_s) if stream_every_s > 0 else None
    background = [asyncio.create_task(_keep_typing(bot, chat_id))]
    if stream is not None:
        background.append(asyncio.create_task(stream.run()))
    try:
        reply = await service.reply(classified.interaction,
                                    on_text=stream.on_text if stream else None)
    except InferenceError as exc:
        await _model_failed(message, exc, lang)
        return []
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    pieces = texts.split_message(reply.text) or [texts.t("empty_reply", lang)]
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if index == 0 and stream is not None and stream.message is not None:
            await stream.show(piece)
            ids.append(stream.message.message_id)
            continue
        sent = await bot.send_message(chat_id, piece,
                                      reply_parameters=_reply_to(message) if index == 0 else None)
        ids.append(sent.message_id)
    await service.note_messages(classified.interaction.id, chat_id, "reply", ids)
    return ids


async def on_other(update: Update, context: BotContext) -> None:
    """Stickers, photos, voice...: a polite note in private chats (or when replying to the
    bot in a group); nothing is stored."""
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    if message is None or chat is None:
        return
    if chat.type != ChatType.PRIVATE:
        replied = message.reply_to_message
        if replied is None or replied.from_user is None or replied.from_user.id != context.bot.id:
            return
    lang = texts.language_of(user.language_code if user else None)
    # Stickers count against the same limit as texts: a flood gets one notice.
    if user is not None and await over_the_limit(context.state.require_service(), message,
                                                 sender_id(message, user), lang):
        return
    await message.reply_text(texts.t("non_text", lang), do_quote=False)
