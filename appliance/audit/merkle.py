"""RFC 6962 (RFC 9162 section 2.1) Merkle tree hashing, proofs and their verification, over SHA-256.

Leaves are ``SHA-256(0x00 || data)``, interior nodes ``SHA-256(0x01 || left || right)``; the tree of n leaves
splits at the largest power of two smaller than n. Every subtree met while building a proof is a range
``[start, end)`` whose start is a multiple of the largest power of two not above its size; a *complete* one
(size a power of two) is the node ``(level, start >> level)`` that the store keeps, an incomplete one (on the
right edge) is hashed from at most log2(n) complete ones. The proof functions take that lookup as an argument,
so they serve a tree in memory and one in the database alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

Node = tuple[int, int]  # (level, index): the complete subtree of leaves [index << level, (index + 1) << level)
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof that does not verify, or a request for one that cannot exist."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def complete_nodes(start: int, end: int) -> list[Node]:
    """The complete subtrees whose hashes make up the subtree ``[start, end)``, left to right."""
    nodes: list[Node] = []
    while end > start:
        size = end - start
        if size & (size - 1) == 0:
            level = size.bit_length() - 1
            nodes.append((level, start >> level))
            break
        k = _split(size)
        level = k.bit_length() - 1
        nodes.append((level, start >> level))
        start += k
    return nodes


def fold(hashes: Sequence[bytes]) -> bytes:
    """The hash of a subtree from its complete parts (``complete_nodes`` order): each right part is smaller."""
    result = hashes[-1]
    for left in reversed(hashes[:-1]):
        result = node_hash(left, result)
    return result


Ranges = list[tuple[int, int]]


def inclusion_ranges(index: int, size: int) -> Ranges:
    """The subtrees whose hashes are the inclusion proof of leaf ``index`` in the tree of ``size`` leaves,
    from the leaf's sibling up (RFC 9162 2.1.3.1, PATH)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of {size}")
    ranges: Ranges = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    ranges.reverse()
    return ranges


def consistency_ranges(old: int, new: int) -> Ranges:
    """The subtrees whose hashes prove that the tree of ``new`` leaves extends the tree of ``old`` leaves
    (RFC 9162 2.1.4.1, SUBPROOF(m, D[n], true))."""
    if not 0 < old <= new:
        raise ProofError(f"no consistency proof from size {old} to size {new}")
    ranges: Ranges = []
    start, end, m, whole = 0, new, old, True
    while True:
        n = end - start
        if m == n:
            if not whole:
                ranges.append((start, end))
            break
        k = _split(n)
        if m <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start, m, whole = start + k, m - k, False
    ranges.reverse()
    return ranges


def nodes_for(ranges: Ranges) -> set[Node]:
    return {node for start, end in ranges for node in complete_nodes(start, end)}


def resolve(ranges: Ranges, lookup: Callable[[Node], bytes]) -> list[bytes]:
    """The hashes of ``ranges``, each folded from its complete subtrees."""
    return [fold([lookup(node) for node in complete_nodes(start, end)]) for start, end in ranges]


def tree_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH of the leaf *data* (a reference, for tests and small trees)."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = _split(len(leaves))
    return node_hash(tree_hash(leaves[:k]), tree_hash(leaves[k:]))


def _sized(*hashes: bytes) -> None:
    if any(len(h) != 32 for h in hashes):
        raise ProofError("a hash is not 32 bytes long")


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 2.1.3.2; raises ProofError unless ``leaf`` (a leaf hash) is at ``index`` under ``root``."""
    _sized(leaf, *proof)
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the proof is too short")
    if r != root:
        raise ProofError("the proof does not lead to the root")


def verify_consistency(old: int, new: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes) -> None:
    """RFC 9162 2.1.4.2; raises ProofError unless the tree ``new_root`` of ``new`` leaves extends the tree
    ``old_root`` of ``old`` leaves."""
    _sized(*proof)
    if old > new:
        raise ProofError(f"size {old} is past size {new}")
    if old == 0:
        raise ProofError("a consistency proof from the empty tree means nothing")
    if old == new:
        if proof:
            raise ProofError("equal sizes take an empty proof")
        if old_root != new_root:
            raise ProofError("the roots of one size differ")
        return
    if not proof:
        raise ProofError("empty proof")
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the proof is too short")
    if fr != old_root or sr != new_root:
        raise ProofError("the proof does not lead to both roots")
