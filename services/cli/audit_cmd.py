"""``orchestra audit verify`` and ``orchestra audit export``.

``verify`` recomputes the log in PostgreSQL (``DATABASE_URL``) from index 0 —
leaf hashes, hash chain, columns, the Merkle tree — and checks every signed
checkpoint's root and signature; or, with ``--export FILE``, does the same
offline for a JSONL export with only the public key. It prints the first index
where anything differs and exits 1, or prints a summary and exits 0 (2: it
could not run).

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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.audit import signing
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
    finally:
        await pool.close()
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
