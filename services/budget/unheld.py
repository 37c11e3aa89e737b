"""Admissions made without a Redis hold (fail open), kept in PostgreSQL.

When Redis is unreachable and the tenant's policy says ``fail_open``, Reserve
admits the request without holding anything and writes one row here instead
(``budget.unheld``). Settle finds the payer in that row, writes the ledger
(the truth) and then adds the cost to the Redis counters once Redis answers;
until then the reaper retries. ``applied`` marks rows whose cost (or expiry)
has reached Redis.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence

import asyncpg

from services.common.outages import postgres_outage
from services.common.stores import row


@dataclasses.dataclass(frozen=True)
class Unheld:
    """A request admitted without a hold.

    Attributes:
        request_id: The idempotency key.
        tenant_id, team, project, key_id, end_user: Who pays.
        model: "provider/model".
        amount_micro_usd: The worst case it asked to hold.
        tokens: Its worst-case tokens.
        reserve_time: When it was admitted (the window its spend counts in).
        expire_time: When the reaper may give up waiting for its Settle.
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
    reserve_time: dt.datetime
    expire_time: dt.datetime


_COLUMNS = [f.name for f in dataclasses.fields(Unheld)]
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM budget.unheld"


class UnheldStore:
    """The ``budget.unheld`` table."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @postgres_outage
    async def add(self, unheld: Unheld) -> Unheld:
        """Records an admission unless its request id is known; returns the stored one."""
        placeholders = ", ".join(f"${i}" for i in range(1, len(_COLUMNS) + 1))
        await self._pool.execute(
            f"INSERT INTO budget.unheld ({', '.join(_COLUMNS)}) VALUES ({placeholders})"
            " ON CONFLICT (request_id) DO NOTHING",
            *row(unheld),
        )
        stored = await self.find(unheld.request_id)
        assert stored is not None  # rows are never deleted
        return stored

    @postgres_outage
    async def find(self, request_id: str) -> Unheld | None:
        """The admission recorded for ``request_id``, if any."""
        row = await self._pool.fetchrow(f"{_SELECT} WHERE request_id = $1", request_id)
        return None if row is None else Unheld(**dict(row))

    @postgres_outage
    async def pending(self, now: dt.datetime, limit: int) -> list[tuple[Unheld, bool]]:
        """Rows not yet applied to Redis that are settled or expired.

        Returns:
            (row, settled) pairs; ``settled`` says the ledger has its charge.
        """
        rows = await self._pool.fetch(
            "SELECT u.*, l.request_id IS NOT NULL AS settled FROM budget.unheld u"
            " LEFT JOIN budget.ledger l USING (request_id)"
            " WHERE NOT u.applied AND (l.request_id IS NOT NULL OR u.expire_time < $1)"
            " ORDER BY u.expire_time LIMIT $2",
            now,
            limit,
        )
        return [(Unheld(**{c: r[c] for c in _COLUMNS}), bool(r["settled"])) for r in rows]

    @postgres_outage
    async def close_unsettled(self, request_id: str) -> None:
        """Marks a row done if it was never settled (a release: nothing to carry)."""
        await self._pool.execute(
            "UPDATE budget.unheld SET applied = true WHERE request_id = $1"
            " AND NOT EXISTS (SELECT 1 FROM budget.ledger l WHERE l.request_id = $1)",
            request_id,
        )

    @postgres_outage
    async def mark_pending(self, request_id: str) -> None:
        """Records that a row's (corrected) cost must reach the Redis counters again."""
        await self._pool.execute(
            "UPDATE budget.unheld SET applied = false WHERE request_id = $1", request_id
        )

    @postgres_outage
    async def mark_applied(self, request_ids: Sequence[str]) -> None:
        """Records that these rows' costs reached the Redis counters."""
        await self._pool.execute(
            "UPDATE budget.unheld SET applied = true WHERE request_id = ANY($1::text[])",
            list(request_ids),
        )
