"""Shared by the end-to-end tests: the scripts as modules, a tiny model's flags, and where the
session's tiny checkpoints are (conftest.py trains them)."""

import importlib
import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A model small enough to train for an epoch on the CPU in about a second.
TINY = [
    "--num_layers", "2", "--hidden_size", "32", "--num_heads", "2", "--intermediate_size", "64",
    "--max_seq_len", "48", "--batch_size", "8", "--num_samples", "96", "--num_workers", "0",
]  # fmt: skip


@cache
def load_script(file: str) -> ModuleType:
    """train.py or eval.py as a module (loaded once), so tests call ``main`` in-process."""
    spec = importlib.util.spec_from_file_location(f"helm_{Path(file).stem}_script", ROOT / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_checkpoint(tiny_runs: Path, mode: str) -> Path:
    """last.pt of the session's tiny ``mode`` run (fixture ``tiny_runs``)."""
    return tiny_runs / mode / "checkpoints" / "last.pt"


def require(package: str) -> ModuleType:
    """``package`` imported; the calling test (or module) skips only when it is not installed.

    Unlike ``pytest.importorskip``, an installed package that fails to import (a shadowed name, a
    broken dependency) is an error, not a skip: the peer tests must run wherever their peers exist.
    """
    if importlib.util.find_spec(package.partition(".")[0]) is None:
        pytest.skip(f"{package} is not installed", allow_module_level=True)
    return importlib.import_module(package)
