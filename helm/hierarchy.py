"""The codon tree (DESIGN.md) and the tensors the losses and metrics read from it.

True tree, depth in brackets::

    root[0]
    ├── codons[1]
    │   ├── start[2] ── ATG[3]
    │   ├── stop[2] ── TAA TAG TGA[3]
    │   └── amino_acids[2] ── A C D ... Y[3] (19, no M) ── their codons[4]
    └── pad cls eos unk mask[1] ── the special token itself[2]

98 nodes, 69 leaves (one per ``3mer`` token id). The random tree keeps this shape and permutes the 64
codons over the 64 codon leaf slots, so true-vs-random comparisons isolate the biology.
``dist(a, b) = height(LCA(a, b))``: 0 same, 1 synonymous, 2 other amino acid, 3 vs start/stop, 4 vs special.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from helm.vocab import (
    AMINO_ACIDS,
    NUM_SPECIAL,
    SPECIAL_TOKENS,
    START_CODON,
    STOP,
    codon_id,
    genetic_code,
    kmers,
)

if TYPE_CHECKING:  # the tree is numpy; torch only for ``tensors`` (the CLI reads HIERARCHIES)
    import torch

HIERARCHIES = ("true", "random")


@dataclass(frozen=True)
class CodonHierarchy:
    """A tree over the 69 ``3mer`` token ids; node 0 is the root, leaves carry ``leaf_node[token_id]``.

    All tables are numpy arrays; ``tensors(device)`` returns torch copies for the loss/metric code.
    """

    kind: str
    seed: int | None
    names: tuple[str, ...]  # node names; leaves are named by their token
    parent: np.ndarray  # (num_nodes,) parent node index, -1 for the root
    leaf_node: np.ndarray  # (V,) node index of each token's leaf

    # Derived tables -------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return len(self.names)

    @property
    def num_leaves(self) -> int:
        return len(self.leaf_node)

    @cached_property
    def depth(self) -> np.ndarray:
        """(num_nodes,) edges from the root."""
        depth = np.zeros(self.num_nodes, dtype=np.int64)
        for n in range(1, self.num_nodes):  # parents precede children (construction order)
            depth[n] = depth[self.parent[n]] + 1
        return depth

    @cached_property
    def height(self) -> np.ndarray:
        """(num_nodes,) longest path down to a leaf (leaves 0, root 4)."""
        height = np.zeros(self.num_nodes, dtype=np.int64)
        for n in range(self.num_nodes - 1, 0, -1):  # children after parents: walk backwards
            p = self.parent[n]
            height[p] = max(height[p], height[n] + 1)
        return height

    @property
    def max_depth(self) -> int:
        return int(self.depth[self.leaf_node].max())

    @cached_property
    def paths(self) -> np.ndarray:
        """(V, max_depth + 1) node indices from the root (column 0) down to each leaf, -1 padded."""
        depth = self.depth
        out = np.full((self.num_leaves, self.max_depth + 1), -1, dtype=np.int64)
        for v, node in enumerate(self.leaf_node):
            while node >= 0:
                out[v, depth[node]] = node
                node = self.parent[node]
        return out

    @cached_property
    def leaf_depth(self) -> np.ndarray:
        """(V,) depth of each token's leaf (4 for codons except ATG/stops at 3, 2 for specials)."""
        return self.depth[self.leaf_node]

    @cached_property
    def descendant_leaves(self) -> np.ndarray:
        """(num_nodes, V) bool: ``[n, v]`` is True when token v's leaf lies under node n (or is n)."""
        out = np.zeros((self.num_nodes, self.num_leaves), dtype=bool)
        for v, row in enumerate(self.paths):
            out[row[row >= 0], v] = True
        return out

    @cached_property
    def group(self) -> np.ndarray:
        """(V,) parent node of each leaf: its amino acid, ``start``, ``stop`` or its special node."""
        return self.parent[self.leaf_node]

    @cached_property
    def same_group(self) -> np.ndarray:
        """(V, V) bool: the two tokens share a parent (synonymous, or identical)."""
        g = self.group
        return g[:, None] == g[None, :]

    @cached_property
    def dist(self) -> np.ndarray:
        """(V, V) int: height of the lowest common ancestor of the two leaves."""
        paths, height = self.paths, self.height
        V = self.num_leaves
        out = np.zeros((V, V), dtype=np.int64)
        for a in range(V):
            # The LCA is the deepest node the two root paths share; paths are root-aligned.
            shared = (paths[a][None, :] == paths) & (paths >= 0)  # (V, max_depth + 1)
            lca_depth = shared.sum(1) - 1
            out[a] = height[paths[np.arange(V), lca_depth]]
        return out

    def node(self, name: str) -> int:
        return self.names.index(name)

    def tensors(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Torch copies of the tables the losses and metrics use."""
        import torch

        arrays = {
            "paths": self.paths,
            "leaf_depth": self.leaf_depth,
            "depth": self.depth,
            "height": self.height,
            "group": self.group,
            "descendant_leaves": self.descendant_leaves,
            "dist": self.dist,
        }
        return {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}

    # Persistence ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Enough to rebuild this exact tree without the RNG (stored in checkpoints)."""
        return {"kind": self.kind, "seed": self.seed, "codon_order": self.codon_order()}

    @classmethod
    def from_state_dict(cls, state: dict) -> CodonHierarchy:
        return _build(state["kind"], state["seed"], list(state["codon_order"]))

    def codon_order(self) -> list[str]:
        """The codons in leaf-slot order (for the true tree: ATG, the stops, then by amino acid)."""
        return [self.names[n] for n in sorted(self.leaf_node[NUM_SPECIAL:])]


def _slot_codons() -> list[str]:
    """Codons in the order of the true tree's leaf slots: start, stops, then amino acids A..Y."""
    code = genetic_code()
    order = [START_CODON] + [c for c in kmers(3) if code[c] == STOP]
    for aa in AMINO_ACIDS:
        if aa != "M":
            order += [c for c in kmers(3) if code[c] == aa]
    return order


def _build(kind: str, seed: int | None, slot_codons: list[str]) -> CodonHierarchy:
    names: list[str] = []
    parent: list[int] = []

    def add(name: str, par: int) -> int:
        names.append(name)
        parent.append(par)
        return len(names) - 1

    code = genetic_code()
    true_slots = _slot_codons()
    leaf_node = np.full(NUM_SPECIAL + 64, -1, dtype=np.int64)

    root = add("root", -1)
    codons = add("codons", root)
    special_nodes = [add(tok.strip("<>"), root) for tok in SPECIAL_TOKENS]
    start, stop, aas = add("start", codons), add("stop", codons), add("amino_acids", codons)
    aa_nodes = {aa: add(aa, aas) for aa in AMINO_ACIDS if aa != "M"}
    for tid, (tok, snode) in enumerate(zip(SPECIAL_TOKENS, special_nodes)):
        leaf_node[tid] = add(tok, snode)
    # Each slot's parent comes from the true tree; the codon placed in it may be permuted.
    for slot_codon, codon in zip(true_slots, slot_codons):
        aa = code[slot_codon]
        par = start if slot_codon == START_CODON else stop if aa == STOP else aa_nodes[aa]
        leaf_node[codon_id(codon)] = add(codon, par)
    assert (leaf_node >= 0).all() and len(names) == 98
    return CodonHierarchy(kind, seed, tuple(names), np.asarray(parent, dtype=np.int64), leaf_node)


def build_hierarchy(kind: str = "true", seed: int = 0) -> CodonHierarchy:
    """The codon tree of ``--hierarchy``: ``true`` (standard genetic code) or ``random`` (seeded)."""
    if kind not in HIERARCHIES:
        raise ValueError(f"--hierarchy must be one of {HIERARCHIES}, got {kind!r}")
    slots = _slot_codons()
    if kind == "true":
        return _build(kind, None, slots)
    perm = np.random.default_rng(seed).permutation(len(slots))
    return _build(kind, seed, [slots[i] for i in perm])
