"""Durable cache entries in Redis, and the per-tenant indexes that find them.

Every replica reads and writes the same Redis, so an entry stored through one
replica is served by all of them, and a restart loses nothing. Layout::

    cache:{T}:e:<entry_id>  HASH answer, model, answer_model, end_user,
                            request_id, created_ms, size (and scope, text,
                            vec, adapt for the semantic layer); EXPIRE = the TTL
    cache:{T}:m:<model>     SET of entry ids whose key model or answering
                            model is <model>
    cache:{T}:u:<end_user>  SET of entry ids stored for that end user
    cache:{T}:stats         HASH of counters (see :mod:`services.cache.stats`)
    cache:{T}:age           ZSET entry id -> created_ms: eviction order
    cache:{T}:size          HASH entry id -> bytes, and ``_total`` -> their sum
    cache:changes           STREAM of semantic adds and deletes (all tenants):
                            fields op (add|del), tenant, id; trimmed to about
                            CHANGES_MAXLEN entries

An entry the semantic layer can match also holds ``scope``, ``text`` (the
compared message) and ``vec`` (its embedding, float32 bytes), so any replica
can rebuild its FAISS view from Redis alone, without embedding again.

``T`` is the tenant id percent-encoded (everything but letters, digits and
``-._~``), between braces. The braces make it a Redis Cluster hash tag, so all
of a tenant's keys share one slot and the multi-key scripts below stay
cluster-safe; the encoding means ``T`` holds neither a brace, a colon nor a
glob character, so a pattern built from it matches that tenant alone:
``cache:{acme}:e:*`` never reaches ``cache:{acme-eu}:…``.

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
from typing import Any
from urllib.parse import quote, unquote

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis import exceptions as redis_exc

from orchestra.cache.v1 import cache_service_pb2
from orchestra.common.v1 import errors_pb2
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

_BATCH = 500  # entries per script call: bounds how long one call holds Redis
CHANGES = "cache:changes"
CHANGES_MAXLEN = 100_000  # a replica further behind than this rebuilds from the entries
_SCAN_COUNT = 1000
_RETRY_AFTER_SECONDS = 1.0


# --- keyspace --------------------------------------------------------------


def tenant_tag(tenant: str) -> str:
    """The prefix of every key of ``tenant``: ``cache:{<encoded tenant>}``."""
    return "cache:{" + quote(tenant, safe="") + "}"


def entry_key(tenant: str, entry_id: str) -> str:
    """The key of one entry."""
    return f"{tenant_tag(tenant)}:e:{entry_id}"


def model_index(tenant: str, model: str) -> str:
    """The set of entry ids for ``model``."""
    return f"{tenant_tag(tenant)}:m:{model}"


def user_index(tenant: str, end_user: str) -> str:
    """The set of entry ids stored for ``end_user``."""
    return f"{tenant_tag(tenant)}:u:{end_user}"


def stats_key(tenant: str) -> str:
    """The hash of ``tenant``'s counters."""
    return f"{tenant_tag(tenant)}:stats"


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


# --- scripts ---------------------------------------------------------------

# Deletes one entry and its index memberships; true if it existed.
_DELETE_ENTRY = """
local function forget_size(tag, id)
  redis.call('ZREM', tag .. ':age', id)
  local size = redis.call('HGET', tag .. ':size', id)
  if size then
    redis.call('HDEL', tag .. ':size', id)
    redis.call('HINCRBY', tag .. ':size', '_total', -tonumber(size))
  end
end
local function delete_entry(tag, id)
  local key = tag .. ':e:' .. id
  local meta = redis.call('HMGET', key, 'model', 'answer_model', 'end_user')
  forget_size(tag, id)
  if redis.call('DEL', key) == 0 then return false end
  if meta[1] then redis.call('SREM', tag .. ':m:' .. meta[1], id) end
  if meta[2] and meta[2] ~= '' then redis.call('SREM', tag .. ':m:' .. meta[2], id) end
  if meta[3] and meta[3] ~= '' then redis.call('SREM', tag .. ':u:' .. meta[3], id) end
  return true
end
"""

# KEYS: entry, key-model index, answer-model index, user index, stats, age, size.
# ARGV: ttl, id, answer, model, answer_model, end_user, request_id, created_ms,
#       size, tag, scope, text, vec (the last three "" for an exact-only entry),
#       max entries, max bytes.
# Returns {1 if this is a new store (counted) else 0, evicted ids...}.
_PUT = (
    _DELETE_ENTRY
    + """
local ttl = tonumber(ARGV[1])
local id, user, request_id = ARGV[2], ARGV[6], ARGV[7]
local prev = redis.call('HMGET', KEYS[1], 'request_id', 'end_user')
-- An overwrite for another end user: the old user's erasure must not reach it.
if prev[2] and prev[2] ~= '' and prev[2] ~= user then
  redis.call('SREM', ARGV[10] .. ':u:' .. prev[2], id)
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'answer', ARGV[3], 'model', ARGV[4], 'answer_model', ARGV[5],
  'end_user', user, 'request_id', request_id, 'created_ms', ARGV[8], 'size', ARGV[9])
if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[1], 'scope', ARGV[11], 'text', ARGV[12], 'vec', ARGV[13])
end
redis.call('EXPIRE', KEYS[1], ttl)
local function index(key)
  redis.call('SADD', key, id)
  if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
end
index(KEYS[2])
if ARGV[5] ~= '' then index(KEYS[3]) end
if user ~= '' then index(KEYS[4]) end
local fresh = (not prev[1]) or request_id == '' or prev[1] ~= request_id
if fresh then
  redis.call('HINCRBY', KEYS[5], 'stores', 1)
  redis.call('HSETNX', KEYS[5], 'since_ms', ARGV[8])
end
forget_size(ARGV[10], id)
redis.call('ZADD', KEYS[6], tonumber(ARGV[8]), id)
redis.call('HSET', KEYS[7], id, ARGV[9])
local total = redis.call('HINCRBY', KEYS[7], '_total', tonumber(ARGV[9]))
local out = {fresh and 1 or 0}
local max_entries, max_bytes = tonumber(ARGV[14]), tonumber(ARGV[15])
while redis.call('ZCARD', KEYS[6]) > max_entries or total > max_bytes do
  local oldest = redis.call('ZRANGE', KEYS[6], 0, 0)[1]
  if oldest == nil or oldest == id then break end
  if delete_entry(ARGV[10], oldest) then out[#out + 1] = oldest end
  total = tonumber(redis.call('HGET', KEYS[7], '_total') or '0')
end
return out
"""
)

# KEYS: entry keys. ARGV: tag, then the ids of KEYS. Returns the ids deleted.
_DELETE = (
    _DELETE_ENTRY
    + """
local deleted = {}
for i = 2, #ARGV do
  if delete_entry(ARGV[1], ARGV[i]) then deleted[#deleted + 1] = ARGV[i] end
end
return deleted
"""
)

# KEYS: an index set. ARGV: tag, batch size. Pops up to a batch of ids and
# deletes their entries; returns {ids popped, deleted ids...}. Popping (not
# reading then deleting the set) means an id added meanwhile is never lost.
_DRAIN = (
    _DELETE_ENTRY
    + """
local ids = redis.call('SPOP', KEYS[1], tonumber(ARGV[2]))
local out = {#ids}
for _, id in ipairs(ids) do
  if delete_entry(ARGV[1], id) then out[#out + 1] = id end
end
return out
"""
)


# KEYS: entry. ARGV: state. Writes the adaptive state only into a live entry
# (a plain HSET would resurrect an expired or deleted entry as a stub).
_SET_ADAPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'adapt', ARGV[1]) end
"""


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
        self._put = redis.register_script(_PUT)
        self._delete = redis.register_script(_DELETE)
        self._drain = redis.register_script(_DRAIN)
        self._set_adapt = redis.register_script(_SET_ADAPT)

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
                    f"{tenant_tag(tenant)}:age",
                    f"{tenant_tag(tenant)}:size",
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

    async def publish(self, op: str, tenant: str, entry_ids: Sequence[str]) -> None:
        """Tells every replica's semantic layer that these entries were added or deleted."""
        if not entry_ids:
            return
        async with redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for entry_id in entry_ids:
                pipe.xadd(
                    CHANGES,
                    {"op": op, "tenant": tenant, "id": entry_id},
                    maxlen=CHANGES_MAXLEN,
                    approximate=True,
                )
            await pipe.execute()

    async def adaptive_state(self, tenant: str, entry_id: str) -> bytes | None:
        """The adaptive policy's state of an entry (JSON), or None."""
        async with redis_errors():
            value = await self._redis.hget(entry_key(tenant, entry_id), "adapt")
        return _bytes(value)

    async def set_adaptive_state(self, tenant: str, entry_id: str, state: str) -> None:
        """Saves an entry's adaptive state, unless the entry is gone meanwhile."""
        async with redis_errors():
            await self._set_adapt(keys=[entry_key(tenant, entry_id)], args=[state])

    async def latest_change(self) -> str:
        """The id of the newest change ("0-0" if none): where a fresh follower starts."""
        async with redis_errors():
            newest: Any = await self._redis.xrevrange(CHANGES, count=1)
        return text(newest[0][0]) if newest else "0-0"

    async def changes_after(self, last_id: str, block_ms: int) -> list[tuple[str, str, str, str]]:
        """Changes after ``last_id`` as (id, op, tenant, entry id), waiting up to ``block_ms``.

        Connection errors propagate as redis-py's own: the follower treats
        them as a reason to rebuild, not as a failed request.
        """
        reply: Any = await self._redis.xread({CHANGES: last_id}, count=_BATCH, block=block_ms)
        out = []
        for _stream, messages in reply or []:
            for change_id, fields in messages:
                values = {text(k): text(v) for k, v in fields.items()}
                out.append((text(change_id), values["op"], values["tenant"], values["id"]))
        return out

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
            async for key in self._redis.scan_iter(match="cache:{*}:e:*", count=_SCAN_COUNT):
                tag, _, entry_id = text(key).rpartition(":e:")
                tenant = unquote(tag.removeprefix("cache:{").removesuffix("}"))
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


def text(value: bytes | str) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else value
