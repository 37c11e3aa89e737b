"""Budget definitions in PostgreSQL (``budget.budgets``)."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import asyncpg

from orchestra.budget.v1 import budget_service_pb2 as pb
from services.budget import convert
from services.budget.accounts import exists, not_found
from services.common.outages import postgres_outage


def per_end_user(budget: pb.Budget) -> bool:
    """Whether the budget limits each end user separately (subject "*")."""
    return budget.level == pb.BUDGET_LEVEL_END_USER and budget.subject == "*"


def _budget(row: asyncpg.Record) -> pb.Budget:
    return pb.Budget(
        budget_id=row["budget_id"],
        tenant_id=row["tenant_id"],
        level=row["level"],
        subject=row["subject"],
        window=row["time_window"],
        limit_micro_usd=row["limit_micro_usd"],
        soft=row["soft"],
        alert_thresholds_percent=list(row["alert_thresholds_percent"]),
        alert_webhook_url=row["alert_webhook_url"],
        create_time=convert.timestamp(row["create_time"]),
    )


def new_budget_id() -> str:
    """A fresh budget id."""
    return f"bud-{secrets.token_hex(8)}"


def _what(budget: pb.Budget) -> str:
    level = pb.BudgetLevel.Name(budget.level).removeprefix("BUDGET_LEVEL_").lower()
    window = pb.BudgetWindow.Name(budget.window).removeprefix("BUDGET_WINDOW_").lower()
    return f"{level} {budget.subject!r} {window}".replace(" ''", "")


class BudgetStore:
    """Budgets in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @postgres_outage
    async def create(self, budget: pb.Budget, *, from_config: bool = False) -> pb.Budget:
        """Inserts a budget with a fresh id.

        Raises:
            NotFound: The tenant does not exist.
            AlreadyExists: The tenant has a budget for this level, subject and window.
        """
        try:
            row = await self._pool.fetchrow(
                "INSERT INTO budget.budgets (budget_id, tenant_id, level, subject, time_window,"
                " limit_micro_usd, soft, alert_thresholds_percent, alert_webhook_url, from_config)"
                " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10"
                " WHERE EXISTS (SELECT 1 FROM budget.tenants"
                " WHERE tenant_id = $2 AND delete_time IS NULL) RETURNING *",
                new_budget_id(),
                budget.tenant_id,
                budget.level,
                budget.subject,
                budget.window,
                budget.limit_micro_usd,
                budget.soft,
                list(budget.alert_thresholds_percent),
                budget.alert_webhook_url,
                from_config,
            )
        except asyncpg.UniqueViolationError:
            raise exists("budget", _what(budget)) from None
        if row is None:
            raise not_found("tenant", budget.tenant_id)
        return _budget(row)

    @postgres_outage
    async def get(self, budget_id: str) -> pb.Budget:
        """The budget. Raises NotFound."""
        row = await self._pool.fetchrow(
            "SELECT * FROM budget.budgets WHERE budget_id = $1", budget_id
        )
        if row is None:
            raise not_found("budget", budget_id)
        return _budget(row)

    @postgres_outage
    async def page(self, tenant_id: str, after: str | None, limit: int) -> list[pb.Budget]:
        """A tenant's budgets with ids after ``after``, by id."""
        rows = await self._pool.fetch(
            "SELECT * FROM budget.budgets WHERE tenant_id = $1 AND budget_id > $2"
            " ORDER BY budget_id LIMIT $3",
            tenant_id,
            after or "",
            limit,
        )
        return [_budget(r) for r in rows]

    @postgres_outage
    async def for_tenant(self, tenant_id: str) -> list[pb.Budget]:
        """All of a tenant's budgets."""
        rows = await self._pool.fetch(
            "SELECT * FROM budget.budgets WHERE tenant_id = $1 ORDER BY budget_id", tenant_id
        )
        return [_budget(r) for r in rows]

    @postgres_outage
    async def all_live(self) -> list[tuple[pb.Budget, str]]:
        """Every budget of a live tenant, with the tenant's time zone."""
        rows = await self._pool.fetch(
            "SELECT b.*, coalesce(t.policy->>'time_zone', '') AS time_zone"
            " FROM budget.budgets b JOIN budget.tenants t USING (tenant_id)"
            " WHERE t.delete_time IS NULL ORDER BY b.budget_id"
        )
        return [(_budget(r), r["time_zone"]) for r in rows]

    @postgres_outage
    async def update(self, budget_id: str, apply: Callable[[pb.Budget], None]) -> pb.Budget:
        """Changes a budget under a row lock: ``apply`` edits it in place."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM budget.budgets WHERE budget_id = $1 FOR UPDATE", budget_id
            )
            if row is None:
                raise not_found("budget", budget_id)
            budget = _budget(row)
            apply(budget)
            await conn.execute(
                "UPDATE budget.budgets SET limit_micro_usd = $2, soft = $3,"
                " alert_thresholds_percent = $4, alert_webhook_url = $5 WHERE budget_id = $1",
                budget_id,
                budget.limit_micro_usd,
                budget.soft,
                list(budget.alert_thresholds_percent),
                budget.alert_webhook_url,
            )
        return budget

    @postgres_outage
    async def delete(self, budget_id: str) -> None:
        """Deletes a budget (its spend stays in the ledger). Raises NotFound."""
        status = await self._pool.execute(
            "DELETE FROM budget.budgets WHERE budget_id = $1", budget_id
        )
        if status != "DELETE 1":
            raise not_found("budget", budget_id)

    @postgres_outage
    async def upsert_config(self, budget: pb.Budget) -> tuple[pb.Budget, bool]:
        """Creates or updates a budget declared in the config file.

        Identified by (tenant, level, subject, window). Returns the budget and
        whether anything changed.
        """
        row = await self._pool.fetchrow(
            "INSERT INTO budget.budgets AS b (budget_id, tenant_id, level, subject, time_window,"
            " limit_micro_usd, soft, alert_thresholds_percent, alert_webhook_url, from_config)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, true)"
            " ON CONFLICT (tenant_id, level, subject, time_window) DO UPDATE SET"
            " limit_micro_usd = excluded.limit_micro_usd, soft = excluded.soft,"
            " alert_thresholds_percent = excluded.alert_thresholds_percent,"
            " alert_webhook_url = excluded.alert_webhook_url, from_config = true"
            " WHERE (b.limit_micro_usd, b.soft, b.alert_thresholds_percent, b.alert_webhook_url)"
            " IS DISTINCT FROM (excluded.limit_micro_usd, excluded.soft,"
            " excluded.alert_thresholds_percent, excluded.alert_webhook_url)"
            " RETURNING *",
            new_budget_id(),
            budget.tenant_id,
            budget.level,
            budget.subject,
            budget.window,
            budget.limit_micro_usd,
            budget.soft,
            list(budget.alert_thresholds_percent),
            budget.alert_webhook_url,
        )
        return (_budget(row), True) if row is not None else (budget, False)
