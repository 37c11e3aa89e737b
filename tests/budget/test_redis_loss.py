"""Redis loses all its data in the middle of a run of concurrent reservations.

The counters are rebuilt from PostgreSQL (ledger sums and the holds still
open), so after the loss no limit is exceeded, in-flight requests still
settle, and spent + reserved never falls below the ledger.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable
from typing import Any

import grpc
import redis.asyncio as aioredis

from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import chat_pb2
from services.common import errors
from tests.budget.conftest import Budget, Metadata, make_budget, make_tenant
from tests.budget.test_admission import ledger_total, status

REQUESTS = 600
TENANT_LIMIT = 250_000  # demand is about 600 * 1,000: the limit binds
KEY_LIMIT = 80_000
KEYS = ["k0", "k1", "k2", "k3"]
LONG_STREAMS = 20  # held across the loss, settled after it


async def _retrying(call: Callable[[], grpc.aio.UnaryUnaryCall[Any, Any]]) -> object:
    """The call's response, retried while the service answers UNAVAILABLE."""
    for _ in range(200):
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                return exc
            await asyncio.sleep(0.05)
    raise AssertionError("still UNAVAILABLE after 200 retries")


async def test_redis_flushed_mid_run_loses_nothing_and_overspends_nothing(
    budget: Budget,
    operator: Metadata,
    admin: Callable[[str], Metadata],
    internal: Metadata,
    redis_client: aioredis.Redis,
) -> None:
    rng = random.Random(20261124)
    await make_tenant(budget, operator, "acme")
    tenant_budget = await make_budget(budget, admin("acme"), "acme", TENANT_LIMIT)
    key_budgets = {
        key: await make_budget(
            budget,
            admin("acme"),
            "acme",
            KEY_LIMIT,
            level=pb.BUDGET_LEVEL_API_KEY,
            subject=key,
        )
        for key in KEYS
    }
    amounts = {f"req-{i}": rng.randint(500, 1_500) for i in range(REQUESTS + LONG_STREAMS)}
    key_of = {r: KEYS[i % len(KEYS)] for i, r in enumerate(amounts)}

    def reserve(request_id: str) -> grpc.aio.UnaryUnaryCall[pb.ReserveRequest, pb.ReserveResponse]:
        return budget.budgets.Reserve(
            pb.ReserveRequest(
                request_id=request_id,
                subject=pb.SpendSubject(tenant_id="acme", key_id=key_of[request_id]),
                model="openai/gpt-4o",
                amount_micro_usd=amounts[request_id],
                tokens=1_000,
            ),
            metadata=internal,
        )

    def settle(request_id: str) -> grpc.aio.UnaryUnaryCall[pb.SettleRequest, pb.SettleResponse]:
        # Every admitted request costs exactly its hold, so spent + reserved
        # only grows and the admitted total must stay within the limits.
        return budget.budgets.Settle(
            pb.SettleRequest(
                request_id=request_id,
                cost_micro_usd=amounts[request_id],
                usage=chat_pb2.Usage(prompt_tokens=100, completion_tokens=50),
            ),
            metadata=internal,
        )

    def release(request_id: str) -> grpc.aio.UnaryUnaryCall[pb.ReleaseRequest, pb.ReleaseResponse]:
        return budget.budgets.Release(pb.ReleaseRequest(request_id=request_id), metadata=internal)

    admitted: set[str] = set()
    enough = asyncio.Event()  # set once some requests were admitted: time to lose Redis

    async def one(request_id: str) -> None:
        outcome = await _retrying(lambda: reserve(request_id))
        if isinstance(outcome, grpc.aio.AioRpcError):
            assert errors.decode(outcome).reason == "BUDGET_EXHAUSTED", outcome
            return
        admitted.add(request_id)
        if len(admitted) >= LONG_STREAMS + 60:
            enough.set()
        await asyncio.sleep(rng.random() * 0.05)  # the "stream"
        settled = await _retrying(lambda: settle(request_id))
        assert isinstance(settled, pb.SettleResponse), settled
        assert settled.charged_micro_usd == amounts[request_id]

    ids = list(amounts)
    long_streams, short = ids[:LONG_STREAMS], ids[LONG_STREAMS:]
    for request_id in long_streams:
        assert isinstance(
            await _retrying(functools.partial(reserve, request_id)), pb.ReserveResponse
        )
        admitted.add(request_id)

    async def lose_redis_mid_run() -> None:
        await enough.wait()
        await redis_client.flushdb()

    async def watch_counters() -> None:
        """spent + reserved never falls below the ledger (sampled during the run)."""
        for _ in range(15):
            before = await ledger_total(budget.pg_url)
            try:
                state = (await status(budget, admin("acme")))[tenant_budget.budget_id]
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                continue
            assert state.spent_micro_usd + state.reserved_micro_usd >= before
            await asyncio.sleep(0.05)

    await asyncio.gather(lose_redis_mid_run(), watch_counters(), *(one(r) for r in short))
    # Nothing was freed during the run: everything admitted was held at once.
    assert 0 < len(admitted) < len(amounts)
    assert sum(amounts[r] for r in admitted) <= TENANT_LIMIT
    for key in KEYS:
        assert sum(amounts[r] for r in admitted if key_of[r] == key) <= KEY_LIMIT
    # The long streams' holds survived the loss: half settle, half are released
    # (a cache hit), and neither is lost or charged twice.
    released = set(long_streams[::2])
    for request_id in long_streams:
        if request_id in released:
            freed = await _retrying(functools.partial(release, request_id))
            assert isinstance(freed, pb.ReleaseResponse), freed
            assert freed.released_micro_usd == amounts[request_id]
            continue
        settled = await _retrying(functools.partial(settle, request_id))
        assert isinstance(settled, pb.SettleResponse), settled
        assert (settled.charged_micro_usd, settled.released_micro_usd) == (amounts[request_id], 0)

    charged = admitted - released
    total = sum(amounts[r] for r in charged)
    assert await ledger_total(budget.pg_url) == total
    state = (await status(budget, admin("acme")))[tenant_budget.budget_id]
    assert (state.spent_micro_usd, state.reserved_micro_usd) == (total, 0)
    for key, key_budget in key_budgets.items():
        expected = sum(amounts[r] for r in charged if key_of[r] == key)
        key_state = (await status(budget, admin("acme"), key_id=key))[key_budget.budget_id]
        assert (key_state.spent_micro_usd, key_state.reserved_micro_usd) == (expected, 0)
