"""BatchStore: each item stored as Store would, one outcome per item."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from orchestra.cache.v1 import cache_service_pb2
from services.common import errors
from tests.cache.builders import answer, conversation, key, lookup_request, store_request
from tests.cache.conftest import Stub

Metadata = list[tuple[str, str]]


def _reason(status: status_pb2.Status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


async def test_batch_store_stores_each_item_and_reports_each_failure(
    stub: Stub, internal: Metadata
) -> None:
    paris = key(messages=conversation("What is the capital of France?"))
    rome = key(tenant="globex", messages=conversation("What is the capital of Italy?"))
    hot = key(messages=conversation("Tell me a story."), temperature=1.5)
    bad = key(messages=conversation("What is 2 + 2?"))
    reply = await stub.BatchStore(
        cache_service_pb2.BatchStoreRequest(
            requests=[
                store_request(paris, answer("Paris."), request_id="r-1"),
                store_request(bad, answer("4", cost_micro_usd=-5), request_id="r-2"),
                store_request(rome, answer("Rome."), request_id="r-3"),
                store_request(hot, answer("Once upon a time."), request_id="r-4"),
            ]
        ),
        metadata=internal,
    )
    outcomes = [r.WhichOneof("outcome") for r in reply.results]
    assert outcomes == ["response", "error", "response", "response"]
    stored, refused, other_tenant, ineligible = reply.results
    assert stored.response.stored and other_tenant.response.stored
    assert (ineligible.response.stored, ineligible.response.skip_reason) == (False, "temperature")
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert _reason(refused.error) == "INVALID_FIELD"
    # Each stored item is served, by its own tenant only; the refused one is not.
    for cache_key, text, entry_id in (
        (paris, "Paris.", stored.response.entry_id),
        (rome, "Rome.", other_tenant.response.entry_id),
    ):
        found = await stub.Lookup(lookup_request(cache_key), metadata=internal)
        assert (found.hit, found.answer.text, found.entry_id) == (True, text, entry_id)
    assert not (await stub.Lookup(lookup_request(bad), metadata=internal)).hit
    # Idempotent: the same item again is the same entry.
    again = await stub.BatchStore(
        cache_service_pb2.BatchStoreRequest(
            requests=[store_request(paris, answer("Paris."), request_id="r-1")]
        ),
        metadata=internal,
    )
    assert again.results[0].response.entry_id == stored.response.entry_id


async def test_a_batch_store_of_no_items_is_refused_whole(stub: Stub, internal: Metadata) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.BatchStore(cache_service_pb2.BatchStoreRequest(), metadata=internal)
    details = errors.decode(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert "requests" in details.field_violations


@pytest.mark.parametrize("scopes", [("chat",), ("admin",)])
async def test_batch_store_needs_internal(
    stub: Stub, as_caller: Callable[..., Metadata], scopes: tuple[str, ...]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.BatchStore(
            cache_service_pb2.BatchStoreRequest(requests=[store_request()]),
            metadata=as_caller("acme", *scopes),
        )
    details = errors.decode(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")
