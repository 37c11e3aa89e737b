"""The hashes of the log, as RFC 6962 defines them for a Merkle tree's leaves.

A leaf hash is ``SHA-256(0x00 || canonical record bytes)``; the 0x00 prefix
keeps leaves from ever colliding with interior nodes (``0x01 || left || right``),
which the Merkle tree adds later. Until then each record is also chained to its
predecessor: ``chain[i] = SHA-256(chain[i-1] || leaf[i])`` with ``chain[-1]``
thirty-two zero bytes, so rewriting or removing any record changes every later
chain hash.
"""

from __future__ import annotations

import hashlib

LEAF_PREFIX = b"\x00"
HASH_SIZE = 32
GENESIS_CHAIN = bytes(HASH_SIZE)
"""The chain hash "before" record 0."""


def leaf_hash(canonical: bytes) -> bytes:
    """The RFC 6962 leaf hash of a record's canonical bytes."""
    return hashlib.sha256(LEAF_PREFIX + canonical).digest()


def chain_hash(previous: bytes, leaf: bytes) -> bytes:
    """The chain hash of a record given its predecessor's and its own leaf hash."""
    return hashlib.sha256(previous + leaf).digest()
