"""Authentication, scopes, malformed requests and an unreachable Redis."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from orchestra.cache.v1 import cache_service_pb2
from orchestra.common.v1 import chat_pb2
from services.cli.embedded import free_port
from services.common import errors
from tests.cache.builders import answer, key, lookup_request, store_request, text_message
from tests.cache.conftest import StartCache, Stub

Metadata = list[tuple[str, str]]


def _assert_error(error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str) -> Any:
    details = errors.decode(error)
    assert (details.code, details.reason) == (code, reason), details.message
    return details


@pytest.mark.parametrize("scopes", [("chat",), ("read",), ("admin",), ("operator",)])
async def test_lookup_and_store_need_internal(
    stub: Stub, as_caller: Callable[..., Metadata], scopes: tuple[str, ...]
) -> None:
    metadata = as_caller("acme", *scopes)
    with pytest.raises(grpc.aio.AioRpcError) as lookup:
        await stub.Lookup(lookup_request(key()), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as store:
        await stub.Store(store_request(), metadata=metadata)

    _assert_error(lookup.value, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")
    _assert_error(store.value, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")


@pytest.mark.parametrize(
    "metadata", [[], [("x-orchestra-identity", "v1.forged.9999999999.mac")]], ids=["none", "forged"]
)
async def test_calls_need_the_edge_identity(stub: Stub, metadata: Metadata) -> None:
    calls: list[Awaitable[Any]] = [
        stub.Lookup(lookup_request(key()), metadata=metadata),
        stub.Store(store_request(), metadata=metadata),
        stub.Invalidate(cache_service_pb2.InvalidateRequest(all=True), metadata=metadata),
        stub.GetCacheStats(cache_service_pb2.GetCacheStatsRequest(), metadata=metadata),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        _assert_error(failure.value, grpc.StatusCode.UNAUTHENTICATED, "IDENTITY_MISSING")


def _key_with(**changes: Any) -> cache_service_pb2.CacheKey:
    base = key()
    for name, value in changes.items():
        if name == "messages":
            del base.messages[:]
            base.messages.extend(value)
        else:
            setattr(base, name, value)
    return base


def _generation(**fields: Any) -> cache_service_pb2.CacheKey:
    return key(**fields)


_BAD_KEYS = [
    pytest.param(_key_with(messages=[]), "EMPTY_MESSAGES", "key.messages", id="no-messages"),
    pytest.param(
        _key_with(messages=[text_message(chat_pb2.ROLE_USER, "  \n ")]),
        "EMPTY_MESSAGES",
        "key.messages",
        id="only-blank-messages",
    ),
    pytest.param(_key_with(tenant_id=""), "INVALID_FIELD", "key.tenant_id", id="no-tenant"),
    pytest.param(
        _key_with(tenant_id="t" * 300), "INVALID_FIELD", "key.tenant_id", id="long-tenant"
    ),
    pytest.param(_key_with(model=""), "INVALID_FIELD", "key.model", id="no-model"),
    pytest.param(
        _key_with(messages=[text_message(chat_pb2.ROLE_UNSPECIFIED, "hi")]),
        "INVALID_FIELD",
        "key.messages[0].role",
        id="no-role",
    ),
    pytest.param(
        _key_with(
            messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart()])]
        ),
        "INVALID_FIELD",
        "key.messages[0].content[0]",
        id="empty-part",
    ),
    pytest.param(
        _key_with(
            messages=[
                chat_pb2.Message(
                    role=chat_pb2.ROLE_USER,
                    content=[chat_pb2.ContentPart(image_url=chat_pb2.ImageUrl())],
                )
            ]
        ),
        "INVALID_FIELD",
        "key.messages[0].content[0].image_url.url",
        id="image-without-url",
    ),
    pytest.param(
        _generation(temperature=2.5), "INVALID_FIELD", "key.generation.temperature", id="hot"
    ),
    pytest.param(
        _generation(temperature=math.nan), "INVALID_FIELD", "key.generation.temperature", id="nan"
    ),
    pytest.param(_generation(top_p=1.5), "INVALID_FIELD", "key.generation.top_p", id="top_p"),
    pytest.param(
        _generation(presence_penalty=-3),
        "INVALID_FIELD",
        "key.generation.presence_penalty",
        id="pen",
    ),
    pytest.param(
        _generation(max_tokens=0), "INVALID_FIELD", "key.generation.max_tokens", id="max0"
    ),
]


@pytest.mark.parametrize(("bad_key", "reason", "field"), _BAD_KEYS)
async def test_malformed_keys_are_refused(
    stub: Stub, internal: Metadata, bad_key: cache_service_pb2.CacheKey, reason: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as lookup:
        await stub.Lookup(lookup_request(bad_key), metadata=internal)
    with pytest.raises(grpc.aio.AioRpcError) as store:
        await stub.Store(store_request(bad_key), metadata=internal)

    for failure in (lookup.value, store.value):
        details = _assert_error(failure, grpc.StatusCode.INVALID_ARGUMENT, reason)
        assert details.metadata["field"] == field


async def test_tool_without_name_is_refused(stub: Stub, internal: Metadata) -> None:
    bad = key()
    bad.tools.add().function.description = "nameless"
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Lookup(lookup_request(bad), metadata=internal)
    details = _assert_error(failure.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert details.metadata["field"] == "key.tools[0].function.name"


@pytest.mark.parametrize("threshold", [-0.1, 1.5, math.inf])
async def test_bad_similarity_threshold_is_refused(
    stub: Stub, internal: Metadata, threshold: float
) -> None:
    request = cache_service_pb2.LookupRequest(key=key(), similarity_threshold=threshold)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Lookup(request, metadata=internal)
    details = _assert_error(failure.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert details.metadata["field"] == "similarity_threshold"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (cache_service_pb2.StoreRequest(key=key()), "answer"),
        (store_request(ttl_seconds=-1), "ttl_seconds"),
        (store_request(cached=answer(cost_micro_usd=-5)), "answer.cost_micro_usd"),
        (
            store_request(cached=answer(usage=chat_pb2.Usage(completion_tokens=-1))),
            "answer.usage.completion_tokens",
        ),
        (store_request(request_id="r" * 300), "request_id"),
        (store_request(end_user="u" * 300), "end_user"),
    ],
)
async def test_malformed_stores_are_refused(
    stub: Stub, internal: Metadata, request_: cache_service_pb2.StoreRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Store(request_, metadata=internal)
    details = _assert_error(failure.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert details.metadata["field"] == field


async def test_redis_down_is_unavailable_with_retry_info(
    start_cache: StartCache, internal: Metadata, as_caller: Callable[..., Metadata]
) -> None:
    # Nothing listens on a port the OS just handed out and took back.
    stub = await start_cache(url=f"redis://127.0.0.1:{free_port()}/0")
    calls: list[Awaitable[Any]] = [
        stub.Lookup(lookup_request(key()), metadata=internal),
        stub.Store(store_request(), metadata=internal),
        stub.Invalidate(
            cache_service_pb2.InvalidateRequest(all=True), metadata=as_caller("acme", "admin")
        ),
        stub.GetCacheStats(
            cache_service_pb2.GetCacheStatsRequest(), metadata=as_caller("acme", "read")
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        details = _assert_error(failure.value, grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
        assert details.retry_after is not None and details.retry_after > 0
