"""Entries never cross tenants: lookups, invalidation and stats all stay inside one."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from orchestra.cache.v1 import cache_service_pb2
from services.common import errors
from tests.cache.builders import answer, key, lookup_request, store_request
from tests.cache.conftest import Stub

Metadata = list[tuple[str, str]]

# (owner, intruder): tenants that look alike, nest, or hold the key layout's
# separators and glob characters.
_PAIRS = [
    ("acme", "globex"),
    ("acme", "acme-eu"),
    ("acme-eu", "acme"),
    ("acm", "acme"),
    ("acme", "ACME"),
    ("a:b", "a"),
    ("a", "a:b"),
    ("a}", "a"),
    ("a", "a}:e"),
    ("acme*", "acme"),
    ("acme", "acm?"),
    ("acme", "acme "),
    ("t%41", "tA"),
]


@pytest.mark.parametrize(("owner", "intruder"), _PAIRS)
async def test_same_conversation_other_tenant_misses(
    stub: Stub, internal: Metadata, owner: str, intruder: str
) -> None:
    await stub.Store(store_request(key(tenant=owner)), metadata=internal)

    assert not (await stub.Lookup(lookup_request(key(tenant=intruder)), metadata=internal)).hit
    assert (await stub.Lookup(lookup_request(key(tenant=owner)), metadata=internal)).hit


async def test_tenant_and_model_cannot_be_shifted_into_each_other(
    stub: Stub, internal: Metadata
) -> None:
    await stub.Store(store_request(key(tenant="a", model="b:c")), metadata=internal)

    assert not (
        await stub.Lookup(lookup_request(key(tenant="a:b", model="c")), metadata=internal)
    ).hit


@pytest.mark.parametrize(("owner", "intruder"), _PAIRS)
async def test_invalidating_everything_of_one_tenant_spares_the_others(
    stub: Stub,
    internal: Metadata,
    as_caller: Callable[..., Metadata],
    owner: str,
    intruder: str,
) -> None:
    await stub.Store(store_request(key(tenant=owner)), metadata=internal)
    await stub.Store(store_request(key(tenant=intruder)), metadata=internal)

    done = await stub.Invalidate(
        cache_service_pb2.InvalidateRequest(all=True), metadata=as_caller(intruder, "admin")
    )

    assert done.deleted_count == 1
    assert (await stub.Lookup(lookup_request(key(tenant=owner)), metadata=internal)).hit
    assert not (await stub.Lookup(lookup_request(key(tenant=intruder)), metadata=internal)).hit


async def test_other_tenants_entry_id_deletes_nothing(
    stub: Stub, internal: Metadata, as_caller: Callable[..., Metadata]
) -> None:
    stored = await stub.Store(store_request(key(tenant="acme")), metadata=internal)

    done = await stub.Invalidate(
        cache_service_pb2.InvalidateRequest(entry_id=stored.entry_id),
        metadata=as_caller("globex", "admin"),
    )

    assert done.deleted_count == 0
    assert (await stub.Lookup(lookup_request(key(tenant="acme")), metadata=internal)).hit


async def test_other_tenants_model_and_user_delete_nothing(
    stub: Stub, internal: Metadata, as_caller: Callable[..., Metadata]
) -> None:
    await stub.Store(store_request(key(tenant="acme"), end_user="u1"), metadata=internal)
    globex_admin = as_caller("globex", "admin")

    by_model = cache_service_pb2.InvalidateRequest(model=key().model)
    by_user = cache_service_pb2.InvalidateRequest(end_user="u1")
    assert (await stub.Invalidate(by_model, metadata=globex_admin)).deleted_count == 0
    assert (await stub.Invalidate(by_user, metadata=globex_admin)).deleted_count == 0
    assert (await stub.Lookup(lookup_request(key(tenant="acme")), metadata=internal)).hit


@pytest.mark.parametrize(
    "request_",
    [
        cache_service_pb2.InvalidateRequest(tenant_id="acme", all=True),
        cache_service_pb2.InvalidateRequest(tenant_id="acme", end_user="u1"),
    ],
)
async def test_an_admin_cannot_name_another_tenant(
    stub: Stub,
    internal: Metadata,
    as_caller: Callable[..., Metadata],
    request_: cache_service_pb2.InvalidateRequest,
) -> None:
    await stub.Store(store_request(key(tenant="acme"), end_user="u1"), metadata=internal)

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Invalidate(request_, metadata=as_caller("globex", "admin"))

    details = errors.decode(failure.value)
    assert details.code == grpc.StatusCode.PERMISSION_DENIED
    assert details.reason == "SCOPE_DENIED"
    assert (await stub.Lookup(lookup_request(key(tenant="acme")), metadata=internal)).hit


async def test_stats_of_one_tenant_do_not_count_another(
    stub: Stub, internal: Metadata, as_caller: Callable[..., Metadata]
) -> None:
    await stub.Store(store_request(key(tenant="acme")), metadata=internal)
    await stub.Lookup(lookup_request(key(tenant="acme")), metadata=internal)

    stats = await stub.GetCacheStats(
        cache_service_pb2.GetCacheStatsRequest(), metadata=as_caller("acme-eu", "read")
    )

    assert stats.stats == cache_service_pb2.CacheStats()


async def test_an_operator_may_act_on_any_tenant(
    stub: Stub, internal: Metadata, as_caller: Callable[..., Metadata]
) -> None:
    await stub.Store(store_request(key(tenant="acme"), cached=answer()), metadata=internal)

    done = await stub.Invalidate(
        cache_service_pb2.InvalidateRequest(tenant_id="acme", all=True),
        metadata=as_caller("", "operator"),
    )

    assert done.deleted_count == 1
