"""The checkpoints of a sharded run: ``ShardedCheckpointManager`` keeps DCP folders
(``helm.checkpoint.dcp``) as ``CheckpointManager`` keeps files."""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from helm import distributed as hdist
from helm.checkpoint.dcp import fsync_dir, read_state, write
from helm.checkpoint.format import CheckpointError, RunInfo
from helm.checkpoint.manager import CheckpointManager
from helm.checkpoint.state import TrainState

log = logging.getLogger("helm")
SHARDS = "shards"  # the folder of checkpoint folders
_EPOCH_LINK = re.compile(r"epoch-(\d{4,})\.dcp$")


class ShardedCheckpointManager(CheckpointManager):
    """``CheckpointManager`` for sharded runs: ``last.dcp``, ``best.dcp`` and the newest
    ``--checkpoint-hist`` ``epoch-NNNN.dcp`` are symbolic links to folders in ``shards/``, each
    checkpoint written whole under a temporary name and renamed (`write`). A link is replaced by
    renaming a new link over it, so whatever instant a kill strikes every name leads to a complete
    checkpoint; the order of ``save_epoch`` (the epoch, then best, then last) is kept. Checkpoints
    are written with ``save`` (a collective), not ``save_epoch`` / ``save_last``."""

    @property
    def last(self) -> Path:
        return self.folder / "last.dcp"

    @property
    def best(self) -> Path:
        return self.folder / "best.dcp"

    def epoch_path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.dcp"

    def save(self, state: TrainState, run: RunInfo, epoch: int | None = None,
             is_best: bool = False) -> Path:  # fmt: skip
        """Write the state (every rank calls this): the end of ``epoch``, or mid-epoch (None)."""
        token = hdist.broadcast_object(secrets.token_hex(4))
        name = f"epoch-{epoch:04d}" if epoch is not None else f"step-{state.step:08d}"
        folder = self.folder / SHARDS / f"{name}-{token}"
        write(folder, state, run)
        if state.rank == 0:
            try:
                if epoch is not None:
                    _link(self.epoch_path(epoch), folder)
                    if is_best:
                        _link(self.best, folder)
                _link(self.last, folder)
                fsync_dir(self.folder)
                self._prune()
            except OSError as exc:
                raise CheckpointError(f"cannot link checkpoint {folder}: {exc}") from None
        hdist.barrier()
        return self.last

    def _load(self, path: Path, map_location: Any) -> dict[str, Any]:
        return read_state(path)  # the fields; the weights stay in the folder (load_weights)

    def cleanup_temporaries(self) -> list[Path]:
        stale = super().cleanup_temporaries()
        links = (
            [p for p in self.folder.glob(".*.tmp") if p.is_symlink()]
            if self.folder.is_dir()
            else []
        )
        shards = self.folder / SHARDS
        folders = [p for p in shards.glob(".*.tmp") if p.is_dir()] if shards.is_dir() else []
        for path in links:
            path.unlink(missing_ok=True)
        for path in folders:
            shutil.rmtree(path, ignore_errors=True)
        if folders:
            log.info("removed %d unfinished checkpoint folder(s) in %s", len(folders), shards)
        return stale + links + folders

    def _prune(self) -> None:
        epochs = sorted(p for p in self.folder.glob("epoch-*.dcp") if _EPOCH_LINK.search(p.name))
        for old in epochs[: max(0, len(epochs) - self.keep)]:
            old.unlink(missing_ok=True)
        used = {p.resolve() for p in self.folder.glob("*.dcp") if p.is_symlink()}
        for folder in (self.folder / SHARDS).iterdir():
            if folder.is_dir() and not folder.name.startswith(".") and folder.resolve() not in used:
                shutil.rmtree(folder, ignore_errors=True)


def _link(link: Path, target: Path) -> None:
    """Point the symbolic link ``link`` at ``target`` atomically (relative: the run folder may move)."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
