"""The residue tokenizer of ``--data-type aa``: one token per amino-acid letter.

Vocabulary (27): the five specials, the 20 standard residues of `helm.vocab.AMINO_ACIDS` in that
order, then ``*`` (stop) and ``X`` (unknown residue, what `helm.vocab.translate` writes for a codon
with a letter other than ACGT). Any other letter encodes as ``<unk>``. Encoding is one lookup in
a 256-entry byte table, like the k-mer tokenizers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from helm.tokenizers.base import Tokenizer, as_bytes, byte_table, check_ids, read_meta
from helm.vocab import AMINO_ACIDS, NUM_SPECIAL, SPECIAL_TOKENS, STOP, UNK_ID

RESIDUES = AMINO_ACIDS + STOP + "X"
_NUCLEOTIDE_LETTERS = frozenset("ACGTUN")


def looks_like_nucleotides(seq: str) -> bool:
    """True when every letter of `seq` is one of ``ACGTUN`` (either case).

    The data pipeline asks this to decide whether an ``--data-type aa`` record is DNA/RNA to be
    translated. A protein written only with A, C, G, T (and N) reads as nucleotides: such
    peptides are rare, but callers that know better should not rely on this guess.
    """
    return set(seq.upper()) <= _NUCLEOTIDE_LETTERS


class ProteinTokenizer(Tokenizer):
    """Amino-acid letters to ids: specials 0-4, ``ACDEFGHIKLMNPQRSTVWY`` 5-24, ``*`` 25, ``X`` 26."""

    def __init__(self) -> None:
        self.name = "aa"
        self.data_type = "aa"
        self.is_codon = False
        self._set_tokens(list(SPECIAL_TOKENS) + list(RESIDUES))
        self._table = byte_table(
            {r: NUM_SPECIAL + i for i, r in enumerate(RESIDUES)}, UNK_ID, dtype=np.int64
        )
        self._letters = np.frombuffer(RESIDUES.encode("ascii"), dtype=np.uint8)

    def encode(self, seq: str) -> np.ndarray:
        """Residue ids (int64) of one protein sequence (upper-case one-letter codes)."""
        return self._table[as_bytes(seq)]

    def encode_batch(self, seqs: Sequence[str]) -> list[np.ndarray]:
        """`encode` of every sequence, as one table lookup over the concatenated batch."""
        if not seqs:
            return []
        ids = self.encode("".join(seqs))
        return np.split(ids, np.cumsum([len(s) for s in seqs])[:-1])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Amino-acid letters of `ids`, specials skipped."""
        arr = check_ids(ids, self.vocab_size)
        return self._letters[arr[arr >= NUM_SPECIAL] - NUM_SPECIAL].tobytes().decode("ascii")

    def config(self) -> dict[str, Any]:
        """Name, vocab_size and data_type (the residue alphabet is fixed)."""
        return {
            "name": self.name,
            "k": 1,
            "overlap": 0,
            "vocab_size": self.vocab_size,
            "data_type": self.data_type,
        }

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ProteinTokenizer:
        """Rebuild from the ``tokenizer.json`` in `directory`."""
        read_meta(directory)  # only checks that a tokenizer was saved there
        return cls()
