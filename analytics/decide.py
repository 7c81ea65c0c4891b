"""The decision policy: one experiment's hourly aggregates in, one decision out (pure).

The bot's scheduled job, ``loopbot analyze`` and ``loopbot simulate`` all run this module:
the bot through :func:`decide` on one snapshot, the simulation through :func:`evaluate` on
arrays of thousands of simulated runs. :func:`decide` *is* :func:`evaluate` on a batch of one
at the latest hour, so the benchmark measures the code that acts on real users.

Public API
----------
- ``DecisionConfig``: thresholds (the ``experiment`` section of the YAML config).
- ``HourStats``: one completed hour of one experiment (votes after the per-user daily cap).
- ``ExperimentSnapshot``: an experiment (active vs candidate) with its hourly strata.
- ``decide(snapshot, config) -> Decision``: an :class:`Action`, the :class:`Rule` that chose
  it, the numbers behind it (:class:`DecisionStats`), ``new_share`` for a ramp, ``restart``
  when the test restarts. Reasons are data (the rule and the numbers): the admins' prose is
  written from them by :mod:`bot.texts.decisions`.
- ``ExperimentArrays`` / ``evaluate(arrays, config, concurrent_candidates) -> Trajectory``:
  the vectorised core: the action every hourly look would take, for a batch of experiments.

The policy at each hourly look, in order (first match wins):

1. the candidate's file changed → hold and restart the test (the old evidence is about a
   different prompt);
2. sample-ratio mismatch on *new users* per arm (always-valid, α_srm, and a deviation of at
   least ``srm_min_relative_deviation``) → **freeze**: the split is broken, so every
   comparison is suspect until a person looks;
2b. the arms' verdicts were not all scored by one and the same scorer (an arm mixes model
   files or servers, or the two arms' differ) → hold with rule ``SCORER_MISMATCH``, whatever
   the rules below say: the same prompt gives different probabilities on another model, so
   neither the accuracy nor the confidence bands of the two arms are comparable. Checked by
   :func:`decide` from the snapshot's per-arm scorer counts (the vectorised core has none);
2c. who votes differs between the arms (the propensity guard, below) → **freeze**;
3. 👎 share on chat replies clearly higher (always-valid e-process at α_reactions/K *and* a
   ratio ≥ ``reaction_max_ratio``) or mean latency ratio ≥ ``latency_max_ratio`` → **revert**;
4. E⁻ ≥ K/alpha_revert_sequential, once the test is ``min_revert_hours`` old → **revert**,
   unless selection by correctness could fake it or account for a large part of it (then
   hold);
5. no votes for ``stale_hours`` → hold (or retire at the horizon);
6. E⁺ ≥ K/alpha_promote_sequential with enough observations per arm (adapted to traffic),
   once the test is ``min_promotion_hours`` old, with persistence (the hours after the
   first day alone give e ≥ ``settled_min_e``) → **promote**, unless selection by
   correctness could fake it (then hold). With the paired comparison (below) E⁺ is the
   paired one, and the votes must point the same way;
7. at the horizon (``max_duration_hours``): stratified Mantel–Haenszel z ≥ the bar (a t
   reference with few voters), enough observations, and the hours after the first day
   alone at z ≥ ``settled_min_z`` → **promote** (with the paired comparison: its z, the
   votes pointing the same way); where the paired comparison and the votes disagree →
   **freeze** (before the horizon, hold); z ≤ −bar' → **revert**; a promotion or revert
   that selection could fake → **freeze**; otherwise **retire** (keep the active version);
8. the traffic plan allows a larger share → **ramp**;
9. otherwise hold.

The propensity guard. Votes are a self-selected sample: with θ = r_right / r_wrong (how
much more readily users vote on a right verdict than on a wrong one), the odds of accuracy
among voters are the true odds times θ, and the odds ratio between the arms among voters is
the true one times θ_b / θ_a. It is unbiased when the arms' θ are equal, whatever they are;
the guard is for when they are not, and it looks in two ways:

- *vote rates*, per arm and confidence band (always-valid e-values: each band's own shift
  and one shift common to all bands), with the accuracy points a rate ratio ρ could hide,
  (1 − p)(1 − 1/ρ) summed over the bands. Rates that differ with e ≥ 1/alpha_parity by
  enough to hide ``propensity_tolerance`` freeze the test; at a promotion or revert look
  e ≥ 10 suffices (e ≥ 2 to hold a revert). This is a worst case: it does not know whether
  the extra votes fall on right or wrong verdicts, so it also stops a candidate voted on
  more for harmless reasons;
- *selection by correctness* (:mod:`analytics.propensity`): log(θ_b / θ_a) estimated two
  ways and combined by precision. The line a_k / r_right + b_k / r_wrong = 1 over the bands
  (a_k, b_k: shares of served verdicts voted right and voted wrong in band k) gives θ per arm
  whatever the bands' accuracies; the voters' odds ratio less the odds ratio the confidence
  of *all* served verdicts implies (the bands place each arm's accuracy without a vote, if
  the arms share calibration) gives the difference directly, about 1.4 times as precisely.
  The direction is known: θ_b > θ_a fakes a promotion, θ_b < θ_a a revert. This is what
  sees a candidate whose overall vote rate is unchanged. Its z holds the action it could
  fake (``propensity_hold_z``, ``propensity_revert_hold_z``), and a revert is also held
  while the estimate accounts for ``propensity_share`` of the voters' deficit; it
  freezes at ``propensity_freeze_z`` or at the horizon.

What it cannot do without the paired comparison: θ is identified only through the bands, so
it is known less precisely than the odds ratio the accuracy evidence tests. A selection
difference that fakes a 10-point gain (θ_b/θ_a = 2.25) is about 3.4 standard errors from
none after 48 h at 20 votes/h, when a real 10-point gain must already be promoted, and the
estimate's standard error is already at the Cramér–Rao bound of the banded counts. A
promotion bar that holds such a candidate in 99% of tests would hold real 5-point gains too
often for the power targets, so the promotion side keeps a bar of 2 standard errors (held
only while selection accounts for ``propensity_share`` of the gain). Reverts, which may
wait, wait 3.5 days (``min_revert_hours``), when a selection that fakes a 7-point deficit is
about 2.6 standard errors from none (1.9 at 48 h). The line fit alone, which does not assume
shared calibration, also holds either action at ``propensity_line_hold_z``. A subtler
selection is worse: one that fakes +5 points is promoted later, near the bar, when its
estimate is no further from zero than the gain is, and 20% of such tests are promoted (7.9%
for a fake +10). After the whole week a fake +5 is only 2.8 standard errors of the estimate
from a real +5, so no rule that promotes 88% of real +5 gains can hold it to 1%;
``propensity_hold_z`` and ``propensity_share`` trade power for protection. The README gives
the measured trade-offs.

The paired comparison (:class:`PairedVotes`). The bot also scores every verdict that got
feedback with the other arm's prompt. Among an arm's verdicts voted right, the share on which
the other prompt is wrong is n10 / (n10 + n11) in the active arm and n01 / (n01 + n11) in the
candidate's (n10: texts only the active prompt gets right, n01: only the candidate's, n11:
both): the propensity to vote on a right verdict is one number within an arm and cancels,
and the candidate is better exactly when the second share is the larger. Promotions are then
decided on this comparison, so the selection by correctness that the bands see only
imprecisely cannot fake one: a candidate that is only voted on differently is promoted in at
most alpha_promote of tests. Persistence is asked of both the votes and the pairs, and the
bands' guard below stays: added conditions. Reverts stay
on the votes (the guard holds those that selection could fake). Without pairs (a replay of a
log without ``other_label``, ``paired_comparison: false``) the votes decide, as described.

Persistence (novelty). A candidate better only at first must not be promoted on the
evidence its first day built. No promotion comes before ``min_promotion_hours`` (one
day-night cycle), and then every promotion needs the hours after it to carry the gain on
their own, by a test that stays valid however large the first day's advantage was: before
the horizon, those hours alone give e ≥ ``settled_min_e`` (an e-process that counts nothing
of the first day, ``analytics.sequential.fisher_e_process`` with ``since``: at most 10% of
such candidates, whatever the size of the advantage); at the horizon, the later hours alone
must reach z ≥ ``settled_min_z`` (at most 5%). Measured, a +5-point first day at 20 votes/h
is promoted in about 2% of tests and a +10-point one at 60 votes/h in 8% (55% with the
previous per-look z gate, which the many hourly looks let through). What persistence cannot
do: an advantage that lasts two or three days looks like a lasting one until it fades, and
a real gain must be promoted by then.

Error budgets: ``alpha_promote`` (1%) is split between the e-process
(``alpha_promote_sequential``, any number of looks, Ville's inequality) and the single
horizon test (the rest), so P(false promotion) ≤ 1%; ``alpha_revert`` (5%) likewise. With K
concurrent candidates every budget is divided by K. Evidence is discounted by the
``design_effect`` of users' clustered votes (see ``analytics.sequential.fisher_e_process``).

Strata: hours, merged with their neighbours only while the smaller arm expects fewer than
``min_stratum_votes`` votes, judged from the total count and the share
(``analytics.sequential.block_strata``); a stratum enters the evidence at the look that
closes it.

Hours are the experiment's *completed* hours: a partial current hour must not be passed in,
because the e-process multiplies one factor per closed stratum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

from analytics.propensity import (
    calibration_contrast,
    combine_contrasts,
    propensity_contrast,
)
from analytics.sequential import (
    PsiPrior,
    binomial_shift_log_evalue,
    block_strata,
    fisher_e_process,
    pooled_binomial_shift_log_evalue,
)
from analytics.stats import accuracy_summary, mh_from_sums, mh_terms

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

class Action(StrEnum):
    """What a look decides (a ``str``: stored and logged as its value)."""

    HOLD = "hold"
    RAMP = "ramp"
    PROMOTE = "promote"
    REVERT = "revert"
    RETIRE = "retire"
    FREEZE = "freeze"


class Rule(StrEnum):
    """Which rule of the policy decided (the reason, as data)."""

    COLLECTING = "collecting"  # not enough evidence either way yet
    SRM = "srm"
    REACTIONS = "reactions"
    LATENCY = "latency"
    EVIDENCE_WORSE = "evidence_worse"
    STALE = "stale"
    EVIDENCE_BETTER = "evidence_better"
    HORIZON_MH = "horizon_mh"
    HORIZON_RETIRE = "horizon_retire"
    PARITY = "parity"
    RAMP = "ramp"
    MIN_VOTES = "min_votes"  # E⁺ crossed but an arm has too few votes
    RESTART = "restart"
    HORIZON_WORSE = "horizon_worse"
    PROPENSITY = "propensity"  # who votes differs between the arms: frozen, not decided
    FADING = "fading"  # E⁺ crossed, but the hours after the first day alone do not carry it
    # The paired comparison (both prompts on the same voted texts) and the votes disagree:
    # one finds the candidate better, the other does not (who votes differs, or chance):
    # held; at the horizon, frozen.
    PAIRED = "paired"
    # Set by the bot, not by the policy: the candidate has no prompt file to analyse.
    MISSING_FILE = "missing_file"
    # Set by decide() from the snapshot's scorers, not by the vectorised policy: the arms'
    # verdicts were scored by different scorers (model files or servers): held, not decided.
    SCORER_MISMATCH = "scorer_mismatch"


# The vectorised core codes actions and rules as small ints: index into these tuples.
ACTIONS: tuple[Action, ...] = tuple(Action)
HOLD, RAMP, PROMOTE, REVERT, RETIRE, FREEZE = range(6)
# Vote rates that differ with an e-value ≥ this (and by enough) block an action.
PARITY_EVIDENCE_AT_DECISION = 10.0
# A revert is held on weaker vote-rate evidence still (e ≥ 2, with the same size bar): the
# candidate's wrong verdicts voted more readily raises its vote rate only a little (10% at
# 1.5× for a 20% error rate) while it fakes 7 points, and holding a revert only delays it.
PARITY_EVIDENCE_AT_REVERT = 2.0
# Never promote on fewer observations per arm than this, however slow the traffic.
MIN_VOTES_FLOOR = 20
# Actions that end the experiment (the simulation stops a run at the first one).
TERMINAL = (PROMOTE, REVERT, RETIRE, FREEZE)
RULES: tuple[Rule, ...] = tuple(r for r in Rule
                               if r not in (Rule.MISSING_FILE, Rule.SCORER_MISMATCH))
_RULE = {rule: i for i, rule in enumerate(RULES)}


@dataclass
class DecisionConfig:
    """Thresholds of the experiment engine; defaults are the documented policy."""

    # How often the scheduled analysis runs (minutes). The statistics use completed hours.
    interval_minutes: float = 60.0
    # Overall false-promotion budget, split between the e-process and the horizon test.
    alpha_promote: float = 0.01
    # The part of alpha_promote spent by the always-valid e-process (E⁺ ≥ 1/this).
    # (0.002: the horizon test, spending the other 0.008, is the more powerful for small
    # effects; measured on S1 +5 at 1000 runs: 0.887 with 0.002 against 0.860 with 0.005.)
    alpha_promote_sequential: float = 0.002
    # Overall false-revert budget (reverting is cheap, so harm is acted on at 5%), split like
    # alpha_promote: E⁻ ≥ 1/alpha_revert_sequential at any look, the rest at the horizon.
    alpha_revert: float = 0.05
    alpha_revert_sequential: float = 0.03
    # Promotion needs at least this many (capped) votes in each arm.
    min_votes_per_arm: int = 100
    # With no decision by then, keep the active version and retire the candidate.
    max_duration_hours: float = 168.0
    # At the horizon, promote when the stratified Mantel–Haenszel test clears the rest of
    # alpha_promote (false: retire whatever the horizon data says).
    horizon_fallback: bool = True
    # Mixing prior of the e-processes: half-normal on |log odds ratio| on an even grid.
    # At a base near 80%, effects of 4–10 accuracy points are log odds ratios of 0.3–0.8:
    # sd 0.5 spreads the bet over that range.
    prior_sd: float = 0.5
    prior_grid_min: float = 0.02
    prior_grid_max: float = 1.6
    prior_points: int = 40
    # Strata: consecutive hours merge until the smaller arm expects min_stratum_votes votes
    # (at most max_stratum_hours, never across a change of share): an hour where one arm got
    # no vote carries no information, so sparse traffic would otherwise waste data.
    min_stratum_votes: int = 3
    max_stratum_hours: int = 6
    # Sample-ratio mismatch: always-valid two-sided test of the served split → freeze.
    alpha_srm: float = 0.001
    srm_prior_sd: float = 0.2
    # ... and only when the observed split is off by at least this fraction of the smaller
    # planned side (50% → outside 45–55%; 10% → outside 9–11%): a freeze stops the test, so
    # a deviation too small to bias it must not trigger one by chance.
    srm_min_relative_deviation: float = 0.1
    # Vote propensity: when users' readiness to vote differs between the arms (overall, or
    # within a confidence band) with always-valid evidence at alpha_parity, and the
    # difference could hide at least propensity_tolerance accuracy points, the test freezes
    # instead of promoting or reverting on accuracy among voters.
    alpha_parity: float = 0.001
    propensity_tolerance: float = 0.02
    # Who votes, by correctness (analytics.propensity): z of log(θ_b / θ_a), where θ is an
    # arm's r_right / r_wrong estimated through the confidence bands. At a look that would
    # promote (revert), a z at or beyond the hold bar in the direction that fakes that action
    # holds it; at the horizon, or beyond the freeze bar, the test freezes instead of deciding.
    # Blocking an action can only lower the error rates; the bars set what it costs in
    # tests where both arms' voters select alike (z is then standard normal).
    propensity_hold_z: float = 2.0
    propensity_revert_hold_z: float = 1.0
    propensity_freeze_z: float = 4.0
    # The share of the voters' effect (log odds ratio) the estimated selection log(θ_b/θ_a)
    # must account for to matter: a revert is held while selection accounts for at least
    # this share of the deficit, whatever its z (a deficit that who votes explains as well
    # as a worse candidate does is no reason to revert); a promotion is held by the z bar
    # only while selection accounts for at least this share of the gain (a gain that stays
    # more than half as large once selection is taken out is a real one).
    propensity_share: float = 0.5
    # The line fit alone (analytics.propensity.propensity_contrast, which does not assume
    # that the arms share calibration) holds a promotion or a revert at this |z|, whatever
    # the combined estimate says.
    propensity_line_hold_z: float = 2.5
    # The paired comparison: the bot also scores every verdict that got feedback with the
    # other arm's prompt, and promotions are decided on how the two prompts do on the same
    # voted texts (PairedVotes), which who votes cannot bias. Off: on the votes alone.
    paired_comparison: bool = True
    # Kept for configuration files that set it; the propensity guard replaced the ratio bar.
    parity_max_ratio: float = 1.5
    # Persistence window (0 = off): a promotion also needs the last persistence_hours alone
    # to point the same way (stratified z ≥ persistence_min_z). Off by default: beside
    # settled_min_e and settled_min_z it moved none of the novelty figures by more than a
    # point (advantages lasting 24, 48 or 72 h) and cost S1 +5 0.6 points of power (README,
    # persistence).
    persistence_hours: float = 0.0
    persistence_min_z: float = 0.0
    # Nor does any promotion come before the test has seen one full day-night cycle: an
    # advantage of the first hours (novelty) is not yet distinguishable from a lasting one,
    # and who uses the bot changes over the day. Another added condition.
    min_promotion_hours: float = 24.0
    # Before the horizon, the hours after that first day alone must also give e ≥
    # settled_min_e (1 = off), an e-process that counts nothing of the first day
    # (analytics.sequential, fisher_e_process's ``since``): an advantage confined to the
    # first day, however large, is promoted this way in at most 1/settled_min_e of tests
    # (Ville's inequality). Half of it is E⁺'s growth since the first day, so a lasting
    # gain keeps the head start its first day gave it.
    settled_min_e: float = 10.0
    # At the horizon the hours after the first day alone must give stratified z ≥
    # settled_min_z: at most 5% of tests with a first-day-only advantage, of any size (so
    # at most 15% over both routes; measured 2-8%). Added conditions, both: the
    # false-promotion bound stays exact.
    settled_min_z: float = 1.645
    # A revert on accuracy among voters also waits 3.5 days (the guardrails on 👎 and
    # latency act at once): before that, the bands cannot tell a candidate whose wrong
    # verdicts are voted more readily from a worse one (at 20 votes an hour a selection
    # that fakes a 7-point deficit is 1.9 standard errors from none at 48 h, 2.6 at 84 h).
    # Shorter waits trade false rollbacks for speed: see the README's measured figures.
    min_revert_hours: float = 84.0
    # One text (the same or near-identical) counts at most this often per arm and UTC day,
    # however many people send it (applied when aggregating, like max_votes_per_user_day).
    max_observations_per_text_day: int = 3
    # No votes at all for this many completed hours: hold (the pipeline may be broken).
    stale_hours: float = 6.0
    # Each user's votes per UTC day beyond this are ignored (applied when aggregating).
    max_votes_per_user_day: int = 10
    # 👎 share on chat replies: revert when higher with evidence at alpha_reactions/K and at
    # least this ratio of 👎 shares (candidate / active) over the test.
    # A guardrail overrides the accuracy evidence, so it must almost never fire by chance:
    # overwhelming evidence (E ≥ 10⁴) and a rise of at least half.
    alpha_reactions: float = 0.0001
    reaction_max_ratio: float = 1.5
    min_reactions_per_arm: int = 50
    # Mean reply latency ratio (candidate / active) that reverts, once both arms have samples.
    latency_max_ratio: float = 1.5
    min_latency_samples: int = 50
    # Traffic plan: the candidate's share becomes ramp_shares[i] once the test is
    # ramp_after_hours[i] old (a 10% smoke period, then 50/50, the most powerful split).
    ramp_shares: list[float] = field(default_factory=lambda: [0.1, 0.5])
    ramp_after_hours: list[float] = field(default_factory=lambda: [0.0, 6.0])

    def validate(self) -> None:
        if self.interval_minutes <= 0:
            raise ValueError("interval_minutes must be positive")
        for name in ("alpha_promote", "alpha_revert", "alpha_srm", "alpha_parity",
                     "alpha_reactions"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if not 0.0 < self.alpha_promote_sequential <= self.alpha_promote:
            raise ValueError("alpha_promote_sequential must be in (0, alpha_promote]")
        if not 0.0 < self.alpha_revert_sequential <= self.alpha_revert:
            raise ValueError("alpha_revert_sequential must be in (0, alpha_revert]")
        if self.min_stratum_votes < 1 or self.max_stratum_hours < 1:
            raise ValueError("min_stratum_votes and max_stratum_hours must be at least 1")
        if self.min_votes_per_arm < 1:
            raise ValueError("min_votes_per_arm must be at least 1")
        if self.max_duration_hours < 1:
            raise ValueError("max_duration_hours must be at least 1")
        if self.srm_min_relative_deviation < 0:
            raise ValueError("srm_min_relative_deviation must be >= 0")
        for name in ("prior_sd", "srm_prior_sd", "stale_hours"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        self.prior().validate()
        if self.parity_max_ratio <= 1 or self.reaction_max_ratio < 1 or (
            self.latency_max_ratio <= 1
        ):
            raise ValueError("parity/latency ratios must be > 1 and reaction ratio >= 1")
        if self.min_reactions_per_arm < 0 or self.min_latency_samples < 0:
            raise ValueError("minimum sample counts must be non-negative")
        if self.max_votes_per_user_day < 0:
            raise ValueError("max_votes_per_user_day must be >= 0 (0 = no cap)")
        if self.max_observations_per_text_day < 0:
            raise ValueError("max_observations_per_text_day must be >= 0 (0 = no cap)")
        if not 0.0 <= self.propensity_tolerance < 1.0:
            raise ValueError("propensity_tolerance must be in [0, 1)")
        if min(self.propensity_hold_z, self.propensity_revert_hold_z) <= 0 or (
                self.propensity_freeze_z < max(self.propensity_hold_z,
                                               self.propensity_revert_hold_z)):
            raise ValueError("propensity hold bars must be positive and at most the freeze bar")
        if self.propensity_line_hold_z <= 0:
            raise ValueError("propensity_line_hold_z must be positive")
        if not 0.0 < self.propensity_share <= 1.0:
            raise ValueError("propensity_share must be in (0, 1]")
        if self.settled_min_e < 1:
            raise ValueError("settled_min_e must be >= 1 (1 = off)")
        if self.max_duration_hours <= self.min_promotion_hours:
            raise ValueError("max_duration_hours must exceed min_promotion_hours (a test "
                             "that ends with its first day could never promote)")
        if self.persistence_hours < 0:
            raise ValueError("persistence_hours must be >= 0 (0 = off)")
        if self.min_promotion_hours < 0 or self.min_revert_hours < 0:
            raise ValueError("min_promotion_hours and min_revert_hours must be >= 0 (0 = off)")
        if not self.ramp_shares or len(self.ramp_shares) != len(self.ramp_after_hours):
            raise ValueError("ramp_shares and ramp_after_hours need the same, non-zero length")
        if any(not 0.0 < s < 1.0 for s in self.ramp_shares):
            raise ValueError("ramp_shares must be in (0, 1)")
        if sorted(self.ramp_after_hours) != list(self.ramp_after_hours) or (
            self.ramp_after_hours[0] != 0
        ):
            raise ValueError("ramp_after_hours must start at 0 and be increasing")

    def prior(self) -> PsiPrior:
        return PsiPrior(self.prior_sd, self.prior_grid_min, self.prior_grid_max,
                        self.prior_points)

    def srm_prior(self) -> PsiPrior:
        return PsiPrior(self.srm_prior_sd, 0.01, 1.5, 30)

    def horizon_z(self, candidates: int = 1) -> float:
        """MH z a promotion at the horizon needs: the rest of alpha_promote, one-sided."""
        rest = self.alpha_promote - self.alpha_promote_sequential
        return math.inf if rest <= 0 else float(sps.norm.isf(rest / candidates))

    def horizon_revert_z(self, candidates: int = 1) -> float:
        """−MH z a revert at the horizon needs: the rest of alpha_revert, one-sided."""
        rest = self.alpha_revert - self.alpha_revert_sequential
        return math.inf if rest <= 0 else float(sps.norm.isf(rest / candidates))

    def target_share(self, elapsed_hours: float, candidates: int = 1) -> float:
        """The plan's share at this age, capped so K candidates can share traffic evenly."""
        share = self.ramp_shares[0]
        for after, value in zip(self.ramp_after_hours, self.ramp_shares, strict=True):
            if elapsed_hours >= after:
                share = value
        return min(share, 1.0 / (candidates + 1))


# --------------------------------------------------------------------------- vectorised core


@dataclass(frozen=True)
class VoteBands:
    """Served verdicts, verdicts with an observation, and correct observations per arm and
    confidence band: shape (batch, hours, bands). Both arms share the bands (cut-offs of the
    verdict's own confidence), which is what lets the propensity guard see a difference in
    who votes even when the overall vote rates are equal."""

    served_a: IntArray
    observed_a: IntArray
    correct_a: IntArray
    served_b: IntArray
    observed_b: IntArray
    correct_b: IntArray


@dataclass(frozen=True)
class PairedVotes:
    """The paired comparison: observations whose text the *other* arm's prompt also scored,
    per arm, shape (batch, hours). In arm a, ``right_a`` observations were voted right and
    also scored by the candidate's prompt, ``right_other_wrong_a`` of them got another label
    from it; ``wrong_a`` were voted wrong and scored, ``wrong_other_same_a`` of them got the
    same label (so the other prompt was wrong too). Arm b likewise, the other prompt being
    the active one's.

    Why it cannot be fooled by who votes. Let n10 be the share of texts the active prompt
    gets right and the candidate's wrong, n01 the reverse, n11 both right. Among arm a's
    verdicts voted right, the other prompt is wrong on n10 / (n10 + n11) of them, and among
    arm b's on n01 / (n01 + n11): whatever the propensity to vote on a right verdict is in
    an arm, it is the same for all of that arm's right verdicts and cancels. The candidate is
    more accurate exactly when n01 > n10, i.e. when the second share is the larger. Only
    votes that say "correct" are used, so it needs no true label for a verdict voted wrong,
    whatever the number of labels. The assumption: within an arm, whether a right verdict
    gets a vote does not depend on whether the other prompt would have agreed. It fails when
    users vote by the confidence shown and the prompts differ in confidence on the texts
    they disagree on (the README gives the measured size); the votes alone fail then too.

    The counts of verdicts voted wrong measure the propensities themselves: verdicts both
    prompts get right (wrong) are the same texts in both arms, so their votes per served
    verdict compare how readily each arm's right (wrong) verdicts are voted on."""

    right_a: IntArray
    right_other_wrong_a: IntArray
    wrong_a: IntArray
    wrong_other_same_a: IntArray
    right_b: IntArray
    right_other_wrong_b: IntArray
    wrong_b: IntArray
    wrong_other_same_b: IntArray
    # Two labels only: a verdict voted wrong then has a known true label, so where the other
    # prompt differs it is right, and verdicts voted wrong are evidence too (the arms swap
    # roles: the active arm's share of "other right" is the larger when the candidate is
    # better; the propensity cancels within them just the same).
    two_labels: bool = False


@dataclass(frozen=True)
class ExperimentArrays:
    """Hourly aggregates of a batch of experiments: shape (batch, hours), hour 0 = start.

    Votes are after the per-user daily cap. ``served_*`` are verdicts served (the exposure
    for vote-rate parity). ``new_users_*`` count users seen for the first time in the
    experiment that hour, per arm: the SRM test uses them because a new user's arm is an
    independent draw with the planned share, whereas verdicts cluster by (sticky) user.
    ``planned_share`` is the candidate's planned share during each hour; latency is a
    per-hour count and sum (seconds). ``design_effect`` is the running estimate, at each
    look, of the variance inflation from users' clustered votes (1 = independent votes;
    ``analytics.stats.design_effect``).

    The unit is the verdict, not the vote: ``votes_*`` / ``correct_*`` count *observations*,
    one per verdict that got feedback (its voters' majority), after the per-user and
    per-text daily caps. However many people vote on one verdict, or send one text, it
    weighs as one verdict (or a few texts a day). ``clusters`` is the number of independent
    clusters (distinct voters) so far, for the small-sample correction of the horizon test
    (infinite = no correction); ``bands`` the optional confidence-band counts.
    """

    votes_a: IntArray
    correct_a: IntArray
    votes_b: IntArray
    correct_b: IntArray
    served_a: IntArray
    served_b: IntArray
    new_users_a: IntArray
    new_users_b: IntArray
    planned_share: FloatArray
    up_a: IntArray
    down_a: IntArray
    up_b: IntArray
    down_b: IntArray
    latency_n_a: IntArray
    latency_sum_a: FloatArray
    latency_n_b: IntArray
    latency_sum_b: FloatArray
    design_effect: FloatArray
    clusters: FloatArray | None = None
    bands: VoteBands | None = None
    # The paired comparison (None: the verdicts were not scored by the other prompt).
    pairs: PairedVotes | None = None

    @property
    def shape(self) -> tuple[int, int]:
        batch, hours = self.votes_a.shape
        return batch, hours

    def validate(self) -> None:
        shape = self.votes_a.shape
        if len(shape) != 2:
            raise ValueError("arrays must be (batch, hours)")
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name in ("bands", "pairs") or value is None:
                continue
            if value.shape != shape:
                raise ValueError(f"{name} has shape {value.shape}, expected {shape}")
        if self.bands is not None:
            for name in self.bands.__dataclass_fields__:
                if getattr(self.bands, name).shape[:2] != shape:
                    raise ValueError(f"bands.{name} must start with shape {shape}")
        if self.pairs is not None:
            for name in self.pairs.__dataclass_fields__:
                if name != "two_labels" and getattr(self.pairs, name).shape != shape:
                    raise ValueError(f"pairs.{name} must have shape {shape}")
            for arm in ("a", "b"):
                for total, part in (("right", "right_other_wrong"),
                                    ("wrong", "wrong_other_same")):
                    whole = getattr(self.pairs, f"{total}_{arm}")
                    if np.any(getattr(self.pairs, f"{part}_{arm}") > whole) or np.any(
                            getattr(self.pairs, f"{part}_{arm}") < 0):
                        raise ValueError(f"pairs.{part}_{arm} must be within pairs.{total}_{arm}")
        if np.any(self.correct_a > self.votes_a) or np.any(self.correct_b > self.votes_b):
            raise ValueError("correct votes exceed votes")
        if np.any(self.votes_a < 0) or np.any(self.votes_b < 0) or np.any(self.correct_a < 0):
            raise ValueError("negative counts")


@dataclass(frozen=True)
class Trajectory:
    """What every hourly look decides, shape (batch, hours); index t = after hour t."""

    action: npt.NDArray[np.int8]
    rule: npt.NDArray[np.int8]
    log_e_plus: FloatArray
    log_e_minus: FloatArray
    log_e_srm: FloatArray
    srm_observed_share: FloatArray
    # What the plan leads to expect of that share (new users weighted by the share in force).
    srm_expected_share: FloatArray
    # Evidence that who votes differs between the arms, and how many accuracy points that
    # difference could hide (the propensity guard).
    log_e_parity: FloatArray
    propensity_bias: FloatArray
    # log(θ_b / θ_a) (θ = r_right / r_wrong, analytics.propensity) and its z.
    propensity_log_ratio: FloatArray
    propensity_z: FloatArray
    log_e_reactions: FloatArray
    mh_z: FloatArray
    mh_odds_ratio: FloatArray
    # Stratified z of the last ``persistence_hours`` alone (persistence before promotion),
    # and of the hours after the first ``min_promotion_hours`` alone.
    recent_z: FloatArray
    settled_z: FloatArray
    # log e that the candidate is better from the hours after the first
    # min_promotion_hours alone (persistence).
    log_e_settled: FloatArray
    # The paired comparison: log e that the candidate is better, its stratified z, and how
    # readily the candidate's right and wrong verdicts are voted on relative to the active
    # one's (NaN without pairs).
    log_e_paired: FloatArray
    paired_z: FloatArray
    paired_right_vote_ratio: FloatArray
    paired_wrong_vote_ratio: FloatArray
    # The horizon test's bars at each look (a t reference with few clusters).
    horizon_z: FloatArray
    horizon_revert_z: FloatArray
    # The fewest observations per arm a promotion needs at each look (adapted to traffic).
    min_votes: FloatArray
    votes_a: IntArray
    correct_a: IntArray
    votes_b: IntArray
    correct_b: IntArray
    vote_rate_ratio: FloatArray
    down_ratio: FloatArray
    latency_ratio: FloatArray
    target_share: FloatArray

    def first_terminal(self) -> tuple[IntArray, IntArray]:
        """Per run: the first terminal action (HOLD if none) and its hour index (-1 if none)."""
        terminal = np.isin(self.action, TERMINAL)
        any_t = terminal.any(axis=1)
        idx = np.where(any_t, terminal.argmax(axis=1), -1)
        rows = np.arange(self.action.shape[0])
        act = np.where(any_t, self.action[rows, np.maximum(idx, 0)], HOLD)
        return act.astype(np.int64), idx.astype(np.int64)


def _ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True)
class _AccuracyEvidence:
    """The accuracy comparison at each look: the e-processes and the horizon's MH test."""

    log_e_plus: FloatArray
    log_e_minus: FloatArray
    mh_z: FloatArray
    mh_odds_ratio: FloatArray
    recent_z: FloatArray
    # Stratified z of the hours after the first min_promotion_hours alone.
    settled_z: FloatArray
    # log e of the hours after the first min_promotion_hours alone (0 until then).
    log_e_settled: FloatArray


def _settled_z(data: ExperimentArrays, after: float, deff: FloatArray) -> FloatArray:
    """Stratified z of the hours from ``after`` on alone, at every look (0 before)."""
    start = max(0, math.ceil(after))
    terms = [np.where(np.arange(t.shape[1])[None, :] >= start, t, 0.0) for t in
             mh_terms(data.votes_a, data.correct_a, data.votes_b, data.correct_b)]
    settled = mh_from_sums(*(np.cumsum(t, axis=1) for t in terms))
    return np.asarray(np.nan_to_num(settled.z) / np.sqrt(deff), dtype=np.float64)


def _recent_z(data: ExperimentArrays, hours: float, deff: FloatArray) -> FloatArray:
    """Stratified z of the last ``hours`` hours alone at every look (+inf when off)."""
    window = round(hours)
    if window <= 0:
        return np.full(data.shape, np.inf)
    sums = [np.cumsum(t, axis=1) for t in
            mh_terms(data.votes_a, data.correct_a, data.votes_b, data.correct_b)]
    lagged = [np.concatenate([np.zeros((c.shape[0], window)), c[:, :-window]], axis=1)
              if c.shape[1] > window else np.zeros_like(c) for c in sums]
    recent = mh_from_sums(*(c - lag for c, lag in zip(sums, lagged, strict=True)))
    return np.asarray(recent.z / np.sqrt(deff), dtype=np.float64)


def _accuracy_evidence(data: ExperimentArrays, config: DecisionConfig,
                       deff: FloatArray) -> _AccuracyEvidence:
    blocks = block_strata(
        {"va": data.votes_a, "xa": data.correct_a, "vb": data.votes_b, "xb": data.correct_b},
        data.planned_share, ("va", "vb"), config.min_stratum_votes, config.max_stratum_hours)
    closed = blocks.closed
    # Persistence: the evidence of the strata closed after the first min_promotion_hours
    # (look t is slot 2t + 1, so the first day ends at slot 2·first − 1).
    first = math.ceil(config.min_promotion_hours)
    both = fisher_e_process(closed["va"], closed["xa"], closed["vb"], closed["xb"],
                            config.prior(), design_effect=np.repeat(deff, 2, axis=1),
                            since=2 * first - 1)
    # The fixed-time MH test may use the open block too (it is read once, at the horizon).
    sums = [np.cumsum(t, axis=1)[:, 1::2] for t in
            mh_terms(closed["va"], closed["xa"], closed["vb"], closed["xb"])]
    pending = mh_terms(blocks.open["va"], blocks.open["xa"], blocks.open["vb"],
                       blocks.open["xb"])
    mh = mh_from_sums(*(c + p for c, p in zip(sums, pending, strict=True)))
    assert both.log_e_plus_later is not None
    # Slot 2t+1 is the evidence after everything closed at look t.
    return _AccuracyEvidence(both.log_e_plus[:, 1::2], both.log_e_minus[:, 1::2],
                             mh.z / np.sqrt(deff), mh.odds_ratio,
                             _recent_z(data, config.persistence_hours, deff),
                             _settled_z(data, config.min_promotion_hours, deff),
                             both.log_e_plus_later[:, 1::2])


@dataclass(frozen=True)
class _PairedEvidence:
    """The paired comparison at each look (see :class:`PairedVotes`)."""

    present: bool
    log_e_plus: FloatArray
    z: FloatArray
    right_vote_ratio: FloatArray
    wrong_vote_ratio: FloatArray
    # Persistence on the same comparison: log e and z of the hours after the first
    # min_promotion_hours alone (as _AccuracyEvidence's).
    log_e_settled: FloatArray
    settled_z: FloatArray


def _paired_evidence(data: ExperimentArrays, config: DecisionConfig,
                     deff: FloatArray) -> _PairedEvidence:
    """E⁺ and the stratified z of the paired comparison, and the vote-propensity ratios.

    Each arm's "successes" are its verdicts voted right on which the other prompt is wrong:
    the candidate is better when its share is the larger (E⁺ of the same Fisher e-process
    as the accuracy evidence, over hourly blocks, tempered by the same design effect). The
    ratios: among votes that say "correct", those on texts both prompts get right, per served
    verdict, candidate over active (and likewise for texts both get wrong)."""
    pairs = data.pairs
    nan = np.full(data.shape, np.nan)
    if pairs is None or not config.paired_comparison:
        return _PairedEvidence(False, np.zeros(data.shape), nan, nan, nan.copy(),
                               np.zeros(data.shape), nan.copy())
    # (n_a, x_a, n_b, x_b) of each table, "b" the side that is larger when the candidate is
    # better: voted right, the other prompt wrong; with two labels also voted wrong, the
    # other prompt right (then the active arm's share is the larger: the arms swap roles).
    tables = [(pairs.right_a, pairs.right_other_wrong_a, pairs.right_b,
               pairs.right_other_wrong_b)]
    if pairs.two_labels:
        tables.append((pairs.wrong_b, pairs.wrong_b - pairs.wrong_other_same_b,
                       pairs.wrong_a, pairs.wrong_a - pairs.wrong_other_same_a))
    closed: list[list[IntArray]] = [[], [], [], []]
    pending: list[list[IntArray]] = [[], [], [], []]
    for table in tables:
        blocks = block_strata(dict(zip(("na", "xa", "nb", "xb"), table, strict=True)),
                              data.planned_share, ("na", "nb"), config.min_stratum_votes,
                              config.max_stratum_hours)
        for i, key in enumerate(("na", "xa", "nb", "xb")):
            closed[i].append(blocks.closed[key])
            pending[i].append(blocks.open[key])
    # The tables' blocks interleaved: slot (2t + 1)·T + T − 1 closes look t.
    width = len(tables)
    batch, hours = data.shape
    slots = [np.stack(parts, axis=-1).reshape(batch, 2 * hours * width) for parts in closed]
    # Persistence: the strata closed after the first min_promotion_hours (the last slot of
    # look first − 1 is (2·first − 1)·W + W − 1).
    first = math.ceil(config.min_promotion_hours)
    since = 2 * first * width - 1
    process = fisher_e_process(slots[0], slots[1], slots[2], slots[3], config.prior(),
                               design_effect=np.repeat(deff, 2 * width, axis=1), since=since)
    assert process.log_e_plus_later is not None
    terms = mh_terms(*slots)
    sums = [np.cumsum(t, axis=1)[:, 2 * width - 1::2 * width] for t in terms]
    open_terms = [mh_terms(*(parts[j] for parts in pending)) for j in range(width)]
    mh = mh_from_sums(*(c + sum(terms_j[i] for terms_j in open_terms)
                        for i, c in enumerate(sums)))
    # The horizon's persistence z, as _settled_z computes it for the votes: the hours from
    # the first min_promotion_hours on, hour by hour, every table's terms summed.
    later = np.arange(hours)[None, :] >= first
    hourly = [mh_terms(*table) for table in tables]
    settled = mh_from_sums(*(np.cumsum(np.where(later, sum(t[i] for t in hourly), 0.0), axis=1)
                             for i in range(5)))
    log_e = process.log_e_plus[:, 2 * width - 1::2 * width]
    log_e_settled = process.log_e_plus_later[:, 2 * width - 1::2 * width]

    def cum(x: npt.ArrayLike) -> FloatArray:
        return np.cumsum(np.asarray(x, dtype=np.float64), axis=1)

    def per_served(part: IntArray, scored: IntArray, voted: FloatArray,
                   served: IntArray) -> FloatArray:
        # The share of scored observations with this outcome, times all such observations
        # per served verdict (robust to a few observations left unscored).
        return _ratio(_ratio(cum(part), cum(scored)) * voted, cum(served))

    right_a, right_b = cum(data.correct_a), cum(data.correct_b)
    wrong_a = cum(data.votes_a) - right_a
    wrong_b = cum(data.votes_b) - right_b
    both_right_a = per_served(pairs.right_a - pairs.right_other_wrong_a, pairs.right_a,
                              right_a, data.served_a)
    both_right_b = per_served(pairs.right_b - pairs.right_other_wrong_b, pairs.right_b,
                              right_b, data.served_b)
    both_wrong_a = per_served(pairs.wrong_other_same_a, pairs.wrong_a, wrong_a, data.served_a)
    both_wrong_b = per_served(pairs.wrong_other_same_b, pairs.wrong_b, wrong_b, data.served_b)
    return _PairedEvidence(True, np.asarray(log_e, dtype=np.float64),
                           np.asarray(np.nan_to_num(mh.z) / np.sqrt(deff), dtype=np.float64),
                           _ratio(both_right_b, both_right_a), _ratio(both_wrong_b, both_wrong_a),
                           np.asarray(log_e_settled, dtype=np.float64),
                           np.asarray(np.nan_to_num(settled.z) / np.sqrt(deff),
                                      dtype=np.float64))


_CUMULATIVE = ("votes_a", "correct_a", "votes_b", "correct_b", "served_a", "served_b", "up_a",
               "down_a", "up_b", "down_b", "latency_n_a", "latency_sum_a", "latency_n_b",
               "latency_sum_b")


@dataclass(frozen=True)
class _Guardrails:
    """What the guardrails see at each look: the split of new users, who votes, 👎 on
    replies and latency, each with its evidence."""

    cum: dict[str, npt.NDArray[Any]]
    log_e_srm: FloatArray
    srm_observed_share: FloatArray
    srm_expected_share: FloatArray
    log_e_parity: FloatArray
    propensity_bias: FloatArray
    propensity_log_ratio: FloatArray
    propensity_z: FloatArray
    # The line fit's estimate and z alone (it does not assume shared calibration).
    propensity_line_log_ratio: FloatArray
    propensity_line_z: FloatArray
    vote_rate_ratio: FloatArray
    log_e_reactions: FloatArray
    reactions_a: FloatArray
    reactions_b: FloatArray
    down_ratio: FloatArray
    latency_ratio: FloatArray


def _propensity(data: ExperimentArrays,
                config: DecisionConfig) -> tuple[FloatArray, FloatArray]:
    """Evidence that who votes differs between the arms, and the accuracy points it could
    hide.

    Why: votes are a self-selected sample. If users vote on a right verdict with
    probability r_right and on a wrong one with r_wrong, accuracy among voters has odds
    odds(accuracy) · r_right / r_wrong. The odds ratio between the arms is therefore unbiased
    when r_right / r_wrong is the same in both arms, whatever it is; the guard is for when it
    is not. That is visible in the vote rates: overall (a candidate whose right verdicts are
    voted 1.5× as often is voted more), and within the confidence bands both arms share
    (high-confidence verdicts are mostly right, low ones often wrong), which also shows the
    case where the overall rates happen to be equal.

    Evidence: given a band's (or an hour's) observations, the candidate's count is Binomial
    with its share of the served verdicts when both arms are voted on alike. Two always-valid
    two-sided e-processes of that: the product over the bands of each band's own (bands
    shifted different ways) and one whose shift is common to the bands (one arm voted more
    throughout: pooled, not diluted three ways); their average is an e-value. Size: a
    vote-rate ratio ρ ≥ 1 in a band whose voters are right with probability p can shift
    accuracy among voters by up to (1 − p)(1 − 1/ρ); summed over the bands with their share
    of the served verdicts.
    """
    bands = data.bands
    if bands is None:
        shape = (*data.votes_a.shape, 1)
        served = (data.served_a.reshape(shape), data.served_b.reshape(shape))
        observed = (data.votes_a.reshape(shape), data.votes_b.reshape(shape))
        correct = (data.correct_a.reshape(shape), data.correct_b.reshape(shape))
    else:
        served = (bands.served_a, bands.served_b)
        observed = (bands.observed_a, bands.observed_b)
        correct = (bands.correct_a, bands.correct_b)
    total = (observed[0] + observed[1]).astype(np.float64)
    served_share = _ratio(served[1].astype(np.float64),
                          (served[0] + served[1]).astype(np.float64))
    args = (np.moveaxis(observed[1], -1, 1), np.moveaxis(total, -1, 1),
            np.moveaxis(np.nan_to_num(served_share, nan=-1.0), -1, 1), config.srm_prior())
    # Product over the bands of each band's own e-process (bands shifted different ways,
    # as when only the share voted among high- vs low-confidence verdicts differs), and one
    # e-process with a shift common to all bands (one arm voted more throughout): the
    # average of the two is an e-value.
    separate = binomial_shift_log_evalue(*args).sum(axis=1)
    common = pooled_binomial_shift_log_evalue(*args)
    log_e = np.logaddexp(separate, common) - math.log(2.0)
    cum = [np.cumsum(np.asarray(x, dtype=np.float64), axis=1)
           for x in (*served, *observed, *correct)]
    s_a, s_b, o_a, o_b, x_a, x_b = cum
    rho = np.nan_to_num(_ratio(_ratio(o_b, s_b), _ratio(o_a, s_a)), nan=1.0, posinf=1.0)
    rho = np.where(rho > 0, np.maximum(rho, 1.0 / np.where(rho > 0, rho, 1.0)), 1.0)
    p_right = np.nan_to_num(_ratio(x_a + x_b, o_a + o_b), nan=1.0)
    weight = np.nan_to_num(_ratio(s_a + s_b, (s_a + s_b).sum(axis=-1, keepdims=True)))
    bias = (weight * (1.0 - p_right) * (1.0 - 1.0 / rho)).sum(axis=-1)
    return np.asarray(log_e, dtype=np.float64), np.asarray(bias, dtype=np.float64)


def _selection_contrast(
        data: ExperimentArrays) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """log(θ_b / θ_a) and its z at every look, from the cumulative band counts
    (:mod:`analytics.propensity`: the line fit and the calibration contrast combined), and
    the line fit's alone; zeros (no evidence) without bands.

    Why in addition to the vote rates: equal vote rates do not mean equal selection. A
    candidate whose right verdicts are voted a little more and whose wrong ones much less can
    keep the overall rate, and even each band's rate close to the active's, while its
    accuracy among voters rises by ten points. θ = r_right / r_wrong is what biases the odds
    ratio, and the bands identify it (the line a_k / r_right + b_k / r_wrong = 1); its
    direction says which decision the bias would fake."""
    bands = data.bands
    if bands is None:
        zeros = np.zeros(data.shape)
        return zeros, zeros.copy(), zeros.copy(), zeros.copy()

    def cum(x: IntArray) -> FloatArray:
        return np.cumsum(np.asarray(x, dtype=np.float64), axis=1)

    arm_a = (cum(bands.served_a), cum(bands.correct_a), cum(bands.observed_a - bands.correct_a))
    arm_b = (cum(bands.served_b), cum(bands.correct_b), cum(bands.observed_b - bands.correct_b))
    line = propensity_contrast(arm_a, arm_b)
    log_ratio, z = combine_contrasts(line, calibration_contrast(arm_a, arm_b))
    return log_ratio, z, line[0], line[1]


def _guardrails(data: ExperimentArrays, config: DecisionConfig) -> _Guardrails:
    new_users = data.new_users_a + data.new_users_b
    log_e_srm = binomial_shift_log_evalue(data.new_users_b, new_users, data.planned_share,
                                          config.srm_prior())
    log_e_parity, propensity_bias = _propensity(data, config)
    log_ratio, ratio_z, line_log_ratio, line_z = _selection_contrast(data)
    # 👎 on chat replies: "success" = a 👎; E⁺ is evidence that the candidate draws more.
    r_blocks = block_strata(
        {"na": data.up_a + data.down_a, "xa": data.down_a, "nb": data.up_b + data.down_b,
         "xb": data.down_b},
        data.planned_share, ("na", "nb"), config.min_stratum_votes, config.max_stratum_hours)
    rc = r_blocks.closed
    reactions_plus = fisher_e_process(rc["na"], rc["xa"], rc["nb"], rc["xb"],
                                      config.prior()).log_e_plus[:, 1::2]

    cum = {name: np.cumsum(getattr(data, name), axis=1) for name in _CUMULATIVE}
    rate_a = _ratio(cum["votes_a"].astype(np.float64), cum["served_a"].astype(np.float64))
    rate_b = _ratio(cum["votes_b"].astype(np.float64), cum["served_b"].astype(np.float64))
    react_a = (cum["up_a"] + cum["down_a"]).astype(np.float64)
    react_b = (cum["up_b"] + cum["down_b"]).astype(np.float64)
    down_share_a = _ratio(cum["down_a"].astype(np.float64), react_a)
    down_share_b = _ratio(cum["down_b"].astype(np.float64), react_b)
    # No 👎 at all on the active arm and some on the candidate's is the clearest rise of all.
    down_ratio = np.where((down_share_a == 0) & (down_share_b > 0), np.inf,
                          _ratio(down_share_b, down_share_a))
    latency_ratio = _ratio(_ratio(cum["latency_sum_b"], cum["latency_n_b"].astype(np.float64)),
                           _ratio(cum["latency_sum_a"], cum["latency_n_a"].astype(np.float64)))

    cum_new = np.cumsum(new_users, axis=1).astype(np.float64)
    expected_share = _ratio(np.cumsum(new_users * np.asarray(data.planned_share), axis=1),
                            cum_new)
    observed_share = _ratio(np.cumsum(data.new_users_b, axis=1).astype(np.float64), cum_new)
    return _Guardrails(cum, log_e_srm, observed_share, expected_share, log_e_parity,
                       propensity_bias, log_ratio, ratio_z, line_log_ratio, line_z,
                       _ratio(rate_b, rate_a),
                       reactions_plus, react_a, react_b,
                       np.asarray(down_ratio, dtype=np.float64), latency_ratio)


@dataclass(frozen=True)
class _Bars:
    """What each look's horizon test and minimum-data rule need, shape (batch, hours)."""

    horizon_z: FloatArray
    horizon_revert_z: FloatArray
    min_votes: FloatArray


def _bars(data: ExperimentArrays, config: DecisionConfig, k: int,
          guard: _Guardrails) -> _Bars:
    """The horizon test's reference and the minimum observations per arm.

    With few clusters (distinct voters) the MH z divided by √(design effect) is not normal:
    its variance is estimated from the clusters. A t reference with clusters − 1 degrees of
    freedom keeps the horizon test at its share of the error budget with 100–400 voters.

    The minimum adapts to the traffic seen: at most ``min_votes_per_arm``, at least
    ``MIN_VOTES_FLOOR``, otherwise half of what the smaller arm will have at the horizon at
    its rate so far. It is a condition added to the evidence bars, so the false-promotion
    bound (Ville's inequality and the horizon test's level) stays exact; it only decides
    whether a slow test can ever act at all."""
    batch, hours = data.shape
    rest_up = config.alpha_promote - config.alpha_promote_sequential
    rest_down = config.alpha_revert - config.alpha_revert_sequential
    if data.clusters is None:
        up = np.full((batch, hours), config.horizon_z(k))
        down = np.full((batch, hours), config.horizon_revert_z(k))
    else:
        df = np.maximum(np.asarray(data.clusters, dtype=np.float64) - 1.0, 1.0)
        up = (np.full((batch, hours), math.inf) if rest_up <= 0
              else np.asarray(sps.t.isf(rest_up / k, df), dtype=np.float64))
        down = (np.full((batch, hours), math.inf) if rest_down <= 0
                else np.asarray(sps.t.isf(rest_down / k, df), dtype=np.float64))
    elapsed = np.arange(1, hours + 1, dtype=np.float64)[None, :]
    smaller = np.minimum(guard.cum["votes_a"], guard.cum["votes_b"]).astype(np.float64)
    projected = smaller / elapsed * max(config.max_duration_hours, 1.0)
    min_votes = np.clip(0.5 * projected, min(MIN_VOTES_FLOOR, config.min_votes_per_arm),
                        config.min_votes_per_arm)
    return _Bars(up, down, np.asarray(min_votes, dtype=np.float64))


def _accounts_for(selection: FloatArray, log_or: FloatArray,
                  share: float) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Where the selection estimate log(θ_b/θ_a) accounts for at least ``share`` of the
    voters' log odds ratio: of a gain (both positive), of a deficit (both negative)."""
    gain = (log_or > 0) & (selection >= share * log_or)
    deficit = (log_or < 0) & (selection <= share * log_or)
    return np.asarray(gain, dtype=np.bool_), np.asarray(deficit, dtype=np.bool_)


def _choose(data: ExperimentArrays, config: DecisionConfig, k: int, acc: _AccuracyEvidence,
            guard: _Guardrails, bars: _Bars, target: FloatArray, share_now: FloatArray,
            paired: _PairedEvidence,
            ) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int8]]:
    """The policy: each look's action and rule, the first matching rule in policy order."""
    batch, hours = data.shape
    cum = guard.cum
    elapsed = np.arange(1, hours + 1, dtype=np.float64)[None, :]
    at_horizon = np.broadcast_to(elapsed >= config.max_duration_hours, (batch, hours))
    idx = np.arange(hours)[None, :]
    votes = data.votes_a + data.votes_b
    last_vote = np.maximum.accumulate(np.where(votes > 0, idx, -1), axis=1)
    stale = (idx - last_vote) >= config.stale_hours

    expected = guard.srm_expected_share
    scale = np.minimum(expected, 1.0 - expected)
    srm_deviation = np.nan_to_num(_ratio(np.abs(guard.srm_observed_share - expected), scale))
    srm = (guard.log_e_srm >= math.log(1.0 / config.alpha_srm)) & (
        srm_deviation >= config.srm_min_relative_deviation)
    # Who votes differs between the arms by enough to fake or hide an effect: neither
    # promote nor revert on accuracy among voters (both directions are protected). A fixed
    # tolerance, not a share of the difference among voters: that difference is itself
    # inflated by the selection and by noise (measured: compared with half of it, false
    # promotions in S_propensity_right rose from 0.1% to 2.6%).
    rates_could_hide = guard.propensity_bias >= config.propensity_tolerance
    propensity = (guard.log_e_parity >= math.log(1.0 / config.alpha_parity)) & rates_could_hide
    # At a decision (blocking one can only lower the error rates) weaker evidence suffices:
    # the vote rates differ by enough to hide the tolerance, with e-value ≥ 10. (A
    # fixed-sample z-test here blocked 3-5% of true improvements in clean traffic.)
    suspect = (guard.log_e_parity >= math.log(PARITY_EVIDENCE_AT_DECISION)) & rates_could_hide
    reactions_bad = (
        (guard.log_e_reactions >= math.log(k / config.alpha_reactions))
        & (np.nan_to_num(guard.down_ratio, nan=0.0) >= config.reaction_max_ratio)
        & (np.minimum(guard.reactions_a, guard.reactions_b) >= config.min_reactions_per_arm)
    )
    latency_bad = (
        (np.nan_to_num(guard.latency_ratio, nan=0.0) >= config.latency_max_ratio)
        & (np.minimum(cum["latency_n_a"], cum["latency_n_b"]) >= config.min_latency_samples)
    )
    # Nor is E⁻ acted on before min_revert_hours (the guardrails act at once): the
    # confidence bands need time to show whether who votes differs (see fakes_down).
    worse = (acc.log_e_minus >= math.log(k / config.alpha_revert_sequential)) & (
        elapsed >= config.min_revert_hours)
    enough = np.minimum(cum["votes_a"], cum["votes_b"]) >= bars.min_votes
    # Persistence (novelty): the hours after the first day alone must carry the gain too,
    # by their own e-value before the horizon and by their own z at it.
    recent_ok = acc.recent_z >= config.persistence_min_z
    # With the paired comparison deciding, the later hours must carry the gain in it too.
    lasting = recent_ok & ((config.settled_min_e <= 1)
                           | (acc.log_e_settled >= math.log(config.settled_min_e)))
    horizon_lasting = recent_ok & (acc.settled_z >= config.settled_min_z)
    if paired.present:
        lasting &= (config.settled_min_e <= 1) | (
            paired.log_e_settled >= math.log(config.settled_min_e))
        horizon_lasting &= paired.settled_z >= config.settled_min_z
    # Before a full day-night cycle E⁺ is not acted on (it still accumulates): collecting.
    vote_bar = math.log(k / config.alpha_promote_sequential)
    day_old = elapsed >= config.min_promotion_hours
    votes_better = (acc.log_e_plus >= vote_bar) & day_old
    votes_horizon = config.horizon_fallback & (acc.mh_z >= bars.horizon_z)
    if paired.present:
        # With the paired comparison (PairedVotes) the promotion evidence is its own: who
        # votes cannot bias it, so the false-promotion budget holds however the arms are
        # voted on. The votes must point the same way. Where the two views disagree (one
        # finds the candidate better, the other does not), a difference in who votes may be
        # the reason: hold, and at the horizon freeze for a person to look. Before the
        # horizon only the always-valid evidence counts as "finds it better": the horizon's
        # z bar, crossed by one view at an intermediate look, says nothing yet (and a hold
        # there would stop ramps while the slower view catches up).
        paired_better = (paired.log_e_plus >= vote_bar) & day_old
        paired_horizon = config.horizon_fallback & (paired.z >= bars.horizon_z)
        votes_agree = acc.mh_z > 0
        better = paired_better & votes_agree
        horizon_better = paired_horizon & votes_agree
        at_end = (((paired_better | paired_horizon) & ~votes_agree)
                  | ((votes_better | votes_horizon) & ~(paired_better | paired_horizon)))
        before_end = (paired_better & ~votes_agree) | (votes_better & ~paired_better)
        disagree = np.where(at_horizon, at_end, before_end)
    else:
        better, horizon_better = votes_better, votes_horizon
        disagree = np.zeros((batch, hours), dtype=np.bool_)
    horizon_worse = config.horizon_fallback & (acc.mh_z <= -bars.horizon_revert_z)
    ramp = target > share_now + 1e-9
    # Selection by correctness (θ_b / θ_a) pointing the way that would fake the decision at
    # hand: hold it; at the horizon, or far beyond, freeze rather than decide.
    # The line fit alone, which does not assume that the arms share calibration, holds
    # either action at its own bar: the guard is never weaker than it (a candidate surer of
    # its verdicts than the active one would otherwise pull the combined z towards zero).
    # A revert is also held while selection accounts for at least propensity_share of the
    # voters' deficit (on the log odds scale): with selection that large, the deficit is as
    # well explained by who votes as by a worse candidate, whatever its z. A promotion is
    # held by the z bar only while selection accounts for that share of the gain.
    log_or = np.log(np.where(acc.mh_odds_ratio > 0, acc.mh_odds_ratio, 1.0))
    explains_gain, explains_deficit = _accounts_for(
        guard.propensity_log_ratio, log_or, config.propensity_share)
    line_gain, line_deficit = _accounts_for(
        guard.propensity_line_log_ratio, log_or, config.propensity_share)
    line_up = (guard.propensity_line_z >= config.propensity_line_hold_z) & line_gain
    line_down = (guard.propensity_line_z <= -config.propensity_line_hold_z) & line_deficit
    fakes_up = ((guard.propensity_z >= config.propensity_hold_z) & explains_gain) | line_up
    fakes_down = (
        (guard.propensity_z <= -config.propensity_revert_hold_z) | explains_deficit | line_down
        | ((guard.log_e_parity >= math.log(PARITY_EVIDENCE_AT_REVERT)) & rates_could_hide))
    promoting = enough & ((better & lasting) | (at_horizon & horizon_better & horizon_lasting))
    reverting = worse | (at_horizon & horizon_worse)
    selection_freeze = (
        (promoting & (guard.propensity_z >= config.propensity_freeze_z) & explains_gain)
        | (reverting & (guard.propensity_z <= -config.propensity_freeze_z) & explains_deficit)
        | (at_horizon & ((promoting & fakes_up) | (reverting & fakes_down))))

    # np.select takes the first true condition: the list order is the policy order.
    policy = [
        (srm, FREEZE, Rule.SRM),
        (propensity, FREEZE, Rule.PROPENSITY),
        (suspect & (worse | (better & enough)), FREEZE, Rule.PROPENSITY),
        (selection_freeze, FREEZE, Rule.PROPENSITY),
        (reactions_bad, REVERT, Rule.REACTIONS),
        (latency_bad, REVERT, Rule.LATENCY),
        (worse & ~fakes_down, REVERT, Rule.EVIDENCE_WORSE),
        (worse, HOLD, Rule.PARITY),
        (stale & at_horizon, RETIRE, Rule.HORIZON_RETIRE),
        (stale, HOLD, Rule.STALE),
        (better & enough & lasting & ~fakes_up, PROMOTE, Rule.EVIDENCE_BETTER),
        (better & enough & lasting, HOLD, Rule.PARITY),
        (at_horizon & horizon_better & enough & horizon_lasting, PROMOTE, Rule.HORIZON_MH),
        (at_horizon & disagree, FREEZE, Rule.PAIRED),
        (at_horizon & horizon_worse, REVERT, Rule.HORIZON_WORSE),
        (at_horizon, RETIRE, Rule.HORIZON_RETIRE),
        (better & enough, HOLD, Rule.FADING),
        (better, HOLD, Rule.MIN_VOTES),
        (ramp, RAMP, Rule.RAMP),
        (disagree, HOLD, Rule.PAIRED),
    ]
    conditions = [c for c, _, _ in policy]
    action = np.select(conditions, [a for _, a, _ in policy], default=HOLD).astype(np.int8)
    rule = np.select(conditions, [_RULE[r] for _, _, r in policy],
                     default=_RULE[Rule.COLLECTING]).astype(np.int8)
    return action, rule


def evaluate(
    data: ExperimentArrays,
    config: DecisionConfig,
    concurrent_candidates: int = 1,
    current_share: npt.ArrayLike | None = None,
    max_share: float = 1.0,
) -> Trajectory:
    """The decision each hourly look takes, for every experiment of the batch.

    ``current_share`` (batch, hours) is the share in force at each look (default: the planned
    share of that hour); only the ramp rule reads it. ``max_share`` is the most the
    candidate's range can grow to where other candidates' ranges lie: the plan's share is
    capped there, so a ramp is only proposed when routing can carry it out.
    """
    data.validate()
    k = max(1, int(concurrent_candidates))
    batch, hours = data.shape
    deff = np.maximum(np.asarray(data.design_effect, dtype=np.float64), 1.0)
    acc = _accuracy_evidence(data, config, deff)
    guard = _guardrails(data, config)
    elapsed = np.arange(1, hours + 1, dtype=np.float64)
    target = np.minimum(
        np.array([config.target_share(float(e), k) for e in elapsed])[None, :], max_share)
    share_now = (np.asarray(data.planned_share, dtype=np.float64) if current_share is None
                 else np.broadcast_to(np.asarray(current_share, dtype=np.float64),
                                      (batch, hours)))
    bars = _bars(data, config, k, guard)
    paired = _paired_evidence(data, config, deff)
    action, rule = _choose(data, config, k, acc, guard, bars, target, share_now, paired)
    return Trajectory(
        action=action,
        rule=rule,
        log_e_plus=acc.log_e_plus,
        log_e_minus=acc.log_e_minus,
        log_e_srm=guard.log_e_srm,
        srm_observed_share=guard.srm_observed_share,
        srm_expected_share=guard.srm_expected_share,
        log_e_parity=guard.log_e_parity,
        propensity_bias=guard.propensity_bias,
        propensity_log_ratio=guard.propensity_log_ratio,
        propensity_z=guard.propensity_z,
        log_e_reactions=guard.log_e_reactions,
        mh_z=acc.mh_z,
        mh_odds_ratio=acc.mh_odds_ratio,
        recent_z=acc.recent_z,
        settled_z=acc.settled_z,
        log_e_settled=acc.log_e_settled,
        log_e_paired=paired.log_e_plus,
        paired_z=paired.z,
        paired_right_vote_ratio=paired.right_vote_ratio,
        paired_wrong_vote_ratio=paired.wrong_vote_ratio,
        horizon_z=bars.horizon_z,
        horizon_revert_z=bars.horizon_revert_z,
        min_votes=bars.min_votes,
        votes_a=guard.cum["votes_a"],
        correct_a=guard.cum["correct_a"],
        votes_b=guard.cum["votes_b"],
        correct_b=guard.cum["correct_b"],
        vote_rate_ratio=guard.vote_rate_ratio,
        down_ratio=guard.down_ratio,
        latency_ratio=guard.latency_ratio,
        target_share=np.broadcast_to(target, (batch, hours)).astype(np.float64),
    )


# ------------------------------------------------------------------------ the bot's entry


@dataclass(frozen=True)
class HourStats:
    """One completed hour of an experiment (absolute hour index, e.g. hours since epoch)."""

    hour: int
    votes_a: int = 0
    correct_a: int = 0
    votes_b: int = 0
    correct_b: int = 0
    served_a: int = 0
    served_b: int = 0
    new_users_a: int = 0
    new_users_b: int = 0
    planned_share: float = 0.0
    up_a: int = 0
    down_a: int = 0
    up_b: int = 0
    down_b: int = 0
    latency_n_a: int = 0
    latency_sum_a: float = 0.0
    latency_n_b: int = 0
    latency_sum_b: float = 0.0
    # Per confidence band (low, middle, high): served verdicts, verdicts with an
    # observation, and correct observations, per arm (the propensity guard's data).
    bands_served_a: tuple[int, ...] = ()
    bands_observed_a: tuple[int, ...] = ()
    bands_correct_a: tuple[int, ...] = ()
    bands_served_b: tuple[int, ...] = ()
    bands_observed_b: tuple[int, ...] = ()
    bands_correct_b: tuple[int, ...] = ()
    # The paired comparison (PairedVotes): observations whose text the other arm's prompt
    # also scored, by the vote and by whether the other prompt gave the same label.
    paired_right_a: int = 0
    paired_right_other_wrong_a: int = 0
    paired_wrong_a: int = 0
    paired_wrong_other_same_a: int = 0
    paired_right_b: int = 0
    paired_right_other_wrong_b: int = 0
    paired_wrong_b: int = 0
    paired_wrong_other_same_b: int = 0


PAIRED_FIELDS = ("right_a", "right_other_wrong_a", "wrong_a", "wrong_other_same_a",
                 "right_b", "right_other_wrong_b", "wrong_b", "wrong_other_same_b")
BAND_FIELDS = ("bands_served_a", "bands_observed_a", "bands_correct_a", "bands_served_b",
               "bands_observed_b", "bands_correct_b")
# Confidence bands of a verdict: below 0.7, up to 0.9, from 0.9 (the verdict's probability).
BAND_EDGES = (0.7, 0.9)


def band_of(confidence: float | None) -> int:
    """The confidence band of a verdict (0 = low, 1 = middle, 2 = high)."""
    if confidence is None:
        return 0
    return sum(confidence >= edge for edge in BAND_EDGES)


@dataclass(frozen=True)
class ExperimentSnapshot:
    """An experiment as the store sees it at ``now_hour``.

    ``strata`` may be sparse (hours without traffic can be left out) and must only hold
    completed hours in [start_hour, now_hour); anything else is ignored. ``design_effect``
    comes from ``analytics.stats.design_effect`` over each user's capped votes in the test.
    """

    active_id: str
    candidate_id: str
    planned_share: float
    start_hour: int
    now_hour: int
    strata: Sequence[HourStats] = ()
    concurrent_candidates: int = 1
    content_changed: bool = False
    design_effect: float = 1.0
    # The largest share the candidate's bucket range can grow to (routing.room).
    max_share: float = 1.0
    # Independent clusters (distinct voters) so far: the horizon test's degrees of freedom
    # (None: no correction).
    clusters: int | None = None
    # Per arm: which scorer produced the verdicts the evidence counts (its observations) and
    # how many each, e.g. {"gguf:qwen.gguf:1a2b3c4d5e6f7a8b": 120}. Empty when the caller
    # does not know (the simulation, a replay): then nothing is checked.
    scorers_a: Mapping[str, int] = field(default_factory=dict)
    scorers_b: Mapping[str, int] = field(default_factory=dict)
    # The voted verdicts are also scored by the other arm's prompt (the strata's paired_*
    # counts): promotions are then decided on the paired comparison (PairedVotes);
    # ``two_labels`` when the prompts choose between two labels only.
    paired: bool = False
    two_labels: bool = False


@dataclass(frozen=True)
class DecisionStats:
    """The numbers behind a decision at one look (votes are after the per-user daily cap).

    ``None`` stands for a share or ratio that is undefined so far (no data in an arm)."""

    elapsed_hours: int
    hours_left: float
    votes_a: int
    correct_a: int
    votes_b: int
    correct_b: int
    accuracy_a: float | None
    interval_a: tuple[float, float]
    accuracy_b: float | None
    interval_b: tuple[float, float]
    e_plus: float
    e_minus: float
    promote_threshold: float
    revert_threshold: float
    mh_z: float
    mh_odds_ratio: float
    horizon_z: float
    horizon_revert_z: float
    design_effect: float
    srm_e: float
    srm_threshold: float
    srm_observed_share: float | None
    srm_expected_share: float | None
    parity_e: float
    vote_rate_ratio: float | None
    # Accuracy points the difference in who votes could hide; the recent window's z.
    propensity_bias: float
    recent_z: float
    # z and e-value of the hours after the first day alone (persistence before promotion).
    settled_z: float
    settled_e: float
    # θ_b / θ_a (θ = how much more readily an arm's right verdicts are voted on than its
    # wrong ones, estimated through the confidence bands) and its z (0: not determined).
    propensity_ratio: float
    propensity_z: float
    # The paired comparison (None without one): its e-value that the candidate is better,
    # its z, and how readily the candidate's right and wrong verdicts are voted on relative
    # to the active one's (votes per served verdict on texts both prompts get right / wrong).
    paired_e: float | None
    paired_z: float | None
    paired_right_vote_ratio: float | None
    paired_wrong_vote_ratio: float | None
    # Observations (both arms) whose text the other prompt has scored (None: unpaired), and
    # the share of those voted right on which the other prompt gives another label (how much
    # the prompts disagree: the more, the weaker the paired comparison).
    paired_scored: int | None
    paired_disagreement: float | None
    min_votes: float
    reactions_e: float
    down_ratio: float | None
    latency_ratio: float | None
    planned_share: float
    target_share: float
    concurrent_candidates: int

    def to_json(self) -> dict[str, Any]:
        """Strict JSON: NaN as null, infinities as "inf"/"-inf", intervals as lists."""
        return {key: json_safe(value) for key, value in asdict(self).items()}


def json_safe(value: Any) -> Any:
    """Infinite and NaN floats as strings/None so the output is strict JSON."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: Rule
    # Completed hours of the test at this look.
    elapsed_hours: int
    # None when the look computed nothing (no completed hour yet, a restart, no file).
    stats: DecisionStats | None = None
    new_share: float | None = None
    restart: bool = False

    def stats_json(self) -> dict[str, Any]:
        """The statistics as stored in the audit log and printed by ``analyze --json``."""
        if self.stats is None:
            return {"elapsed_hours": self.elapsed_hours}
        return self.stats.to_json()


def snapshot_arrays(snapshot: ExperimentSnapshot) -> tuple[ExperimentArrays, FloatArray]:
    """Dense (1, hours) arrays from the sparse strata, plus the share in force at each look."""
    hours = max(0, snapshot.now_hour - snapshot.start_hour)
    ints = {name: np.zeros((1, hours), dtype=np.int64) for name in (
        "votes_a", "correct_a", "votes_b", "correct_b", "served_a", "served_b", "new_users_a",
        "new_users_b", "up_a", "down_a", "up_b", "down_b", "latency_n_a", "latency_n_b")}
    floats = {name: np.zeros((1, hours), dtype=np.float64)
              for name in ("latency_sum_a", "latency_sum_b")}
    share = np.full((1, hours), float("nan"))
    for row in snapshot.strata:
        i = row.hour - snapshot.start_hour
        if not 0 <= i < hours:
            continue
        for name, arr in ints.items():
            arr[0, i] += int(getattr(row, name))
        for name, farr in floats.items():
            farr[0, i] += float(getattr(row, name))
        share[0, i] = row.planned_share
    # Hours without a stratum served nothing, so their planned share never matters for the
    # SRM test; carrying the last known one keeps the ramp rule's view continuous.
    filled = share.copy()
    last = snapshot.planned_share
    for i in range(hours - 1, -1, -1):
        if np.isnan(filled[0, i]):
            filled[0, i] = last
        else:
            last = filled[0, i]
    deff = np.full((1, hours), max(1.0, float(snapshot.design_effect)))
    clusters = (None if snapshot.clusters is None
                else np.full((1, hours), float(snapshot.clusters)))
    arrays = ExperimentArrays(
        votes_a=ints["votes_a"], correct_a=ints["correct_a"], votes_b=ints["votes_b"],
        correct_b=ints["correct_b"], served_a=ints["served_a"], served_b=ints["served_b"],
        new_users_a=ints["new_users_a"], new_users_b=ints["new_users_b"],
        planned_share=filled, up_a=ints["up_a"], down_a=ints["down_a"], up_b=ints["up_b"],
        down_b=ints["down_b"], latency_n_a=ints["latency_n_a"],
        latency_sum_a=floats["latency_sum_a"], latency_n_b=ints["latency_n_b"],
        latency_sum_b=floats["latency_sum_b"], design_effect=deff, clusters=clusters,
        bands=_snapshot_bands(snapshot, hours), pairs=_snapshot_pairs(snapshot, hours),
    )
    current = filled.copy()
    if hours:
        current[0, -1] = snapshot.planned_share
    return arrays, current


def _snapshot_pairs(snapshot: ExperimentSnapshot, hours: int) -> PairedVotes | None:
    """The strata's paired counts as (1, hours) arrays; None unless the snapshot is paired."""
    if not snapshot.paired:
        return None
    arrays = {name: np.zeros((1, hours), dtype=np.int64) for name in PAIRED_FIELDS}
    for row in snapshot.strata:
        i = row.hour - snapshot.start_hour
        if 0 <= i < hours:
            for name, arr in arrays.items():
                arr[0, i] += int(getattr(row, f"paired_{name}"))
    return PairedVotes(**arrays, two_labels=snapshot.two_labels)


def _snapshot_bands(snapshot: ExperimentSnapshot, hours: int) -> VoteBands | None:
    """The strata's band counts as (1, hours, bands) arrays; None when no stratum has any."""
    if not any(row.bands_served_a or row.bands_served_b for row in snapshot.strata):
        return None
    width = len(BAND_EDGES) + 1
    arrays = {name: np.zeros((1, hours, width), dtype=np.int64) for name in BAND_FIELDS}
    for row in snapshot.strata:
        i = row.hour - snapshot.start_hour
        if not 0 <= i < hours:
            continue
        for name, arr in arrays.items():
            values = getattr(row, name)
            if values:
                arr[0, i] += np.asarray(values, dtype=np.int64)
    return VoteBands(served_a=arrays["bands_served_a"], observed_a=arrays["bands_observed_a"],
                     correct_a=arrays["bands_correct_a"], served_b=arrays["bands_served_b"],
                     observed_b=arrays["bands_observed_b"],
                     correct_b=arrays["bands_correct_b"])


# How the store names verdicts stored before scorers were recorded, and how in-process
# scorers are named ("gguf:<file>:<sha256 prefix>").
UNRECORDED_SCORER = "unrecorded"
LOCAL_SCORER_PREFIX = "gguf:"


def scorers_differ(scorers_a: Mapping[str, int], scorers_b: Mapping[str, int]) -> bool:
    """Whether two arms' verdicts were scored differently: an arm has verdicts from more than
    one scorer, or each arm has one and they are not the same. An arm without any verdict
    counted yet says nothing about the other."""
    a = {name for name, n in scorers_a.items() if n > 0}
    b = {name for name, n in scorers_b.items() if n > 0}
    # Verdicts stored before scorers were recorded came from the only scorer there was then,
    # a GGUF in process: they are that arm's one in-process scorer, if it has exactly one (an
    # upgrade in the middle of a test is not a change of scorer; a move to a server is).
    local = {name for name in a | b if name.startswith(LOCAL_SCORER_PREFIX)}
    if len(local) == 1:
        a = {next(iter(local)) if name == UNRECORDED_SCORER else name for name in a}
        b = {next(iter(local)) if name == UNRECORDED_SCORER else name for name in b}
    return len(a) > 1 or len(b) > 1 or (len(a) == 1 and len(b) == 1 and a != b)


def decide(snapshot: ExperimentSnapshot, config: DecisionConfig) -> Decision:
    """The decision at ``snapshot.now_hour`` (the same code path the simulation measures)."""
    k = max(1, snapshot.concurrent_candidates)
    elapsed = snapshot.now_hour - snapshot.start_hour
    if snapshot.content_changed:
        return Decision(Action.HOLD, Rule.RESTART, max(0, elapsed), restart=True)
    if elapsed <= 0:
        return Decision(Action.HOLD, Rule.COLLECTING, 0)
    arrays, current = snapshot_arrays(snapshot)
    traj = evaluate(arrays, config, k, current, max_share=snapshot.max_share)
    decision = decision_at(traj, elapsed - 1, snapshot, config, k)
    if decision.rule is not Rule.SRM and scorers_differ(snapshot.scorers_a,
                                                        snapshot.scorers_b):
        # Arms scored by different scorers are not compared: no promotion, revert, retire or
        # ramp on them. Only the sample-ratio freeze (about routing, not verdicts) stands.
        return Decision(Action.HOLD, Rule.SCORER_MISMATCH, decision.elapsed_hours,
                        stats=decision.stats)
    return decision


def decision_at(traj: Trajectory, i: int, snapshot: ExperimentSnapshot,
                config: DecisionConfig, k: int = 1) -> Decision:
    """The decision of look ``i`` of a one-run trajectory, with its numbers (what
    :func:`decide` returns at that look)."""
    action = int(traj.action[0, i])
    return Decision(action=ACTIONS[action], rule=RULES[int(traj.rule[0, i])],
                    elapsed_hours=i + 1, stats=_stats_at(traj, i, snapshot, config, k),
                    new_share=float(traj.target_share[0, i]) if action == RAMP else None)


def _stats_at(traj: Trajectory, i: int, snapshot: ExperimentSnapshot, config: DecisionConfig,
              k: int) -> DecisionStats:
    # The paired comparison's numbers only where it decides.
    paired = snapshot.paired and config.paired_comparison
    va, ca = int(traj.votes_a[0, i]), int(traj.correct_a[0, i])
    vb, cb = int(traj.votes_b[0, i]), int(traj.correct_b[0, i])
    acc_a, acc_b = accuracy_summary(va, ca), accuracy_summary(vb, cb)

    def e_value(log_e: npt.NDArray[np.float64]) -> float:
        return math.exp(min(float(log_e[0, i]), 700.0))

    def nan_none(x: npt.NDArray[np.float64]) -> float | None:
        value = float(x[0, i])
        return None if math.isnan(value) else value

    return DecisionStats(
        elapsed_hours=i + 1,
        hours_left=max(0.0, config.max_duration_hours - (i + 1)),
        votes_a=va, correct_a=ca, votes_b=vb, correct_b=cb,
        accuracy_a=acc_a.accuracy, interval_a=(acc_a.low, acc_a.high),
        accuracy_b=acc_b.accuracy, interval_b=(acc_b.low, acc_b.high),
        e_plus=e_value(traj.log_e_plus), e_minus=e_value(traj.log_e_minus),
        promote_threshold=k / config.alpha_promote_sequential,
        revert_threshold=k / config.alpha_revert_sequential,
        mh_z=float(traj.mh_z[0, i]), mh_odds_ratio=float(traj.mh_odds_ratio[0, i]),
        horizon_z=float(traj.horizon_z[0, i]),
        horizon_revert_z=float(traj.horizon_revert_z[0, i]),
        design_effect=max(1.0, float(snapshot.design_effect)),
        srm_e=e_value(traj.log_e_srm),
        srm_threshold=1.0 / config.alpha_srm,
        srm_observed_share=nan_none(traj.srm_observed_share),
        srm_expected_share=nan_none(traj.srm_expected_share),
        parity_e=e_value(traj.log_e_parity),
        vote_rate_ratio=nan_none(traj.vote_rate_ratio),
        propensity_bias=float(traj.propensity_bias[0, i]),
        recent_z=float(traj.recent_z[0, i]),
        settled_z=float(traj.settled_z[0, i]),
        settled_e=e_value(traj.log_e_settled),
        propensity_ratio=math.exp(float(traj.propensity_log_ratio[0, i])),
        propensity_z=float(traj.propensity_z[0, i]),
        paired_e=e_value(traj.log_e_paired) if paired else None,
        paired_z=nan_none(traj.paired_z) if paired else None,
        paired_right_vote_ratio=nan_none(traj.paired_right_vote_ratio),
        paired_wrong_vote_ratio=nan_none(traj.paired_wrong_vote_ratio),
        paired_scored=_paired_scored(snapshot, i) if paired else None,
        paired_disagreement=_paired_disagreement(snapshot, i) if paired else None,
        min_votes=float(traj.min_votes[0, i]),
        reactions_e=e_value(traj.log_e_reactions),
        down_ratio=nan_none(traj.down_ratio),
        latency_ratio=nan_none(traj.latency_ratio),
        planned_share=snapshot.planned_share,
        target_share=float(traj.target_share[0, i]),
        concurrent_candidates=k,
    )


def _paired_rows(snapshot: ExperimentSnapshot, i: int) -> list[HourStats]:
    end = snapshot.start_hour + i + 1
    return [row for row in snapshot.strata if snapshot.start_hour <= row.hour < end]


def _paired_scored(snapshot: ExperimentSnapshot, i: int) -> int:
    """Observations up to look ``i`` whose text the other prompt has scored."""
    return sum(row.paired_right_a + row.paired_wrong_a + row.paired_right_b
               + row.paired_wrong_b for row in _paired_rows(snapshot, i))


def _paired_disagreement(snapshot: ExperimentSnapshot, i: int) -> float | None:
    """Among scored observations voted right up to look ``i``, the share the other prompt
    labels differently (None before there is one)."""
    rows = _paired_rows(snapshot, i)
    right = sum(row.paired_right_a + row.paired_right_b for row in rows)
    differ = sum(row.paired_right_other_wrong_a + row.paired_right_other_wrong_b
                 for row in rows)
    return differ / right if right else None
