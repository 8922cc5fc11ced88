"""The checkpoint format: atomic writes, history, a training state's round trip, eval loading."""

import random

import numpy as np
import pytest
import torch
from helpers import tiny_checkpoint

from helm.checkpoint import (
    CheckpointError,
    CheckpointManager,
    RunInfo,
    TrainState,
    atomic_save,
    load_checkpoint,
    load_for_eval,
    tokenizer_from_state,
    tokenizer_state,
)
from helm.hierarchy import build_hierarchy
from helm.models import build_model
from helm.optim import build_optimizer
from helm.sched import build_scheduler
from helm.tokenizers import build_tokenizer


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(3)}}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_checkpoint_history_keeps_newest_and_best(tmp_path):
    saver = CheckpointManager(tmp_path, keep=2, mode="min")
    for epoch, metric in enumerate([3.0, 1.0, 2.0, 2.5]):
        saver.save_epoch({"model": {}, "epoch": epoch}, epoch, saver.update_best(metric, epoch))
    names = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert names == ["best.pt", "epoch-0002.pt", "epoch-0003.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3


def _state(folder, seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = build_model("gpt2", vocab_size=69, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    ema = build_model("gpt2", vocab_size=69, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    scheduler, _ = build_scheduler(
        optimizer, base_lr=1e-2, updates_per_epoch=5, epochs=3, on_updates=True
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    saver = CheckpointManager(folder, keep=2)
    return TrainState(model, optimizer, scheduler, scaler, saver, ema=ema)


def test_train_state_round_trip(tmp_path):
    """Everything a resume needs comes back: weights, EMA, optimizer moments, schedule, best
    metric, counters and the RNG streams."""
    run = RunInfo(
        config={"mode": "mlm"},
        model_name="gpt2",
        model_config={"d_model": 16},
        tokenizer=tokenizer_state(build_tokenizer("3mer")),
        hierarchy=build_hierarchy().state_dict(),
    )
    a = _state(tmp_path / "a", seed=0)
    ids = torch.randint(5, 69, (2, 7))
    a.model.lm_head(a.model(ids)).sum().backward()
    a.optimizer.step()
    a.scheduler.step_update(3)
    a.saver.update_best(1.5, epoch=1)
    a.epoch, a.step, a.batches_done, a.bad_epochs = 2, 13, 4, 1
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    atomic_save(a.checkpoint(run), tmp_path / "ckpt.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())

    b = _state(tmp_path / "b", seed=1)  # different weights, fresh optimizer and counters
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    b.restore(ckpt)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (
        expected[0].tolist(),
        expected[1],
        expected[2],
    )
    for key, value in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[key], value), key
    for key, value in a.ema.state_dict().items():
        assert torch.equal(b.ema.state_dict()[key], value), key
    assert str(b.optimizer.state_dict()) == str(a.optimizer.state_dict())
    assert b.scheduler.lr == a.scheduler.lr < 1e-2
    assert (b.saver.best_metric, b.saver.best_epoch) == (1.5, 1)
    assert (b.epoch, b.step, b.batches_done, b.bad_epochs) == (2, 13, 4, 1)
    assert {k: ckpt[k] for k in ("config", "model_name", "model_config")} == {
        "config": {"mode": "mlm"},
        "model_name": "gpt2",
        "model_config": {"d_model": 16},
    }
    assert tokenizer_from_state(ckpt["tokenizer"]).name == "3mer"


def test_load_for_eval_rebuilds_model_tokenizer_and_tree(tiny_runs):
    path = tiny_checkpoint(tiny_runs, "mlm")
    raw, ema = load_for_eval(path), load_for_eval(path, ema=True)
    ckpt = load_checkpoint(path)
    assert raw.model_name == "gpt2" and not raw.model.training
    assert raw.tokenizer.name == "3mer" and raw.hierarchy.num_leaves == 69
    for key, value in ckpt["model"].items():
        assert torch.equal(raw.model.state_dict()[key], value), key
    for key, value in ckpt["ema"].items():
        assert torch.equal(ema.model.state_dict()[key], value), key
    assert any(not torch.equal(ckpt["ema"][k], v) for k, v in ckpt["model"].items())
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_for_eval(tiny_checkpoint(tiny_runs, "clm"), ema=True)
