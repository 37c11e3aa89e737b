"""The semantic layer: a per-replica FAISS view of the durable entries.

A lookup that the exact layer missed is answered here when an entry of the
same scope (:mod:`services.cache.scope`: same tenant, model, system prompt,
earlier turns, parameters and tools) asked a question close enough to this one
that its answer may be served. Three steps:

1. **Embed** the last user message with the configured packaged model
   (:mod:`services.common.embeddings`).
2. **Search** the scope's own FAISS index for the nearest few entries (inner
   product of L2-normalised vectors, i.e. cosine). A scope's index is exact
   (``IndexFlatIP``) while small and becomes HNSW (``IndexHNSWFlat``) once it
   holds ``hnsw_from`` entries; ``bench/cache_scale.py`` measured where exact
   search stops being fast enough.
3. **Judge** each candidate, nearest first (:class:`Judge`, by default
   :class:`services.cache.verify.CacheJudge`): the similarity must reach a
   floor, the guards must pass (numbers, negation, opposites) and the
   verifier must find the two prompts ask the same question. The first
   accepted candidate that still exists in Redis is the match.

Durability and replicas: the vector, the scope and the compared text are
fields of the entry in Redis (:mod:`services.cache.store`). On start a replica
scans the entries and builds its indexes; after that it follows the
``cache:changes`` stream, where every replica announces the entries it added
and deleted, so replicas converge. An entry that expired or was deleted
without this replica hearing of it is found missing when fetched, which is a
miss, and is dropped from the view then. Losing the Redis connection makes
the follower rebuild from scratch once Redis answers again.

Deleted vectors are tombstoned (HNSW cannot remove) and a scope's index is
rebuilt from its live vectors when tombstones outnumber live entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Protocol

import faiss
import numpy as np
from redis import exceptions as redis_exc

from orchestra.cache.v1 import cache_service_pb2
from services.cache import scope as scopes
from services.cache import verify
from services.cache.config import CacheConfig
from services.cache.keys import NormalisedKey
from services.cache.layers import Exploration, Match, MatchKind
from services.cache.store import Entry, EntryStore, SemanticFields
from services.common.embeddings import Embedder
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

NEIGHBOURS = 4  # candidates judged per lookup
_MAX_OVERFETCH = 64  # extra neighbours fetched to skip deleted ones
_HNSW_M = 32
_HNSW_EF_SEARCH = 128  # bench/cache_scale.py at 1M: recall@1 0.79 vs 0.72 at 64, p99 1.1 ms
_FOLLOW_BLOCK_MS = 1000
_RECONNECT_SECONDS = 1.0


class Judge(Protocol):
    """Decides which cached entries may answer a query."""

    def accepted(
        self, query: str, candidates: Sequence[tuple[str, float]], threshold: float
    ) -> list[int]:
        """The indices of the candidates that may answer ``query``, in order.

        Args:
            query: The new request's compared text.
            candidates: (an entry's compared text, its cosine similarity),
                nearest first.
            threshold: The caller's threshold (0: the configured policy).
        """
        ...


def judge_for(config: CacheConfig, embedder: Embedder) -> verify.CacheJudge:
    """The judge the configuration asks for (:mod:`services.cache.verify`)."""
    policy = verify.Policy(
        mode=verify.Mode(config.semantic_mode),
        threshold=config.similarity_threshold,
        cut=config.verifier_cut,
        delta=config.wrong_answer_bound,
        model=config.embedding_model,
    )
    return verify.CacheJudge(verify.Verifier(policy, embedder))


@dataclasses.dataclass
class _Item:
    entry_id: str
    text: str
    expires_ms: int  # 0: no expiry known


class ScopeIndex:
    """The FAISS index of one scope, with its entries' ids and texts."""

    def __init__(self, dim: int, hnsw_from: int) -> None:
        self._dim = dim
        self._hnsw_from = hnsw_from
        self._index: faiss.IndexIDMap2 = _flat(dim)
        self.hnsw = False
        self._items: dict[int, _Item] = {}
        self._by_entry: dict[str, int] = {}
        self._next = 0
        self._tombstones = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def faiss_index(self) -> faiss.Index:
        """The FAISS index itself (for measuring it)."""
        return self._index

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._by_entry

    def add(self, entry_id: str, text: str, vector: np.ndarray, expires_ms: int) -> None:
        """Adds an entry (replacing one with the same id)."""
        self.extend([entry_id], [text], vector.reshape(1, self._dim), [expires_ms])

    def extend(
        self,
        entry_ids: Sequence[str],
        texts: Sequence[str],
        vectors: np.ndarray,
        expires_ms: Sequence[int],
    ) -> None:
        """Adds many entries at once (one FAISS call: how a view is built on start)."""
        for entry_id in entry_ids:
            if entry_id in self._by_entry:
                self.remove(entry_id)
        first = self._next
        self._next += len(entry_ids)
        ids = np.arange(first, self._next, dtype=np.int64)
        if not self.hnsw and len(self._items) + len(entry_ids) >= self._hnsw_from:
            self._rebuild(hnsw=True)
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        for n, entry_id, text, expires in zip(ids, entry_ids, texts, expires_ms, strict=True):
            self._items[int(n)] = _Item(entry_id, text, expires)
            self._by_entry[entry_id] = int(n)

    def remove(self, entry_id: str) -> bool:
        """Drops an entry; true if it was here."""
        n = self._by_entry.pop(entry_id, None)
        if n is None:
            return False
        del self._items[n]
        self._tombstones += 1
        if self._tombstones > max(256, len(self._items)):
            self._rebuild(hnsw=self.hnsw)
        return True

    def search(self, vector: np.ndarray, k: int, now_ms: int) -> list[tuple[float, _Item]]:
        """The ``k`` nearest live entries, nearest first, with their cosine similarity."""
        if not self._items:
            return []
        # Deleted entries still sit in the index: ask for a few more to make up
        # for them, but never more than _MAX_OVERFETCH (tombstones can number
        # as many as the live entries before a rebuild).
        wanted = min(k + min(self._tombstones, _MAX_OVERFETCH), self._index.ntotal)
        sims, ids = self._index.search(vector.reshape(1, self._dim), wanted)
        out: list[tuple[float, _Item]] = []
        for similarity, n in zip(sims[0], ids[0], strict=True):
            item = self._items.get(int(n))
            if item is None or (item.expires_ms and item.expires_ms <= now_ms):
                continue
            out.append((float(similarity), item))
            if len(out) == k:
                break
        return out

    def _rebuild(self, *, hnsw: bool) -> None:
        ids = np.fromiter(self._items, dtype=np.int64, count=len(self._items))
        vectors = np.vstack([self._index.reconstruct(int(n)) for n in ids]) if len(ids) else None
        self._index = _hnsw(self._dim) if hnsw else _flat(self._dim)
        self.hnsw = hnsw
        if vectors is not None:
            self._index.add_with_ids(vectors, ids)
        self._tombstones = 0


def _flat(dim: int) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _hnsw(dim: int) -> faiss.IndexIDMap2:
    inner = faiss.IndexHNSWFlat(dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
    inner.hnsw.efSearch = _HNSW_EF_SEARCH
    return faiss.IndexIDMap2(inner)


class SemanticLayer:
    """Finds an entry whose question is close enough to this one (see module docstring)."""

    kind: MatchKind = cache_service_pb2.MATCH_KIND_SEMANTIC

    def __init__(
        self,
        store: EntryStore,
        embedder: Embedder,
        judge: Judge,
        *,
        hnsw_from: int,
        adaptive: verify.Verifier | None = None,
    ) -> None:
        """Creates the layer (empty until :meth:`start`).

        Args:
            store: The durable entries.
            embedder: The embedding model.
            judge: Decides whether a neighbour may answer.
            hnsw_from: Entries in one scope from which its index is HNSW.
            adaptive: In adaptive mode, the verifier deciding with each
                entry's learned state (hit, miss or explore) instead of the judge.
        """
        self._store = store
        self._embedder = embedder
        self._judge = judge
        self._adaptive = adaptive
        self._hnsw_from = hnsw_from
        self._scopes: dict[tuple[str, str], ScopeIndex] = {}
        self._scope_of: dict[tuple[str, str], str] = {}  # (tenant, entry id) -> scope
        self._follower: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_id = "0-0"

    # --- the Layer protocol ---------------------------------------------------

    async def find(self, key: NormalisedKey, threshold: float) -> Match | Exploration | None:
        """The nearest accepted entry of ``key``'s scope, an exploration, or None."""
        semantic = scopes.split(key)
        if semantic is None:
            return None
        index = self._scopes.get((semantic.tenant, semantic.scope))
        if index is None or not len(index):
            return None
        found = index.search(self.embed(semantic.text), NEIGHBOURS, _now_ms())
        if self._adaptive is not None and threshold == 0:
            return await self._find_adaptive(self._adaptive, key.tenant, semantic.text, found)
        chosen = self._judge.accepted(
            semantic.text, [(item.text, similarity) for similarity, item in found], threshold
        )
        for i in chosen:
            similarity, item = found[i]
            entry = await self._store.get(key.tenant, item.entry_id)
            if entry is None:  # expired or deleted elsewhere
                self._drop(key.tenant, item.entry_id)
                continue
            return Match(entry=entry, kind=self.kind, similarity=similarity)
        return None

    async def _find_adaptive(
        self,
        adaptive: verify.Verifier,
        tenant: str,
        text: str,
        found: Sequence[tuple[float, _Item]],
    ) -> Match | Exploration | None:
        """Adaptive mode: each candidate is served, explored or passed over by
        the verifier with that entry's learned state."""
        for similarity, item in found:
            state = verify.EntryState.from_json(
                await self._store.adaptive_state(tenant, item.entry_id)
            )
            verdict = adaptive.decide(text, item.text, similarity, state=state).verdict
            if verdict is verify.Verdict.EXPLORE:
                return Exploration(item.entry_id)
            if verdict is verify.Verdict.MISS:
                continue
            entry = await self._store.get(tenant, item.entry_id)
            if entry is None:
                self._drop(tenant, item.entry_id)
                continue
            return Match(entry=entry, kind=self.kind, similarity=similarity)
        return None

    async def added(self, key: NormalisedKey, entry: Entry) -> None:
        """Files a stored entry here and tells the other replicas."""
        if entry.semantic is None:
            return
        self._add(entry.tenant, entry.entry_id, entry.semantic, 0)
        await self._store.publish("add", entry.tenant, [entry.entry_id])

    async def removed(self, tenant: str, entry_ids: Sequence[str]) -> None:
        """Drops deleted entries here and tells the other replicas."""
        for entry_id in entry_ids:
            self._drop(tenant, entry_id)
        await self._store.publish("del", tenant, entry_ids)

    async def observe(self, key: NormalisedKey, explored_id: str, fresh: str) -> None:
        """Teaches an explored entry whether its answer would have been right.

        ``fresh`` is the model's answer to ``key``, which explored the entry
        ``explored_id``; they agree when :func:`verify.answers_agree` says so.
        An entry that is gone, of another tenant or of another scope is
        ignored. Best effort: two replicas observing the same entry at once may
        keep only one of the two observations.
        """
        if self._adaptive is None:
            return
        semantic = scopes.split(key)
        if semantic is None:
            return
        entry = await self._store.get(key.tenant, explored_id)
        fields = (await self._store.semantic_fields(key.tenant, [explored_id]))[0]
        if entry is None or fields is None or fields[0].scope != semantic.scope:
            return
        correct = verify.answers_agree(fresh, entry.answer.text, self._embedder)
        probability = self._adaptive.probability(semantic.text, fields[0].text)
        state = verify.EntryState.from_json(
            await self._store.adaptive_state(key.tenant, explored_id)
        )
        state = dataclasses.replace(
            verify.observe(state, probability, correct), explorations=state.explorations + 1
        )
        await self._store.set_adaptive_state(key.tenant, explored_id, state.to_json())

    # --- what the core asks before storing -------------------------------------

    def fields(self, key: NormalisedKey) -> SemanticFields | None:
        """The semantic fields to store with an entry for ``key`` (None: exact only)."""
        semantic = scopes.split(key)
        if semantic is None:
            return None
        vector = self.embed(semantic.text)
        return SemanticFields(scope=semantic.scope, text=semantic.text, vector=vector.tobytes())

    def embed(self, text: str) -> np.ndarray:
        """The embedding of one text, float32, L2-normalised."""
        return np.ascontiguousarray(self._embedder.embed([text])[0], dtype=np.float32)

    # --- the view -------------------------------------------------------------

    @property
    def size(self) -> int:
        """Entries in this replica's view."""
        return len(self._scope_of)

    async def start(self) -> None:
        """Builds the view from Redis, then follows the change stream.

        If Redis is not reachable yet the service still starts (lookups then
        fail with STORE_UNAVAILABLE anyway) and the view is built once it is.
        """
        try:
            await self._rebuild()
            ready = True
        except Unavailable:
            log.warning("semantic cache: Redis unreachable at start; building the view later")
            ready = False
        self._follower = asyncio.create_task(self._follow(ready), name="cache-semantic-follow")

    async def stop(self) -> None:
        """Stops following changes."""
        self._stopping = True
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._follower, 5)

    async def _rebuild(self) -> None:
        started = time.perf_counter()
        # Where to follow from is read first: a change made during the scan is
        # then both scanned and replayed, which is harmless (adds replace).
        latest = await self._store.latest_change()
        self._scopes.clear()
        self._scope_of.clear()
        async for tenant, ids in self._store.scan_tenants():
            await self._load(tenant, ids)
        self._last_id = latest
        log.info(
            "semantic cache view built: %d entries in %d scopes in %.1f s",
            self.size,
            len(self._scopes),
            time.perf_counter() - started,
        )

    async def _load(self, tenant: str, entry_ids: Sequence[str]) -> None:
        now = _now_ms()
        found = await self._store.semantic_fields(tenant, entry_ids)
        by_scope: dict[str, list[tuple[str, SemanticFields, int]]] = {}
        for entry_id, item in zip(entry_ids, found, strict=True):
            if item is None:
                self._drop(tenant, entry_id)
                continue
            fields, ttl_ms = item
            if len(fields.vector) != 4 * self._embedder.dim:
                continue  # stored by a replica with another embedding model
            expires = now + ttl_ms if ttl_ms > 0 else 0
            by_scope.setdefault(fields.scope, []).append((entry_id, fields, expires))
        for scope, items in by_scope.items():
            for entry_id, _, _ in items:
                previous = self._scope_of.get((tenant, entry_id))
                if previous is not None and previous != scope:
                    self._drop(tenant, entry_id)
            index = self._index_for(tenant, scope)
            vectors = np.frombuffer(b"".join(f.vector for _, f, _ in items), dtype=np.float32)
            index.extend(
                [entry_id for entry_id, _, _ in items],
                [f.text for _, f, _ in items],
                vectors.reshape(len(items), self._embedder.dim),
                [expires for _, _, expires in items],
            )
            for entry_id, _, _ in items:
                self._scope_of[(tenant, entry_id)] = scope

    async def _follow(self, ready: bool) -> None:
        if not ready:
            await self._rebuild_when_back()
        while not self._stopping:
            try:
                changes = await self._store.changes_after(self._last_id, _FOLLOW_BLOCK_MS)
                for change_id, op, tenant, entry_id in changes:
                    if op == "add":
                        await self._load(tenant, [entry_id])
                    elif op == "del":
                        self._drop(tenant, entry_id)
                    self._last_id = change_id
            except asyncio.CancelledError:
                raise
            except (redis_exc.ConnectionError, redis_exc.TimeoutError, OSError) as exc:
                log.warning("semantic cache lost Redis (%s); rebuilding when it is back", exc)
                await self._rebuild_when_back()
            except Exception:
                log.exception("semantic cache follower failed; rebuilding")
                await self._rebuild_when_back()

    async def _rebuild_when_back(self) -> None:
        while not self._stopping:
            await asyncio.sleep(_RECONNECT_SECONDS)
            try:
                await self._rebuild()
                return
            except Exception as exc:  # noqa: BLE001 - keep trying until Redis answers
                log.debug("semantic cache rebuild failed: %s", exc)

    def _add(self, tenant: str, entry_id: str, fields: SemanticFields, expires_ms: int) -> None:
        previous = self._scope_of.get((tenant, entry_id))
        if previous is not None and previous != fields.scope:
            self._drop(tenant, entry_id)
        vector = np.frombuffer(fields.vector, dtype=np.float32)
        self._index_for(tenant, fields.scope).add(entry_id, fields.text, vector, expires_ms)
        self._scope_of[(tenant, entry_id)] = fields.scope

    def _index_for(self, tenant: str, scope: str) -> ScopeIndex:
        index = self._scopes.get((tenant, scope))
        if index is None:
            index = self._scopes[(tenant, scope)] = ScopeIndex(self._embedder.dim, self._hnsw_from)
        return index

    def _drop(self, tenant: str, entry_id: str) -> None:
        scope = self._scope_of.pop((tenant, entry_id), None)
        if scope is None:
            return
        index = self._scopes.get((tenant, scope))
        if index is not None:
            index.remove(entry_id)
            if not len(index):
                del self._scopes[(tenant, scope)]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
