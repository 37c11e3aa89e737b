"""A router killed mid-stream: its hold expires and the reaper settles it at the
full reserved amount, once, even with several replicas; a late Settle or
Release from the router's outbox replaces that amount exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import grpc

from orchestra.budget.v1 import budget_service_pb2 as pb
from tests.budget.conftest import Budget, Metadata, make_budget, make_tenant
from tests.budget.test_admission import _fails, _subject, settle, status

# Bounded wait for a reaper round (it runs every second on each replica).
WAIT_ROUNDS = 150


async def _reserve_short(budget: Budget, internal: Metadata, request_id: str, amount: int) -> None:
    await budget.budgets.Reserve(
        pb.ReserveRequest(
            request_id=request_id,
            subject=_subject(),
            model="openai/gpt-4o",
            amount_micro_usd=amount,
            tokens=100,
            ttl_seconds=1,  # the router "dies" right after this
        ),
        metadata=internal,
    )


async def _ledger_rows(pg_url: str) -> dict[str, tuple[int, bool]]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT request_id, cost_micro_usd, reaped FROM budget.ledger")
    finally:
        await conn.close()
    return {r["request_id"]: (int(r["cost_micro_usd"]), bool(r["reaped"])) for r in rows}


async def _wait_for(check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(WAIT_ROUNDS):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the reaper did not settle the expired hold in time")


async def test_a_router_killed_mid_stream_is_charged_the_full_hold_once(
    start_budget: Callable[..., Awaitable[Budget]],
    operator: Metadata,
    admin: Callable[[str], Metadata],
    internal: Metadata,
) -> None:
    budget = await start_budget()
    await start_budget()  # a second replica: its reaper races the first one
    await make_tenant(budget, operator, "acme")
    limit = await make_budget(budget, admin("acme"), "acme", 10_000)
    await _reserve_short(budget, internal, "dead", 900)
    await _reserve_short(budget, internal, "cache-hit", 500)

    async def both_reaped() -> bool:
        rows = await _ledger_rows(budget.pg_url)
        return rows.keys() == {"dead", "cache-hit"}

    await _wait_for(both_reaped)
    assert await _ledger_rows(budget.pg_url) == {"dead": (900, True), "cache-hit": (500, True)}
    state = (await status(budget, admin("acme")))[limit.budget_id]
    # Charged once each, never zero, nothing left held.
    assert (state.spent_micro_usd, state.reserved_micro_usd) == (1_400, 0)

    # The router's outbox delivers the real cost late: it replaces the reaped one.
    late = await settle(budget, internal, "dead", 300)
    assert (late.charged_micro_usd, late.released_micro_usd) == (300, 600)
    again = await settle(budget, internal, "dead", 300)
    assert again == late
    details, _ = await _fails(settle(budget, internal, "dead", 301))
    assert (details.code, details.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_SETTLED",
    )
    # A late Release (the answer came from the cache) refunds the reaped hold once.
    release = budget.budgets.Release
    refunded = await release(pb.ReleaseRequest(request_id="cache-hit"), metadata=internal)
    assert refunded.released_micro_usd == 500
    assert (
        await release(pb.ReleaseRequest(request_id="cache-hit"), metadata=internal)
    ).released_micro_usd == 0

    assert await _ledger_rows(budget.pg_url) == {"dead": (300, False), "cache-hit": (0, False)}
    state = (await status(budget, admin("acme")))[limit.budget_id]
    assert (state.spent_micro_usd, state.reserved_micro_usd) == (300, 0)


async def test_a_settle_racing_the_reaper_is_charged_once(
    budget: Budget, operator: Metadata, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    await make_tenant(budget, operator, "acme")
    limit = await make_budget(budget, admin("acme"), "acme", 100_000)
    costs = {f"r{i}": 10 * i for i in range(40)}
    for request_id in costs:
        await _reserve_short(budget, internal, request_id, 1_000)
    # Settles arrive around the expiry: each is charged once, at the reported cost.
    await asyncio.sleep(0.9)
    await asyncio.gather(*(settle(budget, internal, r, c) for r, c in costs.items()))

    async def all_settled() -> bool:
        return (await status(budget, admin("acme")))[limit.budget_id].reserved_micro_usd == 0

    await _wait_for(all_settled)
    rows = await _ledger_rows(budget.pg_url)
    assert rows == {r: (c, False) for r, c in costs.items()}
    state = (await status(budget, admin("acme")))[limit.budget_id]
    assert state.spent_micro_usd == sum(costs.values())
