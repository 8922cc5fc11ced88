"""Hyena's long convolution, forward + backward: torch.fft reference vs torch.compile(reference) vs
the Triton kernel, median time and peak memory. Needs a CUDA device; never run in CI.

    python -m helm.kernels.bench.bench_fftconv                       # B=64, H=768, every L, both modes
    python -m helm.kernels.bench.bench_fftconv --lengths 444 1024 --modes causal --dtypes bf16

Writes a table to stdout and fftconv-<device>-<time>.{csv,json} (with device, versions, date and
command) into --out-dir. ``speedup`` is the reference's time over the row's time at the same dtype;
the goal on an H100 is a speedup >= 2 for the kernel at L = 444 and 1024.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import re
import sys
from pathlib import Path

import torch
import triton
import triton.testing

from helm.kernels.bench.rows import RowLog
from helm.kernels.fftconv import fftconv_triton
from helm.ops.fftconv import fftconv_ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = {"causal": False, "two-sided": True}
IMPLS = ("torch", "compile", "triton")
TARGET_LENGTHS, TARGET_SPEEDUP = (444, 1024), 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=768, help="H, the convolved channels")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 444, 1024, 4096, 8192])
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    return p.parse_args(argv)


def make_inputs(
    B: int, H: int, L: int, bidirectional: bool, dtype: torch.dtype
) -> tuple[list, torch.Tensor]:
    """u, k, D, pregate, postgate on the GPU, all requiring grad, and an upstream gradient."""
    Lk = 2 * L - 1 if bidirectional else L

    def make(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device="cuda")).to(dtype).requires_grad_()

    u, pre, post = make(B, H, L), make(B, H, L), make(B, H, L)
    k, D = make(H, Lk, scale=Lk**-0.5), make(H)
    dy = torch.randn(B, H, L, device="cuda").to(dtype)
    return [u, k, D, pre, post], dy


def measure(fn, inputs: list, dy: torch.Tensor, bidirectional: bool, args) -> tuple[float, float]:
    """(median ms, peak MiB above the inputs) of one forward + backward."""
    u, k, D, pre, post = inputs

    def step():
        fn(u, k, D, pre, post, bidirectional).backward(dy)

    ms = triton.testing.do_bench(
        step, warmup=args.warmup, rep=args.rep, grad_to_none=inputs, return_mode="median"
    )
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in inputs:
        t.grad = None
    return ms, peak


def rel_err(fn, inputs: list, bidirectional: bool) -> float:
    """Norm-relative error of fn's forward output against the reference."""
    with torch.no_grad():
        want = fftconv_ref(*inputs, bidirectional=bidirectional).double()
        got = fn(*inputs, bidirectional=bidirectional).double()
    return ((got - want).norm() / want.norm()).item()


def run(args: argparse.Namespace) -> list[dict]:
    torch._dynamo.config.recompile_limit = 64  # one compiled graph per shape, mode and dtype
    compiled = torch.compile(fftconv_ref)
    impls = {"torch": fftconv_ref, "compile": compiled, "triton": fftconv_triton}
    log = RowLog(args.out_dir, "bench_fftconv")
    rows = []
    for mode in args.modes:
        bidirectional = MODES[mode]
        for L in args.lengths:
            for dname in args.dtypes:
                base_ms = None
                for impl in args.impls:
                    row = {"mode": mode, "L": L, "dtype": dname, "impl": impl,
                           "B": args.batch, "H": args.channels}  # fmt: skip
                    try:
                        inputs, dy = make_inputs(args.batch, args.channels, L, bidirectional,
                                                 DTYPES[dname])  # fmt: skip
                        ms, peak = measure(impls[impl], inputs, dy, bidirectional, args)
                        err = rel_err(impls[impl], inputs, bidirectional)
                        row.update(ms=round(ms, 4), peak_mib=round(peak, 1), rel_err=err)
                    except torch.OutOfMemoryError:
                        row.update(ms=None, peak_mib=None, rel_err=None, note="out of memory")
                    finally:
                        inputs = dy = None
                        torch.cuda.empty_cache()
                    if impl == "torch":
                        base_ms = row["ms"]
                    ok = base_ms is not None and row["ms"] is not None
                    row["speedup"] = round(base_ms / row["ms"], 3) if ok else None
                    if impl == "triton" and L in TARGET_LENGTHS and row["speedup"] is not None:
                        row["target"] = "met" if row["speedup"] >= TARGET_SPEEDUP else "missed"
                    rows.append(row)
                    log.append(row)
                    print(format_row(row), flush=True)
    return rows


COLUMNS = ("mode", "L", "dtype", "impl", "ms", "peak_mib", "speedup", "target", "rel_err")


def format_row(row: dict) -> str:
    def cell(key):
        v = row.get(key)
        if v is None:
            return row.get("note", "-") if key == "ms" else "-"
        return f"{v:.1e}" if key == "rel_err" else str(v)

    return "  ".join(f"{cell(c):>10}" for c in COLUMNS)


def write_results(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    device = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.executable).name, "-m", "helm.kernels.bench.bench_fftconv", *sys.argv[1:]]
        ),  # fmt: skip
        "measure": "forward + backward, triton.testing.do_bench median; peak memory above inputs",
        "speedup": "torch reference time / this row's time, same dtype",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"fftconv-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-')}-{now:%Y%m%d-%H%M%S}"
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    fields = ["mode", "L", "B", "H", "dtype", "impl", "ms", "peak_mib", "speedup", "target",
              "rel_err", "note"]  # fmt: skip
    with csv_path.open("w", newline="") as f:
        for key, value in meta.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fftconv needs a CUDA device; none found, nothing measured or written.")
        return 0
    print(f"fftconv forward+backward on {torch.cuda.get_device_name()}, "
          f"B={args.batch}, H={args.channels}")  # fmt: skip
    print("  ".join(f"{c:>10}" for c in COLUMNS))
    rows = run(args)
    for path in write_results(rows, args.out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
