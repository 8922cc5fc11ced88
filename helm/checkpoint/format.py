"""The checkpoint file: what it holds (``FIELDS``, the one list), its digest, atomic writes and
safe reads (``torch.load(weights_only=True)``), and the upgrade of version-1 files. See
``helm.checkpoint`` for the whole format."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helm.errors import CheckpointError

log = logging.getLogger("helm")
FORMAT_VERSION = 2
_PLAIN = (str, int, float, bool, type(None))


@dataclass
class RunInfo:
    """What a run is: fixed for its whole life, stored in every checkpoint."""

    config: dict[str, Any]  # the resolved configuration (config.yaml)
    model_name: str
    model_config: dict[str, Any]  # the model config's fields
    tokenizer: dict[str, Any]  # tokenizer_state(...)
    hierarchy: dict[str, Any]  # CodonHierarchy.state_dict()

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RUN_FIELDS}


# What a checkpoint holds: the one list. TrainState writes and restores these fields,
# load_checkpoint requires them, and helm.checkpoint's docstring says what each is.
STATE_DICTS = ("model", "optimizer", "scheduler", "scaler", "saver")  # each module's state_dict()
COUNTERS = ("epoch", "step", "batches_done", "bad_epochs", "epoch_metrics")  # where the run is
RUN_FIELDS = tuple(f.name for f in fields(RunInfo))  # what the run is
FIELDS = (*STATE_DICTS, "ema", *COUNTERS, "world_size", "rng", *RUN_FIELDS)
REQUIRED_KEYS = (*STATE_DICTS, "epoch", "step", "batches_done", "rng", *RUN_FIELDS)


# Integrity -----------------------------------------------------------------------------------------


def payload_digest(state: Any) -> str:
    """sha256 of a checkpoint's contents: every tensor's dtype, shape and bytes, every plain value,
    in the dict order the file keeps. Raises TypeError for anything that is not plain data."""
    h = hashlib.sha256()
    _feed(h, state, "checkpoint")
    return h.hexdigest()


def _feed(h, obj: Any, where: str) -> None:
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif kind in (dict, OrderedDict):
        h.update(f"D{len(obj)};".encode())
        for key, value in obj.items():
            _feed(h, key, where)
            _feed(h, value, f"{where}[{key!r}]")
    elif kind in (list, tuple):
        h.update(f"{kind.__name__}{len(obj)};".encode())
        for i, value in enumerate(obj):
            _feed(h, value, f"{where}[{i}]")
    elif kind in _PLAIN:  # exact types: a numpy float is a float subclass that pickles as code
        h.update(f"{kind.__name__}:{obj!r};".encode())
    else:
        raise TypeError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}: a checkpoint holds only tensors, "
            "dicts, lists, tuples, str, int, float, bool and None"
        )


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """The dict as written: ``format_version`` and the ``digest`` of everything else added."""
    sealed = {k: v for k, v in state.items() if k != "digest"}
    sealed["format_version"] = FORMAT_VERSION
    sealed["digest"] = payload_digest(sealed)
    return sealed


# Writing -------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save into a temp file beside ``path``, fsync, then rename over it. A failed write
    (a full disk) raises `CheckpointError` and leaves the previous file as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide checkpoints from the group
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # the zip writer reports a full disk as RuntimeError
        Path(tmp).unlink(missing_ok=True)
        full = getattr(exc, "errno", None) == errno.ENOSPC or "write failed" in str(exc)
        reason = "no space left on device" if full else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(
            f"cannot write checkpoint {path}: {reason}; the previous {path.name} is unchanged"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a checkpoint dict (sealed with its version and digest) atomically."""
    atomic_save(seal(state), path)


def atomic_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes atomically (a hard link when possible: no extra I/O)."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# Reading -------------------------------------------------------------------------------------------


def _version1_globals() -> list:
    """The types a version-1 file's numpy RNG state needs (an uint32 array), under the names numpy
    1 and 2 pickle them with. They build arrays and dtypes only, never call anything else."""
    core = np._core if hasattr(np, "_core") else np.core
    reconstruct = core.multiarray._reconstruct
    return [
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def _refusal(exc: Exception) -> str:
    """What torch's weights-only unpickler refused, in a few words."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"a reference to {found.group(1)}"
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith(boilerplate):
            return line.strip().removeprefix("WeightsUnpickler error:").strip()
    return type(exc).__name__


def _read(path: Path, map_location: Any) -> Any:
    try:
        with torch.serialization.safe_globals(_version1_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} is refused: it holds {_refusal(exc)}, not only tensors and plain "
            "data (a damaged or a crafted file); loading such a file can run code, so nothing in "
            "it was loaded. Use checkpoints only from people you trust; a checkpoint of an older "
            "HELM that you trust can be rewritten with "
            f"'python -m helm.checkpoint convert --unsafe {path} NEW.pt'"
        ) from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a checkpoint: it cannot be read "
            f"({type(exc).__name__}: {exc})"
        ) from None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain data only) and verify its digest; a missing,
    refused, corrupted or incomplete file raises `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    with open(path, "rb") as f:
        head = f.read(4)
        if not b"PK\x03\x04".startswith(
            head
        ):  # torch.save writes a zip archive (a cut one: corrupted)
            raise CheckpointError(
                f"{path} is not a checkpoint (train.py writes .pt zip archives; a HELM export or "
                "Hugging Face model is a folder)"
            )
    state = _read(path, map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a HELM checkpoint (no 'model' entry)")
    version = state.get("format_version", 1)
    if version == 1:
        log.warning(
            "checkpoint %s has the old format (no digest to verify); rewrite it with "
            "'python -m helm.checkpoint convert %s NEW.pt'",
            path,
            path,
        )
        try:
            state = upgrade(state)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a HELM checkpoint ({exc!r})") from None
    elif version == FORMAT_VERSION:
        stored = state.pop("digest", None)
        try:
            actual = payload_digest(state)
        except TypeError as exc:  # only a damaged file holds what save_checkpoint refuses
            raise CheckpointError(f"checkpoint {path} is corrupted: {exc}") from None
        if stored != actual:
            raise CheckpointError(
                f"checkpoint {path} is corrupted: digest mismatch (stored {str(stored)[:16]}, "
                f"contents {actual[:16]})"
            )
        state["digest"] = stored
    else:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this HELM reads 1 and "
            f"{FORMAT_VERSION} (a newer HELM wrote it?)"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete HELM checkpoint: no {missing}")
    return state


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A version-1 checkpoint dict in the version-2 layout (RNG states and tokenizer as tensors)."""
    state = dict(state)
    state["rng"] = [_rng_v2(rng) for rng in state["rng"]]
    tar = state["tokenizer"]["tar"]
    if isinstance(tar, bytes):
        state["tokenizer"] = {**state["tokenizer"], "tar": _bytes_tensor(tar)}
    state["format_version"] = FORMAT_VERSION
    state.pop("digest", None)
    return state


def _rng_v2(rng: dict[str, Any]) -> dict[str, Any]:
    rng = dict(rng)
    if isinstance(rng["python"], tuple):
        rng["python"] = _python_rng(rng["python"])
    if isinstance(rng["numpy"], tuple):
        rng["numpy"] = _numpy_rng(rng["numpy"])
    return rng


def _python_rng(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state  # (3, 625 ints < 2**32, the cached gauss or None)
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _numpy_rng(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state  # np.random.get_state(legacy=True)
    keys = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    return {
        "name": name,
        "keys": keys,
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
