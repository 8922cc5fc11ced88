"""Sharded training (--fsdp, FSDP2), activation checkpointing (--grad-ckpt) and sharded checkpoints
(DCP folders) on the CPU: gloo ranks, tiny models, the demo corpus."""

import copy
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import ROOT, TINY, load_script

from helm import parallel
from helm.checkpoint import CheckpointError, load_checkpoint
from helm.distributed import free_port
from helm.fileio import MANIFEST, sha256_file
from helm.lm import LanguageModel, forward_backward
from helm.models import MODELS, build_model

train = load_script("train.py")
evalpy = load_script("eval.py")
# Two epochs of 6 updates (12 batches, 2 micro-batches an update), with what sharding must carry:
# dropout, an EMA, clipping and layer decay; small validation and test splits (30 records each).
RUN = [
    *TINY, "--epochs", "2", "--warmup-epochs", "0", "--sched-on-updates", "--log-interval", "1",
    "--split", "0.98,0.01,0.01",
    "--dropout", "0.1", "--model-ema", "--model-ema-decay", "0.9", "--grad-accum-steps", "2",
    "--clip-grad", "1", "--layer-decay", "0.9",
]  # fmt: skip


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _lines(out: Path, key: str) -> list[dict]:
    return [r for r in _log(out) if key in r]


# Activation checkpointing --------------------------------------------------------------------------


def _batch(B: int = 4, T: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 69, (B, T), generator=g)
    attn = (torch.arange(T)[None] < torch.tensor([T, T - 3, T, T - 5])[:, None]).long()
    labels = torch.where(attn.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids * attn, "labels": labels, "attention_mask": attn}


def _grads_and_saved_bytes(model: LanguageModel) -> tuple[dict[str, torch.Tensor], int]:
    """The gradients of one backward (dropout on, seeded) and the bytes autograd kept for it."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, targets = model(**_batch())
    torch.nn.functional.cross_entropy(logits.float(), targets).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("name", MODELS)
def test_activation_checkpointing_gives_the_same_gradients(name):
    """--grad-ckpt recomputes each block (dropout replayed): the same gradients to 1e-6, the same
    parameter names, and far fewer activations kept between forward and backward."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=69, d_model=32, num_layers=3, num_heads=2, d_ff=64, dropout=0.1)
    model = LanguageModel(build_model(name, **cfg)).train()
    checkpointed = copy.deepcopy(model)
    parallel.checkpoint_blocks(checkpointed)
    plain, plain_bytes = _grads_and_saved_bytes(model)
    grads, ckpt_bytes = _grads_and_saved_bytes(checkpointed)
    assert list(grads) == list(plain)
    for key, grad in plain.items():
        torch.testing.assert_close(grads[key], grad, rtol=0, atol=1e-6, msg=key)
    assert ckpt_bytes < 0.5 * plain_bytes


# FSDP in one process (a process group of one) ------------------------------------------------------


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield parallel.device_mesh(torch.device("cpu"), 1)
    finally:
        dist.destroy_process_group()


def test_unsharded_accumulation_keeps_parameters_gathered_until_the_last_micro_batch(
    group_of_one,
):
    """--fsdp-accum unsharded: from the first micro-batch's forward to the last one's backward
    the blocks keep whole (gathered) parameters; after it every parameter is a shard again, with
    the gradient of the default policy (which reshards after every micro-batch)."""
    from torch.distributed.tensor import DTensor

    def run(keep: bool):
        torch.manual_seed(0)
        model = LanguageModel(build_model("gpt2", vocab_size=69, d_model=32, num_layers=2,
                                          num_heads=2, d_ff=64))  # fmt: skip
        parallel.shard(model, group_of_one, gathered=keep)
        block = model.backbone.blocks[0]
        seen = []  # at the start of each micro-batch, before FSDP's own hooks run

        def look(*_):
            p = next(block.parameters())
            seen.append((isinstance(p, DTensor), p.grad is not None))

        model.register_forward_pre_hook(look, prepend=True)
        loss_fn = lambda logits, targets, reduction: torch.nn.functional.cross_entropy(
            logits, targets, reduction=reduction
        )
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        sync = parallel.accumulation(model, keep)
        forward_backward(model, [_batch()] * 3, loss_fn, scaler, None, 1, sync=sync)
        sharded = all(isinstance(p, DTensor) for p in model.parameters())
        return seen, sharded, {n: p.grad.full_tensor() for n, p in model.named_parameters()}

    # (sharded, with a gradient): whole parameters accumulating whole gradients, unreduced
    seen, sharded, kept = run(keep=True)
    assert seen == [(True, False), (False, True), (False, True)] and sharded
    seen, sharded, default = run(keep=False)  # shards, the reduced gradients accumulated
    assert seen == [(True, False), (True, True), (True, True)] and sharded
    for key, grad in default.items():
        torch.testing.assert_close(kept[key], grad, rtol=1e-5, atol=1e-7, msg=key)


# Sharded runs in one process: the same arithmetic as unsharded, resumable bit for bit ------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``ref``: an unsharded run; ``fsdp``: the same run sharded (one rank), stopped by SIGINT in
    the middle of epoch 0 and resumed with --resume auto; ``stopped``: the folder at the stop."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HELM_CACHE_DIR", str(root / "cache"))
        assert train.main([*RUN, "--output", str(root / "ref")]) == 0
        real, calls = train.to_device, {"n": 0}

        def stop_at_the_fifth_batch(*a, **k):
            calls["n"] += 1
            if calls["n"] == 5:
                os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **k)

        mp.setattr(train, "to_device", stop_at_the_fifth_batch)
        assert train.main([*RUN, "--fsdp", "--output", str(root / "fsdp")]) == 130
        mp.undo()
        mp.setenv("HELM_CACHE_DIR", str(root / "cache"))
        shutil.copytree(root / "fsdp", root / "stopped", symlinks=True)
        assert train.main([*TINY, "--resume", "auto", "--output", str(root / "fsdp")]) == 0
    return root


def _weights(path: Path) -> dict:
    ckpt = load_checkpoint(path)  # a .dcp folder reads whole, in this one process
    return {"model": ckpt["model"], "ema": ckpt["ema"]}


def test_a_sharded_run_stopped_and_resumed_equals_the_unsharded_run_bit_for_bit(runs):
    ref, fsdp = runs / "ref", runs / "fsdp"
    stopped = runs / "stopped" / "checkpoints"
    assert os.readlink(stopped / "last.dcp").startswith("shards/step-00000003-")  # mid-epoch
    files = sorted(p.name for p in (stopped / "last.dcp").resolve().iterdir())
    assert files == [".metadata", MANIFEST, "__0_0.distcp", "state.pt"]
    assert [r["train/loss"] for r in _lines(fsdp, "train/loss")] == [
        r["train/loss"] for r in _lines(ref, "train/loss")
    ]
    val = lambda out: [
        (r["step"], r["val_loss"], r["ema_val_loss"]) for r in _lines(out, "val_loss")
    ]
    assert val(fsdp) == val(ref)
    assert _lines(fsdp, "test_loss")[-1]["test_loss"] == _lines(ref, "test_loss")[-1]["test_loss"]
    a, b = _weights(ref / "checkpoints" / "last.pt"), _weights(fsdp / "checkpoints" / "last.dcp")
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), (part, key)
    # The mid-epoch folder was pruned once the epochs' checkpoints superseded it.
    links = sorted(p.name for p in (fsdp / "checkpoints").iterdir() if p.is_symlink())
    assert links == ["best.dcp", "epoch-0000.dcp", "epoch-0001.dcp", "last.dcp"]
    assert len(list((fsdp / "checkpoints" / "shards").iterdir())) == 2


def test_a_single_file_checkpoint_resumes_sharded(runs, monkeypatch):
    """epoch-0000.pt of the unsharded run resumed with --fsdp ends where the uninterrupted run
    ends (a folder resumes unsharded in the two-rank test below)."""
    monkeypatch.setenv("HELM_CACHE_DIR", str(runs / "cache"))
    source, out = runs / "ref" / "checkpoints" / "epoch-0000.pt", runs / "pt_to_fsdp"
    assert train.main([*TINY, "--resume", str(source), "--fsdp", "--output", str(out)]) == 0
    val = lambda run: [(r["step"], r["val_loss"]) for r in _lines(run, "val_loss")]
    assert val(out) == val(runs / "ref")  # epoch 0's line re-logged from the checkpoint


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder.resolve(), to)
    return to


def _reseal(folder: Path) -> None:
    """Rewrite SHA256SUMS for the folder as it is now (as a forger would)."""
    names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    (folder / MANIFEST).write_text("".join(f"{sha256_file(folder / n)}  {n}\n" for n in names))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_damaged_incomplete_or_crafted_folder_is_refused(runs, tmp_path, monkeypatch):
    last = runs / "fsdp" / "checkpoints" / "last.dcp"
    flipped = _copy(last, tmp_path / "flipped.dcp")
    shard = flipped / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted: __0_0.distcp differs from its digest"):
        load_checkpoint(flipped)

    unfinished = _copy(last, tmp_path / "unfinished.dcp")
    (unfinished / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete: it has no SHA256SUMS"):
        load_checkpoint(unfinished)

    monkeypatch.chdir(tmp_path)
    crafted = _copy(last, tmp_path / "crafted.dcp")
    (crafted / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    _reseal(crafted)  # the digests match: only the unpickler's allow-list stands in the way
    with pytest.raises(
        CheckpointError, match="refused: its .metadata holds a reference to posix.system"
    ):
        load_checkpoint(crafted)
    assert not (tmp_path / "pwned").exists()


# Two gloo ranks: FSDP on two "nodes" equals DDP; a folder reshards 1 -> 2 -> 1 ---------------------


def _torchrun(*args: str, out: Path, nodes: int = 1, port: int | None = None) -> list[list[str]]:
    """The torchrun command(s): one per node, each node one process (c10d rendezvous on
    127.0.0.1), or a single node of two."""
    base = [sys.executable, "-m", "torch.distributed.run"]
    script = [str(ROOT / "train.py"), *TINY, *args, "--output", str(out)]
    if nodes == 1:
        return [[*base, "--nproc_per_node", "2", *script]]
    rdzv = ["--nnodes", str(nodes), "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "helm-fsdp-test"]  # fmt: skip
    return [[*base, *rdzv, *script] for _ in range(nodes)]


def test_fsdp_on_two_nodes_equals_ddp_and_its_folder_resumes_in_one_process(runs, tmp_path):
    """epoch-0000.dcp of the one-rank sharded run continues on two ranks: DDP (one node of two
    processes) and FSDP with --grad-ckpt and --fsdp-accum unsharded (two "nodes" of one process,
    c10d rendezvous). Their validation and test metrics agree to 1e-4; the FSDP folder holds
    each rank's shards, resumes in a single process (2 -> 1), and eval.py reads it like DDP's file."""
    source = runs / "fsdp" / "checkpoints" / "epoch-0000.dcp"
    env = {**os.environ, "HELM_CACHE_DIR": str(runs / "cache"), "OMP_NUM_THREADS": "1"}
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    commands = [
        *_torchrun("--resume", str(source), "--no-fsdp", out=ddp),
        *_torchrun(
            "--resume",
            str(source),
            "--grad-ckpt",
            "--fsdp-accum",
            "unsharded",
            out=fsdp,
            nodes=2,
            port=free_port(),
        ),  # fmt: skip
    ]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for c in commands]  # fmt: skip
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-2000:] for e in errors)
    assert "FSDP over 2 rank(s)" in errors[1] + errors[2]  # rank 0 logs, on either node

    for key in ("val_loss", "test_loss"):
        a, b = _lines(ddp, key)[-1], _lines(fsdp, key)[-1]
        assert a["step"] == b["step"] == 9  # 6 updates an epoch on one rank, 3 on two
        for name, value in a.items():
            if name not in ("time", "step", "epoch"):
                assert b[name] == pytest.approx(value, rel=1e-4), name
    last = fsdp / "checkpoints" / "last.dcp"
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in last.iterdir()}

    env_cache = pytest.MonkeyPatch()
    env_cache.setenv("HELM_CACHE_DIR", str(runs / "cache"))
    try:
        one = tmp_path / "one"
        argv = [*TINY, "--resume", str(last), "--epochs", "3", "--output", str(one)]
        assert train.main(argv) == 0
        assert _lines(one, "val_loss")[-1]["step"] == 15
        assert (one / "checkpoints" / "last.dcp").is_dir()
        sequences = tmp_path / "seqs.txt"
        sequences.write_text("\n".join(["ATG" + "GCT" * 20 + "TAA"] * 8) + "\n")
        metrics = []
        for run in (ddp, fsdp):
            out = tmp_path / f"{run.name}.json"
            argv = [
                "pretrain",
                str(run),
                "--file",
                str(sequences),
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
            assert evalpy.main(argv) == 0
            metrics.append(json.loads(out.read_text())["metrics"])
        for name, value in metrics[0].items():
            assert metrics[1][name] == pytest.approx(value, rel=1e-4), name
    finally:
        env_cache.undo()
