"""``/healthz`` and ``/metrics`` over HTTP, served from the bot's own event loop.

The health check answers the operator's question "would a message get an answer now?":
the model is loaded, the database takes a committed write (and no write the bot tried has
failed since the last one that went through), the inference worker is not stuck on one job,
and the disk under the database is not full. Any failure gives 503 and names the reason, so a
container orchestrator restarts the bot and a human reading the probe knows why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from aiohttp import web

from bot.ops.metrics import METRICS, Metrics
from bot.store.db import Database, WriteFailure

log = logging.getLogger(__name__)

# A verdict is one forward pass over a few hundred tokens and a reply step is one token: a
# single step this long means the worker hangs (or the machine is hopelessly overloaded).
DEFAULT_STUCK_AFTER_S = 120.0
DEFAULT_PROBE_TIMEOUT_S = 5.0
# Below this SQLite starts failing commits (WAL growth, checkpoints, backups).
DEFAULT_MIN_FREE_BYTES = 50 * 1024 * 1024


@runtime_checkable
class RuntimeStatus(Protocol):
    """What the check reads from :class:`bot.llm.runtime.ModelRuntime`."""

    busy_since: float | None

    @property
    def ready(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...

    def problems(self) -> list[str]:
        """What else is wrong (an inference server that is down), one line each."""
        ...


@dataclass(frozen=True)
class Components:
    """The parts being checked; ``None`` while the bot is still starting (or stopped)."""

    runtime: RuntimeStatus | None = None
    db: Database | None = None


@dataclass(frozen=True)
class HealthReport:
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def body(self) -> str:
        return "ok\n" if self.ok else "".join(f"{p}\n" for p in self.problems)


async def write_probe(db: Database) -> None:
    """A real write on the bot's own connection, committed and fsync'd like a vote: a write
    that is rolled back never reaches the disk, so it cannot see a read-only, full or failing
    one (see :meth:`Database.probe_write`)."""
    await db.probe_write()


def describe_failure(failure: WriteFailure, now: float | None = None) -> str:
    """One line for /healthz about a write the database refused."""
    ago = max(0.0, (time.time() if now is None else now) - failure.at)
    if failure.corrupt:
        return (f"database: damaged: {failure.error} ({failure.code}, {ago:.0f}s ago); stop "
                "the bot and put the newest backup in its place with `loopbot restore`")
    return (f"database: a write failed {ago:.0f}s ago and none has gone through since: "
            f"{failure.error} ({failure.code})")


class HealthChecker:
    def __init__(self, components: Callable[[], Components], *,
                 stuck_after_s: float = DEFAULT_STUCK_AFTER_S,
                 probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
                 min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._components = components
        self.stuck_after_s = stuck_after_s
        self.probe_timeout_s = probe_timeout_s
        self.min_free_bytes = min_free_bytes
        self._clock = clock
        # The probe is never cancelled: cancelling a statement half-way through the shared
        # connection could leave a transaction open under every other caller. A slow probe
        # keeps running and the next check waits for that same one.
        self._probe: asyncio.Task[None] | None = None

    def components(self) -> Components:
        return self._components()

    async def check(self) -> HealthReport:
        parts = self._components()
        problems: list[str] = []
        problems += self._check_runtime(parts.runtime)
        problems += await self._check_db(parts.db)
        return HealthReport(tuple(problems))

    def _check_runtime(self, runtime: RuntimeStatus | None) -> list[str]:
        if runtime is None or not runtime.ready:
            return ["model: not loaded"]
        problems = runtime.problems()
        if problems:
            return problems
        started = runtime.busy_since
        if started is not None:
            running = self._clock() - started
            if running > self.stuck_after_s:
                return [f"inference: one job has been running for {running:.0f}s "
                        f"(limit {self.stuck_after_s:g}s); {runtime.queue_depth} waiting"]
        return []

    async def _check_db(self, db: Database | None) -> list[str]:
        if db is None:
            return ["database: not open"]
        if db.closed:
            return ["database: closed"]
        problems = []
        # The free space of the database's disk, when it is a local file (a PostgreSQL
        # server's disk is seen through the probe: a full disk refuses the write).
        if not db.is_postgresql:
            try:
                free = shutil.disk_usage(db.path.parent).free
            except OSError as exc:
                problems.append(f"database: cannot read free disk space: {exc}")
            else:
                if free < self.min_free_bytes:
                    problems.append(
                        f"database: only {free // (1024 * 1024)} MiB free on its disk")
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(write_probe(db), name="loopbot-health-probe")
        probe = self._probe
        done, _ = await asyncio.wait({probe}, timeout=self.probe_timeout_s)
        probe_failed = False
        if not done:
            problems.append(f"database: a write did not get through within "
                            f"{self.probe_timeout_s:g}s (locked by another process?)")
        elif probe.exception() is not None:
            probe_failed = True
            problems.append(f"database: not writable: {probe.exception()}")
        # A probe that went through cleared an earlier refusal, except damage: the probe's
        # own page being fine says nothing about the pages a vote needs.
        failure = db.write_failure
        if failure is not None and (failure.corrupt or not probe_failed):
            problems.append(describe_failure(failure))
        return problems

    async def close(self) -> None:
        if self._probe is not None and not self._probe.done():
            # Only at shutdown, when nobody else uses the connection any more.
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe


class HealthServer:
    """An aiohttp server with ``GET /healthz`` and ``GET /metrics``."""

    def __init__(self, checker: HealthChecker, *, host: str, port: int,
                 metrics: Metrics = METRICS) -> None:
        self.checker = checker
        self.metrics = metrics
        self.host = host
        self.requested_port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        # No access log: a probe every few seconds would drown the bot's own lines.
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.requested_port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("health and metrics on http://%s:%d/healthz and /metrics", self.host, self.port)

    @property
    def port(self) -> int:
        """The bound port (differs from the configured one when that was 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the health server is not running")
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        await self.checker.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        report = await self.checker.check()
        if not report.ok:
            log.warning("health check failed: %s", "; ".join(report.problems))
        return web.Response(status=200 if report.ok else 503, text=report.body)

    async def _metrics(self, request: web.Request) -> web.Response:
        parts = self.checker.components()
        try:
            await self.metrics.refresh(parts.db, parts.runtime)
        except Exception as exc:  # the counters are still worth serving without the gauges
            log.warning("metrics: could not refresh from the database: %s", exc)
        body, content_type = self.metrics.exposition()
        # aiohttp refuses a charset inside content_type; Prometheus' type carries one.
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response
