"""How far to trust each vote, and the labelled set built only from credible ones (pure).

Not every click is true: people misclick, some click "wrong" on everything, bots click within a
fraction of a second, and a small group may vote against the truth on purpose. Mining and the
offline check learn from these labels, so a label reaches them only with credible support.

The model: every message text (near-identical texts merged into one *item*) has one true label.
Each voter, and each prompt version (its verdicts are a weak, independent-of-the-voter
opinion), is an annotator who is right with probability ``r`` ("one-coin" Dawid–Skene). The
reliabilities and the items' label posteriors are fitted together by EM with a Beta prior on
``r``, so a voter's weight comes from agreeing with other users on the same or near-identical
texts and with the consensus elsewhere. Annotators below a coin flip contribute *nothing*
(their votes are ignored, never inverted), so a group voting against the truth cannot steer a
label, and a label only counts when credible human votes support it. Implausibly fast clicks
weigh less, and so do users with many of them; admins' votes are taken as ground truth.

Public API
----------
- ``VoteRecord``: one vote with its text, the verdict it judged and the click timing.
- ``CredibilityConfig``: thresholds (documented defaults).
- ``build_credible_set(votes, config) -> CredibilityResult``: scored votes, voter profiles and
  the credible ``LabelledText`` items (one per near-identical text).
- ``normalize``, ``ngrams``, ``jaccard``: the text similarity the loop uses everywhere.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

# ----------------------------------------------------------------------------- similarity


def normalize(text: str) -> str:
    """Case, width, spacing and punctuation folded away: "太好了!!!" and "太好了" are the same
    text. A text of punctuation or emoji only keeps its symbols (it has nothing else)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(ch for ch in folded
                   if not unicodedata.category(ch).startswith(("P", "Z", "C")))
    if kept:
        return kept
    return "".join(ch for ch in folded if not ch.isspace())


def ngrams(text: str, n: int = 2) -> frozenset[str]:
    """Character n-grams of the normalised text (the whole text when it is shorter)."""
    norm = normalize(text)
    if len(norm) <= n:
        return frozenset((norm,)) if norm else frozenset()
    return frozenset(norm[i:i + n] for i in range(len(norm) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter) if inter else 0.0


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class VoteRecord:
    """One vote on one verdict.

    ``correct`` is the click; ``correct_label`` the label the voter named when it was "wrong"
    (None: not named; with two labels the other one is implied). ``verdict_at`` is when the
    verdict was made (the interaction's time), ``voted_at`` the first click. ``text`` is None
    once erased: the vote still tells about its voter, but it cannot become an example.
    """

    interaction_id: int
    voter_id: int
    version_id: str
    labels: tuple[str, ...]
    verdict: str
    correct: bool
    correct_label: str | None
    verdict_at: float
    voted_at: float
    text: str | None
    is_admin: bool = False

    def asserted(self) -> str | None:
        """The label this vote says is true (None: only "not the verdict", >2 labels)."""
        if self.correct:
            return self.verdict
        if self.correct_label is not None:
            return self.correct_label
        others = [lb for lb in self.labels if lb != self.verdict]
        return others[0] if len(others) == 1 else None


@dataclass(frozen=True)
class CredibilityConfig:
    # Texts whose character-bigram Jaccard similarity reaches this are the same item (one
    # character dropped from a 12-character text still is).
    near_duplicate: float = 0.7
    # A click this soon after the verdict was made cannot follow reading it.
    fast_click_s: float = 1.5
    # Weight of one fast click, and how much a user's share of fast clicks discounts all of
    # their votes (weight × (1 − penalty × share)).
    fast_click_weight: float = 0.2
    fast_user_penalty: float = 0.8
    # Beta prior on a voter's reliability: mean 2/3 worth 3 votes. Trust is earned: one vote
    # of a new voter is not enough for a label (posterior 2/3 < min_posterior), a few votes
    # that agree with other users and the consensus are.
    prior_right: float = 2.0
    prior_wrong: float = 1.0
    # A voter at this reliability has full trust (an honest voter's typical reliability).
    trusted_reliability: float = 0.8
    # Prompt versions as annotators start more cautiously (mean 0.7 worth 10 verdicts), so
    # that users can overrule them.
    model_prior_right: float = 7.0
    model_prior_wrong: float = 3.0
    # Versions' verdicts count this much as evidence (they are what users correct).
    model_weight: float = 0.3
    em_iterations: int = 30
    # A labelled item needs this posterior for its label (one vote of a voter with a good
    # record, reliability ≥ 0.7, passes; one of a new or doubtful voter does not) ...
    min_posterior: float = 0.7
    # ... and at least this much credible human support (sum of vote credibilities).
    min_support: float = 0.5
    # ... from at least one voter with a record: this many votes and trust ≥ 0.5. Unknown
    # voters who agree with each other are what a coordinated group looks like, so they
    # never label a text on their own.
    min_record: int = 5
    # A voter who clicks "wrong" on more than this share of verdicts (with a record) loses
    # trust in proportion: honest users correct a version only where it errs, and a version
    # wrong 85% of the time is not what a deployment serves. Agreement alone cannot catch a
    # group that only ever votes on its own texts, where nobody else disagrees with it.
    max_wrong_share: float = 0.85
    # Reliability ceiling: nobody's click is proof (except an admin's).
    max_reliability: float = 0.97
    admin_reliability: float = 0.999
    # Near-duplicate search skips character bigrams shared by more texts than this: common
    # bigrams say nothing about identity and would make the search quadratic.
    max_posting: int = 200


# ----------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Judged:
    """One verdict on an item's text: which version said what."""

    interaction_id: int
    version_id: str
    verdict: str


@dataclass(frozen=True)
class LabelledText:
    """A credible labelled text (one per group of near-identical texts)."""

    text: str
    label: str
    labels: tuple[str, ...]
    # Posterior probability of ``label`` and the credible human support behind it.
    confidence: float
    support: float
    voters: int
    admin_confirmed: bool
    judged: tuple[Judged, ...]

    def mistakes_of(self, version_id: str) -> list[Judged]:
        return [j for j in self.judged if j.version_id == version_id and j.verdict != self.label]


@dataclass(frozen=True)
class ScoredVote:
    vote: VoteRecord
    label: str | None
    credibility: float
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class VoterProfile:
    voter_id: int
    votes: int
    wrong_share: float
    fast_share: float
    reliability: float
    # 0 (ignored) .. 1 (an average honest voter or better).
    trust: float
    is_admin: bool


@dataclass(frozen=True)
class CredibilityResult:
    votes: tuple[ScoredVote, ...]
    voters: dict[int, VoterProfile]
    labelled: tuple[LabelledText, ...]
    version_reliability: dict[str, float] = field(default_factory=dict)

    def credible_votes(self, threshold: float = 0.5) -> list[ScoredVote]:
        return [v for v in self.votes if v.credibility >= threshold]

    def low_trust_voters(self, threshold: float = 0.5) -> list[VoterProfile]:
        return [p for p in self.voters.values() if p.trust < threshold]


# ----------------------------------------------------------------------------- items


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


NEGATION = re.compile(
    r"不|没|無|无|别|非|未|毫无|\b(?:not|no|never|nothing|nobody|none|neither|nor|hardly|"
    r"without)\b|n't",
    re.IGNORECASE,
)


def negations(text: str) -> tuple[str, ...]:
    """The negation words of ``text``, sorted: one more or less can flip its sentiment."""
    return tuple(sorted(m.lower() for m in NEGATION.findall(text)))


def group_texts(texts: Sequence[str], threshold: float, max_posting: int = 200) -> list[int]:
    """Group index for each text: equal normalised texts, then near-duplicates (Jaccard of
    character bigrams ≥ ``threshold``), found through an inverted index of bigrams. Texts
    whose negation words differ are never grouped: "都很好" and "都不好" are near-identical
    strings with opposite labels."""
    norm_index: dict[str, int] = {}
    firsts: list[int] = []
    group_of_norm: list[int] = []
    for i, text in enumerate(texts):
        key = normalize(text)
        if key not in norm_index:
            norm_index[key] = len(firsts)
            firsts.append(i)
        group_of_norm.append(norm_index[key])
    grams = [ngrams(texts[i]) for i in firsts]
    negs = [negations(texts[i]) for i in firsts]
    postings: dict[str, list[int]] = defaultdict(list)
    for k, g in enumerate(grams):
        for gram in g:
            postings[gram].append(k)
    uf = _UnionFind(len(firsts))
    for k, g in enumerate(grams):
        if not g:
            continue
        counts: Counter[int] = Counter()
        for gram in g:
            posting = postings[gram]
            if len(posting) <= max_posting:
                counts.update(posting)
        # Jaccard ≥ t needs |A ∩ B| ≥ t · |A|: most pairs are dismissed by the count alone.
        need = threshold * len(g) - 1e-9
        for other, shared in counts.items():
            if other <= k or shared < need * 0.5:
                continue
            if negs[k] == negs[other] and jaccard(g, grams[other]) >= threshold:
                uf.union(k, other)
    return [uf.find(group_of_norm[i]) for i in range(len(texts))]


# ----------------------------------------------------------------------------- EM


@dataclass
class _Obs:
    item: np.ndarray
    annot: np.ndarray
    label: np.ndarray
    positive: np.ndarray
    weight: np.ndarray
    # Number of labels of the observation's item.
    k: np.ndarray


def _log_lik(obs: _Obs, r: np.ndarray, k: int) -> np.ndarray:
    """log P(observation | true label = y) for every observation and y: (n_obs, k)."""
    rr = r[obs.annot][:, None]
    hit = np.arange(k)[None, :] == obs.label[:, None]
    pos = obs.positive[:, None]
    # Positive "it is l": right if y == l; negative "it is not l": right if y != l.
    right = np.where(pos, hit, ~hit)
    miss = np.where(pos, (1 - rr) / np.maximum(obs.k[:, None] - 1, 1), 1 - rr)
    out: np.ndarray = np.where(right, np.log(rr), np.log(miss)) * obs.weight[:, None]
    return out


def _posterior(obs: _Obs, possible: np.ndarray, r_used: np.ndarray,
               keep: np.ndarray | None = None) -> np.ndarray:
    """Item label posteriors (n_items, k) from the observations (``keep``: a subset)."""
    k = possible.shape[1]
    scores = np.where(possible, 0.0, -np.inf)
    lik = _log_lik(obs, r_used, k)
    if keep is None:
        np.add.at(scores, obs.item, lik)
    else:
        np.add.at(scores, obs.item[keep], lik[keep])
    scores -= scores.max(axis=1, keepdims=True)
    post = np.exp(scores)
    out: np.ndarray = post / post.sum(axis=1, keepdims=True)
    return out


def _fit(obs: _Obs, possible: np.ndarray, prior_a: np.ndarray, prior_b: np.ndarray,
         fixed: np.ndarray, r_max: float, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """EM: annotator reliabilities and the reliabilities used as evidence (clipped).
    ``possible`` (n_items, k) masks the labels an item's label set does not have."""
    r = prior_a / (prior_a + prior_b)
    r_used = r
    for _ in range(iterations):
        # Below a coin flip an annotator is ignored (r = 0.5 → zero evidence), not inverted.
        r_used = np.where(np.isnan(fixed), np.clip(r, 0.5, r_max), fixed)
        post = _posterior(obs, possible, r_used)
        p_item = post[obs.item]
        p_label = p_item[np.arange(len(obs.label)), obs.label]
        p_right = np.where(obs.positive, p_label, 1.0 - p_label)
        right = np.zeros_like(r)
        total = np.zeros_like(r)
        np.add.at(right, obs.annot, p_right * obs.weight)
        np.add.at(total, obs.annot, obs.weight)
        r = (prior_a + right) / (prior_a + prior_b + total)
    r_used = np.where(np.isnan(fixed), np.clip(r, 0.5, r_max), fixed)
    return r, r_used


# ----------------------------------------------------------------------------- the builder


def build_credible_set(votes: Iterable[VoteRecord],
                       config: CredibilityConfig | None = None) -> CredibilityResult:
    """Score every vote and build the credible labelled set.

    Items are formed per label set (a version's labels), so texts judged under different
    label sets are never merged.
    """
    cfg = config or CredibilityConfig()
    records = list(votes)
    if not records:
        return CredibilityResult((), {}, ())
    voters = _voter_history(records, cfg)
    annotators = _annotators(records, voters, cfg)
    items = _group_items(records, cfg)
    fitted = _fit_items(records, voters, annotators, items, cfg)
    state = _State(cfg, records, voters, annotators, items, fitted)
    scored = _score_votes(state)
    labelled = _credible_items(state, scored)
    return CredibilityResult(tuple(scored), _profiles(state), tuple(labelled),
                             _version_reliability(state))


@dataclass(frozen=True)
class _Voters:
    """Per-voter history: their votes, share of "wrong" and of implausibly fast clicks."""

    votes: dict[int, list[VoteRecord]]
    fast_share: dict[int, float]
    wrong_share: dict[int, float]
    admins: set[int]
    # 1 for most voters; towards 0 for one who says "wrong" to nearly everything.
    wrong_factor: dict[int, float]


@dataclass(frozen=True)
class _Annotators:
    """Voters first, then one annotator per version, with their reliability priors."""

    voter_ids: list[int]
    version_ids: list[str]
    of_voter: dict[int, int]
    of_version: dict[str, int]
    prior_a: np.ndarray
    prior_b: np.ndarray
    # Reliability fixed in advance (admins), NaN where it is fitted.
    fixed: np.ndarray


@dataclass(frozen=True)
class _Items:
    """Groups of near-identical texts, per label set; votes without a text are in none."""

    of_vote: dict[int, int]
    labelset: list[tuple[str, ...]]
    members: list[list[int]]


@dataclass(frozen=True)
class _Fitted:
    """Annotator reliabilities and the items' label posteriors (from human votes only)."""

    reliability: np.ndarray
    post: np.ndarray
    post_of_vote: dict[int, tuple[np.ndarray, tuple[str, ...]]]


@dataclass(frozen=True)
class _State:
    """Everything the scoring and labelling phases read."""

    cfg: CredibilityConfig
    records: list[VoteRecord]
    voters: _Voters
    annotators: _Annotators
    items: _Items
    fitted: _Fitted

    def trust_of(self, u: int) -> float:
        if u in self.voters.admins:
            return 1.0
        r = float(self.fitted.reliability[self.annotators.of_voter[u]])
        trust = min(1.0, max(0.0, (r - 0.5) / (self.cfg.trusted_reliability - 0.5)))
        return float(trust * self.voters.wrong_factor[u])


def _voter_history(records: Sequence[VoteRecord], cfg: CredibilityConfig) -> _Voters:
    per_voter: dict[int, list[VoteRecord]] = defaultdict(list)
    for v in records:
        per_voter[v.voter_id].append(v)
    fast_share = {u: sum(_fast(v, cfg) for v in vs) / len(vs) for u, vs in per_voter.items()}
    wrong_share = {u: sum(not v.correct for v in vs) / len(vs) for u, vs in per_voter.items()}
    admins = {u for u, vs in per_voter.items() if any(v.is_admin for v in vs)}
    # Applied to the votes' weight in the EM too, so the votes of one who says "wrong" to
    # nearly everything cannot move anyone else's reliability (the versions' included) either.
    wrong_factor = {
        u: 1.0 if u in admins or len(per_voter[u]) < cfg.min_record
        or wrong_share[u] <= cfg.max_wrong_share
        else max(0.0, (1.0 - wrong_share[u]) / (1.0 - cfg.max_wrong_share))
        for u in per_voter}
    return _Voters(per_voter, fast_share, wrong_share, admins, wrong_factor)


def _annotators(records: Sequence[VoteRecord], voters: _Voters,
                cfg: CredibilityConfig) -> _Annotators:
    voter_ids = sorted(voters.votes)
    version_ids = sorted({v.version_id for v in records})
    annot_of_voter = {u: i for i, u in enumerate(voter_ids)}
    annot_of_version = {vid: len(voter_ids) + i for i, vid in enumerate(version_ids)}
    n_annot = len(voter_ids) + len(version_ids)
    prior_a = np.array([cfg.prior_right] * len(voter_ids) + [cfg.model_prior_right]
                       * len(version_ids), dtype=np.float64)
    prior_b = np.array([cfg.prior_wrong] * len(voter_ids) + [cfg.model_prior_wrong]
                       * len(version_ids), dtype=np.float64)
    fixed = np.full(n_annot, np.nan)
    for u in voters.admins:
        fixed[annot_of_voter[u]] = cfg.admin_reliability
    return _Annotators(voter_ids, version_ids, annot_of_voter, annot_of_version, prior_a,
                       prior_b, fixed)


def _group_items(records: Sequence[VoteRecord], cfg: CredibilityConfig) -> _Items:
    by_labelset: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for idx, v in enumerate(records):
        if v.text is not None and v.text.strip():
            by_labelset[v.labels].append(idx)
    # One EM over all label sets: annotators are shared, items are per label set.
    item_of_vote: dict[int, int] = {}
    item_labelset: list[tuple[str, ...]] = []
    item_members: list[list[int]] = []
    for labelset, idxs in by_labelset.items():
        groups = group_texts([records[i].text or "" for i in idxs], cfg.near_duplicate,
                             cfg.max_posting)
        local: dict[int, int] = {}
        for i, g in zip(idxs, groups, strict=True):
            if g not in local:
                local[g] = len(item_labelset)
                item_labelset.append(labelset)
                item_members.append([])
            item_of_vote[i] = local[g]
            item_members[local[g]].append(i)
    return _Items(item_of_vote, item_labelset, item_members)


def _observations(records: Sequence[VoteRecord], voters: _Voters, annotators: _Annotators,
                  items: _Items, cfg: CredibilityConfig) -> _Obs | None:
    """The EM's evidence: each vote on an item, and each verdict once (None: nothing)."""
    o_item: list[int] = []
    o_annot: list[int] = []
    o_label: list[int] = []
    o_pos: list[bool] = []
    o_w: list[float] = []
    o_k: list[int] = []
    seen_verdicts: set[int] = set()
    for i, v in enumerate(records):
        item = items.of_vote.get(i)
        if item is None or v.verdict not in v.labels:
            continue
        index = {lb: j for j, lb in enumerate(v.labels)}
        asserted = v.asserted()
        if asserted is not None and asserted in index:
            label, positive = index[asserted], True
        else:
            label, positive = index[v.verdict], False
        o_item.append(item)
        o_annot.append(annotators.of_voter[v.voter_id])
        o_label.append(label)
        o_pos.append(positive)
        o_w.append(_vote_weight(v, voters.fast_share[v.voter_id], cfg)
                   * voters.wrong_factor[v.voter_id])
        o_k.append(len(v.labels))
        if v.interaction_id not in seen_verdicts:
            # The verdict itself, once per interaction, as the version's opinion.
            seen_verdicts.add(v.interaction_id)
            o_item.append(item)
            o_annot.append(annotators.of_version[v.version_id])
            o_label.append(index[v.verdict])
            o_pos.append(True)
            o_w.append(cfg.model_weight)
            o_k.append(len(v.labels))
    if not o_item:
        return None
    return _Obs(np.array(o_item), np.array(o_annot), np.array(o_label),
                np.array(o_pos, dtype=bool), np.array(o_w, dtype=np.float64), np.array(o_k))


def _fit_items(records: Sequence[VoteRecord], voters: _Voters, annotators: _Annotators,
               items: _Items, cfg: CredibilityConfig) -> _Fitted:
    k = max((len(ls) for ls in items.labelset), default=2)
    prior_a, prior_b, fixed = annotators.prior_a, annotators.prior_b, annotators.fixed
    reliability = prior_a / (prior_a + prior_b)
    obs = _observations(records, voters, annotators, items, cfg)
    if obs is None:
        return _Fitted(reliability, np.zeros((0, k)), {})
    possible = np.arange(k)[None, :] < np.array([len(ls) for ls in items.labelset])[:, None]
    reliability, r_used = _fit(obs, possible, prior_a, prior_b, fixed,
                               cfg.max_reliability, cfg.em_iterations)
    reliability = np.where(np.isnan(fixed), reliability, fixed)
    # The versions' verdicts helped to estimate who is reliable, but a label is decided
    # by people only: otherwise texts the model already gets right would pass more
    # easily, and the offline check would grade versions on a set tilted towards them.
    post = _posterior(obs, possible, r_used, keep=obs.annot < len(annotators.voter_ids))
    post_of_vote: dict[int, tuple[np.ndarray, tuple[str, ...]]] = {}
    for item, members in enumerate(items.members):
        for i in members:
            post_of_vote[i] = (post[item], items.labelset[item])
    return _Fitted(reliability, post, post_of_vote)


def _score_votes(state: _State) -> list[ScoredVote]:
    cfg, voters = state.cfg, state.voters
    scored: list[ScoredVote] = []
    for i, v in enumerate(state.records):
        asserted = v.asserted()
        reasons: list[str] = []
        trust = state.trust_of(v.voter_id)
        weight = _vote_weight(v, voters.fast_share[v.voter_id], cfg)
        if _fast(v, cfg):
            reasons.append("fast_click")
        if voters.fast_share[v.voter_id] > 0.5:
            reasons.append("fast_clicker")
        if trust < 0.5:
            reasons.append("low_reliability")
        agree = 1.0
        found = state.fitted.post_of_vote.get(i)
        if found is not None:
            p, labelset = found
            if asserted is not None and asserted in labelset:
                agree = float(p[labelset.index(asserted)])
            elif v.verdict in labelset:
                agree = 1.0 - float(p[labelset.index(v.verdict)])
            if agree < 0.5:
                reasons.append("disagrees")
        if v.voter_id in voters.admins:
            credibility, reasons = 1.0, ["admin"]
        else:
            credibility = trust * min(1.0, weight) * agree
        scored.append(ScoredVote(v, asserted, credibility, tuple(reasons)))
    return scored


def _credible_items(state: _State, scored: Sequence[ScoredVote]) -> list[LabelledText]:
    labelled: list[LabelledText] = []
    for item in range(len(state.items.members)):
        found = _credible_item(state, scored, item)
        if found is not None:
            labelled.append(found)
    return labelled


def _credible_item(state: _State, scored: Sequence[ScoredVote],
                   item: int) -> LabelledText | None:
    """The item's most probable label, if an admin confirms it or credible support does."""
    cfg, records, admins = state.cfg, state.records, state.voters.admins
    members = state.items.members[item]
    labelset = state.items.labelset[item]
    p = state.fitted.post[item]
    best = int(np.argmax(p[:len(labelset)]))
    chosen = labelset[best]
    support = sum(scored[i].credibility for i in members if scored[i].label == chosen)
    admin_ok = any(records[i].voter_id in admins and scored[i].label == chosen
                   for i in members)
    admin_against = any(records[i].voter_id in admins and scored[i].label not in (None,
                        chosen) for i in members)
    if admin_against:
        return None
    established = any(
        scored[i].label == chosen
        and len(state.voters.votes[records[i].voter_id]) >= cfg.min_record
        and state.trust_of(records[i].voter_id) >= 0.5 for i in members)
    if not admin_ok and (p[best] < cfg.min_posterior or support < cfg.min_support
                         or not established):
        return None
    first = records[members[0]]
    judged: dict[int, Judged] = {}
    for i in members:
        r = records[i]
        judged.setdefault(r.interaction_id, Judged(r.interaction_id, r.version_id,
                                                    r.verdict))
    # The text shown for the item is one the credible votes for its label were cast on:
    # any member could be a different sentence than the one the evidence is about.
    backing = [i for i in members if scored[i].label == chosen]
    strong = [i for i in backing if scored[i].credibility >= 0.5] or backing
    return LabelledText(
        text=_shortest_text([records[i].text or "" for i in strong]) or (first.text or ""),
        label=chosen, labels=labelset, confidence=float(p[best]), support=float(support),
        voters=len({records[i].voter_id for i in members}), admin_confirmed=admin_ok,
        judged=tuple(judged.values()),
    )


def _profiles(state: _State) -> dict[int, VoterProfile]:
    voters, annotators = state.voters, state.annotators
    return {
        u: VoterProfile(
            voter_id=u, votes=len(voters.votes[u]), wrong_share=voters.wrong_share[u],
            fast_share=voters.fast_share[u],
            reliability=float(state.fitted.reliability[annotators.of_voter[u]]),
            trust=state.trust_of(u), is_admin=u in voters.admins,
        ) for u in annotators.voter_ids
    }


def _version_reliability(state: _State) -> dict[str, float]:
    reliability, annotators = state.fitted.reliability, state.annotators
    return {vid: float(reliability[annotators.of_version[vid]])
            for vid in annotators.version_ids}


def _fast(v: VoteRecord, cfg: CredibilityConfig) -> bool:
    return (v.voted_at - v.verdict_at) < cfg.fast_click_s


def _vote_weight(v: VoteRecord, user_fast_share: float, cfg: CredibilityConfig) -> float:
    if v.is_admin:
        return 1.0
    w = cfg.fast_click_weight if _fast(v, cfg) else 1.0
    return w * max(0.0, 1.0 - cfg.fast_user_penalty * user_fast_share)


def _shortest_text(texts: Sequence[str]) -> str:
    """The group's representative: its shortest text (the cleanest few-shot example)."""
    candidates = [t.strip() for t in texts if t.strip()]
    return min(candidates, key=lambda t: (len(t), t)) if candidates else ""


def summary(result: CredibilityResult) -> dict[str, float | int]:
    """Counts for reports: votes, credible votes, low-trust voters, labelled texts."""
    credible = result.credible_votes()
    return {
        "votes": len(result.votes),
        "credible_votes": len(credible),
        "voters": len(result.voters),
        "low_trust_voters": len(result.low_trust_voters()),
        "labelled_texts": len(result.labelled),
        "mean_credibility": (math.fsum(v.credibility for v in result.votes)
                             / len(result.votes)) if result.votes else 0.0,
    }
