"""A durable outbox for the work that follows a chat: settle, cache store, audit.

That work is off the client's critical path but must never be lost. Each job
goes into a Redis stream; a consumer group shared by all router replicas
delivers it, and it is acknowledged only after the target service accepted it.
A job whose consumer died is reclaimed by another replica after ``claim_idle``
seconds (XAUTOCLAIM), and every job is idempotent at its target (request id /
event id), so redelivery is safe. A job that the target refuses as invalid is
moved to a dead-letter stream rather than retried for ever.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from services.common.stores import text

log = logging.getLogger(__name__)

STREAM = "router:outbox"
DEAD = "router:outbox:dead"
GROUP = "routers"

Handler = Callable[[bytes], Awaitable[None]]


class PermanentFailure(Exception):
    """The target refused the job for good (e.g. INVALID_ARGUMENT): dead-letter it."""


class Outbox:
    """Durable, at-least-once delivery of follow-up jobs to peer services."""

    def __init__(
        self,
        redis: aioredis.Redis,
        handlers: Mapping[str, Handler],
        *,
        claim_idle: float = 30.0,
        batch: int = 64,
    ) -> None:
        self._redis = redis
        self._handlers = dict(handlers)
        self._claim_idle_ms = int(claim_idle * 1000)
        self._batch = batch
        self._consumer = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._fallback: set[asyncio.Task[None]] = set()

    async def put(self, *jobs: tuple[str, bytes]) -> None:
        """Queues jobs, given as (kind, payload), in one round trip to Redis.

        If Redis is down, runs them now (retrying) instead of losing them.
        """
        for kind, _ in jobs:
            if kind not in self._handlers:
                raise ValueError(f"no outbox handler for {kind!r}")
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for kind, payload in jobs:
                    pipe.xadd(STREAM, {"kind": kind, "payload": base64.b64encode(payload)})
                await pipe.execute()
            self._wake.set()
        except RedisError:
            log.warning("outbox stream unavailable; delivering %d job(s) directly", len(jobs))
            for kind, payload in jobs:
                task = asyncio.create_task(self._deliver_directly(kind, payload))
                self._fallback.add(task)
                task.add_done_callback(self._fallback.discard)

    async def _deliver_directly(self, kind: str, payload: bytes) -> None:
        for attempt in range(8):
            try:
                await self._handlers[kind](payload)
                return
            except PermanentFailure:
                log.error("%s job refused permanently; dropped: %s", kind, _preview(payload))
                return
            except Exception:  # noqa: BLE001 - retried below, logged on the last try
                await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
        log.error("%s job could not be delivered: %s", kind, _preview(payload))

    async def start(self) -> None:
        """Creates the consumer group if needed and starts delivering."""
        try:
            await self._redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._task = asyncio.create_task(self._run(), name="outbox")

    async def stop(self) -> None:
        """Stops delivering; undelivered jobs stay in the stream for any replica."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            # A flag as well as cancel(): redis-py can swallow a cancellation
            # that lands during a read, and the loop must still end.
            self._task.cancel()
            await asyncio.wait({self._task})
        if self._fallback:
            await asyncio.gather(*self._fallback, return_exceptions=True)

    async def drain(self, wait_seconds: float = 10.0) -> None:
        """Waits until every queued job has been delivered (tests, shutdown).

        Delivered jobs are deleted from the stream, so an empty stream means
        nothing is left to do.
        """
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while asyncio.get_running_loop().time() < deadline:
            if not await self._redis.xlen(STREAM) and not self._fallback:
                return
            self._wake.set()
            await asyncio.sleep(0.02)
        raise TimeoutError("outbox did not drain")

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                await self._reclaim()
                delivered = await self._read_new()
                backoff = 0.1
                if not delivered:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox loop error; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _read_new(self) -> int:
        reply: Any = await self._redis.xreadgroup(
            GROUP, self._consumer, {STREAM: ">"}, count=self._batch
        )
        entries = reply[0][1] if reply else []
        await asyncio.gather(*(self._handle(entry_id, fields) for entry_id, fields in entries))
        return len(entries)

    async def _reclaim(self) -> None:
        reply: Any = await self._redis.xautoclaim(
            STREAM, GROUP, self._consumer, self._claim_idle_ms, start_id="0-0", count=self._batch
        )
        entries = reply[1]
        await asyncio.gather(*(self._handle(entry_id, fields) for entry_id, fields in entries))

    async def _handle(self, entry_id: Any, fields: Mapping[Any, Any]) -> None:
        if fields is None:  # deleted while pending
            await self._redis.xack(STREAM, GROUP, entry_id)
            return
        kind = text(fields[b"kind"])
        payload = base64.b64decode(fields[b"payload"])
        try:
            await self._handlers[kind](payload)
        except PermanentFailure as exc:
            log.error("%s job dead-lettered: %s", kind, exc)
            await self._redis.xadd(DEAD, {**fields, b"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - left pending; reclaimed and retried later
            log.warning("%s job failed, will retry: %s", kind, exc)
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xack(STREAM, GROUP, entry_id)
            pipe.xdel(STREAM, entry_id)
            await pipe.execute()


def _preview(payload: bytes) -> str:
    return json.dumps(base64.b64encode(payload[:64]).decode())
