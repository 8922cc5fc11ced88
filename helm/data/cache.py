"""Token cache: a corpus tokenized once into a flat on-disk array, memory-mapped by every run and rank.

Layout of ``<cache_dir>/<key>/``: ``tokens.bin`` (all token ids back to back, uint8 when the vocabulary
fits in 256 ids, uint16 up to 65,536, int32 beyond), ``offsets.npy`` (int64, record i is
``tokens[offsets[i]:offsets[i + 1]]``) and ``meta.json`` (counts, the read report, the key inputs).
Both arrays are opened with ``np.memmap``, so opening a cache costs memory independent of its size.

The key hashes everything that changes the tokens: the source file (absolute path, size, mtime and a
hash of its first and last MiB), ``tokenizer.config()``, the reading options and the split's record
numbers. A build writes into a temporary directory renamed into place at the end, so a crashed or
interrupted build never leaves a cache that a later run would trust (a full disk is one
`WriteError` naming the cache); the next build removes what a killed one left
(`remove_stale_builds`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from helm.data.io import ReadReport, iter_sequences, no_records_error
from helm.data.splits import Split
from helm.errors import WriteError
from helm.fileio import blocking_file, out_of_room

try:  # POSIX; elsewhere concurrent builders rely on the atomic rename alone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger("helm")

CACHE_VERSION = 1
_FINGERPRINT_BYTES = 1 << 20
_META, _TOKENS, _OFFSETS, _LENGTHS = "meta.json", "tokens.bin", "offsets.npy", "lengths.bin"
# A build's temporary folder is ".<key>.tmp-<host>-<random>": the host tells whose lock covers it.
# This machine, in the names of temporary build folders (a shared filesystem has several).
HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TMP_DIR = re.compile(r"\.([0-9a-f]{20})\.tmp-(.*)")
_FOREIGN_STALE_S = 24 * 3600


# Which caches live in a sub-folder of $HELM_CACHE_DIR (the token cache and downstream task files
# use the folder itself, as they always have, so existing caches stay where they are).
_CACHE_KINDS = {"tokens": False, "features": True, "downstream": False}


def cache_dir(kind: str) -> Path:
    """The folder of one kind of cache: ``tokens`` (token caches), ``features`` (backbone
    features) or ``downstream`` (task files).

    Without ``$HELM_CACHE_DIR`` it is ``~/.cache/helm/<kind>``. With it: ``$HELM_CACHE_DIR/features``
    for features, the folder itself for tokens and downstream files.
    """
    if kind not in _CACHE_KINDS:
        raise ValueError(f"cache kind must be one of {sorted(_CACHE_KINDS)}, got {kind!r}")
    root = os.environ.get("HELM_CACHE_DIR")
    if not root:
        return Path.home() / ".cache" / "helm" / kind
    return Path(root) / kind if _CACHE_KINDS[kind] else Path(root)


def default_cache_dir() -> Path:
    """The token caches' folder: ``cache_dir("tokens")``."""
    return cache_dir("tokens")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every id of a vocabulary."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of a file's contents for the cache key: path, size, mtime and a head/tail hash.

    A full content hash would read a multi-GB corpus on every run just to find the cache. Size and
    mtime catch ordinary edits; hashing the first and last MiB also catches a file replaced by
    another of the same size with a preserved timestamp (``cp -p``, ``rsync -t``), and appends or
    truncations, for the cost of two 1 MiB reads. An in-place edit of the middle of a file that
    keeps its size and mtime goes unnoticed; clear the cache directory after such surgery.
    """
    path = Path(path).resolve()
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if st.st_size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, st.st_size - _FINGERPRINT_BYTES))
            h.update(f.read())
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "head_tail_sha256": h.hexdigest(),
    }


def cache_key(
    split: Split, tokenizer_config: dict[str, Any], options: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(key, the inputs it hashes) for one split read with `options` and tokenized by a tokenizer."""
    indices = None
    if split.indices is not None:
        indices = hashlib.sha256(np.asarray(split.indices, dtype=np.int64).tobytes()).hexdigest()
    inputs = {
        "version": CACHE_VERSION,
        "source": file_fingerprint(split.path),
        "indices_sha256": indices,
        "tokenizer": tokenizer_config,
        "options": options,
    }
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20], inputs


class TokenStore:
    """A read-only token cache: ``store[i]`` is the id array of record i (a view of the memmap)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        with open(self.directory / _META) as f:
            self.meta: dict[str, Any] = json.load(f)
        self.vocab_size: int = self.meta["vocab_size"]
        self.num_tokens: int = self.meta["num_tokens"]
        dtype = np.dtype(self.meta["dtype"])
        self.offsets: np.ndarray = np.load(self.directory / _OFFSETS, mmap_mode="r")
        # np.memmap refuses an empty file; an empty corpus gets an empty in-memory array.
        self.tokens: np.ndarray = (
            np.memmap(self.directory / _TOKENS, dtype=dtype, mode="r", shape=(self.num_tokens,))
            if self.num_tokens
            else np.empty(0, dtype=dtype)
        )
        self.lengths: np.ndarray = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for a store of {n}")
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __reduce__(self):
        # Pickling a memmap copies its data; DataLoader workers reopen the files instead.
        return (TokenStore, (str(self.directory),))

    def __repr__(self) -> str:
        return f"TokenStore({str(self.directory)!r}, records={len(self):,}, tokens={self.num_tokens:,})"


def _is_complete(directory: Path) -> bool:
    # meta.json is written last inside the temporary directory, and the directory appears by rename.
    return (directory / _META).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` so concurrent processes build a cache once."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Take `path`'s lock if it is free (True), without waiting."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _last_touched(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    times += [p.stat().st_mtime for p in folder.iterdir() if p.is_file()]
    return max(times)


def remove_stale_builds(cache_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that killed builds left in `cache_dir`; returns them.

    A build holds its key's lock from making its folder until the rename, so a folder of this host
    whose key's lock is free belongs to no live build. A folder made on another host (a shared
    filesystem, which a lock may not span) is removed only once untouched for a day.
    """
    if fcntl is None:  # pragma: no cover
        return []
    removed = []
    for tmp in Path(cache_dir).glob(".*.tmp-*"):
        match = _TMP_DIR.fullmatch(tmp.name)
        if match is None or not tmp.is_dir():
            continue
        key, rest = match.groups()
        try:
            if (
                not rest.startswith(f"{HOST}-")
                and time.time() - _last_touched(tmp) < _FOREIGN_STALE_S
            ):
                continue
        except OSError:  # removed meanwhile
            continue
        with _try_lock(tmp.parent / f"{key}.lock") as free:
            if free:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
    if removed:
        logger.info("removed %d unfinished token cache build(s) in %s", len(removed), cache_dir)
    return removed


def _chunks(seqs: Iterator[str], max_chars: int, max_records: int) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for seq in seqs:
        chunk.append(seq)
        chars += len(seq)
        if chars >= max_chars or len(chunk) >= max_records:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _write_cache(
    split: Split,
    tokenizer: Any,
    out: Path,
    *,
    read_options: dict[str, Any],
    meta: dict[str, Any],
    show_progress: bool,
    chunk_chars: int,
) -> dict[str, Any]:
    """Tokenize `split` into the (temporary) directory `out`; returns the finished meta."""
    report = ReadReport(split.path)
    seqs = iter_sequences(split.path, indices=split.indices, report=report, **read_options)
    dtype = token_dtype(tokenizer.vocab_size)
    num_records = num_tokens = num_bases = trailing = 0
    bar = tqdm(desc=f"tokenizing {split.name}", unit=" rec", disable=not show_progress)
    with open(out / _TOKENS, "wb") as ftok, open(out / _LENGTHS, "wb") as flen, bar:
        for chunk in _chunks(seqs, chunk_chars, max_records=1 << 16):
            ids = tokenizer.encode_batch(chunk)
            lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
            flat = np.concatenate(ids) if lengths.sum() else np.empty(0, dtype=np.int64)
            # A cast to a narrow dtype wraps silently; one max per chunk keeps ids honest.
            if flat.size and int(flat.max()) >= tokenizer.vocab_size:
                raise ValueError(f"tokenizer produced id {int(flat.max())} >= vocab_size")
            ftok.write(flat.astype(dtype, copy=False).tobytes())
            flen.write(lengths.tobytes())
            num_records += len(chunk)
            num_tokens += int(lengths.sum())
            num_bases += sum(len(s) for s in chunk)
            trailing += sum(tokenizer.trailing_bases(len(s)) for s in chunk)
            bar.update(len(chunk))

    _write_offsets(out / _LENGTHS, out / _OFFSETS, num_records)
    (out / _LENGTHS).unlink()
    meta.update(
        dtype=dtype.name,
        vocab_size=int(tokenizer.vocab_size),
        num_records=num_records,
        num_tokens=num_tokens,
        num_bases=num_bases,
        trailing_bases=trailing,
        report=report.to_dict(),
    )
    with open(out / _META, "w") as f:
        json.dump(meta, f, indent=1, default=str)
    return meta


def _write_offsets(lengths: Path, path: Path, num_records: int, chunk: int = 1 << 20) -> None:
    """offsets.npy (int64, ``num_records + 1``) from the record lengths, a chunk at a time. Written
    through the file, not a memory map: a full disk is then an OSError, not a SIGBUS."""
    dtype = np.dtype("<i8")
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": (num_records + 1,)}  # fmt: skip
    sizes = np.memmap(lengths, dtype=np.int64, mode="r") if num_records else np.empty(0)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.zeros(1, dtype).tobytes())
        total = 0
        for start in range(0, num_records, chunk):
            part = np.cumsum(sizes[start : start + chunk], dtype=dtype) + total
            f.write(part.tobytes())
            total = int(part[-1])


def _build(name: str, final: Path, write: Callable[[Path], dict[str, Any]]) -> None:
    """Build the cache of split ``name`` in a temporary sibling of `final` (``write(folder)``
    returns the cache's metadata), then rename it into place."""
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{HOST}-", dir=final.parent))
    try:
        meta = write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process (without the lock, e.g. another node) finished first: keep theirs.
            if not _is_complete(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as exc:  # a crash, Ctrl-C, a full disk: nothing half-built is kept
        shutil.rmtree(tmp, ignore_errors=True)
        cause = out_of_room(exc) if isinstance(exc, OSError) else None
        if cause is None:
            raise
        raise WriteError(
            f"cannot write the token cache {final}: {cause}; nothing was kept (free some space, "
            "or set --cache_dir or $HELM_CACHE_DIR to a disk with room)"
        ) from None
    report = meta["report"]
    skipped = report["num_records"] - report["num_valid"]
    logger.info(
        "token cache %s: %s records, %s tokens (%s), %s trailing bases dropped, %s invalid "
        "skipped; built in %.1fs -> %s",
        name,
        f"{meta['num_records']:,}",
        f"{meta['num_tokens']:,}",
        meta["dtype"],
        f"{meta['trailing_bases']:,}",
        f"{skipped:,}",
        time.perf_counter() - start,
        final,
    )


def build_token_cache(
    source: Split | str | os.PathLike,
    tokenizer: Any,
    cache_dir: str | os.PathLike | None = None,
    *,
    column_name: str | None = None,
    on_invalid: str = "error",
    num_samples: int | None = None,
    file_extension: str | None = None,
    data_type: str | None = None,
    show_progress: bool | None = None,
    chunk_chars: int = 1 << 22,
    require_records: bool = False,
) -> TokenStore:
    """Tokenize a split (or a whole file) once into `cache_dir` and open it as a `TokenStore`.

    A cache with the same key is reused. Under ``torch.distributed`` rank 0 builds while the other
    ranks wait at a barrier, then all open the same files (a rank that still finds no cache, e.g.
    on a node without a shared filesystem, builds its own copy). Without it, a file lock makes
    concurrent processes build once. Records stream through ``tokenizer.encode_batch`` in chunks of
    about `chunk_chars` letters, so memory stays bounded whatever the corpus size.

    Args:
        source: a `Split` from `resolve_splits`, or a file path (every record).
        tokenizer: an object with ``encode_batch``, ``vocab_size``, ``trailing_bases``,
            ``is_codon`` and ``config()`` (see `helm.tokenizers`). Codon tokenizers require
            lengths that are a multiple of 3.
        cache_dir: parent of the cache directories; default `default_cache_dir()`.
        column_name, on_invalid, num_samples, file_extension: as for `read_sequences`.
        data_type: ``"nuc"`` or ``"aa"``; default the tokenizer config's ``data_type``, else nuc.
        show_progress: tqdm bar; default on for rank 0 when stderr is a terminal.
        chunk_chars: letters per `encode_batch` call.
        require_records: a cache of zero records (an empty file, or every record invalid and
            skipped) raises `DataError` naming the file.
    """
    split = source if isinstance(source, Split) else Split("all", str(source))
    config = tokenizer.config()
    read_options = {
        "column_name": column_name,
        "on_invalid": on_invalid,
        "num_samples": num_samples,
        "file_extension": file_extension or split.file_extension,
        "require_codons": bool(tokenizer.is_codon),
        "data_type": data_type or config.get("data_type", "nuc"),
    }
    key, inputs = cache_key(split, config, read_options)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (block := blocking_file(cache_dir)) is not None:
        raise WriteError(f"token cache folder {cache_dir}: {block} is a file, not a folder")
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / key
    # A process group can only exist once torch.distributed has been imported; looking it up in
    # sys.modules keeps torch (hundreds of MB) out of processes that never use it.
    dist = sys.modules.get("torch.distributed")
    distributed = dist is not None and dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if show_progress is None:
        show_progress = rank == 0 and sys.stderr.isatty()
    meta = {
        "key": key,
        "split": split.name,
        **inputs,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write = partial(_write_cache, split, tokenizer, read_options=read_options, meta=meta,
                    show_progress=show_progress, chunk_chars=chunk_chars)  # fmt: skip
    build = lambda: _build(split.name, final, write)

    if rank == 0:
        remove_stale_builds(cache_dir)
        with _file_lock(cache_dir / f"{key}.lock"):
            if not _is_complete(final):
                build()
    if distributed:
        # Every rank reaches this barrier exactly once, whether or not the cache already existed.
        dist.barrier()
        if rank != 0 and not _is_complete(final):
            with _file_lock(cache_dir / f"{key}.lock"):
                if not _is_complete(final):
                    build()
    store = TokenStore(final)
    if require_records and len(store) == 0:
        raise no_records_error(ReadReport(**store.meta["report"]))
    return store
