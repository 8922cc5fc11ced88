"""HELM tokenizers: k-mers (``nuc``, ``3mer``, ``6mer``), subwords (``bpe``, ``ug``, ``wp``) and
amino-acid residues (``--data-type aa``), behind one interface (`Tokenizer`) and one factory.

    tok = build_tokenizer("3mer")                       # codons: AAA=5 ... TTT=68, vocab 69
    tok = build_tokenizer("bpe", vocab_size=512, train_sequences=train_seqs, seed=0)
    tok.save(out / "tokenizer"); tok = load_tokenizer(out / "tokenizer")
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from helm.tokenizers.base import Tokenizer, load_tokenizer
from helm.tokenizers.kmer import KMER_NAMES, KmerTokenizer
from helm.tokenizers.protein import ProteinTokenizer, looks_like_nucleotides
from helm.tokenizers.subword import (
    DEFAULT_MAX_TRAIN_SEQUENCES,
    SUBWORD_NAMES,
    SentencePieceTokenizer,
    WordPieceTokenizer,
)

TOKENIZERS = ("3mer", "nuc", "6mer", "bpe", "wp", "ug")
DATA_TYPES = ("nuc", "codon", "aa")
# Under --data-type aa these k-mer names select the residue tokenizer (see build_tokenizer).
_RESIDUE_NAMES = ("aa", "nuc", "3mer")

log = logging.getLogger("helm")

__all__ = [
    "DATA_TYPES",
    "TOKENIZERS",
    "KmerTokenizer",
    "ProteinTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "WordPieceTokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "looks_like_nucleotides",
]


def build_tokenizer(
    name: str,
    *,
    overlap: int = 0,
    vocab_size: int | None = None,
    data_type: str = "nuc",
    train_sequences: Iterable[str] | None = None,
    seed: int = 0,
    max_train_sequences: int = DEFAULT_MAX_TRAIN_SEQUENCES,
) -> Tokenizer:
    """The tokenizer for ``--tokenizer name`` on ``--data-type data_type``.

    Rules:

    - ``nuc`` data: ``nuc``/``3mer``/``6mer`` are k-mers with stride ``k - overlap``; their
      vocabulary size is derived (a different `vocab_size` is logged and ignored). ``bpe``,
      ``ug`` and ``wp`` are trained on `train_sequences` with `vocab_size` pieces, seeded by
      `seed`, on at most `max_train_sequences` sequences; they take no overlap.
    - ``codon`` data: an alias of ``nuc`` that reads codons, so it requires ``3mer`` with
      overlap 0; the result is the same tokenizer (and config) as ``3mer`` on ``nuc`` data.
    - ``aa`` data: the sequences are proteins. The residue tokenizer (one token per amino acid,
      vocab 27) is selected by the data type for ``aa``, ``nuc`` and ``3mer`` -- a codon
      translates to exactly one residue, so the default ``--tokenizer 3mer`` maps to it --
      with overlap 0. ``bpe``/``ug``/``wp`` learn pieces over amino-acid letters. ``6mer``
      has no protein meaning and is refused.

    Every refusal is a ValueError naming the flag and the valid choices.
    """
    if data_type not in DATA_TYPES:
        raise ValueError(f"--data-type {data_type!r} is not one of: {', '.join(DATA_TYPES)}")
    valid_names = TOKENIZERS + ("aa",) if data_type == "aa" else TOKENIZERS
    if name not in valid_names:
        raise ValueError(f"--tokenizer {name!r} is not one of: {', '.join(valid_names)}")
    if data_type == "codon" and (name != "3mer" or overlap != 0):
        raise ValueError(
            f"--data-type codon reads non-overlapping codons: it needs --tokenizer 3mer with "
            f"--overlap 0 (got --tokenizer {name} --overlap {overlap}); use --data-type nuc "
            f"for other tokenizers"
        )
    kind = "nuc" if data_type == "codon" else data_type

    if name in SUBWORD_NAMES:
        if overlap != 0:
            raise ValueError(
                f"--overlap {overlap} applies to k-mer tokenizers only "
                f"({', '.join(KMER_NAMES)}), not --tokenizer {name}: use --overlap 0"
            )
        if train_sequences is None:
            raise ValueError(f"--tokenizer {name} must be trained: pass the training sequences")
        if name == "wp":
            return WordPieceTokenizer.train(
                train_sequences,
                vocab_size,
                data_type=kind,
                seed=seed,
                max_train_sequences=max_train_sequences,
            )
        return SentencePieceTokenizer.train(
            name,
            train_sequences,
            vocab_size,
            data_type=kind,
            seed=seed,
            max_train_sequences=max_train_sequences,
        )

    if kind == "aa":
        if name not in _RESIDUE_NAMES:
            raise ValueError(
                f"--tokenizer {name} reads nucleotide k-mers and cannot apply to --data-type aa: "
                f"use one of {', '.join(_RESIDUE_NAMES)} (one token per residue) or "
                f"{', '.join(SUBWORD_NAMES)}"
            )
        if overlap != 0:
            raise ValueError(f"--overlap {overlap}: residue tokens do not overlap, use --overlap 0")
        tok: Tokenizer = ProteinTokenizer()
    else:
        tok = KmerTokenizer(KMER_NAMES[name], overlap)
    if vocab_size is not None and vocab_size != tok.vocab_size:
        log.warning(
            "--vocab_size %d ignored: --tokenizer %s has a fixed vocabulary of %d tokens",
            vocab_size,
            tok.name,
            tok.vocab_size,
        )
    return tok
