"""bench/reproduce_paper.py at CPU smoke scale: five pretraining variants on a corpus cleaned of
the downstream sequences, probed with the baselines, one table and one figure."""

from helpers import load_script


def test_reproduce_paper_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HELM_CACHE_DIR", str(tmp_path / "cache"))
    reproduce = load_script("bench/reproduce_paper.py")
    assert reproduce.main(["--scale", "smoke", "--out", str(tmp_path / "paper")]) == 0
    report = (tmp_path / "paper" / "report.md").read_text()
    assert "280 records kept, 20 dropped as downstream sequences" in report
    rows = [
        line.split(" | ")[0].strip("| ") for line in report.splitlines() if line.startswith("| ")
    ]
    assert rows[1:] == ["xe", "hxe_0.2", "hxe_0.4", "hxe_0.6", "hxe_0.2_random_tree",
                        "codon_freq", "onehot_textcnn"]  # fmt: skip
    assert "gc_content (spearman)" in report
    svg = (tmp_path / "paper" / "report.svg").read_text()
    assert svg.startswith("<svg") and "hxe_0.2_random_tree" in svg
    assert reproduce.normalise("augaaauaa") == "ATGAAA"  # U -> T, final stop dropped
