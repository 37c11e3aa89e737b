"""What the cache does, independent of gRPC: look up, store, invalidate, count.

The servicer (:mod:`services.cache.cache_service`) authenticates the caller and
settles the tenant; everything here trusts the tenant it is given and checks
the rest of the request.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from orchestra.cache.v1 import cache_service_pb2
from services.cache import keys, policy
from services.cache.config import CacheConfig
from services.cache.keys import invalid
from services.cache.layers import ExactLayer, Exploration, Layer, Match
from services.cache.semantic import SemanticLayer
from services.cache.stats import Counters, LatencyWindow, StatsStore
from services.cache.store import Entry, EntryStore
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

MAX_LABEL_LENGTH = 256  # request ids and end-user ids


@dataclasses.dataclass(frozen=True)
class StoreOutcome:
    """What Store did.

    Attributes:
        stored: Whether an entry was written.
        entry_id: Its id ("" when not stored).
        skip_reason: Why it was not stored ("" when stored).
    """

    stored: bool
    entry_id: str = ""
    skip_reason: str = ""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A tenant's statistics.

    Attributes:
        counters: The durable counters.
        entries: Entries now held.
        bytes: Bytes of their answers.
        lookup_p50_us: Median lookup latency on this replica.
        lookup_p99_us: 99th-percentile lookup latency on this replica.
    """

    counters: Counters
    entries: int
    bytes: int
    lookup_p50_us: int
    lookup_p99_us: int


class Cache:
    """The response cache over durable entries and a list of lookup layers."""

    def __init__(
        self,
        store: EntryStore,
        stats: StatsStore,
        config: CacheConfig,
        semantic: SemanticLayer | None = None,
    ) -> None:
        """Creates the cache.

        Args:
            store: The durable entries.
            stats: The durable counters.
            config: Eligibility and lifetime settings.
            semantic: The semantic layer, asked after the exact one (None:
                exact matches only).
        """
        self._store = store
        self._stats = stats
        self._config = config
        self._semantic = semantic
        self._layers: list[Layer] = [ExactLayer(store)]
        if semantic is not None:
            self._layers.append(semantic)
        self._latency = LatencyWindow(config.latency_window)

    async def lookup(
        self, key: cache_service_pb2.CacheKey, *, exact_only: bool, threshold: float
    ) -> Match | Exploration | None:
        """Finds the answer for ``key``; None (or an exploration) is a miss.

        Raises:
            InvalidArgument: EMPTY_MESSAGES, or INVALID_FIELD for a malformed
                key or a threshold outside 0 to 1.
            Unavailable: STORE_UNAVAILABLE when Redis is unreachable.
        """
        started = time.perf_counter_ns()
        if not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
            raise invalid("similarity_threshold", "similarity_threshold must be between 0 and 1")
        normalised = keys.normalise(key)
        match = None
        for layer in self._layers:
            if exact_only and layer.kind != cache_service_pb2.MATCH_KIND_EXACT:
                continue
            match = await layer.find(normalised, threshold)
            if match is not None:
                break
        hit = match if isinstance(match, Match) else None
        # Counted in memory and sent to Redis in batches (services.cache.stats).
        self._stats.count_lookup(
            normalised.tenant,
            hit.kind if hit else cache_service_pb2.MATCH_KIND_UNSPECIFIED,
            hit.entry.answer if hit else None,
            _now_ms(),
        )
        self._latency.observe(normalised.tenant, (time.perf_counter_ns() - started) // 1000)
        return match

    async def store(
        self,
        key: cache_service_pb2.CacheKey,
        answer: cache_service_pb2.CachedAnswer | None,
        *,
        request_id: str,
        end_user: str,
        ttl_seconds: int,
        explored_entry_id: str = "",
    ) -> StoreOutcome:
        """Stores ``answer`` under ``key`` if it is eligible.

        Idempotent: the same key always maps to the same entry; storing it
        again replaces the answer and restarts its lifetime.

        Raises:
            InvalidArgument: A malformed key, a missing or malformed answer, a
                negative TTL or an over-long id.
            Unavailable: STORE_UNAVAILABLE when Redis is unreachable.
        """
        normalised = keys.normalise(key)
        answer = _checked_answer(answer)
        _check_label(request_id, "request_id")
        _check_label(end_user, "end_user")
        if explored_entry_id and not keys.is_digest(explored_entry_id):
            raise invalid("explored_entry_id", "explored_entry_id must be 64 hex digits")
        if ttl_seconds < 0:
            raise invalid("ttl_seconds", "ttl_seconds must not be negative")
        entry = Entry(
            tenant=normalised.tenant,
            entry_id=normalised.digest,
            model=normalised.model,
            end_user=end_user,
            request_id=request_id,
            created_ms=_now_ms(),
            answer=answer,
        )
        size = len(entry.serialised_answer())
        reason = policy.skip_reason(key.generation, answer, size, self._config)
        if reason is not None:
            return StoreOutcome(stored=False, skip_reason=reason.value)
        if self._semantic is not None:
            entry = dataclasses.replace(entry, semantic=self._semantic.fields(normalised))
        _, evicted = await self._store.put(
            entry,
            policy.ttl_seconds(ttl_seconds, self._config),
            max_entries=self._config.max_entries_per_tenant,
            max_bytes=self._config.max_bytes_per_tenant,
        )
        for layer in self._layers:
            await layer.added(normalised, entry)
            if evicted:
                await layer.removed(normalised.tenant, evicted)
        if explored_entry_id and self._semantic is not None:
            await self._semantic.observe(normalised, explored_entry_id, answer.text)
        return StoreOutcome(stored=True, entry_id=entry.entry_id)

    async def invalidate(self, tenant: str, request: cache_service_pb2.InvalidateRequest) -> int:
        """Deletes the entries of ``tenant`` that the request selects.

        Returns:
            How many entries were deleted.

        Raises:
            InvalidArgument: INVALID_FIELD when no selector is set or its value
                is empty or malformed.
            Unavailable: STORE_UNAVAILABLE when Redis is unreachable.
        """
        selector = request.WhichOneof("selector")
        if selector is None:
            raise invalid("selector", "set one of all, model, key_prefix, end_user or entry_id")
        if selector == "all":
            if not request.all:
                raise invalid("all", "all must be true; to delete nothing, do not call")
            deleted = await self._store.delete_by_prefix(tenant, "")
        elif selector == "key_prefix":
            prefix = request.key_prefix.lower()
            if not keys.is_hex(prefix) or len(prefix) > keys.DIGEST_LENGTH:
                raise invalid("key_prefix", "key_prefix must be 1 to 64 hex digits")
            deleted = await self._store.delete_by_prefix(tenant, prefix)
        elif selector == "entry_id":
            entry_id = request.entry_id.lower()
            if not keys.is_digest(entry_id):
                raise invalid("entry_id", "entry_id must be 64 hex digits")
            deleted = await self._store.delete_ids(tenant, [entry_id])
        elif selector == "model":
            _check_label(request.model, "model", required=True)
            deleted = await self._store.delete_by_model(tenant, request.model)
        else:
            _check_label(request.end_user, "end_user", required=True)
            deleted = await self._store.delete_by_end_user(tenant, request.end_user)
        for layer in self._layers:
            await layer.removed(tenant, deleted)
        return len(deleted)

    async def flush(self) -> None:
        """Sends the lookups counted in memory (shutdown); logs when Redis refuses."""
        try:
            await self._stats.aclose()
        except Unavailable as exc:
            log.warning("the last cache lookups were not counted: %s", exc.message)

    async def stats(self, tenant: str) -> Snapshot:
        """The tenant's counters, current size and this replica's latencies.

        Raises:
            Unavailable: STORE_UNAVAILABLE when Redis is unreachable.
        """
        counters = await self._stats.read(tenant)  # this replica's lookups included
        entries, size = await self._store.usage(tenant)
        return Snapshot(
            counters=counters,
            entries=entries,
            bytes=size,
            lookup_p50_us=self._latency.percentile(tenant, 0.50),
            lookup_p99_us=self._latency.percentile(tenant, 0.99),
        )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_label(value: str, field: str, *, required: bool = False) -> None:
    if required and not value:
        raise invalid(field, f"{field} must not be empty")
    if len(value) > MAX_LABEL_LENGTH:
        raise invalid(field, f"{field} is longer than {MAX_LABEL_LENGTH} characters")


def _checked_answer(
    answer: cache_service_pb2.CachedAnswer | None,
) -> cache_service_pb2.CachedAnswer:
    if answer is None:
        raise invalid("answer", "answer is required")
    if answer.cost_micro_usd < 0:
        raise invalid("answer.cost_micro_usd", "answer.cost_micro_usd must not be negative")
    for name in ("prompt_tokens", "completion_tokens", "cached_prompt_tokens"):
        if getattr(answer.usage, name) < 0:
            raise invalid(f"answer.usage.{name}", f"answer.usage.{name} must not be negative")
    _check_label(answer.model, "answer.model")
    return answer
