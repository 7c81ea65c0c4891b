"""The throwaway PostgreSQL cluster now lives in :mod:`bot.devtools.pgcluster` (the storage
benchmark, ``loopbot bench --store``, starts one too); re-exported here for the tests."""

from __future__ import annotations

from bot.devtools.pgcluster import (
    BINDIR_ENV,
    SERVER_OS_USER,
    SERVER_TOOLS,
    SUPERUSER,
    PgCluster,
    PgClusterError,
    PgUnavailable,
    _pid_alive,
    find_bindir,
)

__all__ = ["BINDIR_ENV", "SERVER_OS_USER", "SERVER_TOOLS", "SUPERUSER", "PgCluster",
           "PgClusterError", "PgUnavailable", "_pid_alive", "find_bindir"]
