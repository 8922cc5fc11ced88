"""Run logging: stdlib ``logging`` from rank 0 (console + ``<output>/train.log``), and the metrics
stream (``metrics.jsonl``, one JSON line per log step, and TensorBoard under ``<output>/tb``)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("helm")


def setup_logging(is_main: bool, out_dir: Path | None) -> None:
    """stdlib logging on rank 0 only (console + <output>/train.log); other ranks log warnings."""
    root = logging.getLogger("helm")
    root.handlers.clear()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if is_main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False


def teardown_logging() -> None:
    """Undo ``setup_logging`` (close the log file, let records propagate again), so a process that
    calls train.main in-process (a notebook, the tests) is left as it was."""
    root = logging.getLogger("helm")
    for handler in list(root.handlers):
        handler.close()
        root.removeHandler(handler)
    root.setLevel(logging.NOTSET)
    root.propagate = True


def tensorboard_tag(key: str) -> str:
    """Metrics grouped by split in TensorBoard: val_loss -> val/loss, ema_val_xe -> ema/val_xe."""
    if "/" in key:
        return key
    head, _, rest = key.partition("_")
    return f"{head}/{rest}" if rest else key


class RunLogger:
    """metrics.jsonl (one JSON line per log step) and TensorBoard under <output>/tb, rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            path = out_dir / "metrics.jsonl"
            cut = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
            self.jsonl = open(path, "a", buffering=1)
            if cut:  # a line cut by a kill: end it, so the next record starts on its own line
                self.jsonl.write("\n")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # a dependency; a broken install should not stop training
                log.warning("tensorboard is not importable: logging to metrics.jsonl only")

    def log(self, step: int, values: dict[str, float], **extra) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **extra, **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(tensorboard_tag(k), v, step)

    def relog(self, entry: dict) -> None:
        """Log ``{"step", "epoch", "metrics"}`` unless metrics.jsonl holds it already (a run killed
        between its checkpoint and this line is resumed from that checkpoint)."""
        if not self.enabled or not entry.get("metrics"):
            return
        path = Path(self.jsonl.name)
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            if record.get("step") == entry["step"] and set(entry["metrics"]) <= set(record):
                return
        self.log(entry["step"], entry["metrics"], epoch=entry["epoch"])

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
