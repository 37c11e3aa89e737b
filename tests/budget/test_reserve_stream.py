"""ReserveStream, and the shared client that multiplexes calls over it.

The real budget service on real PostgreSQL and Redis: items answered by call
id with Reserve's own outcome, the scope checked at the stream's start, and
the client's fallbacks (a peer without the stream, a lost peer, renewal).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from orchestra.budget.v1 import account_service_pb2 as account_pb
from orchestra.budget.v1 import account_service_pb2_grpc as account_grpc
from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.budget.v1 import budget_service_pb2_grpc as budget_grpc
from services.common import errors, streams
from services.common.streams import Multiplexer, StreamUnusable
from tests.budget.conftest import Budget, Metadata, make_budget, make_tenant
from tests.budget.test_admission import _subject, status
from tests.budget.test_batch_settle import _reason


@pytest.fixture
async def acme(budget: Budget, operator: Metadata) -> Budget:
    await make_tenant(budget, operator, "acme")
    return budget


def _reserve(request_id: str, amount: int) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        request_id=request_id, subject=_subject(), model="openai/gpt-4o", amount_micro_usd=amount
    )


async def _items(*requests: pb.ReserveRequest) -> AsyncIterator[pb.ReserveStreamRequest]:
    for call_id, request in enumerate(requests, start=1):
        yield pb.ReserveStreamRequest(call_id=call_id, request=request)


def _multiplexer(
    budget: Budget, internal: Metadata, method: str = "ReserveStream", **options: Any
) -> Multiplexer[pb.ReserveRequest, pb.ReserveResponse]:
    if method == "ReserveStream":
        open_stream: Callable[[], Any] = lambda: budget.budgets.ReserveStream(metadata=internal)  # noqa: E731
    else:  # a method the server does not have, as an older replica would not
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{budget.port}")
        call = channel.stream_stream(
            f"/orchestra.budget.v1.BudgetService/{method}",
            request_serializer=pb.ReserveStreamRequest.SerializeToString,
            response_deserializer=pb.ReserveStreamResponse.FromString,
        )
        open_stream = lambda: call(metadata=internal)  # noqa: E731
    return Multiplexer(
        open_stream,
        lambda call_id, r: pb.ReserveStreamRequest(call_id=call_id, request=r),
        "budget",
        **options,
    )


async def test_items_get_reserves_outcomes_by_call_id(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    limit = await make_budget(acme, admin("acme"), "acme", 10_000)
    # Items run concurrently, in no set order: each outcome here holds in any.
    answers = [
        a
        async for a in acme.budgets.ReserveStream(
            _items(
                _reserve("s-1", 4_000),
                _reserve("s-2", 20_000),  # more than the whole budget
                pb.ReserveRequest(request_id="s-3", subject=_subject(), amount_micro_usd=-1),
                _reserve("s-4", 1_000),
            ),
            metadata=internal,
        )
    ]
    by_id = {a.call_id: a for a in answers}
    assert sorted(by_id) == [1, 2, 3, 4]
    assert by_id[1].response.held_micro_usd == 4_000
    assert by_id[4].response.held_micro_usd == 1_000
    assert not by_id[1].response.unheld
    refusals = {i: (by_id[i].error.code, _reason(by_id[i].error)) for i in (2, 3)}
    assert refusals == {
        2: (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "BUDGET_EXHAUSTED"),
        3: (grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_FIELD"),
    }
    # The same request again, on a new stream: the same hold, nothing more held.
    again = [
        a
        async for a in acme.budgets.ReserveStream(_items(_reserve("s-1", 4_000)), metadata=internal)
    ]
    assert again[0].response == by_id[1].response
    state = (await status(acme, admin("acme")))[limit.budget_id]
    assert state.reserved_micro_usd == 5_000  # s-1 once, s-4; nothing for the refused


async def test_a_tenant_key_cannot_open_the_stream(acme: Budget, as_caller: Any) -> None:
    for scopes in (("chat",), ("chat", "read", "admin", "operator")):
        call = acme.budgets.ReserveStream(
            _items(_reserve("t-1", 1)), metadata=as_caller("acme", *scopes)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [a async for a in call]
        details = errors.decode(caught.value)
        assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")


async def test_the_multiplexer_carries_concurrent_calls_on_one_stream(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    await make_budget(acme, admin("acme"), "acme", 1_000)
    mux = _multiplexer(acme, internal)
    try:
        held = await asyncio.gather(*(mux.call(_reserve(f"m-{i}", 100), 5) for i in range(8)))
        assert [h.held_micro_usd for h in held] == [100] * 8
        stream = mux._stream
        assert stream is not None and not stream.call.done()
        # A refusal comes back as the budget's own error, details intact.
        with pytest.raises(errors.OrchestraError) as refused:
            await mux.call(_reserve("m-big", 5_000), 5)
        assert errors.reason_name(refused.value.reason) == "BUDGET_EXHAUSTED"
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert mux._stream is stream
    finally:
        await mux.aclose()


async def test_a_peer_without_the_stream_sends_callers_unary(
    acme: Budget, internal: Metadata
) -> None:
    now = [0.0]
    mux = _multiplexer(acme, internal, "NoSuchStream", clock=lambda: now[0])
    with pytest.raises(StreamUnusable):
        await mux.call(_reserve("u-1", 1), 5)
    # For a while the next items do not even try the stream ...
    with pytest.raises(StreamUnusable, match="does not offer"):
        await mux.call(_reserve("u-2", 1), 5)
    # ... then it is tried again (a rolling upgrade may have finished).
    now[0] += streams.UNIMPLEMENTED_RETRY_SECONDS + 1
    with pytest.raises(StreamUnusable) as again:
        await mux.call(_reserve("u-3", 1), 5)
    assert "does not offer" not in str(again.value)
    await mux.aclose()


async def test_a_lost_peer_sends_callers_unary(
    budget_settings: Callable[..., Any],
    serve: Callable[..., Any],
    operator: Metadata,
    internal: Metadata,
) -> None:
    from services.budget.server import build

    running = await serve(await build(budget_settings()))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    stub = budget_grpc.BudgetServiceStub(channel)
    mux: Multiplexer[pb.ReserveRequest, pb.ReserveResponse] = Multiplexer(
        lambda: stub.ReserveStream(metadata=internal),
        lambda call_id, r: pb.ReserveStreamRequest(call_id=call_id, request=r),
        "budget",
    )
    try:
        await account_grpc.AccountServiceStub(channel).CreateTenant(
            account_pb.CreateTenantRequest(tenant=account_pb.Tenant(tenant_id="acme")),
            metadata=operator,
        )
        await mux.call(_reserve("l-1", 1), 5)  # answered over the stream
        await running.server.stop(0)  # the peer goes away with the stream open
        with pytest.raises(StreamUnusable):
            await mux.call(_reserve("l-2", 1), 5)
    finally:
        await mux.aclose()
        await channel.close()


async def test_a_renewed_stream_finishes_the_old_ones_items(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    await make_budget(acme, admin("acme"), "acme", 1_000)
    now = [0.0]
    mux = _multiplexer(acme, internal, clock=lambda: now[0])
    try:
        await mux.call(_reserve("r-1", 1), 5)
        first = mux._stream
        now[0] += streams.RENEW_SECONDS
        await mux.call(_reserve("r-2", 1), 5)
        second = mux._stream
        assert first is not None and second is not None and second is not first
        # The old stream was half-closed and ends cleanly once answered.
        await asyncio.wait_for(first.reader, 5)  # type: ignore[arg-type]
        assert first.call.done() and await first.call.code() == grpc.StatusCode.OK
    finally:
        await mux.aclose()
