"""The admins' texts of the decision engine: why a look decided what it did, what it will do
next, and the message the scheduled job sends.

:mod:`analytics.decide` returns the decision as data (an action, the rule that chose it and
the numbers); everything a person reads about it is written here, from that data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from analytics.decide import (
    UNRECORDED_SCORER,
    Action,
    Decision,
    DecisionConfig,
    DecisionStats,
    ExperimentSnapshot,
    Rule,
)


def pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f}%"


def _e(value: float) -> str:
    return f"{value:.3g}"


def reason(decision: Decision, snapshot: ExperimentSnapshot, config: DecisionConfig) -> str:
    """One sentence: the rule that decided, with the numbers behind it."""
    rule, s = decision.rule, decision.stats
    if rule is Rule.RESTART:
        return (f"{snapshot.candidate_id} changed on disk: the test restarts from zero, "
                "because the evidence so far is about the old prompt")
    if rule is Rule.MISSING_FILE:
        return (f"{snapshot.candidate_id} has no prompt file here: it is not served and "
                f"cannot be analysed; /retire {snapshot.candidate_id} ends its test")
    if s is None:
        return "the test has no completed hour yet"
    return _REASONS.get(rule, _collecting)(snapshot, config, s)


def _arms(snap: ExperimentSnapshot, s: DecisionStats) -> str:
    return (f"{snap.active_id} {pct(s.accuracy_a)} of {s.votes_a} verdicts vs "
            f"{snap.candidate_id} {pct(s.accuracy_b)} of {s.votes_b}")


def _srm(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    return (f"sample-ratio mismatch: {pct(s.srm_observed_share)} of the new users of the two "
            f"arms went to {snap.candidate_id}, the plan expects {pct(s.srm_expected_share)} "
            f"(SRM e-value {s.srm_e:.3g} ≥ {s.srm_threshold:.0f}); test frozen for a person to "
            "check routing")


def _reactions(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    down = s.down_ratio if s.down_ratio is not None else math.nan
    how_much = ("while the active version's replies got none" if math.isinf(down)
                else f"{down:.2f}× the active version's")
    return (f"👎 on {snap.candidate_id}'s replies {how_much} (e-value {s.reactions_e:.3g}); "
            "reverting")


def _latency(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    return (f"{snap.candidate_id} is {s.latency_ratio or math.nan:.2f}× slower than "
            f"{snap.active_id} (limit {cfg.latency_max_ratio}×); reverting")


def _worse(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    return (f"candidate worse: E⁻ = {_e(s.e_minus)} ≥ {s.revert_threshold:.0f}; "
            f"{_arms(snap, s)}; reverting")


def _better(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    if s.paired_e is not None:
        return (f"candidate better on the same texts: paired E⁺ = {_e(s.paired_e)} ≥ "
                f"{s.promote_threshold:.0f} ({s.paired_scored or 0} of "
                f"{s.votes_a + s.votes_b} voted texts scored by both prompts), and the votes "
                f"agree (MH z = {s.mh_z:.2f}); {_arms(snap, s)}; promoting")
    return (f"candidate better: E⁺ = {_e(s.e_plus)} ≥ {s.promote_threshold:.0f}; "
            f"{_arms(snap, s)}; promoting")


def _horizon_mh(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    if s.paired_z is not None:
        return (f"{s.elapsed_hours} h horizon: paired z = {s.paired_z:.2f} ≥ "
                f"{s.horizon_z:.2f} on the same texts, the votes agree (MH z = "
                f"{s.mh_z:.2f}); {_arms(snap, s)}; promoting")
    return (f"{s.elapsed_hours} h horizon: stratified MH z = {s.mh_z:.2f} ≥ "
            f"{s.horizon_z:.2f}; {_arms(snap, s)}; promoting")


def _paired(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    verb = ("test frozen: neither promoted nor reverted" if s.hours_left <= 0
            else "holding")
    observations = s.votes_a + s.votes_b
    paired = (f"paired E⁺ = {_e(s.paired_e or 0.0)}, z = {s.paired_z or 0.0:.2f}, on "
              f"{s.paired_scored or 0} of {observations} voted texts scored by both prompts")
    if (s.paired_scored or 0) < 0.5 * observations:
        # Not a difference in who votes: the labels are missing.
        view = (f"most voted texts lack the other prompt's label ({paired}): the scheduled "
                "job scores them before each analysis (its log says why when it cannot), "
                "and until they have one the votes alone do not decide")
    elif s.mh_z <= 0:
        view = (f"on the same texts {snap.candidate_id} does better ({paired}) but accuracy "
                f"among voters points the other way (MH z = {s.mh_z:.2f}): who votes may "
                f"differ between the arms{_paired_rates(snap, s)}")
    elif (s.paired_z or 0.0) <= 0:
        view = (f"accuracy among voters finds {snap.candidate_id} better (E⁺ = "
                f"{_e(s.e_plus)}, MH z = {s.mh_z:.2f}) but on the same texts it is not "
                f"({paired}): who votes may differ between the arms{_paired_rates(snap, s)}")
    else:
        view = (f"accuracy among voters finds {snap.candidate_id} better (E⁺ = "
                f"{_e(s.e_plus)}, MH z = {s.mh_z:.2f}); on the same texts the evidence has "
                f"not reached its bar ({paired}, promote at {s.promote_threshold:.0f})"
                f"{_paired_rates(snap, s)}")
    return f"{view}; {_arms(snap, s)}; {verb}"


def _paired_rates(snap: ExperimentSnapshot, s: DecisionStats) -> str:
    """How readily each arm's right and wrong verdicts are voted on, measured on the texts
    both prompts get right (wrong): the paired comparison's direct view of who votes."""
    if s.paired_right_vote_ratio is None and s.paired_wrong_vote_ratio is None:
        return ""

    def ratio(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}×"

    return (f" ({snap.candidate_id}'s right verdicts are voted on "
            f"{ratio(s.paired_right_vote_ratio)} as often as {snap.active_id}'s, its wrong "
            f"ones {ratio(s.paired_wrong_vote_ratio)}, on texts both prompts get right or "
            "both get wrong)")


def _horizon_worse(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    return (f"{s.elapsed_hours} h horizon: stratified MH z = {s.mh_z:.2f} ≤ "
            f"−{s.horizon_revert_z:.2f}; {_arms(snap, s)}; reverting")


def _horizon_retire(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    # The week clears the bar but the hours after the first day do not: say so, or the
    # admins see a passing z and a retirement with no reason between them.
    early_only = (f", clearing {s.horizon_z:.2f}, but the hours after the first "
                  f"{math.ceil(cfg.min_promotion_hours)} h alone give z = {s.settled_z:.2f} "
                  f"(needs {cfg.settled_min_z:g}): the gain did not last"
                  if cfg.horizon_fallback and s.mh_z >= s.horizon_z
                  and s.settled_z < cfg.settled_min_z else "")
    return (f"no decision after {s.elapsed_hours} h (E⁺ = {_e(s.e_plus)}, E⁻ = "
            f"{_e(s.e_minus)}, MH z = {s.mh_z:.2f}{early_only}); {_arms(snap, s)}; keeping "
            f"{snap.active_id}, retiring {snap.candidate_id}")


def _stale(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    return f"no votes for {cfg.stale_hours:g} h: holding until data flows again"


def _selection(snap: ExperimentSnapshot, s: DecisionStats) -> str:
    """How differently the arms' voters pick right and wrong verdicts, with the numbers."""
    ratio = s.vote_rate_ratio if s.vote_rate_ratio is not None else math.nan
    if s.propensity_ratio >= 1:
        way, factor = "right", s.propensity_ratio
    else:
        way, factor = "wrong", 1.0 / max(s.propensity_ratio, 1e-300)
    rates = (f"{snap.candidate_id}'s verdicts are voted on {ratio:.2f}× as often as "
             f"{snap.active_id}'s (e-value {s.parity_e:.3g}, enough to fake or hide "
             f"{100 * s.propensity_bias:.1f} accuracy points among voters)")
    rates += _paired_rates(snap, s)
    if s.propensity_z == 0:  # the confidence bands do not determine it (yet)
        return rates
    other = "wrong" if way == "right" else "right"
    return (f"{rates}; how much more readily its {way} verdicts are voted on than its "
            f"{other} ones is {factor:.2f}× what it is for {snap.active_id} "
            f"(z = {abs(s.propensity_z):.2f}, from the confidence bands and the confidence of "
            f"all served verdicts){_share_of_effect(s)}")


def _share_of_effect(s: DecisionStats) -> str:
    """How much of the voters' apparent effect the selection estimate accounts for, when
    both point the same way (compared with ``propensity_share`` by the holds)."""
    if not (s.mh_odds_ratio > 0 and s.propensity_ratio > 0):
        return ""
    effect, selection = math.log(s.mh_odds_ratio), math.log(s.propensity_ratio)
    if effect == 0 or selection / effect <= 0:
        return ""
    return (f", enough to account for {min(100 * selection / effect, 999):.0f}% of the "
            "difference among voters")


def _parity(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    return (f"vote behaviour may differ between the arms: {_selection(snap, s)}; holding: "
            f"the accuracy among voters may be biased by who votes; {_arms(snap, s)}")


def _propensity(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    return (f"vote behaviour differs between the arms: {_selection(snap, s)}; "
            f"{_arms(snap, s)}; test frozen: neither promoted nor reverted")


def _scored_by(version_id: str, scorers: Mapping[str, int]) -> str:
    """Which scorer(s) scored an arm's verdicts with feedback (several: each with its count)."""
    ranked = sorted(((n, name) for name, n in scorers.items() if n > 0),
                    key=lambda item: (-item[0], item[1]))
    total = sum(n for n, _ in ranked)
    if not ranked:
        return f"{version_id} has no verdict with feedback yet"
    if len(ranked) == 1:
        return f"{version_id}'s {total} verdicts with feedback were scored by {ranked[0][1]}"
    named = [f"{name} ({n})" for n, name in ranked]
    return (f"{version_id}'s {total} verdicts with feedback were scored by "
            f"{', '.join(named[:-1])} and {named[-1]}")


def _scorer_mismatch(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    a, b = snap.active_id, snap.candidate_id
    legacy = (f". \"{UNRECORDED_SCORER}\": verdicts stored before loopbot recorded scorers"
              if UNRECORDED_SCORER in {*snap.scorers_a, *snap.scorers_b} else "")
    return (f"the arms were not scored by the same scorer: {_scored_by(a, snap.scorers_a)}; "
            f"{_scored_by(b, snap.scorers_b)}{legacy}. Verdict probabilities from different "
            "scorers (model files or inference servers) are not comparable, so the test is "
            "held: neither promoted nor reverted. Make every verdict come from one scorer "
            "(the same model file in every process, the same model on every inference "
            f"server), then /retire {b} and /canary {b} <percent> to start a fresh test")


def _fading(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    recent = (f"; the last {cfg.persistence_hours:g} h alone give z = {s.recent_z:.2f} "
              f"(needs {cfg.persistence_min_z:g})" if cfg.persistence_hours > 0 else "")
    return (f"E⁺ = {_e(s.e_plus)} clears the bar, but the hours after the first "
            f"{math.ceil(cfg.min_promotion_hours)} h alone give e = {_e(s.settled_e)} (needs "
            f"{cfg.settled_min_e:g}){recent}: holding, the advantage may have faded or not "
            f"yet shown that it lasts; {_arms(snap, s)}")


def _min_votes(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    return (f"E⁺ = {_e(s.e_plus)} clears the bar but an arm has fewer than "
            f"{s.min_votes:.0f} observations; {_arms(snap, s)}")


def _ramp(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    return (f"smoke period passed without harm; raising {snap.candidate_id} from "
            f"{pct(snap.planned_share)} to {pct(s.target_share)}")


def _collecting(snap: ExperimentSnapshot, cfg: DecisionConfig, s: DecisionStats) -> str:
    paired = "" if s.paired_e is None else f", paired E⁺ = {_e(s.paired_e)}"
    return (f"collecting: E⁺ = {_e(s.e_plus)}, E⁻ = {_e(s.e_minus)}{paired}; "
            f"{_arms(snap, s)}; {s.hours_left:.0f} h left")


_REASONS = {
    Rule.SRM: _srm, Rule.REACTIONS: _reactions, Rule.LATENCY: _latency,
    Rule.EVIDENCE_WORSE: _worse, Rule.EVIDENCE_BETTER: _better, Rule.HORIZON_MH: _horizon_mh,
    Rule.HORIZON_WORSE: _horizon_worse, Rule.HORIZON_RETIRE: _horizon_retire,
    Rule.STALE: _stale, Rule.PARITY: _parity, Rule.MIN_VOTES: _min_votes, Rule.RAMP: _ramp,
    Rule.PROPENSITY: _propensity, Rule.FADING: _fading, Rule.SCORER_MISMATCH: _scorer_mismatch,
    Rule.PAIRED: _paired,
}


def next_step(decision: Decision, reason_text: str) -> str:
    """One line for ``/stats``: what the engine does now or needs before it acts."""
    s = decision.stats
    if decision.restart:
        return "test restarts (the candidate's file changed)"
    if decision.action is not Action.HOLD:
        return f"{decision.action}: {reason_text}"
    if decision.rule is Rule.COLLECTING and s is not None:
        # With the paired comparison, promotions are decided on its evidence.
        e_up = s.paired_e if s.paired_e is not None else s.e_plus
        need_up = s.promote_threshold / max(e_up, 1e-300)
        need_down = s.revert_threshold / max(s.e_minus, 1e-300)
        return (f"holding: promotion needs {need_up:.3g}× more evidence, revert "
                f"{need_down:.3g}×; at most {s.hours_left:.0f} h until the horizon")
    return f"holding: {reason_text}"


def arm_lines(snapshot: ExperimentSnapshot, decision: Decision) -> list[str]:
    """Per arm: capped votes, accuracy with its 95% interval; then E⁺/E⁻ and their bars."""
    s = decision.stats
    if s is None:
        return []
    lines = []
    for vid, votes, correct, accuracy, (low, high) in (
            (snapshot.active_id, s.votes_a, s.correct_a, s.accuracy_a, s.interval_a),
            (snapshot.candidate_id, s.votes_b, s.correct_b, s.accuracy_b, s.interval_b)):
        interval = "" if accuracy is None else f" (95% CI {pct(low)}–{pct(high)})"
        lines.append(f"{vid}: {votes} verdicts with feedback, {correct} correct, "
                     f"accuracy {pct(accuracy)}{interval}")
    lines.append(f"evidence for the candidate E⁺ = {s.e_plus:.3g} (promote at "
                 f"{s.promote_threshold:.0f}), against E⁻ = {s.e_minus:.3g} (revert at "
                 f"{s.revert_threshold:.0f}); {s.elapsed_hours} h of "
                 f"{s.elapsed_hours + s.hours_left:.0f}, share {pct(s.planned_share)}")
    if s.paired_e is not None:
        disagree = ("" if s.paired_disagreement is None else
                    f"; the prompts disagree on {pct(s.paired_disagreement)} of the texts "
                    "voted right")
        lines.append(f"on the same texts ({s.paired_scored or 0} voted texts scored by both "
                     f"prompts): paired E⁺ = {s.paired_e:.3g} (promote at "
                     f"{s.promote_threshold:.0f}), z = "
                     f"{s.paired_z if s.paired_z is not None else math.nan:.2f}{disagree}")
    return lines


def stats_lines(candidate_id: str, active_id: str, snapshot: ExperimentSnapshot | None,
                decision: Decision, reason_text: str) -> list[str]:
    """The ``/stats`` block of one running experiment: arms, evidence, the next step."""
    head = f"🧪 {candidate_id} vs {active_id}"
    if snapshot is not None:
        head += (f" · share {pct(snapshot.planned_share)} · "
                 f"{max(0, snapshot.now_hour - snapshot.start_hour)} h")
    body = arm_lines(snapshot, decision) if snapshot is not None else []
    return [head, *body, f"next: {next_step(decision, reason_text)}"]


def admin_message(snapshot: ExperimentSnapshot, decision: Decision, reason_text: str, *,
                  applied: bool, dry_run: bool = False, error: str | None = None,
                  skipped: str | None = None) -> str:
    """What the admins are told about one look: the action, why, what changed, the arms."""
    head = f"🤖 {snapshot.candidate_id} vs {snapshot.active_id}: {decision.action.upper()}"
    if decision.restart:
        head += " (test restarts)"
    if error is not None:
        head += f" — NOT applied: {error}"
    elif skipped is not None:
        head += f" — not applied here: {skipped}"
    elif dry_run and (decision.action is not Action.HOLD or decision.restart):
        head += " (dry run: not applied)"
    elif not applied and decision.action is not Action.HOLD:
        head += " — not applied: the experiment changed meanwhile"
    done = [effect(snapshot, decision)] if applied and error is None else []
    return "\n".join([head, reason_text, *done, *arm_lines(snapshot, decision)])


def effect(snapshot: ExperimentSnapshot, decision: Decision) -> str:
    """What the applied decision changed, in the admin's terms."""
    a, b = snapshot.active_id, snapshot.candidate_id
    if decision.restart:
        return f"→ the test of {b} starts again from zero with the new file"
    if decision.action is Action.PROMOTE:
        return f"→ {b} now serves everyone; {a} is retired (/rollback brings it back)"
    if decision.action in (Action.REVERT, Action.RETIRE):
        return f"→ {b} is no longer served; {a} keeps serving everyone"
    if decision.action is Action.FREEZE:
        return (f"→ {b} is taken off (share 0) until a person has checked routing; "
                f"/canary {b} <percent> starts a fresh test")
    if decision.action is Action.RAMP and decision.new_share is not None:
        return f"→ {b} now serves {pct(decision.new_share)} of users (its users so far stay)"
    return "→ no change"
