"""Emoji reactions on the bot's messages: 👍/👎 on a chat reply is feedback on the reply."""

from __future__ import annotations

import logging

from telegram import ReactionTypeEmoji, Update

from bot.telegram.state import BotContext

log = logging.getLogger(__name__)


async def on_reaction(update: Update, context: BotContext) -> None:
    reaction = update.message_reaction
    if reaction is None or reaction.user is None:
        return  # anonymous (channel or group admin) reactions name no user
    emojis = [r.emoji for r in reaction.new_reaction if isinstance(r, ReactionTypeEmoji)]
    service = context.state.require_service()
    stored = await service.record_reaction(reaction.chat.id, reaction.message_id,
                                           reaction.user.id, emojis,
                                           update_id=update.update_id)
    log.debug("reaction %s on %s/%s by %s -> %s", emojis, reaction.chat.id,
              reaction.message_id, reaction.user.id, stored)
