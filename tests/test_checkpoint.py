"""The checkpoint format: atomic writes, history, a training state's round trip, eval loading;
safe loading (crafted payloads), digests (flipped bits), old files, kills between writes."""

import os
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_checkpoint

from helm.checkpoint import (
    REQUIRED_KEYS,
    CheckpointError,
    CheckpointManager,
    RunInfo,
    TrainState,
    atomic_save,
    load_checkpoint,
    load_for_eval,
    save_checkpoint,
    seal,
    tokenizer_from_state,
    tokenizer_state,
)
from helm.hierarchy import build_hierarchy
from helm.models import build_model
from helm.optim import build_optimizer
from helm.sched import build_scheduler
from helm.tokenizers import build_tokenizer


def _minimal(epoch: int = 0, w: float = 1.0, best_epoch: int | None = None) -> dict:
    """A small checkpoint dict with every entry a loader reads."""
    ckpt = {key: {} for key in REQUIRED_KEYS}
    ckpt.update(model={"w": torch.full((3,), w)}, epoch=epoch, step=epoch, batches_done=0, rng=[])
    ckpt["saver"] = {"best_metric": None, "best_epoch": best_epoch}
    return ckpt


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), RuntimeError("file write failed")]
)
def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch, error):
    """A full disk (an OSError, or the zip writer's RuntimeError) is a CheckpointError; the
    previous file stays and no temporary is left."""
    path = tmp_path / "last.pt"
    save_checkpoint(_minimal(w=1.0), path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise error

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*no space left"):
        save_checkpoint(_minimal(w=0.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_checkpoint_history_keeps_newest_and_best(tmp_path):
    saver = CheckpointManager(tmp_path, keep=2, mode="min")
    for epoch, metric in enumerate([3.0, 1.0, 2.0, 2.5]):
        improved = saver.update_best(metric, epoch)
        saver.save_epoch(_minimal(epoch, best_epoch=saver.best_epoch), epoch, improved)
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


def _run_info() -> RunInfo:
    return RunInfo(
        config={"mode": "mlm", "split": [0.9, 0.05, 0.05], "lr_noise": None, "amp": False},
        model_name="gpt2",
        model_config={"d_model": 16},
        tokenizer=tokenizer_state(build_tokenizer("3mer")),
        hierarchy=build_hierarchy().state_dict(),
    )


def test_train_state_round_trip(tmp_path):
    """Everything a resume needs comes back: weights, EMA, optimizer moments, schedule, best
    metric, counters and the RNG streams."""
    run = _run_info()
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
    save_checkpoint(a.checkpoint(run), tmp_path / "ckpt.pt")
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
        "config": run.config,
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


# Safe loading: a checkpoint cannot run code ---------------------------------------------------------


def _trained_checkpoint(path: Path) -> Path:
    """A real training checkpoint (weights, EMA, Adam moments) written by save_checkpoint."""
    state = _state(path.parent / "saver", seed=0)
    state.model.lm_head(state.model(torch.randint(5, 69, (2, 7)))).sum().backward()
    state.optimizer.step()
    save_checkpoint(state.checkpoint(_run_info()), path)
    return path


class _Reduce:
    """An object whose unpickling calls ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict:
    touch = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": _Reduce(os.system, touch),
        "subprocess": _Reduce(subprocess.call, ["touch", str(marker)]),
        "exec": _Reduce(exec, code),
        "eval": _Reduce(eval, code),
        "numpy object array": np.array([_Reduce(os.system, touch)], dtype=object),
    }


PAYLOAD_PLACES = ["top level", "in the weights", "in the tokenizer", "old format"]


@pytest.mark.parametrize("place", PAYLOAD_PLACES)
@pytest.mark.parametrize(
    "payload", ["os.system", "subprocess", "exec", "eval", "numpy object array"]
)
def test_crafted_payload_is_refused_and_never_runs(tmp_path, payload, place):
    marker = tmp_path / "MARKER"
    evil = _payloads(marker)[payload]
    ckpt = seal(_minimal())
    if place == "top level":
        ckpt["extra"] = evil
    elif place == "in the weights":
        ckpt["model"]["w"] = evil
    elif place == "in the tokenizer":
        ckpt["tokenizer"] = {"tar": evil, "config": "{}"}
    else:  # an old-format file: its numpy RNG state is the one thing allowed beside tensors
        del ckpt["format_version"], ckpt["digest"]
        ckpt["rng"] = [{"python": random.getstate(), "numpy": np.random.get_state(), "x": evil}]
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)  # plain torch.save, as an attacker would
    for load in (load_checkpoint, load_for_eval):
        with pytest.raises(CheckpointError, match=f"checkpoint {path} is refused: .*nothing in it"):
            load(path)
    assert not marker.exists()


def test_convert_refuses_a_payload_without_unsafe(tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = _minimal()
    ckpt["extra"] = _payloads(marker)["os.system"]
    torch.save(ckpt, tmp_path / "evil.pt")
    cli = [
        sys.executable,
        "-m",
        "helm.checkpoint",
        "convert",
        tmp_path / "evil.pt",
        tmp_path / "n.pt",
    ]
    proc = subprocess.run(cli, capture_output=True, text=True)
    assert proc.returncode == 2 and "is refused" in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "n.pt").exists()


def test_non_plain_values_are_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['config'\]\['lr'\] is a numpy.float64"):
        save_checkpoint({**_minimal(), "config": {"lr": np.float64(0.1)}}, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


# Integrity: a corrupted file is named ----------------------------------------------------------------


def _storage_offsets(path: Path) -> list[tuple[str, int, int]]:
    """(entry, first byte, size) of each tensor storage inside a checkpoint's zip."""
    raw = path.read_bytes()
    out = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size:
                assert info.compress_type == zipfile.ZIP_STORED
                name_len, extra_len = struct.unpack(
                    "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
                )
                out.append(
                    (info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size)
                )
    return out


def _flip(src: Path, dst: Path, byte: int, bit: int) -> None:
    data = bytearray(src.read_bytes())
    data[byte] ^= 1 << bit
    dst.write_bytes(bytes(data))


def test_a_flipped_bit_in_any_tensor_is_named_as_corruption(tmp_path):
    good = _trained_checkpoint(tmp_path / "good.pt")
    storages = _storage_offsets(good)
    assert len(storages) > 20  # weights, EMA, Adam moments, RNG, tokenizer
    rng = random.Random(0)
    for _, start, size in storages:
        bad = tmp_path / "bad.pt"
        _flip(good, bad, start + rng.randrange(size), rng.randrange(8))
        with pytest.raises(
            CheckpointError, match=f"checkpoint {bad} is corrupted: digest mismatch"
        ):
            load_checkpoint(bad)
    load_checkpoint(good)


def test_no_flipped_bit_or_truncation_loads_silently(tmp_path):
    """Anywhere in the file (zip headers, the pickle, the data): a CheckpointError, or (when the
    flip hit bytes the reader ignores) exactly the original contents."""
    good = _trained_checkpoint(tmp_path / "good.pt")
    expected = load_checkpoint(good)["digest"]
    size = good.stat().st_size
    rng = random.Random(1)
    bad = tmp_path / "bad.pt"
    for _ in range(150):
        _flip(good, bad, rng.randrange(size), rng.randrange(8))
        try:
            assert load_checkpoint(bad)["digest"] == expected
        except CheckpointError as exc:
            assert str(bad) in str(exc)
    odd = seal(_minimal())
    odd["model"]["shape"] = torch.Size([3])  # loadable, but never written by save_checkpoint
    torch.save(odd, bad)
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} is corrupted: .*torch.Size"):
        load_checkpoint(bad)
    for cut in (0, 10, size // 3, size - 1):
        bad.write_bytes(good.read_bytes()[:cut])
        with pytest.raises(CheckpointError, match=f"checkpoint {bad} is corrupted"):
            load_checkpoint(bad)


# Old checkpoints ---------------------------------------------------------------------------------


def test_old_format_loads_safely_and_converts(tmp_path, caplog):
    """A version-1 file (pickled python/numpy RNG states, tokenizer as bytes, no digest) loads with
    a warning, restores the RNG streams, and converts to a verified version-2 file."""
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    old = _minimal()
    old["rng"] = [
        {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
    ]
    old["tokenizer"] = {
        "tar": tokenizer_state(build_tokenizer("3mer"))["tar"].numpy().tobytes(),
        "config": "{}",
    }
    torch.save(old, tmp_path / "old.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert "old format" in caplog.text
    state = _state(tmp_path / "s", seed=0)
    state.optimizer, state.scheduler = None, None  # only the RNG part of restore is under test
    from helm.checkpoint import set_rng_state

    set_rng_state(ckpt["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert tokenizer_from_state(ckpt["tokenizer"]).name == "3mer"

    cli = [
        sys.executable,
        "-m",
        "helm.checkpoint",
        "convert",
        tmp_path / "old.pt",
        tmp_path / "new.pt",
    ]
    assert subprocess.run(cli, capture_output=True).returncode == 0
    new = load_checkpoint(tmp_path / "new.pt")
    assert new["format_version"] == 2 and torch.equal(new["model"]["w"], old["model"]["w"])


def test_a_checkpoint_of_another_model_is_a_checkpoint_error(tmp_path):
    path = _trained_checkpoint(tmp_path / "a.pt")
    torch.manual_seed(0)
    other = _state(tmp_path / "b", seed=0)
    other.model = build_model("gpt2", vocab_size=69, d_model=8, num_layers=1, num_heads=2, d_ff=16)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} does not fit this model"):
        other.restore(load_checkpoint(path), path)
    with pytest.raises(CheckpointError, match="not a complete HELM checkpoint: no .*'epoch'"):
        torch.save(seal({"model": {}}), tmp_path / "c.pt")
        load_checkpoint(tmp_path / "c.pt")


# last / best / epoch files under a kill at any instant ----------------------------------------------


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("kill_at", [1, 2, 3, None])  # epoch 1's renames: epoch file, best, last
def test_best_is_right_whatever_instant_a_kill_strikes(tmp_path, monkeypatch, kill_at):
    renames, replace = [], os.replace

    def dying_replace(src, dst):
        renames.append(dst)
        if len(renames) == kill_at:
            raise _Killed
        replace(src, dst)

    saver = CheckpointManager(tmp_path, keep=3)
    for epoch, metric in ((0, 2.0), (1, 1.0)):
        improved = saver.update_best(metric, epoch)
        ckpt = _minimal(epoch, w=float(epoch), best_epoch=saver.best_epoch)
        if epoch == 1:
            monkeypatch.setattr(os, "replace", dying_replace)
        try:
            saver.save_epoch(ckpt, epoch, improved)
        except _Killed:
            pass
        monkeypatch.undo()

    fresh = CheckpointManager(tmp_path, keep=3)  # a resumed run
    assert not list(tmp_path.glob(".*.tmp"))
    best = fresh.load_best()  # from last.pt's record alone
    fresh.load_state_dict(load_checkpoint(fresh.last)["saver"])
    assert fresh.load_best().path == best.path
    # Until last.pt names epoch 1 the run's best is epoch 0, even when best.pt already holds 1.
    expected = 1 if kill_at is None else 0
    assert best.epoch == fresh.best_epoch == expected
    assert torch.equal(best.checkpoint["model"]["w"], torch.full((3,), float(expected)))
    assert (fresh.load_best().path, fresh.load_best().epoch) == (best.path, expected)


def test_best_falls_back_to_last_when_no_epoch_was_chosen(tmp_path):
    saver = CheckpointManager(tmp_path, keep=1)
    for epoch in range(2):
        ckpt = _minimal(epoch + 1, w=float(epoch))  # a finished epoch e records epoch e + 1
        saver.save_epoch(ckpt, epoch, saver.update_best(None, epoch))
    best = saver.load_best()
    assert (best.path.name, best.epoch) == ("last.pt", 1)


def test_leftover_temporaries_are_removed_on_start(tmp_path):
    for name in (".last.pt.abc123.tmp", ".best.pt.link.tmp", "epoch-0001.pt", "notes.tmp"):
        (tmp_path / name).write_bytes(b"x")
    CheckpointManager(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001.pt", "notes.tmp"]


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({"model": {}}, tmp_path / "a.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644  # group and others may read


def test_a_mid_epoch_checkpoint_resumes_on_as_many_ranks(tmp_path):
    """batches_done counts each rank's batches: another world size would retrain some and skip
    others, so it is refused mid-epoch (an epoch-end checkpoint resumes anywhere)."""
    a = _state(tmp_path / "a", seed=0)
    a.world_size, a.epoch, a.batches_done = 2, 1, 6
    run = RunInfo(
        {}, "gpt2", {}, tokenizer_state(build_tokenizer("3mer")), build_hierarchy().state_dict()
    )
    ckpt = a.checkpoint(run)
    b = _state(tmp_path / "b", seed=0)
    with pytest.raises(CheckpointError, match="resume it on 2 rank"):
        b.restore(ckpt)
    ckpt["batches_done"] = 0
    b.restore(ckpt)
    assert b.epoch == 1


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    text = tmp_path / "seqs.txt"
    text.write_text("ATGGCCTAA\n")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(text)
