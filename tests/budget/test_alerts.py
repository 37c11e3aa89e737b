"""Threshold alerts: one webhook POST per threshold per window, deduplicated
across replicas, retried on failure; soft limits alert without refusing."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from orchestra.budget.v1 import budget_service_pb2 as pb
from tests.budget.conftest import Budget, Metadata, make_tenant
from tests.budget.test_admission import reserve, settle
from tests.budget.test_windows import FakeClock

WAIT_ROUNDS = 200  # bounded waits of 0.1 s for the sender (it retries after 1 s)


class Receiver:
    """A webhook receiver that fails its first POST (503) and accepts the rest."""

    def __init__(self) -> None:
        self.posts = 0
        self.accepted: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        if self.posts == 1:
            return web.Response(status=503)
        self.accepted.append(body)
        return web.Response(status=204)

    async def wait_for(self, count: int) -> None:
        for _ in range(WAIT_ROUNDS):
            if len(self.accepted) >= count:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{len(self.accepted)} alerts arrived, expected {count}")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hook.url = f"http://127.0.0.1:{port}/hook"
    yield hook
    await runner.cleanup()


async def _make(
    budget: Budget,
    metadata: Metadata,
    limit: int,
    thresholds: list[int],
    url: str,
    *,
    soft: bool = False,
) -> pb.Budget:
    response = await budget.budgets.CreateBudget(
        pb.CreateBudgetRequest(
            budget=pb.Budget(
                tenant_id="acme",
                level=pb.BUDGET_LEVEL_TENANT,
                window=pb.BUDGET_WINDOW_MONTH,
                limit_micro_usd=limit,
                soft=soft,
                alert_thresholds_percent=thresholds,
                alert_webhook_url=url,
            )
        ),
        metadata=metadata,
    )
    created: pb.Budget = response.budget
    return created


async def _undelivered(pg_url: str) -> int:
    conn = await asyncpg.connect(pg_url)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM budget.alerts WHERE delivered_time IS NULL")
        )
    finally:
        await conn.close()


async def test_each_threshold_alerts_once_across_replicas(
    start_budget: Callable[..., Awaitable[Budget]],
    receiver: Receiver,
    operator: Metadata,
    admin: Callable[[str], Metadata],
    internal: Metadata,
) -> None:
    first = await start_budget()
    second = await start_budget()  # another replica on the same stores
    await make_tenant(first, operator, "acme")
    limit = await _make(first, admin("acme"), 10_000, [50, 80, 100], receiver.url)
    replicas = [first, second]
    # (hold, cost): 40%, 56% (crosses 50), 61%, 81% (crosses 80), 106% (an overrun: 100).
    steps = [(4_000, 4_000), (1_600, 1_600), (500, 500), (2_000, 2_000), (1_900, 2_500)]
    for i, (hold, cost) in enumerate(steps):
        replica = replicas[i % 2]
        await reserve(replica, internal, f"r{i}", hold)
        # Each settle twice, through both replicas: still one alert per threshold.
        await asyncio.gather(
            settle(first, internal, f"r{i}", cost), settle(second, internal, f"r{i}", cost)
        )
    await receiver.wait_for(3)
    for _ in range(WAIT_ROUNDS):
        if await _undelivered(first.pg_url) == 0:
            break
        await asyncio.sleep(0.1)
    assert await _undelivered(first.pg_url) == 0
    by_threshold = collections.Counter(a["threshold_percent"] for a in receiver.accepted)
    assert by_threshold == {50: 1, 80: 1, 100: 1}
    assert receiver.posts == 4  # the first POST failed and was retried
    alert = next(a for a in receiver.accepted if a["threshold_percent"] == 80)
    window_key = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    assert alert == {
        "type": "orchestra.budget.threshold_crossed",
        "alert_id": f"{limit.budget_id}/{window_key}/80",
        "tenant_id": "acme",
        "budget_id": limit.budget_id,
        "level": "tenant",
        "subject": "",
        "end_user": "",
        "window": "month",
        "window_key": window_key,
        "threshold_percent": 80,
        "limit_micro_usd": 10_000,
        "spent_micro_usd": 8_100,
        "soft": False,
        "create_time": alert["create_time"],
    }


async def test_a_soft_limit_warns_and_alerts_without_refusing_each_window(
    start_budget: Callable[..., Awaitable[Budget]],
    receiver: Receiver,
    operator: Metadata,
    admin: Callable[[str], Metadata],
    internal: Metadata,
) -> None:
    utc = dt.UTC
    clock = FakeClock(dt.datetime(dt.datetime.now(utc).year + 1, 1, 20, tzinfo=utc).timestamp())
    budget = await start_budget(clock=clock)
    await make_tenant(budget, operator, "acme")
    soft = await _make(budget, admin("acme"), 1_000, [], receiver.url, soft=True)
    warned = await reserve(budget, internal, "jan", 1_500)  # over the limit: admitted
    assert [(w.budget_id, w.used_micro_usd) for w in warned.warnings] == [(soft.budget_id, 1_500)]
    await settle(budget, internal, "jan", 1_500)
    await receiver.wait_for(1)
    clock.at(dt.datetime(dt.datetime.now(utc).year + 1, 2, 3, tzinfo=utc))  # a new month
    await reserve(budget, internal, "feb-1", 600)
    await settle(budget, internal, "feb-1", 600)
    await reserve(budget, internal, "feb-2", 600)
    await settle(budget, internal, "feb-2", 600)
    await receiver.wait_for(2)
    year = dt.datetime.now(utc).year + 1
    assert [(a["window_key"], a["threshold_percent"], a["soft"]) for a in receiver.accepted] == [
        (f"{year}-01", 100, True),
        (f"{year}-02", 100, True),
    ]
    assert receiver.accepted[1]["spent_micro_usd"] == 1_200
