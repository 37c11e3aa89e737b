"""The lookup layers of the cache: the protocol, and the exact layer.

The durable entries (:mod:`services.cache.store`) are shared; a layer is a way
of finding one for a request. :class:`~services.cache.core.Cache` asks its
layers in order and the first match wins, so the cheap exact layer always goes
first. The semantic layer (:mod:`services.cache.semantic`) implements the same
protocol: ``find`` searches its per-replica FAISS view of the tenant's scope
and fetches the entry from the store; ``added`` and ``removed`` keep that view
in step with writes through this replica and announce them to the other
replicas (a deletion a replica has not heard of shows as an entry that is gone
when fetched, which is a miss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, TypeAlias

from orchestra.cache.v1 import cache_service_pb2
from services.cache.keys import NormalisedKey
from services.cache.store import Entry, EntryStore

MatchKind: TypeAlias = cache_service_pb2.MatchKind.ValueType


@dataclasses.dataclass(frozen=True)
class Match:
    """An entry a layer found.

    Attributes:
        entry: The entry.
        kind: How it matched.
        similarity: Cosine similarity of the match (1 for exact).
    """

    entry: Entry
    kind: MatchKind
    similarity: float


@dataclasses.dataclass(frozen=True)
class Exploration:
    """A near entry that the adaptive policy chose not to serve this time.

    The lookup is a miss; the fresh answer is compared with this entry's when
    it is stored, which teaches the entry (see :mod:`services.cache.adaptive`).

    Attributes:
        entry_id: The entry explored.
    """

    entry_id: str


class Layer(Protocol):
    """One way of finding an entry for a request."""

    kind: MatchKind
    """The kind of match it makes (Lookup's ``exact_only`` skips non-exact layers)."""

    async def find(self, key: NormalisedKey, threshold: float) -> Match | Exploration | None:
        """The entry for ``key``, an exploration, or None.

        Args:
            key: The normalised request.
            threshold: The caller's similarity threshold (0: the configured
                policy); exact layers ignore it.
        """
        ...

    async def added(self, key: NormalisedKey, entry: Entry) -> None:
        """Called after ``entry`` was stored for ``key``."""
        ...

    async def removed(self, tenant: str, entry_ids: Sequence[str]) -> None:
        """Called after these entries of ``tenant`` were deleted."""
        ...


class ExactLayer:
    """Matches a request whose normalised form is identical: one GET by digest."""

    kind: MatchKind = cache_service_pb2.MATCH_KIND_EXACT

    def __init__(self, store: EntryStore) -> None:
        self._store = store

    async def find(self, key: NormalisedKey, threshold: float) -> Match | None:
        """The entry stored under ``key``'s digest, or None."""
        entry = await self._store.get(key.tenant, key.digest)
        return None if entry is None else Match(entry=entry, kind=self.kind, similarity=1.0)

    async def added(self, key: NormalisedKey, entry: Entry) -> None:
        """Nothing to do: the store's entry key is this layer's index."""

    async def removed(self, tenant: str, entry_ids: Sequence[str]) -> None:
        """Nothing to do: the store's entry key is this layer's index."""
