"""Long grid searches: the grid (``Grid``), a progress line with an estimate, and a store of
finished runs.

`RunStore` appends every finished run (one head trained at one grid point, seed and split) to a
JSON-lines file as soon as it ends, keyed by everything that determines it: the caller's context
(input file hash, checkpoint identity, head, epochs, patience, ...) and the run's own method,
split, learning rate, batch size and seed. A rerun of the same command reads the file and skips
the runs it holds, so an interrupted search (Ctrl-C, a killed job) continues where it stopped and
nothing finished is lost. A line cut short by a kill is ignored and that run is trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from helm.errors import WriteError
from helm.fileio import write_cause

logger = logging.getLogger("helm")


@dataclass(frozen=True)
class Grid:
    """The search of the paper's protocol: every learning rate x batch size, each run once per
    seed, at most ``max_epochs`` epochs with early stopping after ``patience`` epochs without a
    better validation metric. The defaults are the paper's."""

    lrs: tuple[float, ...] = (3e-4, 1e-4, 1e-5)
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_epochs: int = 100
    patience: int = 15

    def __post_init__(self) -> None:
        for name in ("lrs", "batch_sizes", "seeds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise ValueError(f"the grid needs at least one of {name}")
        if self.max_epochs < 1 or self.patience < 1:
            raise ValueError("max_epochs and patience must be >= 1")

    @property
    def runs_per_split(self) -> int:
        return len(self.lrs) * len(self.batch_sizes) * len(self.seeds)


PAPER_GRID = Grid()


def _key(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _nan(value):
    return math.nan if value is None else value


class RunStore:
    """Finished runs under `path` (JSON lines), keyed by `context` and each run's settings."""

    def __init__(self, path: str | os.PathLike, context: dict) -> None:
        self.path = Path(path)
        self.context = context
        self.runs: dict[str, dict] = {}
        self._newline = ""  # put before the next line when the file ends mid-line (a kill)
        if self.path.is_file():
            text = self.path.read_text()
            self._newline = "\n" if text and not text.endswith("\n") else ""
            for line in text.splitlines():
                try:
                    doc = json.loads(line)
                    self.runs[doc["key"]] = doc
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill: that run is simply trained again

    def __len__(self) -> int:
        return len(self.runs)

    def key(self, settings: dict) -> str:
        """The key of one run: a hash of the context and the run's settings."""
        return _key({**self.context, **settings})

    def get(self, settings: dict) -> tuple[float, dict[str, float], int] | None:
        """(best validation value, test metrics at that epoch, that epoch) of a stored run."""
        doc = self.runs.get(self.key(settings))
        if doc is None:
            return None
        test = {k: _nan(v) for k, v in doc["test"].items()}
        return _nan(doc["val"]), test, int(doc["epoch"])

    def put(self, settings: dict, result: tuple[float, dict[str, float], int]) -> None:
        """Append one finished run and flush it to disk at once."""
        val, test, epoch = result
        finite = lambda v: float(v) if v is not None and np.isfinite(v) else None  # noqa: E731
        doc = {
            "key": self.key(settings),
            "settings": settings,
            "val": finite(val),
            "test": {k: finite(v) for k, v in test.items()},
            "epoch": int(epoch),
        }
        self.runs[doc["key"]] = doc
        try:  # a line cut by a full disk is skipped when read back, like one cut by a kill
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(self._newline + json.dumps(doc) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._newline = ""
        except OSError as exc:
            self._newline = "\n"
            raise WriteError(f"cannot write the runs log {self.path}: {write_cause(exc)}") from None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Counts runs of a search and estimates the time left from the runs trained so far (runs
    read from a `RunStore` take no time and do not enter the estimate)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.trained = total, 0, 0
        self.start = time.monotonic()

    def step(self, cached: bool) -> str:
        """Record one finished run; the text ``k/N, elapsed, about T left``."""
        self.done += 1
        self.trained += not cached
        elapsed = time.monotonic() - self.start
        text = f"{self.done}/{self.total}, {_duration(elapsed)} elapsed"
        if self.done < self.total and self.trained:
            left = elapsed / self.trained * (self.total - self.done)
            text += f", about {_duration(left)} left"
        return text
