"""Builds the cache service from the settings: Redis, the core, the servicer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
import redis.asyncio as aioredis

from orchestra.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from services.cache.config import CacheConfig
from services.cache.core import Cache
from services.cache.service import CacheServicer
from services.cache.stats import StatsStore
from services.cache.store import EntryStore
from services.common.identity import IdentitySigner
from services.common.settings import Settings, require
from services.common.stores import connect_redis

_FULL_NAME = cache_service_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


class CacheService:
    """The cache as a :class:`~services.common.server.Service`."""

    name = "cache"

    def __init__(self, cache: Cache, signer: IdentitySigner, redis: aioredis.Redis) -> None:
        self.cache = cache
        self._servicer = CacheServicer(cache, signer)
        self._redis = redis

    def full_names(self) -> Sequence[str]:
        """The gRPC service this serves."""
        return [_FULL_NAME]

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the servicer to ``server``."""
        cache_service_pb2_grpc.add_CacheServiceServicer_to_server(self._servicer, server)

    async def start(self) -> None:
        """No background work: entries and counters live in Redis."""

    async def stop(self) -> None:
        """Closes the Redis connections."""
        await self._redis.aclose()


async def build(settings: Settings, env: Mapping[str, str] | None = None) -> CacheService:
    """Creates the cache service.

    Redis connections open lazily, so the service starts even while Redis is
    still coming up; calls made meanwhile fail with STORE_UNAVAILABLE.

    Args:
        settings: The process settings (REDIS_URL is required).
        env: Where to read the ORCHESTRA_CACHE_* settings (default: the
            process environment).

    Raises:
        SettingsError: REDIS_URL is missing or a cache setting is malformed.
    """
    config = CacheConfig.from_env(env)
    redis = connect_redis(require(settings.redis_url, "REDIS_URL", "cache"))
    cache = Cache(EntryStore(redis), StatsStore(redis), config)
    return CacheService(cache, IdentitySigner(settings.internal_key), redis)
