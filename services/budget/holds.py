"""Holds kept in PostgreSQL as well, so that Redis losing its data loses none.

Reserve writes one row per granted hold (``budget.holds``) right after the
Redis script admitted it; Release marks the row released *before* freeing the
Redis hold; Settle's ledger row marks it settled. When Redis comes back empty
(a cold start), :meth:`HoldStore.snapshot` gives, in one consistent
PostgreSQL snapshot, the ledger sums the spent counters are raised to and the
holds still open, which are put back as Redis holds. So after a restart the
counters are never below the ledger, in-flight requests still settle, and
their holds still count against the limits.

The order of writes makes every crash safe: a hold in Redis without its row
(Reserve died before the insert) is settled or released through Redis as
usual; a row whose Redis hold vanished in a flush before the rebuild read it
is caught by Reserve's check that its hold still exists (the Reserve then
gives the row up and answers UNAVAILABLE, and the caller retries).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Sequence

import asyncpg

from services.budget.batching import Batcher
from services.budget.ledger import Db
from services.common.outages import postgres_outage
from services.common.stores import row


@dataclasses.dataclass(frozen=True)
class StoredHold:
    """One granted hold.

    Attributes:
        request_id: The idempotency key.
        tenant_id, team, project, key_id, end_user: Who pays.
        model: "provider/model".
        amount_micro_usd: What is held.
        tokens: Its worst-case tokens.
        counters: The Redis counter keys it holds on.
        reserve_time: When it was admitted.
        expire_time: When the reaper settles it.
    """

    request_id: str
    tenant_id: str
    team: str
    project: str
    key_id: str
    end_user: str
    model: str
    amount_micro_usd: int
    tokens: int
    counters: list[str]
    reserve_time: dt.datetime
    expire_time: dt.datetime


_COLUMNS = [f.name for f in dataclasses.fields(StoredHold)]
# PostgreSQL types of the columns, in order (counters travel as JSON text).
_TYPES = ["text"] * 7 + ["bigint", "bigint", "text", "timestamptz", "timestamptz"]
assert len(_TYPES) == len(_COLUMNS)
_SELECT = f"SELECT {', '.join('h.' + c for c in _COLUMNS)} FROM budget.holds h"
# Hold rows are committed without waiting for the WAL flush (synchronous_commit
# off for that one transaction): ~0.4 ms instead of an fsync (~3 ms here). A
# PostgreSQL crash can lose the last fraction of a second of them, which
# matters only if Redis loses its data at the same moment (the rows are read
# only to rebuild Redis). Ledger rows, the truth, are always flushed.
_NO_FSYNC = "WITH no_fsync AS (SELECT set_config('synchronous_commit', 'off', true))"
# Rows are kept this long after their expiry (late settles, idempotent retries).
KEEP_AFTER_EXPIRY = dt.timedelta(days=1)


def _hold(row: asyncpg.Record) -> StoredHold:
    values = {c: row[c] for c in _COLUMNS}
    values["counters"] = list(values["counters"])
    return StoredHold(**values)


class HoldStore:
    """The ``budget.holds`` table."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._batcher: Batcher[StoredHold, None] = Batcher(self._add_many)
        self._give_ups: Batcher[str, None] = Batcher(self._give_up_many)

    async def add(self, hold: StoredHold) -> None:
        """Records a granted hold (again open, if a failed Reserve had given it up).

        Concurrent calls are written together (:mod:`services.budget.batching`).
        """
        await self._batcher.submit(hold)

    @postgres_outage
    async def _add_many(self, holds: Sequence[StoredHold]) -> list[None]:
        unique = {h.request_id: h for h in holds}  # one row per id and statement
        values = [row(h) for h in unique.values()]
        columns = [list(c) for c in zip(*values, strict=True)]
        index = _COLUMNS.index("counters")
        # An array of arrays cannot be unnested row by row: counters go as JSON.
        columns[index] = [json.dumps(c) for c in columns[index]]
        selected = ", ".join(
            f"ARRAY(SELECT jsonb_array_elements_text({c}::jsonb))" if c == "counters" else c
            for c in _COLUMNS
        )
        params = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_TYPES))
        await self._pool.execute(
            f"{_NO_FSYNC} INSERT INTO budget.holds ({', '.join(_COLUMNS)})"
            f" SELECT {selected} FROM unnest({params}) AS v({', '.join(_COLUMNS)}), no_fsync"
            " ON CONFLICT (request_id) DO UPDATE SET released = false",
            *columns,
        )
        return [None] * len(holds)

    @postgres_outage
    async def find(self, request_id: str) -> StoredHold | None:
        """The hold recorded for ``request_id``, if any."""
        row = await self._pool.fetchrow(f"{_SELECT} WHERE h.request_id = $1", request_id)
        return None if row is None else _hold(row)

    async def give_up(self, request_id: str) -> None:
        """Marks a hold released: no rebuild restores it, no reaper charges it.

        Concurrent calls are written together, one statement for all of them.
        """
        await self._give_ups.submit(request_id)

    @postgres_outage
    async def _give_up_many(self, request_ids: Sequence[str]) -> list[None]:
        await self._pool.execute(
            f"{_NO_FSYNC} UPDATE budget.holds SET released = true FROM no_fsync"
            " WHERE request_id = ANY($1::text[])",
            list(request_ids),
        )
        return [None] * len(request_ids)

    @postgres_outage
    async def given_up(self, request_ids: Sequence[str]) -> set[str]:
        """Which of ``request_ids`` were released (or given up)."""
        rows = await self._pool.fetch(
            "SELECT request_id FROM budget.holds WHERE released AND request_id = ANY($1::text[])",
            list(request_ids),
        )
        return {r["request_id"] for r in rows}

    @postgres_outage
    async def open_holds(self, conn: Db, now: dt.datetime) -> list[StoredHold]:
        """Holds neither released nor settled, still within their record's life.

        Args:
            conn: The connection whose snapshot the rebuild reads.
            now: The current time.
        """
        rows = await conn.fetch(
            f"{_SELECT} WHERE NOT h.released AND h.expire_time > $1"
            " AND NOT EXISTS (SELECT 1 FROM budget.ledger l WHERE l.request_id = h.request_id)",
            now - KEEP_AFTER_EXPIRY,
        )
        return [_hold(r) for r in rows]

    @postgres_outage
    async def prune(self, now: dt.datetime, limit: int) -> int:
        """Deletes up to ``limit`` rows no retry can need any more; returns how many."""
        status = await self._pool.execute(
            "DELETE FROM budget.holds WHERE request_id IN (SELECT request_id FROM budget.holds"
            " WHERE expire_time < $1 LIMIT $2)",
            now - KEEP_AFTER_EXPIRY,
            limit,
        )
        return int(status.split()[-1])
