"""bench/gpu_suite.py: refuses at once without CUDA, and turns the steps' files into one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def test_steps_have_time_limits_within_the_budget(tmp_path):
    suite = load_script("bench/gpu_suite.py")
    limits = [limit for _, _, limit in suite.steps(tmp_path)]
    assert len(limits) == 5 and all(limit > 0 for limit in limits)
    assert sum(limits) <= 8 * 60 * 1.5  # and --budget-s stops starting steps at 450 s
