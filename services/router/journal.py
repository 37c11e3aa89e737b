"""What each router replica owes budget for the chats it is answering, kept in Redis.

A chat's hold is settled by the replica that answers it, once the answer
ends. If that replica dies mid-chat, nobody would: budget's reaper would charge
the hold's worst case when it expires, and when the edge had run the chat
again on another replica, the tenant would pay twice. So each replica keeps,
for each chat it has open, the budget job that would close it right now: a
Release while nothing has reached the client, then a partial Settle of what
was produced so far (renewed every ``PROGRESS_SECONDS`` while the answer
streams). Another replica that finds the replica dead puts those jobs in the
outbox; Release and Settle are idempotent per request id, so a job sent twice
(two sweepers, or a replica that settled just before dying) changes nothing.

Layout (under the ``{journal}`` hash tag, so a sweep's keys share a Redis
Cluster slot)::

    router:{journal}:open:<replica>   HASH request id -> job kind, NUL, payload
    router:{journal}:alive:<replica>  present while the replica lives (expires
                                      ALIVE_SECONDS after its last heartbeat)
    router:{journal}:replicas         SET of replicas that may have open chats

Writes are batched: every ``FLUSH_SECONDS`` one pipeline writes the entries
that changed and deletes those of chats that ended. A chat that ends before the
next flush is never written, and concurrent chats share the round trip. A
replica that dies loses at most its last ``FLUSH_SECONDS`` of entries; those
holds go to the reaper, as all did before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common.stores import text

log = logging.getLogger(__name__)

_BASE = "router:{journal}"
REPLICAS = f"{_BASE}:replicas"
FLUSH_SECONDS = 0.05
PROGRESS_SECONDS = 2.0
HEARTBEAT_SECONDS = 2.0
ALIVE_SECONDS = 10.0
SWEEP_SECONDS = 5.0

Job = tuple[str, bytes]  # (outbox kind, payload)
Put = Callable[..., Awaitable[None]]  # Outbox.put


def open_key(replica: str) -> str:
    """The hash of ``replica``'s open chats."""
    return f"{_BASE}:open:{replica}"


def alive_key(replica: str) -> str:
    """The key that exists while ``replica`` lives."""
    return f"{_BASE}:alive:{replica}"


def _encode(job: Job) -> bytes:
    return job[0].encode() + b"\x00" + job[1]


def _decode(raw: bytes) -> Job:
    kind, _, payload = raw.partition(b"\x00")
    return text(kind), payload


class Journal:
    """One replica's open chats, and the sweep of dead replicas' chats."""

    def __init__(
        self,
        redis: aioredis.Redis,
        put: Put,
        *,
        replica: str | None = None,
        alive_seconds: float = ALIVE_SECONDS,
    ) -> None:
        """
        Args:
            redis: The router's Redis.
            put: Queues jobs in the outbox (:meth:`Outbox.put`).
            replica: This replica's id (default: host, pid and a random part).
            alive_seconds: How long after its last heartbeat a replica counts
                as dead.
        """
        self._redis = redis
        self._put = put
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._alive_seconds = alive_seconds
        self._pending: dict[str, Job] = {}  # to write at the next flush
        self._written: set[str] = set()  # in Redis
        self._ended: set[str] = set()  # in Redis, to delete at the next flush
        self._task: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()  # something to flush

    def opened(self, request_id: str, job: Job) -> None:
        """Records the job that closes ``request_id`` if this replica dies now."""
        self._pending[request_id] = job
        self._dirty.set()

    def ended(self, request_id: str) -> None:
        """Forgets ``request_id``: its own settlement is in the outbox."""
        self._pending.pop(request_id, None)
        if request_id in self._written:
            self._ended.add(request_id)
            self._dirty.set()

    async def flush(self) -> None:
        """Writes what changed since the last flush, in one round trip."""
        pending, ended = self._pending, self._ended
        if not pending and not ended:
            return
        self._pending, self._ended = {}, set()
        key = open_key(self.replica)
        pipe = self._redis.pipeline(transaction=False)
        if pending:
            pipe.hset(key, mapping={rid: _encode(job) for rid, job in pending.items()})
        if ended:
            pipe.hdel(key, *ended)
        try:
            await pipe.execute()
        except RedisError as exc:
            log.debug("journal flush failed (%s); retrying", exc)
            for rid, job in pending.items():  # unless superseded meanwhile
                self._pending.setdefault(rid, job)
            self._ended |= ended
            self._dirty.set()
            return
        self._written |= pending.keys()
        self._written -= ended

    async def heartbeat(self) -> None:
        """Marks this replica alive for the next ``alive_seconds``."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.sadd(REPLICAS, self.replica)
        pipe.set(alive_key(self.replica), b"1", px=int(self._alive_seconds * 1000))
        await pipe.execute()

    async def sweep(self) -> int:
        """Closes the open chats of replicas that stopped heartbeating.

        Returns:
            The jobs put in the outbox.
        """
        swept = 0
        for raw in await self._redis.smembers(REPLICAS):
            replica = text(raw)
            if replica == self.replica or await self._redis.exists(alive_key(replica)):
                continue
            entries: dict[Any, Any] = await self._redis.hgetall(open_key(replica))
            jobs = [_decode(raw_job) for raw_job in entries.values()]
            if jobs:
                log.warning(
                    "router replica %s is gone with %d open chat(s): closing them",
                    replica,
                    len(jobs),
                )
                await self._put(*jobs)
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(open_key(replica))
            pipe.srem(REPLICAS, replica)
            await pipe.execute()
            swept += len(jobs)
        return swept

    def start(self) -> None:
        """Starts flushing, heartbeating and sweeping."""
        self._task = asyncio.create_task(self._run(), name="journal")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        beat_at = sweep_at = loop.time()
        while True:
            try:
                now = loop.time()
                if now >= beat_at:
                    await self.heartbeat()
                    beat_at = now + HEARTBEAT_SECONDS
                if now >= sweep_at:
                    sweep_at = now + SWEEP_SECONDS
                    await self.sweep()
                # Idle until a chat opens or ends (or the next heartbeat), then
                # let FLUSH_SECONDS of changes gather into one write.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), max(beat_at - loop.time(), 0))
                if self._dirty.is_set():
                    await asyncio.sleep(FLUSH_SECONDS)
                    self._dirty.clear()
                    await self.flush()
            except RedisError as exc:
                log.warning("journal: Redis unavailable (%s); retrying", exc)
                await asyncio.sleep(FLUSH_SECONDS)
            except Exception:  # the journal must outlive any one failure
                log.exception("journal loop failed")
                await asyncio.sleep(FLUSH_SECONDS)

    async def stop(self) -> None:
        """Stops; writes the last changes and leaves the replica set (a clean stop)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(RedisError):
            await self.flush()
            if not self._written:
                pipe = self._redis.pipeline(transaction=False)
                pipe.delete(alive_key(self.replica), open_key(self.replica))
                pipe.srem(REPLICAS, self.replica)
                await pipe.execute()
