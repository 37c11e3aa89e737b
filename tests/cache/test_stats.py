"""GetCacheStats: durable counters, current size, latency percentiles."""

from __future__ import annotations

import asyncio
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from redis import exceptions as redis_exc
from redis.asyncio.cluster import RedisCluster

from orchestra.cache.v1 import cache_service_pb2
from services.cache.keyspace import stats_key
from services.cache.stats import StatsStore
from services.common import errors
from services.common.stores import connect_redis
from tests.cache.builders import answer, conversation, key, lookup_request, store_request
from tests.cache.conftest import StartCache, Stub
from tests.conftest import CLUSTER

Metadata = list[tuple[str, str]]
StatsRequest = cache_service_pb2.GetCacheStatsRequest


async def test_counters_and_size(
    stub: Stub, internal: Metadata, as_caller: Callable[..., Metadata]
) -> None:
    first = answer("Paris.", cost_micro_usd=100)
    first.usage.completion_tokens = 7
    second = answer("Madrid.", cost_micro_usd=50)
    second.usage.completion_tokens = 5
    spain = key(messages=conversation("What is the capital of Spain?"))
    await stub.Store(store_request(key(), first), metadata=internal)
    await stub.Store(store_request(spain, second, request_id="req-2"), metadata=internal)
    await stub.Store(store_request(key(temperature=1.5), first), metadata=internal)  # skipped

    for _ in range(3):
        await stub.Lookup(lookup_request(key()), metadata=internal)  # hits
    await stub.Lookup(lookup_request(spain), metadata=internal)  # hit
    await stub.Lookup(lookup_request(key(model="other")), metadata=internal)  # miss

    stats = (await stub.GetCacheStats(StatsRequest(), metadata=as_caller("acme", "read"))).stats

    assert stats.lookups == 5
    assert stats.exact_hits == 4
    assert stats.semantic_hits == 0
    assert stats.stores == 2
    assert stats.entries == 2
    assert stats.bytes == first.ByteSize() + second.ByteSize()
    assert stats.tokens_saved == 3 * 7 + 5
    assert stats.saved_micro_usd == 3 * 100 + 50
    assert 0 < stats.lookup_p50_us <= stats.lookup_p99_us
    assert stats.HasField("since_time")


async def test_fresh_tenant_has_empty_stats(stub: Stub, as_caller: Callable[..., Metadata]) -> None:
    stats = (await stub.GetCacheStats(StatsRequest(), metadata=as_caller("acme", "read"))).stats
    assert stats == cache_service_pb2.CacheStats()


async def test_invalidation_shrinks_the_size_but_keeps_the_counters(
    stub: Stub, internal: Metadata, as_caller: Callable[..., Metadata]
) -> None:
    await stub.Store(store_request(), metadata=internal)
    await stub.Invalidate(
        cache_service_pb2.InvalidateRequest(all=True), metadata=as_caller("acme", "admin")
    )

    stats = (await stub.GetCacheStats(StatsRequest(), metadata=as_caller("acme", "read"))).stats

    assert (stats.entries, stats.bytes, stats.stores) == (0, 0, 1)


async def test_counters_are_shared_by_replicas(
    start_cache: StartCache, internal: Metadata, as_caller: Callable[..., Metadata]
) -> None:
    first, second = await start_cache(), await start_cache()
    await first.Store(store_request(), metadata=internal)
    await first.Lookup(lookup_request(key()), metadata=internal)
    await second.Lookup(lookup_request(key()), metadata=internal)

    async def counted() -> tuple[int, int, int]:
        reply = await second.GetCacheStats(StatsRequest(), metadata=as_caller("acme", "read"))
        return reply.stats.lookups, reply.stats.exact_hits, reply.stats.stores

    # A replica's own lookups count at once; another's within stats.FLUSH_SECONDS.
    assert (await counted())[0] >= 1
    for _ in range(200):  # up to 10 s
        if (seen := await counted()) == (2, 2, 1):
            break
        await asyncio.sleep(0.05)
    assert seen == (2, 2, 1)


async def test_counts_that_redis_refused_are_kept_for_the_next_write(redis_url: str) -> None:
    admin = connect_redis(redis_url)
    # A cluster keeps ACL users per node: the user must exist on every node.
    every_node: dict[str, Any] = {"target_nodes": RedisCluster.ALL_NODES} if CLUSTER else {}
    user = f"stats-{uuid.uuid4().hex[:8]}"
    # A connection that may not write the counters, then may.
    await admin.acl_setuser(
        user, enabled=True, nopass=True, keys=["*"], commands=["+@all", "-hincrby"], **every_node
    )
    parts = urllib.parse.urlsplit(redis_url)  # the embedded server's URL carries a password
    secret = f":{parts.password}" if parts.password else ""
    url = parts._replace(netloc=f"{user}{secret}@{parts.hostname}:{parts.port}").geturl()
    client = connect_redis(url)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    stats = StatsStore(client, flush_seconds=3600)
    try:
        hit = answer("Paris.", cost_micro_usd=100)
        stats.count_lookup(tenant, cache_service_pb2.MATCH_KIND_EXACT, hit, 1_000)
        stats.count_lookup(tenant, cache_service_pb2.MATCH_KIND_UNSPECIFIED, None, 2_000)
        with pytest.raises(redis_exc.RedisError):
            await stats.flush()
        await admin.acl_setuser(
            user, enabled=True, nopass=True, keys=["*"], commands=["+@all"], **every_node
        )
        counters = await stats.read(tenant)  # sends the kept counts first
        assert (counters.lookups, counters.exact_hits, counters.saved_micro_usd) == (2, 1, 100)
        assert counters.since_ms == 1_000
        await stats.aclose()  # nothing left to send
        assert (await stats.read(tenant)).lookups == 2
    finally:
        await client.aclose()
        await admin.acl_deluser(user, **every_node)
        await admin.delete(stats_key(tenant))
        await admin.aclose()


@pytest.mark.parametrize(
    ("scopes", "tenant_id"),
    [(("read",), ""), (("read",), "acme"), (("admin",), ""), (("operator",), "acme")],
)
async def test_who_may_read_stats(
    stub: Stub, as_caller: Callable[..., Metadata], scopes: tuple[str, ...], tenant_id: str
) -> None:
    caller_tenant = "" if "operator" in scopes else "acme"
    await stub.GetCacheStats(
        StatsRequest(tenant_id=tenant_id), metadata=as_caller(caller_tenant, *scopes)
    )


@pytest.mark.parametrize(
    ("scopes", "tenant_id"),
    [(("chat",), ""), (("internal",), ""), (("read",), "globex"), (("admin",), "globex")],
)
async def test_who_may_not_read_stats(
    stub: Stub, as_caller: Callable[..., Metadata], scopes: tuple[str, ...], tenant_id: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GetCacheStats(
            StatsRequest(tenant_id=tenant_id), metadata=as_caller("acme", *scopes)
        )

    details = errors.decode(failure.value)
    assert details.code == grpc.StatusCode.PERMISSION_DENIED
    assert details.reason == "SCOPE_DENIED"


async def test_a_key_without_tenant_must_name_one(
    stub: Stub, as_caller: Callable[..., Metadata]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GetCacheStats(StatsRequest(), metadata=as_caller("", "operator"))

    details = errors.decode(failure.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert details.metadata["field"] == "tenant_id"
