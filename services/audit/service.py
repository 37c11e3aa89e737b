"""The AuditService servicer: decode, check the caller, call the log, encode.

Checkpoints and proofs (GetLatestCheckpoint, ListCheckpoints,
GetInclusionProof, GetConsistencyProof) come with the Merkle tree; until then
they keep the generated base class's UNIMPLEMENTED answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc

from orchestra.audit.v1 import audit_service_pb2, audit_service_pb2_grpc
from orchestra.common.v1 import errors_pb2, identity_pb2
from services.audit import records
from services.audit.store import AuditStore, RecordFilter, StoredRow
from services.common import paging
from services.common.errors import InvalidArgument
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


class AuditServicer(audit_service_pb2_grpc.AuditServiceServicer):
    """Serves the log kept by an :class:`AuditStore`."""

    def __init__(self, store: AuditStore, signer: IdentitySigner) -> None:
        self._store = store
        self._signer = signer

    async def AppendRecord(  # noqa: N802 - gRPC method name
        self, request: pb.AppendRecordRequest, context: _Context
    ) -> pb.AppendRecordResponse:
        """Appends one record (SCOPE_INTERNAL); idempotent per event_id."""
        caller(context, self._signer, identity_pb2.SCOPE_INTERNAL)
        if not request.HasField("record"):
            raise _invalid("record", "record is required")
        [appended] = await self._store.append([records.entry_of(request.record, "record")])
        return pb.AppendRecordResponse(index=appended.index, leaf_hash=appended.leaf_hash)

    async def AppendRecords(  # noqa: N802 - gRPC method name
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
        entries = [
            records.entry_of(record, f"records[{i}]") for i, record in enumerate(request.records)
        ]
        appended = await self._store.append(entries)
        return pb.AppendRecordsResponse(indexes=[a.index for a in appended])

    async def ListRecords(  # noqa: N802 - gRPC method name
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

    async def ExportRecords(  # noqa: N802 - gRPC method name
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
