"""A throwaway PostgreSQL cluster for the tests and the storage benchmark (``loopbot bench
--store``).

``PgCluster().start()`` runs ``initdb`` into a fresh temporary directory and starts the server
with ``pg_ctl start -w``, listening only on a Unix socket in that same directory
(``listen_addresses = ''``, so no TCP port can clash), trust authentication for the
``postgres`` role. ``stop()`` shuts it down (``pg_ctl stop -m fast``) and removes the directory.

``initdb``, ``pg_ctl`` and ``postgres`` refuse to run as root: when this process is root they run
as the unprivileged ``postgres`` account (through ``runuser``, or ``setpriv``), and the directory
is handed to it. The binaries are found by ``find_bindir()``: ``$LOOPBOT_PG_BINDIR``, else
``pg_config --bindir``, else the newest ``/usr/lib/postgresql/*/bin``, else ``initdb`` on PATH.

Standard library only, so the benchmark can import it without the test dependencies.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

__all__ = ["PgCluster", "PgClusterError", "PgUnavailable", "find_bindir"]

BINDIR_ENV = "LOOPBOT_PG_BINDIR"
#: What a usable bindir must hold (psql and pg_isready are client tools, shipped alongside).
SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
SUPERUSER = "postgres"  # the database role created by initdb (-U), whatever the OS user
SERVER_OS_USER = "postgres"  # the OS account that runs the server when this process is root
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PgClusterError(RuntimeError):
    """The cluster could not be started or a command on it failed."""


class PgUnavailable(PgClusterError):
    """This machine cannot run a cluster at all (no binaries, no unprivileged account, ...)."""


def _has_server_tools(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in SERVER_TOOLS)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: numeric order, so 15 < 16 and 9.6 < 10.
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (-1,)


def find_bindir() -> Path | None:
    """The directory holding the PostgreSQL server binaries, or None when there is none.

    ``$LOOPBOT_PG_BINDIR`` wins when set (None if it lacks the server binaries: a wrong
    override is not silently replaced by another install).
    """
    override = os.environ.get(BINDIR_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
        return path if _has_server_tools(path) else None
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        # libpq-dev's pg_config may point at /usr/bin, which has no server: then look on.
        if out and _has_server_tools(Path(out)):
            return Path(out)
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if _has_server_tools(p)]
    if candidates:
        return max(candidates, key=_version_key)
    initdb = shutil.which("initdb")
    if initdb is not None and _has_server_tools(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    return None


def _clean_env() -> dict[str, str]:
    # PG* variables (PGHOST, PGDATABASE, PGOPTIONS, ...) would redirect or alter our commands.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"  # stable, English messages in the logs we quote in errors
    return env


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as err:
        return f"<no {path.name}: {err}>"


def _pid_alive(pid: int) -> bool:
    """Whether pid is a live process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class PgCluster:
    """One private PostgreSQL server in a temporary directory.

    >>> with PgCluster() as pg:                      # doctest: +SKIP
    ...     url = pg.url(pg.create_database("app"))  # postgresql+asyncpg://postgres@/app?host=...

    ``start(durable=True)`` keeps fsync, synchronous_commit and full_page_writes on (the
    PostgreSQL defaults), for measuring real commit latency; ``base_dir`` then chooses the
    disk the data lives on.
    """

    def __init__(self, bindir: Path | None = None, *, port: int = 5432,
                 base_dir: Path | None = None, os_user: str = SERVER_OS_USER) -> None:
        found = bindir if bindir is not None else find_bindir()
        if found is None or not _has_server_tools(found):
            tools = ", ".join(SERVER_TOOLS)
            override = os.environ.get(BINDIR_ENV, "").strip()
            raise PgUnavailable(
                f"{found} lacks the PostgreSQL server binaries ({tools})" if found else
                f"${BINDIR_ENV}={override} lacks the PostgreSQL server binaries ({tools})"
                if override else
                f"no PostgreSQL server binaries ({tools}) found (${BINDIR_ENV}, "
                f"pg_config --bindir, /usr/lib/postgresql/*/bin, PATH)")
        self.bindir = found
        self.port = port
        self.os_user = os_user
        # /tmp by default: short (a socket path is limited to ~107 bytes) and traversable by
        # the unprivileged server account, unlike root's pytest temp dirs (mode 0700).
        self._base_parent = base_dir if base_dir is not None else (
            Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir()))
        self._dir: Path | None = None
        self.durable = False
        self.start_seconds = 0.0  # wall time of the last start(): initdb + server start

    # -- paths -----------------------------------------------------------------------------

    @property
    def base(self) -> Path:
        """The temporary directory: data/, the logs and the socket."""
        if self._dir is None:
            raise PgClusterError("cluster not started")
        return self._dir

    @property
    def socket_dir(self) -> Path:
        return self.base

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def server_log(self) -> Path:
        return self.base / "server.log"

    @property
    def running(self) -> bool:
        return self._dir is not None

    # -- connection strings ----------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """A SQLAlchemy URL for asyncpg over the Unix socket."""
        port = "" if self.port == 5432 else f"&port={self.port}"
        return (f"postgresql+asyncpg://{SUPERUSER}@/{quote(dbname, safe='')}"
                f"?host={quote(str(self.socket_dir), safe='/')}{port}")

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection URI (psql, pg_dump, pg_restore, plain asyncpg.connect)."""
        port = "" if self.port == 5432 else f"&port={self.port}"
        return (f"postgresql://{SUPERUSER}@/{quote(dbname, safe='')}"
                f"?host={quote(str(self.socket_dir), safe='/')}{port}")

    # -- running commands ------------------------------------------------------------------

    def _as_server_user(self) -> list[str]:
        """The prefix that runs a command as the server's OS account."""
        if os.geteuid() != 0:
            return []
        try:
            pwd.getpwnam(self.os_user)
        except KeyError:
            raise PgUnavailable(
                f"running as root, and initdb refuses root, but there is no "
                f"{self.os_user!r} account to run PostgreSQL as") from None
        if shutil.which("runuser"):
            return ["runuser", "-u", self.os_user, "--"]
        if shutil.which("setpriv"):
            return ["setpriv", f"--reuid={self.os_user}", f"--regid={self.os_user}",
                    "--init-groups", "--"]
        raise PgUnavailable("running as root but neither runuser nor setpriv is available "
                            f"to run PostgreSQL as {self.os_user!r}")

    def _run(self, args: list[str], *, as_server: bool = False,
             timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        prefix = self._as_server_user() if as_server else []
        # cwd: the server account may not be allowed into ours (initdb warns about it).
        cwd = self._dir if self._dir is not None else None
        try:
            return subprocess.run([*prefix, *args], capture_output=True, text=True,
                                  check=False, timeout=timeout, cwd=cwd, env=_clean_env(),
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise PgClusterError(f"{Path(args[0]).name} timed out after {timeout:.0f}s"
                                 f"\n--- server log ---\n{self._log_tail()}") from err

    def _log_tail(self) -> str:
        return _tail(self.server_log) if self._dir is not None else "<no cluster directory>"

    def _tool(self, name: str) -> str:
        return str(self.bindir / name)

    # -- life cycle ------------------------------------------------------------------------

    def start(self, *, durable: bool = False, timeout: float = 60.0) -> PgCluster:
        """initdb into a new temporary directory and start the server; returns self."""
        if self._dir is not None:
            raise PgClusterError(f"cluster already running in {self._dir}")
        began = time.monotonic()
        prefix = self._as_server_user()  # fail early (PgUnavailable) before making anything
        self._dir = Path(tempfile.mkdtemp(prefix="loopbot-pg-", dir=self._base_parent))
        atexit.register(self.stop)  # a crashed or interrupted session still cleans up
        try:
            if prefix:
                entry = pwd.getpwnam(self.os_user)
                os.chown(self._dir, entry.pw_uid, entry.pw_gid)
            self.durable = durable
            self._initdb(durable)
            self._configure(durable)
            self._start_server(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _initdb(self, durable: bool) -> None:
        args = [self._tool("initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"]
        if not durable:
            args.append("--no-sync")  # throwaway data: no need to flush the new files
        done = self._run(args, as_server=True, timeout=120)
        if done.returncode != 0:
            raise PgClusterError(f"initdb failed (exit {done.returncode}):\n"
                                 f"{(done.stdout + done.stderr)[-3000:]}")

    def _configure(self, durable: bool) -> None:
        socket_dir = str(self.socket_dir).replace("'", "''")
        lines = [
            "",
            "# loopbot throwaway cluster (bot/devtools/pgcluster.py)",
            "listen_addresses = ''",  # Unix socket only: no TCP port to clash with anything
            f"unix_socket_directories = '{socket_dir}'",
            f"port = {self.port}",
            "max_connections = 100",
        ]
        if not durable:
            # Throwaway data, deleted at the end of the session: a crash loses nothing of
            # value, so skip every flush to disk. Makes commits and CREATE DATABASE cheap.
            lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        # Appending (as root too) keeps the file's owner: the server account.
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n".join(lines) + "\n")

    def _start_server(self, timeout: float) -> None:
        done = self._run([self._tool("pg_ctl"), "start", "-w", "-t", str(int(timeout)),
                          "-D", str(self.data_dir), "-l", str(self.server_log)],
                         as_server=True, timeout=timeout + 10)
        if done.returncode != 0:
            raise PgClusterError(
                f"pg_ctl start failed (exit {done.returncode}): "
                f"{(done.stdout + done.stderr).strip()[-1000:]}"
                f"\n--- server log ---\n{self._log_tail()}")
        # pg_ctl -w already waited for "ready"; confirm a client really gets through.
        deadline = time.monotonic() + timeout
        while True:
            ready = self._run([self._tool("pg_isready"), "-q", "-h", str(self.socket_dir),
                               "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres"],
                              timeout=10)
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PgClusterError(f"server not accepting connections after {timeout:.0f}s"
                                     f"\n--- server log ---\n{self._log_tail()}")
            time.sleep(0.05)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove the directory. Idempotent, never raises
        for a server that is already gone."""
        if self._dir is None:
            return
        atexit.unregister(self.stop)
        try:
            pid = self._postmaster_pid()
            if pid is not None:
                stopped = False
                with contextlib.suppress(PgClusterError, OSError):
                    done = self._run([self._tool("pg_ctl"), "stop", "-w", "-m", "fast",
                                      "-t", "30", "-D", str(self.data_dir)],
                                     as_server=True, timeout=40)
                    stopped = done.returncode == 0  # -w: the postmaster has exited
                if not stopped:
                    self._kill_postmaster(pid)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _kill_postmaster(self, pid: int) -> None:
        """pg_ctl could not stop it: end the postmaster ourselves, by its pid (SIGQUIT is
        PostgreSQL's immediate shutdown, which also ends its children)."""
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            if not (_pid_alive(pid) and self._postmaster_pid() == pid):
                return  # gone (or its pid file is, so the pid may belong to another process)
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def __enter__(self) -> PgCluster:
        if self._dir is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- databases -------------------------------------------------------------------------

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through psql (stops at the first error); returns its unaligned output."""
        done = self._run([self._tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                          "-d", self.dsn(dbname), "-c", sql], timeout=60)
        if done.returncode != 0:
            raise PgClusterError(f"psql failed (exit {done.returncode}) on {sql!r}: "
                                 f"{done.stderr.strip()[-2000:]}")
        return done.stdout

    @staticmethod
    def _check_name(name: str) -> str:
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r}: use [a-z_][a-z0-9_]*, up to 63 chars")
        return name

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name; returns name."""
        self.psql(f'CREATE DATABASE "{self._check_name(name)}"')
        return name

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS name WITH (FORCE): open connections are terminated."""
        self.psql(f'DROP DATABASE IF EXISTS "{self._check_name(name)}" WITH (FORCE)')
