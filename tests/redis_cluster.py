"""A real three-node Redis Cluster on loopback ports, from the machine's redis-server (7+).

``ORCHESTRA_TEST_REDIS=cluster`` makes the test session run on one (see
tests/conftest.py); ``scripts/test`` runs the Redis-dependent suites that way
as well as against a single server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from services.cli.embedded import free_port

NODES = 3


@contextmanager
def redis_cluster(state_dir: Path) -> Iterator[str]:
    """Starts the nodes, joins them into one cluster; yields its ``redis+cluster://`` URL.

    Raises:
        RuntimeError: redis-server or redis-cli is missing, or the cluster did not form.
    """
    server, cli = machine_binary("redis-server"), machine_binary("redis-cli")
    if server is None or cli is None:
        raise RuntimeError("a Redis Cluster needs the machine's redis-server and redis-cli")
    ports = [free_port() for _ in range(NODES)]
    processes = []
    try:
        for port in ports:
            node_dir = state_dir / f"node-{port}"
            node_dir.mkdir(parents=True)
            command = [server, "--port", str(port), "--bind", "127.0.0.1"]
            command += ["--cluster-enabled", "yes", "--cluster-port", str(free_port())]
            command += ["--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no"]
            log = (node_dir / "log").open("w")
            processes.append(
                subprocess.Popen(command, cwd=node_dir, stdout=log, stderr=subprocess.STDOUT)
            )
        for port in ports:
            _wait(lambda port=port: redis.Redis(port=port).ping())
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for port in ports:
            _wait(lambda port=port: _formed(port))
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def machine_binary(name: str) -> str | None:
    """``name`` on PATH, skipping the virtualenv's bin (whose redis-server, from the
    embedded wheel, is Redis 6.2: no ``--cluster-port``)."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if folder and Path(folder).resolve() != venv_bin:
            found = shutil.which(name, path=folder)
            if found is not None:
                return found
    return None


def _formed(port: int) -> bool:
    info = redis.Redis(port=port).cluster("info")
    return info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == NODES


def _wait(ready: object, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if ready():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the Redis Cluster did not form")
        time.sleep(0.1)
