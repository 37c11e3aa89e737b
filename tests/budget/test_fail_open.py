"""Redis unreachable for real: fail-open tenants are admitted and still charged,
fail-closed tenants get UNAVAILABLE with RetryInfo.

Each test runs a redis-server of its own (services.cli.embedded) and stops it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestra.budget.v1 import account_service_pb2 as account_pb
from orchestra.budget.v1 import account_service_pb2_grpc, budget_service_pb2_grpc
from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import chat_pb2
from services.budget.budget_service import FAIL_OPEN_HEADER
from services.budget.server import BudgetService, build
from services.cli.embedded import RedisServer, Supervisor, free_port, start_redis
from services.common import settings as settings_mod
from tests.budget.conftest import Metadata
from tests.budget.test_admission import _fails, ledger_total


class OwnRedis:
    """A redis-server this test can stop and start again (same port, same data)."""

    def __init__(self, state_dir: Path) -> None:
        self._supervisor = Supervisor(state_dir)
        self._state_dir = state_dir
        self._port = free_port()
        self.server: RedisServer | None = None

    async def start(self) -> str:
        self.server = await start_redis(self._supervisor, self._state_dir, self._port)
        return self.server.url

    async def stop(self) -> None:
        await self._supervisor.stop()


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[OwnRedis]:
    redis = OwnRedis(tmp_path / "own-redis")
    yield redis
    await redis.stop()


@pytest.fixture
async def stub(
    own_redis: OwnRedis,
    pg_url: str,
    make_settings: Callable[..., settings_mod.Settings],
    serve: Callable[..., Awaitable[Any]],
    operator: Metadata,
    admin: Callable[[str], Metadata],
) -> AsyncIterator[Any]:
    url = await own_redis.start()
    app: BudgetService = await build(make_settings(DATABASE_URL=pg_url, REDIS_URL=url))
    running = await serve(app)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        accounts = account_service_pb2_grpc.AccountServiceStub(channel)
        for tenant, fail_open in (("open", True), ("closed", False)):
            await accounts.CreateTenant(
                account_pb.CreateTenantRequest(
                    tenant=account_pb.Tenant(
                        tenant_id=tenant, policy=account_pb.TenantPolicy(fail_open=fail_open)
                    )
                ),
                metadata=operator,
            )
        yield budget_service_pb2_grpc.BudgetServiceStub(channel)


def _reserve(stub: Any, internal: Metadata, tenant: str, request_id: str, amount: int) -> Any:
    return stub.Reserve(
        pb.ReserveRequest(
            request_id=request_id,
            subject=pb.SpendSubject(tenant_id=tenant, key_id="k1"),
            model="openai/gpt-4o",
            amount_micro_usd=amount,
            tokens=50,
        ),
        metadata=internal,
    )


def _settle(stub: Any, internal: Metadata, request_id: str, cost: int) -> Any:
    return stub.Settle(
        pb.SettleRequest(
            request_id=request_id,
            cost_micro_usd=cost,
            usage=chat_pb2.Usage(prompt_tokens=10, completion_tokens=5),
        ),
        metadata=internal,
    )


async def _spent(stub: Any, reader: Metadata, tenant: str) -> tuple[int, int]:
    response = await stub.GetBudgetStatus(
        pb.GetBudgetStatusRequest(subject=pb.SpendSubject(tenant_id=tenant)), metadata=reader
    )
    (state,) = response.statuses
    return state.spent_micro_usd, state.reserved_micro_usd


async def test_fail_open_admits_and_charges_fail_closed_refuses(
    stub: Any,
    own_redis: OwnRedis,
    pg_url: str,
    admin: Callable[[str], Metadata],
    reader: Callable[[str], Metadata],
    internal: Metadata,
) -> None:
    await make_budget_via(stub, admin("open"), "open", 10_000)
    await _reserve(stub, internal, "open", "held", 1_000)
    await own_redis.stop()  # Redis is down from here

    call = _reserve(stub, internal, "open", "o1", 500)
    first = await call
    assert first.held_micro_usd == 0
    assert (FAIL_OPEN_HEADER, "redis-unreachable") in tuple(await call.trailing_metadata())
    again = await _reserve(stub, internal, "open", "o1", 500)
    assert again.expire_time == first.expire_time
    await _reserve(stub, internal, "open", "o2", 500)
    await _reserve(stub, internal, "open", "o3", 500)
    # A cache hit releases an unheld admission: nothing was held, nothing is charged.
    released = await stub.Release(pb.ReleaseRequest(request_id="o3"), metadata=internal)
    assert released.released_micro_usd == 0

    details, _ = await _fails(_reserve(stub, internal, "closed", "c1", 500))
    assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    assert details.retry_after is not None and details.retry_after > 0

    # Settle works without Redis for the unheld request; the ledger has it.
    settled = await _settle(stub, internal, "o1", 300)
    assert (settled.charged_micro_usd, settled.released_micro_usd) == (300, 0)
    assert await ledger_total(pg_url) == 300
    # A held request cannot be settled while its hold is unreachable.
    details, _ = await _fails(_settle(stub, internal, "held", 400))
    assert details.code == grpc.StatusCode.UNAVAILABLE

    await own_redis.start()  # same port, same data (appendonly)
    await _settle(stub, internal, "held", 400)
    await _settle(stub, internal, "o2", 200)  # no hold anywhere: from the unheld row
    # The reaper carries o1's cost (settled while Redis was down) into Redis.
    for _ in range(100):
        if await _spent(stub, reader("open"), "open") == (900, 0):
            break
        await asyncio.sleep(0.1)
    assert await _spent(stub, reader("open"), "open") == (900, 0)
    assert await ledger_total(pg_url) == 900
    # Retries charge nothing more.
    await _settle(stub, internal, "o1", 300)
    await _settle(stub, internal, "o2", 200)
    retried = await _reserve(stub, internal, "open", "o1", 500)
    assert (retried.held_micro_usd, retried.expire_time) == (0, first.expire_time)
    await asyncio.sleep(1.5)  # a reaper round
    spent, _ = await _spent(stub, reader("open"), "open")
    assert spent == 900 == await ledger_total(pg_url)


async def make_budget_via(stub: Any, metadata: Metadata, tenant: str, limit: int) -> None:
    await stub.CreateBudget(
        pb.CreateBudgetRequest(
            budget=pb.Budget(
                tenant_id=tenant,
                level=pb.BUDGET_LEVEL_TENANT,
                window=pb.BUDGET_WINDOW_MONTH,
                limit_micro_usd=limit,
            )
        ),
        metadata=metadata,
    )


async def test_an_unheld_admission_whose_router_died_is_charged_its_worst_case(
    stub: Any,
    own_redis: OwnRedis,
    pg_url: str,
    admin: Callable[[str], Metadata],
    reader: Callable[[str], Metadata],
    internal: Metadata,
) -> None:
    await make_budget_via(stub, admin("open"), "open", 10_000)
    await own_redis.stop()
    for request_id in ("dead", "cached"):
        admitted = await stub.Reserve(
            pb.ReserveRequest(
                request_id=request_id,
                subject=pb.SpendSubject(tenant_id="open", key_id="k1"),
                model="openai/gpt-4o",
                amount_micro_usd=700,
                ttl_seconds=1,
            ),
            metadata=internal,
        )
        assert admitted.held_micro_usd == 0
    await own_redis.start()
    # Neither is settled before it expires: the reaper charges both in full.
    for _ in range(150):
        if await _spent(stub, reader("open"), "open") == (1_400, 0):
            break
        await asyncio.sleep(0.1)
    assert await _spent(stub, reader("open"), "open") == (1_400, 0)
    assert await ledger_total(pg_url) == 1_400
    # Late word from the routers replaces the worst case, once.
    settled = await _settle(stub, internal, "dead", 250)
    assert settled.charged_micro_usd == 250
    await _settle(stub, internal, "dead", 250)
    await stub.Release(pb.ReleaseRequest(request_id="cached"), metadata=internal)
    await stub.Release(pb.ReleaseRequest(request_id="cached"), metadata=internal)
    assert await _spent(stub, reader("open"), "open") == (250, 0)
    assert await ledger_total(pg_url) == 250
