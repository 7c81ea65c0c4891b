"""The ✅/❌ buttons (and the label picker). The vote is committed before the click is
answered, so an acknowledged click is never lost, even if the process dies right after."""

from __future__ import annotations

import logging

from telegram import Message, Update
from telegram.constants import ChatType
from telegram.error import BadRequest

from bot import texts
from bot.store.queries import Vote
from bot.telegram import keyboards
from bot.telegram.state import BotContext

log = logging.getLogger(__name__)


async def on_vote(update: Update, context: BotContext) -> None:
    query = update.callback_query
    if query is None:
        return
    lang = texts.language_of(query.from_user.language_code)
    parsed = keyboards.decode(query.data)
    message = query.message
    if parsed is None or not isinstance(message, Message):
        log.warning("refused callback %r from user %s: malformed or message unavailable",
                    query.data, query.from_user.id)
        await query.answer(texts.t("vote_stale", lang))
        return
    service = context.state.require_service()
    outcome = await service.record_vote(
        parsed.interaction_id, query.from_user.id, parsed.choice,
        chat_id=message.chat_id, message_id=message.message_id, update_id=update.update_id,
    )
    if not outcome.ok or outcome.vote is None or outcome.interaction is None:
        log.warning("refused callback %r from user %s in chat %s: %s", query.data,
                    query.from_user.id, message.chat_id, outcome.reason)
        await query.answer(texts.t("vote_stale", lang))
        return
    vote, interaction = outcome.vote, outcome.interaction
    if outcome.ask_label:
        note = texts.t("vote_pick_label", lang)
    elif vote.correct:
        note = texts.t("vote_thanks_correct", lang)
    elif vote.correct_label is not None and len(interaction.labels) > 2:
        note = texts.t("vote_thanks_label", lang, label=vote.correct_label)
    else:
        note = texts.t("vote_thanks_wrong", lang)
    await query.answer(note)
    shown: Vote | None = vote
    if message.chat.type != ChatType.PRIVATE:
        # Everybody in a group sees one keyboard: it keeps the language it was drawn in and
        # marks nobody's vote (each voter got their own answer above).
        lang = keyboards.language_of_keyboard(message.reply_markup) or lang
        shown = None
    if len(interaction.labels) > 2 and not vote.correct:
        markup = keyboards.label_keyboard(interaction, lang, shown)
    else:
        markup = keyboards.verdict_keyboard(interaction.id, lang, shown)
    if markup == message.reply_markup:
        return  # a group's keyboard after another vote: nothing to redraw
    try:
        await query.edit_message_reply_markup(markup)
    except BadRequest as exc:
        # "message is not modified" when the same button is clicked twice.
        log.debug("keyboard not updated: %s", exc)
