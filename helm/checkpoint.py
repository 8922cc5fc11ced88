"""Checkpoints: the format, its writing and reading, for training and for evaluation.

A checkpoint is one dict, made by ``TrainState.checkpoint`` and read back by ``TrainState.restore``
(resume) or ``load_for_eval`` (eval.py, the test split):

- ``model``, ``ema``: the raw backbone's state dict, and the EMA's (or None);
- ``optimizer``, ``scheduler``, ``scaler``, ``saver``: their state dicts;
- ``epoch``, ``step``, ``batches_done``, ``bad_epochs``: where the run is (``batches_done``
  batches of epoch ``epoch`` are trained);
- ``rng``: the RNG states of every rank (python, numpy, torch, cuda), as tensors and numbers;
- ``config``, ``model_name``, ``model_config``, ``tokenizer`` (its saved folder as a tar in a uint8
  tensor), ``hierarchy``: what the run is (``RunInfo``), enough to rebuild model, data and loss;
- ``format_version`` (2) and ``digest``: the sha256 of everything else (`payload_digest`).

``epoch_metrics`` holds the last finished epoch's validation line, so a resumed run can write it
when a kill lost it.

Only tensors and plain data (dict, list, tuple, str, int, float, bool, None) are stored, so every
file is read with ``torch.load(weights_only=True)``: a file that would need anything else to load
(an object whose unpickling runs code) is refused with `CheckpointError` before anything in it
runs. The digest, checked on every load, names a corrupted file instead of loading it. Version-1
files (pickled python/numpy RNG states, the tokenizer as raw bytes, no digest) still load: the
numpy array and dtype types their RNG state needs are the only types allowed beside torch's own.
``python -m helm.checkpoint convert OLD NEW`` rewrites one as version 2.

Rank 0 writes each file to a temporary file in the same folder and renames it over the target, so
a crash mid-write leaves the previous file intact. ``CheckpointManager`` keeps ``last.pt``,
``best.pt`` and the newest ``epoch-NNNN.pt``; at the end of an epoch it writes the epoch file,
then ``best.pt``, then ``last.pt``, so whatever instant a kill strikes, the best epoch that
``last.pt`` records is already in ``best.pt`` or its epoch file (`CheckpointManager.load_best`).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
import tarfile
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from helm import distributed as hdist
from helm.errors import CheckpointError

log = logging.getLogger("helm")
_EPOCH_FILE = re.compile(r"epoch-(\d{4,})\.pt$")
FORMAT_VERSION = 2
# What TrainState.restore and load_for_eval read.
REQUIRED_KEYS = (
    "model", "optimizer", "scheduler", "scaler", "saver", "epoch", "step", "batches_done", "rng",
    "config", "model_name", "model_config", "tokenizer", "hierarchy",
)  # fmt: skip
_PLAIN = (str, int, float, bool, type(None))


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


def _atomic_copy(src: Path, dst: Path) -> None:
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


# The run's checkpoint folder -----------------------------------------------------------------------


class BestCheckpoint(NamedTuple):
    checkpoint: dict[str, Any]
    path: Path
    epoch: int | None  # the epoch whose weights these are


class CheckpointManager:
    """Keeps ``last.pt``, the ``keep`` newest ``epoch-NNNN.pt`` and ``best.pt`` by a metric.

    ``cleanup`` removes the temporary files of writes a kill interrupted (`cleanup_temporaries`);
    no rank writes while the managers are made, so every rank may do it.
    """

    def __init__(self, folder: str | os.PathLike, keep: int, mode: str = "min", *, cleanup=True):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {mode!r}")
        self.folder = Path(folder)
        self.keep = keep
        self.mode = mode
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        if cleanup:
            self.cleanup_temporaries()

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    def epoch_path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.pt"

    def cleanup_temporaries(self) -> list[Path]:
        """Remove ``.NAME.*.tmp`` files (writes that a kill interrupted); returns them."""
        stale = (
            [p for p in self.folder.glob(".*.tmp") if p.is_file()] if self.folder.is_dir() else []
        )
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.info("removed %d unfinished checkpoint write(s) in %s", len(stale), self.folder)
        return stale

    def is_better(self, metric: float) -> bool:
        if self.best_metric is None:
            return True
        return metric < self.best_metric if self.mode == "min" else metric > self.best_metric

    def update_best(self, metric: float | None, epoch: int) -> bool:
        """Record an epoch's metric (every rank calls this); True when it is the new best."""
        if metric is None or not self.is_better(metric):
            return False
        self.best_metric, self.best_epoch = metric, epoch
        return True

    def save_epoch(self, state: dict[str, Any], epoch: int, is_best: bool) -> None:
        """Write the end-of-epoch checkpoint, then ``best.pt`` (when improved), then ``last.pt``,
        then prune history: the best epoch ``last.pt`` names is always on disk before it."""
        epoch_path = self.epoch_path(epoch)
        save_checkpoint(state, epoch_path)
        if is_best:
            _atomic_copy(epoch_path, self.best)
        _atomic_copy(epoch_path, self.last)
        self._prune()

    def save_last(self, state: dict[str, Any]) -> Path:
        """Mid-epoch checkpoint (interrupts, periodic saves): only ``last.pt`` changes."""
        save_checkpoint(state, self.last)
        return self.last

    def load_best(self, map_location: Any = "cpu") -> BestCheckpoint:
        """The verified checkpoint of the best epoch, and that epoch; ``last.pt`` when no epoch
        was chosen (no validation).

        The best epoch is this manager's (as restored and updated by the run), else the one
        ``last.pt`` records. ``best.pt`` counts only when it holds that epoch (a kill can leave it
        one epoch ahead); else the epoch's own file is used. When neither holds it (pruned,
        corrupted), the last checkpoint is returned with a warning, labelled with its own epoch.
        """
        last = None
        expected = self.best_epoch
        if expected is None:
            last = load_checkpoint(self.last, map_location)
            expected = last["saver"].get("best_epoch")
        if expected is not None:
            for path in (self.best, self.epoch_path(expected)):
                if not path.is_file():
                    continue
                try:
                    ckpt = load_checkpoint(path, map_location)
                except CheckpointError as exc:
                    log.warning("%s", exc)
                    continue
                if ckpt["saver"].get("best_epoch") == expected:
                    return BestCheckpoint(ckpt, path, expected)
        last = last if last is not None else load_checkpoint(self.last, map_location)
        epoch = last["epoch"] - 1 if last["batches_done"] == 0 else last["epoch"]
        if expected is not None:
            log.warning(
                "neither %s nor %s holds the best epoch %d; using %s (epoch %d)",
                self.best,
                self.epoch_path(expected).name,
                expected,
                self.last,
                epoch,
            )
        return BestCheckpoint(last, self.last, epoch)

    def _prune(self) -> None:
        epochs = sorted(p for p in self.folder.glob("epoch-*.pt") if _EPOCH_FILE.search(p.name))
        for old in epochs[: max(0, len(epochs) - self.keep)]:
            old.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")


# RNG and tokenizer state ---------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and numbers (what a checkpoint stores)."""
    state = {
        "python": _python_rng(random.getstate()),
        "numpy": _numpy_rng(np.random.get_state(legacy=True)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def tokenizer_state(tokenizer) -> dict[str, Any]:
    """The tokenizer's saved folder as a tar (a uint8 tensor), so a checkpoint alone rebuilds it."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(tmp, arcname="tokenizer")
    config = json.dumps(tokenizer.config(), sort_keys=True)
    return {"tar": _bytes_tensor(buf.getvalue()), "config": config}


def tokenizer_from_state(state: dict[str, Any]):
    from helm.tokenizers import load_tokenizer

    tar = state["tar"]
    data = tar.numpy().tobytes() if isinstance(tar, torch.Tensor) else bytes(tar)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as archive:
            archive.extractall(tmp, filter="data")
        return load_tokenizer(Path(tmp) / "tokenizer")


# The training state --------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """What a run is: fixed for its whole life, stored in every checkpoint."""

    config: dict[str, Any]  # the resolved configuration (config.yaml)
    model_name: str
    model_config: dict[str, Any]  # the model config's fields
    tokenizer: dict[str, Any]  # tokenizer_state(...)
    hierarchy: dict[str, Any]  # CodonHierarchy.state_dict()

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class TrainState:
    """Everything a resume restores: the modules and optimiser state of a run, and where it is.

    ``model`` and ``ema`` are the raw backbones (never a compiled or DDP view). The counters move
    with training: ``step`` counts optimizer updates, ``batches_done`` the batches of ``epoch``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # helm.sched.LRScheduler
    scaler: torch.amp.GradScaler
    saver: CheckpointManager
    ema: nn.Module | None = None
    epoch: int = 0
    step: int = 0
    batches_done: int = 0
    bad_epochs: int = 0
    rank: int = field(default=0, repr=False)
    world_size: int = field(default=1, repr=False)
    # The last finished epoch's validation line: {"step", "epoch", "metrics"} (plain data).
    epoch_metrics: dict[str, Any] | None = None

    def checkpoint(self, run: RunInfo, *, gather: bool = True) -> dict[str, Any]:
        """The checkpoint dict (module docstring). With ``gather`` it is a collective (every rank
        calls it) and holds every rank's RNG; without, rank 0's alone (an interrupt's save)."""
        rngs = [rng_state()]
        if gather and hdist.is_distributed():
            rngs = hdist.all_gather_object(rng_state())
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "saver": self.saver.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "batches_done": self.batches_done,
            "bad_epochs": self.bad_epochs,
            "world_size": self.world_size,  # batches_done counts each rank's batches
            "epoch_metrics": self.epoch_metrics,
            "rng": rngs,
            **run.to_dict(),
        }

    def restore(self, ckpt: dict[str, Any], path: str | os.PathLike | None = None) -> None:
        """Load a checkpoint into the modules, the counters and this rank's RNG; a checkpoint of
        another model or size raises `CheckpointError` (naming ``path`` when given)."""
        saved_world = ckpt.get("world_size", self.world_size)
        if saved_world != self.world_size and ckpt.get("batches_done", 0):
            raise CheckpointError(
                f"checkpoint {path or ''} was stopped inside epoch {ckpt['epoch']} on {saved_world} "
                f"rank(s); its data position is per rank, so resume it on {saved_world} rank(s), "
                f"or from an epoch checkpoint (epoch-NNNN.pt) on {self.world_size}"
            )
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            if self.ema is not None and ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            name = f"checkpoint {path}" if path is not None else "the checkpoint"
            raise CheckpointError(f"{name} does not fit this model and run: {first}") from None
        self.saver.load_state_dict(ckpt["saver"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.batches_done, self.bad_epochs = ckpt["batches_done"], ckpt.get("bad_epochs", 0)
        self.epoch_metrics = ckpt.get("epoch_metrics")
        set_rng_state(ckpt["rng"][min(self.rank, len(ckpt["rng"]) - 1)])


# Loading a trained model ---------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: nn.Module  # the backbone, with .lm_head, in eval mode
    tokenizer: Any
    hierarchy: Any  # CodonHierarchy
    config: dict[str, Any]  # the resolved training configuration
    checkpoint: dict[str, Any]

    @property
    def model_name(self) -> str:
        return self.checkpoint["model_name"]


def _weights(ckpt: dict[str, Any], path, ema: bool) -> dict[str, torch.Tensor]:
    if not ema:
        return ckpt["model"]
    if ckpt.get("ema") is None:
        raise CheckpointError(f"{path} holds no EMA weights (trained without --model-ema)")
    return ckpt["ema"]


def load_for_eval(
    path: str | os.PathLike, *, ema: bool = False, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Rebuild a trained backbone, its tokenizer and codon tree from a checkpoint alone.

    ``ema=True`` loads the EMA weights (an error when the run had no ``--model-ema``).
    """
    from helm.hierarchy import CodonHierarchy
    from helm.models import build_model, model_config

    ckpt = load_checkpoint(path)
    fields = dict(ckpt["model_config"])
    if ckpt["model_name"] == "bert":  # BERT checkpoints from before the MLM head transform
        fields.setdefault("mlm_head", "linear")
    cfg = model_config(ckpt["model_name"], **fields)
    model = build_model(ckpt["model_name"], cfg)
    model.load_state_dict(_weights(ckpt, path, ema))
    model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer_from_state(ckpt["tokenizer"]),
        hierarchy=CodonHierarchy.from_state_dict(ckpt["hierarchy"]),
        config=ckpt["config"],
        checkpoint=ckpt,
    )


# python -m helm.checkpoint -------------------------------------------------------------------------


def convert(old: str | os.PathLike, new: str | os.PathLike, *, unsafe: bool = False) -> None:
    """Rewrite a version-1 checkpoint as version 2. ``unsafe`` reads it with full unpickling,
    which runs any code the file holds: only for a file from a source you trust."""
    if unsafe:
        state = torch.load(old, map_location="cpu", weights_only=False)
    else:
        state = load_checkpoint(old)
    if state.get("format_version", 1) == 1:
        state = upgrade(state)
    save_checkpoint(state, new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helm.checkpoint", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "convert", help="rewrite an old-format checkpoint in the current format"
    )
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="read OLD with full unpickling, which RUNS ANY CODE IN IT: only for a file you trust",
    )
    p = commands.add_parser("verify", help="load a checkpoint and check its digest")
    p.add_argument("path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "verify":
            ckpt = load_checkpoint(args.path)
            print(
                f"{args.path}: ok (format {ckpt['format_version']}, epoch {ckpt['epoch']}, step {ckpt['step']})"
            )
            return 0
        if args.unsafe:
            print(
                f"WARNING: reading {args.old} with full unpickling. A checkpoint can carry code "
                "that this runs with your rights. Continue only if you trust where it came from.",
                file=sys.stderr,
            )
        convert(args.old, args.new, unsafe=args.unsafe)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.new} (format {FORMAT_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
