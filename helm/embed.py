"""Features of a trained backbone: per-token hidden states and pooled per-sequence embeddings.

Shared by ``eval.py embed`` (one vector per sequence) and ``eval.py downstream`` (per-token states
for the probes). A sequence is framed as in training: ``<cls> tokens <eos>`` for a bidirectional
(MLM) model, ``<cls> tokens`` for a causal (CLM) one, whose inputs never held ``<eos>``. Features are
the last hidden states (after the final norm) at the sequence's own tokens; the frame is dropped.

Sequences longer than the model's window (``max_seq_len`` minus the frame) are either cut to their
head (``"truncate"``) or read as overlapping windows (``"window"``: stride half a window, the last
window flush with the end), each framed like a training crop; a token seen by several windows gets
the mean of its states. Batches hold windows of similar length (sorted), run without gradients and,
on CUDA, under autocast; outputs are float32 on the host.

`cached_token_features` stores the per-token features on disk, keyed by the checkpoint file,
the weights used (raw or EMA), the sequences and the long-sequence mode, so a downstream grid
extracts them once per (checkpoint, task).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from helm.data import cache as data_cache
from helm.data.io import DataError, iter_records
from helm.errors import WriteError
from helm.fileio import out_of_room

if TYPE_CHECKING:  # the command line reads LONG_SEQS and POOLS without importing torch
    import torch
    import torch.nn as nn

log = logging.getLogger("helm")

LONG_SEQS = ("truncate", "window")
POOLS = ("mean", "cls", "last")
FEATURE_CACHE_VERSION = 1


# Reading records with their ids -------------------------------------------------------------------


def read_records(
    path: str | os.PathLike,
    column_name: str | None = None,
    on_invalid: str = "error",
    *,
    file_extension: str | None = None,
    require_codons: bool = False,
    data_type: str = "nuc",
    id_column: str | None = None,
) -> tuple[list[str], list[str]]:
    """(ids, cleaned sequences) of a sequence file, read by `helm.data.io.iter_records`.

    Ids are the FASTA headers (the whole text after ``>``), a table's `id_column`, or the 1-based
    record number for txt and csv/tsv files. Invalid records raise `DataError` (``on_invalid="error"``, the first few
    named with file and line) or are dropped with a logged count (``"skip"``).
    """
    ids, seqs = [], []
    for record in iter_records(
        path,
        column_name=column_name,
        on_invalid=on_invalid,
        file_extension=file_extension,
        require_codons=require_codons,
        data_type=data_type,
        columns=None if id_column is None else [id_column],
    ):
        if id_column is not None and record.fields is not None:
            ids.append(record.fields[id_column].strip())
        else:
            ids.append(record.header if record.header is not None else record.id)
        seqs.append(record.sequence)
    if not seqs:
        raise DataError(f"{path}: no usable records")
    return ids, seqs


# Extraction --------------------------------------------------------------------------------------


def report_truncation(token_ids, model, long_seqs: str, what: str) -> int:
    """Say how many records exceed the model's window and what was done with them; their count."""
    capacity = window_capacity(model.cfg.max_seq_len, not model.cfg.bidirectional)
    lengths = [len(t) for t in token_ids]
    longer = sum(n > capacity for n in lengths)
    if longer and long_seqs == "truncate":
        log.warning(
            "%d of %d records are longer than the model's window of %d tokens (the longest has "
            "%d): only their first %d tokens were %s; --long-seqs window reads them whole",
            longer,
            len(lengths),
            capacity,
            max(lengths),
            capacity,
            what,
        )
    elif longer:
        log.info(
            "%d of %d records read as overlapping windows of %d tokens",
            longer,
            len(lengths),
            capacity,
        )
    return longer


def window_capacity(max_seq_len: int, causal: bool) -> int:
    """Sequence tokens that fit one model input beside the frame."""
    return max_seq_len - (1 if causal else 2)


def windows(n: int, capacity: int, long_seqs: str) -> list[tuple[int, int]]:
    """``(start, end)`` token ranges that cover a sequence of ``n`` tokens (see module doc)."""
    if long_seqs not in LONG_SEQS:
        raise ValueError(f"long_seqs must be one of {LONG_SEQS}, got {long_seqs!r}")
    if n <= capacity or long_seqs == "truncate":
        return [(0, min(n, capacity))]
    stride = max(1, capacity // 2)
    starts = list(range(0, n - capacity + 1, stride))
    if starts[-1] != n - capacity:
        starts.append(n - capacity)
    return [(s, s + capacity) for s in starts]


def extract(
    model: nn.Module,
    token_ids: Sequence[np.ndarray],
    *,
    pool: str | None = None,
    long_seqs: str = "truncate",
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> list[np.ndarray] | np.ndarray:
    """Hidden states of `model` (a backbone with ``.cfg``) for tokenized sequences (no frame).

    Returns a list of (T_i, D) float32 arrays, one per sequence in input order (``pool=None``;
    T_i is the sequence length, or the window capacity when truncated), or one (N, D) array:
    ``pool="mean"`` averages the sequence's tokens, ``"cls"`` takes the ``<cls>`` state (the
    mean over windows), ``"last"`` the state at the last token (the causal model's summary).
    """
    import torch

    from helm.data.dataset import frame, pad_batch
    from helm.lm import inference_autocast

    if pool is not None and pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    causal = not model.cfg.bidirectional
    capacity = window_capacity(model.cfg.max_seq_len, causal)
    if capacity < 1:
        raise ValueError(f"max_seq_len {model.cfg.max_seq_len} leaves no room for tokens")
    d = model.cfg.d_model
    kept = [min(len(t), capacity) if long_seqs == "truncate" else len(t) for t in token_ids]
    chunks = [
        (i, start, end)
        for i, ids in enumerate(token_ids)
        for start, end in windows(len(ids), capacity, long_seqs)
    ]
    chunks.sort(key=lambda c: c[2] - c[1], reverse=True)  # similar lengths share a batch

    if pool is None:
        sums = [np.zeros((n, d), dtype=np.float32) for n in kept]
        counts = [np.zeros(n, dtype=np.float32) for n in kept]
    else:
        sums = np.zeros((len(token_ids), d), dtype=np.float32)
        counts = np.zeros(len(token_ids), dtype=np.float32)

    was_training = model.training
    model.eval()
    batches = range(0, len(chunks), batch_size)
    show = sys.stderr.isatty() if progress is None else progress
    for b0 in tqdm(batches, desc="features", unit="batch", disable=not show, leave=False):
        batch = chunks[b0 : b0 + batch_size]
        input_ids, mask = pad_batch([frame(token_ids[i][s:e], causal) for i, s, e in batch])
        with torch.no_grad(), inference_autocast(device):
            hidden = model(
                input_ids.to(device),
                attention_mask=None if bool(mask.all()) else mask.to(device),
            )  # (B, T, D)
        hidden = hidden.float().cpu().numpy()
        for r, (i, s, e) in enumerate(batch):
            states = hidden[r, 1 : 1 + e - s]  # (e - s, D): the sequence's own tokens
            if pool is None:
                sums[i][s:e] += states
                counts[i][s:e] += 1
            elif pool == "mean":
                # A token inside several windows counts once, with its mean state.
                weight = 1.0 / _coverage(len(token_ids[i]), capacity, long_seqs)[s:e]
                sums[i] += (states * weight[:, None]).sum(0)
                counts[i] += weight.sum()
            elif pool == "cls":
                sums[i] += hidden[r, 0]
                counts[i] += 1
            elif e == kept[i]:  # "last": the window that holds the final token
                sums[i] = hidden[r, e - s] if e > s else hidden[r, 0]
                counts[i] = 1
    model.train(was_training)
    if pool is None:
        return [s / np.maximum(c, 1)[:, None] for s, c in zip(sums, counts)]
    return sums / np.maximum(counts, 1e-12)[:, None]


def _coverage(n: int, capacity: int, long_seqs: str) -> np.ndarray:
    """How many windows hold each kept token of a sequence of ``n`` tokens."""
    cover = np.zeros(max(n, 1), dtype=np.float32)
    for s, e in windows(n, capacity, long_seqs):
        cover[s:e] += 1
    return np.maximum(cover, 1)


# On-disk cache ------------------------------------------------------------------------------------


def feature_key(checkpoint: str | os.PathLike, sequences: Sequence[str], **options) -> str:
    """Cache key: the checkpoint file's fingerprint, a hash of the sequences, and `options`."""
    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(seq.encode())
        digest.update(b"\n")
    inputs = {
        "version": FEATURE_CACHE_VERSION,
        "checkpoint": data_cache.file_fingerprint(checkpoint),
        "sequences": digest.hexdigest(),
        **options,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_token_features(
    key: str,
    compute: Callable[[], list[np.ndarray]],
    cache_dir: str | os.PathLike | None = None,
) -> list[np.ndarray]:
    """Per-token features under `key`: loaded (memory-mapped) when cached, else computed and saved.

    A cache entry is a folder with ``features.npy`` (all rows back to back, float32) and
    ``offsets.npy``; it is written under a temporary name and renamed, so a crash leaves no entry.
    """
    root = Path(cache_dir) if cache_dir is not None else data_cache.cache_dir("features")
    final = root / key
    if not (final / "offsets.npy").is_file():
        feats = compute()
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        try:
            lengths = np.array([len(f) for f in feats], dtype=np.int64)
            np.save(tmp / "features.npy", np.concatenate(feats).astype(np.float32, copy=False))
            np.save(tmp / "offsets.npy", np.concatenate(([0], np.cumsum(lengths))))
            os.rename(tmp, final)
            log.info("features cached in %s", final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if cause := out_of_room(exc):  # one line naming the cache; nothing half-written is kept
                raise WriteError(f"cannot write the feature cache {final}: {cause}") from None
            if not (final / "offsets.npy").is_file():
                raise
        return feats
    log.info("features read from the cache %s", final)
    # Copy-on-write mapping: the arrays are writable views of the file (writes stay in memory),
    # so torch.as_tensor takes them without its non-writable NumPy warning.
    flat = np.load(final / "features.npy", mmap_mode="c")
    offsets = np.load(final / "offsets.npy")
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
