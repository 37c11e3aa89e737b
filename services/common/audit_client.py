"""The helper other services call to audit an administrative change.

Appends go to AuditService.AppendRecord with the service's own identity token,
retried with backoff while the audit service is unreachable. The append is
idempotent per event_id, so a retry after a lost reply never duplicates a
record. Two ways to use it:

* :meth:`AdminAuditor.record` waits for the append (a few retries) and raises
  when every attempt failed: for a caller that must not proceed unaudited.
* :meth:`AdminAuditor.submit` writes the record to the service's own
  PostgreSQL outbox table (``<service>.admin_outbox``, created by the service's
  migrations) and returns; a background task appends outbox rows in order and
  deletes each once the audit service has it. The outbox is durable: a record
  survives a crash or a stop of the service and an outage of the audit
  service, and any replica of the service delivers it (rows are claimed with
  ``FOR UPDATE SKIP LOCKED``). A record the audit service refuses for good
  (INVALID_ARGUMENT, ...) stays in the table with the refusal in ``refused``,
  for an operator to read, rather than being retried for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
import grpc
from google.protobuf import json_format

from orchestra.audit.v1 import audit_service_pb2 as pb
from orchestra.audit.v1 import audit_service_pb2_grpc
from services.common.clients import ServiceToken, channel
from services.common.identity import IdentitySigner

log = logging.getLogger(__name__)

# Worth retrying: the audit service or its database is briefly away.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
_MAX_QUEUE_BACKOFF = 30.0
# Rows appended per transaction, and how often the table is looked at when
# nothing was submitted here (rows another replica or an earlier run left).
_BATCH = 32
_POLL_SECONDS = 5.0


class AdminAuditor:
    """Appends administrative-change records for one service."""

    def __init__(
        self,
        to_audit: grpc.aio.Channel,
        token: ServiceToken,
        outbox: asyncpg.Pool | None = None,
        *,
        table: str = "",
        attempts: int = 5,
        deadline: float = 1.0,
        first_backoff: float = 0.1,
    ) -> None:
        """An auditor appending through ``to_audit``.

        Args:
            to_audit: A channel to the audit service (``services.common.clients.channel``);
                the caller closes it (see :meth:`connect` for one the auditor owns).
            token: The calling service's identity (SCOPE_INTERNAL).
            outbox: The service's PostgreSQL pool, holding ``table``; needed by
                :meth:`submit`.
            table: The outbox table, schema-qualified (``budget.admin_outbox``).
            attempts: Tries of :meth:`record` before giving up.
            deadline: Per-attempt deadline, seconds.
            first_backoff: Wait after the first failure; doubles each time (max 2 s
                for :meth:`record`, 30 s for outbox rows).
        """
        self._channel = to_audit
        self._owned: grpc.aio.Channel | None = None
        self._stub: Any = audit_service_pb2_grpc.AuditServiceStub(to_audit)
        self._token = token
        self._pool = outbox
        self._table = table
        self._attempts = attempts
        self._deadline = deadline
        self._first_backoff = first_backoff
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # set while the drainer found nothing to do

    @classmethod
    def connect(
        cls, address: str, signer: IdentitySigner, service: str, outbox: asyncpg.Pool
    ) -> AdminAuditor:
        """An auditor with its own channel to the audit service (closed by :meth:`aclose`).

        Args:
            address: The audit service (``settings.addrs["audit"]``).
            signer: The suite's identity signer.
            service: The calling service's name ("budget", "discovery"); its
                schema holds the outbox table ``<service>.admin_outbox``.
            outbox: The service's PostgreSQL pool.
        """
        auditor = cls(
            channel(address), ServiceToken(signer, service), outbox, table=f"{service}.admin_outbox"
        )
        auditor._owned = auditor._channel
        return auditor

    async def _append(self, record: pb.AuditRecord) -> int:
        reply = await self._stub.AppendRecord(
            pb.AppendRecordRequest(record=record),
            timeout=self._deadline,
            metadata=self._token.metadata(),
        )
        return int(reply.index)

    async def record(self, record: pb.AuditRecord) -> int:
        """Appends ``record`` (build it with ``admin_records.admin_record``).

        Returns:
            Its index in the log.

        Raises:
            grpc.aio.AioRpcError: A permanent error (e.g. INVALID_ARGUMENT), or
                the last transient one once every attempt failed.
        """
        backoff = self._first_backoff
        for attempt in range(1, self._attempts + 1):
            try:
                return await self._append(record)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _TRANSIENT or attempt == self._attempts:
                    raise
                log.warning(
                    "audit append of %s failed (%s), attempt %d/%d; retrying",
                    record.event_id,
                    exc.code().name,
                    attempt,
                    self._attempts,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def submit(self, record: pb.AuditRecord) -> None:
        """Writes ``record`` to the outbox; it is appended in the background, in order.

        Raises:
            asyncpg.PostgresError, OSError: The outbox table could not be written.
        """
        if self._pool is None:
            raise RuntimeError("AdminAuditor.submit needs an outbox pool")
        await self._pool.execute(
            f"INSERT INTO {self._table} (event_id, record) VALUES ($1, $2)"
            " ON CONFLICT (event_id) DO NOTHING",
            record.event_id,
            record.SerializeToString(),
        )
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        """Starts delivering outbox rows, those left by an earlier run included."""
        if self._pool is not None and self._drainer is None:
            self._drainer = asyncio.create_task(self._deliver_forever(), name="admin-audit")

    async def pending(self) -> int:
        """Outbox rows not yet appended (refused ones excluded)."""
        assert self._pool is not None
        count = await self._pool.fetchval(
            f"SELECT count(*) FROM {self._table} WHERE refused IS NULL"
        )
        return int(count)

    async def flush(self) -> None:
        """Waits until every outbox row has been appended (or refused)."""
        while await self.pending():
            self._wake.set()
            self._idle.clear()
            await self._idle.wait()

    async def _deliver_forever(self) -> None:
        backoff = self._first_backoff
        while True:
            try:
                delivered = await self._deliver_batch()
            except (grpc.aio.AioRpcError, asyncpg.PostgresError, OSError) as exc:
                name = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
                log.warning("admin audit outbox waits (%s); retrying in %.1fs", name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_QUEUE_BACKOFF)
                continue
            backoff = self._first_backoff
            if delivered:
                continue  # look again: more may have come meanwhile
            self._idle.set()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _POLL_SECONDS)

    async def _deliver_batch(self) -> int:
        """Appends up to one batch of rows in order and deletes them.

        Returns:
            The rows finished with (appended, or kept as refused).

        Raises:
            grpc.aio.AioRpcError: A transient failure, once the rows before it
                are deleted; it and the rest stay for the next try.
        """
        assert self._pool is not None
        transient: grpc.aio.AioRpcError | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT id, record FROM {self._table} WHERE refused IS NULL"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                _BATCH,
            )
            done: list[int] = []
            for row in rows:
                record = pb.AuditRecord.FromString(row["record"])
                try:
                    await self._append(record)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in _TRANSIENT:
                        transient = exc
                        break
                    log.error(
                        "audit refused admin record %s (%s); kept in %s",
                        record.event_id,
                        exc.code().name,
                        self._table,
                    )
                    await conn.execute(
                        f"UPDATE {self._table} SET refused = $2 WHERE id = $1",
                        row["id"],
                        f"{exc.code().name}: {exc.details()}",
                    )
                done.append(row["id"])
            if done:
                await conn.execute(
                    f"DELETE FROM {self._table} WHERE id = ANY($1::bigint[]) AND refused IS NULL",
                    done,
                )
        if transient is not None:
            raise transient
        return len(done)

    async def aclose(self) -> None:
        """Stops delivering: rows not yet appended stay in the outbox for the next start."""
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
            self._drainer = None
        if self._owned is not None:
            await self._owned.close()


def log_unrecorded(record: pb.AuditRecord, why: str) -> None:
    """Logs a record that reached neither the outbox nor the audit log, as JSON, at ERROR."""
    log.error(
        "audit record not appended (%s): %s", why, json_format.MessageToJson(record, indent=None)
    )
