"""Mamba's scans, forward and forward + backward in bf16: HELM's Triton kernels against the PyTorch
path (``helm.ops``) and, where importable, mamba-ssm's kernels. Median time (``do_bench``), peak
memory and the forward's error against the PyTorch path. Needs a CUDA device; never run in CI.

    python -m helm.kernels.bench.bench_scan --out-dir DIR [--warmup MS --rep MS]

Shapes of the mamba_clm recipe (configs/mamba_clm.yaml): batch 128, L = 444, d_model 256, so
d_inner 512 and d_state 16; Mamba-2 with headdim 64 (8 heads), one group, chunks of 64. The
inputs are laid out as the mixers hand them over (dt, z, B and C strided views of projections).
Each case's row is appended to DIR/bench_scan.jsonl as soon as it is measured (a run cut short
keeps what it measured); DIR/bench_scan.json gets every row with the device, versions, date and
command at the end. ``speedup`` is the PyTorch path's time over the row's; the goal on an H100 is
>= 10 for the Mamba-1 scan.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from helm.kernels.bench.rows import RowLog

TARGET_SPEEDUP = 10.0  # Mamba-1, Triton over the PyTorch scan
DEVICE = "cuda"
PROG = f"{Path(sys.executable).name} -m helm.kernels.bench.bench_scan"
LAYERS = ("mamba", "mamba2")
MODES = ("fwd+bwd", "fwd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--length", type=int, default=444)
    p.add_argument("--d-inner", type=int, default=512, help="expand * d_model")
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--headdim", type=int, default=64, help="Mamba-2")
    p.add_argument("--chunk-size", type=int, default=64, help="Mamba-2")
    p.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS))
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    return p.parse_args(argv)


def mamba1_case(args: argparse.Namespace) -> tuple[list[torch.Tensor], dict]:
    """selective_scan's inputs as MambaMixer passes them under bf16 autocast."""
    B, L, D, N = args.batch, args.length, args.d_inner, args.d_state
    R = -(-D // 32)  # dt_rank = ceil(d_model / 16) with d_inner = 2 d_model
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=DEVICE, generator=g) * scale

    xz = randn(B, L, 2 * D).bfloat16().transpose(1, 2)  # in_proj output, (B, 2D, L) view
    dbc = randn(B, L, R + 2 * N).bfloat16()  # x_proj output
    u = xz[:, :D].contiguous()  # the conv's output is contiguous
    delta = randn(B, L, D, scale=0.5).bfloat16().transpose(1, 2)  # dt_proj output, (B, D, L) view
    A = -torch.arange(1, N + 1, device=DEVICE, dtype=torch.float32).repeat(D, 1)  # S4D-real
    Bm, Cm = dbc[..., R : R + N].transpose(1, 2), dbc[..., R + N :].transpose(1, 2)
    D_, bias = torch.ones(D, device=DEVICE), randn(D, scale=0.5) - 4.0  # dt ~ softplus(-4 +- ..)
    inputs = [u, delta, A, Bm, Cm, D_, xz[:, D:], bias]  # views of leaves are leaves
    return [t.requires_grad_() for t in inputs], dict(delta_softplus=True)


def mamba2_case(args: argparse.Namespace) -> tuple[list[torch.Tensor], dict]:
    """ssd_chunk_scan's inputs as Mamba2Mixer passes them under bf16 autocast (z is applied by
    the mixer's gated norm, outside the scan)."""
    B, L, D, N, P = args.batch, args.length, args.d_inner, args.d_state, args.headdim
    H = D // P
    g = torch.Generator(device=DEVICE).manual_seed(0)
    xbc = torch.randn(B, L, D + 2 * N, device=DEVICE, generator=g).bfloat16()  # conv output
    x = xbc[..., :D].unflatten(-1, (H, P))
    Bm, Cm = xbc[..., D : D + N].unflatten(-1, (1, N)), xbc[..., D + N :].unflatten(-1, (1, N))
    dt = torch.randn(B, L, H, device=DEVICE, generator=g).bfloat16()
    A = -torch.linspace(1, 16, H, device=DEVICE)
    D_, bias = torch.ones(H, device=DEVICE), torch.full((H,), -4.0, device=DEVICE)
    inputs = [x, dt, A, Bm, Cm, D_, bias]
    return [t.requires_grad_() for t in inputs], dict(chunk_size=args.chunk_size, dt_softplus=True)


def implementations(layer: str) -> dict[str, Callable]:
    """impl name -> f(*inputs, **kwargs) through ``helm.ops``, for the implementations importable
    here: the PyTorch path, the Triton kernels and mamba-ssm's."""
    from helm.ops.selective_scan import mamba_ssm_available, selective_scan, ssd_chunk_scan

    def call(impl: str) -> Callable:
        def mamba1(u, delta, A, B, C, D, z, bias, **kw):
            return selective_scan(u, delta, A, B, C, D, z, bias, impl=impl, **kw)

        def mamba2(x, dt, A, B, C, D, bias, **kw):
            return ssd_chunk_scan(x, dt, A, B, C, D=D, dt_bias=bias, impl=impl, **kw)

        return mamba1 if layer == "mamba" else mamba2

    names = ["torch", "triton"] + (["mamba_ssm"] if mamba_ssm_available(layer) else [])
    return {name: call(name) for name in names}


def measure(fn: Callable, inputs: list, kwargs: dict, backward: bool, args) -> tuple[float, float]:
    """(median ms, peak MiB above the inputs) of one forward (+ backward)."""
    import triton.testing

    leaves = [t for t in inputs if t.is_leaf and t.requires_grad]
    dy = torch.randn_like(fn(*inputs, **kwargs))

    def step():
        y = fn(*inputs, **kwargs)
        if backward:
            y.backward(dy)

    ms = triton.testing.do_bench(step, warmup=args.warmup, rep=args.rep, grad_to_none=leaves,
                                 return_mode="median")  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in leaves:
        t.grad = None
    return ms, peak


def rel_err(fn: Callable, ref: Callable, inputs: list, kwargs: dict) -> float:
    """Norm-relative error of fn's forward output against the PyTorch path's."""
    with torch.no_grad():
        want = ref(*inputs, **kwargs).double()
        got = fn(*inputs, **kwargs).double()
    return ((got - want).norm() / want.norm()).item()


def run(args: argparse.Namespace, log: RowLog, meta: dict) -> list[dict]:
    rows = []
    for layer in args.layers:
        inputs, kwargs = (mamba1_case if layer == "mamba" else mamba2_case)(args)
        impls = implementations(layer)
        for mode in MODES:
            base_ms = None
            for impl, fn in impls.items():
                row = {"layer": layer, "case": mode, "impl": impl, "dtype": "bf16",
                       "batch": args.batch, "L": args.length, "d_inner": args.d_inner,
                       "d_state": args.d_state, "device": meta["device"]}  # fmt: skip
                if layer == "mamba2":
                    row.update(headdim=args.headdim, chunk_size=args.chunk_size)
                try:
                    ms, peak = measure(fn, inputs, kwargs, mode == "fwd+bwd", args)
                    err = 0.0 if impl == "torch" else rel_err(fn, impls["torch"], inputs, kwargs)
                    row.update(ms=round(ms, 4), peak_mib=round(peak, 1), rel_err=err)
                except torch.OutOfMemoryError:
                    row.update(ms=None, peak_mib=None, rel_err=None, note="out of memory")
                torch.cuda.empty_cache()
                if impl == "torch":
                    base_ms = row["ms"]
                ok = base_ms is not None and row["ms"] is not None
                row["speedup"] = round(base_ms / row["ms"], 3) if ok else None
                if layer == "mamba" and impl == "triton" and row["speedup"] is not None:
                    row["target"] = "met" if row["speedup"] >= TARGET_SPEEDUP else "missed"
                rows.append(row)
                log.append(row)
                print(format_row(row), flush=True)
    return rows


COLUMNS = ("layer", "case", "impl", "ms", "peak_mib", "speedup", "target", "rel_err")


def format_row(row: dict) -> str:
    def cell(key):
        v = row.get(key)
        if v is None:
            return row.get("note", "-") if key == "ms" else "-"
        return f"{v:.1e}" if key == "rel_err" else str(v)

    return "  ".join(f"{cell(c):>10}" for c in COLUMNS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_scan needs a CUDA device; none found, nothing measured or written.")
        return 2
    import triton

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([PROG, *(sys.argv[1:] if argv is None else argv)]),
        "measure": "triton.testing.do_bench median; peak memory above the inputs; bf16 inputs "
        "laid out as the Mamba mixers pass them",
        "speedup": "PyTorch path (helm.ops, impl='torch') time / this row's time",
    }
    log = RowLog(args.out_dir, "bench_scan")
    print(f"Mamba scans on {meta['device']}: batch {args.batch}, L {args.length}, d_inner "
          f"{args.d_inner}, d_state {args.d_state}")  # fmt: skip
    print("  ".join(f"{c:>10}" for c in COLUMNS))
    rows = run(args, log, meta)
    path = args.out_dir / "bench_scan.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path} and {log.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
