"""One ``orchestra up`` for the fuzz tests: the OpenAI-wire fake as its only provider.

The suite is :class:`bench.suite.Suite` (embedded PostgreSQL and Redis, Envoy
with ext_authz, the five services, no local model), started once per session.
Two keys on one tenant: ``admin`` holds every scope, ``reader`` only chat and
read (so admin RPCs refuse it). Calls run on a ``grpc.aio`` channel to the edge,
driven by an event loop of the fixture's own, so the hypothesis tests stay sync.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest

from bench.suite import Suite
from tests.fuzz.edge import CHANNEL_OPTIONS, KEYS, Keys, start_suite

T = TypeVar("T")


@dataclasses.dataclass
class Edge:
    """The running suite as the fuzz tests see it."""

    suite: Suite
    keys: Keys
    loop: asyncio.AbstractEventLoop
    channel: grpc.aio.Channel

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs ``coro`` on the channel's loop."""
        return self.loop.run_until_complete(coro)


async def _channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


@pytest.fixture(scope="session")
def edge() -> Iterator[Edge]:
    """The suite, its keys and an aio channel to its edge."""
    suite, upstream = start_suite()
    loop = asyncio.new_event_loop()
    try:
        channel = loop.run_until_complete(_channel(suite.edge))
        yield Edge(suite, KEYS, loop, channel)
        loop.run_until_complete(channel.close())
    finally:
        loop.close()
        suite.stop()
        upstream.terminate()
        upstream.wait(timeout=10)
