"""bench/reproduce_paper.py at CPU smoke scale: five pretraining variants and the untrained control
on a corpus cleaned of the downstream sequences, probed with the baselines over three splits; one
table, one results file with the spread, and the figures."""

import json

import pytest
import torch
from helpers import load_script

from helm.downstream import ProbeResult


@pytest.fixture
def one_thread():
    """Tiny models train far faster on one thread of a busy 2-core box than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reproduce_paper_smoke(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("HELM_CACHE_DIR", str(tmp_path / "cache"))
    reproduce = load_script("bench/reproduce_paper.py")
    out = tmp_path / "paper"
    assert reproduce.main(["--scale", "smoke", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "280 records kept, 20 dropped as downstream sequences" in report
    rows = [
        line.split(" | ")[0].strip("| ") for line in report.splitlines() if line.startswith("| ")
    ]
    assert rows[1:] == ["xe", "hxe_0.2", "hxe_0.4", "hxe_0.6", "hxe_0.2_random_tree",
                        "random_init", "codon_freq", "onehot_textcnn"]  # fmt: skip
    assert "gc_window (spearman)" in report
    doc = json.loads((out / "results.json").read_text())
    assert doc["command"].startswith("python bench/reproduce_paper.py --scale smoke")
    assert doc["date"] and doc["device"]
    assert {r["method"] for r in doc["rows"]} == set(rows[1:])
    for row in doc["rows"]:  # every figure with its spread over three splits
        assert row["task"] == "gc_window" and row["metric"] == "spearman"
        assert row["n_splits"] >= 3 and row["n_runs"] >= 3 and row["sd"] is not None
    by_method = {r["method"]: r for r in doc["rows"]}
    assert by_method["codon_freq"]["mean"] >= 0.4  # the target is a function of what it reads
    assert "first 138 nt" in by_method["xe"]["input"]
    test = json.loads((out / "xe" / "seed0" / "gc_window.json").read_text())
    assert test["duplicates"]["test_records"] == 3 * 105  # three splits of 700 records
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    svg = (out / "report.svg").read_text()
    assert svg.startswith("<svg") and "hxe_0.2_random_tree" in svg and "random_init" in svg
    assert reproduce.normalise("augaaauaa") == "ATGAAA"  # U -> T, final stop dropped
    assert reproduce.window_nt(["--mode", "mlm", "--max_seq_len", "48"]) == 138


def test_training_seeds_pool_into_one_row():
    reproduce = load_script("bench/reproduce_paper.py")
    one = ProbeResult("m", "regression", "spearman", [0.5, 0.7, 0.6], {}, [], num_splits=3)
    two = ProbeResult("m", "regression", "spearman", [0.4, 0.5, 0.6], {}, [], num_splits=3)
    pooled = reproduce.pool([one, two], "xe")
    assert pooled.method == "xe" and pooled.values == [0.5, 0.7, 0.6, 0.4, 0.5, 0.6]
    (row,) = reproduce.result_rows({"t": {"xe": pooled}}, train_seeds=2)
    assert row["n_runs"] == 6 and row["n_splits"] == 3 and row["n_train_seeds"] == 2
    assert row["mean"] == pytest.approx(0.55) and row["sd"] == pytest.approx(pooled.std)
