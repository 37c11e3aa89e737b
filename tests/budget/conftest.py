"""Fixtures: a real budget service on a fresh database and Redis db, its stubs,
and callers' metadata."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from envoy.service.auth.v3 import external_auth_pb2_grpc

from orchestra.budget.v1 import (
    account_service_pb2,
    account_service_pb2_grpc,
    budget_service_pb2,
    budget_service_pb2_grpc,
)
from services.budget.server import BudgetService, build
from services.common import settings as settings_mod
from services.common.stores import connect_redis

Metadata = list[tuple[str, str]]


@dataclasses.dataclass
class Budget:
    """A running budget service and what the tests reach it with."""

    app: BudgetService
    accounts: account_service_pb2_grpc.AccountServiceAsyncStub
    budgets: budget_service_pb2_grpc.BudgetServiceAsyncStub
    authz: Any  # external_auth_pb2_grpc.AuthorizationStub
    port: int
    pg_url: str
    redis_url: str


@pytest.fixture
def budget_settings(
    pg_url: str, redis_url: str, make_settings: Callable[..., settings_mod.Settings]
) -> Callable[..., settings_mod.Settings]:
    """Settings for the test's stores; keyword args are more env vars."""
    return lambda **env: make_settings(DATABASE_URL=pg_url, REDIS_URL=redis_url, **env)


@pytest.fixture
def start_budget(
    budget_settings: Callable[..., settings_mod.Settings],
    serve: Callable[..., Awaitable[Any]],
    pg_url: str,
    redis_url: str,
) -> Callable[..., Awaitable[Budget]]:
    """Builds and serves a budget service (call again for a "restart"); ``clock=``
    gives it a fake clock (epoch seconds)."""
    channels: list[grpc.aio.Channel] = []

    async def start(clock: Callable[[], float] | None = None, **env: str) -> Budget:
        settings = budget_settings(**env)
        app = await (build(settings) if clock is None else build(settings, clock=clock))
        running = await serve(app)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        channels.append(channel)
        return Budget(
            app,
            account_service_pb2_grpc.AccountServiceStub(channel),
            budget_service_pb2_grpc.BudgetServiceStub(channel),
            external_auth_pb2_grpc.AuthorizationStub(channel),
            running.port,
            pg_url,
            redis_url,
        )

    return start


@pytest.fixture
async def budget(start_budget: Callable[..., Awaitable[Budget]]) -> Budget:
    """The budget service on empty stores, no config file."""
    return await start_budget()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A direct client of the test's Redis db."""
    client = connect_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def operator(as_caller: Callable[..., Metadata]) -> Metadata:
    """Metadata of the installation's operator (tenant "ops")."""
    return as_caller("ops", "operator", key_id="op-key")


@pytest.fixture
def admin(as_caller: Callable[..., Metadata]) -> Callable[[str], Metadata]:
    """Metadata of a tenant's admin key."""
    return lambda tenant: as_caller(tenant, "admin", key_id=f"{tenant}-admin")


@pytest.fixture
def reader(as_caller: Callable[..., Metadata]) -> Callable[[str], Metadata]:
    """Metadata of a tenant's read-only key."""
    return lambda tenant: as_caller(tenant, "read", key_id=f"{tenant}-reader")


@pytest.fixture
def internal(as_caller: Callable[..., Metadata]) -> Metadata:
    """Metadata of a service (the router) calling budget."""
    return as_caller("", "internal", key_id="service:router")


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[[str], str]:
    """Writes a config file and returns its path (for ORCHESTRA_CONFIG)."""

    def write(text: str) -> str:
        path = tmp_path / "orchestra.yaml"
        path.write_text(text)
        return str(path)

    return write


async def make_tenant(
    budget: Budget, operator: Metadata, tenant_id: str, time_zone: str = "UTC"
) -> None:
    """Creates a tenant through the API."""
    await budget.accounts.CreateTenant(
        account_service_pb2.CreateTenantRequest(
            tenant=account_service_pb2.Tenant(
                tenant_id=tenant_id,
                display_name=tenant_id.title(),
                policy=account_service_pb2.TenantPolicy(time_zone=time_zone),
            )
        ),
        metadata=operator,
    )


async def make_budget(
    budget: Budget,
    metadata: Metadata,
    tenant_id: str,
    limit: int,
    *,
    level: budget_service_pb2.BudgetLevel.ValueType = budget_service_pb2.BUDGET_LEVEL_TENANT,
    subject: str = "",
    window: budget_service_pb2.BudgetWindow.ValueType = budget_service_pb2.BUDGET_WINDOW_MONTH,
    soft: bool = False,
) -> budget_service_pb2.Budget:
    """Creates a budget through the API."""
    response = await budget.budgets.CreateBudget(
        budget_service_pb2.CreateBudgetRequest(
            budget=budget_service_pb2.Budget(
                tenant_id=tenant_id,
                level=level,
                subject=subject,
                window=window,
                limit_micro_usd=limit,
                soft=soft,
            )
        ),
        metadata=metadata,
    )
    created: budget_service_pb2.Budget = response.budget
    return created
