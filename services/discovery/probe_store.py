"""Discovery's probe schedule and statistics (``discovery.probe_stats``)."""

from __future__ import annotations

import json
from collections.abc import Callable

import asyncpg

from services.discovery.health import ProbeStats, Sample
from services.discovery.provider_store import PROVIDER_COLUMNS, provider_row
from services.discovery.records import ProviderRecord

_STATS_COLUMNS = (
    "subject, provider_id, status, samples, ttft_ewma_ms, consecutive_failures,"
    " consecutive_passes, last_error, probed_model_id, last_probe_time"
)


class ProbeStore:
    """Claims due probes and keeps their statistics."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

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
                f" RETURNING {PROVIDER_COLUMNS}, p.probe_cursor - 1 AS cursor",
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
        return [(provider_row(r), models.get(r["provider_id"], []), r["cursor"]) for r in rows]

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
