"""Start-up time of the command-line tools: how long ``--help`` and a flag mistake take to answer.

    python bench/cli_startup.py                          # this tree, 5 runs each, the minimum
    python bench/cli_startup.py --root OTHER_CHECKOUT    # another tree with the same interpreter
    python bench/cli_startup.py --out bench/results/cli_startup_cpu.json --label after

Each command runs in a fresh interpreter from the tree's root (as a user runs it); the figure is
the minimum wall time over ``--runs`` runs, the least disturbed by other work on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helm.kernels.bench.rows import cpu_name  # noqa: E402

COMMANDS = {
    "train.py --help": ["train.py", "--help"],
    "train.py --lr -1 (a flag mistake)": ["train.py", "--lr", "-1"],
    "eval.py --help": ["eval.py", "--help"],
    "eval.py pretrain --help": ["eval.py", "pretrain", "--help"],
}


def wall_time(argv: list[str], root: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=root, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose scripts run")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--label", default="this tree", help="the name of these figures in --out")
    p.add_argument("--out", type=Path, default=None, help="a JSON file to add the figures to")
    args = p.parse_args()
    figures = {}
    for name, argv in COMMANDS.items():
        times = [wall_time(argv, args.root) for _ in range(args.runs)]
        figures[name] = round(min(times), 3)
        print(f"{name:40s} min {min(times):6.3f} s   max {max(times):6.3f} s")
    if args.out is not None:
        doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
        doc.setdefault("device", cpu_name())
        doc.setdefault("command", "python bench/cli_startup.py --runs 5 (minimum of 5 runs)")
        doc.setdefault("runs", {})[args.label] = {
            "date": date.today().isoformat(),
            "tree": str(args.root),
            "seconds": figures,
        }
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
