"""End-to-end tests of eval.py on tiny checkpoints trained once per module (CPU)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_checkpoint

from helm.checkpoint import load_for_eval
from helm.data.demo import demo_sequences
from helm.embed import extract, window_capacity
from helm.generate import filter_logits, protein_masks
from helm.vocab import AMINO_ACIDS, codon_id, translate

STOPS = {"TAA", "TAG", "TGA"}


def write_fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records))
    return path


def read_fasta(text: str) -> list[tuple[str, str]]:
    records = []
    for line in text.splitlines():
        if line.startswith(">"):
            records.append([line[1:], ""])
        elif line.strip():
            records[-1][1] += line.strip()
    return [tuple(r) for r in records]


# pretrain -----------------------------------------------------------------------------------------

TREE_KEYS = (
    "loss",
    "perplexity",
    "accuracy",
    "aa_accuracy",
    "mistake_severity",
    "dist@1",
    "dist@5",
)


def test_pretrain_mlm_metrics_are_finite_and_seeded(tiny_runs, eval_run, tmp_path):
    data = write_fasta(
        tmp_path / "seqs.fasta", [(f"s{i}", s) for i, s in enumerate(demo_sequences(40, seed=5))]
    )
    docs = []
    for seed in (3, 3, 4):
        out = tmp_path / f"m{len(docs)}.json"
        code, _, err = eval_run(
            "pretrain",
            tiny_checkpoint(tiny_runs, "mlm"),
            "--file",
            data,
            "--seed",
            seed,
            "--out",
            out,
        )
        assert code == 0, err
        docs.append(json.loads(out.read_text()))
    m = docs[0]["metrics"]
    for key in TREE_KEYS:
        assert math.isfinite(m[key]), (key, m)
    assert docs[0]["mode"] == "mlm" and docs[0]["loss"] == "HXE" and docs[0]["records"] == 40
    assert 1 < m["perplexity"] < 200 and 0 <= m["accuracy"] <= m["aa_accuracy"] <= 1
    assert docs[0]["metrics"] == docs[1]["metrics"]  # same --seed, same masks
    assert docs[0]["metrics"] != docs[2]["metrics"]  # another seed masks other tokens


def test_pretrain_clm_to_stdout_and_ema(tiny_runs, eval_run, tmp_path):
    data = tmp_path / "seqs.txt"
    data.write_text("\n".join(demo_sequences(20, seed=1)) + "\n")
    code, out, err = eval_run("pretrain", tiny_checkpoint(tiny_runs, "clm"), "--file", data)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["mode"] == "clm" and doc["seed"] is None
    assert all(math.isfinite(doc["metrics"][k]) for k in TREE_KEYS)
    code, out, _ = eval_run("pretrain", tiny_checkpoint(tiny_runs, "mlm"), "--file", data, "--ema")
    assert code == 0 and json.loads(out)["weights"] == "ema"


def test_ema_without_ema_weights_is_a_clear_error(tiny_runs, eval_run, tmp_path):
    data = tmp_path / "seqs.txt"
    data.write_text(demo_sequences(2)[0] + "\n")
    code, out, err = eval_run(
        "embed",
        tiny_checkpoint(tiny_runs, "clm"),
        "--file",
        data,
        "--ema",
        "--out",
        tmp_path / "e.npy",
    )
    assert code == 2 and out == ""
    assert err.startswith("eval.py: error:") and "no EMA weights" in err and "Traceback" not in err


# embed --------------------------------------------------------------------------------------------


def test_embed_shapes_order_ids_and_pooling(tiny_runs, eval_run, tmp_path):
    seqs = demo_sequences(7, seed=2)
    names = [f"rec{i} some description" for i in range(len(seqs))]
    forward = write_fasta(tmp_path / "f.fasta", list(zip(names, seqs)))
    backward = write_fasta(tmp_path / "b.fasta", list(zip(names, seqs))[::-1])
    out = {}
    for tag, path, pool in (("f", forward, "mean"), ("b", backward, "mean"), ("c", forward, "cls")):
        code, _, err = eval_run("embed", tiny_checkpoint(tiny_runs, "mlm"), "--file", path, "--pool", pool,
                           "--batch_size", "3", "--out", tmp_path / f"{tag}.npy")  # fmt: skip
        assert code == 0, err
        out[tag] = np.load(tmp_path / f"{tag}.npy")
        assert out[tag].shape == (7, 32) and out[tag].dtype == np.float32
    ids = (tmp_path / "f.npy.ids.txt").read_text().splitlines()
    assert ids == names
    assert (tmp_path / "b.npy.ids.txt").read_text().splitlines() == names[::-1]
    np.testing.assert_allclose(out["f"], out["b"][::-1], rtol=1e-4, atol=1e-5)  # input order
    assert not np.allclose(out["f"], out["c"], atol=1e-3)  # mean and <cls> are different views
    assert not np.allclose(out["f"][0], out["f"][1], atol=1e-4)

    txt = tmp_path / "s.txt"
    txt.write_text("\n".join(seqs[:3]) + "\n")
    code, _, err = eval_run(
        "embed", tiny_checkpoint(tiny_runs, "mlm"), "--file", txt, "--out", tmp_path / "t.pt"
    )
    assert code == 0, err
    saved = torch.load(tmp_path / "t.pt")
    assert saved["ids"] == ["1", "2", "3"] and saved["embeddings"].shape == (3, 32)
    np.testing.assert_allclose(saved["embeddings"].numpy(), out["f"][:3], rtol=1e-4, atol=1e-5)


def test_long_sequences_windowed_features(tiny_runs):
    model = load_for_eval(tiny_checkpoint(tiny_runs, "mlm")).model
    cap = window_capacity(model.cfg.max_seq_len, causal=False)
    rng = np.random.default_rng(0)
    ids = [rng.integers(5, 69, size=n) for n in (3 * cap + 5, cap // 2, cap)]
    win = extract(model, ids, long_seqs="window", batch_size=2)
    cut = extract(model, ids, long_seqs="truncate", batch_size=2)
    assert [len(f) for f in win] == [len(i) for i in ids]
    assert [len(f) for f in cut] == [cap, cap // 2, cap]
    assert all(np.isfinite(f).all() for f in win)
    # Tokens seen by the first window alone match the truncated view; short records are unchanged.
    np.testing.assert_allclose(win[0][: cap // 2], cut[0][: cap // 2], rtol=1e-4, atol=1e-5)
    assert not np.allclose(win[0][cap - 1], cut[0][cap - 1], atol=1e-4)  # averaged in the overlap
    for a, b in zip(win[1:], cut[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# generate -----------------------------------------------------------------------------------------


def test_generate_samples_and_is_seeded(tiny_runs, eval_run, tmp_path):
    code, out, err = eval_run("generate", tiny_checkpoint(tiny_runs, "clm"), "--num", 3, "--max-length", 10,
                         "--top-k", 20, "--top-p", 0.9, "--seed", 7)  # fmt: skip
    assert code == 0, err
    records = read_fasta(out)
    assert len(records) == 3
    for header, seq in records:
        assert {"gc=", "cai=", "loglik="} <= {f[: f.index("=") + 1] for f in header.split()[1:]}
        assert 0 < len(seq) <= 30 and len(seq) % 3 == 0 and set(seq) <= set("ACGT")
        fields = dict(f.split("=", 1) for f in header.split()[1:])
        assert float(fields["loglik"]) < 0
        # 10 tokens cannot hold a whole coding sequence: each sample is marked as cut by the cap
        assert fields["end"] == "cap"
    assert "3 of 3 samples reached the length cap" in err
    assert eval_run("generate", tiny_checkpoint(tiny_runs, "clm"), "--num", 3, "--max-length", 10, "--top-k", 20,
               "--top-p", 0.9, "--seed", 7)[1] == out  # fmt: skip
    code, out, _ = eval_run("generate", tiny_checkpoint(tiny_runs, "clm"), "--prefix", "ATGGCC", "--num", 2,
                       "--max-length", 4, "--out", tmp_path / "g.fasta")  # fmt: skip
    assert code == 0 and out == ""
    assert all(s.startswith("ATGGCC") for _, s in read_fasta((tmp_path / "g.fasta").read_text()))


@pytest.mark.parametrize("protein", ["M", "MKV", AMINO_ACIDS, "WWHHCYQ", "MLLSSRRGP*"])
def test_generate_protein_translates_back(tiny_runs, eval_run, protein):
    code, out, err = eval_run(
        "generate", tiny_checkpoint(tiny_runs, "clm"), "--protein", protein, "--num", 3, "--seed", 1
    )
    assert code == 0, err
    records = read_fasta(out)
    assert len(records) == 3
    for _, seq in records:
        assert translate(seq) == protein.rstrip("*") + "*"
        assert seq[-3:] in STOPS
        if protein.startswith("M"):
            assert seq.startswith("ATG")


def test_generate_protein_file_and_errors(tiny_runs, eval_run, tmp_path):
    proteins = write_fasta(tmp_path / "p.fasta", [("p1", "MAST"), ("p2", "MGKE")])
    code, out, err = eval_run(
        "generate", tiny_checkpoint(tiny_runs, "clm"), "--protein", proteins, "--num", 2
    )
    assert code == 0, err
    records = read_fasta(out)
    assert [translate(s) for _, s in records] == ["MAST*", "MAST*", "MGKE*", "MGKE*"]
    assert "source=p2" in records[-1][0]

    code, _, err = eval_run("generate", tiny_checkpoint(tiny_runs, "mlm"))
    assert code == 2 and "MLM" in err and "--mode clm" in err and "Traceback" not in err
    code, _, err = eval_run("generate", tiny_checkpoint(tiny_runs, "clm"), "--protein", "MKB")
    assert code == 2 and "'B'" in err


def test_protein_masks_and_filters():
    masks = protein_masks("MW", 69)
    assert masks.shape == (3, 69)
    assert masks[0].nonzero().flatten().tolist() == [codon_id("ATG")]
    assert masks[1].nonzero().flatten().tolist() == [codon_id("TGG")]
    assert sorted(masks[2].nonzero().flatten().tolist()) == sorted(codon_id(c) for c in STOPS)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda w: torch.isfinite(w[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, 1.0, 2, None)) == [0, 1]
    assert kept(filter_logits(logits, 1.0, None, 0.7)) == [0, 1]
    assert kept(filter_logits(logits, 1.0, None, 0.5)) == [0]
    assert kept(filter_logits(logits, 0.0, None, None)) == [0]


# downstream ---------------------------------------------------------------------------------------

GRID = ["--lrs", "1e-3", "--batch-sizes", "64", "--seeds", "0", "--max-epochs", "2"]


def test_downstream_riboswitches(tiny_runs, eval_run, tmp_path, shared_data):
    out = tmp_path / "report.json"
    code, stdout, err = eval_run("downstream", tiny_checkpoint(tiny_runs, "mlm"), "--task", "tc_riboswitches",
                            "--data_dir", shared_data, *GRID, "--out", out)  # fmt: skip
    assert code == 0, err
    assert "| method | spearman |" in stdout and "3-mers" in stdout
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"gpt2_mlm_textcnn", "onehot_textcnn", "codon_freq"}
    for result in doc["results"].values():
        assert result["metric"] == "spearman" and len(result["values"]) == 1
        assert math.isfinite(result["mean"]) and result["std"] is None  # one run: no spread
    assert doc["task"]["coding"] is False and "3-mers" in doc["task"]["model_input"]
    # The features are cached: a second eval_run (linear head) finds them.
    code, _, err = eval_run("downstream", tiny_checkpoint(tiny_runs, "mlm"), "--task", "tc_riboswitches", "--data_dir",
                       shared_data, "--head", "linear", "--no-baselines", "--out", out)  # fmt: skip
    assert code == 0 and "features read from the cache" in err


def _task_file(path: Path, n: int = 30, long_every: int = 3, value=lambda i: f"{i * 0.1:.2f}"):
    seqs = demo_sequences(n, seed=9)
    rows = ["seq,y,part"]
    for i, s in enumerate(seqs):
        s = s * 3 if i % long_every == 0 else s[:60]
        rows.append(f"{s},{value(i)},{('train', 'train', 'train', 'val', 'test')[i % 5]}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_downstream_user_file_with_long_sequences(tiny_runs, eval_run, tmp_path):
    data = _task_file(tmp_path / "task.csv")
    out = tmp_path / "r.json"
    code, stdout, err = eval_run("downstream", tiny_checkpoint(tiny_runs, "clm"), "--file", data, "--sequence-column",
                            "seq", "--target-column", "y", "--split-column", "part", "--head",
                            "linear", "--no-baselines", "--long-seqs", "window", "--out", out)  # fmt: skip
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["task"]["records_longer_than_model"] == 10 and doc["task"]["long_seqs"] == "window"
    assert math.isfinite(doc["results"]["gpt2_clm_linear"]["mean"])


def test_downstream_errors(tiny_runs, eval_run, tmp_path):
    base = ["downstream", tiny_checkpoint(tiny_runs, "mlm"), *GRID, "--no-baselines"]
    data = _task_file(tmp_path / "task.csv")
    code, _, err = eval_run(
        *base, "--file", data, "--sequence-column", "seq", "--target-column", "yy"
    )
    assert code == 2 and "no column(s) ['yy']" in err and err.count("\n") == 1
    bad = _task_file(tmp_path / "bad.csv", value=lambda i: "high" if i == 4 else "1.5")
    code, _, err = eval_run(
        *base, "--file", bad, "--sequence-column", "seq", "--target-column", "y"
    )
    assert code == 2 and "non-numeric target" in err and "bad.csv:6" in err
    code, _, err = eval_run(*base, "--task", "no_such_task")
    assert code == 2 and "unknown --task" in err and "tc_riboswitches" in err
    code, _, err = eval_run(*base, "--file", data, "--finetune", "--long-seqs", "window")
    assert code == 2 and "--finetune" in err and "--long-seqs" in err


def test_downstream_report_reproducible_from_itself(tiny_runs, eval_run, tmp_path):
    import hashlib

    rows = ["seq,y"] + [
        f"{s[:60] if i % 3 else s},{i % 7}" for i, s in enumerate(demo_sequences(30, seed=4))
    ]
    data = tmp_path / "nosplit.csv"
    data.write_text("\n".join(rows) + "\n")  # no split column and no --split: 0.7/0.15/0.15
    out = tmp_path / "r.json"
    code, stdout, err = eval_run("downstream", tiny_checkpoint(tiny_runs, "mlm"), "--file", data,
                                 "--sequence-column", "seq", "--target-column", "y", "--head",
                                 "linear", "--out", out, *GRID)  # fmt: skip
    assert code == 0, err
    doc = json.loads(out.read_text())
    task = doc["task"]
    assert task["split_seeds"] == [0, 1, 2] and len(task["splits"]) == 3
    assert doc["results"]["gpt2_mlm_linear"]["num_splits"] == 3
    assert doc["results"]["gpt2_mlm_linear"]["std"] is not None  # a spread over 3 splits
    s = task["settings"]
    assert s["--sequence-column"] == "seq" and s["--lrs"] == [1e-3] and s["--patience"] == 15
    assert s["--split-seeds"] == [0, 1, 2] and s["--head"] == "linear" and "--baseline-input" in s
    assert task["input_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    ckpt = tiny_checkpoint(tiny_runs, "mlm")
    assert task["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert task["checkpoint"]["step"] > 0 and task["checkpoint"]["mode"] == "mlm"
    # Probe and baselines read the same extent, and the report says which.
    extents = set(task["input_extent"].values())
    assert len(extents) == 1 and extents.pop().startswith("first 138 nt (46 codons); 10 of 30")
    assert "| input |" in stdout and (tmp_path / "r.md").read_text() in stdout
    assert (tmp_path / "r.svg").read_text().startswith("<svg")
    code, _, err = eval_run("downstream", ckpt, "--file", data, "--sequence-column", "seq",
                            "--target-column", "y", "--head", "linear", "--out", out,
                            "--baseline-input", "full", *GRID)  # fmt: skip
    assert json.loads(out.read_text())["results"]["codon_freq"]["input"] == "whole records"


def test_downstream_interrupt_exits_130_and_rerun_continues(tiny_runs, eval_run, tmp_path,
                                                            monkeypatch):  # fmt: skip
    from helm.downstream import protocol

    data = _task_file(tmp_path / "task.csv")
    out = tmp_path / "r.json"
    argv = ["downstream", tiny_checkpoint(tiny_runs, "mlm"), "--file", data, "--sequence-column",
            "seq", "--target-column", "y", "--split-column", "part", "--lrs", "1e-3", "3e-4",
            "--batch-sizes", "16", "--seeds", "0", "--max-epochs", "2", "--no-baselines",
            "--out", out]  # fmt: skip
    real, trained = protocol._train_textcnn, []

    def interrupted(*args, **kwargs):
        if len(trained) == 1:
            raise KeyboardInterrupt
        trained.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "_train_textcnn", interrupted)
    code, stdout, err = eval_run(*argv)
    assert code == 130 and "Traceback" not in err and not out.exists()
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("eval.py: interrupted; 1 finished runs are kept in")
        and "r.runs.jsonl" in last
    )
    monkeypatch.setattr(
        protocol, "_train_textcnn", lambda *a, **k: trained.append(a[3]) or real(*a, **k)
    )
    code, stdout, err = eval_run(*argv)
    assert code == 0 and trained == [1e-3, 3e-4] and "(stored)" in err
    assert len(json.loads(out.read_text())["results"]["gpt2_mlm_textcnn"]["grid"]) == 2


def test_downstream_fasta_folder_with_train_test(tiny_runs, eval_run, tmp_path):
    seqs = demo_sequences(24, seed=5)
    for split, part in (("train", seqs[:16]), ("test", seqs[16:])):
        (tmp_path / "species" / split).mkdir(parents=True)
        for label in ("human", "yeast"):
            text = "".join(
                f">lcl|NC_{label}{i}.1 [gene=g{i}]\n{s[:90]}\n" for i, s in enumerate(part)
            )
            (tmp_path / "species" / split / f"{label}.fasta").write_text(text)
    out = tmp_path / "r.json"
    base = ["downstream", tiny_checkpoint(tiny_runs, "clm"), "--file", tmp_path / "species",
            "--head", "linear", "--no-baselines", "--out", out]  # fmt: skip
    code, _, err = eval_run(*base)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("eval.py: error:") and "split folders hold no" in last
    assert "--val-from-train" in last
    code, stdout, err = eval_run(*base, "--val-from-train", "0.25")
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["task"]["task"] == "classification" and doc["task"]["labels"] == "file names"
    assert doc["results"]["gpt2_clm_linear"]["num_splits"] == 3  # val carved with 3 seeds
    # Each sequence sits in both classes: by default its two records are carved together.
    assert doc["duplicates"]["policy"] == "drop" and doc["duplicates"]["train_test_after"] == 0
    assert "identical sequences across splits" not in err
    code, stdout, err = eval_run(*base, "--val-from-train", "0.25", "--duplicates", "keep")
    assert code == 0 and "identical sequences across splits" in err


@pytest.fixture
def one_thread():
    """Tiny L-BFGS fits run far slower on two threads of a busy 2-core box than on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_downstream_keeps_planted_duplicates_apart_by_default(tiny_runs, eval_run, tmp_path,
                                                              one_thread):  # fmt: skip
    seqs = [s[:150] for s in demo_sequences(40, seed=6)]  # longer than the model's 138-nt window
    rows = ["seq,y"] + [f"{s},{i}" for i, s in enumerate(seqs)]
    rows += [f"{s},{i + 0.5}" for i, s in enumerate(seqs[:10])]  # ten exact copies
    rows += [f"{s[:138]}GCGGCG,{i}" for i, s in enumerate(seqs[10:20])]  # ten: same window only
    data = tmp_path / "planted.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "r.json"
    argv = ["downstream", tiny_checkpoint(tiny_runs, "mlm"), "--file", data, "--sequence-column",
            "seq", "--target-column", "y", "--head", "linear", "--no-baselines", "--out", out]  # fmt: skip
    code, stdout, err = eval_run(*argv)
    assert code == 0, err
    dup = json.loads(out.read_text())["duplicates"]
    assert dup["policy"] == "group" and dup["num_splits"] == 3
    assert dup["train_test_before"] > 0 and dup["train_test_after"] == 0
    assert dup["window_only"] > 0 and dup["window_only_after"] == 0
    assert "Duplicates (--duplicates group" in stdout
    code, stdout, err = eval_run(*argv, "--duplicates", "keep")
    kept = json.loads(out.read_text())["duplicates"]
    assert kept["train_test_after"] == kept["train_test_before"] == dup["train_test_before"]
    assert "identical sequences across splits" in err
    code, _, err = eval_run(*argv, "--dedupe")
    assert code == 2 and "--dedupe is now --duplicates drop" in err


def test_downstream_localisation_table_with_regions_and_a_fold_column(tiny_runs, eval_run,
                                                                      tmp_path, one_thread):  # fmt: skip
    labels = ["cytosol", "nucleus", "membrane", "er", "mito", "exosome", "ribosome"]
    rows = ["id,transcript,orf_start,orf_end,cv_test_fold," + ",".join(labels)]
    for i, s in enumerate(demo_sequences(30, seed=8)):
        utr5, orf = "GCCACC"[: i % 6 + 1], s[:120]
        marks = ",".join(str(int((i + k) % 3 == 0)) for k in range(7))
        rows.append(f"t{i},{utr5}{orf}AAUAAA,{len(utr5)},{len(utr5) + 120},{i % 3},{marks}")
    data = tmp_path / "loc.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "loc.json"
    code, _, err = eval_run("downstream", tiny_checkpoint(tiny_runs, "mlm"), "--file", data,
                            "--sequence-column", "transcript", "--target-column", *labels,
                            "--task-type", "multilabel", "--region-columns", "orf_start,orf_end",
                            "--fold-column", "cv_test_fold", "--head", "linear", "--no-baselines",
                            "--out", out)  # fmt: skip
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["task"]["splits"][0].startswith(
        "TaskSplit('fold 0 (1/3)', train 10, val 10, test 10"
    )
    assert doc["results"]["gpt2_mlm_linear"]["num_splits"] == 3
    assert doc["task"]["input_extent"]["gpt2_mlm_linear"] == "whole records"  # 120-nt ORFs
    assert doc["duplicates"]["policy"] == "drop" and "region-base" not in err


# The first hour of a user ------------------------------------------------------------------------


def test_a_run_folder_is_read_as_its_best_checkpoint(tiny_runs, eval_run, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("\n".join(demo_sequences(6, seed=3)) + "\n")
    code, out, err = eval_run("pretrain", tiny_runs / "mlm", "--file", data)
    assert code == 0, err
    assert "run folder: using its checkpoints/best.pt" in err
    assert json.loads(out)["checkpoint"].endswith("best.pt")


def test_truncation_is_reported_and_tokens_count_what_was_scored(tiny_runs, eval_run, tmp_path):
    long_seq = "ATG" + "GCC" * 200 + "TAA"  # 202 codons; the tiny model reads 46
    data = tmp_path / "long.txt"
    data.write_text(long_seq + "\n" + "ATGGCCTAA\n")
    code, out, err = eval_run("pretrain", tiny_checkpoint(tiny_runs, "mlm"), "--file", data)
    assert code == 0, err
    doc = json.loads(out)
    assert (
        doc["tokens_in_file"] == 205 and doc["tokens"] == 46 + 3 and doc["records_truncated"] == 1
    )
    assert "only their first 46 tokens are scored" in err
    code, _, err = eval_run(
        "embed", tiny_checkpoint(tiny_runs, "mlm"), "--file", data, "--out", tmp_path / "e.npy"
    )
    assert code == 0 and "1 of 2 records are longer than the model's window of 46 tokens" in err


def test_eval_errors_are_one_line(tiny_runs, eval_run, tmp_path):
    code, _, err = eval_run("generate", tiny_checkpoint(tiny_runs, "clm"), "--nmu", 2)
    assert code == 2 and "did you mean --num?" in err and "usage:" not in err
    code, _, err = eval_run("generate", tiny_checkpoint(tiny_runs, "clm"), "--num", 0)
    assert code == 2 and "argument --num: must be >= 1, got 0" in err
    code, _, err = eval_run(
        "generate", tiny_checkpoint(tiny_runs, "clm"), "--max_length", 3, "--top_k", 5
    )
    assert code == 0, err  # both spellings of every flag
    empty = tmp_path / "runs" / "x"
    (empty / "checkpoints").mkdir(parents=True)
    code, _, err = eval_run("pretrain", empty, "--file", tmp_path / "d.txt")
    assert code == 2 and "d.txt: no such file" in err  # the arguments are checked first
    (tmp_path / "d.txt").write_text("ATGAAATAA\n")
    code, _, err = eval_run("pretrain", empty, "--file", tmp_path / "d.txt")
    assert code == 2 and "without a checkpoint yet" in err
