"""The router's journal: a dead replica's open chats are closed on what they produced."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
import redis.asyncio as aioredis

from orchestra.budget.v1 import budget_service_pb2 as budget_pb2
from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common.stores import connect_redis, text
from services.router import records
from services.router.journal import Journal, open_key
from services.router.server import RouterService
from tests.router.conftest import TENANT, Suite

Metadata = list[tuple[str, str]]


def _router(suite: Suite) -> RouterService:
    service = suite.running["router"].service
    assert isinstance(service, RouterService)
    return service


@pytest.fixture
async def redis(suite: Suite) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(suite.settings.redis_url)
    yield client
    await client.aclose()


async def _reserve(suite: Suite, internal: Metadata, request_id: str) -> None:
    await suite.budget.Reserve(
        budget_pb2.ReserveRequest(
            request_id=request_id,
            subject=budget_pb2.SpendSubject(tenant_id=TENANT, key_id="app"),
            model="primary/gpt-4o-mini",
            amount_micro_usd=5_000,
            tokens=10,
        ),
        metadata=internal,
    )


async def _hold_state(redis: aioredis.Redis, request_id: str) -> str:
    state = await redis.hget(f"{{budget}}:hold:{request_id}", "state")
    return text(state) if state else ""


async def test_a_dead_replicas_chats_are_released_or_settled_on_what_they_produced(
    suite: Suite, redis: aioredis.Redis, as_caller: Callable[..., Metadata]
) -> None:
    internal = as_caller("", "internal", key_id="service:router")
    for rid in ("quiet", "talking", "alive"):
        await _reserve(suite, internal, rid)
    router = _router(suite)
    dead = Journal(redis, router.outbox.put, replica="dead-1", alive_seconds=0.2)
    await dead.heartbeat()
    dead.opened("quiet", ("release", records.release_payload("quiet")))  # nothing sent yet
    usage = chat_pb2.Usage(prompt_tokens=7, completion_tokens=5, estimated=True)
    dead.opened("talking", ("settle", records.settle_payload("talking", 123, usage, partial=True)))
    await dead.flush()
    live = Journal(redis, router.outbox.put, replica="live-1")
    await live.heartbeat()
    live.opened("alive", ("release", records.release_payload("alive")))
    await live.flush()

    await asyncio.sleep(0.3)  # dead-1 stops heartbeating; its alive key expires
    assert await router.journal.sweep() == 2
    await suite.drain()

    assert await suite.spent_micro_usd() == 123  # not the 10,000 the reaper would charge
    assert await _hold_state(redis, "quiet") == "released"
    assert await _hold_state(redis, "talking") == "settled"
    assert await _hold_state(redis, "alive") == "held"  # a live replica's chat is left alone
    assert not await redis.exists(open_key("dead-1"))
    assert await router.journal.sweep() == 0  # swept once
    await live.stop()


async def test_a_streaming_chat_is_journaled_until_its_own_settlement(
    suite: Suite, redis: aioredis.Redis
) -> None:
    router = _router(suite)
    key = open_key(router.journal.replica)
    suite.primary.chunk_delay = 0.1  # a second and a half of answer
    request = chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text="hi")])
        ],
        generation=chat_pb2.GenerationConfig(max_tokens=32),
        cache=chat_api.CacheControl(mode=chat_api.CACHE_MODE_DISABLED),
    )
    call = suite.chat.ChatStream(request, metadata=suite.metadata)
    events = [await call.read() for _ in range(3)]  # start and two text deltas
    first = events[0]
    assert isinstance(first, chat_api.ChatStreamResponse)
    rid = first.start.request_id
    await asyncio.sleep(0.2)  # a flush or two
    job = await redis.hget(key, rid)
    assert isinstance(job, bytes)
    kind, _, payload = job.partition(b"\x00")
    assert kind == b"settle"  # text reached the client: settle on what was produced
    settle = budget_pb2.SettleRequest.FromString(payload)
    assert settle.partial and settle.cost_micro_usd > 0

    while await call.read() != grpc.aio.EOF:
        pass
    await suite.drain()
    await router.journal.flush()
    assert not await redis.hexists(key, rid)  # its own settlement closed it
    suite.primary.chunk_delay = 0.0
