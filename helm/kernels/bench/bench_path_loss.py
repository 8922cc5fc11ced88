"""Microbenchmark: the fused path loss against F.cross_entropy, the eager reference and
torch.compile(reference), forward + backward, on one CUDA device.

    python -m helm.kernels.bench.bench_path_loss [--out-dir bench/results] [--losses xe hxe ...]

For each loss (XE, HXE alpha 0.2, soft labels beta 15, aa_loss_only, aa_loss_add) and each shape
(N = 128 x 444 and 8 x 8192 tokens; V = 69 columns, or padded to Vp = 72) it records the median time
of ``triton.testing.do_bench`` and the peak memory above the inputs, and prints the ratios against
the targets: kernel within 1.1x of F.cross_entropy, >= 5x faster than eager, faster than compiled,
no allocation beyond the gradient. Results go to a CSV and a JSON file (device, versions, date,
command) in ``--out-dir``. Without a CUDA device it says so and exits 0, writing nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch
import torch.nn.functional as F

from helm.kernels.bench.rows import RowLog

LOSSES = ("xe", "hxe", "soft", "aa_only", "aa_add")
SHAPES = {"128x444": 128 * 444, "8x8192": 8 * 8192}
IMPLS = ("cross_entropy", "eager", "compiled", "kernel")
V = 69
DEVICE = "cuda"


_NAMES = {
    "xe": "XE",
    "hxe": "HXE",
    "soft": "soft_labels",
    "aa_only": "aa_loss_only",
    "aa_add": "aa_loss_add",
}


def build_tables(
    loss: str, alpha: float, beta: float, aa_weight: float, device: str
) -> dict[str, torch.Tensor | None]:
    """anc, coef, soft, const of ``path_loss_ref`` for one loss, exactly as the trainer builds them."""
    from helm.hierarchy import build_hierarchy
    from helm.losses.tables import loss_tables

    t = loss_tables(
        _NAMES[loss],
        build_hierarchy("true"),
        hxe_alpha=alpha,
        soft_labels_beta=beta,
        aa_loss_weight=aa_weight,
        vocab_size=V,
        device=device,
    )
    return {"anc": t.anc, "coef": t.coef, "soft": t.soft, "const": t.const}


def measure(step: Callable[[], None], z: torch.Tensor, warmup: int, rep: int) -> tuple[float, int]:
    """Median ms of forward + backward, and peak bytes allocated above what was live before it."""
    import triton.testing

    step()  # compile / autotune outside the measurements
    z.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    z.grad = None
    ms = triton.testing.do_bench(
        step, warmup=warmup, rep=rep, grad_to_none=[z], return_mode="median"
    )
    return float(ms), int(peak)


@functools.cache
def compiled_reference() -> Callable:
    """torch.compile(path_loss_ref), one for every case: the losses' tables differ in shape and
    the rows are marked dynamic, so each loss compiles once (a few graphs under the limit)."""
    from helm.ops.path_loss import path_loss_ref

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(path_loss_ref)


def run_case(loss: str, N: int, Vp: int, args: argparse.Namespace) -> dict[str, dict]:
    from helm.kernels.path_loss import path_loss_triton
    from helm.ops.path_loss import path_loss_ref

    compiled = compiled_reference()
    tables = build_tables(loss, args.alpha, args.beta, args.aa_weight, DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    z = torch.randn(N, Vp, device=DEVICE, dtype=torch.bfloat16, generator=gen).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE, generator=gen)
    # The row count is dynamic: every shape of one loss reuses one compiled graph (a cold
    # Inductor compile per case would cost more than the measurements).
    torch._dynamo.mark_dynamic(z, 0)
    torch._dynamo.mark_dynamic(targets, 0)
    targets[torch.rand(N, device=DEVICE, generator=gen) < args.ignore_frac] = -100
    fns = {
        "cross_entropy": lambda: F.cross_entropy(z[:, :V], targets, ignore_index=-100),
        "eager": lambda: path_loss_ref(z, targets, **tables),
        "compiled": lambda: compiled(z, targets, **tables),
        "kernel": lambda: path_loss_triton(z, targets, **tables),
    }
    out = {}
    for impl, fn in fns.items():
        ms, peak = measure(lambda fn=fn: fn().backward(), z, args.warmup, args.rep)
        out[impl] = {"ms": ms, "peak_bytes": peak}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--vp", nargs="+", type=int, default=[69, 72], help="padded logit columns")
    p.add_argument("--alpha", type=float, default=0.2, help="HXE alpha")
    p.add_argument("--beta", type=float, default=15.0, help="soft-label beta")
    p.add_argument("--aa-weight", type=float, default=1.0, help="aa_loss_add weight")
    p.add_argument("--ignore-frac", type=float, default=0.05, help="share of -100 targets")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetitions (ms)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_path_loss needs a CUDA device; none found, nothing measured or written.")
        return 0
    import triton

    log = RowLog(args.out_dir, "bench_path_loss")
    rows = []
    for shape in args.shapes:
        N = SHAPES[shape]
        for Vp in args.vp:
            for loss in args.losses:
                res = run_case(loss, N, Vp, args)
                grad_bytes = N * Vp * 2  # the bf16 gradient every implementation must return
                k, ce = res["kernel"], res["cross_entropy"]
                for impl in IMPLS:
                    r = res[impl]
                    rows.append(
                        {
                            "loss": loss,
                            "shape": shape,
                            "N": N,
                            "V": V,
                            "Vp": Vp,
                            "impl": impl,
                            "ms": r["ms"],
                            "peak_mb": r["peak_bytes"] / 2**20,
                            "peak_over_grad": r["peak_bytes"] / grad_bytes,
                            "time_vs_cross_entropy": r["ms"] / ce["ms"],
                            "kernel_speedup": r["ms"] / k["ms"],
                        }
                    )
                log.append(*rows[-len(IMPLS) :])
                print(f"done {loss} {shape} Vp={Vp}", flush=True)

    print_table(rows)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "dtype": "bfloat16",
        "targets": (
            "kernel <= 1.1x cross_entropy; eager/kernel >= 5; compiled/kernel > 1; "
            "kernel peak_over_grad <= 1.1"
        ),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"bench_path_loss_{datetime.datetime.now():%Y%m%d_%H%M%S}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(f"{stem}.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {stem}.csv and {stem}.json")
    return 0


def print_table(rows: list[dict]) -> None:
    """One line per (shape, Vp, loss): times, the ratios the targets are stated in, and memory."""
    cases: dict[tuple, dict] = {}
    for r in rows:
        cases.setdefault((r["shape"], r["Vp"], r["loss"]), {})[r["impl"]] = r
    head = (
        f"{'shape':>8} {'Vp':>3} {'loss':>8} | {'xe ms':>7} {'eager':>7} {'compil':>7} "
        f"{'kernel':>7} | {'k/xe':>5} {'eag/k':>6} {'cmp/k':>6} | {'peak/grad':>9} "
        f"{'(xe)':>5} {'(eager)':>7}"
    )
    print(head)
    print("-" * len(head))
    for (shape, Vp, loss), c in cases.items():
        k = c["kernel"]
        mark = lambda ok: " " if ok else "!"
        r_ce = k["ms"] / c["cross_entropy"]["ms"]
        r_eager = c["eager"]["ms"] / k["ms"]
        r_comp = c["compiled"]["ms"] / k["ms"]
        print(
            f"{shape:>8} {Vp:>3} {loss:>8} | {c['cross_entropy']['ms']:7.3f} "
            f"{c['eager']['ms']:7.3f} {c['compiled']['ms']:7.3f} {k['ms']:7.3f} | "
            f"{r_ce:5.2f}{mark(r_ce <= 1.1)}{r_eager:6.1f}{mark(r_eager >= 5)}"
            f"{r_comp:6.2f}{mark(r_comp > 1)}| {k['peak_over_grad']:8.2f}"
            f"{mark(k['peak_over_grad'] <= 1.1)}"
            f" {c['cross_entropy']['peak_over_grad']:5.2f} {c['eager']['peak_over_grad']:7.2f}"
        )
    print(
        "ratios: k/xe = kernel / F.cross_entropy time (target <= 1.1); eag/k and cmp/k = speedup "
        "over eager (>= 5) and compiled (> 1); peak/grad = peak bytes / gradient bytes "
        "(kernel target <= 1.1). '!' marks a missed target."
    )


if __name__ == "__main__":
    sys.exit(main())
