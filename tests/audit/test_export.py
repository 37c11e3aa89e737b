"""ExportRecords: index ranges, oldest first, per tenant unless an operator."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from orchestra.audit.v1 import audit_service_pb2 as pb
from services.audit import audit_service, hashing, records
from services.common import errors
from tests.audit.conftest import Audit, Metadata
from tests.audit.factory import admin, chat

_RECORDS = [chat(f"c{i}", "globex" if i % 4 == 3 else "acme", minute=i) for i in range(12)]


async def _seed(audit: Audit, internal: Metadata) -> None:
    await audit.stub.AppendRecords(pb.AppendRecordsRequest(records=_RECORDS), metadata=internal)


async def _export(audit: Audit, metadata: Metadata, start: int = 0, end: int = 0) -> list[str]:
    call = audit.stub.ExportRecords(
        pb.ExportRecordsRequest(start_index=start, end_index=end), metadata=metadata
    )
    return [response.record.event_id async for response in call]


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [(0, 0, range(12)), (5, 0, range(5, 12)), (2, 6, range(2, 6)), (12, 0, []), (4, 4, [])],
    ids=["all", "from", "range", "at-end", "empty"],
)
async def test_an_operator_exports_any_range_of_the_whole_log(
    audit: Audit,
    internal: Metadata,
    operator: Metadata,
    start: int,
    end: int,
    expected: range | list[int],
) -> None:
    await _seed(audit, internal)

    assert await _export(audit, operator, start, end) == [f"c{i}" for i in expected]


async def test_exported_records_recompute_the_chain(
    audit: Audit, internal: Metadata, operator: Metadata
) -> None:
    await _seed(audit, internal)
    await audit.stub.AppendRecord(pb.AppendRecordRequest(record=admin("a")), metadata=internal)

    call = audit.stub.ExportRecords(pb.ExportRecordsRequest(), metadata=operator)
    exported = [response.record async for response in call]

    assert [r.index for r in exported] == list(range(13))
    for record in exported:
        assert record.leaf_hash == hashing.leaf_hash(records.canonical_bytes(record))


async def test_a_tenant_exports_only_its_own_records(
    audit: Audit, internal: Metadata, reader: Callable[[str], Metadata]
) -> None:
    await _seed(audit, internal)

    assert await _export(audit, reader("globex")) == ["c3", "c7", "c11"]
    assert await _export(audit, reader("globex"), 4, 8) == ["c7"]


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [(-1, 0, "start_index"), (0, -1, "end_index"), (0, 13, "end_index"), (13, 0, "start_index")],
    ids=["negative-start", "negative-end", "end-beyond-log", "start-beyond-log"],
)
async def test_bad_range_is_refused(
    audit: Audit, internal: Metadata, operator: Metadata, start: int, end: int, field: str
) -> None:
    await _seed(audit, internal)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _export(audit, operator, start, end)

    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert error.metadata["field"] == field


async def test_export_needs_read_scope(audit: Audit, as_caller: Callable[..., Metadata]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _export(audit, as_caller("acme", "chat"))

    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")


async def test_long_exports_continue_across_batches(
    audit: Audit,
    internal: Metadata,
    operator: Metadata,
    reader: Callable[[str], Metadata],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(audit_service, "_EXPORT_BATCH", 2)
    await _seed(audit, internal)

    assert await _export(audit, operator, 1, 0) == [f"c{i}" for i in range(1, 12)]
    assert await _export(audit, reader("globex")) == ["c3", "c7", "c11"]
