"""Subword tokenizers learned from the training split: ``bpe`` and ``ug`` (unigram) trained with
sentencepiece, ``wp`` (WordPiece) with HF ``tokenizers``.

All three keep the five specials at ids 0-4 and put their learned pieces after them. Sequences
have no spaces, so whitespace splitting, dummy prefixes and normalisation are all off and
``decode(encode(s)) == s`` for any sequence over the training alphabet. Training choices:

- At most ``max_train_sequences`` sequences are used, drawn by seeded reservoir sampling
  (`sample_sequences`), so training time is bounded and the same input and seed give the same model.
- sentencepiece: sequences longer than ``SP_MAX_SENTENCE`` letters are cut into pieces of that
  length for training only (``max_sentence_length`` is raised to match, so no CDS is dropped);
  encoding always sees the whole sequence. Runs of unseen letters encode as a single ``<unk>``.
- WordPiece matches greedily longest-first within a word, which is quadratic in the word length
  and turns a whole word into ``<unk>`` if any letter is unseen. Sequences are therefore cut into
  words of at most ``WP_WORD`` letters of the alphabet, and every other character stands alone
  as its own word (so it costs one ``<unk>``, not the whole sequence), both in training and
  encoding; a letter never learned inside a word stands alone too. The learned vocabulary is reordered canonically after training (specials, then by
  continuation flag, length and letters) because the trainer's id order depends on hash-map
  iteration order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tokenizers import Regex, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from helm.tokenizers.base import Tokenizer, check_ids, read_meta
from helm.vocab import AMINO_ACIDS, NUCLEOTIDES, NUM_SPECIAL, SPECIAL_TOKENS, STOP

SUBWORD_NAMES = ("bpe", "ug", "wp")
DEFAULT_MAX_TRAIN_SEQUENCES = 50_000
SP_MAX_SENTENCE = 1 << 16  # letters per sentencepiece training sentence
SP_TRAIN_THREADS = 8
WP_WORD = 64  # letters per WordPiece word
_WP_PREFIX = "##"
# Letters every tokenizer of a data type must be able to hold beside the specials.
ALPHABETS = {"nuc": NUCLEOTIDES, "aa": AMINO_ACIDS + STOP + "X"}


def sample_sequences(sequences: Iterable[str], max_sequences: int, seed: int) -> list[str]:
    """Up to `max_sequences` non-empty sequences, a uniform sample (reservoir) in input order.

    Deterministic for a given input and seed; memory stays at `max_sequences` sequences however
    long the input.
    """
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, str]] = []
    for i, seq in enumerate(s for s in sequences if s):
        if len(kept) < max_sequences:
            kept.append((i, seq))
        else:
            j = int(rng.integers(0, i + 1))
            if j < max_sequences:
                kept[j] = (i, seq)
    return [seq for _, seq in sorted(kept)]


def _check_training(name: str, vocab_size: int | None, data_type: str) -> None:
    if vocab_size is None:
        raise ValueError(f"--tokenizer {name} learns its vocabulary: give --vocab_size")
    minimum = NUM_SPECIAL + len(ALPHABETS[data_type])
    if vocab_size < minimum:
        raise ValueError(
            f"--vocab_size {vocab_size} is too small for --tokenizer {name}: it must hold the "
            f"{NUM_SPECIAL} specials and the {len(ALPHABETS[data_type])} letters of "
            f"--data-type {data_type} (>= {minimum})"
        )


class SubwordTokenizer(Tokenizer):
    """What the sentencepiece and WordPiece tokenizers share: hash, config, decode, save."""

    MODEL_FILE: str

    def _init_common(self, name: str, data_type: str, model: bytes, meta: dict[str, Any]) -> None:
        self.name, self.data_type = name, data_type
        self._model = model
        self._meta = dict(meta)  # training provenance: requested size, seed, sample size
        self.model_sha256 = hashlib.sha256(model).hexdigest()
        if tuple(self._tokens[:NUM_SPECIAL]) != SPECIAL_TOKENS:
            raise RuntimeError(f"{name}: specials landed at {self._tokens[:NUM_SPECIAL]}")
        # Letters each id decodes to: specials and <unk> to nothing, pieces to their text.
        self._surface = [""] * NUM_SPECIAL + [
            t.removeprefix(_WP_PREFIX) for t in self._tokens[NUM_SPECIAL:]
        ]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The letters of `ids`, special tokens (``<unk>`` included) skipped."""
        surface = self._surface
        return "".join(surface[i] for i in check_ids(ids, self.vocab_size).tolist())

    def config(self) -> dict[str, Any]:
        """Name, vocab_size, data_type and the model file's sha256 (changes with the model)."""
        return {
            "name": self.name,
            "overlap": 0,
            "vocab_size": self.vocab_size,
            "data_type": self.data_type,
            "model_file": self.MODEL_FILE,
            "model_sha256": self.model_sha256,
            **self._meta,
        }

    def _model_files(self) -> dict[str, bytes]:
        return {self.MODEL_FILE: self._model}

    @classmethod
    def _read_saved(cls, directory: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
        cfg = read_meta(directory)["config"]
        path = Path(directory) / cfg["model_file"]
        model = path.read_bytes()
        if hashlib.sha256(model).hexdigest() != cfg["model_sha256"]:
            raise ValueError(f"{path}: content does not match the sha256 in tokenizer.json")
        return cfg, model


def _provenance(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = ("requested_vocab_size", "seed", "train_sequences")
    return {k: cfg[k] for k in keys if k in cfg}


class SentencePieceTokenizer(SubwordTokenizer):
    """``bpe`` or ``ug`` (unigram) pieces from a trained sentencepiece model."""

    MODEL_FILE = "spm.model"

    def __init__(
        self, name: str, model: bytes, data_type: str = "nuc", meta: dict | None = None
    ) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        self._set_tokens([self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())])
        self._init_common(name, data_type, model, meta or {})

    @classmethod
    def train(
        cls,
        name: str,
        sequences: Iterable[str],
        vocab_size: int | None,
        *,
        data_type: str = "nuc",
        seed: int = 0,
        max_train_sequences: int = DEFAULT_MAX_TRAIN_SEQUENCES,
    ) -> SentencePieceTokenizer:
        """Learn a ``bpe`` or ``ug`` model of `vocab_size` pieces (specials included)."""
        _check_training(name, vocab_size, data_type)
        sample = sample_sequences(sequences, max_train_sequences, seed)
        if not sample:
            raise ValueError(f"--tokenizer {name}: no training sequences to learn from")
        sentences = [
            s[i : i + SP_MAX_SENTENCE] for s in sample for i in range(0, len(s), SP_MAX_SENTENCE)
        ]
        spm.set_random_generator_seed(seed)
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=buf,
                model_type={"bpe": "bpe", "ug": "unigram"}[name],
                vocab_size=vocab_size,
                # Specials at 0-4: pad/bos/eos/unk are sentencepiece's meta pieces (bos plays
                # <cls>); <mask> is a control symbol, placed right after them and never matched
                # in text.
                pad_id=0,
                bos_id=1,
                eos_id=2,
                unk_id=3,
                pad_piece=SPECIAL_TOKENS[0],
                bos_piece=SPECIAL_TOKENS[1],
                eos_piece=SPECIAL_TOKENS[2],
                unk_piece=SPECIAL_TOKENS[3],
                control_symbols=[SPECIAL_TOKENS[4]],
                # Sequences are one unbroken word: no whitespace logic, no normalisation.
                split_by_whitespace=False,
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                normalization_rule_name="identity",
                character_coverage=1.0,
                max_sentence_length=SP_MAX_SENTENCE + 1,
                input_sentence_size=0,  # sampling is done above, reproducibly
                hard_vocab_limit=False,  # a small corpus may not support every requested piece
                # Unigram EM sums over per-thread shards: a fixed count (not the machine's)
                # keeps the learned model the same everywhere.
                num_threads=SP_TRAIN_THREADS,
                minloglevel=2,
            )
        except RuntimeError as err:
            raise ValueError(f"--tokenizer {name} --vocab_size {vocab_size}: {err}") from err
        meta = {"requested_vocab_size": vocab_size, "seed": seed, "train_sequences": len(sample)}
        return cls(name, buf.getvalue(), data_type, meta)

    def encode(self, seq: str) -> np.ndarray:
        """Piece ids (int64) of one sequence."""
        return np.asarray(self._sp.encode(seq), dtype=np.int64)

    def encode_batch(self, seqs: Sequence[str]) -> list[np.ndarray]:
        """`encode` of every sequence; sentencepiece spreads the batch over its threads."""
        return [np.asarray(ids, dtype=np.int64) for ids in self._sp.encode(list(seqs))]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SentencePieceTokenizer:
        """Rebuild from ``tokenizer.json`` and ``spm.model`` in `directory`."""
        cfg, model = cls._read_saved(directory)
        return cls(cfg["name"], model, cfg["data_type"], _provenance(cfg))


def _wp_pre_tokenizer(letters: str) -> pre_tokenizers.PreTokenizer:
    """Words: runs of at most `WP_WORD` of `letters`; any other character is a word of its own."""
    if not letters:
        return pre_tokenizers.Split(Regex("."), behavior="isolated")
    cls = re.escape(letters)
    return pre_tokenizers.Split(Regex(f"[{cls}]{{1,{WP_WORD}}}|[^{cls}]"), behavior="isolated")


def _canonical_order(token: str) -> tuple[bool, int, str]:
    core = token.removeprefix(_WP_PREFIX)
    return (token.startswith(_WP_PREFIX), len(core), core)


class WordPieceTokenizer(SubwordTokenizer):
    """``wp``: WordPiece over words of at most `WP_WORD` letters, via HF ``tokenizers``."""

    MODEL_FILE = "wordpiece.json"

    def __init__(self, model: bytes, data_type: str = "nuc", meta: dict | None = None) -> None:
        self._hf = HFTokenizer.from_str(model.decode("utf-8"))
        vocab = self._hf.get_vocab(with_added_tokens=False)
        tokens = sorted(vocab, key=vocab.__getitem__)
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError("WordPiece vocabulary ids are not contiguous from 0")
        self._set_tokens(tokens)
        self._init_common("wp", data_type, model, meta or {})

    @classmethod
    def train(
        cls,
        sequences: Iterable[str],
        vocab_size: int | None,
        *,
        data_type: str = "nuc",
        seed: int = 0,
        max_train_sequences: int = DEFAULT_MAX_TRAIN_SEQUENCES,
    ) -> WordPieceTokenizer:
        """Learn a WordPiece vocabulary of `vocab_size` tokens (specials included).

        The trainer always keeps each seen letter both as a word start and as a ``##``
        continuation, so the result can exceed a very small `vocab_size`.
        """
        _check_training("wp", vocab_size, data_type)
        sample = sample_sequences(sequences, max_train_sequences, seed)
        if not sample:
            raise ValueError("--tokenizer wp: no training sequences to learn from")
        trained = HFTokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS[3]))
        trained.pre_tokenizer = _wp_pre_tokenizer(ALPHABETS[data_type])
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),  # first, in order: ids 0-4
            continuing_subword_prefix=_WP_PREFIX,
            show_progress=False,
        )
        trained.train_from_iterator(sample, trainer=trainer)
        learned = trained.get_vocab(with_added_tokens=False)
        rest = sorted((t for t in learned if t not in SPECIAL_TOKENS), key=_canonical_order)
        vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + rest)}
        tok = HFTokenizer(
            models.WordPiece(
                vocab=vocab,
                unk_token=SPECIAL_TOKENS[3],
                continuing_subword_prefix=_WP_PREFIX,
                max_input_chars_per_word=WP_WORD,
            )
        )
        # Encoding groups only letters learned both as word start and as continuation, so a
        # word never holds a letter it cannot match; others (unseen '*', 'N') stand alone.
        letters = "".join(c for c in ALPHABETS[data_type] if c in vocab and _WP_PREFIX + c in vocab)
        tok.pre_tokenizer = _wp_pre_tokenizer(letters)
        # Round-trip through JSON with sorted keys so the bytes (and their hash) are canonical.
        model = json.dumps(json.loads(tok.to_str()), sort_keys=True).encode("utf-8")
        meta = {"requested_vocab_size": vocab_size, "seed": seed, "train_sequences": len(sample)}
        return cls(model, data_type, meta)

    def encode(self, seq: str) -> np.ndarray:
        """Token ids (int64) of one sequence."""
        return np.asarray(self._hf.encode(seq, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, seqs: Sequence[str]) -> list[np.ndarray]:
        """`encode` of every sequence; HF tokenizers spreads the batch over its threads."""
        encodings = self._hf.encode_batch(list(seqs), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> WordPieceTokenizer:
        """Rebuild from ``tokenizer.json`` and ``wordpiece.json`` in `directory`."""
        cfg, model = cls._read_saved(directory)
        return cls(model, cfg["data_type"], _provenance(cfg))
