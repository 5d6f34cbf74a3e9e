"""The Merkle tree hashes and proofs are RFC 6962's: checked against the vectors of independent implementations
(certificate-transparency's, as transparency-dev/merkle keeps them, and that library's verifier probes)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from appliance.audit.merkle import (
    ProofError,
    consistency_ranges,
    inclusion_ranges,
    leaf_hash,
    resolve,
    tree_hash,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parent / "vectors" / "merkle"
LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")
]
ROOTS = [  # of the first 1..8 leaves
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION = [  # (leaf number, 1-based as in the source; tree size; proof)
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (2, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip
CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]  # fmt: skip


def lookup(leaves: list[bytes]) -> Any:
    return lambda node: tree_hash(leaves[node[1] << node[0] : (node[1] + 1) << node[0]])


def test_roots_of_the_reference_leaves() -> None:
    assert [tree_hash(LEAVES[:n]).hex() for n in range(1, 9)] == ROOTS
    assert tree_hash([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
def test_inclusion_proofs_are_the_reference_proofs(leaf: int, size: int, proof: list[str]) -> None:
    made = resolve(inclusion_ranges(leaf - 1, size), lookup(LEAVES))
    assert [h.hex() for h in made] == proof
    verify_inclusion(leaf - 1, size, leaf_hash(LEAVES[leaf - 1]), made, bytes.fromhex(ROOTS[size - 1]))


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
def test_consistency_proofs_are_the_reference_proofs(old: int, new: int, proof: list[str]) -> None:
    made = resolve(consistency_ranges(old, new), lookup(LEAVES))
    assert [h.hex() for h in made] == proof
    verify_consistency(old, new, made, bytes.fromhex(ROOTS[old - 1]), bytes.fromhex(ROOTS[new - 1]))


def _b64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def test_transparency_dev_verifier_probes_pass_and_fail_as_there() -> None:
    probes = json.loads((VECTORS / "transparency-dev-probes.json").read_text())
    outcomes = []
    for probe in probes["inclusion"]:
        try:
            verify_inclusion(
                probe["leafIdx"],
                probe["treeSize"],
                _b64(probe["leafHash"]),
                [_b64(h) for h in probe["proof"] or []],
                _b64(probe["root"]),
            )
            outcomes.append((probe["file"], False, probe["wantErr"]))
        except ProofError:
            outcomes.append((probe["file"], True, probe["wantErr"]))
    for probe in probes["consistency"]:
        try:
            verify_consistency(
                probe["size1"],
                probe["size2"],
                [_b64(h) for h in probe["proof"] or []],
                _b64(probe["root1"]),
                _b64(probe["root2"]),
            )
            outcomes.append((probe["file"], False, probe["wantErr"]))
        except ProofError:
            outcomes.append((probe["file"], True, probe["wantErr"]))
    assert len(outcomes) == 196 and sum(want for _, _, want in outcomes) > 150
    assert [file for file, failed, want in outcomes if failed != want] == []


def test_every_proof_of_trees_up_to_70_leaves_verifies_and_a_changed_hash_does_not() -> None:
    leaves = [bytes([n % 251]) * (n % 7) for n in range(70)]
    roots = [tree_hash(leaves[:n]) for n in range(71)]
    for size in range(1, 71):
        for index in range(size):
            proof = resolve(inclusion_ranges(index, size), lookup(leaves))
            verify_inclusion(index, size, leaf_hash(leaves[index]), proof, roots[size])
        for old in range(1, size + 1):
            proof = resolve(consistency_ranges(old, size), lookup(leaves))
            verify_consistency(old, size, proof, roots[old], roots[size])
            if proof:
                with pytest.raises(ProofError):
                    verify_consistency(old, size, [*proof[:-1], bytes(32)], roots[old], roots[size])
    with pytest.raises(ProofError):
        verify_inclusion(3, 70, leaf_hash(b"not leaf 3"), resolve(inclusion_ranges(3, 70), lookup(leaves)), roots[70])
