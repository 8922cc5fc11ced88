"""Downstream evaluation (helm.downstream): registry and fetching, loading, splits, metrics, heads,
the probing protocol, baselines and the report. No test touches the network."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import shutil
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from helm.data.io import DataError
from helm.downstream import (
    TASKS,
    Grid,
    OneHotEncoder,
    RunStore,
    TaskSpec,
    TextCNN,
    codon_frequency_features,
    compute_metrics,
    dedupe,
    duplicate_groups,
    duplicate_warnings,
    duplicates,
    evaluate_probe,
    fetch_task,
    format_report,
    label_warnings,
    load_fasta_folder,
    load_task,
    load_task_file,
    make_splits,
    pad_features,
    protocol,
    repeated_splits,
    resolve_duplicates,
    run_baselines,
    select_at_best_val,
    to_json,
    transform_targets,
    write_figure,
)
from helm.downstream.checks import duplicates_text
from helm.downstream.metrics import auroc, f1_macro, mcc
from helm.downstream.tasks import CODONBERT_COMMIT, TaskData
from helm.embed import cached_token_features, read_records
from helm.errors import ConfigError
from helm.vocab import kmers

LOCAL = {
    "mrfp_expression": "codonbert_mrfp_expression",
    "cov_vaccine_degradation": "codonbert_cov_vaccine_degradation",
    "tc_riboswitches": "codonbert_tc_riboswitches",
    "mlos": "codonbert_mlos",
}


@pytest.fixture(autouse=True)
def one_thread():
    """The heads here are tiny: one thread avoids intra-op contention on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- registry and fetching --------------------------------------------------------------------


def test_registry_entries():
    assert {"ecoli_proteins", "fungal_expression", "mrna_stability", *LOCAL} <= set(TASKS)
    for name, spec in TASKS.items():
        assert spec.name == name
        assert spec.url.endswith(
            f"{CODONBERT_COMMIT}/benchmarks/CodonBERT/data/fine-tune/{spec.file_name}"
        )
        assert spec.task in ("regression", "classification", "multilabel")
        assert (spec.sha256 is None) == (name not in LOCAL)
    assert TASKS["mlos"].split_column is None and TASKS["mlos"].sequence_column == "CDS"
    assert TASKS["ecoli_proteins"].task == "classification"
    assert not TASKS["tc_riboswitches"].coding and TASKS["mrfp_expression"].coding


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_checksums_match_local_files_in_both_layouts(shared_data, tmp_path, name):
    spec = TASKS[name]
    nested = shared_data / LOCAL[name] / spec.file_name
    assert sha(nested) == spec.sha256
    assert fetch_task(name, data_dir=shared_data) == nested
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(nested, flat / spec.file_name)
    assert fetch_task(name, data_dir=flat, cache_dir=tmp_path / "cache") == flat / spec.file_name


def test_fetch_uses_env_data_dir_and_rejects_a_modified_copy(tmp_path, monkeypatch):
    spec = TaskSpec("toy", "toy.csv", sha256=None, task="regression", metric="spearman",
                    coding=True, description="", url="file:///nonexistent")  # fmt: skip
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "toy.csv").write_text("Sequence,Value\nATG,1\n")
    monkeypatch.setenv("HELM_DATA_DIR", str(tmp_path))
    assert fetch_task(spec) == tmp_path / "sub" / "toy.csv"
    pinned = TaskSpec(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(DataError, match="expected 0{64}, got [0-9a-f]{64}"):
        fetch_task(pinned)
    assert (tmp_path / "sub" / "toy.csv").exists()  # a user's copy is never deleted


def _served(tmp_path: Path, text: str, sha256: str | None) -> TaskSpec:
    src = tmp_path / "remote" / "toy.csv"
    src.parent.mkdir(exist_ok=True)
    src.write_text(text)
    return TaskSpec("toy", "toy.csv", sha256, "regression", "spearman", True, "", url=src.as_uri())


def test_download_verifies_and_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("HELM_DATA_DIR", raising=False)
    text = "Sequence,Value\nATGAAA,1.5\n"
    spec = _served(tmp_path, text, hashlib.sha256(text.encode()).hexdigest())
    cache = tmp_path / "cache"
    path = fetch_task(spec, cache_dir=cache)
    assert path == cache / "toy.csv" and path.read_text() == text
    assert sorted(p.name for p in cache.iterdir()) == ["toy.csv"]  # no temp file left behind
    (tmp_path / "remote" / "toy.csv").unlink()
    assert fetch_task(spec, cache_dir=cache) == path  # served from the cache


def test_download_checksum_mismatch_deletes_and_names_both(tmp_path, monkeypatch):
    monkeypatch.delenv("HELM_DATA_DIR", raising=False)
    spec = _served(tmp_path, "Sequence,Value\nATG,1\n", "a" * 64)
    actual = sha(tmp_path / "remote" / "toy.csv")
    with pytest.raises(DataError, match=f"expected a{{64}}, got {actual}"):
        fetch_task(spec, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_unpinned_download_records_its_hash(tmp_path, monkeypatch):
    monkeypatch.delenv("HELM_DATA_DIR", raising=False)
    spec = _served(tmp_path, "Sequence,Value\nATG,1\n", None)
    cache = tmp_path / "cache"
    path = fetch_task(spec, cache_dir=cache)
    assert (cache / "toy.csv.sha256").read_text().strip() == sha(path)
    path.write_text("tampered")
    with pytest.raises(DataError, match="sha256 mismatch"):
        fetch_task(spec, cache_dir=cache)


def test_network_failure_says_to_pass_data_dir(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.delenv("HELM_DATA_DIR", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="--data_dir") as err:
        fetch_task("tc_riboswitches", cache_dir=tmp_path)
    assert "Tc-Riboswitches.csv" in str(err.value) and list(tmp_path.iterdir()) == []


# ---- loading ----------------------------------------------------------------------------------

ROWS = [
    ("AUGAAA", "1.5", "a", "train"),
    ("atgccc", "2.5", "b", "val"),
    ("ATGGGG", "-1", "a", "test"),
]


def _table(sep: str) -> str:
    lines = [sep.join(("id", "Sequence", "Value", "Split"))]
    lines += [sep.join((f"r{i}", s, v, split)) for i, (s, v, _, split) in enumerate(ROWS)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "name, sep, given",
    [("d.csv", ",", None), ("d.tsv", "\t", None), ("d.txt", ";", None), ("d.psv", "|", "|"),
     ("d.csv.gz", ",", None), ("d.dat", ";", None)],
)  # fmt: skip
def test_load_tables(tmp_path, name, sep, given):
    path = tmp_path / name
    text = _table(sep)
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    fmt = "table" if name.endswith(".txt") else None  # .txt alone means one sequence a line
    data = load_task_file(path, target_columns="Value", split_column="Split", sep=given, fmt=fmt)
    assert data.sequences == ["ATGAAA", "ATGCCC", "ATGGGG"]  # cleaned: U -> T, upper case
    np.testing.assert_allclose(data.targets, [1.5, 2.5, -1.0])
    assert data.splits.tolist() == ["train", "val", "test"] and data.num_outputs == 1


def test_load_fasta_header_labels_and_side_file(tmp_path):
    fa = tmp_path / "d.fa"
    fa.write_text(">s1 label=0.5 split=train\nATGA\nAA\n>s2|2.0\nATGCCC\n")
    data = load_task_file(fa, target_columns="label", pipe_label=True)
    assert data.sequences == ["ATGAAA", "ATGCCC"] and data.ids == ["s1", "s2"]
    np.testing.assert_allclose(data.targets, [0.5, 2.0])

    fa.write_text(">s1 some text\nATGAAA\n>s2\nATGCCC\n>s3\nATGTTT\n")
    side = tmp_path / "labels.tsv"
    side.write_text("id\tclass\ts2_unused\ns2\thigh\tx\ns1\tlow\tx\ns3\thigh\tx\n")
    data = load_task_file(fa, target_columns="class", task="classification", label_file=side)
    assert data.label_names == ["high", "low"] and data.targets.tolist() == [1, 0, 0]
    side.write_text("id\tclass\ns1\tlow\n")
    with pytest.raises(DataError, match="'s2' not in"):
        load_task_file(fa, target_columns="class", task="classification", label_file=side)


def test_classification_and_multilabel_encoding(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("Sequence,Value,Tags\nATG,2.0,x;y\nATG,10,\nATG,1,y\nATG,2,x\n")
    data = load_task_file(path, task="classification")
    assert data.label_names == ["1", "2", "10"]  # numeric order; "2.0" and "2" are one class
    assert data.targets.tolist() == [1, 2, 0, 1]
    data = load_task_file(path, target_columns="Tags", task="multilabel")
    assert data.label_names == ["x", "y"]
    np.testing.assert_array_equal(data.targets, [[1, 1], [0, 0], [0, 1], [1, 0]])


def test_clear_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("Seq,Value\nATG,1\n")
    with pytest.raises(
        DataError, match=r"no column\(s\) \['Sequence'\]; the header has \['Seq', 'Value'\]"
    ):
        load_task_file(path)
    path.write_text("Sequence,Value\nATG,1\nATG,high\nATXG,2\n,3\n")
    with pytest.raises(DataError) as err:
        load_task_file(path)
    msg = str(err.value)
    assert f"{path}:3: non-numeric target: 'high'" in msg
    assert f"{path}:4: invalid character" in msg and f"{path}:5: empty" in msg
    data = load_task_file(path, on_invalid="skip")
    assert len(data) == 1 and data.report.num_invalid == 3


# ---- splits -----------------------------------------------------------------------------------


def _toy(n: int, groups=None) -> TaskData:
    return TaskData(["ATG"] * n, np.arange(n, dtype=float), "regression", ["Value"], groups=groups)


def test_random_splits_deterministic_disjoint_sized():
    data = _toy(100)
    (a,), (b,), (c,) = (
        make_splits(data, seed=3),
        make_splits(data, seed=3),
        make_splits(data, seed=4),
    )
    assert (len(a.train), len(a.val), len(a.test)) == (70, 15, 15)
    assert np.array_equal(a.test, b.test) and not np.array_equal(a.test, c.test)
    assert np.array_equal(np.sort(np.concatenate([a.train, a.val, a.test])), np.arange(100))


def test_kfold_groups_never_straddle():
    groups = np.repeat(np.arange(20), np.arange(1, 21) % 4 + 1)
    data = _toy(len(groups), groups=groups)
    folds = make_splits(data, kfold=5, seed=0)
    assert len(folds) == 5
    tests = np.concatenate([f.test for f in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(groups)))  # each record tested once
    for f in folds:
        assert set(groups[f.train]).isdisjoint(groups[f.test])
        assert set(groups[f.val]).isdisjoint(groups[f.test]) and set(groups[f.val]).isdisjoint(
            groups[f.train]
        )
    again = make_splits(data, kfold=5, seed=0)
    assert all(np.array_equal(x.test, y.test) for x, y in zip(folds, again))
    (rand,) = make_splits(data, seed=1)  # random fractions respect groups too
    assert set(groups[rand.train]).isdisjoint(groups[rand.test])


# ---- selection and metrics --------------------------------------------------------------------


def test_select_at_best_val():
    val = [0.1, 0.3, 0.5, 0.7, 0.6, 0.65]
    test = [
        0.0,
        0.2,
        0.4,
        0.5,
        0.6,
        0.9,
    ]  # test peaks later than val: the answer is test at val's peak
    assert select_at_best_val(val, test, "max") == (3, 0.5)
    assert select_at_best_val([float("nan"), 0.2, 0.2], [9.0, 1.0, 2.0]) == (1, 1.0)
    assert select_at_best_val([3.0, 1.0, 2.0], [0.0, 5.0, 6.0], "min") == (1, 5.0)


def test_regression_metrics_against_scipy():
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=50), rng.normal(size=50)
    m = compute_metrics("regression", y, p)
    assert m["spearman"] == pytest.approx(stats.spearmanr(p, y)[0])
    assert m["pearson"] == pytest.approx(stats.pearsonr(p, y)[0])
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((y - p) ** 2)))
    assert m["r2"] == pytest.approx(1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))
    assert np.isnan(compute_metrics("regression", y, np.ones(50))["spearman"])


def _brute_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean(
        [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)]
    )


def test_classification_metrics_by_hand():
    y, pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    assert f1_macro(y, pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert mcc(y, pred) == pytest.approx(12 / np.sqrt(22 * 24))
    assert mcc(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])) == pytest.approx(2 / np.sqrt(12))
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.5, 0.5, 0.9])) == pytest.approx(0.875)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=40)
    scores = rng.integers(0, 4, size=(40, 3)).astype(float)  # many ties
    m = compute_metrics("classification", labels, scores)
    ovr = np.mean([_brute_auroc((labels == k).astype(int), scores[:, k]) for k in range(3)])
    assert m["auroc"] == pytest.approx(ovr)
    assert m["accuracy"] == pytest.approx(np.mean(scores.argmax(1) == labels))
    binary = compute_metrics("classification", labels % 2, scores[:, :2])
    assert binary["auroc"] == pytest.approx(_brute_auroc(labels % 2, scores[:, 1]))
    ml = compute_metrics(
        "multilabel",
        np.array([[1, 0], [0, 0], [1, 1]]),
        np.array([[0.9, 0.2], [0.1, 0.3], [0.8, 0.1]]),
    )
    assert ml["auroc/0"] == 1.0 and ml["auroc/1"] == 0.0 and ml["auroc_mean"] == 0.5


def test_auroc_of_nan_scores_is_nan():
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.1, np.nan, 0.3, 0.8, 0.9])
    assert np.isnan(auroc(y, s))
    scores = np.tile(s[:, None], (1, 3))
    scores[:, 0] = [0.5, 0.1, 0.2, 0.3, 0.4]  # one class's column is finite, another's is not
    assert np.isnan(compute_metrics("classification", np.array([0, 1, 2, 1, 0]), scores)["auroc"])
    assert np.isnan(
        compute_metrics("multilabel", np.stack([y, 1 - y], 1), scores[:, :2])["auroc_mean"]
    )


# ---- heads ------------------------------------------------------------------------------------


def test_textcnn_shapes_and_padding_invariance():
    torch.manual_seed(0)
    model = TextCNN(8, 3).eval()
    feats = [
        np.random.default_rng(i).normal(size=(t, 8)).astype(np.float32)
        for i, t in enumerate((1, 4, 9))
    ]
    x, mask = pad_features(feats)
    assert x.shape == (3, 9, 8) and mask.sum(1).tolist() == [1, 4, 9]
    out = model(x, mask)
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    alone = torch.cat([model(*pad_features([f])) for f in feats])
    torch.testing.assert_close(out, alone)
    x_junk = torch.cat([x, torch.randn(3, 5, 8)], dim=1)  # more padding, filled with garbage
    x_junk[:, :9][~mask] = 100.0
    mask_junk = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(x_junk, mask_junk), out)


def test_onehot_and_codon_frequencies():
    (onehot,) = OneHotEncoder()(["AAAAACTTTNAAGG"])  # AAA AAC TTT NAA, then a partial codon
    assert onehot.shape == (4, 65) and onehot.argmax(1).tolist() == [0, 1, 63, 64]
    freq = codon_frequency_features(["AAAAAATTTNAA"])
    assert (
        freq.shape == (1, 64)
        and freq[0, 0] == pytest.approx(2 / 3)
        and freq[0, 63] == pytest.approx(1 / 3)
    )


# ---- protocol and baselines -------------------------------------------------------------------


def _synthetic(n: int = 120, d: int = 6, seed: int = 0):
    """Per-token features = a per-sequence vector + noise; the target is linear in their mean."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    feats = [
        (z[i] + 0.1 * rng.normal(size=(rng.integers(4, 12), d))).astype(np.float32)
        for i in range(n)
    ]
    w = rng.normal(size=d)
    y = np.stack([f.mean(0) for f in feats]) @ w
    codons = ["".join(rng.choice(list("ACGT"), size=3 * 10)) for _ in range(n)]
    return feats, TaskData(codons, y, "regression", ["Value"])


def test_evaluate_probe_learns_a_linear_target():
    feats, data = _synthetic()
    splits = make_splits(data, seed=0)
    result = evaluate_probe(feats, data, splits, grid=Grid(lrs=(3e-3,), batch_sizes=(16,), seeds=(0,), max_epochs=25, patience=8), progress=False)  # fmt: skip
    assert result.metric == "spearman" and len(result.values) == 1
    assert result.mean > 0.8, result
    assert result.chosen == [{"split": splits[0].name, "lr": 3e-3, "batch_size": 16}]
    linear = evaluate_probe(feats, data, splits, head="linear")
    assert linear.mean > 0.95 and "alpha" in linear.chosen[0]
    untrained = evaluate_probe(feats, data, splits, grid=Grid(lrs=(1e-9,), batch_sizes=(16,), seeds=(0,), max_epochs=1), progress=False)  # fmt: skip
    assert untrained.mean < result.mean  # the score reflects training, not the harness


def test_linear_probe_classification():
    feats, data = _synthetic(seed=1)
    labels = (data.targets > np.median(data.targets)).astype(np.int64)
    cls = TaskData(data.sequences, labels, "classification", ["lo", "hi"])
    result = evaluate_probe(feats, cls, make_splits(cls, seed=0), head="linear")
    assert result.metric == "accuracy" and result.mean > 0.8
    assert "auroc" in result.test_metrics and "l2" in result.chosen[0]


def test_baselines_on_a_tiny_task():
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACGT"), size=60)) for _ in range(100)]
    codons = [[s[i : i + 3] for i in range(0, 60, 3)] for s in seqs]
    y = np.array([c.count("GCC") - c.count("AAA") + 0.1 * rng.normal() for c in codons])
    data = TaskData(seqs, y, "regression", ["Value"])
    results = run_baselines(data, make_splits(data, seed=0), grid=Grid(lrs=(1e-3,), batch_sizes=(16,), seeds=(0, 1), max_epochs=3, patience=2), progress=False)  # fmt: skip
    assert set(results) == {"onehot_textcnn", "codon_freq"}
    assert len(results["onehot_textcnn"].values) == 2 and len(results["codon_freq"].values) == 1
    assert results["codon_freq"].mean > 0.5  # codon counts carry the target
    report = format_report(results, {"name": "toy", "coding": False})
    assert "| onehot_textcnn |" in report and "3-mers" in report
    doc = json.loads(to_json(results, "toy"))
    assert doc["results"]["codon_freq"]["mean"] == pytest.approx(results["codon_freq"].mean)


def test_tc_riboswitches_loads_with_splits_and_runs(shared_data):
    data = load_task("tc_riboswitches", data_dir=shared_data)
    assert len(data) == 355 and data.task == "regression"
    (split,) = make_splits(data)
    assert (len(split.train), len(split.val), len(split.test)) == (248, 53, 54)
    assert all(set(s) <= set("ACGT") for s in data.sequences)
    results = run_baselines(data, [split], grid=Grid(lrs=(1e-3,), batch_sizes=(64,), seeds=(0,), max_epochs=2, patience=2), progress=False)  # fmt: skip
    assert all(np.isfinite(r.mean) for r in results.values())
    assert "3-mers" in format_report(results, TASKS["tc_riboswitches"])


def test_mlos_has_no_split_column_and_gets_a_random_split(shared_data):
    data = load_task("mlos", data_dir=shared_data)
    assert len(data) == 167 and data.splits is None
    (split,) = make_splits(data, seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (117, 25, 25)


# ---- a harness a reader can trust -------------------------------------------------------------


def test_baselines_read_what_the_probe_reads():
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACGT"), size=n)) for n in rng.integers(30, 120, size=60)]
    data = TaskData(seqs, rng.normal(size=60), "regression", ["Value"])
    extent = [min(len(s) - len(s) % 3, 45) for s in seqs]  # a model window of 15 codons
    results = run_baselines(data, make_splits(data), methods=("codon_freq",), extent=extent)
    cut = sum(len(s) - len(s) % 3 > 45 for s in seqs)
    assert results["codon_freq"].input == f"first 45 nt (15 codons); {cut} of 60 records cut"
    whole = run_baselines(data, make_splits(data), methods=("codon_freq",))["codon_freq"]
    assert whole.input == "whole records" and whole.values != results["codon_freq"].values
    report = format_report(results, "toy")
    assert "| input |" in report and "first 45 nt" in report


def test_spread_is_over_repeated_splits_with_ddof_1():
    feats, data = _synthetic(n=60)
    data.targets = data.targets + np.random.default_rng(1).normal(size=60)  # imperfect fits
    splits = repeated_splits(data, [0, 1, 2])
    assert len(splits) == 3 and len({tuple(s.test) for s in splits}) == 3
    result = evaluate_probe(feats, data, splits, head="linear")
    assert result.num_splits == 3 and len(result.values) == 3
    assert result.std == pytest.approx(np.std(result.values, ddof=1)) and result.std > 0
    assert "3 (3 splits)" in format_report({"linear": result}, "toy")
    # A fixed split column gives one split whatever the seeds; one run has no spread (nan).
    fixed = TaskData(data.sequences, data.targets, "regression", ["Value"],
                     splits=np.array(["train", "train", "val", "test"] * 15))  # fmt: skip
    (split,) = repeated_splits(fixed, [0, 1, 2])
    one = evaluate_probe(feats, fixed, [split], head="linear")
    assert np.isnan(one.std) and json.loads(to_json({"l": one}))["results"]["l"]["std"] is None


def test_textcnn_probe_not_far_below_a_linear_probe_on_unscaled_features():
    # Informative features as hidden states come: offsets and scales differing by orders of
    # magnitude between dimensions. Unstandardised, the TextCNN reached 0.72 against 0.97.
    rng = np.random.default_rng(0)
    n, d = 160, 16
    z = rng.normal(size=(n, d))
    scale, offset = np.exp(rng.normal(0, 2, size=d)), rng.normal(0, 20, size=d)
    feats = [((z[i] + 0.3 * rng.normal(size=(rng.integers(6, 14), d))) * scale + offset)
             .astype(np.float32) for i in range(n)]  # fmt: skip
    data = TaskData(["ATG"] * n, z @ rng.normal(size=d), "regression", ["Value"])
    splits = make_splits(data, seed=0)
    linear = evaluate_probe(feats, data, splits, head="linear")
    cnn = evaluate_probe(feats, data, splits, grid=Grid(lrs=(3e-4,), batch_sizes=(16,), seeds=(0,), max_epochs=20, patience=5), progress=False)  # fmt: skip
    assert linear.mean > 0.9 and cnn.mean > linear.mean - 0.1, (cnn.mean, linear.mean)


def test_default_split_without_a_split_column():
    (split,) = make_splits(_toy(100))  # no fractions given: 0.7 / 0.15 / 0.15
    assert (len(split.train), len(split.val), len(split.test)) == (70, 15, 15)
    (split,) = make_splits(_toy(100), None, seed=1)
    assert len(split.test) == 15


def test_val_carved_from_train_of_a_train_test_split_column():
    n = 40
    groups = np.repeat(np.arange(20), 2)
    data = TaskData(["ATG"] * n, np.arange(n, dtype=float), "regression", ["Value"],
                    splits=np.array(["train"] * 30 + ["test"] * 10), groups=groups)  # fmt: skip
    with pytest.raises(DataError, match="no \\['val'\\] records; carve .* --val-from-train"):
        make_splits(data)
    (a,) = make_splits(data, val_from_train=0.2, seed=0)
    (b,) = make_splits(data, val_from_train=0.2, seed=1)
    assert len(a.val) == 6 and len(a.train) == 24 and np.array_equal(a.test, np.arange(30, 40))
    assert not set(groups[a.val]) & set(groups[a.train])  # whole groups move to val
    assert not np.array_equal(a.val, b.val) and "val 0.2 of train" in a.name


def test_target_transform(tmp_path):
    data = TaskData(["ATG"] * 3, np.array([1.0, 10.0, 100.0]), "regression", ["Value"],
                    ids=["a", "b", "c"], source="t.csv")  # fmt: skip
    np.testing.assert_allclose(transform_targets(data, "log").targets, np.log([1, 10, 100]))
    np.testing.assert_allclose(transform_targets(data, "log1p").targets, np.log1p([1, 10, 100]))
    assert transform_targets(data, "none") is data
    zero = TaskData(["ATG"] * 2, np.array([0.0, 5.0]), "regression", ["Value"], ids=["z", "f"])
    with pytest.raises(DataError, match="log needs targets > 0; 1 record.*first: z.*log1p"):
        transform_targets(zero, "log")
    assert transform_targets(zero, "log1p").targets[0] == 0.0


def test_fasta_folder_labels_from_file_names(tmp_path):
    for split, k in (("train", 4), ("test", 2)):
        for label in ("ecoli", "human"):
            (tmp_path / split).mkdir(exist_ok=True)
            path = tmp_path / split / f"{label}.fa"
            path.write_text("".join(f">lcl|NC_{label}_{split}{i}.1_cds [gene=x]\n"
                                    f"ATGAAA{'CCC' if i % 2 else 'GGG'}\n"
                                    for i in range(k)))  # fmt: skip
    data = load_fasta_folder(tmp_path)
    assert data.task == "classification" and data.label_names == ["ecoli", "human"]
    assert data.ids[0] == "lcl|NC_ecoli_train0.1_cds"  # the whole first word, no label from it
    assert sorted(set(data.splits)) == ["test", "train"] and len(data) == 12
    (split,) = make_splits(data, val_from_train=0.25)
    assert len(split.val) == 2 and len(split.test) == 4
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.fasta").write_text(">x\nATG\n")
    (flat / "b.fa.gz").write_bytes(gzip.compress(b">y\nATG\n"))
    data = load_fasta_folder(flat)
    assert data.label_names == ["a", "b"] and data.splits is None
    with pytest.raises(DataError, match="is a folder"):
        load_task_file(flat)


def test_ncbi_headers_keep_their_id_and_give_no_label(tmp_path):
    fa = tmp_path / "d.fa"
    fa.write_text(">lcl|NC_000913.3_cds_1 [gene=thrL] label=0.5\nATGAAA\n"
                  ">lcl|NC_000913.3_cds_2 label=1.5\nATGCCC\n")  # fmt: skip
    data = load_task_file(fa, target_columns="label")
    assert data.ids == ["lcl|NC_000913.3_cds_1", "lcl|NC_000913.3_cds_2"]
    np.testing.assert_allclose(data.targets, [0.5, 1.5])
    fa.write_text(">lcl|NC_000913.3_cds_1\nATGAAA\n")
    with pytest.raises(DataError, match="missing field"):  # the accession is not a label
        load_task_file(fa, target_columns="label", task="classification")


def test_multilabel_reports_label_names_and_warns_on_rare_labels():
    rng = np.random.default_rng(0)
    n = 80
    y = np.stack([rng.random(n) < 0.5, np.zeros(n, bool), rng.random(n) < 0.5], 1).astype(float)
    y[:3, 1] = 1  # "nucleus" has 3 positives in all: too few to score in any split
    data = TaskData(["ATG"] * n, y, "multilabel", ["cytosol", "nucleus", "membrane"])
    feats = [rng.normal(size=(3, 4)).astype(np.float32) + y[i, 0] for i in range(n)]
    splits = make_splits(data)
    result = evaluate_probe(feats, data, splits, head="linear")
    assert "auroc/cytosol" in result.test_metrics and "auroc/0" not in result.test_metrics
    report = format_report({"linear": result}, "loc", label_warnings(data, splits))
    assert "| method | auroc/cytosol | auroc/membrane | auroc/nucleus |" in report
    assert "label 'nucleus' has" in report and "positives in the test split" in report


def test_identical_sequences_across_splits_warned_and_dropped():
    seqs = [f"ATG{c}" for c in kmers(3)[:40]]
    seqs[30:34] = seqs[0:4]  # four test records repeat training records
    data = TaskData(seqs, np.arange(40.0), "regression", ["Value"],
                    splits=np.array(["train"] * 20 + ["val"] * 10 + ["test"] * 10))  # fmt: skip
    (split,) = make_splits(data)
    assert duplicates(data, split) == {"val_in_train": 0, "test_in_train": 4, "test_in_val": 0}
    (line,) = duplicate_warnings(data, [split])
    assert "4 of 10 test records are in train" in line and "--duplicates drop" in line
    kept = dedupe(data, split)
    assert len(kept.test) == 6 and not set(kept.test) & set(range(30, 34))
    assert duplicates(data, kept) == {"val_in_train": 0, "test_in_train": 0, "test_in_val": 0}


def test_onehot_baseline_on_100kb_records_reads_the_models_window():
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACGTN"), size=100_001)) for _ in range(24)]
    index = {c: i for i, c in enumerate(kmers(3))}
    ids = OneHotEncoder().codon_ids(seqs[0])  # vectorised, equal to the codon-by-codon reading
    assert ids.tolist() == [index.get(seqs[0][i : i + 3], 64) for i in range(0, 99_999, 3)]
    data = TaskData(seqs, rng.normal(size=24), "regression", ["Value"])
    start = time.perf_counter()
    (result,) = run_baselines(data, make_splits(data), methods=("onehot_textcnn",), grid=Grid(lrs=(1e-3,), batch_sizes=(8,), seeds=(0,), max_epochs=1), progress=False,
                              extent=[3 * 510] * 24).values()  # fmt: skip
    assert time.perf_counter() - start < 10 and result.input.startswith("first 1530 nt")


def test_feature_cache_hit_gives_writable_arrays(tmp_path):
    feats = [np.ones((3, 4), np.float32), np.zeros((2, 4), np.float32)]
    cached_token_features("k", lambda: feats, tmp_path)
    hit = cached_token_features("k", lambda: pytest.fail("recomputed"), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "The given NumPy array is not writable"
        tensors = [torch.as_tensor(f) for f in hit]
    assert [t.shape for t in tensors] == [(3, 4), (2, 4)]
    hit[0][0, 0] = 5  # copy-on-write: the cache file is untouched
    assert cached_token_features("k", lambda: None, tmp_path)[0][0, 0] == 1


def test_embed_ids_from_a_table_column(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("name,seq\ngeneA,ATGAAA\ngeneB,ATGCCC\n")
    assert read_records(path, "seq")[0] == ["1", "2"]
    ids, seqs = read_records(path, "seq", id_column="name")
    assert ids == ["geneA", "geneB"] and seqs == ["ATGAAA", "ATGCCC"]


def test_run_store_resumes_an_interrupted_grid(tmp_path, caplog, monkeypatch):
    feats, data = _synthetic(n=60)
    splits = make_splits(data)
    kw = dict(
        grid=Grid(lrs=(3e-3, 1e-3), batch_sizes=(16,), seeds=(0, 1), max_epochs=3, patience=2)
    )
    trained, stop_after = [], [3]
    real = protocol._train_textcnn

    def counted(*args, **kwargs):
        if len(trained) == stop_after[0]:
            raise KeyboardInterrupt  # Ctrl-C during the fourth run
        trained.append(args[3:6])  # (lr, batch_size, seed)
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "_train_textcnn", counted)
    path = tmp_path / "r.runs.jsonl"
    with caplog.at_level("INFO", logger="helm"), pytest.raises(KeyboardInterrupt):
        evaluate_probe(feats, data, splits, store=RunStore(path, {"input": "x"}), **kw)
    assert "[2/4, " in caplog.text and "left]" in caplog.text  # progress with an estimate
    assert len(RunStore(path, {"input": "x"})) == 3  # every finished run was kept
    with open(path, "a") as f:
        f.write('{"key": "cut sho')  # a line cut short by a kill is ignored
    trained.clear()
    stop_after[0] = 99
    caplog.clear()
    with caplog.at_level("INFO", logger="helm"):
        resumed = evaluate_probe(feats, data, splits, store=RunStore(path, {"input": "x"}), **kw)
    assert trained == [(1e-3, 16, 1)]  # only the run that was interrupted is trained again
    assert caplog.text.count("(stored)") == 3 and "[4/4, " in caplog.text
    fresh = evaluate_probe(feats, data, splits, **kw)
    assert resumed.values == pytest.approx(fresh.values) and resumed.chosen == fresh.chosen
    other = RunStore(path, {"input": "changed"})  # another context: nothing matches
    assert len(other) == 4 and all(other.get(d["settings"]) is None for d in other.runs.values())


def test_svg_figure_of_methods_by_tasks(tmp_path):
    feats, data = _synthetic(n=60)
    res = evaluate_probe(feats, data, repeated_splits(data, [0, 1]), head="linear")
    one = evaluate_probe(feats, data, make_splits(data), head="linear", method="other")
    path = write_figure({"task_a": {"linear": res, "other": one}, "task_b": {"linear": res}},
                        tmp_path / "f.svg", title="demo")  # fmt: skip
    svg = path.read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("<rect x=") >= 3 + 2  # three bars, two legend keys
    assert "task_a" in svg and "task_b" in svg and "spearman" in svg
    assert svg.count('stroke="black"') == 2  # error bars only where there are 2+ runs


# ---- duplicates, regions, fold columns --------------------------------------------------------


def _planted(n: int = 60, pairs: int = 12, splits=None) -> TaskData:
    """`n` distinct records, then `pairs` more that repeat the first `pairs` exactly."""
    seqs = ["ATG" + "".join(c) for c in itertools.islice(itertools.product(kmers(3), repeat=2), n)]
    seqs += seqs[:pairs]
    return TaskData(seqs, np.arange(len(seqs), dtype=float), "regression", ["Value"],
                    splits=splits)  # fmt: skip


def _straddling(data: TaskData, splits, keys=None) -> int:
    """Sequences (or keys) found on both sides of any pair of parts, over all splits."""
    keys = data.codon_sequences() if keys is None else keys
    return sum(
        len({keys[i] for i in a} & {keys[i] for i in b})
        for s in splits
        for a, b in ((s.train, s.val), (s.train, s.test), (s.val, s.test))
    )


def test_random_splits_group_planted_duplicates_by_default():
    data = _planted()
    split_with = lambda d: repeated_splits(d, [0, 1, 2])  # noqa: E731
    seen = [len(s) for s in data.sequences]
    splits, dup = resolve_duplicates(data, split_with, None, fixed=False, carved=False, seen=seen)
    assert dup["policy"] == "group" and dup["train_test_before"] > 0
    assert dup["train_test_after"] == 0 and _straddling(data, splits) == 0
    assert _straddling(data, split_with(data)) > 0  # the plain splits do straddle
    kept, dup = resolve_duplicates(data, split_with, "keep", fixed=False, carved=False, seen=seen)
    assert dup["train_test_after"] == dup["train_test_before"] > 0
    folds, _ = resolve_duplicates(data, lambda d: make_splits(d, kfold=4), "group", fixed=False,
                                  carved=False, seen=seen)  # fmt: skip
    assert len(folds) == 4 and _straddling(data, folds) == 0


def test_fixed_split_drops_planted_duplicates_and_counts_window_only():
    part = np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10)
    pairs = itertools.islice(itertools.product(kmers(3), repeat=2), 60)
    seqs = [f"{b}{a}GGG" for a, b in pairs]  # distinct in their first 6 nt
    seqs[50:54] = seqs[0:4]  # four test records repeat training records
    seqs[54:57] = [s[:6] + "CCC" for s in seqs[4:7]]  # three agree with train in the first 6 nt
    seqs[57] = seqs[45]  # one test record repeats a validation record
    data = TaskData(seqs, np.arange(60.0), "regression", ["Value"], splits=part)
    split_with = lambda d: repeated_splits(d, [0])  # noqa: E731
    (split,), dup = resolve_duplicates(data, split_with, None, fixed=True, carved=False,
                                       seen=[6] * 60, reads="first 6 nt")  # fmt: skip
    assert dup == {"policy": "drop", "train_test_before": 4, "train_test_after": 0,
                   "window_only": 3, "window_only_after": 0, "dropped": 8, "test_records": 2,
                   "num_splits": 1, "model_reads": "first 6 nt"}  # fmt: skip
    assert not set(split.test) & set(range(50, 58)) and len(split.val) == 10
    text = duplicates_text(dup)
    assert "--duplicates drop" in text and "4 test records" in text and "3 more" in text
    # A model that reads whole records tells the three apart: they are not duplicates to it.
    _, whole = resolve_duplicates(data, split_with, None, fixed=True, carved=False,
                                  seen=[len(s) for s in seqs])  # fmt: skip
    assert whole["window_only"] == 0 and whole["dropped"] == 5
    with pytest.raises(ConfigError, match="--duplicates drop"):
        resolve_duplicates(data, split_with, "group", fixed=True, carved=False, seen=[6] * 60)
    with pytest.raises(DataError, match="no val or test records left under --duplicates drop"):
        all_dup = TaskData([seqs[0]] * 60, data.targets, "regression", ["Value"], splits=part)
        resolve_duplicates(all_dup, split_with, "drop", fixed=True, carved=False, seen=[6] * 60)


def test_duplicate_groups_join_keys_and_user_groups():
    ids = duplicate_groups(["A", "B", "A", "C", "D"], np.array(["g1", "g2", "g3", "g2", "g3"]))
    # A links 0 and 2, g3 links 2 and 4, g2 links 1 and 3.
    assert ids[0] == ids[2] == ids[4] and ids[1] == ids[3] and ids[0] != ids[1]


def test_region_columns_cut_each_record(tmp_path, caplog):
    orfs = ["ATGAAACCCTAA", "ATGGGGTGA", "ATGTTTTTTTAG"]
    rows = ["transcript,orf_start,orf_end,y"]
    for i, orf in enumerate(orfs):
        utr5, utr3 = "GC" * (i + 1), "AT" * (3 - i)
        rows.append(f"{utr5}{orf}{utr3},{len(utr5)},{len(utr5) + len(orf)},{i}")
    path = tmp_path / "loc.csv"
    path.write_text("\n".join(rows) + "\n")
    kw = dict(sequence_column="transcript", target_columns="y")
    data = load_task_file(path, region_columns=("orf_start", "orf_end"), **kw)
    assert data.sequences == orfs  # 0-based start, end exclusive
    assert "region-base" not in caplog.text
    one_based = load_task_file(path, region_columns=("orf_start", "orf_end"), region_base=1, **kw)
    assert one_based.sequences == ["C" + s for s in orfs]  # one more nt: the 5' UTR's last
    assert "--region-base 0" in caplog.text  # the numbers read 1-based miss the frame: warned
    path.write_text(rows[0] + "\n" + rows[1] + "\n" + "GCATGAAA,2,99,1\n")
    with pytest.raises(
        DataError, match="(?s)bad region.*is not a region of its 8 nt.*--on-invalid skip"
    ):
        load_task_file(path, region_columns=("orf_start", "orf_end"), **kw)


def test_numeric_fold_column_runs_kfold(tmp_path):
    rows = ["seq,y,cv_test_fold"] + [f"ATG{c},{i},{[0, 1, 2, 10][i % 4]}"
                                     for i, c in enumerate(kmers(3)[:40])]  # fmt: skip
    path = tmp_path / "folds.csv"
    path.write_text("\n".join(rows) + "\n")
    data = load_task_file(path, sequence_column="seq", target_columns="y",
                          fold_column="cv_test_fold")  # fmt: skip
    splits = make_splits(data)
    assert [s.name for s in splits] == ["fold 0 (1/4)", "fold 1 (2/4)", "fold 2 (3/4)",
                                        "fold 10 (4/4)"]  # fmt: skip
    for i, s in enumerate(splits):  # fold i is the test set, the next fold val, the rest train
        assert set(s.test) == set(range(i, 40, 4)) and set(s.val) == set(range((i + 1) % 4, 40, 4))
        assert len(s.train) == 20
    carved = make_splits(data, val_from_train=0.2, seed=1)
    assert len(carved) == 4 and all(len(s.val) == 6 and len(s.train) == 24 for s in carved)
    with pytest.raises(DataError, match="--fold-column"):  # numbers are not train/val/test
        load_task_file(path, sequence_column="seq", target_columns="y",
                       split_column="cv_test_fold")  # fmt: skip
    with pytest.raises(DataError, match="4 folds.*not --kfold 5"):
        make_splits(data, kfold=5)


def test_empty_target_error_names_on_invalid_skip(tmp_path):
    path = tmp_path / "halflife.csv"
    path.write_text("Sequence,Value\nATGAAA,1.5\nATGCCC,\nATGGGG,2.0\n")
    with pytest.raises(DataError, match=r"halflife.csv:3: empty target: column Value") as err:
        load_task_file(path)
    assert "--on-invalid skip" in str(err.value)
    data = load_task_file(path, on_invalid="skip")
    assert data.sequences == ["ATGAAA", "ATGGGG"] and data.report.invalid == {"empty target": 1}
