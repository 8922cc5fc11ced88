"""The GPU suite: one command that checks and measures HELM on one CUDA device.

    python bench/gpu_suite.py [--budget-s 450]

In order, each step a subprocess with its own time limit (and none started past the budget):

1. the environment: GPU, driver, CUDA, torch, triton, numpy, python, git commit, date;
2. ``pytest -m gpu``: the kernel and fast-path tests on compiled kernels (no TRITON_INTERPRET);
3. ``helm/kernels/bench/bench_path_loss.py``: the HXE-family losses against F.cross_entropy, the eager
   reference and torch.compile(reference), bf16, N = 128 x 444 and 8 x 8192, Vp = 72;
4. ``helm/kernels/bench/bench_fftconv.py``: fftconv forward + backward against torch.fft, bf16,
   B = 64, H = 768, L = 444 and 1024, causal and two-sided;
5. ``bench/train_throughput.py``: the GPT-2 and Hyena MLM recipes (50M, L = 444, batch 128, bf16),
   eager, then ``--compile``.

Everything goes to ``bench/results/gpu-<date>/`` (env.json, one log per step, the benchmarks' own
CSV/JSON files, summary.json, summary.md), and one table of every figure against its target is
printed at the end. Sizes and repetitions are kept small so that a fresh H100, compiles included,
finishes in about 7 minutes; a step that runs out of time is recorded as such and the suite goes
on. Without CUDA it exits at once with status 2 and one line saying so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# Targets of the suite (one H100, bf16).
XE_RATIO_MAX = 1.1  # loss kernel time / F.cross_entropy time, forward + backward
EAGER_SPEEDUP_MIN = 5.0  # eager reference time / kernel time
COMPILED_SPEEDUP_MIN = 1.0  # torch.compile(reference) time / kernel time (strictly faster)
FFTCONV_SPEEDUP_MIN = {444: 3.0, 1024: 2.0}  # torch.fft reference time / kernel time
GPT2_MFU_MIN = 0.40  # GPT-2 50M MLM with --compile


def steps(out: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of each step, in order of priority."""
    train = [PY, "bench/train_throughput.py", "--preset", "recipes", "--cases", "gpt2_mlm",
             "hyena_mlm", "--warmup", "3", "--steps", "5", "--repeats", "3"]  # fmt: skip
    return [
        (
            "pytest_gpu",
            [
                PY,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "tests/test_path_loss.py",
                "tests/test_fftconv.py",
                "tests/test_mamba.py",
                f"--junitxml={out / 'pytest_gpu.xml'}",
            ],
            170,
        ),  # fmt: skip
        (
            "bench_path_loss",
            [
                PY,
                "-m",
                "helm.kernels.bench.bench_path_loss",
                "--vp",
                "72",
                "--warmup",
                "5",
                "--rep",
                "30",
                "--out-dir",
                str(out),
            ],
            100,
        ),  # fmt: skip
        (
            "bench_fftconv",
            [
                PY,
                "-m",
                "helm.kernels.bench.bench_fftconv",
                "--lengths",
                "444",
                "1024",
                "--dtypes",
                "bf16",
                "--warmup",
                "5",
                "--rep",
                "30",
                "--out-dir",
                str(out),
            ],
            130,
        ),  # fmt: skip
        ("train_eager", [*train, "--out", str(out / "train_eager.json")], 70),
        ("train_compile", [*train, "--compile", "--out", str(out / "train_compile.json")], 140),
    ]


def _run(cmd: list[str], timeout: float | None = 30) -> str:
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable ({err.__class__.__name__})"


def environment() -> dict:
    import numpy
    import torch
    import triton

    smi = "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader"
    return {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "nvidia_smi": _run(smi.split()),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "commit": _run(["git", "rev-parse", "HEAD"]),
        "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_step(name: str, cmd: list[str], limit: float, out: Path) -> dict:
    """Run one step with its log in ``out/<name>.log``; its status, exit code and seconds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=limit).returncode  # fmt: skip
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, f"timed out after {limit:.0f} s"
    seconds = round(time.perf_counter() - start, 1)
    print(f"[{name}] {status} in {seconds} s", flush=True)
    return {"step": name, "status": status, "code": code, "seconds": seconds}


def _latest(out: Path, pattern: str) -> dict | None:
    files = sorted(out.glob(pattern))
    return json.loads(files[-1].read_text()) if files else None


def figures(out: Path) -> list[dict]:
    """Every measured figure against its target, from the files the steps wrote to ``out``."""
    rows = []

    def add(figure: str, value, target: str, met: bool | None) -> None:
        rows.append({"figure": figure, "value": value, "target": target, "met": met})

    log = out / "pytest_gpu.log"
    if log.exists():
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        failed = re.search(r"(\d+) (failed|error)", tail[0])
        add(
            "pytest -m gpu",
            tail[0].strip("= "),
            "no failure",
            failed is None and "passed" in tail[0],
        )

    loss = _latest(out, "bench_path_loss_*.json")
    if loss:
        cases: dict[tuple, dict] = {}
        for r in loss["rows"]:
            cases.setdefault((r["shape"], r["Vp"], r["loss"]), {})[r["impl"]] = r["ms"]
        for (shape, vp, name), t in cases.items():
            k = t["kernel"]
            ratio = k / t["cross_entropy"]
            add(f"{name} {shape} Vp={vp}: kernel / F.cross_entropy", round(ratio, 3),
                f"<= {XE_RATIO_MAX}", ratio <= XE_RATIO_MAX)  # fmt: skip
            add(f"{name} {shape} Vp={vp}: eager / kernel", round(t["eager"] / k, 2),
                f">= {EAGER_SPEEDUP_MIN}", t["eager"] / k >= EAGER_SPEEDUP_MIN)  # fmt: skip
            add(f"{name} {shape} Vp={vp}: compiled / kernel", round(t["compiled"] / k, 2),
                f"> {COMPILED_SPEEDUP_MIN}", t["compiled"] / k > COMPILED_SPEEDUP_MIN)  # fmt: skip

    conv = _latest(out, "fftconv-*.json")
    if conv:
        for r in conv["rows"]:
            if r["impl"] != "triton" or r["L"] not in FFTCONV_SPEEDUP_MIN:
                continue
            goal = FFTCONV_SPEEDUP_MIN[r["L"]]
            value = r.get("speedup")
            add(f"fftconv {r['mode']} L={r['L']} {r['dtype']}: torch.fft / kernel", value,
                f">= {goal}", None if value is None else value >= goal)  # fmt: skip

    for mode in ("eager", "compile"):
        path = out / f"train_{mode}.json"
        if not path.exists():
            continue
        for r in json.loads(path.read_text())["rows"]:
            tok = round(r["tokens_per_s"])
            mfu = r.get("mfu")
            if r["model"] == "gpt2" and mode == "compile":
                add(f"{r['case']} --compile MFU", None if mfu is None else round(mfu, 3),
                    f">= {GPT2_MFU_MIN}", None if mfu is None else mfu >= GPT2_MFU_MIN)  # fmt: skip
            mfu_note = "" if mfu is None else f", MFU {mfu:.3f}"
            add(f"{r['case']} {mode} tokens/s", f"{tok}{mfu_note}", "recorded", None)
    return rows


def table(steps_run: list[dict], rows: list[dict]) -> str:
    lines = ["| step | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps_run]
    lines += ["", "| figure | value | target | met |", "| --- | --- | --- | --- |"]
    mark = {True: "yes", False: "NO", None: "-"}
    lines += [f"| {r['figure']} | {r['value']} | {r['target']} | {mark[r['met']]} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=450, help="no step starts past this")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/gpu-<date>")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_suite: needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr
        )
        return 2
    start = time.perf_counter()
    out = args.out or REPO / "bench" / "results" / f"gpu-{datetime.datetime.now():%Y%m%d-%H%M}"
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps(env), flush=True)

    done = []
    for name, cmd, limit in steps(out):
        left = args.budget_s - (time.perf_counter() - start)
        if left < 20:
            done.append({"step": name, "status": "not run: out of budget", "code": None,
                         "seconds": 0})  # fmt: skip
            continue
        done.append(run_step(name, cmd, min(limit, left), out))
    rows = figures(out)
    summary = table(done, rows)
    (out / "summary.json").write_text(
        json.dumps({"env": env, "steps": done, "figures": rows}, indent=1) + "\n"
    )
    (out / "summary.md").write_text(f"# GPU suite {env['date']} on {env['gpu']}\n\n{summary}\n")
    print(summary)
    print(f"results in {out} ({time.perf_counter() - start:.0f} s)")
    return 0 if all(s["status"] == "ok" for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
