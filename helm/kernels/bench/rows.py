"""What every benchmark records: rows written as they are measured (a benchmark that runs out of
time keeps every case it finished; one JSON object per line, appended after each case) and the
machine they were measured on."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


class RowLog:
    """``DIR/NAME.jsonl``, appended to case by case (a fresh file per run)."""

    def __init__(self, out_dir: Path | str, name: str) -> None:
        self.path = Path(out_dir) / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def append(self, *rows: dict) -> None:
        with self.path.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def read_rows(path: Path | str) -> list[dict]:
    """The rows of a row log; a last line cut off mid-write is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def cpu_name(cores: bool = True) -> str:
    """The CPU model (from /proc/cpuinfo, else what ``platform`` says), with its core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores" if cores else name
