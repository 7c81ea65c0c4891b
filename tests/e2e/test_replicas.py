"""Two `loopbot run` replicas in webhook mode on one real PostgreSQL, as deploy/'s
compose.replicas.yaml runs them behind nginx: the test is the load balancer.

- Updates are posted to the replicas in turn, and some to both (a redelivery that reaches
  the other replica): every message is answered once, every vote stored once.
- The hourly decision: the replica that runs it is killed (SIGKILL) in the middle of writing
  the decision; the other replica takes the period over and writes it: one audit entry and
  one message to the admin.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from bot.bench_load_cli import terminate
from bot.devtools.fakebotapi import FakeBotAPI
from bot.devtools.pgcluster import PgCluster
from bot.store.db import Database
from tests.e2e.botharness import ADMIN_ID, ROOT, postgres_database
from tests.e2e.test_experiment_job import promotable_test
from tests.e2e.test_ops_webhook import SECRET_HEADER, free_port, http, wait_healthy
from tests.unit.test_experiment import B

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SECRET = "replicas-shared-secret_0123456789"
HOURS = 30


class Replica:
    def __init__(self, name: str, api: FakeBotAPI, model: Path, url: str, folder: Path,
                 config: Path) -> None:
        self.name, self.api, self.model, self.url = name, api, model, url
        self.folder, self.config = folder, config
        self.listen, self.health = free_port(), free_port()
        self.hook = f"http://127.0.0.1:{self.listen}/telegram/hook"
        self.log = folder / f"{name}.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LOOPBOT_", "TELEGRAM_"))}
        env.update(
            TELEGRAM_BOT_TOKEN=api.token, LOOPBOT_ADMINS=str(ADMIN_ID),
            LOOPBOT_LOG_LEVEL="INFO", PYTHONPATH=str(ROOT),
            LOOPBOT_DATABASE_URL=url, LOOPBOT_REPLICAS="2", LOOPBOT_REPLICA_ID=name,
            LOOPBOT_WEBHOOK_URL="https://bot.example/telegram/hook",
            LOOPBOT_WEBHOOK_LISTEN=f"127.0.0.1:{self.listen}",
            LOOPBOT_WEBHOOK_SECRET=SECRET, LOOPBOT_WEBHOOK_REGISTER="false",
            LOOPBOT_HEALTH_PORT=str(self.health), LOOPBOT_HEALTH_HOST="127.0.0.1")
        args = [sys.executable, "-m", "bot", "run", "--config", str(config), "--base-url",
                api.base_url, "--model", str(model), "--prompts", str(ROOT / "prompts")]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, env=env, cwd=folder, stdout=out,
                                         stderr=subprocess.STDOUT)

    def restarted(self) -> Replica:
        """The same replica started again (its container restarted): same name."""
        return Replica(self.name, self.api, self.model, self.url, self.folder, self.config)

    def post(self, update: dict[str, Any]) -> int:
        status, _ = http(self.hook, update, {SECRET_HEADER: SECRET})
        return status

    def stop(self) -> None:
        terminate(self.proc)


def _query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async def run() -> list[tuple[Any, ...]]:
        db = await Database.open(url, check_schema=False)
        try:
            return [tuple(r) for r in await db.fetchall(sql, params)]
        finally:
            await db.close()
    return asyncio.run(run())


async def _prepare(url: str, now: float) -> None:
    """A running test that the engine promotes at its next look, and a trap: the first
    audit-log insert (the decision) sleeps inside its transaction, so the replica writing it
    can be killed half-way. The sequence is not rolled back with the transaction, so the
    replica that takes over does not sleep."""
    db = await Database.open(url)
    try:
        await promotable_test(db, now)
        async with db.transaction() as conn:
            await conn.execute("CREATE SEQUENCE decision_trap")
            await conn.execute(
                "CREATE FUNCTION decision_trap_fn() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN IF nextval('decision_trap') = 1 THEN PERFORM pg_sleep(600); END IF;"
                " RETURN NEW; END $$")
            await conn.execute("CREATE TRIGGER decision_trap BEFORE INSERT ON audit_log"
                               " FOR EACH ROW EXECUTE FUNCTION decision_trap_fn()")
    finally:
        await db.close()


@pytest.fixture
def replicas(pg_cluster: PgCluster, tiny_gguf: Path, tmp_path: Path
             ) -> Iterator[tuple[FakeBotAPI, str, list[Replica]]]:
    url = postgres_database(pg_cluster, "replicas")
    # A killed client's backend notices within half a second, not when its sleep ends.
    dbname = make_url(url).database
    pg_cluster.psql(f"ALTER DATABASE {dbname} SET client_connection_check_interval = 500")
    asyncio.run(_prepare(url, time.time()))
    config = tmp_path / "config.yaml"
    # The decision job looks every 3 s: each look is a period of its own.
    config.write_text("experiment:\n  interval_minutes: 0.05\n", encoding="utf-8")
    with FakeBotAPI() as api:
        api.webhook = {"url": "https://bot.example/telegram/hook", "secret_token": SECRET,
                       "allowed_updates": '["message", "callback_query", "message_reaction"]'}
        running = [Replica(name, api, tiny_gguf, url, tmp_path, config)
                   for name in ("r1", "r2")]
        try:
            for replica in running:
                assert wait_healthy(replica.health, timeout=90) == "ok\n"
            yield api, url, running
        finally:
            for replica in running:
                replica.stop()


def _texts_to(api: FakeBotAPI, chat_id: int) -> list[str]:
    return [c.params["text"] for c in api.calls_to("sendMessage", chat_id=str(chat_id))]


def test_two_replicas_answer_once_store_votes_once_and_a_killed_job_is_run_once(
        replicas: tuple[FakeBotAPI, str, list[Replica]]) -> None:
    api, url, (r1, r2) = replicas
    by_name = {"r1": r1, "r2": r2}

    # --- the hourly decision: one replica takes it and is killed while writing it ------
    deadline = time.monotonic() + 60
    holder = None
    while time.monotonic() < deadline and holder is None:
        sleeping = _query(url, "SELECT COUNT(*) FROM pg_stat_activity"
                               " WHERE query LIKE 'INSERT INTO audit_log%'"
                               " AND wait_event = 'PgSleep'")
        rows = _query(url, "SELECT holder FROM job_runs WHERE name = 'loopbot-experiment'"
                           " AND holder IS NOT NULL")
        if sleeping[0][0] and rows:
            holder = str(rows[0][0])
        time.sleep(0.2)
    assert holder in by_name, "no replica got stuck writing the decision"
    killed, survivor = by_name[holder], by_name["r2" if holder == "r1" else "r1"]
    killed.proc.kill()
    killed.proc.wait(10)

    promoted = api.wait_for(lambda: [t for t in _texts_to(api, ADMIN_ID) if "PROMOTE" in t],
                            timeout=60)
    time.sleep(4.0)  # more looks (every 3 s): nobody decides or tells it again
    entries = _query(url, "SELECT actor, action, version_id FROM audit_log"
                          " WHERE action = 'promote'")
    assert entries == [("engine", "promote", B)]
    assert len(promoted) == 1 and len([t for t in _texts_to(api, ADMIN_ID)
                                       if "PROMOTE" in t]) == 1
    assert _query(url, "SELECT id FROM prompt_versions WHERE state = 'active'") == [(B,)]

    # --- messages posted to the replicas in turn, some to both --------------------------
    # The killed replica is restarted under its own name, as its container would be.
    restarted = killed.restarted()
    try:
        assert wait_healthy(restarted.health, timeout=90) == "ok\n"
        pair = [survivor, restarted]
        users = [api.user(91_000 + n) for n in range(6)]
        updates: list[dict[str, Any]] = []
        for n, user in enumerate(users):
            update = {"update_id": 700_000 + n,
                      "message": {**api.user_message(user), "text": f"I like it, take {n}"}}
            updates.append(update)
            assert pair[n % 2].post(update) == 200
            if n % 3 == 0:  # delivered again, to the other replica
                assert pair[(n + 1) % 2].post(update) == 200
        def answered_all() -> bool:
            return all(len(api.bot_messages(u["id"])) >= 2 for u in users)

        api.wait_for(answered_all, timeout=120)
        time.sleep(2.0)  # a second answer, if any, would be sent by now
        for user in users:
            verdicts = [m for m in api.bot_messages(user["id"]) if m.get("reply_markup")]
            assert len(verdicts) == 1, (user["id"], api.bot_messages(user["id"]))
        stored = _query(url, "SELECT COUNT(*), COUNT(DISTINCT message_id) FROM interactions"
                             " WHERE user_id >= 91000 AND user_id < 91006")
        assert stored == [(6, 6)]

        # Every user votes "correct" on their verdict; each click reaches both replicas.
        for n, user in enumerate(users):
            verdict = next(m for m in api.bot_messages(user["id"]) if m.get("reply_markup"))
            data = verdict["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
            click = {"update_id": 800_000 + n, "callback_query": {
                "id": f"cq-replicas-{n}", "from": user, "message": verdict,
                "chat_instance": f"ci{user['id']}", "data": data}}
            assert pair[n % 2].post(click) == 200
            assert pair[(n + 1) % 2].post(click) == 200
        api.wait_for(lambda: _query(url, "SELECT COUNT(*) FROM votes WHERE user_id >= 91000"
                                         " AND user_id < 91006") == [(6,)], timeout=60)
        time.sleep(1.0)
        votes = _query(url, "SELECT interaction_id, user_id, changes FROM votes"
                            " WHERE user_id >= 91000 AND user_id < 91006")
        assert len(votes) == 6 and all(changes == 0 for _, _, changes in votes)
        answered = [c for c in api.calls_to("answerCallbackQuery")
                    if str(c.params.get("callback_query_id", "")).startswith("cq-replicas-")]
        assert len(answered) == 6  # one answer per click, by the replica that handled it
        done = _query(url, "SELECT COUNT(*) FROM inbox WHERE update_id >= 700000"
                           " AND state = 'done'")
        assert done == [(12,)]
    finally:
        restarted.stop()
