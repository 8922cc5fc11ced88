"""End-to-end tests of train.py on the demo corpus (CPU, tiny models)."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, load_script

from helm.checkpoint import load_checkpoint
from helm.models import MODELS

train = load_script("train.py")
TINY = [*TINY, "--log-interval", "1", "--warmup-epochs", "0", "--sched-on-updates"]


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Run train.main in-process with a per-test cache; returns (exit code, output folder)."""
    monkeypatch.setenv("HELM_CACHE_DIR", str(tmp_path / "cache"))

    def _run(*argv, out="run"):
        out_dir = tmp_path / out
        code = train.main([*TINY, "--output", str(out_dir), *argv])
        return code, out_dir

    return _run


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> list[float]:
    return [r["train/loss"] for r in read_log(out_dir) if "train/loss" in r]


@pytest.mark.parametrize("mode", ["mlm", "clm"])
@pytest.mark.parametrize("model", MODELS)
def test_loss_falls(run, model, mode):
    code, out = run(
        "--model_name", model, "--mode", mode, "--epochs", "3", "--lr", "3e-3", "--loss", "XE"
    )
    assert code == 0
    losses = train_losses(out)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.05, (model, mode, losses)
    # The demo corpus draws amino acids independently, so the best attainable loss is the entropy of
    # codon usage (about 4.0 nats); a model that learned nothing stays at ln(69) = 4.23.
    val = [r for r in read_log(out) if "val_xe" in r][-1]
    assert val["val_xe"] < math.log(69) - 0.1, val
    assert (out / "checkpoints" / "last.pt").exists() and (out / "config.yaml").exists()
    assert (out / "tokenizer").is_dir() and any((out / "tb").iterdir())


def test_quickstart_defaults_build_the_demo_run(run):
    code, out = run("--epochs", "1")
    assert code == 0
    records = read_log(out)
    # 96 records in batches of 8: 12 updates, a line each; then one validation and one test line.
    train_rows = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    (val,) = [r for r in records if "val_loss" in r]
    (test,) = [r for r in records if "test_loss" in r]
    assert (val["step"], val["epoch"], test["step"], test["epoch"]) == (12, 0, 12, 0)
    # Logits start near zero (init std 0.02): the first cross entropy is that of a uniform guess.
    assert abs(train_rows[0]["train/xe"] - math.log(69)) < 0.05
    for split, row in (("val", val), ("test", test)):
        m = {k.removeprefix(f"{split}_"): v for k, v in row.items() if k.startswith(split)}
        assert m["perplexity"] == pytest.approx(math.exp(m["xe"]), rel=1e-6)
        assert 0 <= m["accuracy"] <= m["aa_accuracy"] <= 1  # a right codon is a right amino acid
        # dist@1 averages the distance over all targets, the severity over the wrong ones only.
        assert m["dist@1"] == pytest.approx(m["mistake_severity"] * (1 - m["accuracy"]), rel=1e-6)
        assert 1 <= m["mistake_severity"] <= 4 and 0 < m["dist@5"] <= 4
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 12)
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "config",
        "tokenizer",
        "hierarchy",
    ):
        assert key in ckpt
    assert ckpt["config"]["loss"] == "HXE"  # the quickstart base layer


RESUME_ARGS = [
    "--model_name", "gpt2", "--mode", "mlm", "--epochs", "2", "--dropout", "0.1",
    "--model-ema", "--model-ema-decay", "0.9",
]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must equal."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HELM_CACHE_DIR", str(root / "cache"))
        assert train.main([*TINY, "--output", str(root / "full"), *RESUME_ARGS]) == 0
    return root / "full"


def _signal_at(monkeypatch, target: str, sig: int, call: int, after: bool = False) -> None:
    """Send ``sig`` to this process at the ``call``-th call of ``train.<target>`` (before the call,
    or right after it returns)."""
    owner, name = (
        (train.CheckpointManager, "save_epoch") if target == "save_epoch" else (train, target)
    )
    real, calls = getattr(owner, name), {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == call and not after:
            os.kill(os.getpid(), sig)
        out = real(*a, **k)
        if calls["n"] == call and after:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(owner, name, wrapper)


def _same_run(a_dir: Path, b_dir: Path) -> None:
    assert train_losses(b_dir) == pytest.approx(train_losses(a_dir), rel=0, abs=0)
    val = lambda d: [(r["step"], r["val_loss"]) for r in read_log(d) if "val_loss" in r]
    assert val(b_dir) == val(a_dir)  # every epoch's line, once, with the same values
    a = load_checkpoint(a_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(b_dir / "checkpoints" / "last.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key


@pytest.mark.parametrize(
    "phase, target, call, after, sig, saved",
    [
        # (epoch, batches_done, step) in last.pt after the stop; 12 updates an epoch
        ("mid-epoch", "to_device", 4, False, signal.SIGINT, (0, 4, 4)),
        ("right after an update", "optimizer_step", 5, True, signal.SIGTERM, (0, 5, 5)),
        ("during validation", "evaluate", 1, False, signal.SIGINT, (0, 12, 12)),
        ("during the checkpoint write", "save_epoch", 1, False, signal.SIGTERM, (1, 0, 12)),
    ],
)
def test_stop_signal_resumes_bit_for_bit(
    run, monkeypatch, reference, phase, target, call, after, sig, saved
):
    """SIGINT/SIGTERM stop at the next safe point with a consistent checkpoint; the resumed run
    equals the uninterrupted one bit for bit (losses, validation lines, weights, EMA)."""
    _signal_at(monkeypatch, target, sig, call, after)
    code, part = run(*RESUME_ARGS, out="part")
    assert code == 128 + sig
    ckpt = load_checkpoint(part / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["batches_done"], ckpt["step"]) == saved
    monkeypatch.undo()
    monkeypatch.setenv("HELM_CACHE_DIR", str(part.parent / "cache"))
    code, part = run(*RESUME_ARGS, "--resume", "auto", out="part")
    assert code == 0
    _same_run(reference, part)


def test_a_stop_after_a_non_finite_loss_keeps_the_last_good_checkpoint(run, monkeypatch, capsys):
    real = train.forward_backward
    calls = {"n": 0}

    def poisoned(*a, **k):  # update 14 (epoch 1) is non-finite; the stop comes two updates later
        loss, targets, tokens = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 16:
            os.kill(os.getpid(), signal.SIGTERM)
        return (loss * float("nan") if calls["n"] == 14 else loss), targets, tokens

    monkeypatch.setattr(train, "forward_backward", poisoned)
    code, out = run(*RESUME_ARGS, "--log-interval", "100")
    assert code == 3
    assert "non-finite loss at optimizer step 14" in capsys.readouterr().err
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 12  # epoch 0's, not the broken weights
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_kill_before_the_epoch_line_is_logged_is_mended_on_resume(run, monkeypatch, reference):
    """A run killed between its epoch checkpoint and the epoch's log line: the resumed run writes
    the missing line."""
    real = train.RunLogger.log

    def dies_at_the_first_val_line(self, step, values, **extra):
        if "val_loss" in values:
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this point runs
        return real(self, step, values, **extra)

    monkeypatch.setattr(train.RunLogger, "log", dies_at_the_first_val_line)
    code, part = run(*RESUME_ARGS, out="part")
    assert code == 130
    assert not [r for r in read_log(part) if "val_loss" in r]
    monkeypatch.undo()
    monkeypatch.setenv("HELM_CACHE_DIR", str(part.parent / "cache"))
    assert run(*RESUME_ARGS, "--resume", "auto", out="part")[0] == 0
    _same_run(reference, part)


def _ddp_worker(rank: int, world: int, port: int, batch, out_path: str) -> None:
    """One gloo rank: forward_backward on its half of `batch`, then one SGD step."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model, loss_fn = _tiny_lm()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = {k: v[rank::world] for k, v in batch.items()}
    micro = [
        {k: v[:2] for k, v in half.items()},
        {k: v[2:] for k, v in half.items()},
    ]  # accumulation
    _step(ddp, model, micro, loss_fn, world)
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    torch.distributed.destroy_process_group()


def _tiny_lm():
    from helm.hierarchy import build_hierarchy
    from helm.lm import LanguageModel
    from helm.losses.tables import HelmLoss, loss_tables
    from helm.models import build_model

    torch.manual_seed(0)
    backbone = build_model(
        "gpt2", vocab_size=69, d_model=16, num_layers=1, num_heads=2, d_ff=32, bidirectional=True
    )
    loss_fn = HelmLoss("HXE", loss_tables("HXE", build_hierarchy(), vocab_size=69), impl="torch")
    return LanguageModel(backbone), loss_fn


def _step(train_model, model, micro, loss_fn, world):
    from helm.lm import forward_backward

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    forward_backward(train_model, micro, loss_fn, scaler, None, world)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad


def _masked_batch(B=8, T=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 69, (B, T), generator=g)
    lengths = torch.randint(6, T + 1, (B,), generator=g)
    attn = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids * attn  # pad id 0
    labels = torch.where(
        (torch.rand(B, T, generator=g) < 0.3) & attn.bool(), ids, torch.full_like(ids, -100)
    )
    labels[:, 0] = ids[:, 0]  # every row has a target; rows differ in their counts
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def test_two_gloo_ranks_with_half_batches_equal_one_rank(tmp_path):
    import torch.multiprocessing as mp

    from helm.distributed import free_port

    batch = _masked_batch()
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, free_port(), batch, str(out)), nprocs=2, join=True)
    model, loss_fn = _tiny_lm()
    # One rank, the same four micro-batches' rows, same normalisation: one update.
    micro = [
        {k: v[r::2][s] for k, v in batch.items()}
        for r in (0, 1)
        for s in (slice(0, 2), slice(2, None))
    ]
    _step(model, model, micro, loss_fn, world=1)
    ddp_state = torch.load(out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6)


def test_many_flags_in_one_run(run):
    code, out = run(
        "--model_name",
        "gpt2",
        "--mode",
        "clm",
        "--epochs",
        "2",
        "--opt",
        "lamb",
        "--opt-betas",
        "0.9",
        "0.98",
        "--sched",
        "step",
        "--decay-epochs",
        "1",
        "--decay-rate",
        "0.5",
        "--model-ema",
        "--model-ema-force-cpu",
        "--layer-decay",
        "0.8",
        "--clip-grad",
        "0.05",
        "--clip-mode",
        "agc",
        "--grad-accum-steps",
        "2",
        "--amp",
        "--position_ids",
        "--pos_embedding",
        "rotary",
        "--lr-noise",
        "0.5",
        "--activation",
        "swiglu",
        "--tie_embeddings",
        "--pad_vocab_size_multiple",
        "16",
        "--loss",
        "soft_labels",
        "--hierarchy",
        "random",
        "--eval-metric",
        "val_accuracy",
        "--early-stop",
        "--patience-epochs",
        "5",
        "--checkpoint-hist",
        "1",
        "--sync-bn",
        "--worker-seeding",
        "part",
        "--truncation",
        "random",
        "--epoch-repeats",
        "1.5",
    )
    assert code == 0
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["config"]["opt"] == "lamb" and ckpt["hierarchy"]["kind"] == "random"
    assert ckpt["model"]["embed.tok.weight"].shape[0] == 80  # 69 padded to a multiple of 16
    assert len(list((out / "checkpoints").glob("epoch-*.pt"))) == 1
    # 1.5 passes per epoch over 96 records in batches of 8 (12 batches), 2 per update.
    assert ckpt["step"] == 2 * 9


def test_ema_with_warmup_is_the_average_readme_states(run, monkeypatch):
    """--model-ema-warmup: after update k the EMA is d_k ema + (1 - d_k) w_k with
    d_k = min(decay, 1 - k^(-2/3)) (timm ModelEmaV3; d_1 = 0 copies the weights), recomputed
    here from the weights after every update and compared with the checkpoint's EMA."""
    real, weights = train.optimizer_step, []

    def recording(model, *a, **k):
        out = real(model, *a, **k)
        weights.append({n: v.detach().clone() for n, v in model.backbone.state_dict().items()})
        return out

    monkeypatch.setattr(train, "optimizer_step", recording)
    decay = 0.99
    code, out = run("--epochs", "1", "--num_samples", "48", "--split", "0.98,0.01,0.01",
                    "--model-ema", "--model-ema-warmup", "--model-ema-decay", str(decay))  # fmt: skip
    assert code == 0 and len(weights) == 6
    ema = {n: torch.zeros_like(v) for n, v in weights[0].items()}
    for k, w in enumerate(weights, start=1):
        d = min(decay, 1 - k ** (-2 / 3))
        ema = {n: d * ema[n] + (1 - d) * w[n] for n in ema}
    saved = load_checkpoint(out / "checkpoints" / "last.pt")["ema"]
    for name, value in ema.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # Not the raw weights either: the average lags behind them.
    assert any(not torch.allclose(saved[n], weights[-1][n]) for n in saved)


def test_the_seed_sets_the_training_order(tmp_path, monkeypatch):
    """--seed reaches the training loader: on the same prepared records, two seeds give two
    orders of the same batches' records and one seed gives one order."""
    from helm.config import data_kwargs, parse_config
    from helm.data.prepare import prepare_data
    from helm.distributed import DistInfo

    monkeypatch.setenv("HELM_CACHE_DIR", str(tmp_path / "cache"))
    args = parse_config(TINY)
    data = prepare_data(**data_kwargs(vars(args)), tokenizer_dir=tmp_path / "tokenizer")
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

    def order(seed: int) -> list[list[int]]:
        args.seed = seed
        sampler = train.Loaders(data, args, info).train.batch_sampler
        sampler.set_epoch(0)
        return [list(map(int, b)) for b in sampler]

    one, two, again = order(1), order(2), order(1)
    assert one == again and one != two
    assert sorted(sum(one, [])) == sorted(sum(two, [])) == list(range(96))


def test_user_errors_are_reported_without_traceback(run, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    good = "ATGAAACCCGGGTTTAAA" * 3 + "TAA"
    bad.write_text("\n".join([good] * 6 + ["ATGXXTAA"] + [good] * 40) + "\n")
    code, _ = run("--train_file", str(bad))
    assert code == 2
    err = capsys.readouterr().err
    assert (
        "bad.txt:7: invalid character" in err
        and "--on-invalid skip" in err
        and "Traceback" not in err
    )
    code, _ = run("--tokenizer", "nuc", "--loss", "HXE")
    assert code == 2 and "--tokenizer 3mer" in capsys.readouterr().err
    code, _ = run("--resume", str(tmp_path / "missing.pt"))
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code, _ = run("--accelerator", "tpu")
    assert code == 2 and "tpu" in capsys.readouterr().err


def test_torchrun_two_processes(tmp_path):
    env = {**os.environ, "HELM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(ROOT / "train.py"),
        *TINY,
        "--epochs",
        "1",
        "--output",
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr
    _two_ranks_trained_one_run(tmp_path / "ddp")


def _two_ranks_trained_one_run(out: Path) -> None:
    """96 records, 8 a rank and update: 6 updates of the global batch of 16, each logged once
    (rank 0 writes), one validation line, and a checkpoint at step 6."""
    records = read_log(out)
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 7))
    assert [r["step"] for r in records if "val_loss" in r] == [6]
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 6)


WRAPPER = """
import os, sys
sys.path.insert(0, {root!r})
import train
rank, real = int(os.environ["RANK"]), train.forward_backward
calls = {{"n": 0}}


def forward_backward(*a, **k):  # rank 1's third update is non-finite; rank 0's never is
    loss, targets, tokens = real(*a, **k)
    calls["n"] += 1
    return (loss * float("nan") if rank == 1 and calls["n"] == 3 else loss), targets, tokens


train.forward_backward = forward_backward
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """The finiteness check is a collective: every rank stops at the same log step with exit 3,
    none is left waiting in an all-reduce."""
    script = tmp_path / "wrapped_train.py"
    script.write_text(WRAPPER.format(root=str(ROOT)))
    env = {**os.environ, "HELM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
           *TINY, "--epochs", "1", "--log-interval", "3", "--output", str(tmp_path / "ddp")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = proc.stderr  # (torchrun itself reports failed ranks with a traceback of its own)
    assert err.count("non-finite loss at optimizer step 3") == 2  # both ranks, the same step
    assert "Connection closed" not in err and "gloo" not in err.lower()


def test_num_devices_spawns_local_ranks_without_torchrun(tmp_path):
    env = {**os.environ, "HELM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY,
        "--epochs",
        "1",
        "--num_devices",
        "2",
        "--output",
        str(tmp_path / "spawn"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr
    _two_ranks_trained_one_run(tmp_path / "spawn")


@pytest.mark.parametrize("loss", ["HXE", "soft_labels"])
def test_kernel_and_reference_give_the_same_training_run(run, loss):
    """--loss-impl triton (the fused kernel, interpreted on CPU) against the PyTorch reference."""
    small = [
        "--num_samples",
        "24",
        "--max_seq_len",
        "24",
        "--epochs",
        "1",
        "--split",
        "0.99,0.005,0.005",  # 15 val and test records: the interpreter scores every position
    ]
    code, ref = run("--loss", loss, "--loss-impl", "torch", *small, out="ref")
    assert code == 0
    code, ker = run("--loss", loss, "--loss-impl", "triton", *small, out="kernel")
    assert code == 0
    a, b = train_losses(ref), train_losses(ker)
    assert len(a) == len(b) >= 3
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(run, monkeypatch, capsys, policy):
    real = train.forward_backward
    calls = {"n": 0}

    def poisoned(*a, **k):
        loss, targets, tokens = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), targets, tokens

    monkeypatch.setattr(train, "forward_backward", poisoned)
    code, out = run("--epochs", "1", "--nan-policy", policy)
    messages = capsys.readouterr().err
    if policy == "stop":
        assert code == 3
        assert "non-finite loss at optimizer step 3" in messages and "--nan-policy skip" in messages
    else:
        assert code == 0
        assert "1 updates were skipped" in messages
        ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("tokenizer", ["bpe", "wp", "ug"])
def test_subword_tokenizer_is_trained_saved_and_restored(run, tokenizer):
    from helm.checkpoint import load_for_eval

    code, out = run(
        "--tokenizer", tokenizer, "--vocab_size", "120", "--loss", "XE", "--epochs", "1"
    )
    assert code == 0
    loaded = load_for_eval(out / "checkpoints" / "last.pt")
    assert loaded.tokenizer.name == tokenizer and loaded.tokenizer.vocab_size <= 120
    seq = "ATGGCTGCAAAGTTTCCCGGGTAA"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(seq)) == seq
    assert (out / "tokenizer").is_dir()


def test_training_in_process_leaves_logging_as_it_found_it(run):
    import logging

    helm_log = logging.getLogger("helm")
    before = (list(helm_log.handlers), helm_log.propagate, helm_log.level)
    code, out = run("--epochs", "1")
    assert code == 0
    assert (list(helm_log.handlers), helm_log.propagate, helm_log.level) == before
    assert (out / "train.log").read_text()  # the run did log to its file while it ran


def test_resume_continues_the_run_as_configured(run, capsys):
    """README's short form resumes a CLM run as CLM (the checkpoint's configuration is the run's);
    a setting that would change what is trained is refused, naming it; --epochs may change."""
    code, out = run("--mode", "clm", "--epochs", "1")
    assert code == 0
    code = train.main(["--output", str(out), "--resume", "auto", "--epochs", "2"])
    assert code == 0
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["config"]["mode"] == "clm" and ckpt["epoch"] == 2
    assert "mode: clm" in (out / "config.yaml").read_text()
    capsys.readouterr()
    code = train.main(["--output", str(out), "--resume", "auto", "--num_layers", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "--num_layers 3 (the run has 2)" in err and "Traceback" not in err


def test_resume_auto_needs_a_run(run, tmp_path, capsys):
    code, out = run("--resume", "auto", out="typo")
    err = capsys.readouterr().err
    assert code == 2 and "holds no run to continue" in err and "--resume if-exists" in err
    assert not out.exists()  # a failed start leaves no run folder behind
    code, out = run("--resume", "if-exists", "--epochs", "1", out="fresh")
    assert code == 0 and (out / "checkpoints" / "last.pt").exists()


def test_start_up_errors_are_one_line_and_leave_nothing(run, tmp_path, capsys):
    code, out = run("--lrr", "0.1")
    err = capsys.readouterr().err
    assert code == 2 and "did you mean --lr?" in err and "usage:" not in err
    assert len(err.strip().splitlines()) == 2  # the error and the pointer to --help
    folder = tmp_path / "data"
    folder.mkdir()
    code, out = run("--train_file", str(folder))
    assert code == 2 and "is a directory" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("ATGXXX\n" * 20)
    code, out = run("--train_file", str(bad), out="failed")
    assert code == 2 and not out.exists()


def test_hierarchical_runs_log_cross_entropy_beside_their_loss(run):
    code, out = run("--loss", "HXE", "--epochs", "1")
    assert code == 0
    rows = [r for r in read_log(out) if "train/loss" in r]
    assert rows and all(3.5 < r["train/xe"] < 4.5 and r["train/loss"] < 0.1 for r in rows)
    code, out = run("--loss", "XE", "--epochs", "1", out="xe")
    assert code == 0 and all("train/xe" not in r for r in read_log(out))


def test_init_from_starts_a_run_from_trained_weights(run, capsys):
    code, first = run("--epochs", "1", out="first")
    assert code == 0
    trained = load_checkpoint(first / "checkpoints" / "last.pt")["model"]
    code, out = run("--epochs", "1", "--init-from", str(first / "checkpoints" / "last.pt"),
                    "--lr", "1e-12", "--warmup-lr", "1e-12", "--min-lr", "0", out="second")  # fmt: skip
    assert code == 0
    again = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    for key, value in trained.items():  # a vanishing lr leaves the loaded weights in place
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6)
    capsys.readouterr()
    code, _ = run("--init-from", str(first / "checkpoints" / "last.pt"), "--hidden_size", "48",
                  out="third")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--hidden_size" in err and "Traceback" not in err


def test_a_model_that_cannot_fit_is_refused_before_allocation(run, capsys):
    code, out = run("--hidden_size", "20000", "--num_layers", "64", "--intermediate_size", "80000")
    err = capsys.readouterr().err
    assert code == 2 and "GiB" in err and "--hidden_size" in err and "Traceback" not in err
    assert not out.exists()
