"""Invalidate by each selector, erasure by end user, and bad selectors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from orchestra.cache.v1 import cache_service_pb2
from services.common import errors
from tests.cache.builders import answer, conversation, key, lookup_request, store_request
from tests.cache.conftest import Stub

Metadata = list[tuple[str, str]]
Invalidate = cache_service_pb2.InvalidateRequest

# name -> (key model, question, end user, answering model)
_ENTRIES = {
    "m1-u1": ("model-1", "q1", "u1", "model-1"),
    "m1-u2": ("model-1", "q2", "u2", "model-1"),
    "m2-u1": ("model-2", "q3", "u1", "model-2"),
    "auto-u3": ("auto", "q4", "u3", "model-2"),  # the router chose model-2
}


def _key(name: str) -> cache_service_pb2.CacheKey:
    model, question, _, _ = _ENTRIES[name]
    return key(model=model, messages=conversation(question))


@pytest.fixture
async def entries(stub: Stub, internal: Metadata) -> dict[str, str]:
    """Stores the four entries; returns name -> entry id."""
    ids = {}
    for name, (_, _, user, produced_by) in _ENTRIES.items():
        result = await stub.Store(
            store_request(_key(name), answer(model=produced_by), end_user=user, request_id=name),
            metadata=internal,
        )
        ids[name] = result.entry_id
    return ids


async def _alive(stub: Stub, internal: Metadata) -> set[str]:
    alive = set()
    for name in _ENTRIES:
        if (await stub.Lookup(lookup_request(_key(name)), metadata=internal)).hit:
            alive.add(name)
    return alive


@pytest.mark.parametrize(
    ("request_", "gone"),
    [
        (Invalidate(all=True), {"m1-u1", "m1-u2", "m2-u1", "auto-u3"}),
        (Invalidate(model="model-1"), {"m1-u1", "m1-u2"}),
        (Invalidate(model="model-2"), {"m2-u1", "auto-u3"}),  # by key or by answering model
        (Invalidate(model="auto"), {"auto-u3"}),
        (Invalidate(model="model-3"), set()),
        (Invalidate(end_user="u1"), {"m1-u1", "m2-u1"}),
        (Invalidate(end_user="nobody"), set()),
    ],
)
async def test_invalidate_by_selector(
    stub: Stub,
    internal: Metadata,
    admin: Metadata,
    entries: dict[str, str],
    request_: cache_service_pb2.InvalidateRequest,
    gone: set[str],
) -> None:
    done = await stub.Invalidate(request_, metadata=admin)

    assert done.deleted_count == len(gone)
    assert await _alive(stub, internal) == set(_ENTRIES) - gone


async def test_invalidate_by_entry_id(
    stub: Stub, internal: Metadata, admin: Metadata, entries: dict[str, str]
) -> None:
    request_ = Invalidate(entry_id=entries["m1-u2"])

    assert (await stub.Invalidate(request_, metadata=admin)).deleted_count == 1
    assert (await stub.Invalidate(request_, metadata=admin)).deleted_count == 0  # idempotent
    assert await _alive(stub, internal) == set(_ENTRIES) - {"m1-u2"}


@pytest.mark.parametrize("upper", [False, True])
async def test_invalidate_by_key_prefix(
    stub: Stub, internal: Metadata, admin: Metadata, entries: dict[str, str], upper: bool
) -> None:
    target = entries["m2-u1"]
    # The shortest prefix that selects only the target among the four.
    length = next(
        n for n in range(1, 65) if sum(i.startswith(target[:n]) for i in entries.values()) == 1
    )
    prefix = target[:length].upper() if upper else target[:length]

    done = await stub.Invalidate(Invalidate(key_prefix=prefix), metadata=admin)

    assert done.deleted_count == 1
    assert await _alive(stub, internal) == set(_ENTRIES) - {"m2-u1"}


async def test_erasure_then_other_selectors_find_nothing_left(
    stub: Stub, internal: Metadata, admin: Metadata, entries: dict[str, str]
) -> None:
    await stub.Invalidate(Invalidate(end_user="u1"), metadata=admin)

    # The indexes were updated: model-1 now holds only u2's entry.
    assert (await stub.Invalidate(Invalidate(model="model-1"), metadata=admin)).deleted_count == 1
    assert (await stub.Invalidate(Invalidate(end_user="u1"), metadata=admin)).deleted_count == 0
    assert await _alive(stub, internal) == {"auto-u3"}


async def test_erasure_does_not_reach_an_entry_another_user_overwrote(
    stub: Stub, internal: Metadata, admin: Metadata
) -> None:
    await stub.Store(store_request(end_user="alice", request_id="r1"), metadata=internal)
    await stub.Store(store_request(end_user="bob", request_id="r2"), metadata=internal)

    assert (await stub.Invalidate(Invalidate(end_user="alice"), metadata=admin)).deleted_count == 0
    assert (await stub.Lookup(lookup_request(key()), metadata=internal)).hit
    assert (await stub.Invalidate(Invalidate(end_user="bob"), metadata=admin)).deleted_count == 1


async def test_many_entries_of_one_user_are_all_erased(
    stub: Stub, internal: Metadata, admin: Metadata
) -> None:
    # More than one batch of the drain script (500).
    await asyncio.gather(
        *(
            stub.Store(
                store_request(key(messages=conversation(f"question {i}")), end_user="heavy"),
                metadata=internal,
            )
            for i in range(620)
        )
    )

    done = await stub.Invalidate(Invalidate(end_user="heavy"), metadata=admin)

    assert done.deleted_count == 620


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (Invalidate(), "selector"),
        (Invalidate(all=False), "all"),
        (Invalidate(model=""), "model"),
        (Invalidate(end_user=""), "end_user"),
        (Invalidate(key_prefix=""), "key_prefix"),
        (Invalidate(key_prefix="xyz"), "key_prefix"),
        (Invalidate(key_prefix="a" * 65), "key_prefix"),
        (Invalidate(entry_id="abc"), "entry_id"),
        (Invalidate(entry_id="g" * 64), "entry_id"),
    ],
)
async def test_bad_selectors_are_refused(
    stub: Stub, admin: Metadata, request_: cache_service_pb2.InvalidateRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Invalidate(request_, metadata=admin)

    details = errors.decode(failure.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_FIELD"
    assert details.metadata["field"] == field


@pytest.mark.parametrize("scopes", [("read",), ("chat",), ("internal",)])
async def test_invalidate_needs_admin(
    stub: Stub, as_caller: Callable[..., Metadata], scopes: tuple[str, ...]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Invalidate(Invalidate(all=True), metadata=as_caller("acme", *scopes))

    details = errors.decode(failure.value)
    assert details.code == grpc.StatusCode.PERMISSION_DENIED
    assert details.reason == "SCOPE_DENIED"
