"""The tokenizer interface shared by every HELM tokenizer, and saving/loading by class name.

Every tokenizer puts the five specials of `helm.vocab` at ids 0-4 and encodes a cleaned sequence
to an int64 array of ids *without* the ``<cls> ... <eos>`` frame (the dataset adds it). A saved
tokenizer is a folder holding ``tokenizer.json`` (the class name and `Tokenizer.config`) plus
whatever model files the class needs; `load_tokenizer` reads that file and rebuilds the class.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from helm.fileio import write_bytes, write_text
from helm.vocab import NUM_SPECIAL, SPECIAL_TOKENS, UNK_ID

META_FILE = "tokenizer.json"

# Class name -> class, filled by `Tokenizer.__init_subclass__` so that a saved folder can name its
# class and `load_tokenizer` needs no hand-kept table.
_REGISTRY: dict[str, type[Tokenizer]] = {}


class Tokenizer(ABC):
    """A sequence <-> token-id mapping with the five specials at ids 0-4.

    Subclasses set ``name``, ``data_type`` and the token list (``self._tokens``, specials first)
    and implement `encode`, `decode`, `config`, `load`; the rest is shared.
    """

    name: str
    data_type: str = "nuc"
    is_codon: bool = False
    _tokens: list[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def _set_tokens(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tuple(tokens[:NUM_SPECIAL]) != SPECIAL_TOKENS:
            raise ValueError(f"tokens must start with {SPECIAL_TOKENS}, got {tokens[:NUM_SPECIAL]}")
        self._tokens = tokens
        self._index = {t: i for i, t in enumerate(tokens)}

    # Vocabulary ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of real tokens, the five specials included (before any embedding padding)."""
        return len(self._tokens)

    @property
    def tokens(self) -> list[str]:
        """All tokens in id order (a copy)."""
        return list(self._tokens)

    def id_to_token(self, i: int) -> str:
        """The token of id `i`; IndexError outside ``[0, vocab_size)``."""
        if not 0 <= int(i) < len(self._tokens):
            raise IndexError(f"token id {i} outside [0, {len(self._tokens)})")
        return self._tokens[int(i)]

    def token_to_id(self, token: str) -> int:
        """The id of `token`; ``<unk>``'s id for a string that is not in the vocabulary."""
        return self._index.get(token, UNK_ID)

    # Encoding -----------------------------------------------------------------------------------

    @abstractmethod
    def encode(self, seq: str) -> np.ndarray:
        """Token ids (int64) of one cleaned sequence, without ``<cls>``/``<eos>``."""

    def encode_batch(self, seqs: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each sequence; subclasses override with a batched implementation."""
        return [self.encode(s) for s in seqs]

    @abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The letters of `ids`, special tokens skipped."""

    def trailing_bases(self, length: int) -> int:
        """Letters at the end of a sequence of `length` that `encode` drops (0 unless k-mer)."""
        return 0

    # Persistence --------------------------------------------------------------------------------

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description: everything needed to rebuild this tokenizer."""

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (class and config) and the model files into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for filename, content in self._model_files().items():
            write_bytes(directory / filename, content, what="tokenizer file")
        meta = {"class": type(self).__name__, "config": self.config()}
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        write_text(directory / META_FILE, text, what="tokenizer file")  # last: a complete save
        return directory

    def _model_files(self) -> dict[str, bytes]:
        """File name -> content of the model files saved beside ``tokenizer.json``."""
        return {}

    @classmethod
    @abstractmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Rebuild a tokenizer saved by `save` into `directory`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``tokenizer.json`` of a saved tokenizer folder: ``{"class": ..., "config": {...}}``."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved tokenizer here (expected {META_FILE})")
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or "class" not in meta or "config" not in meta:
        raise ValueError(f"{path}: not a HELM tokenizer file (needs 'class' and 'config')")
    return meta


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Rebuild whichever tokenizer `Tokenizer.save` wrote into `directory`."""
    meta = read_meta(directory)
    cls = _REGISTRY.get(meta["class"])
    if cls is None:
        raise ValueError(
            f"{Path(directory) / META_FILE}: unknown tokenizer class {meta['class']!r} "
            f"(known: {', '.join(sorted(_REGISTRY))})"
        )
    return cls.load(directory)


def byte_table(mapping: dict[str, int], default: int, dtype: type = np.int64) -> np.ndarray:
    """A 256-entry lookup table from ASCII byte to code, `default` for every other byte."""
    table = np.full(256, default, dtype=dtype)
    for ch, code in mapping.items():
        table[ord(ch)] = code
    return table


def as_bytes(seq: str) -> np.ndarray:
    """`seq` as a uint8 array, one byte per character.

    A non-ASCII character becomes ``?`` (which no table maps), so positions stay one per letter
    and the letter reads as unknown instead of raising.
    """
    return np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)


def check_ids(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """`ids` as an int64 array, refusing any id outside the vocabulary."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
        raise ValueError(f"token id {int(bad)} outside [0, {vocab_size})")
    return arr
