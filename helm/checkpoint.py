"""Atomic checkpoints: ``last.pt``, ``best.pt`` and ``epoch-NNNN.pt`` keeping the newest ``keep``.

A checkpoint is one dict (model, EMA, optimizer, scheduler, scaler, epoch/step, RNG states, data
position, config, tokenizer, hierarchy) written by rank 0 to a temporary file in the same folder and
renamed over the target, so a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

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
