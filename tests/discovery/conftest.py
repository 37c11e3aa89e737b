"""Fixtures for the discovery tests: the service on port 0, real upstreams."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestra.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from services.common.server import Running
from services.discovery.config import DiscoveryConfig, ProbeConfig
from services.discovery.server import DiscoveryService, build
from tests.fakes.openai_upstream import FakeOpenAI
from tests.providers.listing_upstreams import FakeOllama

SECRET = "sk-live-DISCOVERY-secret-0123456789abcdef"


@dataclasses.dataclass
class Handle:
    """A running discovery service and a stub on it."""

    service: DiscoveryService
    running: Running
    stub: pb_grpc.DiscoveryServiceAsyncStub
    settings: Any


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """An OpenAI-wire upstream that requires ``SECRET``."""
    async with FakeOpenAI(
        api_key=SECRET, models=["gpt-4o-mini", "gpt-4o-2024-08-06", "text-embedding-3-small"]
    ) as fake:
        yield fake


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    """An Ollama upstream with two models, one loaded."""
    server = FakeOllama(["llama3.1:8b", "smollm2:135m"], loaded=["smollm2:135m"])
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def discovery(
    pg_url: str,
    make_settings: Callable[..., Any],
    serve: Callable[..., Awaitable[Running]],
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[Handle]]]:
    """Starts discovery services on one fresh database.

    Usage: ``handle = await discovery(config_yaml, heartbeat_seconds=0.2)``.
    The periodic pass runs once at start and then practically never, so tests
    drive passes with RunDiscovery; probes run only by ``service.prober.run_once``.
    """
    channels: list[grpc.aio.Channel] = []
    counter = itertools.count()

    async def start(config: str | None = None, *, heartbeat_seconds: float = 30.0) -> Handle:
        env = {"DATABASE_URL": pg_url}
        if config is not None:
            path = tmp_path / f"orchestra-{next(counter)}.yaml"
            path.write_text(config)
            env["ORCHESTRA_CONFIG"] = str(path)
        settings = make_settings(**env)
        options = DiscoveryConfig(
            interval_seconds=3600,
            heartbeat_seconds=heartbeat_seconds,
            # Tests drive probe rounds with prober.run_once().
            probes=ProbeConfig(interval_seconds=3600, tick_seconds=3600),
        )
        service = await build(settings, options)
        running = await serve(service)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        channels.append(channel)
        return Handle(service, running, pb_grpc.DiscoveryServiceStub(channel), settings)

    yield start
    for channel in channels:
        await channel.close()


async def eventually(check: Callable[[], Awaitable[bool] | bool], limit: float = 10.0) -> None:
    """Polls ``check`` until it holds; fails after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.05)
