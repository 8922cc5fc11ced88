"""What a new user's environment gets: no import name of HELM's shadows a dependency, the scripts
answer --help and flag mistakes without importing torch, a failing test never hangs the suite, and
CI installs and tests exactly as README says."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, require

HEAVY = ("torch", "transformers", "triton")


def run(*args: str, cwd: Path = ROOT, timeout: float = 300, **env: str):
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def test_transformers_model_classes_import_beside_helm_from_the_repo_root():
    # The scripts and pytest put the repo root first on sys.path: a top-level package of ours named
    # like a dependency (HF's `kernels`, which transformers imports) would be found first.
    require("transformers")
    require("triton")
    code = textwrap.dedent(
        """
        import helm, helm.kernels.fftconv, helm.kernels.path_loss
        from helm.hf import load_model
        import transformers
        from transformers import (BertForMaskedLM, GPT2LMHeadModel, Mamba2ForCausalLM,
                                  MambaForCausalLM)
        # Building a model reaches transformers' hub-kernel integration (the `kernels` package).
        config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=12)
        GPT2LMHeadModel(config)
        print("ok", transformers.__version__)
        """
    )
    result = run("-c", code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


def test_the_wheel_installs_no_name_another_distribution_provides(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path / "source"
    for name in ("setup.py", "pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "helm", source / "helm", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("helm_mrna-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {n.split("/")[0].removesuffix(".py") for n in zf.namelist()}
    tops = {t for t in tops if not t.endswith((".dist-info", ".data"))}
    assert tops == {"helm"}
    owners = importlib.metadata.packages_distributions()
    for name in tops:
        others = [d for d in owners.get(name, []) if d.lower().replace("_", "-") != "helm-mrna"]
        assert not others, f"the import name {name!r} is also provided by {others}"


@pytest.mark.parametrize(
    "argv",
    [
        ["train.py", "--help"],
        ["train.py", "--lr", "-1"],  # a bad value: one error line
        ["train.py", "--nmu_layers", "2"],  # a typo: one line with a suggestion
        ["eval.py", "--help"],
        ["eval.py", "pretrain", "--help"],
        ["eval.py", "pretrain", "missing.pt", "--file", "x.fa"],  # a bad path: one line
        ["eval.py", "generate", "x.pt", "--nmu", "2"],
    ],
)
def test_help_and_argument_errors_import_no_torch(argv):
    result = run("-X", "importtime", *argv, timeout=120)
    assert result.returncode in (0, 2)
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line
    }
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not heavy, f"{' '.join(argv)} imported {heavy[:5]}"
    if result.returncode == 2:
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, result.stderr


def test_a_failing_test_in_a_loop_over_loader_workers_ends_the_suite(tmp_path):
    # Workers ignore SIGINT/SIGTERM (the trainer stops them itself); a failed test keeps its loader
    # iterator alive until exit, where multiprocessing ends the workers with SIGTERM and waits.
    (tmp_path / "test_loop.py").write_text(
        textwrap.dedent(
            """
            from helm.data.sampler import LengthBucketSampler, build_dataloader

            class Items:
                def __len__(self):
                    return 4

                def __getitem__(self, i):
                    return i

            def test_fails_inside_the_loop():
                sampler = LengthBucketSampler([1, 1, 1, 1], 1, shuffle=False)
                loader = build_dataloader(Items(), sampler, num_workers=2, collate_fn=min)
                for item in loader:
                    assert item < 0
            """
        )
    )
    result = run(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_loop.py",
        cwd=tmp_path, timeout=120, PYTHONPATH=str(ROOT),
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    assert "1 failed" in result.stdout


def readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_ci_installs_and_tests_with_readme_commands_in_a_fresh_venv():
    quick = [line.split("#")[0].strip() for line in readme_block("Quick start").splitlines()]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m venv" in ci
    install = [c for c in quick if c.startswith("pip install torch")]
    tests = [c for c in quick if "pytest" in c]
    assert len(install) == 1 and len(tests) == 1
    ci_lines = [line.strip() for line in ci.splitlines()]
    assert install[0] in ci_lines and tests[0] in ci_lines
