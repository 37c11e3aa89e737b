"""``orchestra audit verify``, ``export``, ``public-key`` and ``erase``.

``verify`` recomputes the log in PostgreSQL (``DATABASE_URL``) from index 0 —
leaf hashes, hash chain, columns, the Merkle tree — and checks every signed
checkpoint's root and signature, then every stored chat body against the
``body_sha256`` its record commits to; or, with ``--export FILE``, does the same
offline for a JSONL export with only the public key. It prints the first index
where anything differs and exits 1, or prints a summary and exits 0 (2: it
could not run).

``erase`` calls the EraseSubject RPC through the edge with an ADMIN (or
OPERATOR) API key: the subject's keys are destroyed, its stored bodies become
unreadable, and the erasure is itself appended to the log.

The public key is base64 of the raw 32 bytes, given directly or as a file
holding that text. Without ``--public-key``, the database check uses the key
the audit service would load from the same environment
(``ORCHESTRA_AUDIT_SIGNING_KEY[_FILE]`` or ``ORCHESTRA_INTERNAL_KEY``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import time
from pathlib import Path

import asyncpg
import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from orchestra.audit.v1 import audit_service_pb2 as pb
from orchestra.audit.v1 import audit_service_pb2_grpc
from services.audit import signing
from services.audit.body_store import check_bodies
from services.audit.export import verify_jsonl, write_jsonl
from services.audit.signing import SigningKeyError
from services.audit.store import AuditStore
from services.audit.tree_store import TreeStore
from services.audit.verify import Mismatch, verify


def _public_key(text: str | None) -> Ed25519PublicKey | None:
    """The key from ``--public-key`` (base64, or a file holding it), else from the env."""
    if text:
        path = Path(text)
        return signing.public_key_from_text(path.read_text() if path.is_file() else text)
    internal = os.environ.get("ORCHESTRA_INTERNAL_KEY", "")
    has_key = os.environ.get(signing.KEY_ENV) or os.environ.get(signing.KEY_FILE_ENV)
    if not has_key and len(internal) < 16:
        return None
    return signing.load_signer(None, internal.encode()).public_key


def _report(mismatch: Mismatch | None, summary: str) -> int:
    if mismatch is None:
        print(f"OK: {summary}")
        return 0
    where = f" (checkpoint {mismatch.checkpoint})" if mismatch.checkpoint is not None else ""
    print(f"FIRST BAD INDEX: {mismatch.index}{where}: {mismatch.reason}")
    return 1


async def _store(url: str) -> tuple[asyncpg.Pool, AuditStore]:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    # The tree store only reads here; the signer is never used.
    placeholder = signing.Signer.of(Ed25519PrivateKey.generate())
    return pool, AuditStore(pool, TreeStore(pool, placeholder))


async def _verify_database(url: str, key: Ed25519PublicKey | None, end: int | None) -> int:
    pool, store = await _store(url)
    try:
        started = time.perf_counter()
        mismatch = await verify(store, batch_size=10_000, public_key=key, end=end)
        size = end if end is not None else (await store.size())
        checkpoints = len(await store.tree.checkpoints(0, 2**62))
        bad_body = await check_bodies(pool) if mismatch is None else None
    finally:
        await pool.close()
    if bad_body is not None:
        where = "no record" if bad_body.index is None else f"index {bad_body.index}"
        print(f"BAD BODY: event_id {bad_body.event_id!r} ({where}): {bad_body.reason}")
        return 1
    elapsed = time.perf_counter() - started
    signed = "roots and signatures" if key is not None else "roots (signatures NOT checked)"
    return _report(
        mismatch, f"{size} records, {checkpoints} checkpoints' {signed} verified in {elapsed:.1f} s"
    )


def run_verify(args: argparse.Namespace) -> int:
    """Runs ``orchestra audit verify``; returns the exit code.

    Args:
        args: ``export`` (path or None), ``public_key`` (text or None),
            ``database_url`` (or None: ``DATABASE_URL``), ``end`` (or None).
    """
    try:
        key = _public_key(args.public_key)
    except (SigningKeyError, OSError, ValueError) as exc:
        print(f"orchestra audit verify: {exc}", file=sys.stderr)
        return 2
    if args.export is not None:
        if key is None:
            print("orchestra audit verify: --export needs --public-key", file=sys.stderr)
            return 2
        with Path(args.export).open(encoding="utf-8") as lines:
            mismatch, count, checked = verify_jsonl(lines, key)
        return _report(mismatch, f"{count} records, {checked} signed checkpoints verified")
    url = args.database_url or os.environ.get("DATABASE_URL", "")
    if not url:
        print("orchestra audit verify: set DATABASE_URL or pass --export FILE", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_verify_database(url, key, args.end))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"orchestra audit verify: PostgreSQL: {exc}", file=sys.stderr)
        return 2


async def _export(url: str, out: Path, end: int | None) -> int:
    pool, store = await _store(url)
    try:
        with out.open("w", encoding="utf-8") as handle:
            return await write_jsonl(store, handle, end)
    finally:
        await pool.close()


def run_export(args: argparse.Namespace) -> int:
    """Runs ``orchestra audit export --out FILE``: the log as JSONL with its checkpoints."""
    url = args.database_url or os.environ.get("DATABASE_URL", "")
    if not url:
        print("orchestra audit export: set DATABASE_URL", file=sys.stderr)
        return 2
    written = asyncio.run(_export(url, Path(args.out), args.end))
    print(f"exported {written} records to {args.out}")
    return 0


def run_public_key(args: argparse.Namespace) -> int:
    """Runs ``orchestra audit public-key``: prints the checkpoint key the environment configures.

    Prints base64 of the raw public key (what ``--public-key`` takes) and its key_id.
    """
    try:
        key = _public_key(None)
    except (SigningKeyError, OSError, ValueError) as exc:
        print(f"orchestra audit public-key: {exc}", file=sys.stderr)
        return 2
    if key is None:
        print(
            "orchestra audit public-key: set ORCHESTRA_AUDIT_SIGNING_KEY[_FILE]"
            " or ORCHESTRA_INTERNAL_KEY",
            file=sys.stderr,
        )
        return 2
    print(base64.b64encode(signing.raw_public(key)).decode(), signing.key_id(key))
    return 0


async def _erase(edge: str, key: str, tenant: str, user: str, reason: str) -> int:
    from services.cli.client import describe

    request = pb.EraseSubjectRequest(tenant_id=tenant, end_user=user, reason=reason)
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = audit_service_pb2_grpc.AuditServiceStub(channel)
        try:
            reply = await stub.EraseSubject(
                request, metadata=(("authorization", f"Bearer {key}"),), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            print(f"orchestra audit erase: {describe(exc)}", file=sys.stderr)
            return 1
    print(
        f"erased {tenant or 'your tenant'}/{user!r}: {reply.keys_destroyed} key(s) destroyed,"
        f" {reply.bodies_unreadable} stored bodies now unreadable;"
        f" audited at index {reply.audit_index}"
    )
    return 0


def run_erase(args: argparse.Namespace) -> int:
    """Runs ``orchestra audit erase --user USER [--tenant T] [--reason R]``.

    Args:
        args: ``edge``, ``api_key`` (or None), ``state_dir`` (or None),
            ``tenant`` ("" = the key's own), ``user``, ``reason``.
    """
    from services.cli.client import CliError, api_key

    try:
        key = api_key(
            args.api_key,
            Path(args.state_dir or os.environ.get("ORCHESTRA_STATE_DIR") or ".orchestra"),
        )
    except CliError as exc:
        print(f"orchestra audit erase: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(_erase(args.edge, key, args.tenant, args.user, args.reason))
