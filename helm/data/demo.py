"""The built-in demo corpus: synthetic coding sequences for the quickstart and tests.

The sequences are synthetic, not real genes: each is ATG, a body of sense codons drawn independently
with the probabilities of the human codon usage table (`helm.codon_usage`), and a stop codon drawn by
the usage of the three stops. Drawing a sense codon by its usage is the same as drawing an amino acid
by the frequency the table implies (the sum over its codons) and then a synonymous codon by its share,
so the corpus has human amino-acid composition and human synonymous codon choice, and nothing more:
no motifs, domains or positional effects. Protein lengths are log-normal (median ~375 residues, as
for human proteins), clipped to 100-1000 codons.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np

from helm.codon_usage import codon_frequencies
from helm.fileio import atomic_write
from helm.vocab import START_CODON, STOP, genetic_code, kmers

MIN_CODONS, MAX_CODONS = 100, 1000  # ATG and the stop included
_MEDIAN_CODONS, _LOG_SIGMA = 375.0, 0.5


@cache
def _codon_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sense codons as S3 bytes, their probabilities, stop codons, their probabilities)."""
    freq = codon_frequencies("human")
    code = genetic_code()
    sense = [c for c in kmers(3) if code[c] != STOP]
    stops = [c for c in kmers(3) if code[c] == STOP]

    def probs(codons: list[str]) -> np.ndarray:
        p = np.array([freq[c] for c in codons], dtype=np.float64)
        return p / p.sum()

    as_bytes = lambda codons: np.array([c.encode() for c in codons], dtype="S3")
    return as_bytes(sense), probs(sense), as_bytes(stops), probs(stops)


def demo_sequences(n: int = 3000, seed: int = 0) -> list[str]:
    """`n` synthetic human-like coding sequences, the same for the same seed on every platform.

    Sequences are drawn one after another from one seeded numpy Generator (PCG64, whose streams
    numpy keeps stable across versions and platforms), so ``demo_sequences(10)`` is a prefix of
    ``demo_sequences(3000)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    sense, p_sense, stops, p_stop = _codon_tables()
    rng = np.random.default_rng(seed)
    start = START_CODON.encode()
    out = []
    for _ in range(n):
        num_codons = int(
            np.clip(rng.lognormal(np.log(_MEDIAN_CODONS), _LOG_SIGMA), MIN_CODONS, MAX_CODONS)
        )
        body = sense[rng.choice(len(sense), size=num_codons - 2, p=p_sense)]
        stop = stops[rng.choice(len(stops), p=p_stop)]
        out.append((start + body.tobytes() + stop.tobytes()).decode("ascii"))
    return out


def write_demo_corpus(path: str | os.PathLike, n: int = 3000, seed: int = 0) -> Path:
    """Write `demo_sequences(n, seed)` to a txt file (one sequence a line) and return its path.

    The file is written beside its destination and renamed into place, so a reader never sees half
    a corpus; a failed write (a full disk) raises `WriteError` and leaves no temporary file.
    """
    with atomic_write(path, "w", what="the demo corpus") as f:
        for seq in demo_sequences(n, seed):
            f.write(seq + "\n")
    return Path(path)
