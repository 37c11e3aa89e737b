"""A store out of reach becomes UNAVAILABLE STORE_UNAVAILABLE, the same way in every service.

Which exceptions mean "PostgreSQL (or Redis) cannot be reached right now" is
decided once here; anything else (a constraint violation, a script bug, a wrong
type) is not an outage and propagates, to be reported as INTERNAL. Use
:data:`postgres_outage` or :data:`redis_outage` as a context manager (``with``
or ``async with``) or as a decorator of a coroutine function::

    @postgres_outage
    async def get_tenant(self, tenant_id: str) -> Tenant: ...

    with redis_outage:
        await client.get(key)

The client gets ``RetryInfo`` (a second) and ``ErrorInfo.metadata["store"]``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import ParamSpec, TypeVar

import asyncpg
import redis.exceptions

from orchestra.common.v1 import errors_pb2
from services.common.errors import Unavailable

P = ParamSpec("P")
R = TypeVar("R")

RETRY_AFTER_SECONDS = 1.0

POSTGRES_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # A pooled connection whose server went away under an operation can be
    # left mid-protocol; the next use fails with "cannot switch to state …;
    # another operation is in progress" (seen under bench/chaos.py's
    # PostgreSQL restart). The pool replaces the connection.
    asyncpg.InternalClientError,
)
"""PostgreSQL is unreachable, restarting, shutting down or out of connections."""

REDIS_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
)
"""Redis is unreachable, loading its data, or a replica that cannot take writes."""


def store_unavailable(store: str, exc: BaseException) -> Unavailable:
    """The error a client gets when ``store`` ("postgresql", "redis") cannot be reached."""
    return Unavailable(
        errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
        f"{store} is unreachable: {type(exc).__name__}",
        metadata={"store": store},
        retry_after=RETRY_AFTER_SECONDS,
    )


class StoreOutage:
    """Maps a store's outage exceptions to :func:`store_unavailable`.

    A context manager (sync and async) and a decorator for coroutine functions.
    """

    def __init__(self, store: str, down: tuple[type[BaseException], ...]) -> None:
        self.store = store
        self.down = down

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and isinstance(exc, self.down):
            raise store_unavailable(self.store, exc) from exc

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await func(*args, **kwargs)
            except self.down as exc:
                raise store_unavailable(self.store, exc) from exc

        return wrapper


postgres_outage = StoreOutage("postgresql", POSTGRES_DOWN)
redis_outage = StoreOutage("redis", REDIS_DOWN)
