"""AppendRecord / AppendRecords: hashing, idempotency, sequencing, validation, scopes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import grpc
import pytest

from orchestra.audit.v1 import audit_service_pb2 as pb
from orchestra.audit.v1 import audit_service_pb2_grpc
from services.audit.records import canonical_bytes
from services.audit.verify import verify
from services.common import clients, errors
from services.common.identity import IdentitySigner
from tests.audit.conftest import Audit, Metadata
from tests.audit.factory import admin, chat


async def _rows(audit: Audit) -> list[tuple[int, str]]:
    rows = await audit.service.store.scan(0, 2**62, 10_000)
    return [(row.index, row.event_id) for row in rows]


async def test_append_returns_index_and_rfc6962_leaf_hash(audit: Audit, internal: Metadata) -> None:
    record = chat("e-1")
    first = await audit.stub.AppendRecord(pb.AppendRecordRequest(record=record), metadata=internal)
    second = await audit.stub.AppendRecord(
        pb.AppendRecordRequest(record=admin("e-2")), metadata=internal
    )

    assert (first.index, second.index) == (0, 1)
    assert first.leaf_hash == hashlib.sha256(b"\x00" + canonical_bytes(record)).digest()


async def test_index_and_leaf_hash_sent_by_the_producer_are_ignored(
    audit: Audit, internal: Metadata
) -> None:
    record = chat("e-1")
    forged = pb.AuditRecord()
    forged.CopyFrom(record)
    forged.index, forged.leaf_hash = 41, b"x" * 32

    response = await audit.stub.AppendRecord(
        pb.AppendRecordRequest(record=forged), metadata=internal
    )

    assert response.index == 0
    assert response.leaf_hash == hashlib.sha256(b"\x00" + canonical_bytes(record)).digest()


async def test_repeated_event_id_returns_the_original(audit: Audit, internal: Metadata) -> None:
    original = await audit.stub.AppendRecord(
        pb.AppendRecordRequest(record=chat("e-1")), metadata=internal
    )
    await audit.stub.AppendRecord(pb.AppendRecordRequest(record=chat("e-2")), metadata=internal)

    again = await audit.stub.AppendRecord(
        pb.AppendRecordRequest(record=chat("e-1")), metadata=internal
    )
    batch = await audit.stub.AppendRecords(
        pb.AppendRecordsRequest(records=[chat("e-2"), chat("e-3"), chat("e-1"), chat("e-3")]),
        metadata=internal,
    )

    assert (again.index, again.leaf_hash) == (original.index, original.leaf_hash)
    assert list(batch.indexes) == [1, 2, 0, 2]
    assert await _rows(audit) == [(0, "e-1"), (1, "e-2"), (2, "e-3")]


async def test_batch_appends_in_order(audit: Audit, internal: Metadata) -> None:
    records = [chat(f"e-{i}", minute=i) for i in range(5)] + [admin("a-1")]

    response = await audit.stub.AppendRecords(
        pb.AppendRecordsRequest(records=records), metadata=internal
    )

    assert list(response.indexes) == list(range(6))
    assert [event_id for _, event_id in await _rows(audit)] == [r.event_id for r in records]


async def test_concurrent_appenders_get_gap_free_unique_indices(
    audit: Audit, signer: IdentitySigner
) -> None:
    # As the router calls it: a service channel carrying its own signed identity.
    token = clients.ServiceToken(signer, "router")
    async with clients.channel(f"127.0.0.1:{audit.port}") as channel:
        stub = audit_service_pb2_grpc.AuditServiceStub(channel)

        async def append(record: pb.AuditRecord) -> int:
            request = pb.AppendRecordRequest(record=record)
            reply = await stub.AppendRecord(request, metadata=token.metadata(), timeout=5)
            return reply.index

        async def appender(n: int) -> list[int]:
            return [await append(chat(f"w{n}-{i}")) for i in range(25)]

        results = await asyncio.gather(*(appender(n) for n in range(20)))

    assert all(indices == sorted(indices) for indices in results)
    assert sorted(i for indices in results for i in indices) == list(range(500))
    assert [index for index, _ in await _rows(audit)] == list(range(500))
    assert await verify(audit.service.store) is None


async def test_racing_repeats_of_one_event_land_once(audit: Audit, internal: Metadata) -> None:
    record = chat("same")
    responses = await asyncio.gather(
        *(
            audit.stub.AppendRecord(pb.AppendRecordRequest(record=record), metadata=internal)
            for _ in range(10)
        )
    )

    assert {r.index for r in responses} == {0}
    assert await _rows(audit) == [(0, "same")]


def _with(**changes: object) -> pb.AuditRecord:
    record = chat("e-1")
    for name, value in changes.items():
        if value is None:
            record.ClearField(name)  # type: ignore[arg-type]
        else:
            setattr(record, name, value)
    return record


def _admin_kind_with_chat_body() -> pb.AuditRecord:
    return _with(kind=pb.RECORD_KIND_ADMIN)


def _chat_kind_without_body() -> pb.AuditRecord:
    record = chat("e-1")
    record.ClearField("chat")
    return record


def _nul_in_end_user() -> pb.AuditRecord:
    record = chat("e-1")
    record.chat.attribution.end_user = "a\x00b"
    return record


def _bad_time() -> pb.AuditRecord:
    record = chat("e-1")
    record.event_time.nanos = -1
    return record


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (_with(event_id=None), "record.event_id"),
        (_with(event_id="x" * 129), "record.event_id"),
        (_with(tenant_id=None), "record.tenant_id"),
        (_with(actor="key\x00"), "record.actor"),
        (_nul_in_end_user(), "record.chat.attribution.end_user"),
        (_with(event_time=None), "record.event_time"),
        (_bad_time(), "record.event_time"),
        (_with(kind=None), "record.kind"),
        (_with(kind=7), "record.kind"),
        (_admin_kind_with_chat_body(), "record.admin"),
        (_chat_kind_without_body(), "record.chat"),
    ],
    ids=[
        "no-event-id",
        "long-event-id",
        "no-tenant",
        "nul-in-actor",
        "nul-in-end-user",
        "no-time",
        "bad-time",
        "no-kind",
        "unknown-kind",
        "kind-body-mismatch",
        "no-body",
    ],
)
async def test_bad_record_is_refused_naming_the_field(
    audit: Audit, internal: Metadata, record: pb.AuditRecord, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.AppendRecord(pb.AppendRecordRequest(record=record), metadata=internal)

    error = errors.decode(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_FIELD"
    assert error.metadata["field"] == field
    assert await _rows(audit) == []


async def test_longest_event_id_is_accepted(audit: Audit, internal: Metadata) -> None:
    response = await audit.stub.AppendRecord(
        pb.AppendRecordRequest(record=_with(event_id="x" * 128)), metadata=internal
    )
    assert response.index == 0


@pytest.mark.parametrize(
    ("records", "field"),
    [
        ([], "records"),
        ([chat(f"e-{i}") for i in range(1001)], "records"),
        ([chat("e-0"), chat("e-1"), _with(event_id="")], "records[2].event_id"),
    ],
    ids=["empty", "too-many", "one-bad"],
)
async def test_bad_batch_is_refused_whole(
    audit: Audit, internal: Metadata, records: list[pb.AuditRecord], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.AppendRecords(pb.AppendRecordsRequest(records=records), metadata=internal)

    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert error.metadata["field"] == field
    assert await _rows(audit) == []


async def test_missing_record_is_refused(audit: Audit, internal: Metadata) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.AppendRecord(pb.AppendRecordRequest(), metadata=internal)

    assert errors.decode(caught.value).metadata["field"] == "record"


@pytest.mark.parametrize("scopes", [("chat",), ("read",), ("admin",), ("operator",)])
async def test_only_services_may_append(
    audit: Audit, as_caller: Callable[..., Metadata], scopes: tuple[str, ...]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.AppendRecord(
            pb.AppendRecordRequest(record=chat("e-1")), metadata=as_caller("acme", *scopes)
        )

    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")


async def test_append_without_identity_is_unauthenticated(audit: Audit) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.AppendRecords(pb.AppendRecordsRequest(records=[chat("e-1")]))

    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "IDENTITY_MISSING")
