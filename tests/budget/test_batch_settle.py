"""BatchSettle and BatchRelease: each item as its single RPC would, one outcome per item."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import chat_pb2
from services.common import errors
from tests.budget.conftest import Budget, Metadata, make_budget, make_tenant
from tests.budget.test_admission import ledger_total, reserve, status


@pytest.fixture
async def acme(budget: Budget, operator: Metadata) -> Budget:
    await make_tenant(budget, operator, "acme")
    return budget


def _settle(request_id: str, cost: int) -> pb.SettleRequest:
    return pb.SettleRequest(
        request_id=request_id,
        cost_micro_usd=cost,
        usage=chat_pb2.Usage(prompt_tokens=10, completion_tokens=5),
    )


def _reason(status: status_pb2.Status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


async def test_batch_settle_charges_each_item_and_reports_each_failure(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    limit = await make_budget(acme, admin("acme"), "acme", 1_000_000)
    for i in range(4):
        await reserve(acme, internal, f"b-{i}", 1_000)
    await acme.budgets.Settle(_settle("b-3", 500), metadata=internal)  # settled before
    reply = await acme.budgets.BatchSettle(
        pb.BatchSettleRequest(
            requests=[
                _settle("b-0", 400),
                _settle("never-reserved", 1),
                _settle("b-1", 1_200),  # an overrun is charged in full
                pb.SettleRequest(request_id="b-2", cost_micro_usd=-1),
                _settle("b-3", 501),  # a different amount than the first settle
            ]
        ),
        metadata=internal,
    )
    outcomes = [r.WhichOneof("outcome") for r in reply.results]
    assert outcomes == ["response", "error", "response", "error", "error"]
    first, missing, overrun, negative, twice = reply.results
    assert (first.response.charged_micro_usd, first.response.released_micro_usd) == (400, 600)
    assert (overrun.response.charged_micro_usd, overrun.response.released_micro_usd) == (1_200, 0)
    refusals = [(r.error.code, _reason(r.error)) for r in (missing, negative, twice)]
    assert refusals == [
        (grpc.StatusCode.NOT_FOUND.value[0], "RESERVATION_NOT_FOUND"),
        (grpc.StatusCode.INVALID_ARGUMENT.value[0], "INVALID_FIELD"),
        (grpc.StatusCode.FAILED_PRECONDITION.value[0], "ALREADY_SETTLED"),
    ]
    # What failed was not charged; b-2 still holds its reservation.
    state = (await status(acme, admin("acme")))[limit.budget_id]
    assert state.spent_micro_usd == 400 + 1_200 + 500 == await ledger_total(acme.pg_url)
    assert state.reserved_micro_usd == 1_000
    # Idempotent per request id: the same batch again charges nothing more.
    again = await acme.budgets.BatchSettle(
        pb.BatchSettleRequest(requests=[_settle("b-0", 400), _settle("b-1", 1_200)]),
        metadata=internal,
    )
    assert [r.response for r in again.results] == [first.response, overrun.response]
    assert await ledger_total(acme.pg_url) == 2_100


async def test_batch_release_frees_each_hold(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    limit = await make_budget(acme, admin("acme"), "acme", 1_000_000)
    await reserve(acme, internal, "h-0", 700)
    await reserve(acme, internal, "h-1", 300)
    reply = await acme.budgets.BatchRelease(
        pb.BatchReleaseRequest(
            requests=[
                pb.ReleaseRequest(request_id="h-0"),
                pb.ReleaseRequest(request_id=""),
                pb.ReleaseRequest(request_id="h-1"),
            ]
        ),
        metadata=internal,
    )
    assert [r.WhichOneof("outcome") for r in reply.results] == ["response", "error", "response"]
    released = [reply.results[i].response.released_micro_usd for i in (0, 2)]
    assert released == [700, 300]
    assert _reason(reply.results[1].error) == "INVALID_FIELD"
    state = (await status(acme, admin("acme")))[limit.budget_id]
    assert (state.spent_micro_usd, state.reserved_micro_usd) == (0, 0)


@pytest.mark.parametrize("count", [0, 1001])
async def test_a_batch_of_no_items_or_too_many_is_refused_whole(
    acme: Budget, internal: Metadata, count: int
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await acme.budgets.BatchSettle(
            pb.BatchSettleRequest(requests=[_settle(f"x-{i}", 1) for i in range(count)]),
            metadata=internal,
        )
    details = errors.decode(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert "requests" in details.field_violations
