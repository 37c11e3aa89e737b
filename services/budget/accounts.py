"""Tenants, teams and projects in PostgreSQL (schema ``budget``).

The store speaks the contract's messages. API keys live in
:mod:`services.budget.keystore`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg

from orchestra.budget.v1 import account_service_pb2 as pb
from orchestra.common.v1 import errors_pb2
from services.budget import convert
from services.common.errors import AlreadyExists, NotFound
from services.common.outages import postgres_outage

Row = asyncpg.Record


def not_found(resource: str, name: str) -> NotFound:
    """RESOURCE_NOT_FOUND naming the missing resource."""
    return NotFound(
        errors_pb2.ERROR_REASON_RESOURCE_NOT_FOUND,
        f"{resource} {name!r} does not exist",
        metadata={"resource": resource, "name": name},
    )


def exists(resource: str, name: str) -> AlreadyExists:
    """RESOURCE_EXISTS naming the resource."""
    return AlreadyExists(
        errors_pb2.ERROR_REASON_RESOURCE_EXISTS,
        f"{resource} {name!r} already exists",
        metadata={"resource": resource, "name": name},
    )


def _tenant(row: Row) -> pb.Tenant:
    return pb.Tenant(
        tenant_id=row["tenant_id"],
        display_name=row["display_name"],
        policy=convert.policy_from_json(row["policy"]),
        create_time=convert.timestamp(row["create_time"]),
    )


def _team(row: Row) -> pb.Team:
    return pb.Team(
        tenant_id=row["tenant_id"],
        team_id=row["team_id"],
        display_name=row["display_name"],
        create_time=convert.timestamp(row["create_time"]),
    )


def _project(row: Row) -> pb.Project:
    return pb.Project(
        tenant_id=row["tenant_id"],
        team_id=row["team_id"],
        project_id=row["project_id"],
        display_name=row["display_name"],
        create_time=convert.timestamp(row["create_time"]),
    )


_LIVE_TENANT = "SELECT 1 FROM budget.tenants WHERE tenant_id = $1 AND delete_time IS NULL"


class AccountStore:
    """Accounts in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # --- tenants -------------------------------------------------------------

    @postgres_outage
    async def create_tenant(self, tenant: pb.Tenant) -> pb.Tenant:
        """Inserts a tenant. Raises AlreadyExists (also for a deleted tenant's id)."""
        try:
            row = await self._pool.fetchrow(
                "INSERT INTO budget.tenants (tenant_id, display_name, policy)"
                " VALUES ($1, $2, $3::jsonb) RETURNING *",
                tenant.tenant_id,
                tenant.display_name,
                convert.policy_to_json(tenant.policy),
            )
        except asyncpg.UniqueViolationError:
            raise exists("tenant", tenant.tenant_id) from None
        assert row is not None
        return _tenant(row)

    @postgres_outage
    async def get_tenant(self, tenant_id: str) -> pb.Tenant:
        """The live tenant ``tenant_id``. Raises NotFound."""
        row = await self._pool.fetchrow(
            "SELECT * FROM budget.tenants WHERE tenant_id = $1 AND delete_time IS NULL", tenant_id
        )
        if row is None:
            raise not_found("tenant", tenant_id)
        return _tenant(row)

    @postgres_outage
    async def list_tenants(self, after: str | None, limit: int) -> list[pb.Tenant]:
        """Live tenants with ids after ``after``, by id."""
        rows = await self._pool.fetch(
            "SELECT * FROM budget.tenants WHERE delete_time IS NULL AND tenant_id > $1"
            " ORDER BY tenant_id LIMIT $2",
            after or "",
            limit,
        )
        return [_tenant(r) for r in rows]

    @postgres_outage
    async def update_tenant(self, tenant_id: str, apply: Callable[[pb.Tenant], None]) -> pb.Tenant:
        """Changes a tenant under a row lock: ``apply`` edits it in place."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM budget.tenants WHERE tenant_id = $1 AND delete_time IS NULL"
                " FOR UPDATE",
                tenant_id,
            )
            if row is None:
                raise not_found("tenant", tenant_id)
            tenant = _tenant(row)
            apply(tenant)
            await conn.execute(
                "UPDATE budget.tenants SET display_name = $2, policy = $3::jsonb"
                " WHERE tenant_id = $1",
                tenant_id,
                tenant.display_name,
                convert.policy_to_json(tenant.policy),
            )
        return tenant

    @postgres_outage
    async def delete_tenant(self, tenant_id: str) -> list[str]:
        """Soft-deletes a tenant and revokes its keys; returns the revoked key ids.

        Deleting a deleted tenant changes nothing. Raises NotFound if it never
        existed.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "UPDATE budget.tenants SET delete_time = coalesce(delete_time, now())"
                " WHERE tenant_id = $1 RETURNING tenant_id",
                tenant_id,
            )
            if found is None:
                raise not_found("tenant", tenant_id)
            rows = await conn.fetch(
                "UPDATE budget.api_keys SET revoke_time = now()"
                " WHERE tenant_id = $1 AND revoke_time IS NULL RETURNING key_id",
                tenant_id,
            )
        return [r["key_id"] for r in rows]

    @postgres_outage
    async def upsert_tenant(
        self, tenant_id: str, display_name: str, policy: pb.TenantPolicy
    ) -> bool:
        """Creates or updates a tenant (declarative bootstrap); True if anything changed.

        A deleted tenant stays deleted: deletion is not undone by a restart.
        """
        status = await self._pool.execute(
            "INSERT INTO budget.tenants (tenant_id, display_name, policy)"
            " VALUES ($1, $2, $3::jsonb)"
            " ON CONFLICT (tenant_id) DO UPDATE"
            " SET display_name = excluded.display_name, policy = excluded.policy"
            " WHERE budget.tenants.delete_time IS NULL AND (budget.tenants.display_name,"
            " budget.tenants.policy) IS DISTINCT FROM (excluded.display_name, excluded.policy)",
            tenant_id,
            display_name,
            convert.policy_to_json(policy),
        )
        return status.endswith(" 1")

    @postgres_outage
    async def tenant_deleted(self, tenant_id: str) -> bool:
        """Whether ``tenant_id`` exists and was deleted."""
        row = await self._pool.fetchval(
            "SELECT delete_time IS NOT NULL FROM budget.tenants WHERE tenant_id = $1", tenant_id
        )
        return bool(row)

    # --- teams and projects ---------------------------------------------------

    async def _require_tenant(self, conn: Any, tenant_id: str) -> None:
        if await conn.fetchval(_LIVE_TENANT, tenant_id) is None:
            raise not_found("tenant", tenant_id)

    @postgres_outage
    async def create_team(self, team: pb.Team) -> pb.Team:
        """Inserts a team. Raises NotFound (tenant) or AlreadyExists."""
        async with self._pool.acquire() as conn:
            await self._require_tenant(conn, team.tenant_id)
            try:
                row = await conn.fetchrow(
                    "INSERT INTO budget.teams (tenant_id, team_id, display_name)"
                    " VALUES ($1, $2, $3) RETURNING *",
                    team.tenant_id,
                    team.team_id,
                    team.display_name,
                )
            except asyncpg.UniqueViolationError:
                raise exists("team", team.team_id) from None
        assert row is not None
        return _team(row)

    @postgres_outage
    async def list_teams(self, tenant_id: str, after: str | None, limit: int) -> list[pb.Team]:
        """A tenant's teams with ids after ``after``, by id."""
        rows = await self._pool.fetch(
            "SELECT * FROM budget.teams WHERE tenant_id = $1 AND team_id > $2"
            " ORDER BY team_id LIMIT $3",
            tenant_id,
            after or "",
            limit,
        )
        return [_team(r) for r in rows]

    @postgres_outage
    async def create_project(self, project: pb.Project) -> pb.Project:
        """Inserts a project. Raises NotFound (tenant or team) or AlreadyExists."""
        async with self._pool.acquire() as conn:
            await self._require_tenant(conn, project.tenant_id)
            try:
                row = await conn.fetchrow(
                    "INSERT INTO budget.projects (tenant_id, team_id, project_id, display_name)"
                    " VALUES ($1, $2, $3, $4) RETURNING *",
                    project.tenant_id,
                    project.team_id,
                    project.project_id,
                    project.display_name,
                )
            except asyncpg.UniqueViolationError:
                raise exists("project", project.project_id) from None
            except asyncpg.ForeignKeyViolationError:
                raise not_found("team", project.team_id) from None
        assert row is not None
        return _project(row)

    @postgres_outage
    async def list_projects(
        self, tenant_id: str, team_id: str, after: str | None, limit: int
    ) -> list[pb.Project]:
        """A tenant's projects (of one team if ``team_id``) after ``after``, by id."""
        rows = await self._pool.fetch(
            "SELECT * FROM budget.projects WHERE tenant_id = $1 AND project_id > $2"
            " AND ($3 = '' OR team_id = $3) ORDER BY project_id LIMIT $4",
            tenant_id,
            after or "",
            team_id,
            limit,
        )
        return [_project(r) for r in rows]

    @postgres_outage
    async def find_project(self, tenant_id: str, project_id: str) -> pb.Project | None:
        """The project, or None."""
        row = await self._pool.fetchrow(
            "SELECT * FROM budget.projects WHERE tenant_id = $1 AND project_id = $2",
            tenant_id,
            project_id,
        )
        return None if row is None else _project(row)

    @postgres_outage
    async def team_exists(self, tenant_id: str, team_id: str) -> bool:
        """Whether the team exists."""
        found = await self._pool.fetchval(
            "SELECT 1 FROM budget.teams WHERE tenant_id = $1 AND team_id = $2", tenant_id, team_id
        )
        return found is not None

    @postgres_outage
    async def ensure_team_and_project(self, tenant_id: str, team_id: str, project_id: str) -> None:
        """Creates the team and project if missing (keys in the config imply them)."""
        async with self._pool.acquire() as conn, conn.transaction():
            if team_id:
                await conn.execute(
                    "INSERT INTO budget.teams (tenant_id, team_id) VALUES ($1, $2)"
                    " ON CONFLICT DO NOTHING",
                    tenant_id,
                    team_id,
                )
            if project_id:
                await conn.execute(
                    "INSERT INTO budget.projects (tenant_id, team_id, project_id)"
                    " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    tenant_id,
                    team_id,
                    project_id,
                )
