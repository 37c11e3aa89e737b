"""The JSONL export of the log, and its offline verification with only the public key.

One JSON object per line, in index order:

* a record: ``{"index": 7, "canonical": "<base64 of the exact stored bytes>",
  "record": {...the AuditRecord as proto3 JSON, with index and leafHash...}}``;
  the leaf hash is recomputed from ``canonical`` and ``record`` must be what
  those bytes say (it is there for people and tools that read JSON);
* a checkpoint, right after the record that completes it:
  ``{"checkpoint": {"treeSize": "8", "rootHash": ..., "createTime": ...,
  "signature": ..., "keyId": ...}}`` (proto3 JSON of ``Checkpoint``).

An export starts at index 0 (roots cover the whole prefix). Compare its last
checkpoint with one obtained independently (GetLatestCheckpoint) to be sure
no tail was dropped together with its checkpoints.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf import json_format

from orchestra.audit.v1 import audit_service_pb2 as pb
from services.audit import hashing, records
from services.audit.store import AuditStore
from services.audit.tree_store import StoredCheckpoint
from services.audit.verify import END as _END
from services.audit.verify import Mismatch, Walk

_BATCH = 5000


def _checkpoint_json(checkpoint: StoredCheckpoint) -> str:
    body = json_format.MessageToDict(checkpoint.to_proto())
    return json.dumps({"checkpoint": body}, separators=(",", ":"))


async def write_jsonl(store: AuditStore, out: TextIO, end: int | None = None) -> int:
    """Writes records [0, end) and their checkpoints; returns the records written.

    Args:
        store: The log.
        out: Where to write.
        end: Stop after this many records; None: the latest checkpoint's size.
    """
    if end is None:
        latest = await store.tree.latest()
        end = 0 if latest is None else latest.tree_size
    checkpoints = [c for c in await store.tree.checkpoints(0, _END) if c.tree_size <= end]
    next_checkpoint = 0
    written = 0
    while written < end:
        rows = await store.scan(written, end, _BATCH)
        if not rows:
            break
        for row in rows:
            record = records.stored_record(row.record, row.index, row.leaf_hash)
            line = {
                "index": row.index,
                "canonical": base64.b64encode(row.record).decode(),
                "record": json_format.MessageToDict(record),
            }
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
            written = row.index + 1
            while (
                next_checkpoint < len(checkpoints)
                and checkpoints[next_checkpoint].tree_size == written
            ):
                out.write(_checkpoint_json(checkpoints[next_checkpoint]) + "\n")
                next_checkpoint += 1
    return written


def _stored(body: Any) -> StoredCheckpoint:
    checkpoint = json_format.ParseDict(body, pb.Checkpoint())
    return StoredCheckpoint(
        checkpoint.tree_size,
        checkpoint.root_hash,
        checkpoint.create_time.seconds,
        checkpoint.signature,
        checkpoint.key_id,
    )


def verify_jsonl(
    lines: Iterable[str], public_key: Ed25519PublicKey
) -> tuple[Mismatch | None, int, int]:
    """Verifies an export offline.

    Returns:
        The first mismatch (or None), the records read and the checkpoints checked.
    """
    walk = Walk([], public_key)
    checked = 0
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            if "checkpoint" in line:
                checkpoint = _stored(line["checkpoint"])
                mismatch = walk.check_at(checkpoint)
                checked += 1
            else:
                mismatch = _record_line(walk, line)
        except (ValueError, KeyError, TypeError, binascii.Error, json_format.ParseError) as exc:
            mismatch = Mismatch(walk.expected, f"line {number} is malformed: {exc}")
        if mismatch is not None:
            return mismatch, walk.expected, checked
    if walk.covered < walk.expected:
        # Records a dropped or never-written checkpoint would have covered.
        reason = (
            f"records {walk.covered}..{walk.expected - 1} are not covered by a signed checkpoint"
        )
        return Mismatch(walk.covered, reason), walk.expected, checked
    return None, walk.expected, checked


def _record_line(walk: Walk, line: dict[str, Any]) -> Mismatch | None:
    index = line["index"]
    if index != walk.expected:
        return Mismatch(walk.expected, f"expected index {walk.expected}, found {index}")
    canonical = base64.b64decode(str(line["canonical"]), validate=True)
    leaf = hashing.leaf_hash(canonical)
    try:
        records.entry_from_canonical(canonical)
        stated = json_format.ParseDict(line["record"], pb.AuditRecord())
    except (ValueError, json_format.ParseError) as exc:
        return Mismatch(walk.expected, f"record does not parse: {exc}")
    if stated != records.stored_record(canonical, walk.expected, leaf):
        return Mismatch(walk.expected, "record JSON does not match its canonical bytes or hash")
    return walk.add_leaf(leaf)
