"""The message pipeline, independent of any transport: the Telegram bot and the console use it.

route the user to a prompt version -> verdict from the model -> interaction stored -> reply;
votes and reactions come back through :meth:`Service.record_vote` / :meth:`record_reaction`.
No Telegram types in here: callers pass plain ids and texts.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from analytics.stats import AccuracySummary, accuracy_summary
from bot import routing, versions
from bot.config import Settings, prompts_directory
from bot.llm.types import ChatTurn, InferenceError, Reply, Verdict
from bot.metrics_sink import NO_METRICS, MetricsSink
from bot.prompts import PromptError, PromptVersion, load_directory
from bot.store.outbox import Outgoing
from bot.store.queries import (
    AccuracyPoint,
    ForgetResult,
    Interaction,
    NewInteraction,
    Reaction,
    Store,
    UserForgotten,
    Vote,
)

log = logging.getLogger(__name__)
# How often a process looks in the prompts folder for a version the database serves and it
# has not loaded (another replica's mined candidate).
RELOAD_EVERY_S = 10.0


class InferenceRuntime(Protocol):
    """What the pipeline needs from :class:`bot.llm.runtime.ModelRuntime` (or the remote
    runtimes of :mod:`bot.llm.remote.runtime`); ``session`` is the chat, so that a remote
    runtime sends one chat's requests to the same server (its prompt cache)."""

    async def classify(self, version: PromptVersion, text: str, *,
                       timeout: float | None = None, session: str | None = None) -> Verdict: ...

    async def reply(self, version: PromptVersion, history: Sequence[ChatTurn], text: str, *,
                    timeout: float | None = None,
                    on_text: Callable[[str], None] | None = None,
                    session: str | None = None) -> Reply: ...


class UserRateLimiter:
    """At most ``limit`` messages per user in any ``window_s`` seconds (sliding window)."""

    def __init__(self, limit: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[int, deque[float]] = {}
        self._warned: dict[int, float] = {}

    def allow(self, user_id: int) -> bool:
        if self.limit <= 0:
            return True
        now = self._clock()
        times = self._seen.setdefault(user_id, deque())
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if len(times) >= self.limit:
            return False
        times.append(now)
        if len(self._seen) > 10_000:
            # Forget idle users so the map cannot grow without end.
            self._seen = {u: t for u, t in self._seen.items() if t and now - t[-1] < self.window_s}
            self._warned = {u: t for u, t in self._warned.items() if now - t < self.window_s}
        return True

    def warn_once(self, user_id: int) -> bool:
        """Whether a refused user should be told now: once per window, so that a flood of
        messages does not become a flood of notices."""
        now = self._clock()
        last = self._warned.get(user_id)
        if last is not None and now - last < self.window_s:
            return False
        self._warned[user_id] = now
        return True


class UserLocks:
    """One asyncio lock per user, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, user_id: int) -> AsyncIterator[None]:
        lock, users = self._locks.get(user_id, (asyncio.Lock(), 0))
        self._locks[user_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[user_id]
            if users == 1:
                del self._locks[user_id]
            else:
                self._locks[user_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


@dataclass(frozen=True)
class IncomingText:
    chat_id: int
    user_id: int
    message_id: int
    text: str
    chat_type: str = "private"
    update_id: int | None = None


@dataclass(frozen=True)
class Classified:
    interaction: Interaction
    version: PromptVersion
    verdict: Verdict | None
    # The same chat message was handled before (a redelivered update): send nothing again.
    duplicate: bool
    # The text was longer than telegram.max_message_chars and was cut.
    truncated: bool = False


# Users a day from which /canary refuses a share that would reach less than one of them.
MIN_USERS_TO_JUDGE_A_SHARE = 10
# How long a verdict may be clicked before its message id is noted (the send in between).
PENDING_VERDICT_S = 120.0
CORRECT = "correct"
WRONG = "wrong"


@dataclass(frozen=True)
class VoteOutcome:
    """``ok`` False: the callback named no verdict this user may vote on (forged or stale)."""

    ok: bool
    interaction: Interaction | None = None
    vote: Vote | None = None
    # A "wrong" vote with more than two labels: offer the other labels.
    ask_label: bool = False
    reason: str = ""


@dataclass(frozen=True)
class VersionReport:
    version_id: str
    state: str  # active | candidate | retired | unserved
    share: float
    verdicts: int
    accuracy: AccuracySummary
    reactions_positive: int
    reactions_negative: int
    mean_latency_ms: float | None


EXPORT_COLUMNS = (
    "interaction_id", "interaction_at", "vote_at", "chat_id", "author_id", "voter_id",
    "version_id", "arm", "label", "confidence", "correct", "correct_label", "text",
)


def reaction_polarity(emojis: Sequence[str], positive: Sequence[str],
                      negative: Sequence[str]) -> int:
    """-1 if any emoji counts as bad, +1 if any counts as good, else 0 (a bad one wins:
    a complaint is the rarer, more informative signal)."""
    def norm(e: str) -> str:
        return e.replace("\ufe0f", "")
    pos = {norm(e) for e in positive}
    neg = {norm(e) for e in negative}
    found = {norm(e) for e in emojis}
    if found & neg:
        return -1
    if found & pos:
        return 1
    return 0


class Service:
    def __init__(self, settings: Settings, store: Store, runtime: InferenceRuntime,
                 prompt_versions: Mapping[str, PromptVersion], *,
                 metrics: MetricsSink = NO_METRICS) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.runtime = runtime
        self.versions = dict(prompt_versions)
        tg = settings.telegram
        # With several replicas behind a load balancer a user's messages are spread over
        # them: each one allows its share of the limit.
        self.rate_limiter = UserRateLimiter(max(1, -(-tg.user_rate_limit // tg.replicas)),
                                            tg.user_rate_window_s)
        # A message is stored seconds after it arrives (the model runs in between); /forget
        # waits for the user's messages in flight so that none is stored after it.
        self.user_locks = UserLocks()
        self._last_reload = -RELOAD_EVERY_S

    async def start(self) -> str:
        """Make sure a version is active and tests of edited prompt files restart; returns
        the active version's id."""
        active = await versions.ensure_active(
            self.store.db, self.versions, self.settings.prompts.default_version)
        if active not in self.versions:
            raise versions.VersionError(
                f"the database's active version '{active}' has no file in "
                f"{self.settings.prompts.directory}/: restore it or /promote another version")
        for entry in await versions.restart_edited(self.store.db, self.versions):
            log.warning("test of %s restarted: %s", entry.version_id, entry.reason)
        return active

    # --- the message pipeline -----------------------------------------------------------

    def allow(self, user_id: int) -> bool:
        return self.rate_limiter.allow(user_id)

    def warn_once(self, user_id: int) -> bool:
        return self.rate_limiter.warn_once(user_id)

    async def load_new_versions(self, state: versions.Deployment | None = None) -> list[str]:
        """Load the prompt files of versions the database serves but this process has not
        loaded: with several replicas, a candidate mined (or approved) on one of them is
        written to the shared prompts folder and put in canary there; the others load it
        here, before they route or decide. Returns the ids loaded."""
        state = state or await versions.load(self.store.db)
        wanted = [s.version_id for s in (state.active, *state.candidates) if s is not None]
        missing = [v for v in wanted if v not in self.versions]
        now = time.monotonic()
        if not missing or now - self._last_reload < RELOAD_EVERY_S:
            return []
        self._last_reload = now
        try:
            found = await asyncio.to_thread(load_directory,
                                            prompts_directory(self.settings))
        except PromptError as exc:
            log.warning("prompt folder unreadable while looking for %s: %s", missing, exc)
            return []
        loaded = [v for v in missing if v in found]
        for version_id in loaded:
            self.versions[version_id] = found[version_id]
            log.info("prompt version %s loaded (served by the database, written by another "
                     "replica)", version_id)
        return loaded

    async def route(self, user_id: int) -> tuple[PromptVersion, routing.Assignment]:
        state = await versions.load(self.store.db)
        if state.active is None:
            raise versions.VersionError("no active version: the service was not started")
        if state.active.version_id not in self.versions or any(
                c.version_id not in self.versions for c in state.candidates):
            await self.load_new_versions(state)
        if state.active.version_id not in self.versions:
            raise versions.VersionError(
                f"the active version '{state.active.version_id}' has no file in "
                f"{self.settings.prompts.directory}/")
        # A candidate whose file disappeared cannot be served; its users get the active one.
        slices = [s for s in state.slices() if s.version_id in self.versions]
        assignment = routing.assign(user_id, self.settings.prompts.routing_salt,
                                    state.active.version_id, slices)
        return self.versions[assignment.version_id], assignment

    def version_of(self, interaction: Interaction) -> PromptVersion:
        version = self.versions.get(interaction.version_id)
        if version is None:
            raise InferenceError(f"prompt version {interaction.version_id} is gone")
        return version

    async def classify(
        self, msg: IncomingText, *, with_verdict: bool = True,
        outgoing: Callable[[Interaction, Verdict | None], Sequence[Outgoing]] | None = None,
    ) -> Classified | None:
        """Verdict for a new message, stored before it is shown, together with what
        ``outgoing`` says must be sent about it. A message seen before is returned as stored
        (``duplicate``) without running the model again. None: the user asked to be
        forgotten after sending it (Telegram's order), so nothing of it is kept."""
        async with self.user_locks.hold(msg.user_id):
            if await self._forgotten(msg.user_id, msg.update_id):
                return None
            try:
                return await self._classify(msg, with_verdict=with_verdict, outgoing=outgoing)
            except UserForgotten:  # forgotten meanwhile, e.g. on another replica
                return None

    async def _forgotten(self, user_id: int, update_id: int | None) -> bool:
        """Whether an update was sent before its sender's /forget (a late arrival)."""
        before = await self.store.forgotten_before(user_id)
        return before is not None and update_id is not None and update_id < before

    async def _classify(
        self, msg: IncomingText, *, with_verdict: bool,
        outgoing: Callable[[Interaction, Verdict | None], Sequence[Outgoing]] | None,
    ) -> Classified:
        existing = await self.store.find_interaction(msg.chat_id, msg.message_id)
        if existing is not None:
            return Classified(existing, self.version_of(existing), None, duplicate=True)
        limit = self.settings.telegram.max_message_chars
        text = msg.text[:limit] if limit > 0 else msg.text
        version, assignment = await self.route(msg.user_id)
        self.metrics.count_message()
        verdict = (await self.runtime.classify(version, text, session=str(msg.chat_id))
                   if with_verdict else None)
        if verdict is not None:
            self.metrics.observe_verdict(verdict.latency_ms / 1000.0)
        interaction, created = await self.store.insert_interaction(NewInteraction(
            chat_id=msg.chat_id, user_id=msg.user_id, message_id=msg.message_id, text=text,
            version_id=version.id, arm=assignment.arm, bucket=assignment.bucket,
            chat_type=msg.chat_type, update_id=msg.update_id,
            content_hash=version.content_hash,
            label=verdict.label if verdict else None,
            probabilities=dict(verdict.probabilities) if verdict else None,
            verdict_latency_ms=verdict.latency_ms if verdict else None,
            scorer=(verdict.scorer or None) if verdict else None,
        ), outgoing=(lambda stored: outgoing(stored, verdict)) if outgoing else None)
        return Classified(interaction, version, verdict, duplicate=not created,
                          truncated=len(text) < len(msg.text))

    async def note_messages(self, interaction_id: int, chat_id: int, kind: str,
                            message_ids: Sequence[int]) -> None:
        """The bot's own messages for an interaction (``verdict`` or ``reply``)."""
        await self.store.add_bot_messages(interaction_id, chat_id, kind, message_ids)

    async def reply(self, interaction: Interaction, *,
                    on_text: Callable[[str], None] | None = None,
                    outgoing: Callable[[Reply], Sequence[Outgoing]] | None = None) -> Reply:
        """The chat reply, with the chat's last few turns as context; stored with the
        interaction together with what ``outgoing`` says must be sent of it."""
        version = self.version_of(interaction)
        turns = await self.store.recent_turns(interaction.chat_id, interaction.id,
                                              version.generation.history_turns)
        history: list[ChatTurn] = []
        for user_text, bot_text in turns:
            history += [ChatTurn("user", user_text), ChatTurn("assistant", bot_text)]
        reply = await self.runtime.reply(version, history, interaction.text or "",
                                         on_text=on_text, session=str(interaction.chat_id))
        if "\x00" in reply.text:
            # A model can emit U+0000; PostgreSQL cannot store it (the store writes U+FFFD):
            # what is sent and what is stored must be the same text.
            reply = dataclasses.replace(reply, text=reply.text.replace("\x00", "\ufffd"))
        self.metrics.observe_reply(reply.latency_ms / 1000.0)
        await self.store.set_reply(interaction.id, reply.text, reply.latency_ms,
                                   outgoing(reply) if outgoing else ())
        return reply

    # --- feedback -----------------------------------------------------------------------

    async def record_vote(self, interaction_id: int, user_id: int, choice: str | int, *,
                          chat_id: int, message_id: int,
                          update_id: int | None = None) -> VoteOutcome:
        """Store a vote (``"correct"``, ``"wrong"`` or the index of the right label). It is
        committed when this returns, so the caller may acknowledge the click afterwards.

        The interaction must exist, carry a verdict, have been shown in this very chat
        message, and be one the voter could see (in a private chat, only its user):
        callback data is never trusted on its own. A vote sent before the voter's /forget is
        refused; the same per-user lock as /forget orders the two."""
        async with self.user_locks.hold(user_id):
            if await self._forgotten(user_id, update_id):
                return VoteOutcome(False, reason="sent before the voter's /forget")
            try:
                return await self._record_vote(interaction_id, user_id, choice,
                                               chat_id=chat_id, message_id=message_id,
                                               update_id=update_id)
            except UserForgotten:  # forgotten meanwhile, e.g. on another replica
                return VoteOutcome(False, reason="sent before the voter's /forget")

    async def _record_vote(self, interaction_id: int, user_id: int, choice: str | int, *,
                           chat_id: int, message_id: int,
                           update_id: int | None) -> VoteOutcome:
        interaction = await self.store.get_interaction(interaction_id)
        if interaction is None:
            return VoteOutcome(False, reason="unknown interaction")
        if interaction.chat_id != chat_id or interaction.label is None:
            return VoteOutcome(False, reason="not a verdict of this chat")
        if interaction.chat_type == "private" and user_id != interaction.user_id:
            return VoteOutcome(False, reason="not the user of this private chat")
        # The id is NULL only in the instant between sending the verdict and noting its id.
        if interaction.verdict_message_id not in (None, message_id):
            return VoteOutcome(False, reason="verdict shown in another message")
        if interaction.verdict_message_id is None and (
                time.time() - interaction.created_at > PENDING_VERDICT_S):
            # Its message id was never noted (sending failed): nothing can be checked.
            return VoteOutcome(False, reason="verdict message unknown")
        labels = interaction.labels
        ask_label = False
        if choice == CORRECT:
            correct, correct_label = True, None
        elif choice == WRONG:
            correct, correct_label = False, None
            ask_label = len(labels) > 2
            if len(labels) == 2:
                # With two labels "wrong" names the right one.
                correct_label = next(lb for lb in labels if lb != interaction.label)
        elif isinstance(choice, int) and 0 <= choice < len(labels):
            correct_label = labels[choice]
            correct = correct_label == interaction.label
            correct_label = None if correct else correct_label
        else:
            return VoteOutcome(False, interaction, reason=f"invalid choice {choice!r}")
        vote = await self.store.upsert_vote(interaction.id, user_id, correct=correct,
                                            correct_label=correct_label, update_id=update_id)
        if vote is None:
            return VoteOutcome(False, reason="the verdict was deleted (/forget)")
        if vote.created_at == vote.updated_at:  # a first vote, not a changed one
            self.metrics.count_vote(interaction.version_id, correct)
        return VoteOutcome(True, interaction, vote, ask_label=ask_label)

    async def record_reaction(self, chat_id: int, message_id: int, user_id: int,
                              emojis: Sequence[str], *,
                              update_id: int | None = None) -> Reaction | None:
        """A user's current reactions on a bot message; ``None`` when the message is not one
        of ours, the reactions were removed, the user could not see it (another user's
        private chat) or sent it before their /forget."""
        async with self.user_locks.hold(user_id):
            if await self._forgotten(user_id, update_id):
                return None
            found = await self.store.find_bot_message(chat_id, message_id)
            if found is None:
                return None
            try:
                return await self._record_reaction(found, chat_id, message_id, user_id, emojis,
                                                   update_id=update_id)
            except UserForgotten:  # forgotten meanwhile, e.g. on another replica
                return None

    async def _record_reaction(self, found: tuple[int, str], chat_id: int, message_id: int,
                               user_id: int, emojis: Sequence[str], *,
                               update_id: int | None = None) -> Reaction | None:
        interaction_id, kind = found
        interaction = await self.store.get_interaction(interaction_id)
        if interaction is None or (interaction.chat_type == "private"
                                   and interaction.user_id != user_id):
            return None
        tg = self.settings.telegram
        polarity = reaction_polarity(emojis, tg.positive_reactions, tg.negative_reactions)
        return await self.store.set_reaction(interaction_id, chat_id, message_id, user_id, kind,
                                             emojis, polarity, update_id=update_id)

    # --- reports ------------------------------------------------------------------------

    async def stats(self) -> list[VersionReport]:
        """Per version, active first, then candidates, then the rest."""
        counts = {c.version_id: c for c in await self.store.version_counts()}
        state = await versions.load(self.store.db)
        order: list[tuple[str, str, float]] = []
        if state.active is not None:
            order.append((state.active.version_id, versions.ACTIVE, 0.0))
        order += [(c.version_id, versions.CANDIDATE, c.share) for c in state.candidates]
        order += [(r.version_id, versions.RETIRED, 0.0) for r in state.retired]
        seen = {vid for vid, _, _ in order}
        order += [(vid, "unserved", 0.0) for vid in counts if vid not in seen]
        reports = []
        for vid, status, share in order:
            c = counts.get(vid)
            if c is None and status == versions.RETIRED:
                continue
            reports.append(VersionReport(
                version_id=vid, state=status, share=share, verdicts=c.verdicts if c else 0,
                accuracy=accuracy_summary(c.votes if c else 0, c.correct if c else 0),
                reactions_positive=c.reactions_positive if c else 0,
                reactions_negative=c.reactions_negative if c else 0,
                mean_latency_ms=c.mean_latency_ms if c else None,
            ))
        return reports

    async def accuracy_series(self, period_s: float = 3600.0) -> list[AccuracyPoint]:
        return await self.store.accuracy_series(period_s)

    async def export_votes_csv(self) -> tuple[bytes, int]:
        """Every vote with its verdict as CSV, and the number of votes."""
        rows = await self.store.export_votes()
        return await asyncio.to_thread(_votes_csv, rows), len(rows)

    async def forget_user(self, user_id: int, *, update_id: int | None = None) -> ForgetResult:
        """Delete what the user sent and gave. ``update_id`` is the /forget's own update:
        feedback the user sent before it is refused when it arrives later."""
        async with self.user_locks.hold(user_id):
            result = await self.store.forget_user(
                user_id, before_update_id=update_id or 0)
        log.info("user %s forgotten: %s", user_id, result)
        return result

    # --- version state (admin commands; bot.versions writes) ----------------------------

    async def _audit_stats(self, *version_ids: str | None) -> dict[str, Any]:
        wanted = {v for v in version_ids if v}
        return {
            r.version_id: {"verdicts": r.verdicts, "votes": r.accuracy.votes,
                           "correct": r.accuracy.correct}
            for r in await self.stats() if r.version_id in wanted
        }

    async def promote(self, version_id: str, *, actor: str, reason: str
                      ) -> versions.AuditEntry:
        state = await versions.load(self.store.db)
        stats = await self._audit_stats(version_id,
                                        state.active.version_id if state.active else None)
        entry = await versions.promote(self.store.db, version_id, self.versions, actor=actor,
                                       reason=reason, stats=stats)
        self.metrics.count_decision(entry.action)
        return entry

    async def rollback(self, *, actor: str, reason: str) -> versions.AuditEntry:
        state = await versions.load(self.store.db)
        active = state.active
        stats = await self._audit_stats(active.version_id if active else None,
                                        active.replaced if active else None)
        entry = await versions.rollback(self.store.db, self.versions, actor=actor,
                                        reason=reason, stats=stats)
        self.metrics.count_decision(entry.action)
        return entry

    async def set_canary(self, version_id: str, percent: float, *, actor: str, reason: str
                         ) -> versions.AuditEntry:
        await self._check_canary_reaches_someone(percent)
        stats = await self._audit_stats(version_id)
        entry = await versions.set_canary(self.store.db, version_id, percent, self.versions,
                                          actor=actor, reason=reason, stats=stats)
        self.metrics.count_decision(entry.action)
        return entry

    async def _check_canary_reaches_someone(self, percent: float) -> None:
        """A share too small to serve anyone in a day at the current traffic starts a test
        that can never decide: refuse it and say what would work."""
        share = percent / 100.0
        if 0 < share < 1.0 / routing.BUCKETS:
            raise versions.VersionError(
                f"{percent:g}% is less than one routing bucket (1 in {routing.BUCKETS}): the "
                f"canary would serve nobody; use at least {100.0 / routing.BUCKETS:g}%")
        users = await self.store.users_since(time.time() - 86_400.0)
        # Below a handful of users a day the traffic says too little to forbid anything.
        if share > 0 and users >= MIN_USERS_TO_JUDGE_A_SHARE and share * users < 1.0:
            raise versions.VersionError(
                f"{percent:g}% of the {users} users who wrote in the last day is less than one "
                f"user a day: the test would serve nobody; use at least "
                f"{min(100.0, 100.0 / users):.2g}%")

    async def retire(self, version_id: str, *, actor: str, reason: str) -> versions.AuditEntry:
        stats = await self._audit_stats(version_id)
        entry = await versions.retire(self.store.db, version_id, actor=actor, reason=reason,
                                      stats=stats)
        self.metrics.count_decision(entry.action)
        return entry


def _votes_csv(rows: Sequence[Any]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(EXPORT_COLUMNS)
    for v in rows:
        writer.writerow([
            v.interaction_id, _iso(v.interaction_at), _iso(v.vote_at), v.chat_id, v.user_id,
            v.voter_id, v.version_id, v.arm, _cell(v.label or ""),
            "" if v.confidence is None else f"{v.confidence:.4f}", int(v.correct),
            _cell(v.correct_label or ""), _cell(v.text or ""),
        ])
    # A BOM so spreadsheet programs open the Chinese texts as UTF-8.
    return ("\ufeff" + out.getvalue()).encode("utf-8")


def _cell(text: str) -> str:
    """User text made inert for spreadsheets: a cell starting with = + - @ (or a tab or
    carriage return before one) is read as a formula, and HYPERLINK can send data out."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
