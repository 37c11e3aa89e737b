"""The spend ledger in PostgreSQL: one row per settled request, the truth.

Redis counters are a fast view of it; whenever they are lost they are rebuilt
from here (:meth:`Ledger.spent_in`), and they are never set below it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Sequence

import asyncpg

from orchestra.budget.v1 import budget_service_pb2 as pb
from services.budget.batching import Batcher
from services.budget.windows import Window
from services.common.outages import POSTGRES_DOWN, postgres_outage, store_unavailable
from services.common.stores import row


@dataclasses.dataclass(frozen=True)
class Charge:
    """One settled request.

    Attributes:
        request_id: The idempotency key.
        tenant_id, team, project, key_id, end_user: Who pays.
        model: "provider/model".
        held_micro_usd: What was reserved.
        cost_micro_usd: What was charged (may exceed the hold).
        prompt_tokens, completion_tokens: Actual usage.
        partial: The stream broke; the cost covers what was produced.
        spend_time: When the request was admitted (the window it counts in).
        reaped: Charged by the reaper at the full hold because no Settle came
            before the hold expired; a late Settle replaces the amount once.
    """

    request_id: str
    tenant_id: str
    team: str
    project: str
    key_id: str
    end_user: str
    model: str
    held_micro_usd: int
    cost_micro_usd: int
    prompt_tokens: int
    completion_tokens: int
    partial: bool
    spend_time: dt.datetime
    reaped: bool = False


# A connection of the pool (asyncpg hands out proxies).
Db = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

_COLUMNS = [f.name for f in dataclasses.fields(Charge)]
# PostgreSQL types of the columns, in order (for multi-row inserts with unnest).
_TYPES = ["text"] * 7 + ["bigint"] * 4 + ["boolean", "timestamptz", "boolean"]
assert len(_TYPES) == len(_COLUMNS)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM budget.ledger"

# The ledger column each budget level's subject is matched against.
_LEVEL_COLUMN = {
    pb.BUDGET_LEVEL_TEAM: "team",
    pb.BUDGET_LEVEL_PROJECT: "project",
    pb.BUDGET_LEVEL_API_KEY: "key_id",
    pb.BUDGET_LEVEL_END_USER: "end_user",
}

# SpendGroupBy -> SQL expression of the group key ($4 is the tenant's zone).
GROUP_KEYS = {
    pb.SPEND_GROUP_BY_MODEL: "model",
    pb.SPEND_GROUP_BY_TEAM: "team",
    pb.SPEND_GROUP_BY_PROJECT: "project",
    pb.SPEND_GROUP_BY_END_USER: "end_user",
    pb.SPEND_GROUP_BY_API_KEY: "key_id",
    pb.SPEND_GROUP_BY_DAY: "to_char(spend_time AT TIME ZONE $4, 'YYYY-MM-DD')",
}


@dataclasses.dataclass(frozen=True)
class SpendGroup:
    """Spend of one group (a ListSpend row)."""

    key: str
    cost_micro_usd: int
    requests: int
    prompt_tokens: int
    completion_tokens: int


class Ledger:
    """The ledger table."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._batcher: Batcher[Charge, tuple[Charge, bool]] = Batcher(self._record_many)
        self._finder: Batcher[str, Charge | None] = Batcher(self._find_batch)

    async def record(self, charge: Charge) -> tuple[Charge, bool]:
        """Writes ``charge`` unless its request id is already recorded.

        Concurrent calls are written together, one statement and one commit
        (:mod:`services.budget.batching`).

        Returns:
            The recorded charge (the earlier one on a repeat) and whether this
            call wrote it.
        """
        return await self._batcher.submit(charge)

    @postgres_outage
    async def _record_many(self, charges: Sequence[Charge]) -> list[tuple[Charge, bool]]:
        first: dict[str, Charge] = {}
        for charge in charges:
            first.setdefault(charge.request_id, charge)
        columns = list(zip(*(row(c) for c in first.values()), strict=True))
        rows = await self._pool.fetch(
            f"INSERT INTO budget.ledger ({', '.join(_COLUMNS)})"
            f" SELECT * FROM unnest({', '.join(f'${i + 1}::{t}[]' for i, t in enumerate(_TYPES))})"
            " ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
            *(list(column) for column in columns),
        )
        written = {r["request_id"] for r in rows}
        missing = [r for r in first if r not in written]
        earlier = await self.find_many(missing) if missing else {}
        results = []
        for charge in charges:
            if charge.request_id in written and first[charge.request_id] is charge:
                results.append((charge, True))
            elif charge.request_id in written:
                results.append((first[charge.request_id], False))  # a duplicate in the batch
            else:
                results.append((earlier[charge.request_id], False))
        return results

    @postgres_outage
    async def correct(
        self,
        request_id: str,
        cost: int,
        prompt_tokens: int,
        completion_tokens: int,
        partial: bool,
    ) -> tuple[Charge, int] | None:
        """Replaces a reaped (provisional) charge with the reported one, once.

        Returns:
            The corrected charge and the amount the reaper had charged, or None
            if ``request_id`` has no reaped row (never reaped, or already
            corrected).
        """
        row = await self._pool.fetchrow(
            "UPDATE budget.ledger l SET cost_micro_usd = $2, prompt_tokens = $3,"
            " completion_tokens = $4, partial = $5, reaped = false, settle_time = now()"
            " FROM (SELECT request_id, cost_micro_usd FROM budget.ledger"
            "  WHERE request_id = $1 AND reaped FOR UPDATE) AS old"
            " WHERE l.request_id = old.request_id"
            f" RETURNING {', '.join('l.' + c for c in _COLUMNS)},"
            " old.cost_micro_usd AS reaped_cost",
            request_id,
            cost,
            prompt_tokens,
            completion_tokens,
            partial,
        )
        if row is None:
            return None
        values = dict(row)
        reaped_cost = int(values.pop("reaped_cost"))
        return Charge(**values), reaped_cost

    async def find(self, request_id: str) -> Charge | None:
        """The charge recorded for ``request_id``, if any.

        Concurrent calls are read together, one statement for all of them.
        """
        return await self._finder.submit(request_id)

    async def _find_batch(self, request_ids: Sequence[str]) -> list[Charge | None]:
        found = await self.find_many(request_ids)
        return [found.get(r) for r in request_ids]

    @postgres_outage
    async def find_many(self, request_ids: Sequence[str]) -> dict[str, Charge]:
        """The charges recorded for any of ``request_ids``."""
        rows = await self._pool.fetch(
            f"{_SELECT} WHERE request_id = ANY($1::text[])", list(request_ids)
        )
        return {r["request_id"]: Charge(**dict(r)) for r in rows}

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Db]:
        """A read-only connection on one consistent snapshot (REPEATABLE READ)."""
        try:
            async with (
                self._pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                yield conn
        except POSTGRES_DOWN as exc:
            raise store_unavailable("postgresql", exc) from exc

    @postgres_outage
    async def spent_in(
        self, budget: pb.Budget, window: Window, conn: Db | None = None
    ) -> dict[str, int]:
        """Settled spend that counts against ``budget`` in ``window``.

        ``conn``: read on this connection (a :meth:`snapshot`) instead of the pool.

        Returns:
            Micro-USD by end user for a per-end-user ("*") budget, else {"": total}.
        """
        column = _LEVEL_COLUMN.get(budget.level)
        per_user = budget.level == pb.BUDGET_LEVEL_END_USER and budget.subject == "*"
        conditions = ["tenant_id = $1"]
        if column is not None and not per_user:
            conditions.append(f"{column} = $2")
        elif per_user:
            conditions.append("end_user <> '' AND $2 = '*'")
        else:
            conditions.append("$2 = ''")
        conditions.append("($3::timestamptz IS NULL OR spend_time >= $3)")
        conditions.append("($4::timestamptz IS NULL OR spend_time < $4)")
        group = "end_user" if per_user else "''"
        db = self._pool if conn is None else conn
        rows = await db.fetch(
            f"SELECT {group} AS who, sum(cost_micro_usd)::bigint AS spent FROM budget.ledger"
            f" WHERE {' AND '.join(conditions)} GROUP BY 1",
            budget.tenant_id,
            budget.subject,
            window.start,
            window.end,
        )
        return {r["who"]: r["spent"] for r in rows}

    @postgres_outage
    async def spend(
        self,
        tenant_id: str,
        group_by: pb.SpendGroupBy.ValueType,
        start: dt.datetime,
        end: dt.datetime,
        time_zone: str,
        after: tuple[int, str] | None,
        limit: int,
    ) -> list[SpendGroup]:
        """Spend grouped by ``group_by``, largest first, after ``after`` (cost, key)."""
        key = GROUP_KEYS[group_by]
        last_cost, last_key = after if after is not None else (None, "")
        rows = await self._pool.fetch(
            "WITH groups AS ("
            f" SELECT {key} AS key, sum(cost_micro_usd)::bigint AS cost, count(*) AS requests,"
            " sum(prompt_tokens)::bigint AS prompt_tokens,"
            " sum(completion_tokens)::bigint AS completion_tokens"
            " FROM budget.ledger WHERE tenant_id = $1 AND spend_time >= $2 AND spend_time < $3"
            # $4 is referenced by the DAY key; the cast keeps it typed otherwise.
            " AND $4::text IS NOT NULL GROUP BY 1)"
            " SELECT * FROM groups WHERE $5::bigint IS NULL OR cost < $5"
            " OR (cost = $5 AND key > $6) ORDER BY cost DESC, key LIMIT $7",
            tenant_id,
            start,
            end,
            time_zone or "UTC",
            last_cost,
            last_key,
            limit,
        )
        return [
            SpendGroup(
                r["key"], r["cost"], r["requests"], r["prompt_tokens"], r["completion_tokens"]
            )
            for r in rows
        ]
