"""Credibility scoring: bad voters lose weight and their labels never reach a candidate."""

from __future__ import annotations

import random
from pathlib import Path

from analytics.credibility import (
    CredibilityConfig,
    VoteRecord,
    build_credible_set,
    group_texts,
    normalize,
)
from analytics.mining import mine
from bot.learning.candidates import CandidateConfig, generate_candidate
from bot.prompts import load_version

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
POS, NEG = "正面", "负面"
LABELS = (POS, NEG)
OTHER = {POS: NEG, NEG: POS}


def _texts(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """Distinct short texts with a true label: random CJK characters plus a sentiment word,
    so no two are near-identical."""
    fine = ["很好", "不错", "满意", "喜欢", "推荐"]
    bad = ["太差", "坏了", "失望", "难吃", "很慢"]
    out = []
    for _ in range(n):
        noun = "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(6))
        if rng.random() < 0.5:
            out.append((noun + rng.choice(fine), POS))
        else:
            out.append((noun + rng.choice(bad), NEG))
    return out


def _world(seed: int = 1, *, model_accuracy: float = 0.8) -> tuple[
        list[VoteRecord], dict[str, str], set[int], int, set[str]]:
    """100 honest voters (5% noise), 10 adversaries (always against the truth), one user who
    clicks "wrong" on everything. Some texts are voted by several users; some only by
    adversaries."""
    rng = random.Random(seed)
    texts = _texts(1200, rng)
    honest = list(range(1, 101))
    adversaries = set(range(101, 111))
    always_wrong = 999
    votes: list[VoteRecord] = []
    iid = 0
    adversary_only: set[str] = set()

    def vote(user: int, text: str, truth: str) -> None:
        nonlocal iid
        iid += 1
        verdict = truth if rng.random() < model_accuracy else OTHER[truth]
        if user in adversaries:
            said = OTHER[truth]
        elif user == always_wrong:
            said = OTHER[verdict]
        else:
            said = truth if rng.random() < 0.95 else OTHER[truth]
        at = iid * 60.0
        votes.append(VoteRecord(iid, user, "v1-zh", LABELS, verdict, said == verdict,
                                None if said == verdict else said, at, at + 6.0, text))

    for i, (text, truth) in enumerate(texts):
        if i < 100:
            # Only adversaries ever voted on these texts.
            adversary_only.add(text)
            for user in rng.sample(sorted(adversaries), 2):
                vote(user, text, truth)
            continue
        voters = rng.sample(honest, rng.choice([1, 1, 2, 3]))
        if rng.random() < 0.12:
            voters.append(rng.choice(sorted(adversaries)))
        if rng.random() < 0.03:
            voters.append(always_wrong)
        for user in voters:
            vote(user, text, truth)
    return votes, dict(texts), adversaries, always_wrong, adversary_only


def test_adversaries_and_always_wrong_user_are_down_weighted() -> None:
    votes, _, adversaries, always_wrong, _ = _world()
    result = build_credible_set(votes)
    honest_trust = [result.voters[u].trust for u in range(1, 101)]
    assert sum(honest_trust) / len(honest_trust) > 0.8
    assert all(result.voters[u].trust < 0.2 for u in adversaries)
    assert result.voters[always_wrong].wrong_share == 1.0
    assert result.voters[always_wrong].trust < 0.2
    # Per vote: what the bad voters said carries (almost) no credibility.
    bad = [v.credibility for v in result.votes if v.vote.voter_id in adversaries | {always_wrong}]
    good = [v.credibility for v in result.votes if v.vote.voter_id <= 100]
    assert max(bad) < 0.2 < sum(good) / len(good)
    assert any("low_reliability" in v.reasons for v in result.votes
               if v.vote.voter_id in adversaries)


def test_adversarial_labels_do_not_reach_the_labelled_set_or_a_candidate() -> None:
    votes, truth, adversaries, _, adversary_only = _world()
    result = build_credible_set(votes)
    labelled = {item.text: item for item in result.labelled}
    assert not adversary_only & set(labelled), "texts voted only by adversaries got a label"
    wrong = [t for t, item in labelled.items() if item.label != truth[t]]
    # Only the honest voters' own 5% noise can mislabel a text, never the adversaries.
    assert len(wrong) / len(labelled) < 0.06
    for t in wrong:
        supporters = {v.vote.voter_id for v in result.votes
                      if v.vote.text == t and v.label == labelled[t].label}
        assert supporters - adversaries, f"{t!r} labelled by adversaries alone"

    parent = load_version(PROMPTS / "v1-zh.yaml")
    report = mine(result.labelled, [parent.id])
    candidate = generate_candidate(parent, result.labelled, report.get(parent.id),
                                   config=CandidateConfig(new_examples=16, max_examples=24))
    new = candidate.new_examples
    assert len(new) == 16
    for example in new:
        assert example.text not in adversary_only
        if example.label != truth[example.text]:
            # Possible only through an honest voter's own slip, never an adversary's vote.
            backers = {v.vote.voter_id for v in result.votes
                       if v.vote.text == example.text and v.label == example.label}
            assert backers and not backers & adversaries


def test_fast_clicks_weigh_little() -> None:
    rng = random.Random(3)
    texts = _texts(300, rng)
    votes = []
    iid = 0
    for i, (text, truth) in enumerate(texts):
        verdict = truth if rng.random() < 0.8 else OTHER[truth]
        # Careful voters read, then click; a bot clicks "correct" within 0.3 s on everything.
        for user in rng.sample(range(1, 21), 2):
            iid += 1
            votes.append(VoteRecord(iid, user, "v1-zh", LABELS, verdict, verdict == truth,
                                    None if verdict == truth else truth, i, i + 8.0, text))
        iid += 1
        votes.append(VoteRecord(iid, 99, "v1-zh", LABELS, verdict, True, None, i, i + 0.3,
                                text))
    result = build_credible_set(votes)
    assert result.voters[99].fast_share == 1.0
    bot_votes = [v for v in result.votes if v.vote.voter_id == 99]
    assert all("fast_click" in v.reasons for v in bot_votes)
    assert max(v.credibility for v in bot_votes) < 0.25
    careful = [v.credibility for v in result.votes if v.vote.voter_id != 99]
    assert sum(careful) / len(careful) > 0.8
    labels = {item.text: item.label for item in result.labelled}
    assert sum(labels.get(t) == truth for t, truth in texts) >= 0.95 * len(texts)


def test_admin_confirmation_decides_a_text() -> None:
    votes = [
        VoteRecord(1, 10, "v1-zh", LABELS, POS, True, None, 0, 9, "还行吧，不过有点贵"),
        VoteRecord(1, 11, "v1-zh", LABELS, POS, True, None, 0, 9, "还行吧，不过有点贵"),
        VoteRecord(2, 7, "v1-zh", LABELS, POS, False, NEG, 0, 9, "还行吧，不过有点贵！",
                   is_admin=True),
    ]
    result = build_credible_set(votes)
    (item,) = result.labelled
    assert item.label == NEG and item.admin_confirmed
    assert result.voters[7].trust == 1.0


def test_unknown_voters_cannot_label_a_text_even_together() -> None:
    lone = [VoteRecord(1, 5, "v1-zh", LABELS, POS, False, NEG, 0, 9, "一般般吧")]
    assert build_credible_set(lone).labelled == ()
    # Two unknown voters agreeing is what a coordinated group looks like: still no label.
    pair = [*lone, VoteRecord(2, 6, "v1-zh", LABELS, POS, False, NEG, 0, 9, "一般般吧。")]
    assert build_credible_set(pair).labelled == ()
    # Voter 6 earns a record by agreeing with others on other texts; then their word counts.
    rng = random.Random(2)
    history = []
    for i, (text, truth) in enumerate(_texts(8, rng)):
        for user in (6, 20 + i, 40 + i):
            history.append(VoteRecord(100 + i, user, "v1-zh", LABELS, truth, True, None, 0, 9,
                                      text))
    result = build_credible_set([*pair, *history])
    labelled = {item.text: item for item in result.labelled}
    assert labelled["一般般吧"].label == NEG and labelled["一般般吧"].voters == 2
    assert result.voters[6].votes == 9 and result.voters[6].trust > 0.5


def test_near_identical_texts_form_one_item() -> None:
    texts = ["这家店的服务太好了，下次还来！", "这家店的服务太好了 下次还来",
             "这家店服务太好了，下次还来!!", "质量很差，用了两天就坏了。"]
    groups = group_texts(texts, CredibilityConfig().near_duplicate)
    assert groups[0] == groups[1] == groups[2] != groups[3]
    assert normalize("Great!!  Product.") == normalize("great product")


def test_a_negated_near_copy_is_its_own_item() -> None:
    # Near-identical strings, opposite meanings: grouping them would give one of them the
    # other's label.
    texts = ["这个手机的屏幕和电池质量都很好", "这个手机的屏幕和电池质量都不好",
             "The battery is good", "The battery is not good"]
    groups = group_texts(texts, 0.5)
    assert len(set(groups)) == 4


def test_an_item_is_shown_with_a_text_its_label_was_given_on() -> None:
    # Established voters say a long text is positive; one vote on a shorter variant (same
    # words, so one item) backs the verdict's other label. The item must not borrow the
    # shorter text for the label it was never given on.
    rng = random.Random(4)
    history = []
    for i, (text, truth) in enumerate(_texts(8, rng)):
        for user in (1, 2, 3):
            history.append(VoteRecord(100 + i, user, "v1-zh", LABELS, truth, True, None, 0, 9,
                                      text))
    long_text, short_text = "快递很快，包装也很好，东西很满意", "快递很快，包装也很好，东西满意"
    votes = [VoteRecord(1, u, "v1-zh", LABELS, NEG, False, POS, 0, 9, long_text)
             for u in (1, 2, 3)]
    votes.append(VoteRecord(2, 77, "v1-zh", LABELS, NEG, True, None, 0, 9, short_text))
    labelled = {item.label: item for item in build_credible_set([*history, *votes]).labelled
                if item.text in (long_text, short_text)}
    assert labelled[POS].text == long_text


def test_a_group_voting_only_on_its_own_texts_cannot_label_them() -> None:
    # Four accounts say "wrong" on ten clearly positive texts of their own, which nobody else
    # votes on: they agree with each other perfectly, and agreement is all the EM sees.
    rng = random.Random(6)
    votes = []
    for i, (text, truth) in enumerate(_texts(60, rng)):
        verdict = truth if rng.random() < 0.75 else OTHER[truth]
        for user in rng.sample(range(100, 130), 2):
            said = truth if rng.random() < 0.9 else OTHER[truth]
            votes.append(VoteRecord(i, user, "v1-zh", LABELS, verdict, said == verdict, None,
                                    0, 9, text))
    honest_only = build_credible_set(votes)
    own = [f"这款{thing}真的太好了，强烈推荐" for thing in
           ("手机", "耳机", "电脑", "相机", "手表", "音箱", "键盘", "鼠标", "台灯", "背包")]
    for k, text in enumerate(own):
        for user in (900, 901, 902, 903):
            votes.append(VoteRecord(1000 + k, user, "v1-zh", LABELS, POS, False, NEG, 0, 9,
                                    text))
    result = build_credible_set(votes)
    assert all(result.voters[u].trust == 0.0 for u in (900, 901, 902, 903))
    assert not [item for item in result.labelled if item.text in own]
    # The honest voters' labels are what they are without the group.
    assert {(i.text, i.label) for i in result.labelled} == {
        (i.text, i.label) for i in honest_only.labelled}
