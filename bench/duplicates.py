#!/usr/bin/env python
"""Identical sequences across the splits of the registry tasks, and what they do to a baseline.

    python bench/duplicates.py --data_dir /path/to/codonbert_tasks \\
        --out bench/results/reproduce_duplicates_cpu.json

For every registry task found in `--data_dir`, under the downstream experiment's default split rule
(the published split column, else three seeded 0.7/0.15/0.15 splits), and for two model windows
(138 nt: the smoke recipe's 48 tokens; 1530 nt: 512 tokens): test records whose whole sequence is in
train, and those identical to a train record only within the window, before and after the default
duplicate policy (`helm.downstream.checks.resolve_duplicates`), with the codon-frequency baseline's
test Spearman on whole records under ``--duplicates keep`` and under the default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helm.downstream import TASKS, load_task, repeated_splits, run_baselines  # noqa: E402
from helm.downstream.checks import resolve_duplicates  # noqa: E402
from helm.kernels.bench.rows import cpu_name  # noqa: E402

WINDOWS = (138, 1530)


def measure(name: str, data_dir: str) -> dict:
    """The counts and the baseline's Spearman of one task under ``keep`` and the default."""
    data = load_task(TASKS[name], data_dir=data_dir)
    fixed = data.splits is not None
    seeds = [0] if fixed else [0, 1, 2]
    split_with = lambda d: repeated_splits(d, seeds)  # noqa: E731
    doc = {"records": len(data), "split": "published" if fixed else "random x3"}
    for window in WINDOWS:
        seen = [min(window, len(s)) for s in data.codon_sequences()]
        splits, dup = resolve_duplicates(data, split_with, None, fixed=fixed, carved=False,
                                         seen=seen)  # fmt: skip
        doc[f"window_{window}"] = {k: dup[k] for k in ("policy", "train_test_before",
                                   "train_test_after", "window_only", "test_records")}  # fmt: skip
    for policy in ("keep", None):
        splits, _ = resolve_duplicates(data, split_with, policy, fixed=fixed, carved=False,
                                       seen=[len(s) for s in data.codon_sequences()])  # fmt: skip
        r = run_baselines(data, splits, methods=["codon_freq"], progress=False)["codon_freq"]
        doc[f"codon_freq_{policy or 'default'}"] = {"mean": r.mean, "values": r.values}
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="folder with the registry task files")
    parser.add_argument("--out", default=None, help="JSON file (default: stdout)")
    args = parser.parse_args(argv)
    root = Path(args.data_dir)
    found = [n for n, spec in TASKS.items() if any(root.glob(f"**/{spec.file_name}"))]
    tasks = {name: measure(name, args.data_dir) for name in found}
    doc = {
        "command": "python bench/duplicates.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu": cpu_name(cores=False),
        "tasks": tasks,
    }
    text = json.dumps(doc, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
