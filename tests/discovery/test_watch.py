"""WatchModels, the feed behind it, and the router's ModelCatalogView."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import grpc
import pytest

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from orchestra.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from services.common import errors
from services.common.catalog_view import ModelCatalogView
from services.common.server import start
from services.discovery.config import DiscoveryConfig
from services.discovery.feed import Lagging, ModelFeed
from services.discovery.server import build
from tests.discovery.conftest import SECRET, Handle, eventually
from tests.fakes.openai_upstream import FakeOpenAI

Start = Callable[..., Awaitable[Handle]]
AsCaller = Callable[..., list[tuple[str, str]]]


def config(fake: FakeOpenAI) -> str:
    return f"""
providers:
  - id: openai
    type: openai
    base_url: {fake.url}
    credential: {SECRET}
"""


async def next_event(call: grpc.aio.UnaryStreamCall, kind: str) -> pb.WatchModelsResponse:  # type: ignore[type-arg]
    """The next message of ``kind``, skipping heartbeats."""
    while True:
        message = await call.read()
        assert message is not grpc.aio.EOF
        assert isinstance(message, pb.WatchModelsResponse)
        if message.WhichOneof("event") == kind:
            return message
        assert message.WhichOneof("event") == "heartbeat", message


async def test_watch_sends_a_snapshot_then_changes_and_heartbeats(
    discovery: Start, fake_openai: FakeOpenAI, as_caller: AsCaller
) -> None:
    handle = await discovery(config(fake_openai), heartbeat_seconds=0.2)
    admin = as_caller("acme", "operator")
    await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)
    call = handle.stub.WatchModels(
        pb.WatchModelsRequest(), metadata=as_caller("router", "internal")
    )
    try:
        first = await call.read()
        assert isinstance(first, pb.WatchModelsResponse)
        assert first.WhichOneof("event") == "snapshot"
        assert [m.name for m in first.snapshot.models] == [
            "openai/gpt-4o-2024-08-06",
            "openai/gpt-4o-mini",
        ]

        heartbeat = await next_event(call, "heartbeat")
        assert heartbeat.heartbeat.send_time.seconds > 0
        assert heartbeat.revision == first.revision  # nothing changed

        fake_openai.models.append("gpt-4.1")
        await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)
        added = await next_event(call, "upserted")
        assert added.upserted.name == "openai/gpt-4.1"
        assert added.upserted.pricing.input_micro_usd_per_mtok == 2_000_000
        assert added.revision > first.revision

        fake_openai.models.remove("gpt-4o-mini")
        await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)
        removed = await next_event(call, "removed")
        assert removed.removed == "openai/gpt-4o-mini"
        assert removed.revision > added.revision

        # An outage changes every model's health: routers hear about it.
        await fake_openai.refuse_connections()
        await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)
        sick = await next_event(call, "upserted")
        assert sick.upserted.health.status == pb.HEALTH_STATUS_UNHEALTHY
    finally:
        call.cancel()


async def test_watch_needs_read_or_internal(discovery: Start, as_caller: AsCaller) -> None:
    handle = await discovery()
    call = handle.stub.WatchModels(pb.WatchModelsRequest(), metadata=as_caller("acme", "chat"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    err = errors.decode(info.value)
    assert (err.code, err.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")


def model(name: str, quality: float = 0.5) -> pb.Model:
    return pb.Model(name=name, quality=quality)


async def test_feed_publishes_only_material_changes() -> None:
    feed = ModelFeed()
    feed.replace([model("a"), model("b")])
    sub = feed.subscribe()
    assert [m.name for m in sub.snapshot] == ["a", "b"]

    seen_again = model("a")
    seen_again.last_seen_time.GetCurrentTime()
    assert feed.replace([seen_again, model("b")]) == 0
    assert feed.get("a") == seen_again  # the held copy is fresh anyway
    assert await sub.next(0.01) is None

    assert feed.replace([model("a", 0.9), model("c")]) == 3
    events = [await sub.next(1.0) for _ in range(3)]
    assert [e.WhichOneof("event") for e in events if e] == ["removed", "upserted", "upserted"]
    revisions = [e.revision for e in events if e]
    assert revisions == sorted(revisions) and len(set(revisions)) == 3
    sub.close()


async def test_a_lagging_watcher_is_cut_off() -> None:
    feed = ModelFeed(queue_size=1)
    sub = feed.subscribe()
    feed.replace([model("a"), model("b")])
    with pytest.raises(Lagging):
        await sub.next(1.0)


async def test_catalog_view_follows_and_resyncs_across_a_restart(
    discovery: Start, fake_openai: FakeOpenAI, as_caller: AsCaller
) -> None:
    handle = await discovery(config(fake_openai))
    admin = as_caller("acme", "operator")
    await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)
    view = ModelCatalogView(
        handle.stub,
        metadata=lambda: as_caller("router", "internal"),
        initial_backoff=0.05,
        max_backoff=0.5,
    )
    async with view:
        assert await view.wait_ready(10.0)
        assert [m.name for m in view.all()] == ["openai/gpt-4o-2024-08-06", "openai/gpt-4o-mini"]
        mini = view.get("openai/gpt-4o-mini")
        assert mini is not None and mini.price_source == pb.PRICE_SOURCE_CATALOG
        assert view.get("openai/nope") is None

        fake_openai.models.append("gpt-4.1")
        await handle.stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=admin)
        await eventually(lambda: view.get("openai/gpt-4.1") is not None)

        # The service goes away: the view keeps its catalog and retries.
        port = handle.running.port
        await handle.running.stop(0)
        await eventually(lambda: not view.connected)
        assert len(view.all()) == 3

        # Upstream changes while discovery is down; a new instance on the same
        # port lists it at start, and the view resyncs from the new snapshot.
        fake_openai.models.remove("gpt-4o-mini")
        service = await build(handle.settings, DiscoveryConfig(interval_seconds=3600))
        restarted = await start(service, f"127.0.0.1:{port}")
        try:
            await eventually(lambda: view.get("openai/gpt-4o-mini") is None, limit=20.0)
            assert view.connected and view.resyncs >= 2
            assert [m.name for m in view.all()] == ["openai/gpt-4.1", "openai/gpt-4o-2024-08-06"]
        finally:
            await restarted.stop(0)


async def test_wait_ready_times_out_without_a_server(as_caller: AsCaller) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        view = ModelCatalogView(pb_grpc.DiscoveryServiceStub(channel), initial_backoff=0.05)
        async with view:
            assert not await view.wait_ready(0.3)
            assert view.all() == [] and not view.ready


async def test_feed_replaces_one_providers_part_only() -> None:
    feed = ModelFeed()

    def model(name: str, context: int = 0) -> pb.Model:
        return pb.Model(name=name, provider_id=name.split("/")[0], context_window=context)

    feed.replace([model("a/x"), model("a/y"), model("b/z")])
    watcher = feed.subscribe()

    published = feed.replace([model("a/x", 8192), model("a/new")], provider_id="a")

    assert published == 3  # a/y removed, a/new added, a/x changed; b/z untouched
    assert [m.name for m in feed.all()] == ["a/new", "a/x", "b/z"]
    assert feed.replace([], provider_id="c") == 0  # an unknown provider: nothing to remove
    events = [await watcher.next(1.0) for _ in range(3)]
    assert [e.WhichOneof("event") if e else None for e in events] == [
        "removed",
        "upserted",
        "upserted",
    ]
