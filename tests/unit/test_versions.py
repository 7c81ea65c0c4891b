"""Version state: every change is atomic and writes exactly one audit entry."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import versions
from bot.prompts import PromptVersion, load_directory
from bot.store.db import DB_ERRORS, Database
from tests.dbfaults import fail_audit_inserts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def catalog() -> dict[str, PromptVersion]:
    base = load_directory(ROOT / "prompts")["v1-en"]
    made = {"v1": dataclasses.replace(base, id="v1", content_hash="h1")}
    for n in (2, 3, 4):
        made[f"v{n}"] = dataclasses.replace(base, id=f"v{n}", parent="v1",
                                            content_hash=f"h{n}")
    return made


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """Every version-state test runs on SQLite and on PostgreSQL."""
    database = await Database.open(db_url, upgrade=True)
    yield database
    await database.close()


async def _audit_count(db: Database) -> int:
    row = await db.fetchone("SELECT COUNT(*) FROM audit_log")
    assert row is not None
    return int(row[0])


async def test_fresh_database_activates_the_default_once(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    assert await versions.ensure_active(db, catalog, "v1") == "v1"
    assert await versions.ensure_active(db, catalog, "v2") == "v1"
    entries = await versions.audit_log(db)
    assert [(e.action, e.version_id, e.actor) for e in entries] == [("init", "v1", "system")]


async def test_unknown_ids_are_refused_clearly(db: Database,
                                               catalog: dict[str, PromptVersion]) -> None:
    await versions.ensure_active(db, catalog, "v1")
    for call in (versions.promote(db, "nope", catalog, actor="a", reason="r"),
                 versions.set_canary(db, "nope", 10, catalog, actor="a", reason="r"),
                 versions.retire(db, "nope", actor="a", reason="r")):
        with pytest.raises(versions.VersionError, match="unknown version 'nope'"):
            await call
    assert await _audit_count(db) == 1


async def test_canary_ramp_keeps_range_and_test_start(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await versions.ensure_active(db, catalog, "v1")
    first = await versions.set_canary(db, "v2", 10, catalog, actor="engine", reason="smoke",
                                      stats={"votes": 0}, now=100.0)
    second = await versions.set_canary(db, "v2", 50, catalog, actor="engine", reason="ramp",
                                       now=200.0)
    state = await versions.load(db)
    (cand,) = state.candidates
    assert (cand.share, cand.range_start, cand.since, cand.content_hash) == (0.5, 0, 100.0, "h2")
    assert (first.share, second.share, first.stats) == (0.1, 0.5, {"votes": 0})
    assert (first.from_state, second.from_state) == (None, "candidate")
    # A second candidate gets a disjoint range; overlapping growth is refused.
    await versions.set_canary(db, "v3", 20, catalog, actor="engine", reason="r")
    state = await versions.load(db)
    v3 = state.get("v3")
    assert v3 is not None and v3.range_start >= 5000
    with pytest.raises(versions.VersionError, match="overlap"):
        await versions.set_canary(db, "v2", 80, catalog, actor="engine", reason="r")
    with pytest.raises(versions.VersionError, match="active"):
        await versions.set_canary(db, "v1", 10, catalog, actor="engine", reason="r")
    with pytest.raises(versions.VersionError, match="above 0"):
        await versions.set_canary(db, "v4", 0, catalog, actor="engine", reason="r")
    assert await _audit_count(db) == 4


async def test_promote_then_rollback_walks_back(db: Database,
                                               catalog: dict[str, PromptVersion]) -> None:
    await versions.ensure_active(db, catalog, "v1")
    await versions.set_canary(db, "v2", 50, catalog, actor="engine", reason="r")
    before = await _audit_count(db)
    entry = await versions.promote(db, "v2", catalog, actor="engine", reason="better",
                                   stats={"e_value": 400.0})
    assert await _audit_count(db) == before + 1
    assert (entry.action, entry.version_id, entry.previous_active) == ("promote", "v2", "v1")
    assert entry.stats == {"e_value": 400.0}
    state = await versions.load(db)
    assert state.active is not None and state.active.version_id == "v2"
    assert state.active.share == 0 and state.candidates == ()
    assert state.get("v1").state == "retired"  # type: ignore[union-attr]
    await versions.promote(db, "v3", catalog, actor="admin:1", reason="manual")
    back = await versions.rollback(db, catalog, actor="admin:1", reason="bad")
    assert (back.version_id, back.previous_active) == ("v2", "v3")
    again = await versions.rollback(db, catalog, actor="admin:1", reason="still bad")
    assert (again.version_id, again.previous_active) == ("v1", "v2")
    with pytest.raises(versions.VersionError, match="nothing to roll back"):
        await versions.rollback(db, catalog, actor="admin:1", reason="r")
    with pytest.raises(versions.VersionError, match="already the active"):
        await versions.promote(db, "v1", catalog, actor="admin:1", reason="r")
    actions = [e.action for e in reversed(await versions.audit_log(db))]
    assert actions == ["init", "canary", "promote", "promote", "rollback", "rollback"]


async def test_retire_a_candidate_but_never_the_active(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await versions.ensure_active(db, catalog, "v1")
    await versions.set_canary(db, "v2", 10, catalog, actor="engine", reason="r")
    entry = await versions.retire(db, "v2", actor="engine", reason="max duration")
    assert (entry.from_state, entry.to_state) == ("candidate", "retired")
    assert (await versions.load(db)).candidates == ()
    with pytest.raises(versions.VersionError, match="active version"):
        await versions.retire(db, "v1", actor="engine", reason="r")
    with pytest.raises(versions.VersionError, match="already retired"):
        await versions.retire(db, "v2", actor="engine", reason="r")


async def test_an_edited_candidate_restarts_its_test(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await versions.ensure_active(db, catalog, "v1")
    await versions.set_canary(db, "v2", 10, catalog, actor="engine", reason="r", now=10.0)
    assert await versions.restart_edited(db, catalog, now=20.0) == []
    edited = dict(catalog, v2=dataclasses.replace(catalog["v2"], content_hash="h2-new"))
    (entry,) = await versions.restart_edited(db, edited, now=30.0)
    assert entry.action == "restart" and "h2-new" in entry.reason
    cand = (await versions.load(db)).get("v2")
    assert cand is not None and (cand.since, cand.content_hash, cand.share) == (
        30.0, "h2-new", 0.1)


async def test_an_edited_active_version_restarts_running_tests(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await versions.ensure_active(db, catalog, "v1", now=5.0)
    await versions.set_canary(db, "v2", 10, catalog, actor="engine", reason="r", now=10.0)
    edited = dict(catalog, v1=dataclasses.replace(catalog["v1"], content_hash="h1-new"))
    (entry,) = await versions.restart_edited(db, edited, now=40.0)
    assert (entry.version_id, entry.action) == ("v1", "restart")
    state = await versions.load(db)
    assert state.active is not None
    assert (state.active.version_id, state.active.since, state.active.content_hash) == (
        "v1", 40.0, "h1-new")
    assert await versions.restart_edited(db, edited, now=50.0) == []


async def test_a_change_and_its_audit_entry_commit_together(
        db: Database, catalog: dict[str, PromptVersion], tmp_path: Path) -> None:
    await versions.ensure_active(db, catalog, "v1")
    # Make the audit insert fail inside the transaction: the state change must vanish too.
    await fail_audit_inserts(db, "disk full")
    with pytest.raises(DB_ERRORS, match="disk full"):
        await versions.promote(db, "v2", catalog, actor="engine", reason="r")
    state = await versions.load(db)
    assert state.active is not None and state.active.version_id == "v1"
    assert state.get("v2") is None


async def test_rollback_after_promoting_back_and_forth_does_not_circle(
        db: Database, catalog: dict[str, PromptVersion]) -> None:
    await versions.ensure_active(db, catalog, "v1")
    await versions.promote(db, "v2", catalog, actor="admin:1", reason="try B")
    await versions.promote(db, "v1", catalog, actor="admin:1", reason="back to A")
    entry = await versions.rollback(db, catalog, actor="admin:1", reason="undo")
    assert entry.version_id == "v2"
    # B's own target was A, the version just rolled back from: nothing further back.
    with pytest.raises(versions.VersionError, match="nothing to roll back to"):
        await versions.rollback(db, catalog, actor="admin:1", reason="again")


async def test_an_unknown_id_is_echoed_bounded(db: Database,
                                               catalog: dict[str, PromptVersion]) -> None:
    await versions.ensure_active(db, catalog, "v1")
    many = {**catalog, **{f"w{i:03d}": catalog["v2"] for i in range(200)}}
    with pytest.raises(versions.VersionError) as caught:
        await versions.promote(db, "x" * 5000, many, actor="admin:1", reason="typo")
    message = str(caught.value)
    assert len(message) < 1000 and "and 184 more (/versions)" in message

