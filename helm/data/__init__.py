"""Data: reading and validating sequence files, splits, the token cache and the demo corpus."""

from helm.data.cache import TokenStore, build_token_cache, default_cache_dir
from helm.data.demo import demo_sequences, write_demo_corpus
from helm.data.io import (
    DataError,
    ReadReport,
    Split,
    count_records,
    iter_sequences,
    read_sequences,
    resolve_splits,
)

__all__ = [
    "DataError",
    "ReadReport",
    "Split",
    "TokenStore",
    "build_token_cache",
    "count_records",
    "default_cache_dir",
    "demo_sequences",
    "iter_sequences",
    "read_sequences",
    "resolve_splits",
    "write_demo_corpus",
]
