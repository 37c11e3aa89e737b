"""Proof under concurrency: 1,000 reservations at once over real gRPC against
budgets that admit a fraction, settled with random (partly broken-stream)
costs, with retries of the same request ids in the same bursts."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import asyncpg
import grpc

from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import chat_pb2
from services.common import errors
from tests.budget.conftest import Budget, Metadata, make_budget, make_tenant
from tests.budget.test_admission import status

REQUESTS = 1_000
KEYS = [f"k{i}" for i in range(4)]
TENANT_LIMIT = 150_000
KEY_LIMIT = 50_000  # four keys could take 200,000: both levels bind


async def _ledger_by_key(pg_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT key_id, sum(cost_micro_usd)::bigint AS spent, count(*) AS n"
            " FROM budget.ledger GROUP BY key_id"
        )
    finally:
        await conn.close()
    return {r["key_id"]: int(r["spent"]) for r in rows}


async def test_a_thousand_concurrent_reservations_never_overspend(
    budget: Budget, operator: Metadata, admin: Callable[[str], Metadata], internal: Metadata
) -> None:
    rng = random.Random(20261124)
    await make_tenant(budget, operator, "acme")
    tenant_budget = await make_budget(budget, admin("acme"), "acme", TENANT_LIMIT)
    key_budgets = {
        key: await make_budget(
            budget, admin("acme"), "acme", KEY_LIMIT, level=pb.BUDGET_LEVEL_API_KEY, subject=key
        )
        for key in KEYS
    }
    requests = {f"req-{i}": (KEYS[i % len(KEYS)], rng.randint(500, 1_500)) for i in range(REQUESTS)}

    def reserve(request_id: str) -> grpc.aio.UnaryUnaryCall[pb.ReserveRequest, pb.ReserveResponse]:
        key, amount = requests[request_id]
        return budget.budgets.Reserve(
            pb.ReserveRequest(
                request_id=request_id,
                subject=pb.SpendSubject(tenant_id="acme", key_id=key),
                model="openai/gpt-4o",
                amount_micro_usd=amount,
                tokens=1_000,
            ),
            metadata=internal,
        )

    async def burst(ids: list[str]) -> dict[str, int]:
        """Reserves ``ids`` all at once; returns the admitted ones' holds."""
        results = await asyncio.gather(*(reserve(r) for r in ids), return_exceptions=True)
        admitted: dict[str, int] = {}
        for request_id, result in zip(ids, results, strict=True):
            if isinstance(result, pb.ReserveResponse):
                assert result.held_micro_usd == requests[request_id][1]
                admitted[request_id] = result.held_micro_usd
            else:
                assert isinstance(result, grpc.aio.AioRpcError), result
                assert errors.decode(result).reason == "BUDGET_EXHAUSTED", result
        return admitted

    # A gRPC server cancels calls beyond its 1,000 pending requests
    # (grpc.server.max_pending_requests), so each burst is 1,000 calls.
    ids = list(requests)
    rng.shuffle(ids)
    admitted = await burst(ids)
    assert 0 < len(admitted) < REQUESTS
    # All of them retried at once: the same holds, nothing more admitted.
    rng.shuffle(ids)
    assert await burst(ids) == admitted

    held_by_key = {key: 0 for key in KEYS}
    for request_id, amount in admitted.items():
        held_by_key[requests[request_id][0]] += amount
    state = await status(budget, admin("acme"))
    assert state[tenant_budget.budget_id].reserved_micro_usd == sum(admitted.values())
    assert sum(admitted.values()) <= TENANT_LIMIT
    for key, key_budget in key_budgets.items():
        reserved = (await status(budget, admin("acme"), key_id=key))[key_budget.budget_id]
        assert reserved.reserved_micro_usd == held_by_key[key] <= KEY_LIMIT

    # Settle all, some as broken streams (partial), with duplicate settles in the burst.
    costs = {r: rng.randint(0, amount) for r, amount in admitted.items()}
    broken = set(rng.sample(sorted(admitted), len(admitted) // 5))

    def settle(request_id: str) -> grpc.aio.UnaryUnaryCall[pb.SettleRequest, pb.SettleResponse]:
        return budget.budgets.Settle(
            pb.SettleRequest(
                request_id=request_id,
                cost_micro_usd=costs[request_id],
                usage=chat_pb2.Usage(prompt_tokens=100, completion_tokens=50),
                partial=request_id in broken,
            ),
            metadata=internal,
        )

    settles = list(admitted) + rng.sample(sorted(admitted), len(admitted) // 2)
    assert len(settles) <= 1_000
    rng.shuffle(settles)
    settled = await asyncio.gather(*(settle(r) for r in settles))
    for request_id, response in zip(settles, settled, strict=True):
        assert response.charged_micro_usd == costs[request_id]
        assert response.released_micro_usd == admitted[request_id] - costs[request_id]

    async def assert_ledger_matches_redis() -> None:
        ledger = await _ledger_by_key(budget.pg_url)
        tenant_state = (await status(budget, admin("acme")))[tenant_budget.budget_id]
        assert (tenant_state.spent_micro_usd, tenant_state.reserved_micro_usd) == (
            sum(ledger.values()),
            0,
        )
        assert sum(ledger.values()) == sum(costs.values())
        for key, key_budget in key_budgets.items():
            key_state = (await status(budget, admin("acme"), key_id=key))[key_budget.budget_id]
            expected = sum(c for r, c in costs.items() if requests[r][0] == key)
            assert (key_state.spent_micro_usd, key_state.reserved_micro_usd) == (
                ledger.get(key, 0),
                0,
            )
            assert ledger.get(key, 0) == expected

    await assert_ledger_matches_redis()

    # Retrying everything that was admitted, reserve and settle, changes nothing.
    again = await asyncio.gather(*(reserve(r) for r in admitted))
    assert [r.held_micro_usd for r in again] == list(admitted.values())
    await asyncio.gather(*(settle(r) for r in admitted))
    await assert_ledger_matches_redis()
