"""Run the real loopbot Application (long polling, real SQLite or PostgreSQL, real model) in
a thread, against the fake Bot API, and read its database the way an operator would."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from bot.config import Settings, load_settings
from bot.devtools.fakebotapi import FakeBotAPI
from bot.devtools.pgcluster import PgCluster
from bot.store.db import Database
from bot.telegram.app import build_application, run_polling

ROOT = Path(__file__).resolve().parents[2]
ADMIN_ID = 4242


class BotHarness:
    def __init__(self, api: FakeBotAPI, model: Path, db: Path | str,
                 overrides: Mapping[str, Any] | None = None) -> None:
        """``db``: a SQLite file, or a PostgreSQL URL (see :func:`postgres_database`)."""
        self.api = api
        self.db_path = db
        env = {"TELEGRAM_BOT_TOKEN": api.token, "LOOPBOT_ADMINS": str(ADMIN_ID)}
        self.settings: Settings = load_settings(None, env=env, overrides={
            "telegram.base_url": api.base_url,
            "model.path": str(model),
            "storage.db": str(db),
            "prompts.directory": str(ROOT / "prompts"),
            "telegram.poll_timeout_s": 1,
            **(overrides or {}),
        })
        self.app = build_application(self.settings)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loopbot-under-test",
                                        daemon=True)

    def _run(self) -> None:
        try:
            run_polling(self.app, handle_signals=False)
        except BaseException as exc:  # surfaced by stop() in the test thread
            self.error = exc

    def start(self, timeout: float = 30.0) -> BotHarness:
        self._thread.start()
        state = self.app.bot_data
        # Ready once the service is up and the first long poll arrived.
        self.api.wait_for(lambda: self.error is not None or (
            state.service is not None and self.api.calls_to("getUpdates")), timeout)
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        state = self.app.bot_data
        if state.request_stop is not None and self._thread.is_alive():
            state.request_stop()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the bot did not shut down"
        if self.error is not None:
            raise self.error

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A separate connection, as another process would see the committed data."""
        if "://" in str(self.db_path):
            return asyncio.run(_query(str(self.db_path), sql, params))
        with sqlite3.connect(self.db_path) as conn:
            return conn.execute(sql, params).fetchall()


async def _query(url: str, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    # Booleans and bigints come back as Python values either way; SUM over integers is
    # a Decimal in PostgreSQL, an int in SQLite: compare them as ints.
    db = await Database.open(url, check_schema=False)
    try:
        rows = await db.fetchall(sql, params)
    finally:
        await db.close()
    return [tuple(int(v) if isinstance(v, Decimal) else v for v in row) for row in rows]


def postgres_database(cluster: PgCluster, stem: str) -> str:
    """A fresh database on the test cluster with this release's schema (as ``loopbot db
    upgrade`` leaves it); its URL."""
    url = cluster.url(cluster.create_database(f"{stem}_{uuid.uuid4().hex[:8]}"))

    async def upgrade() -> None:
        db = await Database.open(url, upgrade=True)
        await db.close()

    asyncio.run(upgrade())
    return url
