"""Maps store outages to UNAVAILABLE (STORE_UNAVAILABLE with RetryInfo).

Store methods are decorated so that a PostgreSQL or Redis connection failure
reaches the client as a retryable status instead of an INTERNAL incident; the
budget service fails closed.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import asyncpg
import redis.exceptions

from orchestra.common.v1 import errors_pb2
from services.common.errors import Unavailable

P = ParamSpec("P")
R = TypeVar("R")

RETRY_AFTER_SECONDS = 1.0

PG_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
)
_REDIS_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)


def store_unavailable(store: str, exc: BaseException) -> Unavailable:
    """The error a client gets when ``store`` cannot be reached."""
    return Unavailable(
        errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
        f"{store} is unreachable: {type(exc).__name__}",
        metadata={"store": store},
        retry_after=RETRY_AFTER_SECONDS,
    )


def postgres(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorates a coroutine that talks to PostgreSQL."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await func(*args, **kwargs)
        except PG_DOWN as exc:
            raise store_unavailable("postgresql", exc) from exc

    return wrapper


def redis_store(func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorates a coroutine that talks to Redis."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await func(*args, **kwargs)
        except _REDIS_DOWN as exc:
            raise store_unavailable("redis", exc) from exc

    return wrapper
