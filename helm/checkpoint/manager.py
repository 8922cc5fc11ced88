"""The run's checkpoint folder: ``last.pt``, ``best.pt`` and the newest ``epoch-NNNN.pt``,
written in an order that keeps them consistent whenever a kill strikes."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from helm.checkpoint.format import CheckpointError, atomic_copy, load_checkpoint, save_checkpoint

log = logging.getLogger("helm")
_EPOCH_FILE = re.compile(r"epoch-(\d{4,})\.pt$")


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
            atomic_copy(epoch_path, self.best)
        atomic_copy(epoch_path, self.last)
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
            last = self._load(self.last, map_location)
            expected = last["saver"].get("best_epoch")
        if expected is not None:
            for path in (self.best, self.epoch_path(expected)):
                if not path.exists():  # a file, or a sharded run's folder
                    continue
                try:
                    ckpt = self._load(path, map_location)
                except CheckpointError as exc:
                    log.warning("%s", exc)
                    continue
                if ckpt["saver"].get("best_epoch") == expected:
                    return BestCheckpoint(ckpt, path, expected)
        last = last if last is not None else self._load(self.last, map_location)
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

    def _load(self, path: Path, map_location: Any) -> dict[str, Any]:
        return load_checkpoint(path, map_location)

    def _prune(self) -> None:
        epochs = sorted(p for p in self.folder.glob("epoch-*.pt") if _EPOCH_FILE.search(p.name))
        for old in epochs[: max(0, len(epochs) - self.keep)]:
            old.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")
