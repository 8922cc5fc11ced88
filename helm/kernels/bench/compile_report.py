"""Every autotune config of the fftconv kernels compiled ahead of time for an H100 (sm_90), on any
machine (no GPU needed): registers, spills, shared memory and the MMA instruction each config gets.

    python -m helm.kernels.bench.compile_report --out bench/results/compile_sm90_triton3.9.json
    PYTHONPATH=/path/to/triton36 python -m helm.kernels.bench.compile_report --out ...

A config that spills (ptxas "spill stores"), needs more shared memory than an H100 block may use
(227 KB) or falls back from wgmma to mma.sync is a wasted compile at autotune time, or a slow
kernel; the kernels' ``early_config_prune`` hooks drop what this report shows to be such for the
Triton version and dtype in use. Run it with each Triton version a supported image ships.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the full autotune lists, compiled for the GPU

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from helm.kernels import fftconv  # noqa: E402

SM90 = GPUTarget("cuda", 90, 64)
SM90_SMEM_BYTES = 227 * 1024  # the most shared memory one block may use on an H100
KERNELS = ("_fftconv_fwd_kernel", "_fftconv_bwd_dx_kernel", "_fftconv_bwd_dk_kernel")
FP32_POINTERS = ("k_ptr", "dk_ptr")  # the filter and its gradient are fp32 whatever the data
DTYPES = {"bf16": ("*bf16", tl.bfloat16, None), "fp32": ("*fp32", tl.float32, "tf32x3")}


def ptxas_usage(ptx: str) -> dict:
    """Registers and spill bytes that ptxas reports for ``ptx`` (sm_90a)."""
    ptxas = get_ptxas(SM90.arch).path  # the ptxas this Triton compiles sm_90 with
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", f"{tmp}/k.cubin"],
                             capture_output=True, text=True, check=True)  # fmt: skip
    text = out.stdout + out.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else None  # noqa: E731
    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
    }


def compile_config(name: str, dtype: str, config: triton.Config, bidirectional: bool) -> dict:
    kernel = getattr(fftconv, name)
    jit = kernel.fn
    data_ptr, op_dtype, precision = DTYPES[dtype]
    constexprs = dict(HAS_PRE=True, HAS_POST=True, BIDIR=bidirectional, OP_DTYPE=op_dtype,
                      EMULATE_DOT=False, PRECISION=precision, **config.kwargs)  # fmt: skip
    signature = {}
    for arg in jit.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in FP32_POINTERS else data_ptr
        else:
            signature[arg] = "i32"
    src = ASTSource(fn=jit, signature=signature,
                    constexprs={(jit.arg_names.index(k),): v for k, v in constexprs.items()})  # fmt: skip
    row = {"kernel": name, "dtype": dtype, "bidirectional": bidirectional, **config.kwargs,
           "num_warps": config.num_warps, "num_stages": config.num_stages}  # fmt: skip
    try:
        compiled = triton.compile(src, target=SM90, options={"num_warps": config.num_warps,
                                                             "num_stages": config.num_stages})  # fmt: skip
    except Exception as err:  # a config the compiler refuses is a finding, not a crash
        return row | {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    ptx = compiled.asm["ptx"]
    shared = compiled.metadata.shared
    usage = ptxas_usage(ptx)
    return (
        row
        | usage
        | {
            "shared_bytes": shared,
            "fits_shared": shared <= SM90_SMEM_BYTES,
            "mma": "wgmma"
            if "wgmma.mma_async" in ptx
            else "mma.sync"
            if "mma.sync" in ptx
            else "none",
            "wasted": bool(usage["spill_stores"]) or shared > SM90_SMEM_BYTES,
        }
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    args = p.parse_args(argv)
    rows = []
    for name in KERNELS:
        for dtype in args.dtypes:
            for config in getattr(fftconv, name).configs:
                row = compile_config(name, dtype, config, bidirectional=False)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "triton": triton.__version__,
        "target": "cuda sm_90 (H100), compiled ahead of time without a GPU",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, "-m", __spec__.name, *sys.argv[1:]]),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
