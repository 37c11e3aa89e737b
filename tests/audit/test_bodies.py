"""Chat bodies sealed under per-subject keys; erasure destroys the key, the log still verifies."""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import hashlib
from collections.abc import Callable

import asyncpg
import grpc
import pytest

from orchestra.audit.v1 import audit_service_pb2 as pb
from orchestra.common.v1 import chat_pb2
from services.audit import bodies, signing
from services.audit.verify import verify
from services.cli.audit_cmd import run_verify
from services.common import errors
from tests.audit.conftest import Audit, Metadata
from tests.audit.factory import BASE_TIME, admin, chat

SECRET_PROMPT = "my card number is 4111-1111-1111-1111"


def _body(text: str, retention_days: int = 0, event_id: str = "") -> pb.RecordBody:
    return pb.RecordBody(
        event_id=event_id,
        chat=pb.ChatBody(
            messages=[
                chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])
            ],
            answer_text=f"answer to {text}",
        ),
        retention_days=retention_days,
    )


async def _append(
    audit: Audit,
    internal: Metadata,
    event_id: str,
    user: str,
    text: str,
    *,
    retention_days: int = 0,
    minute: float = 0,
) -> pb.AppendRecordResponse:
    record = chat(event_id, end_user=user, minute=minute)
    record.chat.prompt_digest = ""
    record.chat.response_digest = ""
    return await audit.stub.AppendRecord(
        pb.AppendRecordRequest(record=record, body=_body(text, retention_days)), metadata=internal
    )


async def _read(audit: Audit, metadata: Metadata, event_id: str) -> pb.GetRecordBodyResponse:
    return await audit.stub.GetRecordBody(
        pb.GetRecordBodyRequest(event_id=event_id), metadata=metadata
    )


async def _read_error(audit: Audit, metadata: Metadata, event_id: str) -> errors.ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _read(audit, metadata, event_id)
    return errors.decode(caught.value)


@pytest.fixture
def acme_admin(as_caller: Callable[..., Metadata]) -> Metadata:
    return as_caller("acme", "admin", key_id="acme-admin")


async def test_body_is_sealed_beside_the_log_and_reads_back(
    audit: Audit, internal: Metadata, acme_admin: Metadata, superuser: asyncpg.Connection
) -> None:
    await _append(audit, internal, "c1", "alice", SECRET_PROMPT)

    read = await _read(audit, acme_admin, "c1")

    assert read.index == 0
    assert read.body.messages[0].content[0].text == SECRET_PROMPT
    assert read.body.answer_text == f"answer to {SECRET_PROMPT}"
    # The leaf commits to the ciphertext; no plaintext reaches any table.
    record_bytes = await superuser.fetchval("SELECT record FROM audit.records")
    sealed = await superuser.fetchval("SELECT sealed FROM audit.bodies WHERE event_id = 'c1'")
    stored = pb.AuditRecord.FromString(record_bytes)
    assert stored.chat.body_sha256 == hashlib.sha256(sealed).digest()
    assert stored.chat.body_key_id
    for raw in (record_bytes, sealed):
        assert SECRET_PROMPT.encode() not in raw
    wrapped = await superuser.fetchval("SELECT wrapped FROM audit.subject_keys")
    assert len(wrapped) > 32  # wrapped, not the raw 32 key bytes
    assert await verify(audit.service.store) is None


async def test_reading_a_body_is_itself_audited(
    audit: Audit, internal: Metadata, operator: Metadata, reader: Callable[[str], Metadata]
) -> None:
    await _append(audit, internal, "c1", "alice", "hi")

    await _read(audit, operator, "c1")
    await _read_error(audit, operator, "no-such-record")

    listed = await audit.stub.ListRecords(
        pb.ListRecordsRequest(kind=pb.RECORD_KIND_ADMIN), metadata=reader("acme")
    )
    [record] = listed.records
    assert record.actor == "test-key"
    assert record.admin.action == "orchestra.audit.v1.AuditService/GetRecordBody"
    assert record.admin.resource == "records/0"
    assert dict(record.admin.details) == {"event_id": "c1"}


async def test_a_retried_append_with_a_body_is_the_same_leaf(
    audit: Audit, internal: Metadata, superuser: asyncpg.Connection
) -> None:
    first = await _append(audit, internal, "c1", "alice", "hello")
    again = await _append(audit, internal, "c1", "alice", "hello")

    assert (again.index, again.leaf_hash) == (first.index, first.leaf_hash)
    assert await superuser.fetchval("SELECT count(*) FROM audit.bodies") == 1
    assert await superuser.fetchval("SELECT count(*) FROM audit.records") == 1


async def test_a_producer_cannot_claim_a_body_it_did_not_send(
    audit: Audit, internal: Metadata, acme_admin: Metadata
) -> None:
    record = chat("c1")
    record.chat.body_sha256 = b"\x01" * 32
    record.chat.body_key_id = "forged"
    await audit.stub.AppendRecord(pb.AppendRecordRequest(record=record), metadata=internal)

    [stored] = (await audit.stub.ListRecords(pb.ListRecordsRequest(), metadata=acme_admin)).records
    assert (stored.chat.body_sha256, stored.chat.body_key_id) == (b"", "")
    error = await _read_error(audit, acme_admin, "c1")
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "AUDIT_BODY_NOT_KEPT")


async def test_bodies_in_a_batch_are_matched_by_event_id(
    audit: Audit, internal: Metadata, acme_admin: Metadata
) -> None:
    records = [chat("c0", end_user="alice"), admin("a1"), chat("c2", end_user="bob")]
    await audit.stub.AppendRecords(
        pb.AppendRecordsRequest(
            records=records,
            bodies=[_body("for bob", event_id="c2"), _body("for alice", event_id="c0")],
        ),
        metadata=internal,
    )

    assert (await _read(audit, acme_admin, "c0")).body.answer_text == "answer to for alice"
    assert (await _read(audit, acme_admin, "c2")).body.answer_text == "answer to for bob"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            pb.AppendRecordsRequest(records=[admin("a1")], bodies=[_body("x", event_id="a1")]),
            "bodies[0]",
        ),
        (
            pb.AppendRecordsRequest(records=[chat("c1")], bodies=[_body("x", event_id="nope")]),
            "bodies[0].event_id",
        ),
        (
            pb.AppendRecordsRequest(
                records=[chat("c1")], bodies=[_body("x", event_id="c1"), _body("y", event_id="c1")]
            ),
            "bodies[1].event_id",
        ),
        (
            pb.AppendRecordsRequest(
                records=[chat("c1")], bodies=[_body("x", retention_days=-1, event_id="c1")]
            ),
            "bodies[0].retention_days",
        ),
    ],
    ids=["admin-record", "unknown-event", "two-bodies", "negative-retention"],
)
async def test_bad_bodies_are_refused_naming_the_field(
    audit: Audit,
    internal: Metadata,
    superuser: asyncpg.Connection,
    request_: pb.AppendRecordsRequest,
    field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.AppendRecords(request_, metadata=internal)

    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert error.metadata["field"] == field
    assert await superuser.fetchval("SELECT count(*) FROM audit.records") == 0


async def test_append_record_body_must_name_its_record(audit: Audit, internal: Metadata) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.AppendRecord(
            pb.AppendRecordRequest(record=chat("c1"), body=_body("x", event_id="c2")),
            metadata=internal,
        )

    assert errors.decode(caught.value).metadata["field"] == "body.event_id"


async def test_erasing_a_subject_leaves_the_log_verifiable(
    audit: Audit,
    internal: Metadata,
    acme_admin: Metadata,
    reader: Callable[[str], Metadata],
    superuser: asyncpg.Connection,
) -> None:
    for i in range(3):
        await _append(audit, internal, f"alice-{i}", "alice", f"alice says {i}", minute=i)
        await _append(audit, internal, f"bob-{i}", "bob", f"bob says {i}", minute=i)

    erased = await audit.stub.EraseSubject(
        pb.EraseSubjectRequest(end_user="alice", reason="GDPR ticket 7"), metadata=acme_admin
    )

    assert (erased.keys_destroyed, erased.bodies_unreadable, erased.audit_index) == (1, 3, 6)
    for i in range(3):
        error = await _read_error(audit, acme_admin, f"alice-{i}")
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "AUDIT_SUBJECT_ERASED",
        )
        assert (await _read(audit, acme_admin, f"bob-{i}")).body.answer_text == (
            f"answer to bob says {i}"
        )
    # The ciphertexts remain (until retention), but no key opens them.
    assert (
        await superuser.fetchval("SELECT count(*) FROM audit.bodies WHERE end_user = 'alice'") == 3
    )
    assert (
        await superuser.fetchval("SELECT count(*) FROM audit.subject_keys WHERE end_user = 'alice'")
        == 0
    )
    assert await verify(audit.service.store) is None
    # The erasure itself is in the log.
    listed = await audit.stub.ListRecords(
        pb.ListRecordsRequest(kind=pb.RECORD_KIND_ADMIN), metadata=reader("acme")
    )
    [record] = [r for r in listed.records if r.admin.action.endswith("/EraseSubject")]
    assert record.index == 6
    assert record.actor == "acme-admin"
    assert record.admin.action == "orchestra.audit.v1.AuditService/EraseSubject"
    assert record.admin.resource == "tenants/acme/endUsers/alice"
    assert dict(record.admin.details) == {
        "end_user": "alice",
        "keys_destroyed": 1.0,
        "bodies_unreadable": 3.0,
        "reason": "GDPR ticket 7",
    }


async def test_after_erasure_new_bodies_get_a_new_key(
    audit: Audit, internal: Metadata, acme_admin: Metadata
) -> None:
    await _append(audit, internal, "old", "alice", "before")
    await audit.stub.EraseSubject(pb.EraseSubjectRequest(end_user="alice"), metadata=acme_admin)
    await _append(audit, internal, "new", "alice", "after")

    assert (await _read(audit, acme_admin, "new")).body.answer_text == "answer to after"
    error = await _read_error(audit, acme_admin, "old")
    assert error.reason == "AUDIT_SUBJECT_ERASED"
    again = await audit.stub.EraseSubject(
        pb.EraseSubjectRequest(end_user="nobody"), metadata=acme_admin
    )
    assert (again.keys_destroyed, again.bodies_unreadable) == (0, 0)
    assert await verify(audit.service.store) is None


async def test_an_operator_may_erase_in_any_tenant(
    audit: Audit, internal: Metadata, operator: Metadata, acme_admin: Metadata
) -> None:
    await _append(audit, internal, "c1", "alice", "hi")

    erased = await audit.stub.EraseSubject(
        pb.EraseSubjectRequest(tenant_id="acme", end_user="alice"), metadata=operator
    )

    assert erased.keys_destroyed == 1
    assert (await _read_error(audit, acme_admin, "c1")).reason == "AUDIT_SUBJECT_ERASED"


@pytest.mark.parametrize(
    ("tenant", "scopes", "request_tenant"),
    [("acme", ("read",), ""), ("acme", ("chat",), ""), ("globex", ("admin",), "acme")],
    ids=["reader", "chat-key", "other-tenant-admin"],
)
async def test_only_admins_of_the_tenant_may_erase_or_read_bodies(
    audit: Audit,
    internal: Metadata,
    as_caller: Callable[..., Metadata],
    acme_admin: Metadata,
    tenant: str,
    scopes: tuple[str, ...],
    request_tenant: str,
) -> None:
    await _append(audit, internal, "c1", "alice", "hi")
    metadata = as_caller(tenant, *scopes)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.EraseSubject(
            pb.EraseSubjectRequest(tenant_id=request_tenant, end_user="alice"), metadata=metadata
        )

    assert errors.decode(caught.value).code == grpc.StatusCode.PERMISSION_DENIED
    assert (await _read(audit, acme_admin, "c1")).body.answer_text == "answer to hi"
    read_error = await _read_error(audit, metadata, "c1")
    # Another tenant's admin learns nothing about the record; others lack the scope.
    expected = grpc.StatusCode.NOT_FOUND if "admin" in scopes else grpc.StatusCode.PERMISSION_DENIED
    assert read_error.code == expected


async def test_a_tampered_body_is_reported_corrupt(
    audit: Audit, internal: Metadata, acme_admin: Metadata, superuser: asyncpg.Connection
) -> None:
    await _append(audit, internal, "c1", "alice", "hi")
    await _append(audit, internal, "c2", "alice", "there")
    # Swap the two ciphertexts: each is genuine, but not the one its leaf commits to.
    await superuser.execute(
        "UPDATE audit.bodies b SET sealed = o.sealed FROM audit.bodies o"
        " WHERE b.event_id <> o.event_id"
    )

    error = await _read_error(audit, acme_admin, "c1")

    assert (error.code, error.reason) == (grpc.StatusCode.INTERNAL, "AUDIT_BODY_CORRUPT")


def test_a_body_for_the_wrong_record_does_not_open() -> None:
    wrapper = bodies.KeyWrapper(b"k" * 32)
    key, wrapped = wrapper.new_key("acme", "alice")
    assert wrapper.unwrap(key.key_id, "acme", "alice", wrapped) == key
    with pytest.raises(bodies.BodyError):
        wrapper.unwrap(key.key_id, "acme", "bob", wrapped)
    with pytest.raises(bodies.BodyError):
        bodies.KeyWrapper(b"x" * 32).unwrap(key.key_id, "acme", "alice", wrapped)
    sealed = bodies.seal(key, "c1", "acme", "alice", b"text", None)
    assert bodies.open_body(key, "c1", "acme", "alice", sealed.sealed) == b"text"
    with pytest.raises(bodies.BodyError):
        bodies.open_body(key, "c2", "acme", "alice", sealed.sealed)


async def test_retention_drops_bodies_but_not_the_log(
    audit: Audit, internal: Metadata, acme_admin: Metadata, superuser: asyncpg.Connection
) -> None:
    await _append(audit, internal, "short", "alice", "a", retention_days=30)
    await _append(audit, internal, "long", "alice", "b", retention_days=90)
    await _append(audit, internal, "forever", "alice", "c")
    expire = await superuser.fetchval(
        "SELECT expire_time FROM audit.bodies WHERE event_id = 'short'"
    )
    assert expire == BASE_TIME + datetime.timedelta(days=30)

    dropped = await audit.service.bodies.drop_expired(BASE_TIME + datetime.timedelta(days=31))

    assert dropped == 1
    error = await _read_error(audit, acme_admin, "short")
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "AUDIT_BODY_NOT_KEPT")
    assert (await _read(audit, acme_admin, "long")).body.answer_text == "answer to b"
    assert (await _read(audit, acme_admin, "forever")).body.answer_text == "answer to c"
    # The hashed rows are untouched and still refuse rewrites.
    assert await superuser.fetchval("SELECT count(*) FROM audit.records WHERE kind = 1") == 3
    assert await verify(audit.service.store) is None
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await superuser.execute("DELETE FROM audit.records WHERE event_id = 'short'")
    assert await audit.service.bodies.drop_expired(BASE_TIME + datetime.timedelta(days=31)) == 0
    assert await audit.service.bodies.drop_expired(BASE_TIME + datetime.timedelta(days=365)) == 1


async def test_the_cli_verifies_an_erased_log_and_catches_a_forged_body(
    audit: Audit,
    internal: Metadata,
    acme_admin: Metadata,
    superuser: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await _append(audit, internal, "c0", "alice", "hi")
    await _append(audit, internal, "c1", "bob", "there", retention_days=1)
    await audit.stub.EraseSubject(pb.EraseSubjectRequest(end_user="alice"), metadata=acme_admin)
    await audit.service.bodies.drop_expired(BASE_TIME + datetime.timedelta(days=2))
    key = base64.b64encode(signing.raw_public(audit.service.store.tree.signer.public_key))
    args = argparse.Namespace(
        export=None, public_key=key.decode(), database_url=audit.pg_url, end=None
    )

    assert await asyncio.to_thread(run_verify, args) == 0
    assert "OK: 3 records" in capsys.readouterr().out

    # Someone with the database swaps in another ciphertext: the record's
    # commitment exposes it, though bodies are outside the tree.
    await superuser.execute("UPDATE audit.bodies SET sealed = sealed || '\\x00'::bytea")
    assert await asyncio.to_thread(run_verify, args) == 1
    assert "BAD BODY: event_id 'c0' (index 0): the body does not match" in capsys.readouterr().out

    await superuser.execute("DELETE FROM audit.bodies")
    await superuser.execute(
        "INSERT INTO audit.bodies (event_id, tenant_id, end_user, key_id, sealed)"
        " VALUES ('ghost', 'acme', 'alice', 'k', '\\x01'::bytea)"
    )
    assert await asyncio.to_thread(run_verify, args) == 1
    assert "BAD BODY: event_id 'ghost' (no record): a body with no record" in (
        capsys.readouterr().out
    )
