"""The client helper: checks checkpoints and proofs the audit service returns.

Nothing here trusts the server: a checkpoint is accepted only with a valid
Ed25519 signature from a key the caller already holds, and a proof only if it
recomputes that checkpoint's root (RFC 9162 sections 2.1.3.2 and 2.1.4.2).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from orchestra.audit.v1 import audit_service_pb2 as pb
from services.audit import merkle, signing


class ProofInvalid(ValueError):
    """A checkpoint or proof does not verify; the message says what failed."""


def check_checkpoint(checkpoint: pb.Checkpoint, public_key: Ed25519PublicKey) -> None:
    """Checks a checkpoint's key id and signature.

    Raises:
        ProofInvalid: Another key signed it, or the signature does not verify.
    """
    expected = signing.key_id(public_key)
    if checkpoint.key_id != expected:
        raise ProofInvalid(f"checkpoint signed by key {checkpoint.key_id!r}, expected {expected}")
    if not signing.verify_note(
        public_key,
        checkpoint.tree_size,
        checkpoint.root_hash,
        checkpoint.create_time.seconds,
        checkpoint.signature,
    ):
        raise ProofInvalid(f"checkpoint {checkpoint.tree_size}: the signature does not verify")


def check_inclusion(
    leaf_hash: bytes,
    proof: pb.GetInclusionProofResponse,
    checkpoint: pb.Checkpoint,
    public_key: Ed25519PublicKey,
) -> None:
    """Checks that the record with ``leaf_hash`` is in the signed tree.

    Args:
        leaf_hash: The record's leaf hash, recomputed by the caller from the
            record (``SHA-256(0x00 || canonical bytes)``), not taken on trust.
        proof: GetInclusionProof's answer.
        checkpoint: A checkpoint of ``proof.tree_size`` records.
        public_key: The log's public key.

    Raises:
        ProofInvalid: Anything does not verify.
    """
    check_checkpoint(checkpoint, public_key)
    if proof.tree_size != checkpoint.tree_size:
        raise ProofInvalid(
            f"proof is for {proof.tree_size} records, checkpoint for {checkpoint.tree_size}"
        )
    if not merkle.verify_inclusion(
        leaf_hash, proof.leaf_index, proof.tree_size, list(proof.hashes), checkpoint.root_hash
    ):
        raise ProofInvalid(
            f"record {proof.leaf_index} is not proven in the tree of {proof.tree_size}"
        )


def check_consistency(
    proof: pb.GetConsistencyProofResponse,
    first: pb.Checkpoint,
    second: pb.Checkpoint,
    public_key: Ed25519PublicKey,
) -> None:
    """Checks that signed checkpoint ``first`` is a prefix of signed checkpoint ``second``.

    Raises:
        ProofInvalid: Anything does not verify.
    """
    check_checkpoint(first, public_key)
    check_checkpoint(second, public_key)
    if (proof.first_tree_size, proof.second_tree_size) != (first.tree_size, second.tree_size):
        raise ProofInvalid("the proof is for other tree sizes than the checkpoints")
    if not merkle.verify_consistency(
        first.tree_size, second.tree_size, list(proof.hashes), first.root_hash, second.root_hash
    ):
        raise ProofInvalid(
            f"checkpoint {first.tree_size} is not proven a prefix of {second.tree_size}"
        )
