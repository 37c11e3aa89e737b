"""API keys in PostgreSQL (``budget.api_keys``).

The store never sees a secret: keys are written and looked up by the SHA-256
of their secret, and authentication reads a key together with its tenant's
policy in one query.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import asyncpg

from orchestra.budget.v1 import account_service_pb2 as pb
from orchestra.common.v1 import errors_pb2, identity_pb2
from services.budget import convert
from services.budget.accounts import exists, not_found
from services.common.errors import FailedPrecondition
from services.common.outages import postgres_outage

Row = asyncpg.Record
_LIVE_TENANT = "SELECT 1 FROM budget.tenants WHERE tenant_id = $2 AND delete_time IS NULL"


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """A key as authentication needs it.

    Attributes:
        key: The key (never its secret).
        secret_sha256: The stored digest of its secret.
        policy: Its tenant's policy.
        tenant_deleted: Whether its tenant was deleted (its keys no longer work).
    """

    key: pb.ApiKey
    secret_sha256: bytes
    policy: pb.TenantPolicy
    tenant_deleted: bool


def _key(row: Row) -> pb.ApiKey:
    return pb.ApiKey(
        tenant_id=row["tenant_id"],
        key_id=row["key_id"],
        display_name=row["display_name"],
        team=row["team_id"],
        project=row["project_id"],
        scopes=convert.scope_values(row["scopes"]),
        rate_limit=identity_pb2.RateLimit(
            requests_per_minute=row["requests_per_minute"],
            tokens_per_minute=row["tokens_per_minute"],
        ),
        create_time=convert.timestamp(row["create_time"]),
        expire_time=convert.timestamp(row["expire_time"]),
        revoke_time=convert.timestamp(row["revoke_time"]),
    )


def _expiry(key: pb.ApiKey) -> dt.datetime | None:
    return convert.from_timestamp(key.expire_time) if key.HasField("expire_time") else None


_KEY_WITH_TENANT = (
    "SELECT k.*, t.policy, t.delete_time AS tenant_delete_time"
    " FROM budget.api_keys k JOIN budget.tenants t USING (tenant_id)"
)


class KeyStore:
    """API keys in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @postgres_outage
    async def create_key(self, key: pb.ApiKey, secret_sha256: bytes) -> pb.ApiKey:
        """Inserts a key. Raises NotFound (tenant) or AlreadyExists (key id)."""
        try:
            row = await self._pool.fetchrow(
                "INSERT INTO budget.api_keys (key_id, tenant_id, team_id, project_id,"
                " display_name, scopes, secret_sha256, requests_per_minute,"
                " tokens_per_minute, expire_time)"
                " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 WHERE EXISTS"
                f" ({_LIVE_TENANT}) RETURNING *",
                key.key_id,
                key.tenant_id,
                key.team,
                key.project,
                key.display_name,
                convert.scope_names(key.scopes),
                secret_sha256,
                key.rate_limit.requests_per_minute,
                key.rate_limit.tokens_per_minute,
                _expiry(key),
            )
        except asyncpg.UniqueViolationError:
            raise exists("api_key", key.key_id) from None
        if row is None:
            raise not_found("tenant", key.tenant_id)
        return _key(row)

    @postgres_outage
    async def upsert_config_key(self, key: pb.ApiKey, secret_sha256: bytes) -> bool:
        """Creates or updates a key declared in the config file; True if changed.

        A key revoked through the API stays revoked. Raises AlreadyExists if the
        id belongs to another tenant.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            owner = await conn.fetchval(
                "SELECT tenant_id FROM budget.api_keys WHERE key_id = $1 FOR UPDATE", key.key_id
            )
            if owner is not None and owner != key.tenant_id:
                raise exists("api_key", key.key_id)
            try:
                status = await self._upsert_key(conn, key, secret_sha256)
            except asyncpg.UniqueViolationError:
                # The only other unique column: two keys may not share a secret.
                raise exists("api_key secret", key.key_id) from None
        return status.endswith(" 1")

    @staticmethod
    async def _upsert_key(conn: Any, key: pb.ApiKey, secret_sha256: bytes) -> str:
        status: str = await conn.execute(
            "INSERT INTO budget.api_keys AS k (key_id, tenant_id, team_id, project_id,"
            " display_name, scopes, secret_sha256, from_config)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, true)"
            " ON CONFLICT (key_id) DO UPDATE SET team_id = excluded.team_id,"
            " project_id = excluded.project_id, display_name = excluded.display_name,"
            " scopes = excluded.scopes, secret_sha256 = excluded.secret_sha256,"
            " from_config = true"
            " WHERE (k.team_id, k.project_id, k.display_name, k.scopes, k.secret_sha256)"
            " IS DISTINCT FROM (excluded.team_id, excluded.project_id,"
            " excluded.display_name, excluded.scopes, excluded.secret_sha256)",
            key.key_id,
            key.tenant_id,
            key.team,
            key.project,
            key.display_name,
            convert.scope_names(key.scopes),
            secret_sha256,
        )
        return status

    @postgres_outage
    async def get_key(self, key_id: str) -> pb.ApiKey:
        """The key ``key_id``. Raises NotFound."""
        row = await self._pool.fetchrow("SELECT * FROM budget.api_keys WHERE key_id = $1", key_id)
        if row is None:
            raise not_found("api_key", key_id)
        return _key(row)

    @postgres_outage
    async def list_keys(
        self, tenant_id: str, show_revoked: bool, after: str | None, limit: int
    ) -> list[pb.ApiKey]:
        """A tenant's keys after ``after``, by id."""
        rows = await self._pool.fetch(
            "SELECT * FROM budget.api_keys WHERE tenant_id = $1 AND key_id > $2"
            " AND ($3 OR revoke_time IS NULL) ORDER BY key_id LIMIT $4",
            tenant_id,
            after or "",
            show_revoked,
            limit,
        )
        return [_key(r) for r in rows]

    @postgres_outage
    async def rotate_key(self, key_id: str, secret_sha256: bytes) -> pb.ApiKey:
        """Replaces a key's secret digest. Raises NotFound or FailedPrecondition (revoked)."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT revoke_time FROM budget.api_keys WHERE key_id = $1 FOR UPDATE", key_id
            )
            if row is None:
                raise not_found("api_key", key_id)
            if row["revoke_time"] is not None:
                raise FailedPrecondition(
                    errors_pb2.ERROR_REASON_API_KEY_REVOKED,
                    f"api_key {key_id!r} is revoked and cannot be rotated",
                    metadata={"key_id": key_id},
                )
            updated = await conn.fetchrow(
                "UPDATE budget.api_keys SET secret_sha256 = $2 WHERE key_id = $1 RETURNING *",
                key_id,
                secret_sha256,
            )
        assert updated is not None
        return _key(updated)

    @postgres_outage
    async def revoke_key(self, key_id: str) -> pb.ApiKey:
        """Revokes a key (a revoked key keeps its first revoke time). Raises NotFound."""
        row = await self._pool.fetchrow(
            "UPDATE budget.api_keys SET revoke_time = coalesce(revoke_time, now())"
            " WHERE key_id = $1 RETURNING *",
            key_id,
        )
        if row is None:
            raise not_found("api_key", key_id)
        return _key(row)

    @postgres_outage
    async def find_key_by_id(self, key_id: str) -> KeyRecord | None:
        """The key and its tenant's policy, for authentication."""
        row = await self._pool.fetchrow(f"{_KEY_WITH_TENANT} WHERE k.key_id = $1", key_id)
        return None if row is None else _record(row)

    @postgres_outage
    async def find_key_by_digest(self, secret_sha256: bytes) -> KeyRecord | None:
        """The key whose secret has this digest (secrets not of the ``ok_`` form)."""
        row = await self._pool.fetchrow(
            f"{_KEY_WITH_TENANT} WHERE k.secret_sha256 = $1", secret_sha256
        )
        return None if row is None else _record(row)


def _record(row: Row) -> KeyRecord:
    return KeyRecord(
        key=_key(row),
        secret_sha256=bytes(row["secret_sha256"]),
        policy=convert.policy_from_json(row["policy"]),
        tenant_deleted=row["tenant_delete_time"] is not None,
    )
