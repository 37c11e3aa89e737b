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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from services.common.stores import text

log = logging.getLogger(__name__)

STREAM = "router:outbox"
DEAD = "router:outbox:dead"
GROUP = "routers"

Handler = Callable[[bytes], Awaitable[None]]
BatchHandler = Callable[[Sequence[bytes]], Awaitable[Sequence[BaseException | None]]]
"""Delivers several jobs of one kind in one call; one outcome per job, in order:
None (delivered), :class:`PermanentFailure` (dead-letter it) or another
exception (leave it pending, to retry)."""


class PermanentFailure(Exception):
    """The target refused the job for good (e.g. INVALID_ARGUMENT): dead-letter it."""


class Outbox:
    """Durable, at-least-once delivery of follow-up jobs to peer services."""

    def __init__(
        self,
        redis: aioredis.Redis,
        handlers: Mapping[str, Handler],
        *,
        batch_handlers: Mapping[str, BatchHandler] | None = None,
        claim_idle: float = 30.0,
        batch: int = 64,
    ) -> None:
        """
        Args:
            redis: The router's Redis (the stream and the consumer group).
            handlers: Delivers one job of each kind.
            batch_handlers: For kinds whose target takes many jobs in one
                call: used when a read brings more than one job of the kind.
            claim_idle: Seconds after which another consumer's pending job
                is taken over.
            batch: Jobs read at a time.
        """
        self._redis = redis
        self._handlers = dict(handlers)
        self._batch_handlers = dict(batch_handlers or {})
        self._claim_idle_ms = int(claim_idle * 1000)
        self._batch = batch
        self._consumer = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._fallback: set[asyncio.Task[None]] = set()

    async def put(
        self, *jobs: tuple[str, bytes], also: Callable[[Any], None] | None = None
    ) -> None:
        """Queues jobs, given as (kind, payload), in one round trip to Redis.

        If Redis is down, runs them now (retrying) instead of losing them.

        Args:
            jobs: The jobs.
            also: Queues more commands on the same pipeline, after the jobs
                (best effort: if they fail, or Redis is down, they are lost
                and logged; the jobs are not affected).
        """
        for kind, _ in jobs:
            if kind not in self._handlers:
                raise ValueError(f"no outbox handler for {kind!r}")
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for kind, payload in jobs:
                    pipe.xadd(STREAM, {"kind": kind, "payload": base64.b64encode(payload)})
                if also is not None:
                    also(pipe)
                replies = await pipe.execute(raise_on_error=False)
            for reply in replies[: len(jobs)]:
                if isinstance(reply, Exception):
                    raise reply
            for reply in replies[len(jobs) :]:
                if isinstance(reply, Exception):
                    log.warning("a command sent with the outbox jobs failed: %s", reply)
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
        reclaimed_at = -float("inf")
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                # Jobs of a dead consumer are only claimable after claim_idle:
                # looking a few times per claim_idle is enough, not every wake.
                if loop.time() - reclaimed_at >= self._claim_idle_ms / 4000:
                    await self._reclaim()
                    reclaimed_at = loop.time()
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
        await self._handle_all(entries)
        return len(entries)

    async def _reclaim(self) -> None:
        reply: Any = await self._redis.xautoclaim(
            STREAM, GROUP, self._consumer, self._claim_idle_ms, start_id="0-0", count=self._batch
        )
        await self._handle_all(reply[1])

    async def _handle_all(self, entries: Sequence[tuple[Any, Mapping[Any, Any] | None]]) -> None:
        """Delivers a batch of entries; acks what is finished in one round trip.

        Jobs of a kind with a batch handler go in one call; the others, one
        call each; all concurrently.
        """
        if not entries:
            return
        by_kind: dict[str, list[tuple[Any, Mapping[Any, Any]]]] = {}
        finished: list[Any] = []
        for entry_id, fields in entries:
            if fields is None:  # deleted while pending
                finished.append(entry_id)
            else:
                by_kind.setdefault(text(fields[b"kind"]), []).append((entry_id, fields))
        calls = []
        for kind, jobs in by_kind.items():
            if kind in self._batch_handlers and len(jobs) > 1:
                calls.append(self._deliver_batch(kind, jobs))
            else:
                calls.extend(self._deliver_one(kind, entry_id, fields) for entry_id, fields in jobs)
        for done in await asyncio.gather(*calls):
            finished.extend(done)
        if finished:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(STREAM, GROUP, *finished)
                pipe.xdel(STREAM, *finished)
                await pipe.execute()

    async def _deliver_one(self, kind: str, entry_id: Any, fields: Mapping[Any, Any]) -> list[Any]:
        """Delivers one job; its id when it is finished with (delivered or dead-lettered)."""
        try:
            await self._handlers[kind](base64.b64decode(fields[b"payload"]))
        except Exception as exc:  # noqa: BLE001 - judged by _finished
            return [entry_id] if await self._finished(kind, fields, exc) else []
        return [entry_id]

    async def _deliver_batch(
        self, kind: str, jobs: Sequence[tuple[Any, Mapping[Any, Any]]]
    ) -> list[Any]:
        """Delivers jobs of one kind in one call; the ids of those finished with."""
        payloads = [base64.b64decode(fields[b"payload"]) for _, fields in jobs]
        try:
            outcomes = await self._batch_handlers[kind](payloads)
        except Exception as exc:  # noqa: BLE001 - the whole batch stays pending
            log.warning("%s batch of %d failed, will retry: %s", kind, len(jobs), exc)
            return []
        done = []
        for (entry_id, fields), outcome in zip(jobs, outcomes, strict=True):
            if outcome is None or await self._finished(kind, fields, outcome):
                done.append(entry_id)
        return done

    async def _finished(self, kind: str, fields: Mapping[Any, Any], exc: BaseException) -> bool:
        """Dead-letters a job refused for good (True); leaves any other failure pending."""
        if isinstance(exc, PermanentFailure):
            log.error("%s job dead-lettered: %s", kind, exc)
            await self._redis.xadd(DEAD, {**fields, b"error": str(exc)})
            return True
        log.warning("%s job failed, will retry: %s", kind, exc)
        return False


def _preview(payload: bytes) -> str:
    return json.dumps(base64.b64encode(payload[:64]).decode())
