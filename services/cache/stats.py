"""Per-tenant cache statistics.

Counters (lookups, hits, stores, savings) live in Redis, in the tenant's
``cache:{T}:stats`` hash, incremented with HINCRBY: every replica adds to the
same numbers and they survive restarts. ``since_ms`` records when the tenant's
first counter was written. ``stores`` is incremented by the store script
itself (:mod:`services.cache.store`), so a retried Store is not counted twice.

Lookup latency is different: it is measured in process over a rolling window
of each tenant's most recent lookups, so the p50/p99 a replica reports are
that replica's own and restart empty.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import redis.asyncio as aioredis

from orchestra.cache.v1 import cache_service_pb2
from services.cache.keyspace import stats_key
from services.cache.store import redis_errors
from services.common.stores import text


@dataclasses.dataclass(frozen=True)
class Counters:
    """A tenant's counters.

    Attributes:
        lookups: Lookups made.
        exact_hits: Lookups answered by the exact layer.
        semantic_hits: Lookups answered by the semantic layer.
        stores: Entries stored (retries not counted).
        tokens_saved: Completion tokens of the answers served from the cache.
        saved_micro_usd: Original cost of the answers served from the cache.
        since_ms: When counting started for the tenant, Unix milliseconds
            (0 when nothing was counted yet).
    """

    lookups: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    stores: int = 0
    tokens_saved: int = 0
    saved_micro_usd: int = 0
    since_ms: int = 0


_HIT_FIELD = {
    cache_service_pb2.MATCH_KIND_EXACT: "exact_hits",
    cache_service_pb2.MATCH_KIND_SEMANTIC: "semantic_hits",
}


class StatsStore:
    """Reads and increments the durable counters."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def record_lookup(
        self,
        tenant: str,
        kind: cache_service_pb2.MatchKind.ValueType,
        answer: cache_service_pb2.CachedAnswer | None,
        now_ms: int,
    ) -> None:
        """Counts one lookup and, for a hit, what it saved.

        Args:
            tenant: The tenant looked up.
            kind: How it matched (MATCH_KIND_UNSPECIFIED for a miss).
            answer: The answer served, for a hit.
            now_ms: The time, Unix milliseconds (starts the counting period).
        """
        key = stats_key(tenant)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(key, "lookups", 1)
        pipe.hsetnx(key, "since_ms", now_ms)
        if kind in _HIT_FIELD and answer is not None:
            pipe.hincrby(key, _HIT_FIELD[kind], 1)
            pipe.hincrby(key, "tokens_saved", answer.usage.completion_tokens)
            pipe.hincrby(key, "saved_micro_usd", answer.cost_micro_usd)
        async with redis_errors():
            await pipe.execute()

    async def read(self, tenant: str) -> Counters:
        """The tenant's counters (all zero if it never used the cache)."""
        async with redis_errors():
            raw = await self._redis.hgetall(stats_key(tenant))
        values = {text(k): int(v) for k, v in raw.items()}
        names = {f.name for f in dataclasses.fields(Counters)}
        return Counters(**{k: v for k, v in values.items() if k in names})


class LatencyWindow:
    """Recent lookup latencies per tenant, for percentiles (this replica only)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._samples: dict[str, collections.deque[int]] = {}

    def observe(self, tenant: str, micros: int) -> None:
        """Adds one lookup's latency."""
        window = self._samples.get(tenant)
        if window is None:
            window = self._samples[tenant] = collections.deque(maxlen=self._size)
        window.append(micros)

    def percentile(self, tenant: str, fraction: float) -> int:
        """The nearest-rank percentile of the window, microseconds (0 if empty)."""
        window = self._samples.get(tenant)
        if not window:
            return 0
        ordered = sorted(window)
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[rank - 1]
