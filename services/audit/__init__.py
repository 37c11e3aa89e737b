"""The audit service: an append-only, tamper-evident log of requests and admin changes.

Records get a gap-free index from a single database-wide sequencer, an RFC 6962
leaf hash of their canonical bytes, and a hash chain linking each record to the
one before it. The Merkle tree, signed checkpoints and proofs build on the same
leaf hashes (see ``hashing.py``).
"""
