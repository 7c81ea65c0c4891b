"""``loopbot bench --store``: how long does a vote take to commit, on SQLite and on PostgreSQL,
when votes arrive at 50 and at 500 a second?

Each database is new: a SQLite file in a temporary directory, opened as the bot opens it
(:meth:`bot.store.db.Database.open`: WAL, ``synchronous=FULL``, one connection, one writer at
a time), and a PostgreSQL database, either the one ``--store-url`` names or one on a throwaway
cluster with the server's durable defaults (fsync, ``synchronous_commit``, full page writes:
:mod:`bot.devtools.pgcluster`), used through the bot's pool. Both get the bot's schema and
:data:`INTERACTIONS` interactions to vote on.

The load is an open loop, as real users are: write ``i`` is due at ``t0 + i / rate`` and is
started then, whether or not the writes before it have finished. Each is one
:meth:`Store.upsert_vote` (the bot's statement, its transaction, its lock) of a new voter on
one of the interactions, so it inserts a new row; one in :data:`REVOTE_EVERY` changes a vote
of a second earlier instead. Latency is the time from when the write was due to when
``upsert_vote`` returned after its commit, so waiting behind slower writes (for the SQLite
connection, for a pooled PostgreSQL connection, for the disk) counts, as a user would feel
it. Every rate runs for the same time, after a short warm-up that is not counted.

Everything goes through :mod:`bot.store`: this module writes no SQL of its own.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.devtools.pgcluster import PgCluster, PgClusterError
from bot.store.db import POSTGRESQL, parse_target
from bot.store.queries import NewInteraction, Store

DEFAULT_RATES = (50, 500)
DEFAULT_SECONDS = 10.0
INTERACTIONS = 200  # verdicts the votes are cast on
REVOTE_EVERY = 50  # one write in this many changes an earlier vote instead of adding one
WARMUP_SECONDS = 1.0  # at the lowest rate, before the counted runs: opens the connections
WARMUP_RATE = 50
DRAIN_SECONDS = 60.0  # after the last write is due, how long the stragglers may still take
BENCH_DB_NAME = "loopbot_bench"
LABELS = {"pos": 0.8, "neg": 0.2}


def _log(message: str) -> None:
    print(f"bench --store: {message}", file=sys.stderr, flush=True)


# --- the load ---------------------------------------------------------------------------------

@dataclass
class _Voters:
    """Distinct voter ids for one database's run (new rows, even in a database used before)."""

    base: int = field(default_factory=lambda: random.SystemRandom().randrange(1, 1 << 40) << 20)
    issued: int = 0

    def next(self) -> int:
        self.issued += 1
        return self.base + self.issued


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value at least ``q`` of the values are not above."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def _open_loop(store: Store, interactions: Sequence[int], voters: _Voters, *,
                     rate: float, seconds: float) -> dict[str, Any]:
    """Start one vote write every ``1 / rate`` seconds for ``seconds``; the figures."""
    loop = asyncio.get_running_loop()
    count = max(1, round(rate * seconds))
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    finished: list[float] = []
    late: list[float] = []
    written: list[tuple[int, int, bool]] = []  # (interaction, voter, correct) per write
    revotes = 0
    back = max(1, math.ceil(rate))  # writes in a second: a re-vote changes one that old

    async def write(due: float, interaction_id: int, user_id: int, correct: bool) -> None:
        try:
            vote = await store.upsert_vote(interaction_id, user_id, correct=correct,
                                           correct_label=None if correct else "neg")
        except Exception as exc:  # every failure is a figure of the run
            kind = type(exc).__name__
            errors[kind] += 1
            first_error.setdefault(kind, str(exc).splitlines()[0][:300] if str(exc) else kind)
            return
        done = loop.time()
        if vote is None:  # the interaction is gone: cannot happen here, but never hide it
            errors["VoteNotStored"] += 1
            return
        latencies.append((done - due) * 1000.0)
        finished.append(done)

    tasks: list[asyncio.Task[None]] = []
    cpu_before = _cpu_seconds()
    t0 = loop.time() + 0.05
    for i in range(count):
        due = t0 + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        late.append(max(0.0, loop.time() - due) * 1000.0)
        if i >= back and i % REVOTE_EVERY == REVOTE_EVERY - 1:
            # A voter changes their mind about the vote they cast a second ago.
            interaction_id, user_id, correct = written[i - back]
            correct = not correct
            revotes += 1
        else:
            interaction_id, user_id, correct = interactions[i % len(interactions)], \
                voters.next(), i % 3 != 0
        written.append((interaction_id, user_id, correct))
        tasks.append(asyncio.create_task(write(due, interaction_id, user_id, correct)))
    last_due = t0 + (count - 1) / rate
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, last_due + DRAIN_SECONDS
                                                       - loop.time()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
        errors["Unfinished"] += len(pending)
        first_error.setdefault("Unfinished",
                               f"still running {DRAIN_SECONDS:.0f}s after the last was due")

    ordered = sorted(latencies)
    window = max(seconds, (max(finished) - t0) if finished else seconds)
    busy = (_cpu_seconds() - cpu_before) / max(1e-9, loop.time() - t0)
    figures: dict[str, Any] = {
        "rate": rate,
        "seconds": seconds,
        "attempted": count,
        "committed": len(latencies),
        "errors": sum(errors.values()),
        "achieved_per_s": round(len(latencies) / window, 1),
        "p50_ms": round(_percentile(ordered, 0.50), 2) if ordered else None,
        "p99_ms": round(_percentile(ordered, 0.99), 2) if ordered else None,
        "max_ms": round(ordered[-1], 2) if ordered else None,
        "mean_ms": round(sum(ordered) / len(ordered), 2) if ordered else None,
        "new_votes": count - revotes,
        "revotes": revotes,
        # How late this process started writes (its own event loop busy): already inside
        # the latencies; a large figure means the client, not the database, was the limit.
        "late_start_ms_max": round(max(late), 2),
        # CPU this process used (all its threads; 100 = one core busy all the time). The
        # PostgreSQL server's own CPU is not in it.
        "client_cpu_percent": round(100.0 * busy, 1),
    }
    if errors:
        figures["error_kinds"] = dict(errors)
        figures["first_errors"] = first_error
    return figures


async def _measure(name: str, where: str, rates: Sequence[float], seconds: float
                   ) -> dict[str, Any]:
    """Schema, interactions, then each rate in turn on the database at ``where``."""
    try:
        store = await Store.open(where, upgrade=True)
    except Exception as exc:  # cannot connect, cannot create the schema: nothing measured
        raise _Unavailable(f"{type(exc).__name__}: {exc}") from exc
    try:
        voters = _Voters()
        chat_id = -voters.base  # a chat of its own: no clash with rows already there
        interactions = []
        for message_id in range(1, INTERACTIONS + 1):
            interaction, _ = await store.insert_interaction(NewInteraction(
                chat_id=chat_id, user_id=voters.next(), message_id=message_id,
                text=f"benchmark message {message_id}", version_id="bench", arm="active",
                bucket=message_id % 100, label="pos", probabilities=LABELS,
                verdict_latency_ms=1.0, scorer="bench"))
            interactions.append(interaction.id)
        await _open_loop(store, interactions, voters, rate=min(WARMUP_RATE, *rates),
                         seconds=WARMUP_SECONDS)
        results: dict[str, Any] = {}
        for rate in rates:
            _log(f"{name}: {_rate_key(rate)} writes/s for "
                 f"{seconds:g} s")
            results[_rate_key(rate)] = await _open_loop(store, interactions, voters,
                                                         rate=rate, seconds=seconds)
        return results
    finally:
        await store.close()


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def _run_on(name: str, where: str, rates: Sequence[float], seconds: float
            ) -> dict[str, Any]:
    try:
        return asyncio.run(_measure(name, where, rates, seconds))
    except _Unavailable as exc:
        return {"unavailable": _first_line(str(exc))}
    except Exception as exc:  # reported; the other database still runs
        return {"failed": _first_line(f"{type(exc).__name__}: {exc}")}


class _Unavailable(Exception):
    """The database could not be opened: there is nothing to measure."""


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:500] if text.strip() else "no reason given"


# --- the machine ------------------------------------------------------------------------------

def _mount_of(path: Path) -> tuple[str, str, str] | None:
    """(mount point, device, filesystem type) of the mount holding ``path``."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    resolved = str(path.resolve())
    best: tuple[str, str, str] | None = None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        device, point, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, device, fstype)
    return best


def _rotational(device: str) -> str:
    name = Path(device).name
    block = Path("/sys/class/block") / name
    for candidate in (block / "queue" / "rotational",
                      block.resolve().parent / "queue" / "rotational"):
        try:
            rotational = candidate.read_text().strip() == "1"
        except OSError:
            continue
        # As the kernel reports it: virtual disks often say "rotational" whatever is below.
        return "reported rotational" if rotational else "reported non-rotational"
    return "rotational: unknown"


def disk_note(path: Path) -> str:
    """Where the files of ``path`` live, e.g. ``/tmp on /dev/vda (ext4, non-rotational)``."""
    mount = _mount_of(path)
    if mount is None:
        return f"{path}: mount unknown"
    point, device, fstype = mount
    return f"{path} on {device} ({fstype}, {_rotational(device)}, mounted at {point})"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- the benchmark ----------------------------------------------------------------------------

def run_store_bench(*, store_url: str | None = None, seconds: float = DEFAULT_SECONDS,
                    rates: Sequence[float] = DEFAULT_RATES) -> dict[str, Any]:
    """Measure SQLite, then PostgreSQL (``store_url``, else a throwaway durable cluster).
    Never raises for a database that cannot be measured: its entry says why."""
    # (Only a postgres... URL reaches parse_target: for a path it would create its folder.)
    if store_url is not None and not (store_url.startswith("postgres")
                                      and parse_target(store_url).dialect == POSTGRESQL):
        raise ValueError(f"--store-url {store_url!r}: a postgresql:// URL is expected")
    machine: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "loadavg_start": _loadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "disk": {},
    }
    databases: dict[str, Any] = {}
    store: dict[str, Any] = {}

    tmp = Path(tempfile.mkdtemp(prefix="loopbot-bench-store-"))
    try:
        machine["disk"]["sqlite"] = disk_note(tmp)
        databases["sqlite"] = {"where": "a new file in a temporary directory",
                               "settings": "WAL, synchronous=FULL, one connection"}
        store["sqlite"] = _run_on("sqlite", str(tmp / "bench.db"), rates, seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if store_url is not None:
        databases["postgresql"] = {"where": parse_target(store_url).display,
                                   "settings": "as the server is configured (--store-url)"}
        machine["disk"]["postgresql"] = "the --store-url server's (not measured here)"
        store["postgresql"] = _run_on("postgresql", store_url, rates, seconds)
    else:
        cluster: PgCluster | None = None
        try:
            _log("postgresql: starting a throwaway durable cluster")
            cluster = PgCluster().start(durable=True)
            url = cluster.url(cluster.create_database(BENCH_DB_NAME))
        except (PgClusterError, OSError) as exc:
            if cluster is not None:
                cluster.stop()
            store["postgresql"] = {"unavailable": _first_line(f"{type(exc).__name__}: {exc}")}
        else:
            try:
                databases["postgresql"] = {
                    "where": f"a throwaway cluster ({cluster.bindir}), Unix socket",
                    "settings": "fsync=on, synchronous_commit=on, full_page_writes=on; "
                                "the bot's pool (5 + 10 overflow)"}
                machine["disk"]["postgresql"] = disk_note(cluster.data_dir)
                store["postgresql"] = _run_on("postgresql", url, rates, seconds)
            finally:
                cluster.stop()
    machine["loadavg_end"] = _loadavg()
    return {"store": store, "databases": databases, "machine": machine}


def format_table(result: dict[str, Any]) -> str:
    """The figures as a table, one row per database and rate."""
    header = (f"{'database':<11}{'rate/s':>7}{'attempted':>10}{'committed':>10}"
              f"{'achieved/s':>11}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
              f"{'client cpu%':>12}")
    lines = ["vote commit latency, open loop (latency = commit returned - write due)",
             header, "-" * len(header)]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for name, figures in result["store"].items():
        if "unavailable" in figures or "failed" in figures:
            reason = figures.get("unavailable") or figures.get("failed")
            word = "unavailable" if "unavailable" in figures else "failed"
            lines.append(f"{name:<11}{word}: {reason}")
            continue
        for key, row in figures.items():
            lines.append(
                f"{name:<11}{key:>7}{row['attempted']:>10}{row['committed']:>10}"
                f"{row['achieved_per_s']:>11.1f}{row['errors']:>7}{ms(row['p50_ms']):>9}"
                f"{ms(row['p99_ms']):>9}{ms(row['max_ms']):>9}"
                f"{row['client_cpu_percent']:>12.0f}")
            for kind, message in row.get("first_errors", {}).items():
                lines.append(f"{'':<11}  {kind} x{row['error_kinds'][kind]}: {message}")
    lines.append("")
    for name, about in result.get("databases", {}).items():
        lines.append(f"{name}: {about['where']}; {about['settings']}")
    machine = result["machine"]
    lines.append(f"machine: {machine['cpu_count']} CPUs, load average "
                 f"{machine['loadavg_start']} before, {machine['loadavg_end']} after; "
                 f"{machine['platform']}, Python {machine['python']}")
    for name, note in machine["disk"].items():
        lines.append(f"disk ({name}): {note}")
    return "\n".join(lines)


def parse_rates(text: str) -> tuple[float, ...]:
    """``"50,500"`` -> (50.0, 500.0): positive rates, writes a second."""
    rates = tuple(float(part) for part in text.split(",") if part.strip())
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise ValueError(f"rates {text!r}: positive numbers, comma-separated")
    return rates
