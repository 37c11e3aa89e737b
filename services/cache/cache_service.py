"""The CacheService servicer: authenticate, call the core, encode the answer."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from orchestra.cache.v1 import cache_service_pb2, cache_service_pb2_grpc
from orchestra.common.v1 import identity_pb2
from services.cache.core import Cache
from services.cache.keys import invalid
from services.cache.layers import Exploration
from services.common import batches, streams
from services.common.identity import IdentitySigner, caller, tenant_of

_Context = grpc.aio.ServicerContext[Any, Any]


class CacheServicer(cache_service_pb2_grpc.CacheServiceServicer):
    """Thin gRPC front of :class:`~services.cache.core.Cache`."""

    def __init__(self, cache: Cache, signer: IdentitySigner) -> None:
        self._cache = cache
        self._signer = signer

    async def Lookup(
        self, request: cache_service_pb2.LookupRequest, context: _Context
    ) -> cache_service_pb2.LookupResponse:
        """See the proto: SCOPE_INTERNAL; a miss is not an error."""
        caller(context, self._signer, identity_pb2.SCOPE_INTERNAL)
        return await self._lookup(request)

    async def LookupStream(
        self, requests: AsyncIterator[cache_service_pb2.LookupStreamRequest], context: _Context
    ) -> AsyncIterator[cache_service_pb2.LookupStreamResponse]:
        """See the proto: Lookup's code path for each item, answered as it finishes."""
        caller(context, self._signer, identity_pb2.SCOPE_INTERNAL)
        async for answer in streams.serve(
            requests, self._lookup, "LookupStream", cache_service_pb2.LookupStreamResponse
        ):
            yield answer

    async def _lookup(
        self, request: cache_service_pb2.LookupRequest
    ) -> cache_service_pb2.LookupResponse:
        """One lookup for an internal caller (which may name any tenant)."""
        match = await self._cache.lookup(
            request.key,
            exact_only=request.exact_only,
            threshold=request.similarity_threshold,
        )
        if match is None:
            return cache_service_pb2.LookupResponse(hit=False)
        if isinstance(match, Exploration):
            return cache_service_pb2.LookupResponse(hit=False, explored_entry_id=match.entry_id)
        return cache_service_pb2.LookupResponse(
            hit=True,
            match_kind=match.kind,
            entry_id=match.entry.entry_id,
            answer=match.entry.answer,
            similarity=match.similarity,
        )

    async def Store(
        self, request: cache_service_pb2.StoreRequest, context: _Context
    ) -> cache_service_pb2.StoreResponse:
        """See the proto: SCOPE_INTERNAL; ineligible answers say why."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_INTERNAL)
        return await self._store(identity, request)

    async def BatchStore(
        self, request: cache_service_pb2.BatchStoreRequest, context: _Context
    ) -> cache_service_pb2.BatchStoreResponse:
        """See the proto: SCOPE_INTERNAL; one outcome per item."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_INTERNAL)
        batches.check_size(request.requests)
        results = await batches.each(
            request.requests,
            functools.partial(self._store, identity),
            "BatchStore",
            cache_service_pb2.StoreResult,
        )
        return cache_service_pb2.BatchStoreResponse(results=results)

    async def _store(
        self, identity: identity_pb2.Identity, request: cache_service_pb2.StoreRequest
    ) -> cache_service_pb2.StoreResponse:
        tenant_of(identity, request.key.tenant_id)
        outcome = await self._cache.store(
            request.key,
            request.answer if request.HasField("answer") else None,
            request_id=request.request_id,
            end_user=request.end_user,
            ttl_seconds=request.ttl_seconds,
            explored_entry_id=request.explored_entry_id.lower(),
        )
        return cache_service_pb2.StoreResponse(
            stored=outcome.stored, entry_id=outcome.entry_id, skip_reason=outcome.skip_reason
        )

    async def Invalidate(
        self, request: cache_service_pb2.InvalidateRequest, context: _Context
    ) -> cache_service_pb2.InvalidateResponse:
        """See the proto: SCOPE_ADMIN on the caller's own tenant."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_ADMIN)
        tenant = _required_tenant(tenant_of(identity, request.tenant_id))
        deleted = await self._cache.invalidate(tenant, request)
        return cache_service_pb2.InvalidateResponse(deleted_count=deleted)

    async def GetCacheStats(
        self, request: cache_service_pb2.GetCacheStatsRequest, context: _Context
    ) -> cache_service_pb2.GetCacheStatsResponse:
        """See the proto: SCOPE_READ on the caller's own tenant."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_READ)
        tenant = _required_tenant(tenant_of(identity, request.tenant_id))
        snapshot = await self._cache.stats(tenant)
        counters = snapshot.counters
        stats = cache_service_pb2.CacheStats(
            lookups=counters.lookups,
            exact_hits=counters.exact_hits,
            semantic_hits=counters.semantic_hits,
            stores=counters.stores,
            entries=snapshot.entries,
            bytes=snapshot.bytes,
            tokens_saved=counters.tokens_saved,
            saved_micro_usd=counters.saved_micro_usd,
            lookup_p50_us=snapshot.lookup_p50_us,
            lookup_p99_us=snapshot.lookup_p99_us,
        )
        if counters.since_ms:
            since = timestamp_pb2.Timestamp()
            since.FromMilliseconds(counters.since_ms)
            stats.since_time.CopyFrom(since)
        return cache_service_pb2.GetCacheStatsResponse(stats=stats)


def _required_tenant(tenant: str) -> str:
    # An operator key has no tenant of its own: it must name one.
    if not tenant:
        raise invalid("tenant_id", "tenant_id is required for a key without a tenant")
    return tenant
