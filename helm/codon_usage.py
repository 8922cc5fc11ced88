"""Codon usage tables and the codon adaptation index (CAI).

The human table is the Kazusa Codon Usage Database entry for *Homo sapiens* [gbpri], tabulated from
GenBank (93,487 CDS, 40,662,582 codons): https://www.kazusa.or.jp/codon/cgi-bin/showcodon.cgi?species=9606
(Nakamura, Gojobori & Ikemura 2000, Nucleic Acids Res. 28:292). Values are frequencies per thousand
codons, listed in the generated ``kmers(3)`` order (AAA, AAC, AAG, AAT, ACA, ...), i.e. the order of
the ``3mer`` vocabulary, so no codon strings are spelled out by hand.

CAI follows Sharp & Li (1987, Nucleic Acids Res. 15:1281): w_c = f_c / max f over c's synonymous
codons, and CAI = geometric mean of w over the codons of a sequence, leaving out the single-codon
amino acids (ATG Met, TGG Trp) and the stop codons, which carry no choice.
"""

from __future__ import annotations

import math
from functools import cache

from helm.vocab import STOP, genetic_code, kmers, synonymous_codons

# fmt: off
_HUMAN_PER_THOUSAND = (
    24.4, 19.1, 31.9, 17.0, 15.1, 18.9, 6.1, 13.1, 12.2, 19.5, 12.0, 12.1, 7.5, 20.8, 22.0, 16.0,
    12.3, 15.1, 34.2, 10.9, 16.9, 19.8, 6.9, 17.5, 6.2, 10.4, 11.4, 4.5, 7.2, 19.6, 39.6, 13.2,
    29.0, 25.1, 39.6, 21.8, 15.8, 27.7, 7.4, 18.4, 16.5, 22.2, 16.5, 10.8, 7.1, 14.5, 28.1, 11.0,
    1.0, 15.3, 0.8, 12.2, 12.2, 17.7, 4.4, 15.2, 1.6, 12.6, 13.2, 10.6, 7.7, 20.3, 12.9, 17.6,
)
# fmt: on

_TABLES = {"human": _HUMAN_PER_THOUSAND}
SPECIES: tuple[str, ...] = tuple(_TABLES)

# Codons that never enter CAI: the two single-codon amino acids have w = 1 by construction.
_CAI_EXCLUDED_AMINO_ACIDS = frozenset({"M", "W", STOP})


def codon_frequencies(species: str = "human") -> dict[str, float]:
    """Codon (DNA letters) -> usage frequency per thousand codons, for all 64 codons."""
    if species not in _TABLES:
        raise ValueError(
            f"no codon usage table for species {species!r}; known: {', '.join(SPECIES)}"
        )
    return dict(zip(kmers(3), _TABLES[species]))


# Cached because cai() looks codons up one by one; the public functions hand out copies.
@cache
def _adaptiveness(species: str) -> dict[str, float]:
    freq = codon_frequencies(species)
    w = {}
    for codons in synonymous_codons().values():
        best = max(freq[c] for c in codons)
        for c in codons:
            w[c] = freq[c] / best
    return w


def relative_adaptiveness(species: str = "human") -> dict[str, float]:
    """Codon -> w_c = f_c / max f over its synonymous codons (stops form one group of three).

    The most-used codon of each amino acid has w = 1; ATG and TGG are always 1.
    """
    return dict(_adaptiveness(species))


def cai(seq: str, species: str = "human") -> float:
    """Codon adaptation index of a coding sequence read in frame 0.

    Lower case and RNA letters are accepted; a trailing partial codon and codons holding letters
    other than ACGT are ignored. Returns ``nan`` when no codon qualifies (e.g. an empty sequence or
    one made only of ATG, TGG and stops), since the geometric mean of nothing is undefined.
    """
    w = _adaptiveness(species)
    code = genetic_code()
    seq = seq.upper().replace("U", "T")
    log_sum, count = 0.0, 0
    for i in range(0, len(seq) - 2, 3):
        codon = seq[i : i + 3]
        wc = w.get(codon)
        if wc is None or code[codon] in _CAI_EXCLUDED_AMINO_ACIDS:
            continue
        log_sum += math.log(wc)
        count += 1
    return math.exp(log_sum / count) if count else math.nan
