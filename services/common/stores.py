"""Connections to PostgreSQL (asyncpg) and Redis (redis-py), and migrations.

Each service owns one PostgreSQL schema named after it and keeps its DDL in
``services/<name>/migrations/NNN_description.sql``; :func:`migrate` applies the
new ones in order under an advisory lock, so replicas starting together agree.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from importlib import resources
from typing import Any, cast

import asyncpg
import redis.asyncio as aioredis

from orchestra.common.v1 import errors_pb2
from services.common.errors import Unavailable

log = logging.getLogger(__name__)


class _Connection(asyncpg.Connection):
    """A pooled connection released without asyncpg's reset query, unless it listened.

    On every release asyncpg runs ``pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`` (a round trip and some server CPU per query). The
    services hold only transaction-scoped state: advisory locks are
    ``pg_advisory_xact_lock``, cursors live inside a transaction, no session
    ``SET``. So there is nothing to reset, except a LISTEN (discovery's catalog
    fan-out), which this class remembers and undoes.
    """

    _listened = False

    async def add_listener(self, channel: str, callback: Any) -> None:
        self._listened = True
        await super().add_listener(channel, callback)

    def get_reset_query(self) -> str:
        if self._listened:
            self._listened = False
            return "UNLISTEN *;"
        return ""


async def connect_postgres(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    wait_seconds: float = 30.0,
    user: str | None = None,
    password: str | None = None,
) -> asyncpg.Pool:
    """Opens a pool, retrying while the server starts.

    ``user`` and ``password``, when given, replace the URL's (the server and
    database stay the URL's).

    Raises:
        Unavailable: STORE_UNAVAILABLE if it does not answer in ``wait_seconds``.
    """
    deadline = asyncio.get_running_loop().time() + wait_seconds
    while True:
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                connection_class=_Connection,
                user=user,
                password=password,
            )
            assert pool is not None
            return pool
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(
                    errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
                    f"PostgreSQL did not answer: {exc}",
                    retry_after=1.0,
                ) from exc
            await asyncio.sleep(0.2)


REDIS_MAX_CONNECTIONS = 64
REDIS_POOL_WAIT_SECONDS = 2.0


# A URL with one of these schemes names a Redis Cluster (any of its nodes).
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# Connections per cluster node: redis-py's cluster client raises when they are
# all busy (it has no blocking pool), so the cap is generous.
REDIS_CLUSTER_CONNECTIONS_PER_NODE = 512


def connect_redis(url: str) -> aioredis.Redis:
    """A Redis client (connections open lazily) with short, explicit timeouts.

    ``redis://`` and ``rediss://`` URLs name one server. Its calls wait (up to
    ``REDIS_POOL_WAIT_SECONDS``) for a free connection when all
    ``REDIS_MAX_CONNECTIONS`` are busy: redis-py's default pool raises
    MaxConnectionsError instead, which a service would read as "Redis
    unreachable" (UNAVAILABLE, or a fail-open) under a burst of requests.

    ``redis+cluster://host:port`` (or ``rediss+cluster://``) names a Redis
    Cluster by any of its nodes: the client learns the others and routes each
    command to the node that holds its key's slot. Every multi-key operation
    of the services keeps its keys in one hash slot (the ``{...}`` part of the
    key), so the same code runs on either.
    """
    scheme, sep, rest = url.partition("://")
    options: dict[str, Any] = {
        "socket_connect_timeout": 2.0,
        "socket_timeout": 2.0,
        "health_check_interval": 30,
        "decode_responses": False,
    }
    if sep and scheme in CLUSTER_SCHEMES:
        cluster = aioredis.RedisCluster.from_url(
            f"{CLUSTER_SCHEMES[scheme]}://{rest}",
            max_connections=REDIS_CLUSTER_CONNECTIONS_PER_NODE,
            **options,
        )
        # The cluster client answers the same commands, scripts and pipelines
        # the services use; it is typed as a separate class.
        return cast(aioredis.Redis, cluster)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=REDIS_MAX_CONNECTIONS, timeout=REDIS_POOL_WAIT_SECONDS, **options
    )
    return aioredis.Redis(connection_pool=pool)


def text(value: object) -> str:
    """A Redis reply value as text: the clients here read bytes (``decode_responses=False``)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def row(record: Any) -> tuple[Any, ...]:
    """A dataclass instance's fields, in order, as query parameters.

    Unlike :func:`dataclasses.astuple` it does not deep-copy each value,
    which cost the budget service a few per cent of its CPU per reservation.
    """
    return tuple(getattr(record, field.name) for field in dataclasses.fields(record))


def lua_script(package: str | None, name: str) -> str:
    """The Lua script ``<package>/lua/<name>.lua`` (read once, at registration)."""
    assert package, "call with __package__ from a module inside a package"
    return (resources.files(package) / "lua" / f"{name}.lua").read_text()


async def migrate(pool: asyncpg.Pool, service: str) -> list[str]:
    """Applies the service's pending migrations; returns the names applied."""
    folder = resources.files(f"services.{service}") / "migrations"
    scripts = sorted(
        (entry.name, entry.read_text()) for entry in folder.iterdir() if entry.name.endswith(".sql")
    )
    applied: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('orchestra.migrate'))")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS public.orchestra_migrations ("
            " service text NOT NULL, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now(),"
            " PRIMARY KEY (service, name))"
        )
        done = {
            r["name"]
            for r in await conn.fetch(
                "SELECT name FROM public.orchestra_migrations WHERE service = $1", service
            )
        }
        for name, sql in scripts:
            if name in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO public.orchestra_migrations (service, name) VALUES ($1, $2)",
                service,
                name,
            )
            applied.append(name)
    if applied:
        log.info("%s: applied migrations %s", service, ", ".join(applied))
    return applied
