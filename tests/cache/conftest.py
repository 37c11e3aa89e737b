"""Fixtures for the cache tests: the real service on a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import redis.asyncio as aioredis

from orchestra.cache.v1 import cache_service_pb2_grpc
from services.cache.server import CacheService, build
from services.common import settings as settings_mod
from services.common.stores import connect_redis

if TYPE_CHECKING:
    Stub = cache_service_pb2_grpc.CacheServiceAsyncStub
else:  # the async stub type exists only for type checkers
    Stub = cache_service_pb2_grpc.CacheServiceStub
StartCache = Callable[..., Awaitable[Stub]]


@pytest.fixture
async def start_cache(
    make_settings: Callable[..., settings_mod.Settings],
    redis_url: str,
    serve: Callable[..., Awaitable[Any]],
) -> AsyncIterator[StartCache]:
    """Starts a cache replica (on the test Redis unless told otherwise).

    Usage: ``stub = await start_cache(env={...}, redis_url=...)``.
    """
    channels: list[grpc.aio.Channel] = []

    async def start(env: Mapping[str, str] | None = None, url: str | None = None) -> Stub:
        service: CacheService = await build(
            make_settings(REDIS_URL=url or redis_url), env=dict(env or {})
        )
        running = await serve(service)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        channels.append(channel)
        return cache_service_pb2_grpc.CacheServiceStub(channel)

    yield start
    for channel in channels:
        await channel.close()


@pytest.fixture
async def stub(start_cache: StartCache) -> Stub:
    """A stub of one cache replica with the default settings."""
    return await start_cache()


@pytest.fixture
def internal(as_caller: Callable[..., list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Metadata of a suite service (the router) calling with SCOPE_INTERNAL."""
    return as_caller("", "internal", key_id="service:router")


@pytest.fixture
def admin(as_caller: Callable[..., list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Metadata of an administrator of tenant ``acme``."""
    return as_caller("acme", "admin")


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A direct client on the test Redis, for inspecting what the service wrote."""
    client = connect_redis(redis_url)
    yield client
    await client.aclose()
