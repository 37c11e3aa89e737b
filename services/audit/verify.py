"""Checks the stored log against its own hashes and its signed checkpoints.

:func:`verify` walks the records in index order and recomputes, from the
stored canonical bytes alone, each leaf hash, the hash chain, the filterable
columns and the Merkle tree; at every checkpoint's size it compares the
recomputed root with the signed one and checks the Ed25519 signature. It
reports the first index where anything disagrees:

* a record that disagrees with its own hashes or columns: that record's index;
* a checkpoint whose root differs (e.g. a record rewritten together with its
  leaf and chain hashes): the first index that checkpoint newly covers (the
  previous checkpoint's size), since only that batch can hold the change;
* a checkpoint with a bad signature or unknown key: likewise;
* a log shorter than a checkpoint (a cut tail): the first missing index;
* records after the latest checkpoint (a checkpoint deleted, or rows inserted
  behind the service's back): the first uncovered index.

The walk stops at the latest checkpoint read when it starts, so appends that
commit meanwhile do not disturb it. The subtree cache (``audit.subtrees``) is
not trusted: proofs built from a damaged cache fail the client's check.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from orchestra.audit.v1 import audit_service_pb2
from services.audit import hashing, merkle, records, signing
from services.audit.store import AuditStore, StoredRow
from services.audit.tree_store import StoredCheckpoint

_BATCH = 1000
_KINDS = (audit_service_pb2.RECORD_KIND_CHAT, audit_service_pb2.RECORD_KIND_ADMIN)


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """The first place the log disagrees with itself or its checkpoints.

    Attributes:
        index: The first index at which anything differs.
        reason: What differs there.
        checkpoint: The tree size of the checkpoint that exposed it, if one did.
    """

    index: int
    reason: str
    checkpoint: int | None = None


class Walk:
    """Recomputes the log record by record and checks each checkpoint on the way.

    Args:
        checkpoints: The checkpoints to check, oldest first.
        public_key: The log's key; None skips signature checks.
    """

    def __init__(
        self, checkpoints: Sequence[StoredCheckpoint], public_key: Ed25519PublicKey | None
    ) -> None:
        self.expected = 0
        self.chain = hashing.GENESIS_CHAIN
        self.frontier = merkle.Frontier()
        self._checkpoints = list(checkpoints)
        self._next = 0  # the next checkpoint to meet
        self._covered = 0  # the size of the last checkpoint met
        self._key = public_key
        self._key_id = None if public_key is None else signing.key_id(public_key)

    def step(self, row: StoredRow) -> Mismatch | None:
        """Checks the next database row (index, hashes, chain, columns, checkpoints)."""
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
        self.chain = chain
        return self.add_leaf(leaf)

    def add_leaf(self, leaf: bytes) -> Mismatch | None:
        """Adds the next (already checked) leaf hash to the tree; checks a checkpoint there."""
        self.frontier.append(leaf)
        self.expected += 1
        while self._next < len(self._checkpoints):
            checkpoint = self._checkpoints[self._next]
            if checkpoint.tree_size != self.frontier.size:
                break
            mismatch = self._check(checkpoint)
            if mismatch is not None:
                return mismatch
            self._covered = checkpoint.tree_size
            self._next += 1
        return None

    @property
    def covered(self) -> int:
        """The size of the last checkpoint that verified."""
        return self._covered

    def check_at(self, checkpoint: StoredCheckpoint) -> Mismatch | None:
        """Checks a checkpoint met in a stream: it must cover exactly the records so far."""
        if checkpoint.tree_size != self.frontier.size:
            return Mismatch(
                min(checkpoint.tree_size, self.frontier.size),
                f"checkpoint {checkpoint.tree_size} found after {self.frontier.size} records",
                checkpoint.tree_size,
            )
        mismatch = self._check(checkpoint)
        if mismatch is None:
            self._covered = checkpoint.tree_size
        return mismatch

    def _check(self, checkpoint: StoredCheckpoint) -> Mismatch | None:
        size = checkpoint.tree_size

        def bad(reason: str) -> Mismatch:
            return Mismatch(self._covered, f"checkpoint {size}: {reason}", size)

        if checkpoint.root_hash != self.frontier.root():
            return bad(f"root does not match records {self._covered}..{size - 1}")
        if self._key is None:
            return None
        if checkpoint.key_id != self._key_id:
            return bad(f"signed by key {checkpoint.key_id}, expected {self._key_id}")
        if not signing.verify_note(
            self._key, size, checkpoint.root_hash, checkpoint.unix_time, checkpoint.signature
        ):
            return bad("signature does not verify")
        return None

    def finish(self) -> Mismatch | None:
        """After the last record: a checkpoint beyond it means the tail was cut."""
        if self._next < len(self._checkpoints):
            size = self._checkpoints[self._next].tree_size
            return Mismatch(
                self.expected,
                f"the log ends at {self.expected} records but checkpoint {size} covers {size}",
                size,
            )
        return None


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)


def _columns_agree(row: StoredRow) -> bool:
    """The fast path of :func:`_columns_problem`: True only if every column matches.

    It parses the record once and compares raw fields (the full path also
    re-hashes and builds datetimes, twice the cost); anything unusual goes to
    the full path, which names the problem.
    """
    record = records.AuditRecord()
    try:
        record.ParseFromString(row.record)
    except DecodeError:
        return False
    if not record.HasField("event_time"):
        return False
    stamp = record.event_time
    micros = stamp.seconds * 1_000_000 + stamp.nanos // 1000
    return (
        record.event_id == row.event_id
        and record.tenant_id == row.tenant_id
        and record.kind == row.kind
        and record.actor == row.actor
        and record.chat.model == row.model
        and record.chat.attribution.end_user == row.end_user
        and micros == (row.event_time - _EPOCH) // _MICROSECOND
        and record.kind in _KINDS
    )


def _columns_problem(row: StoredRow) -> str:
    """Which filterable column disagrees with the record bytes ("" if none)."""
    if _columns_agree(row):
        return ""
    try:
        entry = records.entry_from_canonical(row.record)
    except ValueError as exc:
        return str(exc)
    for column in ("event_id", "tenant_id", "event_time", "kind", "actor", "model", "end_user"):
        if getattr(entry, column) != getattr(row, column):
            return f"column {column} does not match the record"
    return ""


async def verify(
    store: AuditStore,
    *,
    batch_size: int = _BATCH,
    public_key: Ed25519PublicKey | None = None,
    end: int | None = None,
) -> Mismatch | None:
    """Walks the log from index 0 and returns its first inconsistency, or None.

    Args:
        store: The log.
        batch_size: Rows read per query.
        public_key: The checkpoint signing key; None checks roots but not signatures.
        end: Stop after this many records (checking checkpoints up to it);
            None: the latest checkpoint's size, or every record if there is none.

    Raises:
        Unavailable: STORE_UNAVAILABLE.
    """
    whole = end is None
    latest = await store.tree.latest()
    if end is None:
        end = latest.tree_size if latest is not None else _END
    checkpoints = [c for c in await store.tree.checkpoints(0, _END) if c.tree_size <= end]
    walk = Walk(checkpoints, public_key)
    after = -1
    while True:
        # Reads rows by index, not by position, so a gap shows up as a jump.
        rows = await store.scan(after + 1, end, batch_size)
        for row in rows:
            mismatch = walk.step(row)
            if mismatch is not None:
                return mismatch
        if len(rows) < batch_size:
            return walk.finish() or (await _uncovered(store) if whole else None)
        after = rows[-1].index


async def _uncovered(store: AuditStore) -> Mismatch | None:
    """Records no checkpoint covers: a deleted checkpoint, or rows added behind the service.

    Reads the log's size before the latest checkpoint: an append commits its
    records and their checkpoint together, so a live log is never flagged.
    """
    size = await store.size()
    latest = await store.tree.latest()
    covered = 0 if latest is None else latest.tree_size
    if size > covered:
        return Mismatch(
            covered, f"records {covered}..{size - 1} are not covered by a signed checkpoint"
        )
    return None


END = 2**62
_END = END
