"""Signed checkpoints and proofs through gRPC, checked by the client helper."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from orchestra.audit.v1 import audit_service_pb2 as pb
from services.audit import merkle, proofs
from services.audit.records import canonical_bytes
from services.common import errors
from tests.audit.conftest import Audit, Metadata
from tests.audit.factory import admin, chat

_BATCHES = [1, 2, 3, 7, 20]


async def _seed(audit: Audit, internal: Metadata) -> list[bytes]:
    """Appends the batches; returns every record's leaf hash, computed locally."""
    leaves: list[bytes] = []
    for b, size in enumerate(_BATCHES):
        batch = [chat(f"c{b}-{i}", minute=i) if i % 2 else admin(f"a{b}-{i}") for i in range(size)]
        await audit.stub.AppendRecords(pb.AppendRecordsRequest(records=batch), metadata=internal)
        leaves += [merkle.leaf_hash(canonical_bytes(r)) for r in batch]
    return leaves


async def _checkpoints(audit: Audit, who: Metadata) -> list[pb.Checkpoint]:
    found: list[pb.Checkpoint] = []
    token = ""
    while True:
        page = await audit.stub.ListCheckpoints(
            pb.ListCheckpointsRequest(page_size=2, page_token=token), metadata=who
        )
        found += page.checkpoints
        token = page.next_page_token
        if not token:
            return found


async def test_every_batch_gets_a_signed_checkpoint(
    audit: Audit, internal: Metadata, operator: Metadata
) -> None:
    leaves = await _seed(audit, internal)
    key = audit.service.store.tree.signer.public_key

    checkpoints = await _checkpoints(audit, operator)
    sizes = [sum(_BATCHES[: i + 1]) for i in range(len(_BATCHES))]
    assert [c.tree_size for c in checkpoints] == sizes
    for checkpoint in checkpoints:
        proofs.check_checkpoint(checkpoint, key)
        assert checkpoint.root_hash == merkle.root_of_leaf_hashes(leaves[: checkpoint.tree_size])

    latest = await audit.stub.GetLatestCheckpoint(
        pb.GetLatestCheckpointRequest(), metadata=operator
    )
    assert latest.checkpoint == checkpoints[-1]


async def test_inclusion_proofs_verify_for_every_record_and_checkpoint(
    audit: Audit, internal: Metadata, reader: object, operator: Metadata
) -> None:
    leaves = await _seed(audit, internal)
    key = audit.service.store.tree.signer.public_key
    for checkpoint in await _checkpoints(audit, operator):
        for index in range(checkpoint.tree_size):
            proof = await audit.stub.GetInclusionProof(
                pb.GetInclusionProofRequest(leaf_index=index, tree_size=checkpoint.tree_size),
                metadata=operator,
            )
            proofs.check_inclusion(leaves[index], proof, checkpoint, key)
            with pytest.raises(proofs.ProofInvalid):
                proofs.check_inclusion(
                    leaves[index - 1] if index else b"x" * 32, proof, checkpoint, key
                )


async def test_inclusion_defaults_to_the_latest_checkpoint(
    audit: Audit, internal: Metadata, operator: Metadata
) -> None:
    leaves = await _seed(audit, internal)
    proof = await audit.stub.GetInclusionProof(
        pb.GetInclusionProofRequest(leaf_index=5), metadata=operator
    )
    latest = await audit.stub.GetLatestCheckpoint(
        pb.GetLatestCheckpointRequest(), metadata=operator
    )
    assert proof.tree_size == sum(_BATCHES)
    proofs.check_inclusion(
        leaves[5], proof, latest.checkpoint, audit.service.store.tree.signer.public_key
    )


async def test_consistency_proofs_verify_between_every_pair_of_checkpoints(
    audit: Audit, internal: Metadata, operator: Metadata
) -> None:
    await _seed(audit, internal)
    key = audit.service.store.tree.signer.public_key
    checkpoints = await _checkpoints(audit, operator)
    for i, first in enumerate(checkpoints):
        for second in checkpoints[i:]:
            proof = await audit.stub.GetConsistencyProof(
                pb.GetConsistencyProofRequest(
                    first_tree_size=first.tree_size, second_tree_size=second.tree_size
                ),
                metadata=operator,
            )
            proofs.check_consistency(proof, first, second, key)
            if first.tree_size != second.tree_size:
                with pytest.raises(proofs.ProofInvalid):
                    proofs.check_consistency(proof, second, first, key)


async def test_a_checkpoint_from_another_key_is_refused(
    audit: Audit, internal: Metadata, operator: Metadata
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    await _seed(audit, internal)
    latest = await audit.stub.GetLatestCheckpoint(
        pb.GetLatestCheckpointRequest(), metadata=operator
    )
    with pytest.raises(proofs.ProofInvalid, match="signed by key"):
        proofs.check_checkpoint(latest.checkpoint, Ed25519PrivateKey.generate().public_key())
    forged = pb.Checkpoint()
    forged.CopyFrom(latest.checkpoint)
    forged.tree_size -= 1
    with pytest.raises(proofs.ProofInvalid, match="signature"):
        proofs.check_checkpoint(forged, audit.service.store.tree.signer.public_key)


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("GetLatestCheckpoint", pb.GetLatestCheckpointRequest()),
        ("GetInclusionProof", pb.GetInclusionProofRequest(leaf_index=0)),
        ("GetConsistencyProof", pb.GetConsistencyProofRequest(first_tree_size=0)),
    ],
)
async def test_an_empty_log_has_no_checkpoint(
    audit: Audit, operator: Metadata, method: str, request_message: object
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(audit.stub, method)(request_message, metadata=operator)
    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")
    page = await audit.stub.ListCheckpoints(pb.ListCheckpointsRequest(), metadata=operator)
    assert list(page.checkpoints) == []


@pytest.mark.parametrize(
    ("method", "request_message", "field"),
    [
        ("GetInclusionProof", pb.GetInclusionProofRequest(leaf_index=-1), "leaf_index"),
        ("GetInclusionProof", pb.GetInclusionProofRequest(tree_size=-1), "tree_size"),
        ("GetInclusionProof", pb.GetInclusionProofRequest(leaf_index=33), "leaf_index"),
        ("GetInclusionProof", pb.GetInclusionProofRequest(leaf_index=3, tree_size=3), "leaf_index"),
        ("GetInclusionProof", pb.GetInclusionProofRequest(tree_size=34), "tree_size"),
        (
            "GetConsistencyProof",
            pb.GetConsistencyProofRequest(first_tree_size=-1),
            "first_tree_size",
        ),
        (
            "GetConsistencyProof",
            pb.GetConsistencyProofRequest(first_tree_size=7, second_tree_size=6),
            "first_tree_size",
        ),
        (
            "GetConsistencyProof",
            pb.GetConsistencyProofRequest(first_tree_size=1, second_tree_size=34),
            "second_tree_size",
        ),
        ("ListCheckpoints", pb.ListCheckpointsRequest(page_size=-1), "page_size"),
    ],
)
async def test_impossible_requests_are_invalid_arguments(
    audit: Audit,
    internal: Metadata,
    operator: Metadata,
    method: str,
    request_message: object,
    field: str,
) -> None:
    await _seed(audit, internal)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(audit.stub, method)(request_message, metadata=operator)
    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert error.metadata["field"] == field


async def test_proofs_need_an_identity(audit: Audit, internal: Metadata) -> None:
    await _seed(audit, internal)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.GetInclusionProof(pb.GetInclusionProofRequest(leaf_index=0))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_log_without_its_tree_is_caught_up_at_start(
    audit: Audit, internal: Metadata, operator: Metadata, superuser: object
) -> None:
    leaves = await _seed(audit, internal)
    conn: Any = superuser
    for table in ("subtrees", "checkpoints"):
        await conn.execute(f"ALTER TABLE audit.{table} DISABLE TRIGGER ALL")
        await conn.execute(f"DELETE FROM audit.{table}")
        await conn.execute(f"ALTER TABLE audit.{table} ENABLE TRIGGER ALL")

    await audit.service.start()

    latest = await audit.stub.GetLatestCheckpoint(
        pb.GetLatestCheckpointRequest(), metadata=operator
    )
    assert latest.checkpoint.tree_size == len(leaves)
    assert latest.checkpoint.root_hash == merkle.root_of_leaf_hashes(leaves)
    proof = await audit.stub.GetInclusionProof(
        pb.GetInclusionProofRequest(leaf_index=17), metadata=operator
    )
    key = audit.service.store.tree.signer.public_key
    proofs.check_inclusion(leaves[17], proof, latest.checkpoint, key)


async def test_the_tree_tables_refuse_rewrites(
    audit: Audit, internal: Metadata, superuser: object
) -> None:
    import asyncpg

    await _seed(audit, internal)
    conn: Any = superuser
    for statement in (
        "UPDATE audit.checkpoints SET unix_time = 0",
        "DELETE FROM audit.subtrees",
        "TRUNCATE audit.checkpoints",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(statement)
