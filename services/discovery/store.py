"""Discovery's PostgreSQL store: the ``discovery`` schema (providers, models).

Pages are ordered by id / name in byte order (``COLLATE "C"``) so a page token
means the same on every PostgreSQL whatever its default collation.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from orchestra.common.v1 import errors_pb2
from services.common.errors import AlreadyExists, Unavailable
from services.discovery.health import ProbeStats, Sample
from services.discovery.listing import ListedModel
from services.discovery.records import SOURCE_CONFIG, ProviderRecord, StoredModel

_PROVIDER_COLUMNS = (
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
_MODEL_COLUMNS = (
    "m.provider_id, m.model_id, m.context_window, m.max_output_tokens, m.loaded, m.last_seen_time,"
    " m.vram_bytes, m.memory_bytes"
)
_STATS_COLUMNS = (
    "subject, provider_id, status, samples, ttft_ewma_ms, consecutive_failures,"
    " consecutive_passes, last_error, probed_model_id, last_probe_time"
)


@dataclasses.dataclass(frozen=True)
class ModelChanges:
    """What replacing a provider's models did."""

    seen: int
    added: int
    removed: int
    updated: int = 0  # listed before, with a different context, memory or loaded state


class DiscoveryStore:
    """Reads and writes the ``discovery`` schema."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # --- providers -------------------------------------------------------

    async def get_provider(self, provider_id: str) -> ProviderRecord | None:
        """The provider, or None."""
        row = await self._pool.fetchrow(
            f"SELECT {_PROVIDER_COLUMNS} FROM discovery.providers WHERE provider_id = $1",
            provider_id,
        )
        return _provider(row) if row else None

    async def list_providers(
        self, *, after: str | None = None, limit: int | None = None, enabled_only: bool = False
    ) -> list[ProviderRecord]:
        """Providers by id, after ``after``, at most ``limit``."""
        rows = await self._pool.fetch(
            f"SELECT {_PROVIDER_COLUMNS} FROM discovery.providers"
            ' WHERE ($1::text IS NULL OR provider_id COLLATE "C" > $1)'
            " AND (NOT $2 OR enabled)"
            ' ORDER BY provider_id COLLATE "C" LIMIT $3',
            after,
            enabled_only,
            limit,
        )
        return [_provider(r) for r in rows]

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
                f" RETURNING {_PROVIDER_COLUMNS}",
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
        return _provider(row)

    async def update_provider(self, record: ProviderRecord) -> ProviderRecord | None:
        """Writes the settable fields of ``record``; None if it no longer exists."""
        values = _settable_values(record)
        sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(_SETTABLE, start=2))
        row = await self._pool.fetchrow(
            f"UPDATE discovery.providers SET {sets}, update_time = now()"
            f" WHERE provider_id = $1 RETURNING {_PROVIDER_COLUMNS}",
            record.provider_id,
            *values,
        )
        return _provider(row) if row else None

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
                    f"SELECT {_PROVIDER_COLUMNS} FROM discovery.providers WHERE provider_id = $1",
                    record.provider_id,
                )
                if row is not None:
                    existing = _provider(row)
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

    # --- probes ----------------------------------------------------------

    async def claim_due_probes(
        self, interval_seconds: float, limit: int, *, force: bool = False
    ) -> list[tuple[ProviderRecord, list[str], int]]:
        """Claims enabled providers due for a probe, at most ``limit``.

        Each claimed provider's next probe moves ``interval_seconds`` ahead and
        its round-robin cursor by one, in the same statement, with ``SKIP
        LOCKED``: replicas sharing the database never probe one provider twice
        in an interval. Providers without models are not claimed.

        Args:
            interval_seconds: When a claimed provider is next due.
            limit: Claim at most this many.
            force: Claim providers that are not due yet too.

        Returns:
            Each provider with its model ids (sorted) and the cursor to use.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "UPDATE discovery.providers p"
                " SET next_probe_time = now() + make_interval(secs => $1),"
                " probe_cursor = p.probe_cursor + 1"
                " WHERE p.provider_id IN (SELECT provider_id FROM discovery.providers q"
                " WHERE q.enabled"
                " AND ($3 OR q.next_probe_time IS NULL OR q.next_probe_time <= now())"
                " AND EXISTS (SELECT 1 FROM discovery.models m WHERE m.provider_id = q.provider_id)"
                ' ORDER BY q.next_probe_time NULLS FIRST, q.provider_id COLLATE "C" LIMIT $2'
                " FOR UPDATE SKIP LOCKED)"
                f" RETURNING {_PROVIDER_COLUMNS}, p.probe_cursor - 1 AS cursor",
                interval_seconds,
                limit,
                force,
            )
            ids = await conn.fetch(
                "SELECT provider_id, model_id FROM discovery.models"
                ' WHERE provider_id = ANY($1::text[]) ORDER BY model_id COLLATE "C"',
                [r["provider_id"] for r in rows],
            )
        models: dict[str, list[str]] = {}
        for r in ids:
            models.setdefault(r["provider_id"], []).append(r["model_id"])
        return [(_provider(r), models.get(r["provider_id"], []), r["cursor"]) for r in rows]

    async def load_probe_stats(self, provider_id: str | None = None) -> dict[str, ProbeStats]:
        """Probe statistics by subject (provider id or model name)."""
        rows = await self._pool.fetch(
            f"SELECT {_STATS_COLUMNS} FROM discovery.probe_stats"
            " WHERE $1::text IS NULL OR provider_id = $1",
            provider_id,
        )
        return {r["subject"]: _stats(r) for r in rows}

    async def update_probe_stats(
        self,
        provider_id: str,
        subject: str,
        change: Callable[[ProbeStats], ProbeStats],
    ) -> ProbeStats | None:
        """Applies ``change`` to a subject's statistics under a row lock.

        Returns:
            The new statistics; None if the provider no longer exists.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO discovery.probe_stats (subject, provider_id)"
                " SELECT $1, provider_id FROM discovery.providers WHERE provider_id = $2"
                " ON CONFLICT (subject) DO NOTHING",
                subject,
                provider_id,
            )
            row = await conn.fetchrow(
                f"SELECT {_STATS_COLUMNS} FROM discovery.probe_stats WHERE subject = $1 FOR UPDATE",
                subject,
            )
            if row is None:
                return None  # the provider was deleted meanwhile
            stats = change(_stats(row))
            await conn.execute(
                "UPDATE discovery.probe_stats SET status = $2, samples = $3::jsonb,"
                " ttft_ewma_ms = $4, consecutive_failures = $5, consecutive_passes = $6,"
                " last_error = $7, probed_model_id = $8, last_probe_time = $9"
                " WHERE subject = $1",
                subject,
                stats.status,
                json.dumps([s.to_json() for s in stats.window]),
                stats.ttft_ewma_ms,
                stats.consecutive_failures,
                stats.consecutive_passes,
                stats.last_error,
                stats.probed_model_id,
                stats.last_probe_time,
            )
        return stats

    # --- models ----------------------------------------------------------

    async def replace_models(
        self, provider_id: str, listed: Sequence[ListedModel], seen_at: datetime.datetime
    ) -> ModelChanges:
        """Makes ``provider_id``'s models exactly ``listed``.

        Returns:
            How many were listed, added, removed and updated.
        """
        ids = [m.model_id for m in listed]
        async with self._pool.acquire() as conn, conn.transaction():
            if (
                await conn.fetchval(
                    "SELECT 1 FROM discovery.providers WHERE provider_id = $1 FOR UPDATE",
                    provider_id,
                )
                is None
            ):
                return ModelChanges(0, 0, 0)  # deleted while it was being listed
            before = {
                r["model_id"]: ListedModel(
                    r["model_id"],
                    r["context_window"],
                    r["max_output_tokens"],
                    r["loaded"],
                    r["vram_bytes"],
                    r["memory_bytes"],
                )
                for r in await conn.fetch(
                    "SELECT model_id, context_window, max_output_tokens, loaded, vram_bytes,"
                    " memory_bytes FROM discovery.models WHERE provider_id = $1",
                    provider_id,
                )
            }
            removed = await conn.fetch(
                "DELETE FROM discovery.models WHERE provider_id = $1"
                " AND NOT (model_id = ANY($2::text[])) RETURNING model_id",
                provider_id,
                ids,
            )
            # One statement for every listed model (a pass writes thousands).
            await conn.execute(
                "INSERT INTO discovery.models (name, provider_id, model_id, context_window,"
                " max_output_tokens, loaded, first_seen_time, last_seen_time, vram_bytes,"
                " memory_bytes)"
                " SELECT $1 || '/' || u.model_id, $1, u.model_id, u.cw, u.mo, u.ld, $2, $2,"
                " u.vr, u.mem FROM unnest($3::text[], $4::int[], $5::int[], $6::bool[],"
                " $7::bigint[], $8::bigint[]) AS u(model_id, cw, mo, ld, vr, mem)"
                " ON CONFLICT (name) DO UPDATE SET context_window = EXCLUDED.context_window,"
                " max_output_tokens = EXCLUDED.max_output_tokens, loaded = EXCLUDED.loaded,"
                " last_seen_time = EXCLUDED.last_seen_time, vram_bytes = EXCLUDED.vram_bytes,"
                " memory_bytes = EXCLUDED.memory_bytes",
                provider_id,
                seen_at,
                ids,
                [m.context_window for m in listed],
                [m.max_output_tokens for m in listed],
                [m.loaded for m in listed],
                [m.vram_bytes for m in listed],
                [m.memory_bytes for m in listed],
            )
            # A model that is gone takes its probe statistics with it.
            await conn.execute(
                "DELETE FROM discovery.probe_stats WHERE provider_id = $1"
                " AND subject <> provider_id AND NOT (subject = ANY($2::text[]))",
                provider_id,
                [f"{provider_id}/{i}" for i in ids],
            )
        updated = sum(1 for m in listed if m.model_id in before and before[m.model_id] != m)
        return ModelChanges(len(ids), len(set(ids) - set(before)), len(removed), updated)

    async def load_models(
        self,
        *,
        name: str | None = None,
        provider_id: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[StoredModel, ProviderRecord]]:
        """Models of enabled providers, by name, each with its provider.

        Args:
            name: Only this model.
            provider_id: Only this provider's models.
            after: Only names after this one.
            limit: At most this many.
        """
        provider_columns = ", ".join(f"p.{c.strip()}" for c in _PROVIDER_COLUMNS.split(","))
        rows = await self._pool.fetch(
            f"SELECT {_MODEL_COLUMNS}, {provider_columns}"
            " FROM discovery.models m JOIN discovery.providers p USING (provider_id)"
            " WHERE p.enabled AND ($1::text IS NULL OR m.name = $1)"
            " AND ($2::text IS NULL OR m.provider_id = $2)"
            ' AND ($3::text IS NULL OR m.name COLLATE "C" > $3)'
            ' ORDER BY m.name COLLATE "C" LIMIT $4',
            name,
            provider_id,
            after,
            limit,
        )
        return [(_model(r), _provider(r)) for r in rows]


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


def _provider(row: asyncpg.Record) -> ProviderRecord:
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


def _model(row: asyncpg.Record) -> StoredModel:
    return StoredModel(
        provider_id=row["provider_id"],
        model_id=row["model_id"],
        context_window=row["context_window"],
        max_output_tokens=row["max_output_tokens"],
        loaded=row["loaded"],
        last_seen_time=row["last_seen_time"],
        vram_bytes=row["vram_bytes"],
        memory_bytes=row["memory_bytes"],
    )


def _stats(row: asyncpg.Record) -> ProbeStats:
    return ProbeStats(
        status=row["status"],
        window=tuple(Sample.from_json(i) for i in json.loads(row["samples"])),
        ttft_ewma_ms=row["ttft_ewma_ms"],
        consecutive_failures=row["consecutive_failures"],
        consecutive_passes=row["consecutive_passes"],
        last_error=row["last_error"],
        probed_model_id=row["probed_model_id"],
        last_probe_time=row["last_probe_time"],
    )


def store_unavailable(exc: BaseException) -> Unavailable:
    """The error for a PostgreSQL failure: retryable, with a hint when."""
    return Unavailable(
        errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
        f"PostgreSQL is unavailable: {type(exc).__name__}",
        retry_after=1.0,
    )
