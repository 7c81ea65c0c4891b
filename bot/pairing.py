"""The paired comparison's labels: each voted verdict of a test, scored by the other prompt too.

The votes say whether the verdict of the arm's own prompt was right. If the same text is also
scored by the other arm's prompt (the candidate's for a verdict of the active version, the
active one's for a candidate's verdict), each vote says something about both prompts on the
same text, which who votes cannot bias (:class:`analytics.decide.PairedVotes`). The
scheduled experiment job calls :func:`score_pending` right before the analysis, so the hours
the analysis closes have their labels; :mod:`bot.experiment` counts them.

- Scored: verdicts of either arm made since the test started that have a stored text and at
  least one vote, and no label yet from the other arm's prompt (table ``paired_labels``).
  Versions whose labels do not correspond (:func:`bot.prompts.label_correspondence`) are
  not scored: their test is decided on votes alone.
- Through the runtime's own ``classify`` (label scoring on the model worker, never on the
  event loop), at background priority when the runtime has one: users' verdicts and replies
  go first. Each row keeps the scorer the runtime reports. Only verdicts made by that scorer
  are scored: a label from another model file or server would measure the scorer, not the
  prompt, and is not counted (:meth:`bot.experiment.Pairing.other_labels`). The runtime's
  scorer is learnt from the run's first label, on the oldest pending verdict: a run spends
  at most one verdict of another scorer on learning it, and stores nothing for it.
- Bounded per run (:data:`MAX_TEXTS_PER_RUN`, :data:`MAX_SECONDS_PER_RUN`), oldest first, so
  a backlog is worked off over the next runs instead of holding a decision up; the texts a
  run takes are scored one prompt after the other (a prompt's prefix stays evaluated).
- A text that fails is logged and skipped (the next run tries it again); a full queue or
  unreachable servers, or :data:`MAX_FAILURES_IN_A_ROW` failures in a row, end this run's
  scoring (every other text would fail the same way).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

from analytics.decide import DecisionConfig
from bot import versions
from bot.experiment import experiment_start
from bot.llm.types import RuntimeBusy, Verdict
from bot.prompts import PromptVersion, label_correspondence
from bot.store import pairs
from bot.store.db import Database

log = logging.getLogger(__name__)

# Texts scored per job run, over all running tests. A verdict evaluates only the text on the
# prompt's cached prefix: ~0.1 s on Qwen1.5-0.5B on two cores (README, load benchmark), ~7 ms
# on the tiny test model, so 500 are under a minute of background work, far inside the job's
# lease, and an hourly job keeps up with 12,000 voted verdicts a day. A backlog (the
# comparison switched on during a long test, a database restored) is worked off oldest first
# over the next runs instead of stalling this run's decision.
MAX_TEXTS_PER_RUN = 500
# No new text is started after this long: with users to serve, a background verdict can wait
# (up to model.reply_timeout_s each), and the decision must not wait for all of them.
MAX_SECONDS_PER_RUN = 120.0
# Texts tried to learn the runtime's scorer before this run gives up.
PROBES = 3
# Failures in a row that end the run's scoring: the model fails on everything (a broken
# server, say), and 500 warnings an hour would say nothing more than the first few.
MAX_FAILURES_IN_A_ROW = 5


class PairClassifier(Protocol):
    """What scoring needs: the runtime's ``classify`` (or its background-priority form)."""

    async def classify(self, version: PromptVersion, text: str) -> Verdict: ...


def classifier_of(runtime: object) -> PairClassifier:
    """The runtime at background priority when it has one (the in-process runtime, the
    remote ones), else the runtime itself."""
    background = getattr(runtime, "background", None)
    return cast(PairClassifier, background() if callable(background) else runtime)


@dataclass(frozen=True)
class PairingRun:
    """What one run did: texts scored and stored, texts that failed, why it stopped early."""

    scored: int = 0
    failed: int = 0
    # None: every pending text (up to the bound) was tried.
    stopped: str | None = None


@dataclass
class _Run:
    classifier: PairClassifier
    limit: int
    deadline: float
    clock: Callable[[], float]
    left: int = 0
    scorer: str | None = None
    scored: int = 0
    failed: int = 0
    stopped: str | None = None
    failures_in_a_row: int = 0
    # Interactions that failed in this run: tried again at the next run, not in this one.
    tried: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.left = self.limit

    def done(self) -> bool:
        """Whether this run must not start another text (and then why, in ``stopped``)."""
        if self.stopped is None and self.left <= 0:
            self.stopped = f"the bound of {self.limit} texts a run; any rest at the next runs"
        if self.stopped is None and self.clock() >= self.deadline:
            self.stopped = "time budget; the rest at the next runs"
        return self.stopped is not None

    async def score(self, db: Database, pending: pairs.PendingText,
                    other: PromptVersion) -> bool:
        """Score one text with ``other``'s prompt and store it; False when it failed."""
        if pending.interaction_id in self.tried:
            return False
        self.tried.add(pending.interaction_id)
        self.left -= 1
        try:
            verdict = await self.classifier.classify(other, pending.text)
        except RuntimeBusy as exc:
            self.failed += 1
            self.stopped = f"runtime busy ({exc})"
            log.warning("paired comparison: the model is busy (%s); the rest waits for the "
                        "next run", exc)
            return False
        except Exception as exc:
            self.failed += 1
            self.failures_in_a_row += 1
            log.warning("paired comparison: interaction %d not scored by %s: %s",
                        pending.interaction_id, other.id, exc)
            if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                self.stopped = f"{self.failures_in_a_row} texts in a row failed"
            return False
        self.failures_in_a_row = 0
        if self.scorer is None:
            self.scorer = verdict.scorer
        if verdict.scorer != pending.scorer:
            return True  # the verdict came from another scorer: this label would not count
        if await pairs.store_paired_label(db, pending, other.id, verdict.label,
                                          verdict.scorer, time.time()):
            self.scored += 1
        return True


async def score_pending(
    db: Database, classifier: PairClassifier, prompt_versions: Mapping[str, PromptVersion],
    config: DecisionConfig, *, now: float, limit: int = MAX_TEXTS_PER_RUN,
    budget_s: float = MAX_SECONDS_PER_RUN, clock: Callable[[], float] = time.monotonic,
) -> PairingRun:
    """Score the running tests' voted verdicts that the other arm's prompt has not scored
    (see the module docstring); at most ``limit`` texts, none started after ``budget_s``."""
    if not config.paired_comparison:
        return PairingRun()
    deployment = await versions.load(db)
    active = deployment.active
    if active is None:
        return PairingRun()
    run = _Run(classifier, limit, clock() + budget_s, clock)
    for candidate in deployment.candidates:
        a = prompt_versions.get(active.version_id)
        b = prompt_versions.get(candidate.version_id)
        if (a is None or b is None or label_correspondence(a, b) is None
                or label_correspondence(b, a) is None):
            continue
        if run.done():
            break
        await _score_test(db, run, a, b, experiment_start(candidate, active), now)
    run.done()  # notes whether the bound cut the run short
    if run.scored or run.failed:
        log.info("paired comparison: %d verdicts scored by the other arm's prompt, %d failed%s",
                 run.scored, run.failed, f" (stopped: {run.stopped})" if run.stopped else "")
    return PairingRun(run.scored, run.failed, run.stopped)


async def _score_test(db: Database, run: _Run, a: PromptVersion, b: PromptVersion,
                      start: float, now: float) -> None:
    other = {a.id: b, b.id: a}
    if run.scorer is None:
        # The runtime's scorer is known from its first label: the oldest pending verdicts
        # until one is scored (stored when that scorer made the verdict).
        for pending in await pairs.pending_texts(db, a.id, b.id, start, now,
                                                 limit=min(PROBES, run.left)):
            if run.done():
                return
            await run.score(db, pending, other[pending.version_id])
            if run.scorer is not None:
                break
        if run.scorer is None:
            return
    batch = await pairs.pending_texts(db, a.id, b.id, start, now, limit=run.left,
                                      scorer=run.scorer)
    # The oldest texts, those the candidate's prompt scores first, then the active one's
    # (each in time order): the runtime keeps a prompt's prefix evaluated, and switching
    # prompts at every text could evict and rebuild it every time.
    for pending in sorted(batch, key=lambda p: p.version_id != a.id):
        if run.done():
            return
        await run.score(db, pending, other[pending.version_id])
