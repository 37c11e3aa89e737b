"""LookupStream: each item looked up as Lookup would, answered by call id."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from orchestra.cache.v1 import cache_service_pb2 as pb
from services.common import errors
from tests.cache.builders import answer, conversation, key, lookup_request, store_request
from tests.cache.conftest import Stub
from tests.cache.test_batch_store import _reason

Metadata = list[tuple[str, str]]


async def _items(*requests: pb.LookupRequest) -> AsyncIterator[pb.LookupStreamRequest]:
    for call_id, request in enumerate(requests, start=10):
        yield pb.LookupStreamRequest(call_id=call_id, request=request)


async def test_items_get_lookups_answers_by_call_id(stub: Stub, internal: Metadata) -> None:
    paris = key(messages=conversation("What is the capital of France?"))
    stored = await stub.Store(store_request(paris, answer("Paris.")), metadata=internal)
    unknown = key(messages=conversation("What is the capital of Peru?"))
    other_tenant = key(tenant="globex", messages=conversation("What is the capital of France?"))
    answers = [
        a
        async for a in stub.LookupStream(
            _items(
                lookup_request(paris),
                lookup_request(unknown),
                lookup_request(key(model="")),  # no model
                lookup_request(other_tenant),
            ),
            metadata=internal,
        )
    ]
    by_id = {a.call_id: a for a in answers}
    assert sorted(by_id) == [10, 11, 12, 13]
    hit = by_id[10].response
    assert (hit.hit, hit.answer.text, hit.entry_id) == (True, "Paris.", stored.entry_id)
    assert not by_id[11].response.hit
    assert by_id[12].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert _reason(by_id[12].error) == "INVALID_FIELD"
    assert not by_id[13].response.hit  # another tenant's entry is never served


async def test_a_tenant_key_cannot_open_the_stream(
    stub: Stub, as_caller: Callable[..., Any]
) -> None:
    call = stub.LookupStream(
        _items(lookup_request(key())), metadata=as_caller("acme", "chat", "read", "admin")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [a async for a in call]
    details = errors.decode(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")
