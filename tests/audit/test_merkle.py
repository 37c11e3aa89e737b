"""RFC 6962 hashing on the certificate-transparency vectors, proofs against a naive tree."""

from __future__ import annotations

import hashlib

import pytest

from services.audit import merkle

# transparency-dev/merkle testonly/constants.go (the RFC 6962 reference inputs).
INPUTS = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# (leaf index, tree size, audit path) from transparency-dev/merkle's test data.
INCLUSION = [
    (0, 1, []),
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(str(i).encode()) for i in range(n)]


# A naive reference, written straight from RFC 6962 section 2.1's recursion.
def _mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


def _path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) <= 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m < k:
        return [*_path(m, leaves[:k]), _mth(leaves[k:])]
    return [*_path(m - k, leaves[k:]), _mth(leaves[:k])]


def _subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [_mth(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*_subproof(m, leaves[:k], whole), _mth(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), _mth(leaves[:k])]


def _subtree(leaves: list[bytes]) -> merkle.SubtreeHash:
    return lambda a, b: _mth(leaves[a:b])


def test_roots_match_the_rfc_vectors() -> None:
    leaves = [merkle.leaf_hash(data) for data in INPUTS]
    for size, expected in enumerate(ROOTS):
        assert merkle.root_of_leaf_hashes(leaves[:size]).hex() == expected


@pytest.mark.parametrize(("index", "size", "path"), INCLUSION)
def test_inclusion_proofs_match_the_vectors(index: int, size: int, path: list[str]) -> None:
    leaves = [merkle.leaf_hash(data) for data in INPUTS]
    proof = merkle.inclusion_proof(index, size, _subtree(leaves))
    assert [p.hex() for p in proof] == path
    root = bytes.fromhex(ROOTS[size])
    assert merkle.verify_inclusion(leaves[index], index, size, proof, root)


@pytest.mark.parametrize(("first", "second", "path"), CONSISTENCY)
def test_consistency_proofs_match_the_vectors(first: int, second: int, path: list[str]) -> None:
    leaves = [merkle.leaf_hash(data) for data in INPUTS]
    proof = merkle.consistency_proof(first, second, _subtree(leaves))
    assert [p.hex() for p in proof] == path
    roots = bytes.fromhex(ROOTS[first]), bytes.fromhex(ROOTS[second])
    assert merkle.verify_consistency(first, second, proof, *roots)


def test_every_inclusion_proof_up_to_64_matches_the_reference() -> None:
    leaves = _leaves(64)
    for size in range(1, 65):
        root = _mth(leaves[:size])
        assert merkle.root_of_leaf_hashes(leaves[:size]) == root
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, _subtree(leaves))
            assert proof == _path(index, leaves[:size])
            assert merkle.verify_inclusion(leaves[index], index, size, proof, root)
            assert not merkle.verify_inclusion(leaves[index], index, size, proof, merkle.EMPTY_ROOT)
            other = (index + 1) % size
            if other != index:
                assert not merkle.verify_inclusion(leaves[other], index, size, proof, root)
            if proof:
                assert not merkle.verify_inclusion(leaves[index], index, size, proof[:-1], root)
                assert not merkle.verify_inclusion(leaves[index], index, size, [*proof, root], root)


def test_every_consistency_proof_up_to_64_matches_the_reference() -> None:
    leaves = _leaves(64)
    roots = [_mth(leaves[:n]) for n in range(65)]
    for second in range(1, 65):
        for first in range(0, second + 1):
            proof = merkle.consistency_proof(first, second, _subtree(leaves))
            expected = [] if first in (0, second) else _subproof(first, leaves[:second], True)
            assert proof == expected
            assert merkle.verify_consistency(first, second, proof, roots[first], roots[second])
            if 0 < first < second:
                assert not merkle.verify_consistency(
                    first, second, proof, roots[first], roots[second - 1]
                )
                assert not merkle.verify_consistency(
                    first, second, proof[:-1], roots[first], roots[second]
                )
                flipped = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
                assert not merkle.verify_consistency(
                    first, second, flipped, roots[first], roots[second]
                )


def test_aligned_pieces_fold_to_the_range_hash() -> None:
    leaves = _leaves(64)
    for size in range(1, 65):
        for start, end in merkle.inclusion_ranges(size - 1, size):
            pieces = merkle.aligned_pieces(start, end)
            hashes = [_mth(leaves[p << lv : (p + 1) << lv]) for lv, p in pieces]
            assert merkle.fold(hashes) == _mth(leaves[start:end])


def test_the_frontier_reports_completed_subtrees() -> None:
    leaves = _leaves(13)
    frontier = merkle.Frontier()
    completed: dict[tuple[int, int], bytes] = {}
    for leaf in leaves:
        for level, position, digest in frontier.append(leaf):
            completed[level, position] = digest
    assert frontier.root() == _mth(leaves)
    assert completed[3, 0] == _mth(leaves[:8])
    assert completed[2, 2] == _mth(leaves[8:12])
    assert (3, 1) not in completed
    resumed = merkle.Frontier(12, [completed[lv, p] for lv, p in merkle.edge_pieces(12)])
    resumed.append(leaves[12])
    assert resumed.root() == _mth(leaves)


@pytest.mark.parametrize(("index", "size"), [(-1, 4), (4, 4), (0, 0)])
def test_impossible_inclusion_proofs_are_refused(index: int, size: int) -> None:
    with pytest.raises(merkle.ProofError):
        merkle.inclusion_ranges(index, size)
    assert not merkle.verify_inclusion(b"\x00" * 32, index, size, [], b"\x00" * 32)


def test_impossible_consistency_proofs_are_refused() -> None:
    with pytest.raises(merkle.ProofError):
        merkle.consistency_ranges(5, 4)
