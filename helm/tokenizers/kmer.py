"""k-mer tokenizers: ``nuc`` (k=1), ``3mer`` (codons) and ``6mer``, with optional overlap.

Ids follow `helm.vocab.kmer_vocab`: the five specials, then the 4^k k-mers over ACGT in
lexicographic order, so a k-mer's id is 5 + its base-4 value (A=0, C=1, G=2, T=3) and the codon
tokenizer has AAA=5 ... TTT=68. With ``overlap`` o the window moves by ``stride = k - o``. A
trailing window shorter than k is dropped; a window holding any letter other than ACGT is ``<unk>``.

Encoding never loops in Python over k-mers: the sequence's bytes go through a 256-entry table to
base-4 digits, and the k columns of the (n_kmers, k) window matrix -- strided views, no copies --
are folded with Horner's rule, ``v = (((d0 * 4) + d1) * 4 + d2) ...``, i.e. the dot product with
the powers of 4 done column by column (numpy has no fast integer matmul, so this is ~4x quicker).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from helm.tokenizers.base import Tokenizer, as_bytes, byte_table, check_ids, read_meta
from helm.vocab import NUCLEOTIDES, NUM_SPECIAL, UNK_ID, kmer_vocab

KMER_NAMES = {"nuc": 1, "3mer": 3, "6mer": 6}


def kmer_name(k: int) -> str:
    """The ``--tokenizer`` name of k-mers of length `k` (``nuc`` for single nucleotides)."""
    return "nuc" if k == 1 else f"{k}mer"


class KmerTokenizer(Tokenizer):
    """Fixed-length k-mers over ACGT with stride ``k - overlap``.

    Args:
        k: k-mer length, 1 to 8 (ids must fit uint16 for the token cache).
        overlap: letters shared by consecutive k-mers, ``0 <= overlap < k``.
    """

    def __init__(self, k: int, overlap: int = 0) -> None:
        if not 1 <= k <= 8:
            raise ValueError(f"k-mer length must be in [1, 8], got {k}")
        if not 0 <= overlap < k:
            raise ValueError(
                f"--overlap {overlap} is invalid for --tokenizer {kmer_name(k)}: "
                f"choose 0 <= overlap < {k} (stride = {k} - overlap)"
            )
        self.k, self.overlap, self.stride = k, overlap, k - overlap
        self.name = kmer_name(k)
        self.data_type = "nuc"
        self.is_codon = k == 3 and overlap == 0
        self._set_tokens(kmer_vocab(k))
        self._invalid = 4**k
        # Digit table: ACGT -> 0..3, any other byte -> 4^k. A window holding one such digit folds to
        # at least 4^k * 4^0 = 4^k, above every real k-mer value (at most 4^k - 1), so a single
        # comparison after folding finds every unknown window. uint8 keeps the gather cheap.
        digit_dtype = np.uint8 if self._invalid < 256 else np.uint16
        self._digits = byte_table(
            {c: i for i, c in enumerate(NUCLEOTIDES)}, self._invalid, dtype=digit_dtype
        )
        # An all-unknown window folds to 4^k * (4^k - 1) / 3: int32 holds that up to k = 7 (and
        # barely at 8, so k = 8 takes int64 to be safe).
        self._acc_dtype = np.int32 if k <= 7 else np.int64
        # Decoding table: row i holds the k ASCII letters of k-mer i.
        letters = np.frombuffer(NUCLEOTIDES.encode("ascii"), dtype=np.uint8)
        place = 4 ** np.arange(k - 1, -1, -1)
        self._letters = letters[(np.arange(4**k)[:, None] // place) % 4]  # (4^k, k)

    # Counting -----------------------------------------------------------------------------------

    def num_kmers(self, length: int) -> int:
        """How many k-mers `encode` returns for a sequence of `length` letters."""
        return 0 if length < self.k else (length - self.k) // self.stride + 1

    def trailing_bases(self, length: int) -> int:
        """Letters after the last complete k-mer, which `encode` drops."""
        n = self.num_kmers(length)
        return length - ((n - 1) * self.stride + self.k if n else 0)

    # Encoding -----------------------------------------------------------------------------------

    def _fold(self, columns: Sequence[np.ndarray]) -> np.ndarray:
        """Token ids from the k digit columns of a window matrix (Horner's rule, then offsets)."""
        value = columns[0].astype(self._acc_dtype)
        for col in columns[1:]:
            value <<= 2  # * 4
            value += col
        ids = value.astype(np.int64)
        ids += NUM_SPECIAL
        ids[value >= self._invalid] = UNK_ID
        return ids

    def encode(self, seq: str) -> np.ndarray:
        """k-mer ids of one DNA sequence (int64), trailing incomplete k-mer dropped."""
        n = self.num_kmers(len(seq))
        if n == 0:
            return np.empty(0, dtype=np.int64)
        digits = self._digits[as_bytes(seq)]
        # Column j of the window matrix: the j-th letter of every k-mer, a strided view.
        s = self.stride
        return self._fold([digits[j : j + (n - 1) * s + 1 : s] for j in range(self.k)])

    def encode_batch(self, seqs: Sequence[str]) -> list[np.ndarray]:
        """`encode` of every sequence, as one numpy pass over the whole batch."""
        if not seqs:
            return []
        counts = np.fromiter((self.num_kmers(len(s)) for s in seqs), np.int64, count=len(seqs))
        if self.stride == self.k:
            # Trim each sequence to whole k-mers; the concatenation is then itself a run of
            # whole, aligned k-mers and encodes in a single call.
            used = counts * self.k
            joined = "".join(s[:u] for s, u in zip(seqs, used.tolist()))
            ids = self.encode(joined)
        else:
            # Overlapping windows would straddle sequence boundaries in the concatenation, so
            # gather them by start position instead: start of k-mer i of sequence r is
            # offset[r] + stride * i.
            lengths = np.fromiter((len(s) for s in seqs), np.int64, count=len(seqs))
            offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
            first = np.concatenate(([0], np.cumsum(counts)[:-1]))
            total = int(counts.sum())
            rank = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
            starts = np.repeat(offsets, counts) + self.stride * rank
            digits = self._digits[as_bytes("".join(seqs))]
            ids = self._fold([digits[starts + j] for j in range(self.k)])
        return np.split(ids, np.cumsum(counts)[:-1])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """DNA letters of `ids`, specials skipped.

        With overlap each k-mer after the first adds only its last ``stride`` letters, so for a
        sequence without unknown letters ``decode(encode(s))`` is ``s`` minus the dropped tail.
        """
        arr = check_ids(ids, self.vocab_size)
        rows = self._letters[arr[arr >= NUM_SPECIAL] - NUM_SPECIAL]  # (n, k) ASCII letters
        if len(rows) == 0:
            return ""
        if self.stride == self.k:
            return rows.tobytes().decode("ascii")
        return (rows[0].tobytes() + rows[1:, self.overlap :].tobytes()).decode("ascii")

    # Persistence --------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Name, k, overlap, stride, vocab_size and data_type: all that defines the ids."""
        return {
            "name": self.name,
            "k": self.k,
            "overlap": self.overlap,
            "stride": self.stride,
            "vocab_size": self.vocab_size,
            "data_type": self.data_type,
        }

    @classmethod
    def load(cls, directory: str | os.PathLike) -> KmerTokenizer:
        """Rebuild from the ``tokenizer.json`` in `directory` (no model files needed)."""
        cfg = read_meta(directory)["config"]
        return cls(int(cfg["k"]), int(cfg["overlap"]))
