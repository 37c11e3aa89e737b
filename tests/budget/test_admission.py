"""Reserve / Settle / Release: atomic, idempotent, and never above a hard limit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2, status_pb2

from orchestra.budget.v1 import account_service_pb2 as account_pb
from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.budget.v1 import budget_service_pb2_grpc
from orchestra.common.v1 import chat_pb2
from services.budget.server import BudgetService
from services.common import errors
from services.common.identity import IdentitySigner
from services.common.stores import connect_postgres, connect_redis, migrate
from tests.budget.conftest import Budget, Metadata, make_budget, make_tenant

TEAM = pb.BUDGET_LEVEL_TEAM
END_USER = pb.BUDGET_LEVEL_END_USER


async def _fails(call: Any) -> tuple[errors.ErrorDetails, grpc.aio.AioRpcError]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return errors.decode(caught.value), caught.value


def _subject(tenant: str = "acme", **fields: str) -> pb.SpendSubject:
    return pb.SpendSubject(tenant_id=tenant, key_id=fields.pop("key_id", "k1"), **fields)


async def reserve(
    budget: Budget, internal: Metadata, request_id: str, amount: int, **subject: str
) -> pb.ReserveResponse:
    response: pb.ReserveResponse = await budget.budgets.Reserve(
        pb.ReserveRequest(
            request_id=request_id,
            subject=_subject(**subject),
            model="openai/gpt-4o",
            amount_micro_usd=amount,
            tokens=100,
        ),
        metadata=internal,
    )
    return response


async def settle(
    budget: Budget, internal: Metadata, request_id: str, cost: int
) -> pb.SettleResponse:
    response: pb.SettleResponse = await budget.budgets.Settle(
        pb.SettleRequest(
            request_id=request_id,
            cost_micro_usd=cost,
            usage=chat_pb2.Usage(prompt_tokens=10, completion_tokens=5),
        ),
        metadata=internal,
    )
    return response


async def status(budget: Budget, metadata: Metadata, **subject: str) -> dict[str, pb.BudgetStatus]:
    response = await budget.budgets.GetBudgetStatus(
        pb.GetBudgetStatusRequest(subject=_subject(**subject)), metadata=metadata
    )
    return {s.budget.budget_id: s for s in response.statuses}


async def ledger_total(pg_url: str) -> int:
    conn = await asyncpg.connect(pg_url)
    try:
        return int(
            await conn.fetchval("SELECT coalesce(sum(cost_micro_usd), 0) FROM budget.ledger")
        )
    finally:
        await conn.close()


@pytest.fixture
async def acme(budget: Budget, operator: Metadata) -> Budget:
    await make_tenant(budget, operator, "acme")
    return budget


async def test_over_the_limit_is_refused_and_nothing_is_held(
    acme: Budget,
    admin: Callable[[str], Metadata],
    internal: Metadata,
    redis_client: aioredis.Redis,
) -> None:
    tenant_budget = await make_budget(acme, admin("acme"), "acme", 10_000)
    team_budget = await make_budget(acme, admin("acme"), "acme", 1_000, level=TEAM, subject="ml")
    await reserve(acme, internal, "r1", 600, team="ml")
    details, error = await _fails(reserve(acme, internal, "r2", 500, team="ml"))
    assert (details.code, details.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "BUDGET_EXHAUSTED",
    )
    assert details.metadata["budget_id"] == team_budget.budget_id
    assert (details.metadata["limit_micro_usd"], details.metadata["used_micro_usd"]) == (
        "1000",
        "600",
    )
    assert _quota_subjects(error) == [f"budgets/{team_budget.budget_id}"]
    # All or nothing: the tenant budget, which had room, holds nothing for r2.
    state = await status(acme, admin("acme"), team="ml")
    assert state[tenant_budget.budget_id].reserved_micro_usd == 600
    assert state[team_budget.budget_id].reserved_micro_usd == 600
    assert not await redis_client.exists("{budget}:hold:r2")
    # Another team is not limited by "ml"'s budget.
    await reserve(acme, internal, "r3", 500, team="other")


def _quota_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                    failure = error_details_pb2.QuotaFailure()
                    detail.Unpack(failure)
                    return [v.subject for v in failure.violations]
    return []


async def test_reserve_is_idempotent_per_request_id(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    limit = await make_budget(acme, admin("acme"), "acme", 1_000)
    first = await reserve(acme, internal, "same", 700)
    again = await reserve(acme, internal, "same", 700)
    assert (first.held_micro_usd, first.expire_time) == (again.held_micro_usd, again.expire_time)
    assert (await status(acme, admin("acme")))[limit.budget_id].reserved_micro_usd == 700


async def test_settle_charges_and_the_ledger_matches_redis(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    limit = await make_budget(acme, admin("acme"), "acme", 1_000_000)
    charged = 0
    for i, (hold, cost) in enumerate([(1000, 400), (1000, 1000), (500, 800), (300, 0)]):
        await reserve(acme, internal, f"req-{i}", hold)
        settled = await settle(acme, internal, f"req-{i}", cost)
        # An overrun is charged in full; the rest of a hold is released.
        assert (settled.charged_micro_usd, settled.released_micro_usd) == (
            cost,
            max(hold - cost, 0),
        )
        charged += cost
    state = (await status(acme, admin("acme")))[limit.budget_id]
    assert state.spent_micro_usd == charged == await ledger_total(acme.pg_url)
    assert state.reserved_micro_usd == 0
    assert state.remaining_micro_usd == 1_000_000 - charged


async def test_settle_is_idempotent_and_refuses_a_different_amount(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    limit = await make_budget(acme, admin("acme"), "acme", 100_000)
    await reserve(acme, internal, "r1", 1_000)
    first = await settle(acme, internal, "r1", 600)
    again = await settle(acme, internal, "r1", 600)
    assert first == again
    details, _ = await _fails(settle(acme, internal, "r1", 601))
    assert (details.code, details.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_SETTLED",
    )
    assert (await status(acme, admin("acme")))[limit.budget_id].spent_micro_usd == 600
    assert await ledger_total(acme.pg_url) == 600
    unknown, _ = await _fails(settle(acme, internal, "never-reserved", 1))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")


async def test_settle_finishes_after_a_crash_between_ledger_and_redis(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    limit = await make_budget(acme, admin("acme"), "acme", 100_000)
    await reserve(acme, internal, "r1", 1_000)
    # The ledger row was written, then the process died before Redis moved.
    conn = await asyncpg.connect(acme.pg_url)
    try:
        await conn.execute(
            "INSERT INTO budget.ledger (request_id, tenant_id, key_id, held_micro_usd,"
            " cost_micro_usd, spend_time) VALUES ('r1', 'acme', 'k1', 1000, 700, now())"
        )
    finally:
        await conn.close()
    retried = await settle(acme, internal, "r1", 700)  # the outbox retries
    assert (retried.charged_micro_usd, retried.released_micro_usd) == (700, 300)
    state = (await status(acme, admin("acme")))[limit.budget_id]
    assert (state.spent_micro_usd, state.reserved_micro_usd) == (700, 0)


async def test_release_frees_the_hold(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    limit = await make_budget(acme, admin("acme"), "acme", 1_000)
    await reserve(acme, internal, "r1", 800)
    release = acme.budgets.Release
    first = await release(pb.ReleaseRequest(request_id="r1"), metadata=internal)
    again = await release(pb.ReleaseRequest(request_id="r1"), metadata=internal)
    assert first.released_micro_usd == again.released_micro_usd == 800
    assert (await status(acme, admin("acme")))[limit.budget_id].reserved_micro_usd == 0
    await reserve(acme, internal, "r2", 900)  # the room is back
    details, _ = await _fails(release(pb.ReleaseRequest(request_id="nope"), metadata=internal))
    assert (details.code, details.reason) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
    # A late settle of a released hold is still charged (never lost).
    await settle(acme, internal, "r1", 50)
    state = (await status(acme, admin("acme")))[limit.budget_id]
    assert (state.spent_micro_usd, state.reserved_micro_usd) == (50, 900)


async def test_concurrent_reserves_never_exceed_the_limit(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    limit = await make_budget(acme, admin("acme"), "acme", 10_000)
    results = await asyncio.gather(
        *(reserve(acme, internal, f"c-{i}", 300) for i in range(200)), return_exceptions=True
    )
    admitted = [r for r in results if isinstance(r, pb.ReserveResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(admitted) + len(refused) == 200
    assert {errors.decode(r).reason for r in refused} == {"BUDGET_EXHAUSTED"}
    assert len(admitted) == 10_000 // 300
    state = (await status(acme, admin("acme")))[limit.budget_id]
    assert state.reserved_micro_usd == 300 * len(admitted) <= 10_000


async def test_soft_budgets_warn_and_per_request_caps_refuse(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    soft = await make_budget(acme, admin("acme"), "acme", 1_000, soft=True)
    cap = await make_budget(acme, admin("acme"), "acme", 5_000, window=pb.BUDGET_WINDOW_REQUEST)
    warned = await reserve(acme, internal, "r1", 1_500)
    assert [(w.budget_id, w.used_micro_usd, w.limit_micro_usd) for w in warned.warnings] == [
        (soft.budget_id, 1_500, 1_000)
    ]
    details, _ = await _fails(reserve(acme, internal, "r2", 5_001))
    assert details.metadata["budget_id"] == cap.budget_id
    await reserve(acme, internal, "r3", 5_000)  # a cap per request, not a running total


async def test_each_end_user_has_their_own_budget(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    each = await make_budget(acme, admin("acme"), "acme", 1_000, level=END_USER, subject="*")
    await reserve(acme, internal, "a1", 1_000, end_user="alice")
    await reserve(acme, internal, "b1", 1_000, end_user="bob")
    details, _ = await _fails(reserve(acme, internal, "a2", 1, end_user="alice"))
    assert details.metadata["budget_id"] == each.budget_id
    await reserve(acme, internal, "n1", 5_000)  # no end user: the budget does not apply


async def test_cold_start_rebuilds_spent_from_the_ledger(
    start_budget: Callable[..., Awaitable[Budget]],
    operator: Metadata,
    admin: Callable[[str], Metadata],
    internal: Metadata,
    redis_client: aioredis.Redis,
) -> None:
    budget = await start_budget()
    await make_tenant(budget, operator, "acme")
    month = await make_budget(budget, admin("acme"), "acme", 10_000)
    team = await make_budget(budget, admin("acme"), "acme", 6_000, level=TEAM, subject="ml")
    for i, cost in enumerate([1_000, 2_500, 700]):
        await reserve(budget, internal, f"r{i}", 3_000, team="ml" if i else "")
        await settle(budget, internal, f"r{i}", cost)
    await redis_client.flushdb()  # Redis lost everything
    restarted = await start_budget()
    state = await status(restarted, admin("acme"), team="ml")
    assert state[month.budget_id].spent_micro_usd == 4_200 == await ledger_total(budget.pg_url)
    assert state[team.budget_id].spent_micro_usd == 3_200
    # And while running: the next Reserve rebuilds before admitting anything.
    await redis_client.flushdb()
    details, _ = await _fails(reserve(restarted, internal, "r9", 2_801, team="ml"))
    assert (details.reason, details.metadata["budget_id"]) == ("BUDGET_EXHAUSTED", team.budget_id)
    await reserve(restarted, internal, "r10", 2_800, team="ml")


async def test_a_new_budget_counts_spend_already_in_its_window(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    await reserve(acme, internal, "r1", 900)
    await settle(acme, internal, "r1", 900)
    late = await make_budget(acme, admin("acme"), "acme", 1_000)
    assert (await status(acme, admin("acme")))[late.budget_id].remaining_micro_usd == 100
    details, _ = await _fails(reserve(acme, internal, "r2", 101))
    assert details.reason == "BUDGET_EXHAUSTED"


async def test_expired_holds_are_charged_in_full_by_the_reaper(
    acme: Budget, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    limit = await make_budget(acme, admin("acme"), "acme", 1_000)
    await acme.budgets.Reserve(
        pb.ReserveRequest(
            request_id="short", subject=_subject(), amount_micro_usd=900, ttl_seconds=1
        ),
        metadata=internal,
    )
    # Wait for the state, not for a time: the reaper runs every second.
    for _ in range(100):
        if (await status(acme, admin("acme")))[limit.budget_id].reserved_micro_usd == 0:
            break
        await asyncio.sleep(0.1)
    state = (await status(acme, admin("acme")))[limit.budget_id]
    # Never zero: the caller died, so the worst case it declared is charged.
    assert (state.spent_micro_usd, state.reserved_micro_usd) == (900, 0)
    assert await ledger_total(acme.pg_url) == 900


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("Reserve", pb.ReserveRequest(request_id="r", subject=_subject(), amount_micro_usd=1)),
        ("Settle", pb.SettleRequest(request_id="r", cost_micro_usd=1)),
        ("Release", pb.ReleaseRequest(request_id="r")),
        ("BatchSettle", pb.BatchSettleRequest(requests=[pb.SettleRequest(request_id="r")])),
        ("BatchRelease", pb.BatchReleaseRequest(requests=[pb.ReleaseRequest(request_id="r")])),
        ("Authenticate", account_pb.AuthenticateRequest(api_key="ok_a_bcdefghijklmnopqrstuvwxyz")),
    ],
    ids=["reserve", "settle", "release", "batch-settle", "batch-release", "authenticate"],
)
async def test_internal_rpcs_refuse_tenant_keys(
    acme: Budget, as_caller: Any, method: str, request_: Any
) -> None:
    stub = acme.accounts if method == "Authenticate" else acme.budgets
    for scopes in (("chat",), ("chat", "read", "admin", "operator")):
        details, _ = await _fails(
            getattr(stub, method)(request_, metadata=as_caller("acme", *scopes))
        )
        assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ReserveRequest(subject=_subject(), amount_micro_usd=1), "request_id"),
        (pb.ReserveRequest(request_id="r", amount_micro_usd=1), "subject.tenant_id"),
        (
            pb.ReserveRequest(request_id="r", subject=_subject(), amount_micro_usd=-1),
            "amount_micro_usd",
        ),
        (pb.ReserveRequest(request_id="r", subject=_subject(), ttl_seconds=-5), "ttl_seconds"),
        (pb.ReserveRequest(request_id="r", subject=_subject(team="Bad Team")), "subject.team"),
        (pb.ReserveRequest(request_id="x" * 201, subject=_subject()), "request_id"),
    ],
    ids=["no-request-id", "no-tenant", "negative", "negative-ttl", "bad-team", "long-id"],
)
async def test_reserve_rejects_bad_input(
    acme: Budget, internal: Metadata, request_: pb.ReserveRequest, field: str
) -> None:
    details, _ = await _fails(acme.budgets.Reserve(request_, metadata=internal))
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert details.metadata["field"] == field


async def test_reserve_for_an_unknown_tenant_is_not_found(acme: Budget, internal: Metadata) -> None:
    details, _ = await _fails(reserve(acme, internal, "r1", 1, tenant="ghost"))
    assert (details.code, details.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")


async def test_redis_down_fails_closed(
    pg_url: str,
    serve: Callable[..., Awaitable[Any]],
    signer: IdentitySigner,
    internal: Metadata,
) -> None:
    pool = await connect_postgres(pg_url)
    await migrate(pool, "budget")
    await pool.execute("INSERT INTO budget.tenants (tenant_id) VALUES ('acme')")
    # Nothing listens on port 1.
    app = BudgetService(pool, connect_redis("redis://127.0.0.1:1/0"), signer)
    running = await serve(app)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = budget_service_pb2_grpc.BudgetServiceStub(channel)
        for call in (
            stub.Reserve(
                pb.ReserveRequest(request_id="r1", subject=_subject(), amount_micro_usd=1),
                metadata=internal,
            ),
            stub.Settle(pb.SettleRequest(request_id="r1", cost_micro_usd=1), metadata=internal),
        ):
            details, _ = await _fails(call)
            assert (details.code, details.reason) == (
                grpc.StatusCode.UNAVAILABLE,
                "STORE_UNAVAILABLE",
            )
            assert details.retry_after is not None and details.retry_after > 0
