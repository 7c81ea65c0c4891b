"""A text message gets a verdict with vote buttons, then a chat reply; other messages get a
short polite answer."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from telegram import Chat, InlineKeyboardMarkup, Message, MessageEntity, Update, User
from telegram.constants import ChatType

from bot import texts
from bot.llm.types import InferenceError, InferenceTimeout, Reply, RuntimeBusy, Verdict
from bot.prompts import PromptVersion
from bot.service import Classified, IncomingText, Service
from bot.store.outbox import Outgoing
from bot.store.queries import Interaction
from bot.telegram import keyboards
from bot.telegram.sender import Sender
from bot.telegram.state import BotApp, BotContext, BotState

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


async def over_the_limit(context: BotContext, service: Service, message: Message, sender: int,
                         lang: str) -> bool:
    """Whether ``sender`` is sending too fast; told so once per window, not per message."""
    if service.allow(sender):
        return False
    if service.warn_once(sender):
        await notice(context, message.chat, texts.t("rate_limited", lang))
    return True


def send_params(text: str, *, reply_to: int | None = None,
                markup: InlineKeyboardMarkup | None = None) -> dict[str, Any]:
    """sendMessage parameters as the outbox stores them (plain JSON)."""
    payload: dict[str, Any] = {"text": text}
    if markup is not None:
        payload["reply_markup"] = markup.to_dict()
    if reply_to is not None:
        payload["reply_parameters"] = {"message_id": reply_to,
                                       "allow_sending_without_reply": True}
    return payload


async def notice(context: BotContext, chat: Chat, text: str,
                 reply_to: int | None = None) -> None:
    """A short message to a chat, through the outbox like every other answer."""
    await notice_to(context.state, chat, text, reply_to)


async def notice_to(state: BotState, chat: Chat, text: str, reply_to: int | None = None) -> None:
    await state.require_outbox().add([Outgoing(chat.id, chat.type, "notice",
                                               send_params(text, reply_to=reply_to))])
    state.require_sender().notify(chat.id, chat.type)


async def apologise_for_restart(app: BotApp, update: Update) -> None:
    """A message found in the inbox long after it was sent (the bot was down): a short
    apology instead of a verdict nobody waits for any more."""
    message, chat, user = update.effective_message, update.effective_chat, update.effective_user
    if message is None or chat is None or message.text is None:
        return
    if chat.type != ChatType.PRIVATE and addressed_text(message, app.bot.id,
                                                        app.bot.username) is None:
        return
    lang = texts.language_of(user.language_code if user else None)
    await notice_to(app.bot_data, chat, texts.t("restarted", lang), message.message_id)


def verdict_words(version: PromptVersion, verdict: Verdict, lang: str) -> str:
    try:
        label = version.label(verdict.label)
        emoji, display = label.emoji, label.display
    except KeyError:
        emoji, display = "", verdict.label
    percent = round(verdict.confidence * 100)
    return texts.t("verdict", lang, emoji=emoji, label=display, percent=percent).strip()


@dataclass(frozen=True)
class _Incoming:
    """A text addressed to the bot, with what its answer depends on."""

    update_id: int
    message: Message
    chat: Chat
    sender: int
    text: str
    lang: str

    @property
    def group(self) -> bool:
        return self.chat.type != ChatType.PRIVATE


def _incoming(update: Update, context: BotContext) -> _Incoming | None:
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    if message is None or user is None or chat is None or message.text is None:
        return None
    text: str | None = message.text
    if chat.type != ChatType.PRIVATE:
        text = addressed_text(message, context.bot.id, context.bot.username)
    if not text or not text.strip():
        return None
    return _Incoming(update.update_id, message, chat, sender_id(message, user), text,
                     texts.language_of(user.language_code))


async def on_text(update: Update, context: BotContext) -> None:
    incoming = _incoming(update, context)
    if incoming is None:
        return
    state = context.state
    service, sender = state.require_service(), state.require_sender()
    if await over_the_limit(context, service, incoming.message, incoming.sender, incoming.lang):
        return
    respond = state.settings.telegram.respond_with
    promised = int(respond != "reply") + int(respond != "verdict")
    if not await sender.reserve(incoming.chat.id, incoming.chat.type, promised):
        # A group over its backlog: drop before the model runs, and say so once.
        if sender.tell_busy(incoming.chat.id):
            await notice(context, incoming.chat, texts.t("group_busy", incoming.lang))
        return
    try:
        await _answer(context, incoming, respond)
    finally:
        sender.release(incoming.chat.id, promised)


async def _answer(context: BotContext, incoming: _Incoming, respond: str) -> None:
    state = context.state
    service, sender = state.require_service(), state.require_sender()
    chat, lang = incoming.chat, incoming.lang
    limit = state.settings.telegram.max_message_chars
    truncated = 0 < limit < len(incoming.text)

    def verdict_out(interaction: Interaction, verdict: Verdict | None) -> list[Outgoing]:
        out = []
        if truncated:
            out.append(Outgoing(chat.id, chat.type, "notice",
                                send_params(texts.t("truncated", lang, chars=limit))))
        if verdict is not None:
            out.append(Outgoing(chat.id, chat.type, "verdict", send_params(
                verdict_words(service.version_of(interaction), verdict, lang),
                markup=keyboards.verdict_keyboard(interaction.id, lang),
                reply_to=incoming.message.message_id if incoming.group else None),
                interaction_id=interaction.id))
        return out

    try:
        classified = await service.classify(
            IncomingText(chat_id=chat.id, user_id=incoming.sender,
                         message_id=incoming.message.message_id, text=incoming.text,
                         chat_type=chat.type, update_id=incoming.update_id),
            with_verdict=respond != "reply", outgoing=verdict_out)
    except InferenceError as exc:
        await _model_failed(context, chat, exc, lang)
        return
    if classified is None:
        return  # sent before the user's /forget: nothing of it is kept or answered
    sender.notify(chat.id, chat.type)
    # A redelivered update (or a restart while it was answered): its verdict was stored with
    # its interaction and is delivered by the outbox; only a missing reply is made.
    if classified.duplicate and (respond == "verdict"
                                 or classified.interaction.reply_text is not None):
        log.info("update %s: message %s/%s was answered before", incoming.update_id,
                 chat.id, incoming.message.message_id)
        return
    if respond != "verdict":
        await send_reply(context, classified, incoming.message, lang,
                         stream_every_s=state.settings.telegram.stream_edit_interval_s)


async def _model_failed(context: BotContext, chat: Chat, exc: InferenceError,
                        lang: str) -> None:
    if isinstance(exc, RuntimeBusy):
        key = "busy"
    elif isinstance(exc, InferenceTimeout):
        key = "timeout"
    else:
        key = "error"
        log.error("inference failed: %s", exc)
    await notice(context, chat, texts.t(key, lang))


async def _keep_typing(sender: Sender, chat_id: int) -> None:
    while True:
        await sender.typing(chat_id)
        await asyncio.sleep(TYPING_EVERY_S)


class _Stream:
    """Shows the reply while it is generated: the sender edits one message in place as
    often as the chat's limit allows; here at most every ``every_s``."""

    def __init__(self, sender: Sender, chat: Chat, key: str, reply_to: int,
                 every_s: float) -> None:
        self.sender, self.chat, self.key, self.reply_to = sender, chat, key, reply_to
        self.every_s = every_s
        self.last = -math.inf

    def on_text(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s or not text.strip():
            return
        self.last = now
        self.sender.preview(self.chat.id, self.chat.type, self.key,
                            texts.split_message(text)[0], self.reply_to)


async def send_reply(context: BotContext, classified: Classified, message: Message,
                     lang: str, *, stream_every_s: float = 0.0) -> None:
    """Generate the reply with a typing indicator; it is stored together with its messages
    (in pieces below Telegram's limit) for the sender to deliver."""
    sender = context.state.require_sender()
    service = context.state.require_service()
    chat = message.chat
    key = f"reply:{classified.interaction.id}"
    stream = (_Stream(sender, chat, key, message.message_id, stream_every_s)
              if stream_every_s > 0 else None)
    typing = (asyncio.create_task(_keep_typing(sender, chat.id))
              if chat.type == ChatType.PRIVATE else None)

    def reply_out(reply: Reply) -> list[Outgoing]:
        pieces = texts.split_message(reply.text) or [texts.t("empty_reply", lang)]
        out = []
        for index, piece in enumerate(pieces):
            payload = send_params(piece, reply_to=message.message_id if index == 0 else None)
            if index == 0 and stream is not None:
                payload["preview_key"] = key  # edit the preview into the final text
            out.append(Outgoing(chat.id, chat.type, "reply", payload,
                                interaction_id=classified.interaction.id))
        return out

    try:
        await service.reply(classified.interaction,
                            on_text=stream.on_text if stream else None, outgoing=reply_out)
    except InferenceError as exc:
        sender.end_preview(chat.id, key)
        await _model_failed(context, chat, exc, lang)
        return
    finally:
        if typing is not None:
            typing.cancel()
            await asyncio.gather(typing, return_exceptions=True)
    sender.notify(chat.id, chat.type)


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
    if user is not None and await over_the_limit(context, context.state.require_service(),
                                                 message, sender_id(message, user), lang):
        return
    await notice(context, chat, texts.t("non_text", lang))
