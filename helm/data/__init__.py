"""Data: reading and validating sequence files, splits, the token cache and the demo corpus."""

from helm.data.cache import TokenStore, build_token_cache, cache_dir, default_cache_dir
from helm.data.demo import demo_sequences, write_demo_corpus
from helm.data.io import (
    DataError,
    ReadReport,
    Record,
    count_records,
    iter_records,
    iter_sequences,
    read_sequences,
)
from helm.data.splits import SPLIT_STEMS, Split, resolve_splits

__all__ = [
    "DataError",
    "ReadReport",
    "Record",
    "SPLIT_STEMS",
    "Split",
    "TokenStore",
    "build_token_cache",
    "cache_dir",
    "count_records",
    "default_cache_dir",
    "demo_sequences",
    "iter_records",
    "iter_sequences",
    "read_sequences",
    "resolve_splits",
    "write_demo_corpus",
]
