"""Per-tenant cache statistics.

Counters (lookups, hits, stores, savings) live in Redis, in the tenant's
``cache:{T}:stats`` hash, incremented with HINCRBY: every replica adds to the
same numbers and they survive restarts. ``since_ms`` records when the tenant's
first counter was written. ``stores`` is incremented by the store script
itself (:mod:`services.cache.store`), so a retried Store is not counted twice.

A lookup is counted in this replica's memory, not with a Redis write of its
own: what was counted goes to Redis as one transaction every
``FLUSH_SECONDS``, before every stats read of this replica and at shutdown.
So another replica's counts show up to ``FLUSH_SECONDS`` late, and a replica
that is killed loses at most that much of its counting (counters only: no
entry, spend or audit record depends on them). When Redis refuses a write,
the counts are kept for the next one; if the connection fails while the
transaction runs, that batch can be counted twice.

Lookup latency is different: it is measured in process over a rolling window
of each tenant's most recent lookups, so the p50/p99 a replica reports are
that replica's own and restart empty.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math

import redis.asyncio as aioredis

from orchestra.cache.v1 import cache_service_pb2
from services.cache.keyspace import stats_key
from services.cache.store import redis_errors
from services.common.errors import Unavailable
from services.common.stores import text

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.5
"""Lookups counted in memory reach Redis at most this long after the first of them."""


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
    """Counts lookups in memory, sends them to Redis in batches, reads the counters."""

    def __init__(self, redis: aioredis.Redis, flush_seconds: float = FLUSH_SECONDS) -> None:
        self._redis = redis
        self._flush_seconds = flush_seconds
        self._pending: dict[str, collections.Counter[str]] = {}
        self._since_ms: dict[str, int] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._sending = asyncio.Lock()

    def count_lookup(
        self,
        tenant: str,
        kind: cache_service_pb2.MatchKind.ValueType,
        answer: cache_service_pb2.CachedAnswer | None,
        now_ms: int,
    ) -> None:
        """Counts one lookup and, for a hit, what it saved (sent later, see the module).

        Args:
            tenant: The tenant looked up.
            kind: How it matched (MATCH_KIND_UNSPECIFIED for a miss).
            answer: The answer served, for a hit.
            now_ms: The time, Unix milliseconds (starts the counting period).
        """
        tally = self._pending.get(tenant)
        if tally is None:
            tally = self._pending[tenant] = collections.Counter()
            self._since_ms.setdefault(tenant, now_ms)
        tally["lookups"] += 1
        if kind in _HIT_FIELD and answer is not None:
            tally[_HIT_FIELD[kind]] += 1
            tally["tokens_saved"] += answer.usage.completion_tokens
            tally["saved_micro_usd"] += answer.cost_micro_usd
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._flush_seconds)
        try:
            await self.flush()
        except Unavailable as exc:
            log.warning("cache lookups not counted yet (kept for the next write): %s", exc.message)
        except Exception:  # counting must never take the service down
            log.exception("cache lookups not counted yet (kept for the next write)")

    async def flush(self) -> None:
        """Sends what was counted in memory as one transaction.

        Raises:
            Unavailable: STORE_UNAVAILABLE; the counts are kept for the next flush.
        """
        async with self._sending:  # a stats read waits for a write in flight
            pending, since = self._pending, self._since_ms
            if not pending:
                return
            self._pending, self._since_ms = {}, {}
            # One transaction per tenant (a tenant's keys share a Redis Cluster
            # slot; different tenants' may not), all sent at once.
            tenants = list(pending)
            try:
                outcomes = await asyncio.gather(
                    *(self._send(tenant, pending[tenant], since[tenant]) for tenant in tenants),
                    return_exceptions=True,
                )
            except BaseException:  # cancelled: whether anything was written is unknown
                self._keep(pending, since)
                raise
            failed = [t for t, outcome in zip(tenants, outcomes, strict=True) if outcome]
            if failed:
                self._keep({t: pending[t] for t in failed}, {t: since[t] for t in failed})
                raise next(o for o in outcomes if isinstance(o, BaseException))

    async def _send(self, tenant: str, tally: collections.Counter[str], since_ms: int) -> None:
        """Adds one tenant's counts in one transaction (all or none)."""
        key = stats_key(tenant)
        pipe = self._redis.pipeline(transaction=True)
        for field, amount in tally.items():
            if amount:
                pipe.hincrby(key, field, amount)
        pipe.hsetnx(key, "since_ms", since_ms)
        async with redis_errors():
            await pipe.execute()

    def _keep(self, pending: dict[str, collections.Counter[str]], since: dict[str, int]) -> None:
        """Puts counts that were not written back, for the next flush."""
        for tenant, tally in pending.items():
            self._pending.setdefault(tenant, collections.Counter()).update(tally)
            self._since_ms[tenant] = min(since[tenant], self._since_ms.get(tenant, since[tenant]))

    async def aclose(self) -> None:
        """Sends the last counts and stops the timer."""
        if self._flusher is not None:
            self._flusher.cancel()
        await self.flush()

    async def read(self, tenant: str) -> Counters:
        """The tenant's counters (all zero if it never used the cache).

        This replica's counts still in memory are sent first.
        """
        await self.flush()
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
