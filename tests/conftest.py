import os
from pathlib import Path

import torch

# Without CUDA, Triton kernels run on the CPU under the interpreter (set before triton is first
# imported); with CUDA they are compiled, and the `gpu` tests run them on the device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import TINY, load_script  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    """The real data sets beside the checkout; tests that need them skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


# One tiny MLM (with EMA) and one tiny CLM checkpoint, trained once per session and shared by the
# tests of eval.py, fine-tuning and checkpoint loading. Tests must not modify them.
TINY_RUN = [*TINY, "--epochs", "1", "--warmup-epochs", "0", "--sched-on-updates", "--lr", "3e-3"]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> Path:
    """A session folder with its own cache and the runs ``mlm`` (``--model-ema``) and ``clm``;
    ``helpers.tiny_checkpoint(tiny_runs, mode)`` is each run's last.pt."""
    root = tmp_path_factory.mktemp("tiny_runs")
    train = load_script("train.py")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HELM_CACHE_DIR", str(root / "cache"))
        for mode, extra in (("mlm", ["--model-ema"]), ("clm", [])):
            code = train.main([*TINY_RUN, "--mode", mode, "--output", str(root / mode), *extra])
            assert code == 0
    return root


@pytest.fixture
def eval_run(tiny_runs, monkeypatch, capsys):
    """eval.main in-process, with the session's cache: ``eval_run(*argv) -> (code, stdout, stderr)``."""
    evalpy = load_script("eval.py")
    monkeypatch.setenv("HELM_CACHE_DIR", str(tiny_runs / "cache"))
    monkeypatch.delenv("HELM_TRACEBACK", raising=False)

    def _run(*argv):
        capsys.readouterr()
        code = evalpy.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return _run
