"""Batches in Redis: many chats queued as one, their results kept for paging.

A batch is a few Redis keys (under ``router:{batches}:batch:<tenant>/<batch_id>``): its
meta hash (state, counts, priority, concurrency limit, the creator's identity),
the items, a queue of item ids still to run, the leases of running items, and
the results (a hash, with a sorted set of ids for paging in custom_id order).
Because everything is in Redis, results and the remaining queue survive a
router restart, and every replica's runner
(:class:`services.router.batch_runner.BatchRunner`) works on the same queues.

Claiming an item, finishing it and cancelling are Lua scripts, so replicas
never run more than ``max_concurrency`` items of a batch at once and never
count a result twice. A claimed item holds a lease; if its replica dies, the
lease expires and the item is queued again; it runs again under the same
request id (``<batch_id>:<custom_id>`` unless the item set one), so budget
charges it once.
Runners take batches highest priority first, oldest first among equals.
Finished batches are kept for ``RETENTION_SECONDS``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from redis.exceptions import WatchError

from orchestra.common.v1 import errors_pb2, identity_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from orchestra.router.v1 import router_service_pb2 as router_api
from services.common import paging
from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.outages import redis_outage
from services.common.stores import lua_script, text
from services.router import validation

log = logging.getLogger(__name__)

# One Redis Cluster hash tag for every batch key: creating a batch puts its keys
# and the ready set in one transaction.
PREFIX = "router:{batches}:batch:"
READY = "router:{batches}:ready"  # batches with items to run, by priority then age
MAX_ITEMS = 10_000
DEFAULT_CONCURRENCY = 4
MAX_CONCURRENCY = 64
RETENTION_SECONDS = 30 * 86_400
ITEM_DEADLINE_SECONDS = 300.0
LEASE_SECONDS = ITEM_DEADLINE_SECONDS + 60.0
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STATES = {
    "queued": router_api.BATCH_STATE_QUEUED,
    "running": router_api.BATCH_STATE_RUNNING,
    "completed": router_api.BATCH_STATE_COMPLETED,
    "cancelled": router_api.BATCH_STATE_CANCELLED,
}


def _invalid(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(errors_pb2.ERROR_REASON_INVALID_FIELD, message, field=field)


@dataclasses.dataclass(frozen=True)
class _Keys:
    meta: str
    items: str
    queue: str
    leases: str
    attempts: str
    results: str
    done: str

    @classmethod
    def of(cls, ref: str) -> _Keys:
        base = PREFIX + ref
        return cls(
            meta=base,
            items=f"{base}:items",
            queue=f"{base}:queue",
            leases=f"{base}:leases",
            attempts=f"{base}:attempts",
            results=f"{base}:results",
            done=f"{base}:done",
        )


@dataclasses.dataclass(frozen=True)
class Claimed:
    """An item a runner is to run."""

    ref: str  # "<tenant>/<batch_id>"
    custom_id: str
    request: chat_api.ChatRequest
    attempts: int


def _ref(tenant_id: str, batch_id: str) -> str:
    return f"{tenant_id}/{batch_id}"


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class BatchStore:
    """The Redis side of batches: create, read, claim, finish, cancel.

    The methods the RPCs call (create, get, results, cancel) answer a Redis
    outage with UNAVAILABLE STORE_UNAVAILABLE; the runner's methods raise the
    Redis error, and the runner retries.
    """

    def __init__(self, redis: aioredis.Redis, *, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._clock = clock
        self._claim = redis.register_script(lua_script("services.router", "batch_claim"))
        self._finish = redis.register_script(lua_script("services.router", "batch_finish"))
        self._release = redis.register_script(lua_script("services.router", "batch_release"))
        self._cancel = redis.register_script(lua_script("services.router", "batch_cancel"))

    @redis_outage
    async def create(
        self,
        identity: identity_pb2.Identity,
        request: router_api.CreateBatchRequest,
        max_request_bytes: int,
    ) -> router_api.Batch:
        """Queues a batch; the same batch_id with the same items returns the existing one.

        Raises:
            InvalidArgument: INVALID_FIELD naming the bad field or item.
            AlreadyExists: RESOURCE_EXISTS: the batch_id holds other items.
            Unavailable: STORE_UNAVAILABLE: Redis cannot be reached.
        """
        batch_id = request.batch_id or f"batch_{uuid.uuid4().hex[:16]}"
        if not _ID.fullmatch(batch_id):
            raise _invalid("batch_id", "batch_id must be 1-64 characters of [A-Za-z0-9._-]")
        items = _validated_items(batch_id, request, max_request_bytes)
        if not 0 <= request.max_concurrency <= MAX_CONCURRENCY:
            raise _invalid("max_concurrency", f"max_concurrency must be 0-{MAX_CONCURRENCY}")
        digest = hashlib.sha256(
            b"".join(chat.SerializeToString(deterministic=True) for chat in items.values())
            + str(request.priority).encode()
        ).hexdigest()
        ref = _ref(identity.tenant_id, batch_id)
        keys = _Keys.of(ref)
        now = self._clock()
        async with self._redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(keys.meta)
                existing = await pipe.hget(keys.meta, "digest")
                if existing is None:
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for start in range(0, len(items), 1000):
                        chunk = list(items.items())[start : start + 1000]
                        pipe.hset(keys.items, mapping={k: v.SerializeToString() for k, v in chunk})
                        pipe.rpush(keys.queue, *[k for k, _ in chunk])
                    pipe.hset(
                        keys.meta,
                        mapping={
                            "digest": digest,
                            "state": "queued",
                            "total": len(items),
                            "succeeded": 0,
                            "failed": 0,
                            "running": 0,
                            "cost": 0,
                            "priority": request.priority,
                            "max_concurrency": request.max_concurrency or DEFAULT_CONCURRENCY,
                            "create_time": f"{now:.6f}",
                            "identity": identity.SerializeToString(),
                        },
                    )
                    # Higher priority first; among equals, the older batch first.
                    pipe.zadd(READY, {ref: -request.priority * 1e12 + now})
                    await pipe.execute()
            except WatchError:
                existing = await self._redis.hget(keys.meta, "digest")
        if existing is not None and text(existing) != digest:
            raise AlreadyExists(
                errors_pb2.ERROR_REASON_RESOURCE_EXISTS,
                f"batch {batch_id} exists with other items",
                metadata={"batch_id": batch_id},
            )
        return await self.get(identity.tenant_id, batch_id)

    @redis_outage
    async def get(self, tenant_id: str, batch_id: str) -> router_api.Batch:
        """The batch as the API shows it.

        Raises:
            NotFound: RESOURCE_NOT_FOUND.
            Unavailable: STORE_UNAVAILABLE: Redis cannot be reached.
        """
        raw = await self._redis.hgetall(_Keys.of(_ref(tenant_id, batch_id)).meta)
        if not raw:
            raise NotFound(
                errors_pb2.ERROR_REASON_RESOURCE_NOT_FOUND,
                f"no batch {batch_id!r}",
                metadata={"batch_id": batch_id},
            )
        row = {text(k): v for k, v in raw.items()}
        batch = router_api.Batch(
            batch_id=batch_id,
            state=_STATES[text(row["state"])],
            total_items=int(row["total"]),
            succeeded_items=int(row["succeeded"]),
            failed_items=int(row["failed"]),
            priority=int(row["priority"]),
            create_time=_timestamp(float(row["create_time"])),
            cost_micro_usd=int(row["cost"]),
        )
        if "end_time" in row:
            batch.end_time.CopyFrom(_timestamp(float(row["end_time"])))
        return batch

    @redis_outage
    async def results(
        self, tenant_id: str, request: router_api.ListBatchResultsRequest
    ) -> router_api.ListBatchResultsResponse:
        """A page of finished items in custom_id order.

        Raises:
            NotFound: RESOURCE_NOT_FOUND.
            InvalidArgument: INVALID_PAGE_TOKEN, INVALID_FIELD (page_size).
            Unavailable: STORE_UNAVAILABLE: Redis cannot be reached.
        """
        await self.get(tenant_id, request.batch_id)
        size = paging.page_size(request.page_size)
        after = paging.decode(request.page_token, request.batch_id)
        keys = _Keys.of(_ref(tenant_id, request.batch_id))
        low = f"({after}" if after else "-"
        ids = [text(i) for i in await self._redis.zrangebylex(keys.done, low, "+", 0, size + 1)]
        response = router_api.ListBatchResultsResponse()
        page = ids[:size]
        if page:
            for raw in await self._redis.hmget(keys.results, page):
                if isinstance(raw, bytes):
                    response.results.append(router_api.BatchResult.FromString(raw))
        if len(ids) > size:
            response.next_page_token = paging.encode(page[-1], request.batch_id)
        return response

    @redis_outage
    async def cancel(self, tenant_id: str, batch_id: str) -> router_api.Batch:
        """Cancels a batch (idempotent); running items finish.

        Raises:
            NotFound: RESOURCE_NOT_FOUND.
            Unavailable: STORE_UNAVAILABLE: Redis cannot be reached.
        """
        ref = _ref(tenant_id, batch_id)
        keys = _Keys.of(ref)
        if await self._cancel(keys=[keys.meta, keys.queue], args=[f"{self._clock():.6f}"]):
            await self._redis.zrem(READY, ref)
        return await self.get(tenant_id, batch_id)

    # -- for the runner ----------------------------------------------------------
    async def ready(self, limit: int = 50) -> list[str]:
        """Batches with items to run, in the order they should be served."""
        return [text(r) for r in await self._redis.zrange(READY, 0, limit - 1)]

    async def claim(self, ref: str) -> Claimed | str:
        """Claims the next item of ``ref``, or says why not ("busy", "empty", "done")."""
        keys = _Keys.of(ref)
        answer = await self._claim(
            keys=[keys.meta, keys.queue, keys.leases, keys.attempts, keys.items],
            args=[f"{self._clock():.6f}", LEASE_SECONDS],
        )
        if text(answer[0]) != "item":
            if text(answer[0]) == "done":
                await self._redis.zrem(READY, ref)
            return text(answer[0])
        return Claimed(
            ref=ref,
            custom_id=text(answer[1]),
            request=chat_api.ChatRequest.FromString(answer[2]),
            attempts=int(answer[3]),
        )

    async def identity(self, ref: str) -> identity_pb2.Identity:
        """The identity the batch was created with (its items run as that caller)."""
        raw = await self._redis.hget(_Keys.of(ref).meta, "identity")
        return identity_pb2.Identity.FromString(raw if isinstance(raw, bytes) else b"")

    async def finish(self, item: Claimed, result: router_api.BatchResult, cost: int) -> None:
        """Stores an item's result; marks the batch completed after its last item."""
        keys = _Keys.of(item.ref)
        last = await self._finish(
            keys=[keys.meta, keys.queue, keys.leases, keys.results, keys.done],
            args=[
                item.custom_id,
                result.SerializeToString(),
                "1" if result.HasField("response") else "0",
                cost,
                f"{self._clock():.6f}",
                RETENTION_SECONDS,
            ],
        )
        if last:
            await self._redis.zrem(READY, item.ref)
            await self._redis.expire(keys.items, RETENTION_SECONDS)
            await self._redis.expire(keys.attempts, RETENTION_SECONDS)

    async def release(self, item: Claimed) -> None:
        """Queues a claimed item again (this replica is stopping)."""
        keys = _Keys.of(item.ref)
        await self._release(keys=[keys.meta, keys.queue, keys.leases], args=[item.custom_id])


def _validated_items(
    batch_id: str, request: router_api.CreateBatchRequest, max_request_bytes: int
) -> dict[str, chat_api.ChatRequest]:
    if not request.items:
        raise _invalid("items", "a batch needs at least one item")
    if len(request.items) > MAX_ITEMS:
        raise _invalid("items", f"a batch holds at most {MAX_ITEMS} items")
    items: dict[str, chat_api.ChatRequest] = {}
    for index, item in enumerate(request.items):
        field = f"items[{index}]"
        if not _ID.fullmatch(item.custom_id):
            raise _invalid(
                f"{field}.custom_id", "custom_id must be 1-64 characters of [A-Za-z0-9._-]"
            )
        if item.custom_id in items:
            raise _invalid(f"{field}.custom_id", f"custom_id {item.custom_id!r} is repeated")
        chat = chat_api.ChatRequest()
        chat.CopyFrom(item.request)
        chat.request_id = chat.request_id or f"{batch_id}:{item.custom_id}"
        try:
            validation.validate(chat, max_request_bytes)
        except InvalidArgument as exc:
            inner = exc.field or ""
            raise _invalid(f"{field}.request.{inner}".rstrip("."), exc.message) from None
        items[item.custom_id] = chat
    return items
