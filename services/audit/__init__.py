"""The audit service: an append-only, tamper-evident log of requests and admin changes.

Records get a gap-free index from a single database-wide sequencer, an RFC 6962
leaf hash of their canonical bytes, and a hash chain linking each record to the
one before it (``hashing.py``, ``store.py``). In the same transaction the
sequencer extends the RFC 6962 Merkle tree (``merkle.py``, ``tree_store.py``)
and stores a checkpoint of the new size signed with Ed25519 (``signing.py``).
The signed text of a checkpoint is, byte for byte::

    orchestra.dev/audit\\n<tree_size>\\n<base64 root hash>\\n<create_time unix seconds>\\n

``key_id`` is the hex of the first 16 bytes of SHA-256 of the raw public key.
Inclusion and consistency proofs (RFC 9162 sections 2.1.3 and 2.1.4) are
served for any tree a checkpoint covers and checked by ``proofs.py``;
``verify.py`` recomputes the whole log and every checkpoint, and
``export.py`` writes and verifies a JSONL export offline.
"""
