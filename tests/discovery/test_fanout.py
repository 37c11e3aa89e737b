"""Catalog changes reach the watchers of every discovery replica (LISTEN/NOTIFY)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from orchestra.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from services.common.catalog_view import ModelCatalogView
from tests.discovery.conftest import SECRET, Handle, eventually
from tests.fakes.faults import Fault
from tests.fakes.openai_upstream import FakeOpenAI

Start = Callable[..., Awaitable[Handle]]
AsCaller = Callable[..., list[tuple[str, str]]]


@pytest.fixture
async def two_replicas(
    discovery: Start, as_caller: AsCaller
) -> AsyncIterator[tuple[Handle, Handle, ModelCatalogView]]:
    """Replicas A and B on one database, and a router watching B only."""
    a = await discovery()
    b = await discovery()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{b.running.port}")
    view = ModelCatalogView(
        pb_grpc.DiscoveryServiceStub(channel), metadata=as_caller("router", "internal")
    )
    view.start()
    assert await view.wait_ready(10)
    yield a, b, view
    await view.stop()
    await channel.close()


async def test_a_provider_created_on_one_replica_reaches_the_others_watchers(
    two_replicas: tuple[Handle, Handle, ModelCatalogView],
    fake_openai: FakeOpenAI,
    as_caller: AsCaller,
) -> None:
    a, b, view = two_replicas
    operator = as_caller("acme", "operator")
    provider = pb.Provider(
        provider_id="shared", type=pb.PROVIDER_TYPE_OPENAI, base_url=fake_openai.url,
        credential=SECRET, enabled=True,
    )  # fmt: skip
    assert view.get("shared/gpt-4o-mini") is None

    await a.stub.CreateProvider(pb.CreateProviderRequest(provider=provider), metadata=operator)

    # B never lists the provider itself (its passes are an hour apart).
    await eventually(lambda: view.get("shared/gpt-4o-mini") is not None)
    assert b.service.fanout.received >= 1

    # Disabling it on A hides its models from B's watchers.
    await a.stub.UpdateProvider(
        pb.UpdateProviderRequest(
            provider=pb.Provider(provider_id="shared", enabled=False),
            update_mask=field_mask_pb2.FieldMask(paths=["enabled"]),
        ),
        metadata=operator,
    )
    await eventually(lambda: view.get("shared/gpt-4o-mini") is None)


async def test_a_discovery_pass_and_a_probe_on_one_replica_reach_the_others(
    two_replicas: tuple[Handle, Handle, ModelCatalogView],
    fake_openai: FakeOpenAI,
    as_caller: AsCaller,
) -> None:
    a, _, view = two_replicas
    operator = as_caller("acme", "operator")
    provider = pb.Provider(
        provider_id="shared", type=pb.PROVIDER_TYPE_OPENAI, base_url=fake_openai.url,
        credential=SECRET, enabled=True,
    )  # fmt: skip
    await a.stub.CreateProvider(pb.CreateProviderRequest(provider=provider), metadata=operator)
    await eventually(lambda: view.get("shared/gpt-4o-mini") is not None)

    # A model appears upstream; A's pass finds it; B's router learns it.
    fake_openai.models.append("gpt-4.1-mini")
    await a.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=operator)
    await eventually(lambda: view.get("shared/gpt-4.1-mini") is not None)

    # A probe round on A: the health reaches B's router too.
    fake_openai.set_fault(Fault.http_error(500), endpoint="chat")
    await a.service.prober.run_once(force=True)
    await eventually(
        lambda: any(
            m.health.status == pb.HEALTH_STATUS_DEGRADED
            for m in view.all()
            if m.provider_id == "shared"
        )
    )


async def test_a_replica_does_not_answer_its_own_announcements(
    two_replicas: tuple[Handle, Handle, ModelCatalogView],
    fake_openai: FakeOpenAI,
    as_caller: AsCaller,
) -> None:
    a, b, view = two_replicas
    provider = pb.Provider(
        provider_id="shared", type=pb.PROVIDER_TYPE_OPENAI, base_url=fake_openai.url,
        credential=SECRET, enabled=True,
    )  # fmt: skip
    await a.stub.CreateProvider(
        pb.CreateProviderRequest(provider=provider), metadata=as_caller("acme", "operator")
    )
    await eventually(lambda: view.get("shared/gpt-4o-mini") is not None)
    # B rebuilt on A's word and, having changed nothing itself, said nothing back.
    assert b.service.fanout.received >= 1
    assert a.service.fanout.received == 0


async def test_fan_out_survives_losing_its_listening_connection(
    two_replicas: tuple[Handle, Handle, ModelCatalogView],
    fake_openai: FakeOpenAI,
    as_caller: AsCaller,
    pg_url: str,
) -> None:
    a, _, view = two_replicas
    admin = await asyncpg.connect(pg_url)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
    finally:
        await admin.close()
    assert killed == 2  # both replicas' listeners
    provider = pb.Provider(
        provider_id="shared", type=pb.PROVIDER_TYPE_OPENAI, base_url=fake_openai.url,
        credential=SECRET, enabled=True,
    )  # fmt: skip
    # The change is announced at once, whether or not B is listening yet: B
    # learns it from the notification, or from the rebuild it does on reconnecting.
    await a.stub.CreateProvider(
        pb.CreateProviderRequest(provider=provider), metadata=as_caller("acme", "operator")
    )
    await eventually(lambda: view.get("shared/gpt-4o-mini") is not None)


async def test_replicas_share_the_probe_schedule(
    two_replicas: tuple[Handle, Handle, ModelCatalogView],
    fake_openai: FakeOpenAI,
    as_caller: AsCaller,
) -> None:
    a, b, _ = two_replicas
    provider = pb.Provider(
        provider_id="shared", type=pb.PROVIDER_TYPE_OPENAI, base_url=fake_openai.url,
        credential=SECRET, enabled=True,
    )  # fmt: skip
    await a.stub.CreateProvider(
        pb.CreateProviderRequest(provider=provider), metadata=as_caller("acme", "operator")
    )

    probed = await asyncio.gather(a.service.prober.run_once(), b.service.prober.run_once())

    # The provider was due once; exactly one replica claimed it and probed it.
    assert sorted(probed) == [0, 1]
    chats = [r for r in fake_openai.requests if r.path.endswith("/chat/completions")]
    assert len(chats) == 1
