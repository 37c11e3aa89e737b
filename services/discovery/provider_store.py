"""Discovery's provider rows (``discovery.providers``): their reads, writes and health.

Pages are ordered by id in byte order (``COLLATE "C"``) so a page token means
the same on every PostgreSQL whatever its default collation.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from orchestra.common.v1 import errors_pb2
from services.common.errors import AlreadyExists
from services.discovery.records import SOURCE_CONFIG, ProviderRecord

PROVIDER_COLUMNS = (
    "provider_id, display_name, provider_type, base_url, credential_sealed, credential_hint,"
    " headers, organization, local, enabled, connect_timeout_ms, read_timeout_ms,"
    " requests_per_minute, tokens_per_minute, source, declared_models, health_status, last_error,"
    " last_probe_time, create_time, update_time"
)
# The columns an RPC or the config file sets (not health, not timestamps).
_SETTABLE = (
    "display_name",
    "provider_type",
    "base_url",
    "credential_sealed",
    "credential_hint",
    "headers",
    "organization",
    "local",
    "enabled",
    "connect_timeout_ms",
    "read_timeout_ms",
    "requests_per_minute",
    "tokens_per_minute",
    "source",
    "declared_models",
)


class ProviderStore:
    """Reads and writes ``discovery.providers``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def get_provider(self, provider_id: str) -> ProviderRecord | None:
        """The provider, or None."""
        row = await self._pool.fetchrow(
            f"SELECT {PROVIDER_COLUMNS} FROM discovery.providers WHERE provider_id = $1",
            provider_id,
        )
        return provider_row(row) if row else None

    async def list_providers(
        self, *, after: str | None = None, limit: int | None = None, enabled_only: bool = False
    ) -> list[ProviderRecord]:
        """Providers by id, after ``after``, at most ``limit``."""
        rows = await self._pool.fetch(
            f"SELECT {PROVIDER_COLUMNS} FROM discovery.providers"
            ' WHERE ($1::text IS NULL OR provider_id COLLATE "C" > $1)'
            " AND (NOT $2 OR enabled)"
            ' ORDER BY provider_id COLLATE "C" LIMIT $3',
            after,
            enabled_only,
            limit,
        )
        return [provider_row(r) for r in rows]

    async def insert_provider(self, record: ProviderRecord) -> ProviderRecord:
        """Adds a provider.

        Raises:
            AlreadyExists: RESOURCE_EXISTS if the id is taken.
        """
        values = _settable_values(record)
        names = ", ".join(("provider_id", *_SETTABLE))
        params = ", ".join(f"${i}" for i in range(1, len(values) + 2))
        try:
            row = await self._pool.fetchrow(
                f"INSERT INTO discovery.providers ({names}) VALUES ({params})"
                f" RETURNING {PROVIDER_COLUMNS}",
                record.provider_id,
                *values,
            )
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(
                errors_pb2.ERROR_REASON_RESOURCE_EXISTS,
                f"provider {record.provider_id!r} already exists",
                metadata={"resource": "provider", "name": record.provider_id},
            ) from None
        assert row is not None
        return provider_row(row)

    async def update_provider(self, record: ProviderRecord) -> ProviderRecord | None:
        """Writes the settable fields of ``record``; None if it no longer exists."""
        values = _settable_values(record)
        sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(_SETTABLE, start=2))
        row = await self._pool.fetchrow(
            f"UPDATE discovery.providers SET {sets}, update_time = now()"
            f" WHERE provider_id = $1 RETURNING {PROVIDER_COLUMNS}",
            record.provider_id,
            *values,
        )
        return provider_row(row) if row else None

    async def delete_provider(self, provider_id: str) -> bool:
        """Removes a provider and (by cascade) its models; False if absent."""
        status = await self._pool.execute(
            "DELETE FROM discovery.providers WHERE provider_id = $1", provider_id
        )
        return bool(status == "DELETE 1")

    async def apply_config(
        self,
        records: Sequence[ProviderRecord],
        *,
        prune: bool,
        same_credential: Callable[[ProviderRecord, ProviderRecord], bool],
    ) -> tuple[list[str], list[str]]:
        """Makes the config-declared providers match ``records``.

        Inserts new ones, rewrites changed ones (taking over an API-created
        provider of the same id), and with ``prune`` deletes config-declared
        providers the file no longer names. Runs under an advisory lock so
        replicas starting together agree.

        Args:
            records: The providers the file declares (credentials sealed).
            prune: Delete config-declared providers not in ``records``.
            same_credential: Whether a stored row already holds the credential
                of a wanted one (sealing is randomised, so the bytes differ
                even when the secret does not).

        Returns:
            The ids written, and the ids deleted.
        """
        written: list[str] = []
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('orchestra.discovery.config'))"
            )
            for record in records:
                row = await conn.fetchrow(
                    f"SELECT {PROVIDER_COLUMNS} FROM discovery.providers WHERE provider_id = $1",
                    record.provider_id,
                )
                if row is not None:
                    existing = provider_row(row)
                    if same_credential(existing, record):
                        record = dataclasses.replace(
                            record, credential_sealed=existing.credential_sealed
                        )
                    if _settable_values(existing) == _settable_values(record):
                        continue
                values = _settable_values(record)
                names = ", ".join(("provider_id", *_SETTABLE))
                params = ", ".join(f"${i}" for i in range(1, len(values) + 2))
                updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in _SETTABLE)
                await conn.execute(
                    f"INSERT INTO discovery.providers ({names}) VALUES ({params})"
                    f" ON CONFLICT (provider_id) DO UPDATE SET {updates}, update_time = now()",
                    record.provider_id,
                    *values,
                )
                written.append(record.provider_id)
            deleted: list[str] = []
            if prune:
                keep = [r.provider_id for r in records]
                rows = await conn.fetch(
                    "DELETE FROM discovery.providers WHERE source = $1"
                    " AND NOT (provider_id = ANY($2::text[])) RETURNING provider_id",
                    SOURCE_CONFIG,
                    keep,
                )
                deleted = [r["provider_id"] for r in rows]
        return written, deleted

    async def set_health(
        self, provider_id: str, status: int, error: str, probe_time: datetime.datetime
    ) -> None:
        """Records the outcome of a listing."""
        await self._pool.execute(
            "UPDATE discovery.providers SET health_status = $2, last_error = $3,"
            " last_probe_time = $4 WHERE provider_id = $1",
            provider_id,
            status,
            error,
            probe_time,
        )


def _settable_values(record: ProviderRecord) -> tuple[Any, ...]:
    return (
        record.display_name,
        record.type,
        record.base_url,
        record.credential_sealed,
        record.credential_hint,
        json.dumps(dict(record.headers), sort_keys=True),
        record.organization,
        record.local,
        record.enabled,
        record.connect_timeout_ms,
        record.read_timeout_ms,
        record.requests_per_minute,
        record.tokens_per_minute,
        record.source,
        json.dumps(list(record.declared_models)),
    )


def provider_row(row: asyncpg.Record) -> ProviderRecord:
    sealed = row["credential_sealed"]
    return ProviderRecord(
        provider_id=row["provider_id"],
        display_name=row["display_name"],
        type=row["provider_type"],
        base_url=row["base_url"],
        credential_sealed=bytes(sealed) if sealed is not None else None,
        credential_hint=row["credential_hint"],
        headers=json.loads(row["headers"]),
        organization=row["organization"],
        local=row["local"],
        enabled=row["enabled"],
        connect_timeout_ms=row["connect_timeout_ms"],
        read_timeout_ms=row["read_timeout_ms"],
        requests_per_minute=row["requests_per_minute"],
        tokens_per_minute=row["tokens_per_minute"],
        source=row["source"],
        declared_models=tuple(json.loads(row["declared_models"])),
        health_status=row["health_status"],
        last_error=row["last_error"],
        last_probe_time=row["last_probe_time"],
        create_time=row["create_time"],
        update_time=row["update_time"],
    )
