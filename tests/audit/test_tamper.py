"""Tampering as a database superuser is found at the exact index, online and offline."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from orchestra.audit.v1 import audit_service_pb2 as pb
from services.audit import hashing, signing
from services.audit.verify import verify
from services.cli.audit_cmd import run_export, run_verify
from tests.audit.conftest import Audit, Metadata
from tests.audit.factory import admin, chat

# Three batches: checkpoints at 4, 7 and 12 records.
_BATCHES = [[chat(f"c{b}-{i}", minute=i) if i % 2 else admin(f"a{b}-{i}") for i in range(n)]
            for b, n in enumerate([4, 3, 5])]  # fmt: skip

Tamper = Callable[[asyncpg.Connection], Awaitable[None]]


async def _seed(audit: Audit, internal: Metadata) -> None:
    for batch in _BATCHES:
        await audit.stub.AppendRecords(pb.AppendRecordsRequest(records=batch), metadata=internal)


async def _edit_field(conn: asyncpg.Connection) -> None:
    raw = await conn.fetchval("SELECT record FROM audit.records WHERE index = 5")
    record = pb.AuditRecord.FromString(raw)
    record.chat.cost_micro_usd = 1
    await conn.execute(
        "UPDATE audit.records SET record = $1 WHERE index = 5",
        record.SerializeToString(deterministic=True),
    )


async def _forge_record_and_chain(conn: asyncpg.Connection) -> None:
    """Rewrites record 5 with its leaf hash and every later chain hash: only the tree sees it."""
    rows = await conn.fetch("SELECT index, record, chain_hash FROM audit.records ORDER BY index")
    record = pb.AuditRecord.FromString(rows[5]["record"])
    record.chat.cost_micro_usd = 1
    forged = record.SerializeToString(deterministic=True)
    chain = bytes(rows[4]["chain_hash"])
    for row in rows[5:]:
        data = forged if row["index"] == 5 else bytes(row["record"])
        leaf = hashing.leaf_hash(data)
        chain = hashing.chain_hash(chain, leaf)
        await conn.execute(
            "UPDATE audit.records SET record = $1, leaf_hash = $2, chain_hash = $3"
            " WHERE index = $4",
            data,
            leaf,
            chain,
            row["index"],
        )


async def _delete_row(conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM audit.records WHERE index = 6")


async def _swap_rows(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE audit.records SET index = 1000 WHERE index = 3")
    await conn.execute("UPDATE audit.records SET index = 3 WHERE index = 8")
    await conn.execute("UPDATE audit.records SET index = 8 WHERE index = 1000")


async def _cut_tail(conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM audit.records WHERE index >= 9")


async def _resign_with_wrong_key(conn: asyncpg.Connection) -> None:
    wrong = signing.Signer.of(Ed25519PrivateKey.generate())
    row = await conn.fetchrow("SELECT * FROM audit.checkpoints WHERE tree_size = 7")
    assert row is not None
    await conn.execute(
        "UPDATE audit.checkpoints SET signature = $1, key_id = $2 WHERE tree_size = 7",
        wrong.sign(7, bytes(row["root_hash"]), row["unix_time"]),
        wrong.key_id,
    )


async def _backdate_checkpoint(conn: asyncpg.Connection) -> None:
    await conn.execute("UPDATE audit.checkpoints SET unix_time = 0 WHERE tree_size = 12")


async def _delete_latest_checkpoint(conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM audit.checkpoints WHERE tree_size = 12")


async def _insert_a_record(conn: asyncpg.Connection) -> None:
    row = await conn.fetchrow("SELECT * FROM audit.records WHERE index = 11")
    assert row is not None
    record = pb.AuditRecord.FromString(row["record"])
    record.event_id = "forged"
    data = record.SerializeToString(deterministic=True)
    leaf = hashing.leaf_hash(data)
    await conn.execute(
        "INSERT INTO audit.records SELECT 12, 'forged', tenant_id, event_time, kind, actor,"
        " model, end_user, $1, $2, $3 FROM audit.records WHERE index = 11",
        data,
        leaf,
        hashing.chain_hash(bytes(row["chain_hash"]), leaf),
    )


CASES = [
    (_edit_field, 5, None, "leaf hash"),
    (_forge_record_and_chain, 4, 7, "root does not match records 4..6"),
    (_delete_row, 6, None, "expected index 6"),
    (_swap_rows, 3, None, "chain hash"),
    (_cut_tail, 9, 12, "the log ends at 9"),
    (_resign_with_wrong_key, 4, 7, "signed by key"),
    (_backdate_checkpoint, 7, 12, "signature does not verify"),
    (_delete_latest_checkpoint, 7, None, "records 7..11 are not covered"),
    (_insert_a_record, 12, None, "records 12..12 are not covered"),
]
IDS = [
    *("edit-field", "forge-chain", "delete", "swap", "cut-tail", "wrong-key", "backdate"),
    *("delete-checkpoint", "insert-record"),
]


async def _tamper(conn: asyncpg.Connection, tamper: Tamper) -> None:
    for table in ("records", "checkpoints"):
        await conn.execute(f"ALTER TABLE audit.{table} DISABLE TRIGGER ALL")
    await tamper(conn)
    for table in ("records", "checkpoints"):
        await conn.execute(f"ALTER TABLE audit.{table} ENABLE TRIGGER ALL")


@pytest.mark.parametrize(("tamper", "first_bad", "checkpoint", "reason"), CASES, ids=IDS)
async def test_verify_names_the_first_tampered_index(
    audit: Audit,
    internal: Metadata,
    superuser: asyncpg.Connection,
    tamper: Tamper,
    first_bad: int,
    checkpoint: int | None,
    reason: str,
) -> None:
    await _seed(audit, internal)
    key = audit.service.store.tree.signer.public_key
    assert await verify(audit.service.store, public_key=key) is None

    await _tamper(superuser, tamper)

    mismatch = await verify(audit.service.store, public_key=key, batch_size=5)
    assert mismatch is not None
    assert (mismatch.index, mismatch.checkpoint) == (first_bad, checkpoint)
    assert reason in mismatch.reason


def _args(**values: object) -> argparse.Namespace:
    defaults: dict[str, object] = {
        "export": None,
        "public_key": None,
        "database_url": None,
        "end": None,
        "out": None,
    }
    return argparse.Namespace(**{**defaults, **values})


async def test_the_cli_reports_a_clean_log_then_the_first_bad_index(
    audit: Audit,
    internal: Metadata,
    superuser: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await _seed(audit, internal)
    key = base64.b64encode(signing.raw_public(audit.service.store.tree.signer.public_key))
    args = _args(database_url=audit.pg_url, public_key=key.decode())

    assert await asyncio.to_thread(run_verify, args) == 0
    assert "OK: 12 records, 3 checkpoints' roots and signatures verified" in capsys.readouterr().out

    await _tamper(superuser, _edit_field)
    assert await asyncio.to_thread(run_verify, args) == 1
    assert "FIRST BAD INDEX: 5: leaf hash" in capsys.readouterr().out


def _rewrite(path: Path, edit: Callable[[list[str]], list[str]]) -> None:
    path.write_text("".join(edit(path.read_text().splitlines(keepends=True))))


def _cost_of_record_5(lines: list[str]) -> list[str]:
    out = []
    for text in lines:
        line = json.loads(text)
        if line.get("index") == 5:
            line["record"]["chat"]["costMicroUsd"] = "1"
            text = json.dumps(line) + "\n"
        out.append(text)
    return out


def _bytes_of_record_5(lines: list[str]) -> list[str]:
    out = []
    for text in lines:
        line = json.loads(text)
        if line.get("index") == 5:
            record = pb.AuditRecord.FromString(base64.b64decode(line["canonical"]))
            record.chat.cost_micro_usd = 1
            line["canonical"] = base64.b64encode(record.SerializeToString()).decode()
            line["record"]["chat"]["costMicroUsd"] = "1"
            line["record"]["leafHash"] = base64.b64encode(
                hashlib.sha256(b"\x00" + record.SerializeToString()).digest()
            ).decode()
            text = json.dumps(line) + "\n"
        out.append(text)
    return out


def _drop_record_6(lines: list[str]) -> list[str]:
    return [text for text in lines if json.loads(text).get("index") != 6]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda lines: lines, "OK: 12 records, 3 signed checkpoints verified"),
        (_cost_of_record_5, "FIRST BAD INDEX: 5: record JSON does not match"),
        (_bytes_of_record_5, "FIRST BAD INDEX: 4 (checkpoint 7): checkpoint 7: root"),
        (_drop_record_6, "FIRST BAD INDEX: 6 (checkpoint 7): checkpoint 7 found after 6"),
        (lambda lines: lines[:-1], "FIRST BAD INDEX: 7: records 7..11 are not covered"),
    ],
    ids=["clean", "edit-json", "edit-bytes", "drop-line", "drop-checkpoints"],
)
async def test_an_export_verifies_offline_with_the_public_key(
    audit: Audit,
    internal: Metadata,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: Callable[[list[str]], list[str]],
    expected: str,
) -> None:
    await _seed(audit, internal)
    out = tmp_path / "audit.jsonl"
    assert await asyncio.to_thread(run_export, _args(database_url=audit.pg_url, out=out)) == 0
    key_file = tmp_path / "audit.pub"
    key_file.write_bytes(
        base64.b64encode(signing.raw_public(audit.service.store.tree.signer.public_key))
    )
    _rewrite(out, edit)

    code = await asyncio.to_thread(run_verify, _args(export=out, public_key=str(key_file)))
    assert expected in capsys.readouterr().out
    assert code == (0 if expected.startswith("OK") else 1)
