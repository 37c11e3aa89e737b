"""Discovery's model rows (``discovery.models``): what each provider's listing said.

Pages are ordered by name in byte order (``COLLATE "C"``) so a page token means
the same on every PostgreSQL whatever its default collation.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

import asyncpg

from services.discovery.provider_store import PROVIDER_COLUMNS, provider_row
from services.discovery.records import ProviderRecord, StoredModel
from services.providers.listing import ListedModel

_MODEL_COLUMNS = (
    "m.provider_id, m.model_id, m.context_window, m.max_output_tokens, m.loaded, m.last_seen_time,"
    " m.vram_bytes, m.memory_bytes"
)


@dataclasses.dataclass(frozen=True)
class ModelChanges:
    """What replacing a provider's models did."""

    seen: int
    added: int
    removed: int
    updated: int = 0  # listed before, with a different context, memory or loaded state


class ModelStore:
    """Reads and writes ``discovery.models``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

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
        provider_columns = ", ".join(f"p.{c.strip()}" for c in PROVIDER_COLUMNS.split(","))
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
        return [(_model(r), provider_row(r)) for r in rows]


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
