"""The audit log's cost: appends, proofs and verification, against a plain INSERT.

The real audit service runs in-process (grpc.aio on a free port) on a fresh
database. The same N records are appended twice: through gRPC
``AppendRecords`` in batches (sequencer lock, hash chain, Merkle subtrees and a
signed checkpoint per batch), and as a plain ``INSERT ... SELECT unnest`` of
the same rows into a table without triggers, from the same process in the same
run (the baseline). Then random inclusion proofs through gRPC (latency
p50/p99), and a full ``verify`` of every record and checkpoint, next to the
time to merely read the same rows (its baseline) and the CPU the verifying
process used (wall time on a shared machine includes waiting for a core).

    .venv/bin/python bench/audit.py [--records 100000] [--batch 1000]
                                    [--concurrency 4] [--proofs 2000] [--json]

PostgreSQL: ``--database-url`` / ``DATABASE_URL`` (a scratch database is
created and dropped there), else an embedded server in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncpg
import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from google.protobuf import timestamp_pb2  # noqa: E402

from orchestra.audit.v1 import audit_service_pb2 as pb  # noqa: E402
from orchestra.audit.v1 import audit_service_pb2_grpc  # noqa: E402
from orchestra.common.v1 import chat_pb2, identity_pb2  # noqa: E402
from services.audit import merkle, proofs, records  # noqa: E402
from services.audit.server import build  # noqa: E402
from services.audit.verify import verify  # noqa: E402
from services.common import settings as settings_mod  # noqa: E402
from services.common.identity import HEADER, IdentitySigner  # noqa: E402
from services.common.server import start  # noqa: E402

INTERNAL_KEY = "bench-internal-key-0123456789"


def _record(i: int) -> pb.AuditRecord:
    return pb.AuditRecord(
        event_id=f"bench-{i}",
        event_time=timestamp_pb2.Timestamp(seconds=1_790_000_000 + i),
        tenant_id=f"tenant-{i % 7}",
        actor=f"key-{i % 13}",
        kind=pb.RECORD_KIND_CHAT,
        chat=pb.ChatEvent(
            request_id=f"req-{i}",
            attribution=chat_pb2.Attribution(team="core", project="bot", end_user=f"u{i % 101}"),
            model="openai/gpt-4o-mini",
            provider="openai",
            routing_reason="cheapest adequate",
            usage=chat_pb2.Usage(prompt_tokens=12 + i % 50, completion_tokens=30),
            cost_micro_usd=420 + i % 1000,
            latency_ms=812,
            prompt_digest="ab" * 32,
            response_digest="cd" * 32,
        ),
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _append_grpc(
    stub: Any,
    meta: Any,
    batches: list[list[pb.AuditRecord]],
    conc: int,
    placed: dict[int, pb.AuditRecord],
) -> float:
    queue = list(reversed(batches))

    async def worker() -> None:
        while queue:
            batch = queue.pop()
            reply = await stub.AppendRecords(pb.AppendRecordsRequest(records=batch), metadata=meta)
            # Concurrent batches land in any order: remember where each record went.
            for record, index in zip(batch, reply.indexes, strict=True):
                placed[index] = record

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return time.perf_counter() - started


async def _append_plain(url: str, batches: list[list[pb.AuditRecord]]) -> float:
    """The baseline: the same rows, one INSERT per batch, no lock, hashes or tree."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE bench_plain (LIKE audit.records INCLUDING ALL)")
        index = 0
        started = time.perf_counter()
        for batch in batches:
            entries = [records.entry_of(r) for r in batch]
            n = len(entries)
            await conn.execute(
                "INSERT INTO bench_plain SELECT * FROM unnest($1::bigint[], $2::text[],"
                " $3::text[], $4::timestamptz[], $5::smallint[], $6::text[], $7::text[],"
                " $8::text[], $9::bytea[], $10::bytea[], $11::bytea[])",
                list(range(index, index + n)),
                [e.event_id for e in entries],
                [e.tenant_id for e in entries],
                [e.event_time for e in entries],
                [e.kind for e in entries],
                [e.actor for e in entries],
                [e.model for e in entries],
                [e.end_user for e in entries],
                [e.canonical for e in entries],
                [e.leaf_hash for e in entries],
                [e.leaf_hash for e in entries],
            )
            index += n
        return time.perf_counter() - started
    finally:
        await conn.close()


async def _proofs(
    stub: Any, meta: Any, placed: dict[int, pb.AuditRecord], count: int, key: Any
) -> list[float]:
    latest = (
        await stub.GetLatestCheckpoint(pb.GetLatestCheckpointRequest(), metadata=meta)
    ).checkpoint
    rng = random.Random(7)
    timings: list[float] = []
    for _ in range(count):
        index = rng.randrange(len(placed))
        started = time.perf_counter()
        proof = await stub.GetInclusionProof(
            pb.GetInclusionProofRequest(leaf_index=index), metadata=meta
        )
        timings.append((time.perf_counter() - started) * 1000)
        leaf = merkle.leaf_hash(records.canonical_bytes(placed[index]))
        proofs.check_inclusion(leaf, proof, latest, key)
    return timings


async def _scan_only(store: Any) -> float:
    """The floor under verify: fetch every row the same way, check nothing."""
    started = time.perf_counter()
    start, batch = 0, 10_000
    while True:
        rows = await store.scan_for_verify(start, 2**62, batch)
        if len(rows) < batch:
            return time.perf_counter() - started
        start = rows[-1][0] + 1


async def _run(url: str, args: argparse.Namespace) -> dict[str, float]:
    admin = await asyncpg.connect(url)
    name = f"bench_audit_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    base, _, rest = url.rpartition("/")
    query = rest.partition("?")[2]
    db_url = f"{base}/{name}" + (f"?{query}" if query else "")
    try:
        env = {"ORCHESTRA_INTERNAL_KEY": INTERNAL_KEY, "DATABASE_URL": db_url}
        service = await build(settings_mod.load(env))
        running = await start(service, "127.0.0.1:0")
        signer = IdentitySigner(INTERNAL_KEY.encode())

        def meta(*scopes: identity_pb2.Scope.ValueType) -> list[tuple[str, str]]:
            ident = identity_pb2.Identity(tenant_id="ops", key_id="bench", scopes=list(scopes))
            return [(HEADER, signer.sign(ident))]

        n, size = args.records, args.batch
        batches = [[_record(i) for i in range(s, min(n, s + size))] for s in range(0, n, size)]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = audit_service_pb2_grpc.AuditServiceStub(channel)
                placed: dict[int, pb.AuditRecord] = {}
                grpc_s = await _append_grpc(
                    stub, meta(identity_pb2.SCOPE_INTERNAL), batches, args.concurrency, placed
                )
                plain_s = await _append_plain(db_url, batches)
                key = service.store.tree.signer.public_key
                timings = await _proofs(
                    stub, meta(identity_pb2.SCOPE_READ), placed, args.proofs, key
                )
            scan_s = await _scan_only(service.store)
            started, cpu = time.perf_counter(), time.process_time()
            mismatch = await verify(service.store, batch_size=10_000, public_key=key)
            verify_s = time.perf_counter() - started
            verify_cpu_s = time.process_time() - cpu
            assert mismatch is None, mismatch
        finally:
            await running.stop(0)
    finally:
        admin = await asyncpg.connect(url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return {
        "records": n,
        "batch": size,
        "appends_per_s_grpc": n / grpc_s,
        "appends_per_s_plain_insert": n / plain_s,
        "proof_p50_ms": statistics.median(timings),
        "proof_p99_ms": _percentile(timings, 0.99),
        "verify_s": verify_s,
        "verify_cpu_s": verify_cpu_s,
        "scan_only_s": scan_s,
        "verify_records_per_s": n / verify_s,
    }


def _table(r: dict[str, float]) -> str:
    rows = [
        ("appends/s, gRPC AppendRecords (Merkle + signed checkpoint)", r["appends_per_s_grpc"]),
        ("appends/s, plain INSERT of the same rows (baseline)", r["appends_per_s_plain_insert"]),
        ("inclusion proof via gRPC, p50 ms", r["proof_p50_ms"]),
        ("inclusion proof via gRPC, p99 ms", r["proof_p99_ms"]),
        (f"verify all {int(r['records'])} records, s", r["verify_s"]),
        ("  of which this process's CPU, s", r["verify_cpu_s"]),
        ("read the same rows without checking them (baseline), s", r["scan_only_s"]),
    ]
    head = f"audit bench: {int(r['records'])} records, batches of {int(r['batch'])}"
    return "\n".join([head, *(f"  {label:<62} {value:>10.2f}" for label, value in rows)])


async def _main(args: argparse.Namespace) -> dict[str, float]:
    url = args.database_url or os.environ.get("DATABASE_URL", "")
    if url:
        return await _run(url, args)
    from services.cli.embedded import Supervisor, start_postgres

    with tempfile.TemporaryDirectory() as tmp:
        async with AsyncExitStack() as stack:
            supervisor = await stack.enter_async_context(Supervisor(Path(tmp)))
            pg = await start_postgres(supervisor, Path(tmp))
            return await _run(pg.url, args)


def main() -> None:
    """Parses the options, runs the bench, prints the table (and JSON last with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="records per AppendRecords")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent append calls")
    parser.add_argument("--proofs", type=int, default=2000, help="inclusion proofs to time")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    result = asyncio.run(_main(args))
    print(_table(result))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
