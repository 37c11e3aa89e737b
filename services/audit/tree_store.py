"""The Merkle tree and checkpoints in PostgreSQL (see migrations/002_merkle.sql).

The sequencer (:meth:`TreeStore.extend`, called by ``AuditStore.append`` under
the sequencer lock, in the append's transaction) reads the tree's right edge,
adds the new leaves, writes every subtree they complete and a signed
checkpoint of the new size. Proofs then fold at most ~log2(n)^2 cached hashes
read in one query, so their cost hardly grows with the log.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
from google.protobuf import timestamp_pb2

from orchestra.audit.v1 import audit_service_pb2 as pb
from orchestra.common.v1 import errors_pb2
from services.audit import merkle
from services.audit.signing import Signer
from services.common.errors import Internal
from services.common.stores import row

Conn = Any  # an asyncpg connection or pool (both have fetch/execute)

_PIECES = """
SELECT 0::smallint AS level, index AS position, leaf_hash AS hash
  FROM audit.records WHERE index = ANY($1::bigint[])
UNION ALL
SELECT s.level, s.position, s.hash
  FROM audit.subtrees s
  JOIN unnest($2::smallint[], $3::bigint[]) AS k(level, position)
    ON s.level = k.level AND s.position = k.position
"""

MIN_LEVEL = 3
"""The lowest stored subtree level: smaller subtrees (up to 4 leaves) are
recomputed from leaf hashes, which keeps the table at n/8 rows instead of n."""

_CHECKPOINT_COLUMNS = "tree_size, root_hash, unix_time, signature, key_id"


@dataclasses.dataclass(frozen=True)
class StoredCheckpoint:
    """A signed tree head as stored.

    Attributes:
        tree_size: Records covered.
        root_hash: Their Merkle tree hash.
        unix_time: Signing time, whole seconds since the epoch.
        signature: Ed25519 over ``signing.note(tree_size, root_hash, unix_time)``.
        key_id: The signing key's fingerprint.
    """

    tree_size: int
    root_hash: bytes
    unix_time: int
    signature: bytes
    key_id: str

    def to_proto(self) -> pb.Checkpoint:
        """The checkpoint as the API returns it."""
        return pb.Checkpoint(
            tree_size=self.tree_size,
            root_hash=self.root_hash,
            create_time=timestamp_pb2.Timestamp(seconds=self.unix_time),
            signature=self.signature,
            key_id=self.key_id,
        )


def _checkpoint(row: asyncpg.Record) -> StoredCheckpoint:
    return StoredCheckpoint(
        row["tree_size"],
        bytes(row["root_hash"]),
        row["unix_time"],
        bytes(row["signature"]),
        row["key_id"],
    )


async def read_pieces(
    conn: Conn, pieces: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], bytes]:
    """The hashes of aligned subtrees ``(level, position)``, in one query.

    Raises:
        Internal: A piece is missing (the cache is behind the records or damaged).
    """
    wanted = set(pieces)
    # Subtrees below MIN_LEVEL are not stored: they are hashed from their leaves.
    low = [(lv, p) for lv, p in wanted if lv < MIN_LEVEL]
    leaves = {i for lv, p in low for i in range(p << lv, (p + 1) << lv)}
    inner = [(lv, p) for lv, p in wanted if lv >= MIN_LEVEL]
    rows = await conn.fetch(_PIECES, sorted(leaves), [lv for lv, _ in inner], [p for _, p in inner])
    found = {(r["level"], r["position"]): bytes(r["hash"]) for r in rows}
    for lv, p in low:
        hashes = [found.get((0, i)) for i in range(p << lv, (p + 1) << lv)]
        if all(h is not None for h in hashes):
            found[lv, p] = merkle.root_of_leaf_hashes([h for h in hashes if h is not None])
    if not wanted <= found.keys():
        missing = sorted(wanted - found.keys())[:3]
        raise Internal(
            errors_pb2.ERROR_REASON_INTERNAL,
            f"the Merkle tree cache lacks subtrees {missing}",
            metadata={"missing": str(missing)},
        )
    return {piece: found[piece] for piece in wanted}


class TreeStore:
    """Writes the tree as the log grows, reads checkpoints and proofs."""

    def __init__(self, pool: asyncpg.Pool, signer: Signer) -> None:
        self._pool = pool
        self.signer = signer

    async def extend(self, conn: Conn, size: int, leaves: Sequence[bytes]) -> StoredCheckpoint:
        """Adds ``leaves`` after the first ``size`` and signs a checkpoint of the result.

        The caller holds the sequencer lock and its transaction; ``size`` must be
        the latest checkpoint's size (the caller reads leaves it lacks from
        ``audit.records`` first, see ``AuditStore``).
        """
        edge = merkle.edge_pieces(size)
        hashes = await read_pieces(conn, edge) if edge else {}
        frontier = merkle.Frontier(size, [hashes[p] for p in edge])
        completed: list[tuple[int, int, bytes]] = []
        for leaf in leaves:
            completed.extend(c for c in frontier.append(leaf) if c[0] >= MIN_LEVEL)
        if completed:
            await conn.execute(
                "INSERT INTO audit.subtrees (level, position, hash)"
                " SELECT * FROM unnest($1::smallint[], $2::bigint[], $3::bytea[])",
                [c[0] for c in completed],
                [c[1] for c in completed],
                [c[2] for c in completed],
            )
        now = int(time.time())
        root = frontier.root()
        checkpoint = StoredCheckpoint(
            frontier.size, root, now, self.signer.sign(frontier.size, root, now), self.signer.key_id
        )
        await conn.execute(
            f"INSERT INTO audit.checkpoints ({_CHECKPOINT_COLUMNS}) VALUES ($1, $2, $3, $4, $5)",
            *row(checkpoint),
        )
        return checkpoint

    async def latest(self, conn: Conn | None = None) -> StoredCheckpoint | None:
        """The newest checkpoint, or None for an empty log."""
        row = await (conn or self._pool).fetchrow(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM audit.checkpoints ORDER BY tree_size DESC LIMIT 1"
        )
        return None if row is None else _checkpoint(row)

    async def checkpoints(self, after_size: int, limit: int) -> list[StoredCheckpoint]:
        """Up to ``limit`` checkpoints with tree_size > ``after_size``, oldest first."""
        rows = await self._pool.fetch(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM audit.checkpoints WHERE tree_size > $1"
            " ORDER BY tree_size LIMIT $2",
            after_size,
            limit,
        )
        return [_checkpoint(r) for r in rows]

    async def _hashes(self, ranges: Sequence[merkle.Range]) -> list[bytes]:
        split = [merkle.aligned_pieces(a, b) for a, b in ranges]
        found = await read_pieces(self._pool, (p for pieces in split for p in pieces))
        return [merkle.fold([found[p] for p in pieces]) for pieces in split]

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """The audit path of leaf ``index`` in the tree of ``size`` (<= the log) leaves."""
        return await self._hashes(merkle.inclusion_ranges(index, size))

    async def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """The consistency proof between trees of ``first`` and ``second`` leaves."""
        return await self._hashes(merkle.consistency_ranges(first, second))

    async def root(self, size: int) -> bytes:
        """MTH of the first ``size`` leaves (any size up to the log's)."""
        if size == 0:
            return merkle.EMPTY_ROOT
        [root] = await self._hashes([(0, size)])
        return root
