"""Sticky routing: same user, same version; raising a share keeps the users already in."""

from __future__ import annotations

import pytest

from bot import routing
from bot.routing import BUCKETS, Slice


def test_bucket_is_stable_and_in_range() -> None:
    buckets = [routing.bucket(user, "salt") for user in range(2000)]
    assert buckets == [routing.bucket(user, "salt") for user in range(2000)]
    assert all(0 <= b < BUCKETS for b in buckets)
    # A different salt reshuffles users.
    assert buckets != [routing.bucket(user, "other") for user in range(2000)]


def test_buckets_spread_evenly() -> None:
    counts = [0] * 10
    for user in range(20_000):
        counts[routing.bucket(user, "loopbot") * 10 // BUCKETS] += 1
    assert min(counts) > 1800 and max(counts) < 2200


def test_same_user_always_gets_the_same_version() -> None:
    cand = [Slice("v2", 0, 0.3)]
    for user in range(500):
        first = routing.assign(user, "s", "v1", cand)
        assert all(routing.assign(user, "s", "v1", cand) == first for _ in range(3))
        assert first.arm == ("candidate" if first.version_id == "v2" else "active")


def test_share_is_respected() -> None:
    served = sum(routing.assign(u, "s", "v1", [Slice("v2", 0, 0.1)]).version_id == "v2"
                 for u in range(20_000))
    assert 1800 < served < 2200


def test_raising_the_share_keeps_the_users_already_in() -> None:
    users = range(5000)
    shares = [0.1, 0.25, 0.5]
    served = [{u for u in users
               if routing.assign(u, "s", "v1", [Slice("v2", 3000, s)]).version_id == "v2"}
              for s in shares]
    assert served[0] < served[1] < served[2]  # strict supersets: nobody leaves


def test_place_uses_the_widest_gap_and_refuses_what_does_not_fit() -> None:
    assert routing.place([], 0.5) == 0
    first = Slice("a", 0, 0.1)
    # Right after another candidate: the middle of the gap, so both can still ramp up.
    start = routing.place([first], 0.2)
    assert start == 4500
    assert routing.room([Slice("b", start, 0.2)], 0) == 0.45
    assert routing.room([first], start) == 0.55
    with pytest.raises(routing.RoutingError):
        routing.place([Slice("a", 0, 0.5), Slice("b", 5000, 0.5)], 0.01)


def test_resize_refuses_overlap_and_overflow() -> None:
    others = [Slice("a", 0, 0.1), Slice("b", 1000, 0.2)]
    routing.check_resize(others, Slice("b", 1000, 0.9))
    with pytest.raises(routing.RoutingError, match="overlap"):
        routing.check_resize(others, Slice("a", 0, 0.2))
    with pytest.raises(routing.RoutingError, match="past the end"):
        routing.check_resize([], Slice("c", 5000, 0.6))
    with pytest.raises(routing.RoutingError):
        routing.check_resize([], Slice("c", 0, 0.0))


def test_candidates_placed_one_after_another_can_all_reach_an_even_split() -> None:
    # Each new candidate starts at 10%; with K candidates the plan ramps each to 1/(K+1).
    slices: list[Slice] = []
    for k, name in enumerate("abcd", start=1):
        slices.append(Slice(name, routing.place(slices, 0.1), 0.1))
        even = 1.0 / (k + 1)
        for s in slices:
            others = [o for o in slices if o is not s]
            assert routing.room(others, s.start) >= even - 1e-9, (name, s, even)
            routing.check_resize(others, Slice(s.version_id, s.start, even))

