"""A training run's data: which records make train/val/test, the tokenizer, and the token caches.

``prepare_data`` is the trainer's one call from files on disk to ``TokenStore`` objects: it
resolves the splits (the built-in demo corpus when no data is named), builds the tokenizer (trained
on a sample of the training split for subwords, restored from a checkpoint on resume) and builds or
reuses each split's token cache. Rank 0 writes shared files; the other ranks wait and read them.
"""

from __future__ import annotations

import itertools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helm import distributed as hdist
from helm.data.cache import TokenStore, build_token_cache, default_cache_dir
from helm.data.demo import write_demo_corpus
from helm.data.io import iter_sequences
from helm.data.splits import Split, resolve_splits

log = logging.getLogger("helm")
DEMO_RECORDS = 3000  # size of the built-in synthetic corpus (before --num_samples)
SUBWORD_TOKENIZERS = ("bpe", "wp", "ug")


@dataclass
class Data:
    tokenizer: Any
    stores: dict[str, TokenStore]  # split name -> token cache
    splits: dict[str, Split]


def demo_corpus_path(cache_dir: Path) -> Path:
    return cache_dir / "demo" / f"demo-{DEMO_RECORDS}.txt"


def _under(path: str | None, data_dir: str | None) -> str | None:
    """Files are taken relative to --data_dir when they are not found as given (original usage)."""
    if path is None or data_dir is None or Path(path).is_absolute() or Path(path).exists():
        return path
    return str(Path(data_dir) / path)


def prepare_data(
    *,
    demo_corpus: bool,
    data_dir: str | None,
    train_file: str | None,
    val_file: str | None,
    test_file: str | None,
    file_extension: str | None,
    column_name: str | None,
    split: tuple[float, float, float],
    seed: int,
    on_invalid: str,
    num_samples: int | None,
    tokenizer: str,
    overlap: int,
    vocab_size: int | None,
    data_type: str,
    cache_dir: str | None,
    tokenizer_dir: Path,
    is_main: bool = True,
    tokenizer_state: dict | None = None,
) -> Data:
    """Splits, tokenizer (built, trained on the training split and saved to ``tokenizer_dir``, or
    restored from ``tokenizer_state``) and token caches (``num_samples`` limits the training split)."""
    from helm.checkpoint import tokenizer_from_state
    from helm.tokenizers import build_tokenizer, load_tokenizer

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    read_as = "nuc" if data_type == "codon" else data_type
    if demo_corpus:
        train_path = demo_corpus_path(cache)
        if is_main and not train_path.exists():
            write_demo_corpus(train_path, n=DEMO_RECORDS, seed=0)
        hdist.barrier()
        log.info(
            "no --data_dir/--train_file: training on the built-in SYNTHETIC demo corpus %s",
            train_path,
        )
        splits = resolve_splits(train_file=train_path, seed=seed, split=tuple(split))
    else:
        splits = resolve_splits(
            data_dir=data_dir,
            train_file=_under(train_file, data_dir),
            val_file=_under(val_file, data_dir),
            test_file=_under(test_file, data_dir),
            file_extension=file_extension,
            seed=seed,
            split=tuple(split),
        )

    tok_kw = dict(overlap=overlap, vocab_size=vocab_size, data_type=data_type)
    if tokenizer_state is not None:
        tok = tokenizer_from_state(tokenizer_state)
    elif tokenizer in SUBWORD_TOKENIZERS:
        if is_main:
            # The training split as a stream (its first num_samples records, like the token
            # cache); the tokenizer reservoir-samples what it trains on.
            train = splits["train"]
            stream = iter_sequences(
                train.path,
                indices=train.indices,
                column_name=column_name,
                on_invalid=on_invalid,
                file_extension=file_extension,
                data_type=read_as,
            )
            log.info("training the %s tokenizer on a sample of the training split", tokenizer)
            tok = build_tokenizer(
                tokenizer,
                train_sequences=itertools.islice(stream, num_samples),
                seed=seed,
                **tok_kw,
            )
            tok.save(tokenizer_dir)
        hdist.barrier()
        if not is_main:
            tok = load_tokenizer(tokenizer_dir)
    else:
        tok = build_tokenizer(tokenizer, **tok_kw)

    stores = {}
    for name, part in splits.items():
        stores[name] = build_token_cache(
            part,
            tok,
            cache,
            column_name=column_name,
            on_invalid=on_invalid,
            num_samples=num_samples if name == "train" else None,
            require_records=True,
            file_extension=file_extension,
            data_type=read_as,
            show_progress=is_main and sys.stderr.isatty(),
        )
        log.info(
            "%s: %s records, %s tokens",
            name,
            f"{len(stores[name]):,}",
            f"{stores[name].num_tokens:,}",
        )
    return Data(tok, stores, splits)
