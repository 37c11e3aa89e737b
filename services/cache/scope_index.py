"""The FAISS index of one scope: add, remove and search its entries' vectors.

A scope's index (inner product of L2-normalised vectors, i.e. cosine) is exact
(``IndexFlatIP``) while small and becomes HNSW (``IndexHNSWFlat``) once it
holds ``hnsw_from`` entries; ``bench/cache_scale.py`` measured where exact
search stops being fast enough. Deleted vectors are tombstoned (HNSW cannot
remove) and the index is rebuilt from its live vectors when tombstones
outnumber live entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import faiss
import numpy as np

_MAX_OVERFETCH = 64  # extra neighbours fetched to skip deleted ones
_HNSW_M = 32
_HNSW_EF_SEARCH = 128  # bench/cache_scale.py at 1M: recall@1 0.79 vs 0.72 at 64, p99 1.1 ms


def use_one_thread() -> None:
    """Makes FAISS search on the calling thread only (call once, at start).

    A query searches one small scope at a time; FAISS's default OpenMP pool
    (a thread per core) costs more in wake-ups and spinning than it saves:
    about a quarter of the cache's CPU per chat in ``bench/overhead.py
    --profile``. The service's other replicas, not threads, are how it scales.
    """
    faiss.omp_set_num_threads(1)


@dataclasses.dataclass
class IndexedEntry:
    """An entry as its scope's index knows it: its id, compared text and expiry."""

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
        self._items: dict[int, IndexedEntry] = {}
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
            self._items[int(n)] = IndexedEntry(entry_id, text, expires)
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

    def search(self, vector: np.ndarray, k: int, now_ms: int) -> list[tuple[float, IndexedEntry]]:
        """The ``k`` nearest live entries, nearest first, with their cosine similarity."""
        if not self._items:
            return []
        # Deleted entries still sit in the index: ask for a few more to make up
        # for them, but never more than _MAX_OVERFETCH (tombstones can number
        # as many as the live entries before a rebuild).
        wanted = min(k + min(self._tombstones, _MAX_OVERFETCH), self._index.ntotal)
        sims, ids = self._index.search(vector.reshape(1, self._dim), wanted)
        out: list[tuple[float, IndexedEntry]] = []
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
