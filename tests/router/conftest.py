"""All five services in-process, in front of two fake OpenAI-wire providers.

Each service is the real one, on its own port, with real PostgreSQL and Redis;
only the LLM providers are the project's fakes. Calls to the router carry an
identity signed as the edge would (Envoy itself is exercised in tests/e2e).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from orchestra.budget.v1 import budget_service_pb2 as budget_pb2
from orchestra.budget.v1 import budget_service_pb2_grpc as budget_grpc
from orchestra.router.v1 import chat_service_pb2_grpc as chat_grpc
from orchestra.router.v1 import router_service_pb2_grpc as router_grpc
from services.cli.embedded import free_port
from services.common import settings as settings_mod
from services.common.server import Running, Service, start
from tests.fakes.openai_upstream import FakeOpenAI

TENANT = "acme"
BUDGET_USD = 0.5


@dataclasses.dataclass
class Suite:
    """The running services and handles to drive them."""

    settings: settings_mod.Settings
    primary: FakeOpenAI
    backup: FakeOpenAI
    chat: chat_grpc.ChatServiceAsyncStub
    router: router_grpc.RouterServiceAsyncStub
    budget: budget_grpc.BudgetServiceAsyncStub
    metadata: list[tuple[str, str]]
    running: dict[str, Running]

    async def drain(self) -> None:
        """Waits until the router's follow-up work (settle, store, audit) is done."""
        router = self.running["router"].service
        await router.engine.aclose()  # type: ignore[attr-defined]
        await router.outbox.drain()  # type: ignore[attr-defined]

    async def spent_micro_usd(self) -> int:
        """The tenant's settled spend in the current month (from the budget service)."""
        status = await self.budget.GetBudgetStatus(
            budget_pb2.GetBudgetStatusRequest(subject=budget_pb2.SpendSubject(tenant_id=TENANT)),
            metadata=self.metadata,
        )
        return sum(s.spent_micro_usd for s in status.statuses)


def _config(primary: FakeOpenAI, backup: FakeOpenAI) -> str:
    return f"""
providers:
  - id: primary
    type: openai
    base_url: {primary.url}
    credential: sk-primary-secret-credential
  - id: backup
    type: openai_compatible
    base_url: {backup.url}
    credential: sk-backup-secret-credential
tenants:
  - id: {TENANT}
    policy: {{routing_strategy: cost, cache_enabled: true}}
    api_keys:
      - id: app
        secret: ok_app_0123456789abcdefghijklmn
        scopes: [chat, read, admin]
    budgets:
      - {{level: tenant, window: month, limit_usd: {BUDGET_USD}}}
routing:
  default_max_tokens: 64
"""


@contextlib.asynccontextmanager
async def running_suite(
    pg_url: str, redis_url: str, config_text: str, config_dir: Path
) -> AsyncIterator[tuple[settings_mod.Settings, dict[str, Running]]]:
    """Starts the five real services with ``config_text``; stops them after."""
    from services.audit.server import build as build_audit
    from services.budget.server import build as build_budget
    from services.cache.server import build as build_cache
    from services.discovery.server import build as build_discovery
    from services.router.server import build as build_router

    config = config_dir / "orchestra.yaml"
    config.write_text(config_text)
    ports = {name: free_port() for name in settings_mod.SERVICES}
    settings = settings_mod.load({
        "ORCHESTRA_INTERNAL_KEY": "test-internal-key-0123456789abcdef",
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "ORCHESTRA_CONFIG": str(config),
        **{f"ORCHESTRA_{n.upper()}_ADDR": f"127.0.0.1:{p}" for n, p in ports.items()},
    })  # fmt: skip
    builders: dict[str, Callable[[settings_mod.Settings], Awaitable[Service]]] = {
        "budget": build_budget,
        "audit": build_audit,
        "cache": build_cache,
        "discovery": build_discovery,
        "router": build_router,  # last: it watches discovery's catalog
    }
    running: dict[str, Running] = {}
    try:
        for name, build in builders.items():
            service = await build(settings)
            running[name] = await start(service, settings.listen_addr(name))
        yield settings, running
    finally:
        for running_service in reversed(list(running.values())):
            await running_service.stop(0)


@pytest.fixture
async def suite(
    pg_url: str,
    redis_url: str,
    tmp_path: Path,
    as_caller: Callable[..., list[tuple[str, str]]],
) -> AsyncIterator[Suite]:
    primary = FakeOpenAI(api_key="sk-primary-secret-credential", models=["gpt-4o-mini"])
    backup = FakeOpenAI(api_key="sk-backup-secret-credential", models=["gpt-4o"])
    await primary.start()
    await backup.start()
    try:
        async with running_suite(pg_url, redis_url, _config(primary, backup), tmp_path) as (
            settings,
            running,
        ):
            channel = grpc.aio.insecure_channel(settings.addrs["router"])
            budget_channel = grpc.aio.insecure_channel(settings.addrs["budget"])
            yield Suite(
                settings=settings,
                primary=primary,
                backup=backup,
                chat=chat_grpc.ChatServiceStub(channel),
                router=router_grpc.RouterServiceStub(channel),
                budget=budget_grpc.BudgetServiceStub(budget_channel),
                metadata=as_caller(TENANT, "chat", "read", key_id="app"),
                running=running,
            )
            await channel.close()
            await budget_channel.close()
    finally:
        await primary.stop()
        await backup.stop()
