"""Durable cache entries in Redis: read, write and delete them and their indexes.

The key layout is in :mod:`services.cache.keyspace`; the atomic parts are Lua
scripts in ``services/cache/lua/`` (``delete_entry.lua`` is prepended to the
scripts that delete entries).

Size limits: the store script keeps each tenant within a number of entries
and of answer bytes by evicting its oldest entries (``age``) in the same
atomic call, and returns the evicted ids so the semantic views drop them too.
An entry that expired still counts until it is the oldest and is evicted (its
size is still known from ``size``); expired entries are usually the oldest.

Index sets are kept by the scripts that store and delete entries. Members of
entries that expired are harmless (deleting them finds nothing) and each set
expires with its longest-lived entry, so the indexes do not grow without bound.
Counting entries and bytes, and deleting all entries or by key prefix, SCAN the
keyspace: O(keys in the Redis db), fine for an admin RPC, never on the hot path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis import exceptions as redis_exc

from orchestra.cache.v1 import cache_service_pb2
from orchestra.common.v1 import errors_pb2
from services.cache.keyspace import (
    ENTRY_PATTERN,
    age_key,
    entry_key,
    model_index,
    size_key,
    split_entry_key,
    stats_key,
    tenant_tag,
    user_index,
)
from services.common.errors import Unavailable
from services.common.stores import lua_script, text

log = logging.getLogger(__name__)

_BATCH = 500  # entries per script call: bounds how long one call holds Redis
_SCAN_COUNT = 1000
_RETRY_AFTER_SECONDS = 1.0


@contextlib.asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    """Turns Redis being unreachable into UNAVAILABLE STORE_UNAVAILABLE.

    Other Redis errors (a script bug, a wrong type) are not outages and
    propagate as INTERNAL.
    """
    try:
        yield
    except (redis_exc.ConnectionError, redis_exc.TimeoutError, redis_exc.ReadOnlyError) as exc:
        log.warning("cache store unavailable: %s", exc)
        raise Unavailable(
            errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
            "the cache store (Redis) is unavailable",
            retry_after=_RETRY_AFTER_SECONDS,
        ) from exc


# --- entries ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SemanticFields:
    """What the semantic layer files an entry under.

    Attributes:
        scope: The entry's scope (:mod:`services.cache.scope`).
        text: The compared message.
        vector: Its embedding as float32 bytes.
    """

    scope: str
    text: str
    vector: bytes


@dataclasses.dataclass(frozen=True)
class Entry:
    """One cached answer and what it is filed under.

    Attributes:
        tenant: Owner of the entry.
        entry_id: The exact key's digest.
        model: The model of the key (what the request asked for).
        end_user: The end user it was stored for ("" if none).
        request_id: The chat request that produced it.
        created_ms: When it was stored, Unix milliseconds.
        answer: The answer.
        semantic: What the semantic layer files it under (None: exact only).
    """

    tenant: str
    entry_id: str
    model: str
    end_user: str
    request_id: str
    created_ms: int
    answer: cache_service_pb2.CachedAnswer
    semantic: SemanticFields | None = None

    def serialised_answer(self) -> bytes:
        """The answer as stored (deterministic, so a retry writes the same bytes)."""
        return self.answer.SerializeToString(deterministic=True)


_FIELDS = (b"answer", b"model", b"end_user", b"request_id", b"created_ms")


class EntryStore:
    """Reads, writes and deletes entries and their indexes."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        delete_entry = lua_script(__package__, "delete_entry")
        self._put = redis.register_script(delete_entry + lua_script(__package__, "put"))
        self._delete = redis.register_script(delete_entry + lua_script(__package__, "delete"))
        self._drain = redis.register_script(delete_entry + lua_script(__package__, "drain"))
        self._set_adapt = redis.register_script(lua_script(__package__, "set_adapt"))

    async def get(self, tenant: str, entry_id: str) -> Entry | None:
        """The live entry with this id, or None."""
        async with redis_errors():
            values = await self._redis.hmget(entry_key(tenant, entry_id), list(_FIELDS))
        blob, model, end_user, request_id, created = (_bytes(v) for v in values)
        if blob is None:
            return None
        answer = cache_service_pb2.CachedAnswer()
        try:
            answer.ParseFromString(blob)
        except DecodeError:
            # Left in place for inspection: a miss is safe, deleting data is not.
            log.error(
                "cache entry %s of tenant %r does not parse; treated as a miss", entry_id, tenant
            )
            return None
        return Entry(
            tenant=tenant,
            entry_id=entry_id,
            model=(model or b"").decode(),
            end_user=(end_user or b"").decode(),
            request_id=(request_id or b"").decode(),
            created_ms=int(created or 0),
            answer=answer,
        )

    async def put(
        self, entry: Entry, ttl_seconds: int, *, max_entries: int, max_bytes: int
    ) -> tuple[bool, list[str]]:
        """Writes ``entry`` (replacing one with the same id) to live ``ttl_seconds``.

        The tenant's oldest entries are evicted, in the same atomic call, until
        it holds at most ``max_entries`` entries and ``max_bytes`` answer bytes.

        Returns:
            Whether this is a new store (False if it repeats the last store of
            this entry, same request id, which is not counted again), and the
            ids of the entries evicted to make room.
        """
        tenant, blob = entry.tenant, entry.serialised_answer()
        answer_model = entry.answer.model if entry.answer.model != entry.model else ""
        semantic = entry.semantic or SemanticFields(scope="", text="", vector=b"")
        async with redis_errors():
            fresh, *evicted = await self._put(
                keys=[
                    entry_key(tenant, entry.entry_id),
                    model_index(tenant, entry.model),
                    model_index(tenant, answer_model),
                    user_index(tenant, entry.end_user),
                    stats_key(tenant),
                    age_key(tenant),
                    size_key(tenant),
                ],
                args=[
                    ttl_seconds,
                    entry.entry_id,
                    blob,
                    entry.model,
                    answer_model,
                    entry.end_user,
                    entry.request_id,
                    entry.created_ms,
                    len(blob),
                    tenant_tag(tenant),
                    semantic.scope,
                    semantic.text,
                    semantic.vector,
                    max_entries,
                    max_bytes,
                ],
            )
        return bool(fresh), [text(item) for item in evicted]

    async def delete_ids(self, tenant: str, entry_ids: Sequence[str]) -> list[str]:
        """Deletes these entries; returns the ids that existed."""
        deleted: list[str] = []
        tag = tenant_tag(tenant)
        async with redis_errors():
            for start in range(0, len(entry_ids), _BATCH):
                batch = list(entry_ids[start : start + _BATCH])
                keys = [entry_key(tenant, i) for i in batch]
                result = await self._delete(keys=keys, args=[tag, *batch])
                deleted.extend(text(item) for item in result)
        return deleted

    async def delete_by_model(self, tenant: str, model: str) -> list[str]:
        """Deletes the entries whose key model or answering model is ``model``."""
        return await self._drain_index(tenant, model_index(tenant, model))

    async def delete_by_end_user(self, tenant: str, end_user: str) -> list[str]:
        """Deletes every entry stored for ``end_user`` (an erasure request)."""
        return await self._drain_index(tenant, user_index(tenant, end_user))

    async def delete_by_prefix(self, tenant: str, prefix: str) -> list[str]:
        """Deletes the entries whose id starts with ``prefix`` ("" for all)."""
        deleted: list[str] = []
        async for batch in self._scan_ids(tenant, prefix):
            deleted.extend(await self.delete_ids(tenant, batch))
        return deleted

    async def usage(self, tenant: str) -> tuple[int, int]:
        """How many entries ``tenant`` holds, and their answers' total bytes."""
        entries = total = 0
        async for batch in self._scan_ids(tenant, ""):
            async with redis_errors():
                pipe = self._redis.pipeline(transaction=False)
                for entry_id in batch:
                    pipe.hget(entry_key(tenant, entry_id), "size")
                sizes = await pipe.execute()
            for size in sizes:
                if size is not None:  # expired between SCAN and HGET
                    entries += 1
                    total += int(size)
        return entries, total

    async def adaptive_state(self, tenant: str, entry_id: str) -> bytes | None:
        """The adaptive policy's state of an entry (JSON), or None."""
        async with redis_errors():
            value = await self._redis.hget(entry_key(tenant, entry_id), "adapt")
        return _bytes(value)

    async def set_adaptive_state(self, tenant: str, entry_id: str, state: str) -> None:
        """Saves an entry's adaptive state, unless the entry is gone meanwhile."""
        async with redis_errors():
            await self._set_adapt(keys=[entry_key(tenant, entry_id)], args=[state])

    async def semantic_fields(
        self, tenant: str, entry_ids: Sequence[str]
    ) -> list[tuple[SemanticFields, int] | None]:
        """Each entry's semantic fields and remaining lifetime in ms (None: gone or exact-only)."""
        async with redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for entry_id in entry_ids:
                key = entry_key(tenant, entry_id)
                pipe.hmget(key, ["scope", "text", "vec"])
                pipe.pttl(key)
            replies = await pipe.execute()
        out: list[tuple[SemanticFields, int] | None] = []
        for (scope, body, vec), ttl in zip(replies[::2], replies[1::2], strict=True):
            if not scope or vec is None or body is None:
                out.append(None)
                continue
            fields = SemanticFields(scope=text(scope), text=text(body), vector=_bytes(vec) or b"")
            out.append((fields, int(ttl)))
        return out

    async def scan_tenants(self) -> AsyncIterator[tuple[str, list[str]]]:
        """Every entry id in the database, in batches, with its tenant."""
        batch: dict[str, list[str]] = {}
        async with redis_errors():
            async for key in self._redis.scan_iter(match=ENTRY_PATTERN, count=_SCAN_COUNT):
                tenant, entry_id = split_entry_key(text(key))
                batch.setdefault(tenant, []).append(entry_id)
                if len(batch[tenant]) >= _BATCH:
                    yield tenant, batch.pop(tenant)
        for tenant, ids in batch.items():
            yield tenant, ids

    async def _drain_index(self, tenant: str, index: str) -> list[str]:
        deleted: list[str] = []
        tag = tenant_tag(tenant)
        async with redis_errors():
            while True:
                popped, *ids = await self._drain(keys=[index], args=[tag, _BATCH])
                deleted.extend(text(item) for item in ids)
                if int(popped) < _BATCH:
                    return deleted

    async def _scan_ids(self, tenant: str, prefix: str) -> AsyncIterator[list[str]]:
        pattern = f"{entry_key(tenant, prefix)}*"
        skip = len(entry_key(tenant, ""))
        batch: list[str] = []
        async with redis_errors():
            async for key in self._redis.scan_iter(match=pattern, count=_SCAN_COUNT):
                batch.append(text(key)[skip:])
                if len(batch) >= _BATCH:
                    yield batch
                    batch = []
        if batch:
            yield batch


def _bytes(value: bytes | str | None) -> bytes | None:
    # The client is made with decode_responses=False; the union is redis-py's typing.
    return value.encode() if isinstance(value, str) else value
