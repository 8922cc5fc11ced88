"""Finetuning on downstream tasks (helm.downstream.finetune and ``eval.py downstream --finetune``),
on a tiny MLM checkpoint trained once per module (CPU)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_checkpoint

from helm.checkpoint import load_for_eval
from helm.downstream import Grid, evaluate_finetune, evaluate_probe, make_splits
from helm.downstream.finetune import (
    FinetuneModel,
    build_head,
    collate,
    finetune_param_groups,
    finetune_run,
    frame_tokens,
)
from helm.downstream.tasks import TaskData
from helm.embed import extract, window_capacity
from helm.models import MODELS
from helm.optim import build_optimizer
from helm.vocab import CLS_ID, EOS_ID, PAD_ID

SEARCH = Grid(lrs=(3e-3,), batch_sizes=(16,), seeds=(0,), max_epochs=6, patience=3)
GRID = dict(grid=SEARCH, progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread avoids intra-op contention on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ckpt(tiny_runs) -> Path:
    """The session's tiny MLM checkpoint (conftest.py)."""
    return tiny_checkpoint(tiny_runs, "mlm")


def gc_task(n: int = 90, seed: int = 0) -> TaskData:
    """Random coding-length sequences of varied GC bias; the target is their GC content."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n):
        length, p = 3 * int(rng.integers(12, 50)), rng.uniform(0.15, 0.85)
        gc = rng.random(length) < p
        seqs.append(
            "".join(np.where(gc, rng.choice(list("GC"), length), rng.choice(list("AT"), length)))
        )
    y = np.array([(s.count("G") + s.count("C")) / len(s) for s in seqs])
    return TaskData(seqs, y, "regression", ["gc"], source="gc")


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


# Inputs -------------------------------------------------------------------------------------------


def test_frame_and_collate():
    ids = [np.arange(5, 15), np.arange(5, 8)]
    bi = frame_tokens(ids, max_seq_len=8, causal=False)  # room for 6 tokens
    assert bi[0].tolist() == [CLS_ID, *range(5, 11), EOS_ID]
    assert bi[1].tolist() == [CLS_ID, 5, 6, 7, EOS_ID]
    causal = frame_tokens(ids, max_seq_len=8, causal=True)  # room for 7, no <eos>
    assert causal[0].tolist() == [CLS_ID, *range(5, 12)] and causal[1].tolist() == [CLS_ID, 5, 6, 7]

    input_ids, attention_mask, token_mask = collate(bi, causal=False)
    assert input_ids.shape == (2, 8) and input_ids[1, 5:].eq(PAD_ID).all()
    assert attention_mask.sum(1).tolist() == [8, 5]
    assert token_mask.shape == (2, 7) and token_mask.sum(1).tolist() == [6, 3]
    assert not token_mask[0, 6]  # the <eos> after the last token is not a sequence token
    _, attention_mask, token_mask = collate(causal[:1], causal=True)
    assert attention_mask is None and token_mask.sum().item() == 7


@pytest.mark.parametrize("head", ["textcnn", "linear"])
def test_padding_does_not_change_a_records_output(ckpt, head):
    backbone = load_for_eval(ckpt).model
    torch.manual_seed(0)
    model = FinetuneModel(backbone, build_head(head, backbone.cfg.d_model, 2)).eval()
    rng = np.random.default_rng(1)
    framed = frame_tokens([rng.integers(5, 69, size=n) for n in (30, 7)], 48, causal=False)
    with torch.no_grad():
        together = model(*collate(framed, causal=False))
        alone = model(*collate(framed[1:], causal=False))
    torch.testing.assert_close(together[1:], alone, rtol=1e-4, atol=1e-5)


class Recorder(torch.nn.Module):
    """A head that keeps the states of each record's real tokens."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.seen = [x[r][mask[r]] for r in range(len(x))]
        return x.new_zeros(len(x), 1)


def test_head_reads_the_probe_features(ckpt):
    backbone = load_for_eval(ckpt).model
    rng = np.random.default_rng(2)
    ids = [rng.integers(5, 69, size=n) for n in (60, 9, 46)]  # one longer than the window
    model = FinetuneModel(backbone, Recorder()).eval()
    with torch.no_grad():
        model(*collate(frame_tokens(ids, 48, causal=False), causal=False))
    features = extract(backbone, ids)  # the frozen probe's features, truncated to the window
    assert [len(s) for s in model.head.seen] == [len(f) for f in features] == [46, 9, 46]
    for seen, feats in zip(model.head.seen, features):
        torch.testing.assert_close(seen, torch.from_numpy(feats), rtol=1e-4, atol=1e-5)


# Optimizer --------------------------------------------------------------------------------------


def test_head_and_backbone_learning_rates(ckpt):
    backbone = load_for_eval(ckpt).model
    model = FinetuneModel(backbone, build_head("textcnn", backbone.cfg.d_model, 1))
    hinted = backbone.blocks[0].mlp.fc_in.weight
    hinted._optim = {"lr_scale": 2.0}
    opt = build_optimizer(
        finetune_param_groups(model, backbone_lr_scale=0.1, weight_decay=0.01), lr=1e-3
    )
    seen = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) not in seen, "a parameter in two groups"
            seen[id(p)] = group
    assert {g["name"] for g in opt.param_groups} == {"head", "backbone"}
    for p in model.head.parameters():
        assert seen[id(p)]["name"] == "head" and seen[id(p)]["lr"] == pytest.approx(1e-3)
    for p in backbone.parameters():
        group = seen[id(p)]
        want = 2e-4 if p is hinted else 1e-4
        assert group["name"] == "backbone" and group["lr"] == pytest.approx(want)
        no_decay = p.ndim <= 1 or getattr(p, "_no_weight_decay", False)
        assert group["weight_decay"] == (0.0 if no_decay else 0.01)
    assert len(seen) == len(list(model.parameters()))


# Training ---------------------------------------------------------------------------------------


def test_finetuning_changes_the_backbone_and_probing_does_not(ckpt):
    backbone = load_for_eval(ckpt).model
    data = gc_task(40)
    split = make_splits(data, (0.6, 0.2, 0.2), seed=0)[0]
    framed = frame_tokens(
        load_for_eval(ckpt).tokenizer.encode_batch(data.codon_sequences()), 48, False
    )
    before = state(backbone)
    run = dict(max_epochs=2, patience=2, head="textcnn")

    _, _, _, tuned = finetune_run(backbone, framed, data, split, 3e-3, 16, 0, **run)
    moved = changed(before, tuned.backbone)
    assert any(k.startswith("blocks.0.") for k in moved) and any("embed" in k for k in moved)
    assert not changed(before, backbone)  # each run trains a copy of the backbone

    # A backbone learning rate of zero leaves it as loaded while the head still learns.
    torch.manual_seed(0)
    fresh_head = state(build_head("textcnn", backbone.cfg.d_model, 1))
    _, _, _, still = finetune_run(
        backbone, framed, data, split, 3e-3, 16, 0, backbone_lr_scale=0.0, **run
    )
    assert not changed(before, still.backbone) and changed(fresh_head, still.head)

    # The frozen probe reads features once and never touches the backbone.
    features = extract(backbone, [f[1:-1] for f in framed])
    evaluate_probe(features, data, [split], grid=replace(SEARCH, max_epochs=2), progress=False)
    assert not changed(before, backbone)


@pytest.mark.parametrize("head", ["textcnn", "linear"])
def test_finetuning_learns_gc_content(ckpt, head):
    loaded = load_for_eval(ckpt)
    data = gc_task()
    splits = make_splits(data, (0.6, 0.2, 0.2), seed=0)
    token_ids = loaded.tokenizer.encode_batch(data.codon_sequences())
    capacity = window_capacity(loaded.model.cfg.max_seq_len, causal=False)
    assert any(len(t) > capacity for t in token_ids)  # some records are cut to the window
    result = evaluate_finetune(
        loaded.model,
        token_ids,
        data,
        splits,
        head=head,
        grid=replace(SEARCH, seeds=(0, 1)),
        progress=False,
    )
    assert result.method == f"finetune_{head}" and result.metric == "spearman"
    assert len(result.values) == 2
    assert result.chosen == [{"split": splits[0].name, "lr": 3e-3, "batch_size": 16}]
    assert result.mean > 0.5, result.values
    assert result.grid[0]["test"] == pytest.approx(result.mean)
    assert set(result.test_metrics) == {"spearman", "pearson", "r2", "rmse"}


# Command line -------------------------------------------------------------------------------------


def test_cli_finetune_writes_the_report(ckpt, eval_run, tmp_path):
    data = gc_task(60)
    rows = ["seq,gc,part"] + [
        f"{s},{y:.4f},{('train', 'train', 'train', 'val', 'test')[i % 5]}"
        for i, (s, y) in enumerate(zip(data.sequences, data.targets))
    ]
    task = tmp_path / "gc.csv"
    task.write_text("\n".join(rows) + "\n")
    base = ["downstream", ckpt, "--file", task, "--sequence-column", "seq", "--target-column",
            "gc", "--split-column", "part", "--lrs", "3e-3", "--batch-sizes", "16", "--seeds", "0",
            "--max-epochs", "2", "--finetune"]  # fmt: skip
    out = tmp_path / "r.json"
    code, stdout, err = eval_run(*base, "--out", out)
    assert code == 0, err
    assert "| gpt2_mlm_finetune_textcnn |" in stdout and "| method | spearman |" in stdout
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"gpt2_mlm_finetune_textcnn", "onehot_textcnn", "codon_freq"}
    result = doc["results"]["gpt2_mlm_finetune_textcnn"]
    assert result["method"] == "gpt2_mlm_finetune_textcnn" and len(result["values"]) == 1
    assert math.isfinite(result["mean"]) and result["chosen"][0]["lr"] == 3e-3
    assert doc["task"]["backbone_lr_scale"] == 0.1 and "finetuned" in doc["task"]["training"]
    assert "features" not in doc["task"] and doc["task"]["long_seqs"] == "truncate"

    code, _, err = eval_run(*base, "--head", "linear", "--backbone-lr-scale", "0.5", "--no-baselines",
                       "--out", out)  # fmt: skip
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"gpt2_mlm_finetune_linear"}
    assert doc["task"]["backbone_lr_scale"] == 0.5

    code, stdout, err = eval_run(*base, "--long-seqs", "window", "--out", out)
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("eval.py: error: --long-seqs window does not apply to --finetune")


@pytest.mark.parametrize("name", MODELS)
def test_finetune_backbone_groups_equal_the_trainers(name):
    """finetune_run deep-copies the backbone: its optimizer groups must be the trainer's (no-decay
    tags and Hyena's filter lr hints survive the copy), at backbone_lr_scale times the lr."""
    import copy

    from helm.models import build_model
    from helm.optim import param_groups

    kw = dict(d_model=16, num_layers=1, max_seq_len=32, num_heads=2)
    if name == "hyena":
        kw |= dict(filter_lr_scale=0.5)
    backbone = build_model(name, **kw)
    model = FinetuneModel(copy.deepcopy(backbone), build_head("linear", 16, 2))

    def by_name(groups):
        return {n: (g["weight_decay"], g["lr_scale"]) for g in groups for n in g["names"]}

    got = by_name(g for g in finetune_param_groups(model, 0.1, 0.01) if g["name"] == "backbone")
    want = by_name(param_groups(backbone, 0.01, lr_scale=0.1))
    assert got == want
    assert any(wd == 0.0 for wd, _ in got.values())
