"""The semantic layer: answers a lookup from an entry that asked the same question.

A lookup that the exact layer missed is answered here when an entry of the
same scope (:mod:`services.cache.scope`: same tenant, model, system prompt,
earlier turns, parameters and tools) asked a question close enough to this one
that its answer may be served. Three steps:

1. **Embed** the last user message with the configured packaged model
   (:mod:`services.common.embeddings`).
2. **Search** the scope's own FAISS index for the nearest few entries
   (:mod:`services.cache.scope_index`, cosine similarity; exact while small,
   HNSW once large).
3. **Judge** each candidate, nearest first (:class:`Judge`, by default
   :class:`services.cache.verifier.CacheJudge`): the similarity must reach a
   floor, the guards must pass (numbers, negation, opposites) and the
   verifier must find the two prompts ask the same question. The first
   accepted candidate that still exists in Redis is the match.

The indexes are this replica's view of the durable entries
(:mod:`services.cache.semantic_view`): built from Redis on start and kept in
step with the other replicas through the change stream
(:mod:`services.cache.changes`), on which this layer announces what it adds
and removes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from orchestra.cache.v1 import cache_service_pb2
from services.cache import adaptive as adaptive_state
from services.cache import scope as scopes
from services.cache.changes import ChangeStream
from services.cache.config import CacheConfig
from services.cache.keys import NormalisedKey
from services.cache.layers import Exploration, Match, MatchKind
from services.cache.scope_index import IndexedEntry
from services.cache.semantic_view import SemanticView, now_ms
from services.cache.store import Entry, EntryStore, SemanticFields
from services.cache.verifier import CacheJudge, Mode, Policy, Verdict, Verifier
from services.common.embeddings import Embedder

NEIGHBOURS = 4  # candidates judged per lookup


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


def judge_for(config: CacheConfig, embedder: Embedder) -> CacheJudge:
    """The judge the configuration asks for (:mod:`services.cache.verifier`)."""
    policy = Policy(
        mode=Mode(config.semantic_mode),
        threshold=config.similarity_threshold,
        cut=config.verifier_cut,
        delta=config.wrong_answer_bound,
        model=config.embedding_model,
    )
    return CacheJudge(Verifier(policy, embedder))


class SemanticLayer:
    """Finds an entry whose question is close enough to this one (see module docstring)."""

    kind: MatchKind = cache_service_pb2.MATCH_KIND_SEMANTIC

    def __init__(
        self,
        store: EntryStore,
        changes: ChangeStream,
        embedder: Embedder,
        judge: Judge,
        *,
        hnsw_from: int,
        adaptive: Verifier | None = None,
    ) -> None:
        """Creates the layer (empty until :meth:`start`).

        Args:
            store: The durable entries.
            changes: The change stream the replicas share.
            embedder: The embedding model.
            judge: Decides whether a neighbour may answer.
            hnsw_from: Entries in one scope from which its index is HNSW.
            adaptive: In adaptive mode, the verifier deciding with each
                entry's learned state (hit, miss or explore) instead of the judge.
        """
        self._store = store
        self._changes = changes
        self._embedder = embedder
        self._judge = judge
        self._adaptive = adaptive
        self._view = SemanticView(store, changes, dim=embedder.dim, hnsw_from=hnsw_from)

    # --- the Layer protocol ---------------------------------------------------

    async def find(self, key: NormalisedKey, threshold: float) -> Match | Exploration | None:
        """The nearest accepted entry of ``key``'s scope, an exploration, or None."""
        semantic = scopes.split(key)
        if semantic is None:
            return None
        index = self._view.index(semantic.tenant, semantic.scope)
        if index is None or not len(index):
            return None
        found = index.search(self.embed(semantic.text), NEIGHBOURS, now_ms())
        if self._adaptive is not None and threshold == 0:
            return await self._find_adaptive(self._adaptive, key.tenant, semantic.text, found)
        chosen = self._judge.accepted(
            semantic.text, [(item.text, similarity) for similarity, item in found], threshold
        )
        for i in chosen:
            similarity, item = found[i]
            entry = await self._store.get(key.tenant, item.entry_id)
            if entry is None:  # expired or deleted elsewhere
                self._view.drop(key.tenant, item.entry_id)
                continue
            return Match(entry=entry, kind=self.kind, similarity=similarity)
        return None

    async def _find_adaptive(
        self,
        adaptive: Verifier,
        tenant: str,
        text: str,
        found: Sequence[tuple[float, IndexedEntry]],
    ) -> Match | Exploration | None:
        """Adaptive mode: each candidate is served, explored or passed over by
        the verifier with that entry's learned state."""
        for similarity, item in found:
            state = adaptive_state.EntryState.from_json(
                await self._store.adaptive_state(tenant, item.entry_id)
            )
            verdict = adaptive.decide(text, item.text, similarity, state=state).verdict
            if verdict is Verdict.EXPLORE:
                return Exploration(item.entry_id)
            if verdict is Verdict.MISS:
                continue
            entry = await self._store.get(tenant, item.entry_id)
            if entry is None:
                self._view.drop(tenant, item.entry_id)
                continue
            return Match(entry=entry, kind=self.kind, similarity=similarity)
        return None

    async def added(self, key: NormalisedKey, entry: Entry) -> None:
        """Files a stored entry here and tells the other replicas."""
        if entry.semantic is None:
            return
        self._view.add(entry.tenant, entry.entry_id, entry.semantic, 0)
        await self._changes.publish("add", entry.tenant, [entry.entry_id])

    async def removed(self, tenant: str, entry_ids: Sequence[str]) -> None:
        """Drops deleted entries here and tells the other replicas."""
        for entry_id in entry_ids:
            self._view.drop(tenant, entry_id)
        await self._changes.publish("del", tenant, entry_ids)

    async def observe(self, key: NormalisedKey, explored_id: str, fresh: str) -> None:
        """Teaches an explored entry whether its answer would have been right.

        ``fresh`` is the model's answer to ``key``, which explored the entry
        ``explored_id``; they agree when :func:`services.cache.adaptive.answers_agree` says so.
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
        correct = adaptive_state.answers_agree(fresh, entry.answer.text, self._embedder)
        probability = self._adaptive.probability(semantic.text, fields[0].text)
        state = adaptive_state.EntryState.from_json(
            await self._store.adaptive_state(key.tenant, explored_id)
        )
        state = dataclasses.replace(
            adaptive_state.observe(state, probability, correct), explorations=state.explorations + 1
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
        return self._view.size

    async def start(self) -> None:
        """Builds the view from Redis, then follows the change stream.

        If Redis is not reachable yet the service still starts (lookups then
        fail with STORE_UNAVAILABLE anyway) and the view is built once it is.
        """
        await self._view.start()

    async def stop(self) -> None:
        """Stops following changes."""
        await self._view.stop()
