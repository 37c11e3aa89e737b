"""Sealed chat bodies and subject keys in PostgreSQL (migrations/003_bodies.sql).

Nothing here touches ``audit.records``: erasure deletes subject keys and
retention deletes sealed bodies, both in side tables, so the hashed log stays
append-only and verifiable.

An append racing the erasure of the same subject may seal its body under the
key being destroyed; that body is then unreadable, as if it had been erased
too. Nothing is ever readable after its key is gone.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from collections.abc import Iterable
from typing import Any

import asyncpg

from orchestra.audit.v1 import audit_service_pb2 as pb
from orchestra.common.v1 import errors_pb2
from services.audit import bodies
from services.audit.bodies import BodyError, KeyWrapper, SealedBody, SubjectKey
from services.audit.store import store_errors
from services.common.errors import FailedPrecondition, Internal, NotFound

Subject = tuple[str, str]
"""(tenant_id, end_user)."""


@dataclasses.dataclass(frozen=True)
class Erased:
    """What an erasure destroyed.

    Attributes:
        keys_destroyed: Subject keys deleted.
        bodies_unreadable: Stored bodies those keys sealed.
    """

    keys_destroyed: int
    bodies_unreadable: int


class BodyStore:
    """Subject keys and sealed bodies."""

    def __init__(self, pool: asyncpg.Pool, wrapper: KeyWrapper) -> None:
        self._pool = pool
        self._wrapper = wrapper

    async def keys_for(self, subjects: Iterable[Subject]) -> dict[Subject, SubjectKey]:
        """Each subject's live key, created on first use.

        Raises:
            Unavailable: STORE_UNAVAILABLE.
            Internal: AUDIT_BODY_CORRUPT when a stored key does not unwrap.
        """
        wanted = sorted(set(subjects))
        if not wanted:
            return {}
        async with store_errors():
            found = await self._select(wanted)
            missing = [s for s in wanted if s not in found]
            if missing:
                new = [(s, *self._wrapper.new_key(*s)) for s in missing]
                # A concurrent first use may win; then its key is the one read back.
                await self._pool.execute(
                    "INSERT INTO audit.subject_keys (key_id, tenant_id, end_user, wrapped)"
                    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])"
                    " ON CONFLICT (tenant_id, end_user) DO NOTHING",
                    [key.key_id for _, key, _ in new],
                    [s[0] for s, _, _ in new],
                    [s[1] for s, _, _ in new],
                    [wrapped for _, _, wrapped in new],
                )
                found.update(await self._select(missing))
        return found

    async def _select(self, subjects: list[Subject]) -> dict[Subject, SubjectKey]:
        rows = await self._pool.fetch(
            "SELECT k.key_id, k.tenant_id, k.end_user, k.wrapped FROM audit.subject_keys k"
            " JOIN unnest($1::text[], $2::text[]) AS s(tenant_id, end_user)"
            " USING (tenant_id, end_user)",
            [s[0] for s in subjects],
            [s[1] for s in subjects],
        )
        return {
            (r["tenant_id"], r["end_user"]): self._unwrap(
                r["key_id"], r["tenant_id"], r["end_user"], bytes(r["wrapped"])
            )
            for r in rows
        }

    def _unwrap(self, key_id: str, tenant_id: str, end_user: str, wrapped: bytes) -> SubjectKey:
        try:
            return self._wrapper.unwrap(key_id, tenant_id, end_user, wrapped)
        except BodyError as exc:
            raise Internal(
                errors_pb2.ERROR_REASON_AUDIT_BODY_CORRUPT,
                f"{exc} (was ORCHESTRA_INTERNAL_KEY changed?)",
                metadata={"key_id": key_id},
            ) from None

    async def read(self, event_id: str, tenant_id: str | None) -> tuple[int, str, pb.ChatBody]:
        """The decrypted body of a chat record.

        Args:
            event_id: The record's event id.
            tenant_id: Only a record of this tenant (None: any tenant).

        Returns:
            The record's index, its tenant and its body.

        Raises:
            NotFound: RESOURCE_NOT_FOUND (no such record for the caller),
                AUDIT_BODY_NOT_KEPT (none stored, or dropped by retention).
            FailedPrecondition: AUDIT_SUBJECT_ERASED.
            Internal: AUDIT_BODY_CORRUPT.
            Unavailable: STORE_UNAVAILABLE.
        """
        async with store_errors():
            row = await self._pool.fetchrow(
                "SELECT r.index, r.tenant_id, r.record, b.sealed, k.wrapped"
                " FROM audit.records r"
                " LEFT JOIN audit.bodies b ON b.event_id = r.event_id"
                " LEFT JOIN audit.subject_keys k ON k.key_id = b.key_id"
                " WHERE r.event_id = $1",
                event_id,
            )
        if row is None or (tenant_id is not None and row["tenant_id"] != tenant_id):
            raise NotFound(
                errors_pb2.ERROR_REASON_RESOURCE_NOT_FOUND,
                f"no audit record {event_id!r}",
                metadata={"event_id": event_id},
            )
        record = pb.AuditRecord.FromString(bytes(row["record"]))
        chat = record.chat
        meta = {"event_id": event_id, "index": str(row["index"])}
        if not chat.body_key_id:
            raise NotFound(
                errors_pb2.ERROR_REASON_AUDIT_BODY_NOT_KEPT,
                "this record keeps no body (its tenant's policy kept hashes or nothing)",
                metadata=meta,
            )
        if row["sealed"] is None:
            raise NotFound(
                errors_pb2.ERROR_REASON_AUDIT_BODY_NOT_KEPT,
                "this record's body was dropped by the tenant's retention policy",
                metadata=meta,
            )
        sealed = bytes(row["sealed"])
        if hashlib.sha256(sealed).digest() != chat.body_sha256:
            raise Internal(
                errors_pb2.ERROR_REASON_AUDIT_BODY_CORRUPT,
                "the stored body does not match the record's body_sha256",
                metadata=meta,
            )
        if row["wrapped"] is None:
            raise FailedPrecondition(
                errors_pb2.ERROR_REASON_AUDIT_SUBJECT_ERASED,
                "this record's subject was erased: its body can never be decrypted",
                metadata=meta,
            )
        end_user = chat.attribution.end_user
        key = self._unwrap(chat.body_key_id, record.tenant_id, end_user, bytes(row["wrapped"]))
        try:
            plain = bodies.open_body(key, event_id, record.tenant_id, end_user, sealed)
        except BodyError as exc:
            raise Internal(
                errors_pb2.ERROR_REASON_AUDIT_BODY_CORRUPT, str(exc), metadata=meta
            ) from None
        return int(row["index"]), record.tenant_id, pb.ChatBody.FromString(plain)

    @staticmethod
    async def erase(conn: Any, tenant_id: str, end_user: str) -> Erased:
        """Destroys a subject's keys on ``conn`` (the caller's transaction)."""
        gone = await conn.fetch(
            "DELETE FROM audit.subject_keys WHERE tenant_id = $1 AND end_user = $2"
            " RETURNING key_id",
            tenant_id,
            end_user,
        )
        key_ids = [r["key_id"] for r in gone]
        count = 0
        if key_ids:
            count = await conn.fetchval(
                "SELECT count(*) FROM audit.bodies WHERE key_id = ANY($1::text[])", key_ids
            )
        return Erased(len(key_ids), int(count))

    async def drop_expired(self, now: datetime.datetime) -> int:
        """Retention: deletes sealed bodies whose expire_time is at or before ``now``.

        Returns:
            How many were dropped.

        Raises:
            Unavailable: STORE_UNAVAILABLE.
        """
        async with store_errors():
            status = await self._pool.execute(
                "DELETE FROM audit.bodies WHERE expire_time <= $1", now
            )
        return int(status.split()[-1])


@dataclasses.dataclass(frozen=True)
class BadBody:
    """A stored body that does not match what its record commits to.

    Attributes:
        event_id: The body's event id.
        index: Its record's index (None: no record has that event id).
        reason: What is wrong.
    """

    event_id: str
    index: int | None
    reason: str


async def check_bodies(pool: asyncpg.Pool) -> BadBody | None:
    """Checks every stored body against its record's ``body_sha256``.

    The bodies are outside the Merkle tree, but each record commits to its
    sealed body, so an altered, swapped or injected ciphertext shows here
    (erased and expired bodies are fine: no key, or no row, is not tampering).

    Returns:
        The first bad body in index order, or None.

    Raises:
        Unavailable: STORE_UNAVAILABLE.
    """
    async with store_errors(), pool.acquire() as conn, conn.transaction():
        rows = conn.cursor(
            "SELECT b.event_id, r.index, r.record, b.sealed FROM audit.bodies b"
            " LEFT JOIN audit.records r ON r.event_id = b.event_id"
            " ORDER BY r.index NULLS FIRST, b.event_id"
        )
        async for row in rows:
            event_id, index = row["event_id"], row["index"]
            if index is None:
                return BadBody(event_id, None, "a body with no record")
            committed = pb.AuditRecord.FromString(bytes(row["record"])).chat.body_sha256
            if hashlib.sha256(bytes(row["sealed"])).digest() != committed:
                return BadBody(event_id, index, "the body does not match the record's body_sha256")
    return None


def expire_time(event_time: datetime.datetime, retention_days: int) -> datetime.datetime | None:
    """When a body kept ``retention_days`` days after ``event_time`` is dropped."""
    if retention_days <= 0:
        return None
    return event_time + datetime.timedelta(days=retention_days)


def seal_for(
    key: SubjectKey, record: pb.AuditRecord, body: pb.RecordBody, event_time: datetime.datetime
) -> SealedBody:
    """Seals ``body`` for ``record`` under its subject's ``key``."""
    return bodies.seal(
        key,
        record.event_id,
        record.tenant_id,
        record.chat.attribution.end_user,
        body.chat.SerializeToString(deterministic=True),
        expire_time(event_time, body.retention_days),
    )
