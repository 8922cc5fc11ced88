"""bench/gpu_suite.py: refuses at once without CUDA, plans within a short allocation, turns the
steps' files into one table, and packs what each step measured into $OUT as it goes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_exits_at_once_with_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "bench/gpu_suite.py"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert out.stdout == "" and out.stderr.strip().count("\n") == 0
    assert "needs a CUDA device" in out.stderr


def test_figures_compare_every_result_with_its_target(tmp_path):
    suite = load_script("bench/gpu_suite.py")
    (tmp_path / "pytest_gpu.log").write_text("...\n==== 20 passed, 3 skipped in 80.1s ====\n")
    loss_rows = [
        {"shape": "128x444", "Vp": 72, "loss": "hxe", "impl": impl, "ms": ms}
        for impl, ms in (
            ("cross_entropy", 0.1),
            ("eager", 1.0),
            ("compiled", 0.2),
            ("kernel", 0.05),
        )
    ]
    (tmp_path / "bench_path_loss_1.json").write_text(json.dumps({"rows": loss_rows}))
    conv_rows = [
        {"mode": "causal", "L": 444, "dtype": "bf16", "impl": "triton", "speedup": 3.5},
        {"mode": "two-sided", "L": 1024, "dtype": "bf16", "impl": "triton", "speedup": 1.5},
        {"mode": "causal", "L": 444, "dtype": "bf16", "impl": "torch", "speedup": 1.0},
    ]
    (tmp_path / "fftconv-H100-1.json").write_text(json.dumps({"rows": conv_rows}))
    train = {"rows": [{"case": "gpt2_mlm", "model": "gpt2", "tokens_per_s": 1e6, "mfu": 0.45}]}
    (tmp_path / "train_compile.json").write_text(json.dumps(train))

    met = {r["figure"]: r["met"] for r in suite.figures(tmp_path)}
    assert met["pytest -m gpu"] is True
    assert met["hxe 128x444 Vp=72: kernel / F.cross_entropy"] is True
    assert met["hxe 128x444 Vp=72: eager / kernel"] is True
    assert met["hxe 128x444 Vp=72: compiled / kernel"] is True
    assert met["fftconv causal L=444 bf16: torch.fft / kernel"] is True
    assert met["fftconv two-sided L=1024 bf16: torch.fft / kernel"] is False
    assert met["gpt2_mlm --compile MFU"] is True
    assert met["gpt2_mlm compile tokens/s"] is None
    text = suite.table(
        [{"step": "pytest_gpu", "status": "ok", "seconds": 1.0}], suite.figures(tmp_path)
    )
    assert "| fftconv two-sided L=1024 bf16: torch.fft / kernel | 1.5 | >= 2.0 | NO |" in text


def test_plan_answers_without_a_gpu_and_fits_a_short_allocation():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "bench/gpu_suite.py", "--plan"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    names = [s["name"] for s in plan["steps"]]
    assert sum(s["limit_s"] for s in plan["steps"]) <= 420
    assert all(s["limit_s"] > 0 for s in plan["steps"])
    # The most important figures first: MFU, then the losses, fftconv, the Mamba scans.
    assert names[:4] == ["train_compile", "bench_path_loss", "bench_fftconv", "bench_scan"]
    suite = load_script("bench/gpu_suite.py")
    assert {s.name for s in suite.steps(ROOT)} == set(names)
    assert all(s.command[0] == sys.executable for s in suite.steps(ROOT))


def _append_rows(name: str, rows: list[dict]) -> str:
    """Python source appending ``rows`` to the suite folder's row log ``name`` (argv[1])."""
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    return f"import sys; open(sys.argv[1] + '/{name}', 'a').write({lines!r})"


def test_a_mocked_cuda_run_packs_every_case_into_out_as_it_goes(tmp_path, monkeypatch):
    """With CUDA mocked, fake steps (one finishes, one is cut off by its limit after measuring a
    case, one is past the budget): $OUT holds at most 4 files at every moment, among them
    everything measured, also what the cut-off step finished before its limit."""
    suite = load_script("bench/gpu_suite.py")
    work, packed = tmp_path / "work", tmp_path / "OUT"
    loss_rows = [{"shape": "128x444", "Vp": 72, "loss": "hxe", "impl": impl, "ms": ms}
                 for impl, ms in (("cross_entropy", 0.1), ("eager", 1.0), ("compiled", 0.2),
                                  ("kernel", 0.05))]  # fmt: skip
    conv_row = {"mode": "causal", "L": 444, "dtype": "bf16", "impl": "triton", "speedup": 3.5}
    watch = (
        "import os, shutil, sys, time; time.sleep(1.5); "
        "shutil.copy(os.environ['OUT'] + '/summary.json', sys.argv[1] + '/seen.json'); "
        "sys.stdout.write(str(sorted(os.listdir(os.environ['OUT'])))); time.sleep(60)"
    )
    fake = [
        suite.Step("bench_path_loss", [sys.executable, "-c", _append_rows(
            "bench_path_loss.jsonl", loss_rows), str(work)], 30),
        suite.Step("bench_fftconv", [sys.executable, "-c", _append_rows(
            "bench_fftconv.jsonl", [conv_row]) + "; " + watch, str(work)], 4),
        suite.Step("pytest_gpu", [sys.executable, "-c", "pass"], 30),
    ]  # fmt: skip
    monkeypatch.setattr(suite, "steps", lambda out: fake)
    monkeypatch.setattr(suite, "TICK_S", 0.5)
    monkeypatch.setattr(suite, "MIN_STEP_S", 5)
    monkeypatch.setattr(suite, "environment", lambda: {"gpu": "mock", "date": "today"})
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setenv("OUT", str(packed))
    code = suite.main(["--out", str(work), "--budget-s", "8"])

    assert code == 1  # a step timed out, one was not run
    assert sorted(os.listdir(packed)) == ["gpu.tgz", "summary.json", "summary.md"]
    summary = json.loads((packed / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["bench_path_loss"] == "ok"
    assert status["bench_fftconv"].startswith("timed out")
    assert status["pytest_gpu"] == "not run: out of budget"
    met = {r["figure"]: r["met"] for r in summary["figures"]}
    assert met["hxe 128x444 Vp=72: kernel / F.cross_entropy"] is True
    assert met["fftconv causal L=444 bf16: torch.fft / kernel"] is True  # from the cut-off step
    # While the second step ran, $OUT already held the first step's figures and its own status.
    seen = json.loads((work / "seen.json").read_text())
    assert {s["step"]: s["status"] for s in seen["steps"]}["bench_fftconv"] == "running"
    assert "['gpu.tgz', 'summary.json', 'summary.md']" in (work / "bench_fftconv.log").read_text()
    with tarfile.open(packed / "gpu.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"env.json", "bench_path_loss.jsonl", "bench_fftconv.jsonl", "bench_fftconv.log",
            "summary.json", "summary.md"} <= names  # fmt: skip
