"""Checkpoints: the format, its writing and reading, for training and for evaluation.

A checkpoint is one dict, made by ``TrainState.checkpoint`` and read back by ``TrainState.restore``
(resume) or ``load_for_eval`` (eval.py, the test split):

- ``model``, ``ema``: the raw backbone's state dict, and the EMA's (or None);
- ``optimizer``, ``scheduler``, ``scaler``, ``saver``: their state dicts;
- ``epoch``, ``step``, ``batches_done``, ``bad_epochs``: where the run is (``batches_done``
  batches of epoch ``epoch`` are trained);
- ``rng``: the RNG states of every rank (python, numpy, torch, cuda);
- ``config``, ``model_name``, ``model_config``, ``tokenizer`` (its saved folder as bytes),
  ``hierarchy``: what the run is (``RunInfo``), enough to rebuild model, data and loss.

Rank 0 writes each file to a temporary file in the same folder and renames it over the target, so a
crash mid-write leaves the previous file intact. ``CheckpointManager`` keeps ``last.pt``,
``best.pt`` and the newest ``epoch-NNNN.pt``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from helm import distributed as hdist

log = logging.getLogger("helm")
_EPOCH_FILE = re.compile(r"epoch-(\d{4,})\.pt$")


class CheckpointError(RuntimeError):
    pass


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save into a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes atomically (a hard link when possible: no extra I/O)."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by this module, with a clear error for missing or broken files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # Our checkpoints hold config dicts and numpy RNG states, not only tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a HELM checkpoint (no 'model' entry)")
    return state


class CheckpointManager:
    """Keeps ``last.pt``, the ``keep`` newest ``epoch-NNNN.pt`` and ``best.pt`` by a metric."""

    def __init__(self, folder: str | os.PathLike, keep: int, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {mode!r}")
        self.folder = Path(folder)
        self.keep = keep
        self.mode = mode
        self.best_metric: float | None = None
        self.best_epoch: int | None = None

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

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
        """Write the end-of-epoch checkpoint, refresh ``last.pt`` (and ``best.pt``), prune history."""
        epoch_path = self.folder / f"epoch-{epoch:04d}.pt"
        atomic_save(state, epoch_path)
        _atomic_copy(epoch_path, self.last)
        if is_best:
            _atomic_copy(epoch_path, self.best)
        self._prune()

    def save_last(self, state: dict[str, Any]) -> Path:
        """Mid-epoch checkpoint (interrupts, periodic saves): only ``last.pt`` changes."""
        atomic_save(state, self.last)
        return self.last

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


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tokenizer_state(tokenizer) -> dict[str, Any]:
    """The tokenizer's saved folder as bytes, so a checkpoint alone can rebuild it."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(tmp, arcname="tokenizer")
        return {"tar": buf.getvalue(), "config": json.dumps(tokenizer.config(), sort_keys=True)}


def tokenizer_from_state(state: dict[str, Any]):
    from helm.tokenizers import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(state["tar"]), mode="r") as tar:
            tar.extractall(tmp, filter="data")
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

    def checkpoint(self, run: RunInfo, *, gather: bool = True) -> dict[str, Any]:
        """The checkpoint dict (module docstring). With ``gather`` it is a collective (every rank
        calls it) and holds every rank's RNG; without, rank 0's alone (an interrupt's save)."""
        rngs = [rng_state()]
        if gather and hdist.is_distributed():
            rngs = hdist.all_gather_object(rng_state())
        return {
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
            "rng": rngs,
            **run.to_dict(),
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Load a checkpoint into the modules, the counters and this rank's RNG."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.saver.load_state_dict(ckpt["saver"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.batches_done, self.bad_epochs = ckpt["batches_done"], ckpt.get("bad_epochs", 0)
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
    cfg = model_config(ckpt["model_name"], **ckpt["model_config"])
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
