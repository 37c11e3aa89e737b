"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification.

No I/O: proof *generation* is expressed over a ``subtree`` callback that
returns the Merkle Tree Hash (MTH) of a leaf range, so the same code serves an
in-memory list of leaves and PostgreSQL (see ``tree_store.py``). Every range
that RFC 6962 proofs ask for is a node of the tree: it starts at a multiple of
the largest power of two not above its size, so it splits into at most
``log2(size)`` *aligned complete* subtrees (:func:`aligned_pieces`), whose
hashes a store can keep precomputed.

Hashes (RFC 6962 section 2.1):

* leaf: ``SHA-256(0x00 || data)``
* node: ``SHA-256(0x01 || left || right)``
* MTH of ``D[0:n]``, n > 1: ``node(MTH(D[0:k]), MTH(D[k:n]))`` with ``k`` the
  largest power of two smaller than ``n``; the empty tree hashes to
  ``SHA-256("")``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

Range = tuple[int, int]
"""A leaf range ``[start, end)``."""

SubtreeHash = Callable[[int, int], bytes]
"""Returns MTH of the leaves ``[start, end)`` (a node of the tree)."""


class ProofError(ValueError):
    """A proof was asked for (or checked against) impossible sizes or indices."""


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(size: int) -> int:
    """The largest power of two strictly smaller than ``size`` (``size`` > 1)."""
    return 1 << ((size - 1).bit_length() - 1)


def root_of_leaf_hashes(leaves: Sequence[bytes]) -> bytes:
    """MTH of a list of leaf hashes, in O(n) hashing and O(log n) memory."""
    if not leaves:
        return EMPTY_ROOT
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier.root()


class Frontier:
    """The right edge of a growing tree: one complete subtree per set bit of size.

    Appending a leaf merges equal-sized subtrees, like incrementing a binary
    counter; :meth:`root` folds the edge right to left. This is how the
    sequencer and the verifier compute roots without holding the whole tree.
    """

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        """Starts from a tree of ``size`` leaves whose edge is ``hashes``.

        Args:
            size: The leaves already in the tree.
            hashes: The hashes of :func:`edge_pieces` ``(size)``, left to right.
        """
        if len(hashes) != size.bit_count():
            raise ProofError(f"a tree of {size} leaves has {size.bit_count()} edge subtrees")
        self.size = size
        self.hashes = list(hashes)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Adds a leaf hash; returns the complete subtrees it completed.

        Returns:
            ``(level, position, hash)`` of each subtree of 2**level leaves that
            is complete now and was not before, level >= 1, lowest first.
        """
        completed: list[tuple[int, int, bytes]] = []
        current = leaf
        index = self.size
        level = 0
        while index & 1:
            current = node_hash(self.hashes.pop(), current)
            index >>= 1
            level += 1
            completed.append((level, index, current))
        self.hashes.append(current)
        self.size += 1
        return completed

    def extend(self, leaves: Sequence[bytes]) -> None:
        """Adds many leaf hashes (as :meth:`append` each, without listing subtrees).

        The verifier's hot loop: the same carries as :meth:`append`, with the
        hashing inlined.
        """
        sha256 = hashlib.sha256
        hashes = self.hashes
        size = self.size
        for current in leaves:
            carry = size
            while carry & 1:
                current = sha256(b"\x01" + hashes.pop() + current).digest()
                carry >>= 1
            hashes.append(current)
            size += 1
        self.size = size

    def root(self) -> bytes:
        """MTH of the tree so far."""
        if not self.hashes:
            return EMPTY_ROOT
        root = self.hashes[-1]
        for piece in reversed(self.hashes[:-1]):
            root = node_hash(piece, root)
        return root


def edge_pieces(size: int) -> list[tuple[int, int]]:
    """``(level, position)`` of the complete subtrees on the edge of a tree, left to right."""
    pieces: list[tuple[int, int]] = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            pieces.append((level, start >> level))
            start += 1 << level
    return pieces


def aligned_pieces(start: int, end: int) -> list[tuple[int, int]]:
    """Splits a tree node ``[start, end)`` into aligned complete subtrees.

    Returns:
        ``(level, position)`` pairs, left to right: the subtree of leaves
        ``[position * 2**level, (position + 1) * 2**level)``. MTH of the range
        is the right-to-left fold of their hashes with :func:`node_hash`.
    """
    pieces: list[tuple[int, int]] = []
    while start < end:
        size = end - start
        level = size.bit_length() - 1
        if size == 1 << level:
            pieces.append((level, start >> level))
            break
        pieces.append((level, start >> level))
        start += 1 << level
    return pieces


def fold(hashes: Sequence[bytes]) -> bytes:
    """Folds aligned piece hashes (left to right) into the MTH of their range."""
    result = hashes[-1]
    for piece in reversed(hashes[:-1]):
        result = node_hash(piece, result)
    return result


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """The ranges whose MTHs form the audit path of leaf ``index`` in ``size`` leaves.

    Ordered leaf to root (RFC 6962 section 2.1.1).

    Raises:
        ProofError: ``index`` is not below ``size``.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of {size} leaves")
    ranges: list[Range] = []
    start, end = 0, size
    while end - start > 1:
        k = split_point(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    ranges.reverse()
    return ranges


def consistency_ranges(first: int, second: int) -> list[Range]:
    """The ranges whose MTHs form the consistency proof from ``first`` to ``second``.

    Ordered as RFC 6962 section 2.1.2's SUBPROOF emits them. Empty when
    ``first`` is 0 or equal to ``second``.

    Raises:
        ProofError: ``first`` > ``second`` or a size is negative.
    """
    if not 0 <= first <= second:
        raise ProofError(f"no consistency proof from {first} to {second} leaves")
    if first in (0, second):
        return []
    ranges: list[Range] = []
    start, end, whole = 0, second, True
    while first != end:
        k = split_point(end - start)
        if first - start <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
            whole = False
    if not whole:
        ranges.append((start, end))
    ranges.reverse()
    return ranges


def inclusion_proof(index: int, size: int, subtree: SubtreeHash) -> list[bytes]:
    """The audit path of leaf ``index`` in a tree of ``size`` leaves."""
    return [subtree(a, b) for a, b in inclusion_ranges(index, size)]


def consistency_proof(first: int, second: int, subtree: SubtreeHash) -> list[bytes]:
    """The consistency proof between trees of ``first`` and ``second`` leaves."""
    return [subtree(a, b) for a, b in consistency_ranges(first, second)]


def _lsb(value: int) -> int:
    return value & 1


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 section 2.1.3.2: does ``proof`` put ``leaf`` at ``index`` under ``root``?"""
    if not 0 <= index < size or any(len(p) != HASH_SIZE for p in proof):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if _lsb(fn) or fn == sn:
            r = node_hash(p, r)
            while not _lsb(fn) and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    first: int, second: int, proof: Sequence[bytes], first_root: bytes, second_root: bytes
) -> bool:
    """RFC 9162 section 2.1.4.2: is the ``first``-leaf tree a prefix of the ``second``?

    A tree of 0 leaves is a prefix of any tree (the proof must then be empty).
    """
    if not 0 <= first <= second or any(len(p) != HASH_SIZE for p in proof):
        return False
    if first == 0:
        return not proof and first_root == EMPTY_ROOT
    if first == second:
        return not proof and first_root == second_root
    path = list(proof)
    if first & (first - 1) == 0:  # an exact power of two: the old root is a node
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while _lsb(fn):
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if _lsb(fn) or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not _lsb(fn) and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0
