"""Builds the cache service from the settings: Redis, the core, the servicer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
import redis.asyncio as aioredis

from orchestra.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from services.cache.cache_service import CacheServicer
from services.cache.changes import ChangeStream
from services.cache.config import CacheConfig
from services.cache.core import Cache
from services.cache.scope_index import use_one_thread
from services.cache.semantic import SemanticLayer, judge_for
from services.cache.stats import StatsStore
from services.cache.store import EntryStore
from services.common.embeddings import load_embedder
from services.common.identity import IdentitySigner
from services.common.settings import Settings, SettingsError, require
from services.common.stores import connect_redis

_FULL_NAME = cache_service_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


class CacheService:
    """The cache as a :class:`~services.common.server.Service`."""

    name = "cache"

    def __init__(
        self,
        cache: Cache,
        signer: IdentitySigner,
        redis: aioredis.Redis,
        semantic: SemanticLayer | None = None,
    ) -> None:
        self.cache = cache
        self.semantic = semantic
        self._servicer = CacheServicer(cache, signer)
        self._redis = redis

    def full_names(self) -> Sequence[str]:
        """The gRPC service this serves."""
        return [_FULL_NAME]

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        """None of its own (see :class:`services.common.server.Service`)."""
        return []

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the servicer to ``server``."""
        cache_service_pb2_grpc.add_CacheServiceServicer_to_server(self._servicer, server)

    async def start(self) -> None:
        """Builds the semantic view from Redis and follows other replicas' changes."""
        if self.semantic is not None:
            await self.semantic.start()

    async def stop(self) -> None:
        """Counts the last lookups, stops following changes, closes the Redis connections."""
        await self.cache.flush()
        if self.semantic is not None:
            await self.semantic.stop()
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
        SettingsError: REDIS_URL is missing, a cache setting is malformed or
            names an unknown embedding model.
    """
    config = CacheConfig.from_env(env)
    use_one_thread()
    redis = connect_redis(require(settings.redis_url, "REDIS_URL", "cache"))
    store = EntryStore(redis)
    semantic = None
    if config.semantic:
        try:
            embedder = load_embedder(config.embedding_model)
        except ValueError as exc:
            raise SettingsError(f"ORCHESTRA_CACHE_EMBEDDING_MODEL: {exc}") from None
        judge = judge_for(config, embedder)
        semantic = SemanticLayer(
            store,
            ChangeStream(redis),
            embedder,
            judge,
            hnsw_from=config.hnsw_from,
            adaptive=judge.verifier if config.semantic_mode == "adaptive" else None,
        )
    cache = Cache(store, StatsStore(redis), config, semantic)
    return CacheService(cache, IdentitySigner(settings.internal_key), redis, semantic)
