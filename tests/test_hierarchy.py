import numpy as np
import pytest

from helm.hierarchy import CodonHierarchy, build_hierarchy
from helm.vocab import (
    AMINO_ACIDS,
    NUM_SPECIAL,
    SPECIAL_TOKENS,
    codon_id,
    genetic_code,
    kmer_vocab,
    kmers,
    translate,
)

CODON = codon_id


def test_vocab_ids_follow_design():
    vocab = kmer_vocab(3)
    assert len(vocab) == 69
    assert vocab[:5] == ["<pad>", "<cls>", "<eos>", "<unk>", "<mask>"]
    assert vocab.index("AAA") == 5 and vocab.index("AAC") == 6 and vocab.index("TTT") == 68
    assert all(CODON(c) == vocab.index(c) for c in kmers(3))


def test_genetic_code_spot_checks():
    code = genetic_code()
    assert len(code) == 64
    assert code["ATG"] == "M" and code["TGG"] == "W"
    assert {c for c, a in code.items() if a == "*"} == {"TAA", "TAG", "TGA"}
    assert sorted(set(code.values()) - {"*"}) == sorted(AMINO_ACIDS)
    assert translate("ATGGCTTGGTAAGG") == "MAW*"
    assert translate("ATGNNNTAA", to_stop=True) == "MX"


def test_true_tree_shape():
    h = build_hierarchy("true")
    assert h.num_nodes == 98 and h.num_leaves == 69
    assert h.depth.max() == 4 and h.height[0] == 4 and h.depth[0] == 0
    assert (h.height[h.leaf_node] == 0).all()
    # Leaves sit at the depths DESIGN.md gives.
    for tid in range(NUM_SPECIAL):
        assert h.leaf_depth[tid] == 2
    assert h.leaf_depth[CODON("ATG")] == 3
    for stop in ("TAA", "TAG", "TGA"):
        assert h.leaf_depth[CODON(stop)] == 3
    assert h.leaf_depth[CODON("GCT")] == 4


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("GTT", "GTT", 0),
        ("GTT", "GTC", 1),
        ("GTT", "GCT", 2),
        ("GTT", "TAA", 3),
        ("ATG", "TGG", 3),
        ("TAA", "TGA", 1),
        ("ATG", "TAA", 3),
    ],
)
def test_distance_examples(a, b, expected):
    h = build_hierarchy("true")
    assert h.dist[CODON(a), CODON(b)] == expected
    assert h.dist[CODON(b), CODON(a)] == expected


def test_distance_to_specials_is_four():
    h = build_hierarchy("true")
    for tid in range(NUM_SPECIAL):
        assert h.dist[CODON("GTT"), tid] == 4
        assert h.dist[tid, tid] == 0
        for other in range(NUM_SPECIAL):
            if other != tid:
                assert h.dist[tid, other] == 4


def test_every_codon_under_its_amino_acid():
    h = build_hierarchy("true")
    code = genetic_code()
    for codon in kmers(3):
        parent = h.names[h.group[CODON(codon)]]
        aa = code[codon]
        expected = "start" if codon == "ATG" else "stop" if aa == "*" else aa
        assert parent == expected, codon
    for tid, tok in enumerate(SPECIAL_TOKENS):
        assert h.names[h.group[tid]] == tok.strip("<>")


def test_dist_matches_definition_from_genetic_code():
    """dist computed independently from amino-acid labels, for every codon pair."""
    h = build_hierarchy("true")
    code = genetic_code()

    def label(c):
        return "start" if c == "ATG" else code[c]

    def category(c):
        return "aa" if label(c) not in ("start", "*") else label(c)

    for a in kmers(3):
        for b in kmers(3):
            if a == b:
                want = 0
            elif label(a) == label(b):  # synonymous, or two stops
                want = 1
            elif category(a) == category(b) == "aa":  # two amino acids
                want = 2
            else:  # different branches of `codons`: amino acid / start / stop
                want = 3
            assert h.dist[CODON(a), CODON(b)] == want, (a, b)


def test_paths_and_descendants_consistent():
    h = build_hierarchy("true")
    paths, desc = h.paths, h.descendant_leaves
    for v in range(h.num_leaves):
        row = paths[v][paths[v] >= 0]
        assert row[0] == 0 and row[-1] == h.leaf_node[v]
        assert len(row) == h.leaf_depth[v] + 1
        assert desc[row, v].all()
    assert desc[0].all()  # the root covers every leaf
    assert desc[h.node("amino_acids")].sum() == 64 - 4


def test_random_tree_same_shape_different_biology():
    t = build_hierarchy("true")
    r = build_hierarchy("random", seed=7)
    assert r.num_nodes == t.num_nodes
    np.testing.assert_array_equal(np.sort(r.leaf_depth), np.sort(t.leaf_depth))
    np.testing.assert_array_equal(r.parent, t.parent)  # same shape, node for node
    np.testing.assert_array_equal(r.dist[:NUM_SPECIAL], t.dist[:NUM_SPECIAL])  # specials stay
    assert (r.dist != t.dist).any()
    # The multiset of pairwise distances is a property of the shape only.
    np.testing.assert_array_equal(np.sort(r.dist.ravel()), np.sort(t.dist.ravel()))


def test_random_tree_is_seeded_and_restorable():
    a, b, c = (build_hierarchy("random", seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.dist, b.dist)
    assert (a.dist != c.dist).any()
    restored = CodonHierarchy.from_state_dict(a.state_dict())
    np.testing.assert_array_equal(restored.dist, a.dist)
    np.testing.assert_array_equal(restored.leaf_node, a.leaf_node)


def test_bad_kind_is_refused():
    with pytest.raises(ValueError, match="--hierarchy"):
        build_hierarchy("biological")
