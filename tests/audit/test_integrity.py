"""The log refuses rewrites, and verification finds the first tampered index."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from orchestra.audit.v1 import audit_service_pb2 as pb
from services.audit.role import WRITER, writer_password
from services.audit.verify import verify
from services.common.settings import Settings
from tests.audit.conftest import Audit, Metadata
from tests.audit.factory import admin, chat

_RECORDS = [chat(f"c{i}", minute=i) if i % 3 else admin(f"a{i}", minute=i) for i in range(10)]


async def _seed(audit: Audit, internal: Metadata) -> None:
    await audit.stub.AppendRecords(pb.AppendRecordsRequest(records=_RECORDS), metadata=internal)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit.records SET actor = 'mallory' WHERE index = 3",
        "UPDATE audit.records SET actor = 'mallory' WHERE false",
        "DELETE FROM audit.records WHERE index = 9",
        "DELETE FROM audit.records",
        "TRUNCATE audit.records",
    ],
    ids=["update", "update-nothing", "delete", "delete-all", "truncate"],
)
async def test_the_database_refuses_to_rewrite_history(
    audit: Audit, internal: Metadata, superuser: asyncpg.Connection, statement: str
) -> None:
    await _seed(audit, internal)

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await superuser.execute(statement)

    assert await superuser.fetchval("SELECT count(*) FROM audit.records") == len(_RECORDS)
    assert await verify(audit.service.store) is None


async def test_an_untouched_log_verifies(audit: Audit, internal: Metadata) -> None:
    assert await verify(audit.service.store) is None
    await _seed(audit, internal)
    assert await verify(audit.service.store) is None


# Tampering, as someone holding the database superuser would do it.
Tamper = Callable[[asyncpg.Connection], Awaitable[None]]


async def _edit_record_bytes(conn: asyncpg.Connection) -> None:
    raw = await conn.fetchval("SELECT record FROM audit.records WHERE index = 4")
    record = pb.AuditRecord.FromString(raw)
    record.chat.cost_micro_usd = 1
    await conn.execute(
        "UPDATE audit.records SET record = $1 WHERE index = 4", record.SerializeToString()
    )


async def _edit_bytes_and_leaf_hash(conn: asyncpg.Connection) -> None:
    raw = await conn.fetchval("SELECT record FROM audit.records WHERE index = 4")
    record = pb.AuditRecord.FromString(raw)
    record.chat.cost_micro_usd = 1
    forged = record.SerializeToString(deterministic=True)
    await conn.execute(
        "UPDATE audit.records SET record = $1, leaf_hash = $2 WHERE index = 4",
        forged,
        hashlib.sha256(b"\x00" + forged).digest(),
    )


async def _flip_one_bit(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "UPDATE audit.records SET record = set_bit(record, 100, 1 - get_bit(record, 100))"
        " WHERE index = 6"
    )


async def _edit_filter_column(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE audit.records SET tenant_id = 'globex' WHERE index = 5")


async def _shift_time_a_microsecond(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "UPDATE audit.records SET event_time = event_time + interval '1 microsecond'"
        " WHERE index = 7"
    )


async def _edit_model_column(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE audit.records SET model = 'cheap/model' WHERE index = 8")


async def _edit_end_user_column(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE audit.records SET end_user = 'someone' WHERE index = 1")


async def _delete_row(conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM audit.records WHERE index = 2")


async def _swap_rows(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE audit.records SET index = 1000 WHERE index = 3")
    await conn.execute("UPDATE audit.records SET index = 3 WHERE index = 7")
    await conn.execute("UPDATE audit.records SET index = 7 WHERE index = 1000")


async def _delete_first_row(conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM audit.records WHERE index = 0")


@pytest.mark.parametrize(
    ("tamper", "first_bad", "reason"),
    [
        (_edit_record_bytes, 4, "leaf hash"),
        (_edit_bytes_and_leaf_hash, 4, "chain hash"),
        (_flip_one_bit, 6, "leaf hash"),
        (_edit_filter_column, 5, "column tenant_id"),
        (_shift_time_a_microsecond, 7, "column event_time"),
        (_edit_model_column, 8, "column model"),
        (_edit_end_user_column, 1, "column end_user"),
        (_delete_row, 2, "expected index 2"),
        (_swap_rows, 3, "chain hash"),
        (_delete_first_row, 0, "expected index 0"),
    ],
    ids=[
        "edit-record",
        "edit-record-and-leaf-hash",
        "flip-a-bit",
        "edit-column",
        "edit-time-by-1us",
        "edit-model",
        "edit-end-user",
        "delete",
        "swap",
        "delete-first",
    ],
)
async def test_verification_reports_the_first_tampered_index(
    audit: Audit,
    internal: Metadata,
    superuser: asyncpg.Connection,
    tamper: Tamper,
    first_bad: int,
    reason: str,
) -> None:
    await _seed(audit, internal)

    await superuser.execute("ALTER TABLE audit.records DISABLE TRIGGER ALL")
    await tamper(superuser)
    await superuser.execute("ALTER TABLE audit.records ENABLE TRIGGER ALL")

    mismatch = await verify(audit.service.store, batch_size=3)
    assert mismatch is not None
    assert mismatch.index == first_bad
    assert reason in mismatch.reason


async def test_appends_after_tampering_do_not_hide_it(
    audit: Audit, internal: Metadata, superuser: asyncpg.Connection
) -> None:
    await _seed(audit, internal)
    await superuser.execute("ALTER TABLE audit.records DISABLE TRIGGER ALL")
    await _edit_record_bytes(superuser)
    await superuser.execute("ALTER TABLE audit.records ENABLE TRIGGER ALL")

    await audit.stub.AppendRecord(pb.AppendRecordRequest(record=chat("late")), metadata=internal)

    mismatch = await verify(audit.service.store)
    assert mismatch is not None
    assert mismatch.index == 4


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit.records SET actor = 'mallory' WHERE index = 3",
        "DELETE FROM audit.records WHERE index = 9",
        "TRUNCATE audit.records",
        "ALTER TABLE audit.records DISABLE TRIGGER USER",
        "DROP TRIGGER records_no_update_delete ON audit.records",
        "UPDATE audit.checkpoints SET tree_size = 0",
        "DELETE FROM audit.subtrees",
    ],
    ids=["update", "delete", "truncate", "disable-triggers", "drop-trigger", "checkpoint", "tree"],
)
async def test_the_services_own_role_cannot_rewrite_history(
    audit: Audit,
    internal: Metadata,
    superuser: asyncpg.Connection,
    make_settings: Callable[..., Settings],
    statement: str,
) -> None:
    await _seed(audit, internal)
    key = make_settings(DATABASE_URL=audit.pg_url).internal_key
    writer = await asyncpg.connect(audit.pg_url, user=WRITER, password=writer_password(key))
    try:
        # What the service does, it may do: read the log and add to it.
        assert await writer.fetchval("SELECT count(*) FROM audit.records") == len(_RECORDS)
        # Refused by the grants, before any trigger runs.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"permission denied|owner"):
            await writer.execute(statement)
    finally:
        await writer.close()

    assert await superuser.fetchval("SELECT count(*) FROM audit.records") == len(_RECORDS)
    assert await verify(audit.service.store) is None
