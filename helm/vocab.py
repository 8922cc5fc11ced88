"""Vocabulary facts shared by every part of HELM: special tokens, k-mer vocabularies, the genetic code.

Ids are fixed (DESIGN.md): ``<pad>``=0, ``<cls>``=1, ``<eos>``=2, ``<unk>``=3, ``<mask>``=4; k-mer
vocabularies then list all 4^k k-mers over ``ACGT`` in lexicographic order, so the codon vocabulary is
AAA=5 ... TTT=68 (size 69). Everything here is generated in code; there are no literal id tables.
"""

from __future__ import annotations

import itertools
from functools import cache

PAD_ID, CLS_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<cls>", "<eos>", "<unk>", "<mask>")
NUM_SPECIAL = len(SPECIAL_TOKENS)
NUCLEOTIDES = "ACGT"
IGNORE_INDEX = -100  # label of positions that are not targets (every loss and metric skips them)

# The standard genetic code (NCBI translation table 1). Codons enumerate in TCAG order, the classic
# textbook layout, so this one 64-letter string is the whole table; `genetic_code()` turns it into a dict.
_TCAG_AMINO_ACIDS = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"
STOP = "*"
START_CODON = "ATG"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # the 20 standard residues, one-letter codes


def kmers(k: int) -> list[str]:
    """All 4^k k-mers over ACGT in lexicographic order."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return ["".join(p) for p in itertools.product(NUCLEOTIDES, repeat=k)]


def kmer_vocab(k: int) -> list[str]:
    """The full token list of a k-mer tokenizer: the five specials, then the k-mers."""
    return list(SPECIAL_TOKENS) + kmers(k)


@cache
def genetic_code() -> dict[str, str]:
    """Codon (DNA letters) -> one-letter amino acid, ``*`` for stop codons."""
    codons = ("".join(p) for p in itertools.product("TCAG", repeat=3))
    return dict(zip(codons, _TCAG_AMINO_ACIDS))


def codon_id(codon: str) -> int:
    """Token id of a codon in the ``3mer`` vocabulary (AAA=5 ... TTT=68)."""
    idx = 0
    for ch in codon:
        idx = idx * 4 + NUCLEOTIDES.index(ch)
    return NUM_SPECIAL + idx


def translate(seq: str, *, to_stop: bool = False) -> str:
    """Translate a DNA coding sequence in frame 0; a codon with a non-ACGT letter becomes ``X``.

    A trailing incomplete codon is ignored. With ``to_stop`` translation ends before the first stop.
    """
    table = genetic_code()
    out = []
    for i in range(0, len(seq) - len(seq) % 3, 3):
        aa = table.get(seq[i : i + 3], "X")
        if to_stop and aa == STOP:
            break
        out.append(aa)
    return "".join(out)


def synonymous_codons() -> dict[str, list[str]]:
    """Amino acid (or ``*``) -> its codons, each list in lexicographic order."""
    groups: dict[str, list[str]] = {}
    for codon in kmers(3):
        groups.setdefault(genetic_code()[codon], []).append(codon)
    return groups
