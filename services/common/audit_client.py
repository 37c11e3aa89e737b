"""The helper other services call to audit an administrative change.

Appends go straight to AuditService.AppendRecord with the service's own
identity token, retried with backoff while the audit service is unreachable.
The append is idempotent per event_id, so a retry after a lost reply never
duplicates a record. Two ways to use it:

* :meth:`AdminAuditor.record` waits for the append (a few retries) and raises
  when every attempt failed: for a caller that must not proceed unaudited.
* :meth:`AdminAuditor.submit` queues the record and returns at once; a
  background task appends queued records in order, retrying until the audit
  service is back, so an admin RPC never waits on the audit service. The queue
  is in memory: :meth:`AdminAuditor.aclose` drains it on shutdown and logs
  any record it could not append at ERROR, as JSON, for replay; a crash loses
  what was queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

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


class AdminAuditor:
    """Appends administrative-change records for one service."""

    def __init__(
        self,
        to_audit: grpc.aio.Channel,
        token: ServiceToken,
        *,
        attempts: int = 5,
        deadline: float = 1.0,
        first_backoff: float = 0.1,
    ) -> None:
        """An auditor appending through ``to_audit``.

        Args:
            to_audit: A channel to the audit service (``services.common.clients.channel``);
                the caller closes it (see :meth:`connect` for one the auditor owns).
            token: The calling service's identity (SCOPE_INTERNAL).
            attempts: Tries of :meth:`record` before giving up.
            deadline: Per-attempt deadline, seconds.
            first_backoff: Wait after the first failure; doubles each time (max 2 s
                for :meth:`record`, 30 s for queued records).
        """
        self._channel = to_audit
        self._owned: grpc.aio.Channel | None = None
        self._stub: Any = audit_service_pb2_grpc.AuditServiceStub(to_audit)
        self._token = token
        self._attempts = attempts
        self._deadline = deadline
        self._first_backoff = first_backoff
        self._queue: collections.deque[pb.AuditRecord] = collections.deque()
        self._drainer: asyncio.Task[None] | None = None
        self._unreachable = False  # the last queued append failed transiently

    @classmethod
    def connect(cls, address: str, signer: IdentitySigner, service: str) -> AdminAuditor:
        """An auditor with its own channel to the audit service (closed by :meth:`aclose`).

        Args:
            address: The audit service (``settings.addrs["audit"]``).
            signer: The suite's identity signer.
            service: The calling service's name ("budget", "discovery").
        """
        auditor = cls(channel(address), ServiceToken(signer, service))
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

    def submit(self, record: pb.AuditRecord) -> None:
        """Queues ``record`` for a background append, in submission order."""
        self._queue.append(record)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="admin-audit")

    @property
    def pending(self) -> int:
        """Records queued and not yet appended."""
        return len(self._queue)

    async def _drain(self) -> None:
        backoff = self._first_backoff
        while self._queue:
            record = self._queue[0]
            try:
                await self._append(record)
                self._unreachable = False
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _TRANSIENT:
                    self._unreachable = True
                    log.warning(
                        "audit service unreachable (%s); %d admin record(s) queued",
                        exc.code().name,
                        len(self._queue),
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_QUEUE_BACKOFF)
                    continue
                # Retrying cannot help; keep the record in the logs.
                _log_lost(record, exc.code().name)
            self._queue.popleft()
            backoff = self._first_backoff

    async def flush(self) -> None:
        """Waits until every queued record is appended."""
        while self._drainer is not None and not self._drainer.done():
            await asyncio.shield(self._drainer)

    async def aclose(self, grace: float = 5.0) -> None:
        """Drains the queue for up to ``grace`` seconds; logs what is left.

        Does not wait while the audit service is unreachable: the records are
        logged at once.
        """
        if self._drainer is not None and not self._drainer.done():
            # Wait in short slices: give up as soon as an append fails for
            # want of the audit service, not only when the grace is over.
            loop = asyncio.get_running_loop()
            until = loop.time() + grace
            while not self._drainer.done() and not self._unreachable and loop.time() < until:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._drainer), 0.05)
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        while self._queue:
            _log_lost(self._queue.popleft(), "shutdown")
        if self._owned is not None:
            await self._owned.close()


_MAX_QUEUE_BACKOFF = 30.0


def _log_lost(record: pb.AuditRecord, why: str) -> None:
    log.error(
        "audit record not appended (%s): %s", why, json_format.MessageToJson(record, indent=None)
    )
