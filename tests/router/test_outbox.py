"""The outbox on a real Redis: batched delivery, dead letters, retries, one ack per read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as aioredis

from orchestra.audit.v1 import audit_service_pb2 as audit_pb2
from orchestra.audit.v1 import audit_service_pb2_grpc as audit_grpc
from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common.stores import connect_redis
from services.router.outbox import DEAD, GROUP, STREAM, Outbox, PermanentFailure
from tests.router.conftest import Suite


class _Target:
    """What the jobs are delivered to: records each call, fails as told."""

    def __init__(self) -> None:
        self.single: list[bytes] = []
        self.batches: list[list[bytes]] = []
        self.refuse: set[bytes] = set()  # permanently
        self.flaky: set[bytes] = set()  # fail once, then succeed
        self.batch_down = False

    async def one(self, payload: bytes) -> None:
        self.single.append(payload)
        if payload in self.refuse:
            raise PermanentFailure("INVALID_ARGUMENT: refused")
        if payload in self.flaky:
            self.flaky.discard(payload)
            raise ConnectionError("target busy")

    async def many(self, payloads: Sequence[bytes]) -> list[BaseException | None]:
        if self.batch_down:
            self.batch_down = False
            raise ConnectionError("target down")
        self.batches.append(list(payloads))
        return [PermanentFailure("refused") if p in self.refuse else None for p in payloads]


def _chat(text: str) -> chat_api.ChatRequest:
    return chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])
        ],
        generation=chat_pb2.GenerationConfig(max_tokens=32),
    )


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(redis_url)
    yield client
    await client.aclose()


def _outbox(redis: aioredis.Redis, target: _Target, claim_idle: float = 30.0) -> Outbox:
    return Outbox(
        redis,
        {"audit": target.one, "settle": target.one},
        batch_handlers={"audit": target.many},
        claim_idle=claim_idle,
    )


async def _deliver_queued(redis: aioredis.Redis, outbox: Outbox, *jobs: tuple[str, bytes]) -> None:
    """Queues ``jobs`` before the consumer starts (so one read brings them all), then
    delivers until the stream is empty."""
    await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    await outbox.put(*jobs)
    await outbox.start()
    try:
        await outbox.drain()
    finally:
        await outbox.stop()


async def test_jobs_of_a_batch_kind_go_in_one_call_and_others_one_by_one(
    redis: aioredis.Redis,
) -> None:
    target = _Target()
    outbox = _outbox(redis, target)
    await _deliver_queued(
        redis, outbox, ("audit", b"a1"), ("audit", b"a2"), ("settle", b"s1"), ("audit", b"a3")
    )
    assert target.batches == [[b"a1", b"a2", b"a3"]]
    assert target.single == [b"s1"]
    assert await redis.xlen(STREAM) == 0
    assert (await redis.xpending(STREAM, GROUP))["pending"] == 0


async def test_a_refused_job_of_a_batch_is_dead_lettered_and_the_rest_delivered(
    redis: aioredis.Redis,
) -> None:
    target = _Target()
    target.refuse = {b"bad"}
    outbox = _outbox(redis, target)
    await _deliver_queued(redis, outbox, ("audit", b"ok1"), ("audit", b"bad"), ("audit", b"ok2"))
    dead = cast(list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(DEAD))
    assert [fields[b"kind"] for _, fields in dead] == [b"audit"]
    assert b"refused" in dead[0][1][b"error"]
    assert await redis.xlen(STREAM) == 0


async def test_failed_deliveries_stay_pending_and_are_retried(redis: aioredis.Redis) -> None:
    target = _Target()
    target.batch_down = True  # the first batch call fails as a whole
    target.flaky = {b"s1"}
    outbox = _outbox(redis, target, claim_idle=0.05)
    await _deliver_queued(redis, outbox, ("audit", b"a1"), ("audit", b"a2"), ("settle", b"s1"))
    assert target.batches == [[b"a1", b"a2"]]  # the retry, after the failed call
    assert target.single == [b"s1", b"s1"]
    assert await redis.xlen(DEAD) == 0
    assert (await redis.xpending(STREAM, GROUP))["pending"] == 0


async def test_a_single_job_of_a_batch_kind_uses_the_single_handler(
    redis: aioredis.Redis,
) -> None:
    target = _Target()
    outbox = _outbox(redis, target)
    await outbox.start()
    try:
        await outbox.put(("audit", b"only"))
        await outbox.drain()
        await asyncio.sleep(0)
    finally:
        await outbox.stop()
    assert (target.single, target.batches) == ([b"only"], [])


async def test_commands_sent_with_the_jobs_cannot_fail_them(redis: aioredis.Redis) -> None:
    await redis.set("test:outbox:not-a-number", "abc")
    target = _Target()
    outbox = _outbox(redis, target)
    await outbox.start()
    try:

        def extra(pipe: Any) -> None:
            pipe.set("test:outbox:extra", "1")
            pipe.incr("test:outbox:not-a-number")  # fails: not an integer

        await outbox.put(("settle", b"s1"), also=extra)
        await outbox.drain()
        await asyncio.sleep(0)
    finally:
        await outbox.stop()
        await redis.delete("test:outbox:not-a-number")
    assert target.single == [b"s1"]  # delivered once, through the stream, not directly
    assert await redis.get("test:outbox:extra") == b"1"
    await redis.delete("test:outbox:extra")


async def test_concurrent_chats_are_each_audited_once_through_batched_appends(
    suite: Suite,
) -> None:
    chats = 12
    replies = await asyncio.gather(
        *(
            suite.chat.Chat(_chat(f"question number {i}"), metadata=suite.metadata)
            for i in range(chats)
        )
    )
    await suite.drain()
    channel = grpc.aio.insecure_channel(suite.settings.addrs["audit"])
    try:
        listed = await audit_grpc.AuditServiceStub(channel).ListRecords(
            audit_pb2.ListRecordsRequest(kind=audit_pb2.RECORD_KIND_CHAT, page_size=100),
            metadata=suite.metadata,
        )
    finally:
        await channel.close()
    request_ids = [record.chat.request_id for record in listed.records]
    assert sorted(request_ids) == sorted(reply.request_id for reply in replies)
    assert [record.index for record in listed.records] == sorted(r.index for r in listed.records)
