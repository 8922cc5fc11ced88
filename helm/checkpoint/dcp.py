"""Sharded checkpoints (``--fsdp``): folders written with Distributed Checkpoint (DCP).

A checkpoint folder ``X.dcp`` holds
- the tensors of the model, optimizer and EMA state dicts, keyed by parameter name, as DCP writes
  them: every rank its own shards (``__<rank>_<n>.distcp``), rank 0 DCP's index (``.metadata``);
- ``state.pt``: every other field of a checkpoint (``helm.checkpoint``: counters, RNG states of
  every rank, configuration, tokenizer, codon tree, schedule) and the rest of the three state
  dicts (the optimizer's parameter groups; ``"<dcp>"`` where a tensor lies in the shards), as an
  ordinary checkpoint file (tensors and plain data, with its digest);
- ``SHA256SUMS``: every file's sha256 (``sha256sum -c`` reads it), written last.

Writing (`write`, a collective): each rank writes its shards into a temporary folder and digests
its own files; rank 0 adds ``state.pt`` and ``SHA256SUMS`` and renames the folder into place, so a
folder under its final name is complete. Reading verifies every digest first (the ranks share the
work), unpickles DCP's index with an allow-list of its own classes and reads tensors with
``torch.load(weights_only=True)``: nothing in a folder can run code. DCP reads each rank's part of
every tensor, so a folder resumes at any world size, sharded or not (`restore`), and reads without
torchrun as whole tensors (`read_consolidated`: eval.py, export; ``load_checkpoint`` calls it).
``helm.checkpoint.sharded`` keeps a run's folders as ``CheckpointManager`` keeps files.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from helm import distributed as hdist
from helm.checkpoint.format import CheckpointError, RunInfo, load_checkpoint, save_checkpoint
from helm.checkpoint.state import TrainState
from helm.fileio import MANIFEST, read_manifest, sha256_file, write_cause, write_text

INDEX = ".metadata"  # DCP's index of the tensors: shapes, dtypes, which file holds each chunk
STATE = "state.pt"
TENSOR = "<dcp>"  # in state.pt, where a tensor of the shards belongs


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (complete or not)."""
    return (Path(path) / INDEX).is_file()


def newest(folder: Path, stem: str) -> Path | None:
    """``stem.pt`` or ``stem.dcp`` in ``folder``: the more recent when both exist (a run that
    changed ``--fsdp`` when resumed); None when neither does."""
    found = [p for p in (folder / f"{stem}.pt", folder / f"{stem}.dcp") if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# The tensors of a state dict and the rest --------------------------------------------------------


def _split(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the tensors of a nested dict, the dict with each tensor replaced by ``TENSOR``)."""
    tensors, rest = {}, {}
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            tensors[key], rest[key] = value, TENSOR
        elif isinstance(value, dict):
            tensors[key], rest[key] = _split(value)
        else:
            rest[key] = value
    return tensors, rest


def _merge(tensors: dict[str, Any], rest: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The inverse of `_split`: ``rest`` with its ``TENSOR`` marks filled from ``tensors``."""
    out = {}
    for key, value in rest.items():
        if isinstance(value, dict):
            out[key] = _merge(tensors.get(key, {}), value, f"{where}{key}.")
        elif isinstance(value, str) and value == TENSOR:
            if key not in tensors:
                raise KeyError(f"{where}{key}")
            out[key] = tensors[key]
        else:
            out[key] = value
    return out


# Writing -------------------------------------------------------------------------------------------


def write(folder: Path, state: TrainState, run: RunInfo) -> None:
    """Write the checkpoint of ``state`` to ``folder`` (which must not exist), from every rank."""
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    ckpt = state.checkpoint(run)  # the fields besides the tensors; every rank's RNG states
    model, optimizer = get_state_dict(state.model, state.optimizer)
    trees = {"model": model, "optimizer": optimizer}
    if state.ema is not None:
        trees["ema"] = get_model_state_dict(state.ema)
    tensors = {}
    for name, tree in trees.items():
        tensors[name], ckpt[name] = _split(tree)
    main = state.rank == 0
    tmp = folder.with_name(f".{folder.name}.tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    hdist.barrier()
    try:
        save(tensors, storage_writer=FileSystemWriter(tmp))  # DCP fsyncs every file it writes
    except Exception as exc:  # DCP raises on every rank when any rank fails
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {folder}: {_cause(exc)}") from None
    # Each rank digests the files it wrote (the ranks share the reading); rank 0 the rest.
    gathered = hdist.all_gather_object(
        {p.name: sha256_file(p) for p in tmp.glob(f"__{state.rank}_*")}
    )
    failure = None
    if main:
        try:
            save_checkpoint(ckpt, tmp / STATE)
            digests = {name: d for part in gathered for name, d in part.items()}
            for p in tmp.iterdir():
                digests.setdefault(p.name, sha256_file(p))
            lines = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
            write_text(tmp / MANIFEST, lines, what="checkpoint", error=CheckpointError)
            os.rename(tmp, folder)  # the folder appears complete, or not at all
            fsync_dir(folder.parent)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = str(exc) if isinstance(exc, CheckpointError) else None
            failure = failure or f"cannot write checkpoint {folder}: {_cause(exc)}"
    failure = hdist.broadcast_object(failure)  # every rank raises, or none
    if failure:
        raise CheckpointError(failure)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cause(exc: BaseException) -> str:
    """What a failed write ran into (DCP wraps each rank's exception)."""
    failures = getattr(exc, "failures", None) or {}
    inner = next(iter(failures.values()), None)
    inner = inner[0] if isinstance(inner, tuple) else exc
    return write_cause(inner) or _first_line(inner)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# Reading -------------------------------------------------------------------------------------------


def verify(path: Path, collective: bool | None = None) -> dict[str, str]:
    """Check every file of a folder against ``SHA256SUMS`` (which must exist: a folder without it
    was never completed); returns the digests. ``collective`` (default: when a process group is
    up; then every rank calls this) shares the files among the ranks."""
    path = Path(path)
    try:
        digests = read_manifest(path)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: {exc}") from None
    if digests is None:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: it has no {MANIFEST} (its write was interrupted)"
        )
    missing = [name for name in (INDEX, STATE) if name not in digests]
    if missing:
        raise CheckpointError(f"checkpoint {path} is corrupted: {MANIFEST} does not list {missing}")
    collective = dist.is_initialized() if collective is None else collective
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective else (0, 1)
    problem = None
    for name in sorted(digests)[rank::world]:
        if not (path / name).is_file():
            problem = f"{name} is missing"
        elif sha256_file(path / name) != digests[name]:
            problem = f"{name} differs from its digest in {MANIFEST}"
        if problem:
            break
    if collective:
        problem = next((p for p in hdist.all_gather_object(problem) if p), None)
    if problem:
        raise CheckpointError(f"checkpoint {path} is corrupted: {problem}")
    return digests


def read_state(path: str | os.PathLike, collective: bool | None = None) -> dict[str, Any]:
    """The verified ``state.pt`` of a folder: the checkpoint's fields, the tensors aside (what a
    resume needs first: the configuration, tokenizer and codon tree)."""
    path = Path(path)
    verify(path, collective)
    return load_checkpoint(path / STATE)


def restore(path: str | os.PathLike, state: TrainState, ckpt: dict[str, Any]) -> None:
    """Load a folder into a run's state, sharded or not, at any number of ranks (every rank calls
    it); ``ckpt`` is the folder's `read_state`."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = Path(path)
    model, optimizer = get_state_dict(state.model, state.optimizer)  # the optimizer state made
    trees = {"model": model, "optimizer": optimizer}
    if state.ema is not None and ckpt.get("ema") is not None:
        trees["ema"] = get_model_state_dict(state.ema)
    tensors = {name: _split(tree)[0] for name, tree in trees.items()}
    _load(path, tensors, dist.is_initialized())
    try:
        full = {name: _merge(tensors[name], ckpt[name]) for name in trees}
        set_state_dict(
            state.model,
            state.optimizer,
            model_state_dict=full["model"],
            optim_state_dict=full["optimizer"],
        )
        if "ema" in full:
            set_model_state_dict(state.ema, full["ema"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model and run: {_first_line(exc)}"
        ) from None
    state.restore(ckpt, path, weights=False)


def restore_whole(ckpt: dict[str, Any], state: TrainState, path: str | os.PathLike) -> None:
    """Load a single-file checkpoint (of an unsharded run) into a sharded run's state: every rank
    holds the whole of it and keeps its own shards. The optimizer state, keyed by position in the
    file, is keyed by parameter name for ``set_state_dict``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True)
    names = {id(p): name for name, p in state.model.named_parameters()}
    order = [names[id(p)] for group in state.optimizer.param_groups for p in group["params"]]
    saved = ckpt["optimizer"]
    try:
        optimizer = {
            "state": {order[i]: s for i, s in saved["state"].items()},
            "param_groups": [
                {**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]
            ],
        }
        set_state_dict(
            state.model,
            state.optimizer,
            model_state_dict=ckpt["model"],
            optim_state_dict=optimizer,
            options=whole,
        )
        if state.ema is not None and ckpt.get("ema") is not None:
            set_model_state_dict(state.ema, ckpt["ema"], options=whole)
    except (IndexError, KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model and run: {_first_line(exc)}"
        ) from None
    state.restore(ckpt, path, weights=False)


def load_weights(path: str | os.PathLike, module: torch.nn.Module, which: str = "model") -> None:
    """Load a folder's ``which`` weights (``model`` or ``ema``) into ``module``, sharded or not
    (the test split's best weights; every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    tensors = {which: _split(get_model_state_dict(module))[0]}
    _load(Path(path), tensors, dist.is_initialized())
    set_model_state_dict(module, tensors[which])


def read_consolidated(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint dict of a folder with the model and EMA weights as whole tensors, read in
    this process alone (no process group: eval.py, export, ``python -m helm.checkpoint verify``).
    ``optimizer`` is None: its tensors stay in the folder, for `restore`."""
    path = Path(path)
    ckpt = read_state(path, collective=False)
    index = _index(path)
    targets = {
        name: _allocate(ckpt[name], index, name, path)
        for name in ("model", "ema")
        if ckpt.get(name) is not None
    }
    _load(path, targets, collective=False)
    for name in targets:
        ckpt[name] = _merge(targets[name], ckpt[name])
        if map_location not in (None, "cpu"):
            ckpt[name] = {k: v.to(map_location) for k, v in ckpt[name].items()}
    ckpt["optimizer"] = None
    return ckpt


def _allocate(rest: dict[str, Any], index, prefix: str, path: Path) -> dict[str, Any]:
    """Empty whole tensors for the ``TENSOR`` marks of ``rest``, shaped as DCP's index says."""
    out = {}
    for key, value in rest.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out[key] = _allocate(value, index, name, path)
        elif isinstance(value, str) and value == TENSOR:
            md = index.state_dict_metadata.get(name)
            if md is None:
                raise CheckpointError(f"checkpoint {path} is corrupted: {INDEX} lacks {name}")
            out[key] = torch.empty(md.size, dtype=md.properties.dtype)
    return out


def _load(path: Path, tensors: dict[str, Any], collective: bool) -> None:
    """DCP's load of ``tensors`` (filled in place, each its own part) from ``path``."""
    from torch.distributed.checkpoint import load

    try:
        with warnings.catch_warnings():  # DCP warns whenever it reads in one process
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            load(
                tensors,
                storage_reader=_safe_reader_class()(path),
                planner=_planner(),
                no_dist=not collective,
            )
    except CheckpointError:
        raise
    except Exception as exc:  # DCP reports a missing or mis-shaped tensor in several ways
        inner = re.search(r"(Missing key[^\n]*|size mismatch[^\n]*|mismatch sizes[^\n]*)", str(exc))
        why = inner.group(1) if inner else _first_line(exc)
        raise CheckpointError(f"checkpoint {path} does not fit this model and run: {why}") from None


# DCP's index, read without running code --------------------------------------------------------

# What DCP's pickled index is made of (torch 2.11 to 2.13): its dataclasses, torch sizes, dtypes
# and layouts, and the path it was written to. Anything else is refused before it is built.
_INDEX_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _INDEX_GLOBALS.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def _index(path: Path, digests: dict[str, str] | None = None):
    """DCP's index of folder ``path``, unpickled with ``_INDEX_GLOBALS`` only; it must describe
    tensors alone, in files of the folder listed in ``SHA256SUMS``."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    digests = read_manifest(path) if digests is None else digests
    try:
        with open(path / INDEX, "rb") as f:
            index = _IndexUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} is refused: its {INDEX} holds a reference to {exc}, not only DCP's "
            "index; loading it could run code, so nothing in it was loaded"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: {INDEX}: {_first_line(exc)}"
        ) from None
    entries = getattr(index, "state_dict_metadata", None) if isinstance(index, Metadata) else None
    if entries is None or any(not isinstance(m, TensorStorageMetadata) for m in entries.values()):
        raise CheckpointError(
            f"checkpoint {path} is refused: its {INDEX} indexes more than tensors"
        )
    for info in (index.storage_data or {}).values():
        if (
            not isinstance(info, _StorageInfo)
            or info.relative_path not in (digests or {})
            or getattr(info, "transform_descriptors", None)
        ):
            raise CheckpointError(f"checkpoint {path} is refused: its {INDEX} names other files")
    return index


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader with its index read by `_index` (tensors it reads weights-only)."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            index = _index(Path(self.path))
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return SafeReader


def _planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        """DCP's planner, refusing to unpickle non-tensor entries (none are written)."""

        def load_bytes(self, read_item, value) -> None:
            raise CheckpointError("a sharded checkpoint holds tensors only; refusing other data")

    return TensorsOnly()
