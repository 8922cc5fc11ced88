"""The GPU suite: one command that checks and measures HELM on one CUDA device, made for a short
allocation (a fresh machine for 15 minutes, start-up and copying included).

    python bench/gpu_suite.py                # results in bench/results/gpu-<date>/
    OUT=/some/folder python bench/gpu_suite.py   # also packed into $OUT as 3 files
    python bench/gpu_suite.py --plan         # the steps and their limits, as JSON (no GPU needed)

The steps run in order of importance, each a subprocess with its own time limit (the limits add up
to 420 s, and none starts past ``--budget-s``):

1. ``train_compile``: GPT-2 50M MLM recipe (L = 444, batch 128, bf16) with ``--compile``: tokens/s
   and MFU (target 40%);
2. ``bench_path_loss``: the HXE-family losses against F.cross_entropy, the eager reference and
   torch.compile(reference), bf16, N = 128 x 444 and 8 x 8192, Vp = 72 (one compile per loss);
3. ``bench_fftconv``: fftconv forward + backward against torch.fft, bf16, B = 64, H = 768,
   L = 444 and 1024, causal and two-sided;
4. ``bench_scan``: the Triton Mamba-1 and Mamba-2 scans against the PyTorch path (and mamba-ssm
   where installed);
5. ``train_eager``: the GPT-2 MLM, Hyena MLM and Mamba CLM recipes, eager;
6. ``generate_speed``: cached decoding against Hugging Face's cached ``generate``;
7. ``pytest_gpu``: ``pytest -m gpu``, the kernel and fast-path tests on compiled kernels.

Every benchmark appends each case's row to a ``.jsonl`` file as soon as it is measured, so a step
cut off by its limit keeps what it finished. After every step the suite writes env.json, the logs,
the rows, summary.json and summary.md into its folder and, with ``$OUT`` set, packs that folder into
``$OUT/gpu.tgz`` beside ``$OUT/summary.json`` and ``$OUT/summary.md`` (3 files: machines that
return only a few files from one folder get everything). One table of every figure against its
target is printed at the end. Without CUDA it exits at once with status 2 and one line saying so.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BUDGET_S = 420  # what the steps' limits add up to
TICK_S = 20.0  # how often a running step's results so far are packed
MIN_STEP_S = 15.0  # no step starts with less of the budget left

# Targets of the suite (one H100, bf16).
XE_RATIO_MAX = 1.1  # loss kernel time / F.cross_entropy time, forward + backward
EAGER_SPEEDUP_MIN = 5.0  # eager reference time / kernel time
COMPILED_SPEEDUP_MIN = 1.0  # torch.compile(reference) time / kernel time (strictly faster)
FFTCONV_SPEEDUP_MIN = {444: 3.0, 1024: 2.0}  # torch.fft reference time / kernel time
GPT2_MFU_MIN = 0.40  # GPT-2 50M MLM with --compile
SCAN_SPEEDUP_MIN = 10.0  # PyTorch Mamba-1 scan time / Triton scan time
GENERATE_COST_MAX = 1.5  # HELM's cached decoding time / HF's cached generate time, per token


class Step(NamedTuple):
    name: str
    command: list[str]
    limit_s: int


def steps(out: Path) -> list[Step]:
    """Each step in order of importance, with its time limit in seconds."""
    train = [PY, "bench/train_throughput.py", "--preset", "recipes", "--warmup", "3", "--steps",
             "5", "--repeats", "2"]  # fmt: skip
    bench = ["--warmup", "5", "--rep", "30", "--out-dir", str(out)]
    return [
        Step("train_compile", [*train, "--cases", "gpt2_mlm", "--compile",
                               "--out", str(out / "train_compile.json")], 100),  # fmt: skip
        Step("bench_path_loss", [PY, "-m", "helm.kernels.bench.bench_path_loss", "--vp", "72",
                                 *bench], 70),  # fmt: skip
        Step("bench_fftconv", [PY, "-m", "helm.kernels.bench.bench_fftconv", "--lengths", "444",
                               "1024", "--dtypes", "bf16", *bench], 70),  # fmt: skip
        Step("bench_scan", [PY, "-m", "helm.kernels.bench.bench_scan", *bench], 55),
        Step("train_eager", [*train, "--cases", "gpt2_mlm", "hyena_mlm", "mamba_clm",
                             "--out", str(out / "train_eager.json")], 35),  # fmt: skip
        Step("generate_speed", [PY, "bench/generate_speed.py", "--device", "cuda", "--runs", "2",
                                "--out", str(out / "generate_speed.json")], 25),  # fmt: skip
        Step("pytest_gpu", [PY, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                            "tests/test_path_loss.py", "tests/test_fftconv.py",
                            "tests/test_mamba.py", "tests/test_scan_kernels.py",
                            f"--junitxml={out / 'pytest_gpu.xml'}"], 65),
    ]  # fmt: skip


def plan() -> dict:
    return {"steps": [{"name": s.name, "limit_s": s.limit_s} for s in steps(Path("OUT"))]}


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


def run_step(step: Step, limit: float, out: Path, tick=lambda: None) -> dict:
    """Run one step with its log in ``out/<name>.log``; its status, exit code and seconds. A step
    past its limit is stopped with everything it started (its process group). ``tick`` runs every
    ``TICK_S`` seconds meanwhile (the suite packs what is measured so far: a machine taken back
    mid-step still returns the cases it finished)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    start = time.perf_counter()
    with open(out / f"{step.name}.log", "w") as log:
        log.write("$ " + " ".join(step.command) + "\n")
        log.flush()
        proc = subprocess.Popen(step.command, cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        code = None
        while code is None and time.perf_counter() - start < limit:
            try:
                code = proc.wait(timeout=min(TICK_S, limit - (time.perf_counter() - start)))
            except subprocess.TimeoutExpired:
                tick()
        if code is None:
            os.killpg(proc.pid, 9)
            proc.wait()
            status = f"timed out after {limit:.0f} s"
        else:
            status = "ok" if code == 0 else "failed"
    seconds = round(time.perf_counter() - start, 1)
    print(f"[{step.name}] {status} in {seconds} s", flush=True)
    return {"step": step.name, "status": status, "code": code, "seconds": seconds}


def _rows(out: Path, final: str, log: str) -> list[dict]:
    """A benchmark's rows: from its final file when it finished, else from its row log."""
    from helm.kernels.bench.rows import read_rows

    files = sorted(out.glob(final))
    if files:
        return json.loads(files[-1].read_text())["rows"]
    return read_rows(out / log) if (out / log).exists() else []


def figures(out: Path) -> list[dict]:
    """Every measured figure against its target, from the files the steps wrote to ``out``."""
    rows = []

    def add(figure: str, value, target: str, met: bool | None) -> None:
        rows.append({"figure": figure, "value": value, "target": target, "met": met})

    for mode in ("compile", "eager"):
        for r in _rows(out, f"train_{mode}.json", f"train_{mode}.jsonl"):
            tok = round(r["tokens_per_s"])
            mfu = r.get("mfu")
            if r["model"] == "gpt2" and mode == "compile":
                add(f"{r['case']} --compile MFU", None if mfu is None else round(mfu, 3),
                    f">= {GPT2_MFU_MIN}", None if mfu is None else mfu >= GPT2_MFU_MIN)  # fmt: skip
            mfu_note = "" if mfu is None else f", MFU {mfu:.3f}"
            add(f"{r['case']} {mode} tokens/s", f"{tok}{mfu_note}", "recorded", None)

    cases: dict[tuple, dict] = {}
    for r in _rows(out, "bench_path_loss_*.json", "bench_path_loss.jsonl"):
        cases.setdefault((r["shape"], r["Vp"], r["loss"]), {})[r["impl"]] = r["ms"]
    for (shape, vp, name), t in cases.items():
        if len(t) < 4:
            continue
        k = t["kernel"]
        ratio = k / t["cross_entropy"]
        add(f"{name} {shape} Vp={vp}: kernel / F.cross_entropy", round(ratio, 3),
            f"<= {XE_RATIO_MAX}", ratio <= XE_RATIO_MAX)  # fmt: skip
        add(f"{name} {shape} Vp={vp}: eager / kernel", round(t["eager"] / k, 2),
            f">= {EAGER_SPEEDUP_MIN}", t["eager"] / k >= EAGER_SPEEDUP_MIN)  # fmt: skip
        add(f"{name} {shape} Vp={vp}: compiled / kernel", round(t["compiled"] / k, 2),
            f"> {COMPILED_SPEEDUP_MIN}", t["compiled"] / k > COMPILED_SPEEDUP_MIN)  # fmt: skip

    for r in _rows(out, "fftconv-*.json", "bench_fftconv.jsonl"):
        if r["impl"] != "triton" or r["L"] not in FFTCONV_SPEEDUP_MIN:
            continue
        goal = FFTCONV_SPEEDUP_MIN[r["L"]]
        value = r.get("speedup")
        add(f"fftconv {r['mode']} L={r['L']} {r['dtype']}: torch.fft / kernel", value,
            f">= {goal}", None if value is None else value >= goal)  # fmt: skip

    for r in _rows(out, "bench_scan.json", "bench_scan.jsonl"):
        value = r.get("speedup")
        if r.get("impl") != "triton" or value is None:
            continue
        mamba1 = r.get("layer", "mamba") == "mamba"
        add(f"scan {r.get('layer', '')} {r.get('case', '')}: PyTorch / Triton", value,
            f">= {SCAN_SPEEDUP_MIN}" if mamba1 else "recorded",
            value >= SCAN_SPEEDUP_MIN if mamba1 else None)  # fmt: skip

    path = out / "generate_speed.json"
    if path.exists():
        for kind, r in json.loads(path.read_text())["generate"].items():
            cost = r["helm_cost_per_token_vs_hf"]
            add(f"generate {kind}: HELM / HF cached generate, per token "
                f"({r['helm_tokens_per_s']} vs {r['hf_tokens_per_s']} tokens/s)", cost,
                f"<= {GENERATE_COST_MAX}", cost <= GENERATE_COST_MAX)  # fmt: skip

    log = out / "pytest_gpu.log"
    if log.exists():
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        failed = re.search(r"(\d+) (failed|error)", tail[0])
        add("pytest -m gpu", tail[0].strip("= "), "no failure",
            failed is None and "passed" in tail[0])  # fmt: skip
    return rows


def table(steps_run: list[dict], rows: list[dict]) -> str:
    lines = ["| step | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps_run]
    lines += ["", "| figure | value | target | met |", "| --- | --- | --- | --- |"]
    mark = {True: "yes", False: "NO", None: "-"}
    lines += [f"| {r['figure']} | {r['value']} | {r['target']} | {mark[r['met']]} |" for r in rows]
    return "\n".join(lines)


def write_summary(out: Path, env: dict, done: list[dict], packed: Path | None) -> str:
    """summary.json and summary.md in ``out`` and, with ``packed`` (``$OUT``), the whole folder as
    ``gpu.tgz`` beside copies of both summaries; each file replaced whole, never half-written."""
    rows = figures(out)
    summary = table(done, rows)
    files = {
        "summary.json": json.dumps({"env": env, "steps": done, "figures": rows}, indent=1) + "\n",
        "summary.md": f"# GPU suite {env['date']} on {env['gpu']}\n\n{summary}\n",
    }
    for folder in filter(None, (out, packed)):
        for name, text in files.items():
            tmp = folder / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, folder / name)
    if packed is not None:
        tmp = packed / ".gpu.tgz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(out, arcname=out.name)
        os.replace(tmp, packed / "gpu.tgz")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="no step starts past this")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/gpu-<date>")
    p.add_argument("--plan", action="store_true", help="print the steps and their limits, exit")
    args = p.parse_args(argv)
    if args.plan:
        print(json.dumps(plan()))
        return 0

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_suite: needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr
        )
        return 2
    start = time.perf_counter()
    out = args.out or REPO / "bench" / "results" / f"gpu-{datetime.datetime.now():%Y%m%d-%H%M}"
    out.mkdir(parents=True, exist_ok=True)
    packed = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if packed is not None:
        packed.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps(env), flush=True)

    done: list[dict] = []
    summary = write_summary(out, env, done, packed)
    for step in steps(out):
        left = args.budget_s - (time.perf_counter() - start)
        if left < MIN_STEP_S:
            done.append({"step": step.name, "status": "not run: out of budget", "code": None,
                         "seconds": 0})  # fmt: skip
        else:
            running = [*done, {"step": step.name, "status": "running", "code": None, "seconds": 0}]
            tick = functools.partial(write_summary, out, env, running, packed)
            done.append(run_step(step, min(step.limit_s, left), out, tick))
        summary = write_summary(out, env, done, packed)
    print(summary)
    print(f"results in {out}{f' and {packed}' if packed else ''} "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    return 0 if all(s["status"] == "ok" for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
