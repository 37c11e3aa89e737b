"""The AuditService servicer: decode, check the caller, call the log, encode.

Proof sizes are checked against the latest signed checkpoint: a proof is only
served for a tree some checkpoint covers, so a client can always obtain the
root it verifies against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc

from orchestra.audit.v1 import audit_service_pb2, audit_service_pb2_grpc
from orchestra.common.v1 import errors_pb2, identity_pb2
from services.audit import records
from services.audit.body_store import BodyStore, Erased, seal_for
from services.audit.store import AuditStore, RecordFilter, StoredRow, store_errors
from services.audit.tree_store import StoredCheckpoint
from services.common import paging
from services.common.admin_records import admin_record
from services.common.body_transit import BodyTransit, BodyTransitError
from services.common.errors import InvalidArgument, NotFound
from services.common.identity import IdentitySigner, caller, has_scope, tenant_of

_Context = grpc.aio.ServicerContext[Any, Any]

MAX_BATCH_RECORDS = 1000
_EXPORT_BATCH = 500

pb = audit_service_pb2


def _invalid(field: str, message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument(
        errors_pb2.ERROR_REASON_INVALID_FIELD, message, field=field, metadata=metadata
    )


def _to_proto(row: StoredRow) -> pb.AuditRecord:
    return records.stored_record(row.record, row.index, row.leaf_hash)


def _beyond(field: str, size: int, log_size: int) -> InvalidArgument:
    return _invalid(
        field,
        f"{field} {size} is beyond the latest checkpoint ({log_size} records)",
        log_size=str(log_size),
    )


class AuditServicer(audit_service_pb2_grpc.AuditServiceServicer):
    """Serves the log kept by an :class:`AuditStore`."""

    def __init__(
        self, store: AuditStore, signer: IdentitySigner, bodies: BodyStore, transit: BodyTransit
    ) -> None:
        self._store = store
        self._signer = signer
        self._bodies = bodies
        self._transit = transit  # opens bodies the router sealed for its outbox

    async def AppendRecord(
        self, request: pb.AppendRecordRequest, context: _Context
    ) -> pb.AppendRecordResponse:
        """Appends one record (SCOPE_INTERNAL); idempotent per event_id."""
        caller(context, self._signer, identity_pb2.SCOPE_INTERNAL)
        if not request.HasField("record"):
            raise _invalid("record", "record is required")
        body = request.body if request.HasField("body") else None
        if body is not None and body.event_id not in ("", request.record.event_id):
            raise _invalid("body.event_id", "body.event_id must be empty or the record's event_id")
        given = {request.record.event_id: (body, "body")} if body is not None else {}
        [entry] = await self._entries([(request.record, "record")], given)
        [appended] = await self._store.append([entry])
        return pb.AppendRecordResponse(index=appended.index, leaf_hash=appended.leaf_hash)

    async def AppendRecords(
        self, request: pb.AppendRecordsRequest, context: _Context
    ) -> pb.AppendRecordsResponse:
        """Appends records in order, atomically (SCOPE_INTERNAL)."""
        caller(context, self._signer, identity_pb2.SCOPE_INTERNAL)
        if not request.records:
            raise _invalid("records", "records must not be empty")
        if len(request.records) > MAX_BATCH_RECORDS:
            raise _invalid(
                "records",
                f"at most {MAX_BATCH_RECORDS} records per call",
                limit=str(MAX_BATCH_RECORDS),
            )
        given: dict[str, tuple[pb.RecordBody, str]] = {}
        ids = {record.event_id for record in request.records}
        for i, body in enumerate(request.bodies):
            field = f"bodies[{i}]"
            if body.event_id not in ids:
                raise _invalid(f"{field}.event_id", "body.event_id names no record of the request")
            if body.event_id in given:
                raise _invalid(f"{field}.event_id", "at most one body per record")
            given[body.event_id] = (body, field)
        entries = await self._entries(
            [(record, f"records[{i}]") for i, record in enumerate(request.records)], given
        )
        appended = await self._store.append(entries)
        return pb.AppendRecordsResponse(indexes=[a.index for a in appended])

    async def _entries(
        self,
        recs: list[tuple[pb.AuditRecord, str]],
        given: dict[str, tuple[pb.RecordBody, str]],
    ) -> list[records.Entry]:
        """Validates records and seals the bodies that come with them."""
        subjects = set()
        for record, record_field in recs:
            if record.event_id not in given:
                continue  # entry_of validates it below
            records.validate(record, record_field)
            body, field = given[record.event_id]
            if record.kind != pb.RECORD_KIND_CHAT:
                raise _invalid(field, "only a RECORD_KIND_CHAT record keeps a body")
            if body.retention_days < 0:
                raise _invalid(f"{field}.retention_days", "retention_days must not be negative")
            if body.sealed_chat:
                given[record.event_id] = (self._opened(record.event_id, body, field), field)
            subjects.add((record.tenant_id, record.chat.attribution.end_user))
        keys = await self._bodies.keys_for(subjects) if subjects else {}
        entries = []
        for record, field in recs:
            sealed = None
            if record.event_id in given:
                body, _ = given[record.event_id]
                key = keys[(record.tenant_id, record.chat.attribution.end_user)]
                when = records.to_datetime(record.event_time, f"{field}.event_time")
                sealed = seal_for(key, record, body, when)
            entries.append(records.entry_of(record, field, sealed))
        return entries

    def _opened(self, event_id: str, body: pb.RecordBody, field: str) -> pb.RecordBody:
        """``body`` with its sealed_chat opened into chat."""
        if body.HasField("chat"):
            raise _invalid(f"{field}.sealed_chat", "set chat or sealed_chat, not both")
        try:
            chat = self._transit.open(event_id, body.sealed_chat)
        except BodyTransitError as exc:
            raise _invalid(f"{field}.sealed_chat", str(exc)) from None
        return pb.RecordBody(event_id=body.event_id, chat=chat, retention_days=body.retention_days)

    async def ListRecords(
        self, request: pb.ListRecordsRequest, context: _Context
    ) -> pb.ListRecordsResponse:
        """Pages through one tenant's records, oldest first (SCOPE_READ)."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_READ)
        where = _filter(request, tenant_of(identity, request.tenant_id))
        size = paging.page_size(request.page_size)
        digest = dataclasses.asdict(where)
        after = _last_index(paging.decode(request.page_token, digest))
        rows = await self._store.find(where, after, size + 1)
        token = paging.encode(rows[size - 1].index, digest) if len(rows) > size else ""
        return pb.ListRecordsResponse(
            records=[_to_proto(row) for row in rows[:size]], next_page_token=token
        )

    async def GetLatestCheckpoint(
        self, request: pb.GetLatestCheckpointRequest, context: _Context
    ) -> pb.GetLatestCheckpointResponse:
        """The newest signed checkpoint (SCOPE_READ); NOT_FOUND for an empty log."""
        caller(context, self._signer, identity_pb2.SCOPE_READ)
        return pb.GetLatestCheckpointResponse(checkpoint=(await self._latest()).to_proto())

    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: _Context
    ) -> pb.ListCheckpointsResponse:
        """Pages through signed checkpoints, oldest first (SCOPE_READ)."""
        caller(context, self._signer, identity_pb2.SCOPE_READ)
        size = paging.page_size(request.page_size)
        after = _last_index(paging.decode(request.page_token, "checkpoints"))
        async with store_errors():
            found = await self._store.tree.checkpoints(after or 0, size + 1)
        token = paging.encode(found[size - 1].tree_size, "checkpoints") if len(found) > size else ""
        return pb.ListCheckpointsResponse(
            checkpoints=[c.to_proto() for c in found[:size]], next_page_token=token
        )

    async def GetInclusionProof(
        self, request: pb.GetInclusionProofRequest, context: _Context
    ) -> pb.GetInclusionProofResponse:
        """The audit path of one record in a checkpointed tree (SCOPE_READ)."""
        caller(context, self._signer, identity_pb2.SCOPE_READ)
        if request.leaf_index < 0:
            raise _invalid("leaf_index", "leaf_index must not be negative")
        if request.tree_size < 0:
            raise _invalid("tree_size", "tree_size must not be negative")
        latest = (await self._latest()).tree_size
        size = request.tree_size or latest
        if size > latest:
            raise _beyond("tree_size", size, latest)
        if request.leaf_index >= size:
            raise _invalid(
                "leaf_index",
                f"leaf_index {request.leaf_index} is not in a tree of {size} records",
                tree_size=str(size),
            )
        async with store_errors():
            hashes = await self._store.tree.inclusion_proof(request.leaf_index, size)
        return pb.GetInclusionProofResponse(
            leaf_index=request.leaf_index, tree_size=size, hashes=hashes
        )

    async def GetConsistencyProof(
        self, request: pb.GetConsistencyProofRequest, context: _Context
    ) -> pb.GetConsistencyProofResponse:
        """Proof that one checkpointed tree extends another (SCOPE_READ)."""
        caller(context, self._signer, identity_pb2.SCOPE_READ)
        if request.first_tree_size < 0:
            raise _invalid("first_tree_size", "first_tree_size must not be negative")
        if request.second_tree_size < 0:
            raise _invalid("second_tree_size", "second_tree_size must not be negative")
        latest = (await self._latest()).tree_size
        second = request.second_tree_size or latest
        if second > latest:
            raise _beyond("second_tree_size", second, latest)
        if request.first_tree_size > second:
            raise _invalid(
                "first_tree_size",
                f"first_tree_size {request.first_tree_size} is after second_tree_size {second}",
                second_tree_size=str(second),
            )
        async with store_errors():
            hashes = await self._store.tree.consistency_proof(request.first_tree_size, second)
        return pb.GetConsistencyProofResponse(
            first_tree_size=request.first_tree_size, second_tree_size=second, hashes=hashes
        )

    async def _latest(self) -> StoredCheckpoint:
        """The latest checkpoint. Raises NotFound (RESOURCE_NOT_FOUND) for an empty log."""
        async with store_errors():
            latest = await self._store.tree.latest()
        if latest is None:
            raise NotFound(
                errors_pb2.ERROR_REASON_RESOURCE_NOT_FOUND,
                "the audit log is empty: no checkpoint yet",
            )
        return latest

    async def ExportRecords(
        self, request: pb.ExportRecordsRequest, context: _Context
    ) -> AsyncIterator[pb.ExportRecordsResponse]:
        """Streams an index range (SCOPE_READ); non-operators get their tenant's records."""
        identity = caller(context, self._signer, identity_pb2.SCOPE_READ)
        operator = has_scope(identity, identity_pb2.SCOPE_OPERATOR)
        tenant = None if operator else identity.tenant_id
        start, end = await self._export_range(request)
        while start < end:
            rows = await self._store.scan(start, end, _EXPORT_BATCH, tenant)
            for row in rows:
                yield pb.ExportRecordsResponse(record=_to_proto(row))
            if len(rows) < _EXPORT_BATCH:
                return
            start = rows[-1].index + 1

    async def GetRecordBody(
        self, request: pb.GetRecordBodyRequest, context: _Context
    ) -> pb.GetRecordBodyResponse:
        """Decrypts a chat record's body (SCOPE_ADMIN on its tenant, or SCOPE_OPERATOR)."""
        identity = caller(
            context, self._signer, identity_pb2.SCOPE_ADMIN, identity_pb2.SCOPE_OPERATOR
        )
        if not request.event_id:
            raise _invalid("event_id", "event_id is required")
        records.check_text(request.event_id, "event_id")
        operator = has_scope(identity, identity_pb2.SCOPE_OPERATOR)
        index, tenant, body = await self._bodies.read(
            request.event_id, None if operator else identity.tenant_id
        )
        # Reading personal data is itself an audited act.
        record = admin_record(
            tenant_id=tenant,
            actor=identity.key_id,
            action="orchestra.audit.v1.AuditService/GetRecordBody",
            resource=f"records/{index}",
            details={"event_id": request.event_id},
        )
        await self._store.append([records.entry_of(record, "access")])
        return pb.GetRecordBodyResponse(index=index, body=body)

    async def EraseSubject(
        self, request: pb.EraseSubjectRequest, context: _Context
    ) -> pb.EraseSubjectResponse:
        """Destroys a subject's keys and audits it (SCOPE_ADMIN, or SCOPE_OPERATOR)."""
        identity = caller(
            context, self._signer, identity_pb2.SCOPE_ADMIN, identity_pb2.SCOPE_OPERATOR
        )
        tenant = tenant_of(identity, request.tenant_id)
        if not tenant:
            raise _invalid("tenant_id", "tenant_id is required (the caller has no tenant)")
        for name in ("tenant_id", "end_user"):
            records.check_text(getattr(request, name), name)
        records.check_text(request.reason, "reason", records.MAX_REASON_CHARS)
        done: list[Erased] = []

        async def destroy(conn: Any) -> list[records.Entry]:
            erased = await BodyStore.erase(conn, tenant, request.end_user)
            done.append(erased)
            record = admin_record(
                tenant_id=tenant,
                actor=identity.key_id,
                action="orchestra.audit.v1.AuditService/EraseSubject",
                resource=f"tenants/{tenant}/endUsers/{request.end_user}",
                details={
                    "end_user": request.end_user,
                    "keys_destroyed": erased.keys_destroyed,
                    "bodies_unreadable": erased.bodies_unreadable,
                    "reason": request.reason,
                },
            )
            return [records.entry_of(record, "erasure")]

        [appended] = await self._store.append_after(destroy)
        return pb.EraseSubjectResponse(
            keys_destroyed=done[0].keys_destroyed,
            bodies_unreadable=done[0].bodies_unreadable,
            audit_index=appended.index,
        )

    async def _export_range(self, request: pb.ExportRecordsRequest) -> tuple[int, int]:
        """The [start, end) an export covers, fixed when the call starts."""
        if request.start_index < 0:
            raise _invalid("start_index", "start_index must not be negative")
        if request.end_index < 0:
            raise _invalid("end_index", "end_index must not be negative")
        size = await self._store.size()
        end = request.end_index or size
        if end > size:
            raise _invalid(
                "end_index", f"end_index is beyond the log ({size} records)", log_size=str(size)
            )
        if request.start_index > end:
            raise _invalid(
                "start_index",
                f"start_index is after the end of the range ({end})",
                log_size=str(size),
            )
        return request.start_index, end


def _filter(request: pb.ListRecordsRequest, tenant_id: str) -> RecordFilter:
    """The store filter a ListRecords request asks for.

    Raises:
        InvalidArgument: INVALID_FIELD for a bad time range or kind.
    """
    if not tenant_id:
        raise _invalid("tenant_id", "tenant_id is required (the caller has no tenant)")
    records.check_text(tenant_id, "tenant_id")
    start = (
        records.to_datetime(request.start_time, "start_time")
        if request.HasField("start_time")
        else None
    )
    end = (
        records.to_datetime(request.end_time, "end_time") if request.HasField("end_time") else None
    )
    if start is not None and end is not None and end <= start:
        raise _invalid("end_time", "end_time must be after start_time")
    if request.kind not in pb.RecordKind.values():
        raise _invalid("kind", f"unknown kind {request.kind}")
    for name in ("model", "actor", "end_user"):
        records.check_text(getattr(request, name), name)
    return RecordFilter(
        tenant_id=tenant_id,
        start_time=start,
        end_time=end,
        kind=request.kind,
        model=request.model,
        actor=request.actor,
        end_user=request.end_user,
    )


def _last_index(key: object) -> int | None:
    """The last index a page token carries (None: first page)."""
    if key is None:
        return None
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise InvalidArgument(
            errors_pb2.ERROR_REASON_INVALID_PAGE_TOKEN,
            "page_token is malformed; start again without it",
            field="page_token",
        )
    return key
