"""Admin commands: /stats /versions /rollback /promote /canary /retire /export /report
/approve.

Only user ids listed in ``telegram.admins`` may use them; anybody else gets a refusal, and the
attempt is logged (a probing user is worth knowing about).
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from telegram import InputFile, Message, Update

from bot import experiment, texts, versions
from bot.learning import loop as learning
from bot.service import Service, VersionReport
from bot.telegram.state import BotContext
from bot.texts import learning as learning_texts

log = logging.getLogger(__name__)

Handler = Callable[[Update, BotContext], Coroutine[Any, Any, None]]
AdminHandler = Callable[[Update, BotContext, Message, Service, str],
                        Coroutine[Any, Any, None]]


def admin_only(func: AdminHandler) -> Handler:
    @functools.wraps(func)
    async def wrapper(update: Update, context: BotContext) -> None:
        message, user = update.effective_message, update.effective_user
        if message is None or user is None:
            return
        lang = texts.language_of(user.language_code)
        state = context.state
        if user.id not in state.settings.telegram.admins:
            # Only the command word: its arguments are user text, kept out of the logs.
            command = (message.text or "").split(maxsplit=1)[0][:32] if message.text else "?"
            log.warning("refused admin command %s from user %s (chat %s)",
                        command, user.id, message.chat_id)
            await message.reply_text(texts.t("not_admin", lang), do_quote=False)
            return
        if message.chat.type != "private":
            # /export and /stats show every user's data: never into a group.
            await message.reply_text(texts.t("admin_private_only", lang), do_quote=False)
            return
        await func(update, context, message, state.require_service(), lang)

    return wrapper


async def _reply_long(message: Message, text: str) -> None:
    """Telegram refuses messages over 4096 characters: many versions make /stats long."""
    for part in texts.split_message(text):
        await message.reply_text(part, do_quote=False)


def _actor(update: Update) -> str:
    user = update.effective_user
    return f"admin:{user.id}" if user else "admin"


def _pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def format_report(r: VersionReport) -> str:
    acc = r.accuracy
    share = f" {_pct(r.share)}" if r.state == versions.CANDIDATE else ""
    if acc.accuracy is None:
        accuracy = "accuracy –"
    else:
        accuracy = (f"accuracy {_pct(acc.accuracy)} (95% CI {_pct(acc.low)}–{_pct(acc.high)},"
                    f" {acc.method})")
    latency = f" · {r.mean_latency_ms:.0f} ms" if r.mean_latency_ms is not None else ""
    return (f"• {r.version_id} [{r.state}{share}]\n"
            f"  {r.verdicts} verdicts · {acc.votes} votes ({acc.correct} ✅) · {accuracy}\n"
            f"  reactions 👍 {r.reactions_positive} 👎 {r.reactions_negative}{latency}")


@admin_only
async def stats(update: Update, context: BotContext, message: Message,
                service: Service, lang: str) -> None:
    reports = await service.stats()
    lines = ["📊 /stats"] + [format_report(r) for r in reports]
    lines += await experiment_lines(service)
    await _reply_long(message, "\n".join(lines))
    series = await service.accuracy_series()
    if not series:
        return
    # matplotlib (~30 MB resident) is loaded when an admin first asks for a chart, not at
    # start: the bot's memory is sized to what it serves.
    from analytics import charts

    periods = [charts.Period(p.version_id, p.period_start, p.votes, p.correct) for p in series]
    # The engine's entries name its decision (a revert or freeze is written as a retire).
    events = [charts.Event(e.at, f"{e.stats.get('decision', e.action)} {e.version_id}")
              for e in await versions.audit_log(service.store.db, limit=20)
              if e.action != "init"]
    # Rendering takes a few hundred ms of CPU: keep the event loop free meanwhile.
    png = await asyncio.to_thread(charts.accuracy_png, periods, events)
    await message.reply_photo(InputFile(png, filename="accuracy.png"), do_quote=False)


async def experiment_lines(service: Service) -> list[str]:
    """Each running test as the engine sees it now (a dry run: /stats never changes state)."""
    try:
        outcomes = await experiment.analyze(service.store.db, service.versions,
                                            service.settings.experiment, apply=False)
    except Exception:
        # The counts above are still worth showing when the analysis breaks.
        log.exception("experiment analysis for /stats failed")
        return ["", "🧪 experiment analysis failed (see the log)"]
    lines: list[str] = []
    for outcome in outcomes:
        lines += ["", *outcome.stats_lines()]
    return lines


@admin_only
async def list_versions(update: Update, context: BotContext, message: Message,
                        service: Service, lang: str) -> None:
    state = await versions.load(service.store.db)
    lines = ["🗂 versions"]
    for vid, version in sorted(service.versions.items()):
        current = state.get(vid)
        if current is None:
            status = "available"
        elif current.state == versions.CANDIDATE:
            status = f"candidate {_pct(current.share)}"
        else:
            status = current.state
        since = ""
        if current is not None:
            since = " since " + datetime.fromtimestamp(current.since, UTC).strftime(
                "%Y-%m-%d %H:%M")
        edited = " (file edited)" if current and current.content_hash not in (
            "", version.content_hash) else ""
        lines.append(f"• {vid}: {status}{since} · {version.content_hash[:8]}{edited}")
    for entry in await versions.audit_log(service.store.db, limit=5):
        when = datetime.fromtimestamp(entry.at, UTC).strftime("%m-%d %H:%M")
        lines.append(f"  {when} {entry.action} {entry.version_id} by {entry.actor}"
                     + (f": {entry.reason}" if entry.reason else ""))
    await _reply_long(message, "\n".join(lines))


async def _change(message: Message, lang: str,
                  change: Awaitable[versions.AuditEntry]) -> versions.AuditEntry | None:
    """A version-state change; a refusal is told to the admin (None then)."""
    try:
        return await change
    except versions.VersionError as exc:
        await message.reply_text(texts.t("refused", lang, reason=exc), do_quote=False)
        return None


@admin_only
async def rollback(update: Update, context: BotContext, message: Message,
                   service: Service, lang: str) -> None:
    entry = await _change(message, lang, service.rollback(actor=_actor(update),
                                                          reason="/rollback by an admin"))
    if entry is None:
        return
    await message.reply_text(texts.t("rolled_back", lang, version=entry.version_id,
                                     previous=entry.previous_active), do_quote=False)


@admin_only
async def promote(update: Update, context: BotContext, message: Message,
                  service: Service, lang: str) -> None:
    args = context.args or []
    if len(args) != 1:
        await message.reply_text(texts.t("usage_promote", lang), do_quote=False)
        return
    entry = await _change(message, lang, service.promote(args[0], actor=_actor(update),
                                                         reason="/promote by an admin"))
    if entry is None:
        return
    await message.reply_text(texts.t("promoted", lang, version=entry.version_id,
                                     previous=entry.previous_active or "–"), do_quote=False)


@admin_only
async def canary(update: Update, context: BotContext, message: Message,
                 service: Service, lang: str) -> None:
    args = context.args or []
    try:
        version_id, percent = args[0], float(args[1].rstrip("%"))
        if len(args) != 2:
            raise ValueError
    except (IndexError, ValueError):
        await message.reply_text(texts.t("usage_canary", lang), do_quote=False)
        return
    entry = await _change(message, lang, service.set_canary(
        version_id, percent, actor=_actor(update), reason="/canary by an admin"))
    if entry is None:
        return
    await message.reply_text(texts.t("canary_set", lang, version=entry.version_id,
                                     percent=f"{entry.share * 100:g}"), do_quote=False)


@admin_only
async def retire(update: Update, context: BotContext, message: Message,
                 service: Service, lang: str) -> None:
    """``/retire ID``: end a candidate's test by hand (works without its prompt file)."""
    args = context.args or []
    if len(args) != 1:
        await message.reply_text(texts.t("usage_retire", lang), do_quote=False)
        return
    entry = await _change(message, lang, service.retire(args[0], actor=_actor(update),
                                                        reason="/retire by an admin"))
    if entry is None:
        return
    await message.reply_text(texts.t("retired", lang, version=entry.version_id,
                                     active=entry.previous_active or "–"), do_quote=False)


# Telegram bots may upload documents up to 50 MB.
MAX_UPLOAD_BYTES = 49 * 1024 * 1024


@admin_only
async def export(update: Update, context: BotContext, message: Message,
                 service: Service, lang: str) -> None:
    """/export: every vote as CSV; /export events: the running tests as the event log
    ``loopbot replay`` reads."""
    if (context.args or [""])[0].lower() == "events":
        await _export_events(message, service, lang)
        return
    data, rows = await service.export_votes_csv()
    if rows <= 0:
        await message.reply_text(texts.t("no_votes", lang), do_quote=False)
        return
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    name = f"loopbot-votes-{stamp}.csv"
    if len(data) > MAX_UPLOAD_BYTES:
        data, name = await asyncio.to_thread(gzip.compress, data), name + ".gz"
    if len(data) > MAX_UPLOAD_BYTES:
        await message.reply_text(texts.t("export_too_large", lang,
                                         mb=f"{len(data) / 1e6:.0f}"), do_quote=False)
        return
    await message.reply_document(InputFile(data, filename=name),
                                 caption=texts.t("export_caption", lang, n=rows), do_quote=False)


async def _export_events(message: Message, service: Service, lang: str) -> None:
    events = await experiment.replay_events(service.store.db, service.versions,
                                            service.settings.experiment, time.time())
    if not events:
        await message.reply_text(texts.t("no_test_running", lang), do_quote=False)
        return
    lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events)
    data = await asyncio.to_thread(gzip.compress, lines.encode("utf-8"))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    await message.reply_document(InputFile(data, filename=f"loopbot-events-{stamp}.jsonl.gz"),
                                 caption=texts.t("events_caption", lang, n=len(events)),
                                 do_quote=False)


@admin_only
async def report(update: Update, context: BotContext, message: Message,
                 service: Service, lang: str) -> None:
    """The prompt improvement report: error patterns with counts and examples."""
    result = await learning.build_report(service.store.db, service.settings)
    for part in learning_texts.report_messages(result):
        await message.reply_text(part, do_quote=False)


@admin_only
async def approve(update: Update, context: BotContext, message: Message,
                  service: Service, lang: str) -> None:
    """``/approve ID``: a mined candidate that passed its offline check goes to canary."""
    if not context.args:
        await message.reply_text(learning_texts.approve_usage(), do_quote=False)
        return
    from bot.prompts import PromptError

    try:
        entry = await learning.approve(service, context.args[0], actor=_actor(update))
    except (learning.ApprovalError, versions.VersionError, PromptError) as exc:
        await message.reply_text(learning_texts.approve_error_text(exc), do_quote=False)
        return
    await message.reply_text(learning_texts.approved_text(entry), do_quote=False)
