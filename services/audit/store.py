"""The log in PostgreSQL (table ``audit.records``, see migrations/001_init.sql).

Appends are serialised by one sequencer: a transaction-level advisory lock that
every appending transaction, on every replica, takes before it reads the last
record and inserts after it. Indices are therefore gap-free and unique (the
primary key would refuse a duplicate anyway), and each insert chains onto the
committed predecessor. The lock is held for a handful of statements; a
rolled-back append releases it with nothing written.

In the same transaction the sequencer extends the Merkle tree and signs a
checkpoint of the new size (``tree_store.py``), so every committed batch has
its signed tree head. A log whose records predate the tree (or whose
checkpoints lag) is caught up from the stored leaf hashes first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from orchestra.common.v1 import errors_pb2
from services.audit import hashing
from services.audit.bodies import SealedBody
from services.audit.records import Entry
from services.audit.tree_store import TreeStore
from services.common.errors import Internal, Unavailable

log = logging.getLogger(__name__)

# One lock id for the whole log, derived from a name so it cannot collide by
# accident with another service's advisory locks.
SEQUENCER_LOCK = int.from_bytes(
    hashlib.sha256(b"orchestra.audit.sequencer").digest()[:8], "big", signed=True
)

_COLUMNS = (
    "index, event_id, tenant_id, event_time, kind, actor, model, end_user,"
    " record, leaf_hash, chain_hash"
)

_INSERT = f"""
INSERT INTO audit.records ({_COLUMNS})
SELECT * FROM unnest(
    $1::bigint[], $2::text[], $3::text[], $4::timestamptz[], $5::smallint[],
    $6::text[], $7::text[], $8::text[], $9::bytea[], $10::bytea[], $11::bytea[])
"""

_INSERT_BODIES = """
INSERT INTO audit.bodies (event_id, tenant_id, end_user, key_id, sealed, expire_time)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[],
    $6::timestamptz[])
"""

_VERIFY_SCAN = """
SELECT index, event_id, tenant_id, (extract(epoch FROM event_time) * 1000000)::bigint,
    kind, actor, model, end_user, record, leaf_hash, chain_hash
FROM audit.records WHERE index >= $1 AND index < $2 ORDER BY index LIMIT $3
"""

# Failures that say the database is (perhaps briefly) out of reach, as opposed
# to a bug; callers spool and retry on UNAVAILABLE.
_TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


@dataclasses.dataclass(frozen=True)
class Appended:
    """Where a record landed.

    Attributes:
        index: Its position in the log.
        leaf_hash: Its leaf hash as stored.
    """

    index: int
    leaf_hash: bytes


@dataclasses.dataclass(frozen=True)
class RecordFilter:
    """Which records ListRecords returns; empty/None fields match everything.

    Attributes:
        tenant_id: The tenant (always set).
        start_time: Only records at or after this time.
        end_time: Only records before this time.
        kind: Only this ``RecordKind`` (0: any).
        model: Only chats with this model.
        actor: Only this actor.
        end_user: Only chats for this end user.
    """

    tenant_id: str
    start_time: datetime.datetime | None = None
    end_time: datetime.datetime | None = None
    kind: int = 0
    model: str = ""
    actor: str = ""
    end_user: str = ""


@dataclasses.dataclass(frozen=True)
class StoredRow:
    """One row of ``audit.records`` as stored (verification compares every column)."""

    index: int
    event_id: str
    tenant_id: str
    event_time: datetime.datetime
    kind: int
    actor: str
    model: str
    end_user: str
    record: bytes
    leaf_hash: bytes
    chain_hash: bytes


@contextlib.asynccontextmanager
async def store_errors() -> AsyncIterator[None]:
    """Turns "the database is out of reach" into UNAVAILABLE (STORE_UNAVAILABLE)."""
    try:
        yield
    except _TRANSIENT as exc:
        raise Unavailable(
            errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
            f"the audit log's database is unavailable: {exc}",
            retry_after=1.0,
        ) from exc


def _row(record: asyncpg.Record) -> StoredRow:
    # Every query selects _COLUMNS, in StoredRow's field order.
    return StoredRow(*record)


class AuditStore:
    """Reads and appends the log."""

    def __init__(self, pool: asyncpg.Pool, tree: TreeStore) -> None:
        self._pool = pool
        self.tree = tree

    async def append(self, entries: Sequence[Entry]) -> list[Appended]:
        """Appends ``entries`` in order, atomically, with the bodies they carry.

        An entry whose event_id is already in the log (or earlier in
        ``entries``) is not appended again; its original position is returned
        (and its body, if any, is not stored again).

        Returns:
            Where each entry is, in the order given.

        Raises:
            Unavailable: STORE_UNAVAILABLE.
        """

        async def given(_conn: Any) -> Sequence[Entry]:
            return entries

        return await self.append_after(given)

    async def append_after(
        self, step: Callable[[Any], Awaitable[Sequence[Entry]]]
    ) -> list[Appended]:
        """Runs ``step`` under the sequencer lock, then appends what it returns.

        ``step`` gets the transaction's connection: whatever it changes (e.g.
        destroying a subject's keys) commits atomically with the records that
        describe it, or not at all.

        Raises:
            Unavailable: STORE_UNAVAILABLE.
        """
        async with (
            store_errors(),
            self._pool.acquire() as conn,
            # Each statement must see what the previous lock holder committed,
            # whatever the server's default isolation is.
            conn.transaction(isolation="read_committed"),
        ):
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SEQUENCER_LOCK)
            entries = await step(conn)
            known = await self._known(conn, [e.event_id for e in entries])
            head = await conn.fetchrow(
                "SELECT index, chain_hash FROM audit.records ORDER BY index DESC LIMIT 1"
            )
            next_index = 0 if head is None else head["index"] + 1
            chain = hashing.GENESIS_CHAIN if head is None else bytes(head["chain_hash"])
            results: list[Appended] = []
            rows: list[tuple[int, Entry, bytes]] = []
            for entry in entries:
                prior = known.get(entry.event_id)
                if prior is not None:
                    _note_repeat(entry, prior)
                    results.append(prior)
                    continue
                chain = hashing.chain_hash(chain, entry.leaf_hash)
                rows.append((next_index, entry, chain))
                known[entry.event_id] = Appended(next_index, entry.leaf_hash)
                results.append(known[entry.event_id])
                next_index += 1
            if rows:
                await conn.execute(_INSERT, *_columns(rows))
                bodies = [entry.body for _, entry, _ in rows if entry.body is not None]
                if bodies:
                    await conn.execute(_INSERT_BODIES, *_body_columns(bodies))
            size = 0 if head is None else head["index"] + 1
            await self._grow_tree(conn, size, [entry.leaf_hash for _, entry, _ in rows])
        return results

    async def catch_up(self) -> None:
        """Brings the tree and checkpoints up to the records (at start).

        Raises:
            Unavailable: STORE_UNAVAILABLE.
            Internal: The log is shorter than its latest checkpoint.
        """
        async with (
            store_errors(),
            self._pool.acquire() as conn,
            conn.transaction(isolation="read_committed"),
        ):
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SEQUENCER_LOCK)
            size = await conn.fetchval("SELECT coalesce(max(index) + 1, 0) FROM audit.records")
            await self._grow_tree(conn, int(size), [])

    async def _grow_tree(self, conn: Any, size: int, new_leaves: list[bytes]) -> None:
        """Extends the tree from the latest checkpoint to ``size`` + the new leaves."""
        latest = await self.tree.latest(conn)
        covered = 0 if latest is None else latest.tree_size
        if covered > size:
            # Only a rewrite behind the service's back removes records.
            raise Internal(
                errors_pb2.ERROR_REASON_INTERNAL,
                f"the log has {size} records but checkpoint {covered} covers more:"
                " run `orchestra audit verify`",
                metadata={"log_size": str(size), "checkpoint_size": str(covered)},
            )
        lagging: list[bytes] = []
        if covered < size:
            found = await conn.fetch(
                "SELECT leaf_hash FROM audit.records WHERE index >= $1 AND index < $2"
                " ORDER BY index",
                covered,
                size,
            )
            lagging = [bytes(r["leaf_hash"]) for r in found]
        leaves = lagging + new_leaves
        if leaves:
            await self.tree.extend(conn, covered, leaves)

    @staticmethod
    async def _known(
        conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], event_ids: list[str]
    ) -> dict[str, Appended]:
        found = await conn.fetch(
            "SELECT event_id, index, leaf_hash FROM audit.records WHERE event_id = ANY($1::text[])",
            event_ids,
        )
        return {r["event_id"]: Appended(r["index"], bytes(r["leaf_hash"])) for r in found}

    async def find(self, where: RecordFilter, after: int | None, limit: int) -> list[StoredRow]:
        """Up to ``limit`` records matching ``where`` with index > ``after``, oldest first.

        Raises:
            Unavailable: STORE_UNAVAILABLE.
        """
        clauses = ["tenant_id = $1"]
        args: list[Any] = [where.tenant_id]

        def match(clause: str, value: Any) -> None:
            args.append(value)
            clauses.append(clause.format(f"${len(args)}"))

        if after is not None:
            match("index > {}", after)
        if where.start_time is not None:
            match("event_time >= {}", where.start_time)
        if where.end_time is not None:
            match("event_time < {}", where.end_time)
        for column in ("kind", "model", "actor", "end_user"):
            value = getattr(where, column)
            if value:
                match(f"{column} = {{}}", value)
        args.append(limit)
        query = (
            f"SELECT {_COLUMNS} FROM audit.records WHERE {' AND '.join(clauses)}"
            f" ORDER BY index LIMIT ${len(args)}"
        )
        async with store_errors():
            return [_row(r) for r in await self._pool.fetch(query, *args)]

    async def scan(
        self, start: int, end: int, limit: int, tenant_id: str | None = None
    ) -> list[StoredRow]:
        """Up to ``limit`` rows with ``start <= index < end``, in index order.

        Args:
            start: First index, inclusive.
            end: Last index, exclusive.
            limit: At most this many rows.
            tenant_id: Only this tenant's rows; None: every row.

        Raises:
            Unavailable: STORE_UNAVAILABLE.
        """
        query = f"SELECT {_COLUMNS} FROM audit.records WHERE index >= $1 AND index < $2"
        args: list[Any] = [start, end, limit]
        if tenant_id is not None:
            query += " AND tenant_id = $4"
            args.append(tenant_id)
        query += " ORDER BY index LIMIT $3"
        async with store_errors():
            return [_row(r) for r in await self._pool.fetch(query, *args)]

    async def scan_for_verify(self, start: int, end: int, limit: int) -> list[asyncpg.Record]:
        """Like :meth:`scan` but lean, for verification's hot loop.

        Rows are asyncpg records in :class:`StoredRow`'s field order, except
        that ``event_time`` is whole microseconds since the Unix epoch (an int:
        ``extract`` is an exact numeric on PostgreSQL 14+), so no datetime or
        dataclass is built per row.

        Raises:
            Unavailable: STORE_UNAVAILABLE.
        """
        async with store_errors():
            return list(await self._pool.fetch(_VERIFY_SCAN, start, end, limit))

    async def size(self) -> int:
        """The number of records in the log (one past the last index).

        Raises:
            Unavailable: STORE_UNAVAILABLE.
        """
        async with store_errors():
            size = await self._pool.fetchval(
                "SELECT coalesce(max(index) + 1, 0) FROM audit.records"
            )
        return int(size)


def _note_repeat(entry: Entry, prior: Appended) -> None:
    # The contract makes a repeat idempotent, so the original stands; a repeat
    # with different content is a producer bug worth seeing in the logs.
    if prior.leaf_hash != entry.leaf_hash:
        log.warning(
            "event_id %r repeated with different content; keeping index %d",
            entry.event_id,
            prior.index,
        )


def _columns(rows: list[tuple[int, Entry, bytes]]) -> list[list[Any]]:
    return [
        [index for index, _, _ in rows],
        [e.event_id for _, e, _ in rows],
        [e.tenant_id for _, e, _ in rows],
        [e.event_time for _, e, _ in rows],
        [e.kind for _, e, _ in rows],
        [e.actor for _, e, _ in rows],
        [e.model for _, e, _ in rows],
        [e.end_user for _, e, _ in rows],
        [e.canonical for _, e, _ in rows],
        [e.leaf_hash for _, e, _ in rows],
        [chain for _, _, chain in rows],
    ]


def _body_columns(bodies: list[SealedBody]) -> list[list[Any]]:
    return [
        [b.event_id for b in bodies],
        [b.tenant_id for b in bodies],
        [b.end_user for b in bodies],
        [b.key_id for b in bodies],
        [b.sealed for b in bodies],
        [b.expire_time for b in bodies],
    ]
