"""Checks the stored log against its own hashes.

:func:`verify` walks the records in index order and recomputes, from the
stored canonical bytes alone, each leaf hash, the hash chain and the
filterable columns; it reports the first index where anything disagrees with
what is stored. That catches an edited, deleted, inserted or reordered record
anywhere but at the very end: a truncated tail leaves a shorter but consistent
chain, which only a signed checkpoint of the log's size can expose.
"""

from __future__ import annotations

import dataclasses

from services.audit import hashing, records
from services.audit.store import AuditStore, StoredRow

_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """The first place the log disagrees with itself.

    Attributes:
        index: The first index at which anything differs.
        reason: What differs there.
    """

    index: int
    reason: str


class _Walk:
    """The state of a walk: the next expected index and the recomputed chain."""

    def __init__(self) -> None:
        self.expected = 0
        self.chain = hashing.GENESIS_CHAIN

    def step(self, row: StoredRow) -> Mismatch | None:
        """Checks the next row; advances on success."""
        if row.index != self.expected:
            # A missing index (deleted row) or one out of place.
            return Mismatch(min(row.index, self.expected), f"expected index {self.expected}")
        leaf = hashing.leaf_hash(row.record)
        if leaf != row.leaf_hash:
            return Mismatch(row.index, "leaf hash does not match the record bytes")
        chain = hashing.chain_hash(self.chain, leaf)
        if chain != row.chain_hash:
            return Mismatch(row.index, "chain hash does not follow from its predecessor")
        problem = _columns_problem(row)
        if problem:
            return Mismatch(row.index, problem)
        self.expected += 1
        self.chain = chain
        return None


def _columns_problem(row: StoredRow) -> str:
    """Which filterable column disagrees with the record bytes ("" if none)."""
    try:
        entry = records.entry_from_canonical(row.record)
    except ValueError as exc:
        return str(exc)
    for column in ("event_id", "tenant_id", "event_time", "kind", "actor", "model", "end_user"):
        if getattr(entry, column) != getattr(row, column):
            return f"column {column} does not match the record"
    return ""


async def verify(store: AuditStore, *, batch_size: int = _BATCH) -> Mismatch | None:
    """Walks the whole log and returns its first inconsistency, or None.

    Args:
        store: The log.
        batch_size: Rows read per query.

    Raises:
        Unavailable: STORE_UNAVAILABLE.
    """
    walk = _Walk()
    after = -1
    while True:
        # Reads rows by index, not by position, so a gap shows up as a jump.
        rows = await store.scan(after + 1, _END, batch_size)
        for row in rows:
            mismatch = walk.step(row)
            if mismatch is not None:
                return mismatch
        if len(rows) < batch_size:
            return None
        after = rows[-1].index


_END = 2**63 - 1
