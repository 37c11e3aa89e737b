"""The helper producers (the router) use to append to the log."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestra.audit.v1 import audit_service_pb2

if TYPE_CHECKING:
    from orchestra.audit.v1.audit_service_pb2_grpc import AuditServiceAsyncStub

# The contract's deadline for AppendRecord; callers spool and retry on failure.
APPEND_DEADLINE_SECONDS = 1.0


async def append(stub: AuditServiceAsyncStub, record: audit_service_pb2.AuditRecord) -> int:
    """Appends ``record`` and returns its index (the original one on a repeat).

    Raises:
        grpc.aio.AioRpcError: The append failed; decode it with
            ``services.common.errors.decode``.
    """
    response = await stub.AppendRecord(
        audit_service_pb2.AppendRecordRequest(record=record), timeout=APPEND_DEADLINE_SECONDS
    )
    return response.index
