"""The throwaway PostgreSQL cluster (tests/pgcluster) and its fixtures: pg_url, db_url."""

from __future__ import annotations

import subprocess

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.pgcluster import PgCluster, _pid_alive

BIG = -1001234567890  # beyond 32 bits: a BIGINT must keep it exactly

_seen: list[str] = []  # pg_url values handed out in this module, in order


@pytest.mark.postgres
async def test_server_version_and_bigint_round_trip(pg_url: str) -> None:
    engine = create_async_engine(pg_url)
    try:
        async with engine.begin() as conn:
            version = (await conn.execute(text("SELECT version()"))).scalar_one()
            assert "PostgreSQL 15" in version
            await conn.execute(text("CREATE TABLE t (id serial PRIMARY KEY, v BIGINT NOT NULL)"))
            await conn.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": BIG})
        async with engine.connect() as conn:
            value = (await conn.execute(text("SELECT v FROM t"))).scalar_one()
            assert value == BIG and type(value) is int
            fsync = (await conn.execute(text("SHOW fsync"))).scalar_one()
            assert fsync == "off"  # the session cluster is the fast, throwaway kind
    finally:
        await engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_its_own_fresh_database(pg_url: str, pg_cluster: PgCluster,
                                                     run: int) -> None:
    assert pg_url not in _seen
    # Databases of earlier tests were dropped at their teardown.
    existing = set(pg_cluster.psql("SELECT datname FROM pg_database").split())
    for earlier in _seen:
        assert earlier.split("?")[0].rsplit("/", 1)[1] not in existing
    _seen.append(pg_url)
    engine = create_async_engine(pg_url)
    try:
        async with engine.begin() as conn:
            tables = (await conn.execute(text(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"))).scalar_one()
            assert tables == 0  # nothing left over from the other run
            await conn.execute(text("CREATE TABLE marker (run int)"))
            await conn.execute(text("INSERT INTO marker VALUES (:run)"), {"run": run})
            name = (await conn.execute(text("SELECT current_database()"))).scalar_one()
            assert pg_url.split("?")[0].endswith("/" + name)
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_two_databases_are_distinct(pg_cluster: PgCluster) -> None:
    first = pg_cluster.create_database("distinct_a")
    second = pg_cluster.create_database("distinct_b")
    engines = [create_async_engine(pg_cluster.url(name)) for name in (first, second)]
    try:
        async with engines[0].begin() as conn:
            await conn.execute(text("CREATE TABLE only_in_a (x int)"))
        async with engines[1].connect() as conn:
            found = (await conn.execute(text("SELECT to_regclass('only_in_a')"))).scalar_one()
            assert found is None
        # The pools still hold a connection to each: DROP ... WITH (FORCE) must not mind.
        pg_cluster.drop_database(first)
        pg_cluster.drop_database(second)
        assert not {first, second} & set(pg_cluster.psql("SELECT datname FROM pg_database")
                                         .split())
    finally:
        for engine in engines:
            await engine.dispose()
        pg_cluster.drop_database(first)
        pg_cluster.drop_database(second)


@pytest.mark.postgres
def test_dsn_works_for_pg_dump(pg_cluster: PgCluster, pg_url: str) -> None:
    name = pg_url.split("?")[0].rsplit("/", 1)[1]
    pg_cluster.psql("CREATE TABLE dumped (v bigint)", dbname=name)
    done = subprocess.run([str(pg_cluster.bindir / "pg_dump"), "--schema-only",
                           pg_cluster.dsn(name)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "CREATE TABLE public.dumped" in done.stdout


def test_db_url_covers_both_backends(db_url: str, request: pytest.FixtureRequest) -> None:
    if request.node.callspec.id == "sqlite":
        assert db_url.startswith("sqlite+aiosqlite:////") and db_url.endswith("/loopbot.db")
        assert request.node.get_closest_marker("postgres") is None
    else:
        assert db_url.startswith("postgresql+asyncpg://postgres@/t_")
        assert request.node.get_closest_marker("postgres") is not None


@pytest.mark.postgres
def test_durable_cluster_keeps_fsync_and_cleans_up(pg_cluster: PgCluster) -> None:
    # A second, private cluster, the kind `loopbot bench --store` will use (pg_cluster only
    # for its skip-or-fail handling of missing binaries, and its bindir).
    with PgCluster(pg_cluster.bindir, port=5433).start(durable=True) as pg:
        settings = pg.psql("SHOW fsync; SHOW synchronous_commit; SHOW full_page_writes")
        assert settings.split() == ["on", "on", "on"]
        assert pg.url().endswith(f"?host={pg.socket_dir}&port=5433")
        base, pid = pg.base, pg._postmaster_pid()
        assert pid is not None and _pid_alive(pid)
    assert not base.exists()
    assert not _pid_alive(pid)
    assert not pg.running
