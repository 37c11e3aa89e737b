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

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
from collections.abc import Sequence
from typing import Any

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

    def step_rows(self, rows: Sequence[Any]) -> Mismatch | None:
        """Checks the next database rows in order (index, hashes, chain, columns, checkpoints).

        Args:
            rows: Rows of :meth:`AuditStore.scan_for_verify` (event_time as
                microseconds since the epoch).
        """
        sha256 = hashlib.sha256
        expected = self.expected
        chain = self.chain
        leaves: list[bytes] = []
        problem: Mismatch | None = None
        for row in rows:
            index, raw, stored_leaf, stored_chain = row[0], row[8], row[9], row[10]
            if index != expected:
                # A missing index (deleted row) or one out of place.
                problem = Mismatch(min(index, expected), f"expected index {expected}")
                break
            leaf = sha256(b"\x00" + raw).digest()
            if leaf != stored_leaf:
                problem = Mismatch(index, "leaf hash does not match the record bytes")
                break
            next_chain = sha256(chain + leaf).digest()
            if next_chain != stored_chain:
                problem = Mismatch(index, "chain hash does not follow from its predecessor")
                break
            if not _columns_agree(row):
                reason = _columns_problem(_stored(row))
                if reason:
                    problem = Mismatch(index, reason)
                    break
            chain = next_chain
            leaves.append(leaf)
            expected += 1
        self.chain = chain
        # Checkpoints the good rows reach come first: they may expose an
        # earlier index than the bad row.
        return self.add_leaves(leaves) or problem

    def add_leaves(self, leaves: Sequence[bytes]) -> Mismatch | None:
        """Adds the next (already checked) leaf hashes; checks each checkpoint met."""
        done = 0
        while done < len(leaves):
            take = len(leaves) - done
            if self._next < len(self._checkpoints):
                # Checkpoint sizes grow strictly, so the next one is ahead.
                take = min(take, self._checkpoints[self._next].tree_size - self.frontier.size)
            self.frontier.extend(leaves[done : done + take])
            done += take
            self.expected += take
            mismatch = self._met()
            if mismatch is not None:
                return mismatch
        return None

    def add_leaf(self, leaf: bytes) -> Mismatch | None:
        """Adds the next (already checked) leaf hash to the tree; checks a checkpoint there."""
        return self.add_leaves([leaf])

    def _met(self) -> Mismatch | None:
        """Checks the checkpoints at the current size."""
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


def _columns_agree(row: Sequence[Any]) -> bool:
    """The fast path of :func:`_columns_problem`: True only if every column matches.

    ``row`` is a :meth:`AuditStore.scan_for_verify` row. It parses the record
    once and compares raw fields; anything unusual goes to the full path,
    which names the problem.
    """
    record = records.AuditRecord()
    try:
        record.ParseFromString(row[8])
    except DecodeError:
        return False
    if not record.HasField("event_time"):
        return False
    stamp = record.event_time
    chat = record.chat
    return (
        record.event_id == row[1]
        and record.tenant_id == row[2]
        and stamp.seconds * 1_000_000 + stamp.nanos // 1000 == row[3]
        and record.kind == row[4]
        and record.actor == row[5]
        and chat.model == row[6]
        and chat.attribution.end_user == row[7]
        and record.kind in _KINDS
    )


def _stored(row: Sequence[Any]) -> StoredRow:
    """A scan_for_verify row as a StoredRow (for the full column check)."""
    when = _EPOCH + datetime.timedelta(microseconds=row[3])
    return StoredRow(row[0], row[1], row[2], when, *row[4:])


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
    start = 0
    # Reads the next batch while this one is checked, so PostgreSQL and
    # Python work at once. Rows are read by index, not by position, so a gap
    # shows up as a jump.
    pending = asyncio.ensure_future(store.scan_for_verify(start, end, batch_size))
    try:
        while True:
            rows = await pending
            if len(rows) == batch_size:
                start = rows[-1][0] + 1
                pending = asyncio.ensure_future(store.scan_for_verify(start, end, batch_size))
                await asyncio.sleep(0)  # let it send the query
            mismatch = walk.step_rows(rows)
            if mismatch is not None:
                return mismatch
            if len(rows) < batch_size:
                return walk.finish() or (await _uncovered(store) if whole else None)
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending


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
