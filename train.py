#!/usr/bin/env python
"""Train a HELM model: ``python train.py`` (demo corpus, CPU), ``python train.py --config X.yaml``,
or ``torchrun --nproc_per_node N train.py ...``. See README for the flags; ``--help`` lists them all.

The story, top to bottom: distributed setup, resume, data, loss, model and optimizer, schedule,
EMA, state, compile and DDP (``_train``), then the loop (``loop``): each epoch's updates and log
lines (``train_epoch``), its validation and checkpoints (``end_epoch``), and the test split
(``test_best``). Each part is a call into ``helm``; what happens inside an update lives in
``helm/lm.py``, the checkpoint format in ``helm/checkpoint/``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from helm.config import (
    ConfigError,
    check_flags,
    config_warnings,
    data_kwargs,
    dataset_kwargs,
    given_keys,
    parse_config,
    resume_config,
    schedule_kwargs,
    to_dict,
)
from helm.errors import run_reporting_errors

if __name__ == "__main__":  # --help and flag mistakes are answered before torch loads (seconds)
    if status := run_reporting_errors("train.py", lambda: check_flags(sys.argv[1:])):
        sys.exit(status)

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from helm import distributed as hdist
from helm import parallel
from helm.checkpoint import (
    CheckpointManager,
    RunInfo,
    TrainState,
    load_checkpoint,
    seed_everything,
    tokenizer_state,
)
from helm.checkpoint import dcp as hdcp
from helm.checkpoint.sharded import ShardedCheckpointManager
from helm.data.dataset import LMDataset
from helm.data.prepare import prepare_data
from helm.data.sampler import build_loader
from helm.ema import ModelEma
from helm.fileio import write_text
from helm.hf import init_from
from helm.hierarchy import CodonHierarchy, build_hierarchy
from helm.lm import (
    CudaPrefetcher,
    Meter,
    build_training,
    evaluate,
    forward_backward,
    make_optimizer,
    optimizer_step,
    to_device,
)
from helm.logger import RunLogger, setup_logging, teardown_logging
from helm.sched import build_scheduler

log = logging.getLogger("helm")


class NonFiniteLoss(RuntimeError):
    pass


def train(args, given: frozenset[str] | set[str] = frozenset()) -> int:
    """Run the training of ``args`` (``given``: the settings the user named, checked on resume).
    Returns the exit code: 0, 130/143 when stopped by SIGINT/SIGTERM, 3 for a non-finite loss."""
    # Distributed setup: ranks from torchrun's environment; rank 0 alone logs and writes.
    info = hdist.init_distributed(args.accelerator, args.distributed_backend, always=args.fsdp)
    device = info.device
    out = run_folder(args)
    fresh_folder = info.is_main and not out.exists()
    setup_logging(info.is_main, out)
    log.info("output %s | device %s | world size %d", out, device, info.world_size)
    for warning in config_warnings(args):
        log.warning(warning)
    # Until the loop starts there is nothing to save: a signal stops the set-up at once.
    with hdist.StopRequest(immediate=True) as stop:
        try:
            return _train(args, given, info, out, stop)
        except BaseException:
            if fresh_folder and not (out / "config.yaml").exists():
                shutil.rmtree(out, ignore_errors=True)  # a failed start leaves no run behind
            raise


def _train(args, given, info: hdist.DistInfo, out: Path, stop: hdist.StopRequest) -> int:
    device = info.device
    # Resume: the checkpoint's configuration is the run's; it carries tokenizer and hierarchy too.
    ckpt = resume_checkpoint(args, out)
    if ckpt is not None:
        args, changed = resume_config(args, ckpt["config"], set(given))
        for key, (was, now) in changed.items():
            log.info("resume: --%s %s (the run had %s)", key, now, was)
        if args.fsdp:  # a sharded run resumed in one process shards over a group of one
            hdist.init_distributed(args.accelerator, args.distributed_backend, always=True)
    args.output = str(out)
    cfg = vars(args)
    seed_everything(args.seed)  # same on every rank: identical initial weights

    # Data: splits, tokenizer, token caches, datasets, length-bucketed loaders.
    data = prepare_data(
        **data_kwargs(cfg),
        tokenizer_dir=out / "tokenizer",
        is_main=info.is_main,
        tokenizer_state=ckpt["tokenizer"] if ckpt else None,
    )
    tokenizer = data.tokenizer
    loaders = Loaders(data, args, info)

    # Loss, model and optimizer: the codon tree (restored exactly on resume), the configured loss,
    # backbone + LM head, the lr scaled to the global batch; CUDA precision settings.
    hierarchy = (
        CodonHierarchy.from_state_dict(ckpt["hierarchy"])
        if ckpt
        else build_hierarchy(args.hierarchy, args.seed)
    )
    accum = args.grad_accum_steps
    parts = build_training(
        cfg,
        tokenizer=tokenizer,
        hierarchy=hierarchy,
        device=device,
        global_batch=args.batch_size * accum * info.world_size,
        shard_over=info.world_size if args.fsdp else None,
    )
    model = parts.model
    cuda_defaults(device, parts.amp)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s %s: %.2fM parameters", args.model_name, args.mode, n_params / 1e6)
    if args.init_from and ckpt is None:  # trained weights of this architecture (not on resume)
        init_from(model.backbone, args.init_from, model_name=args.model_name, tokenizer=tokenizer)
    if args.sync_bn:
        model = convert_sync_bn(model, info.distributed)

    # EMA: made from the raw module after .to(device), before it is sharded, compiled or wrapped.
    ema = None
    if args.model_ema:
        ema_device = "cpu" if args.model_ema_force_cpu else None
        ema = ModelEma(model, args.model_ema_decay, ema_device, warmup=args.model_ema_warmup)

    # Parallelism (helm.parallel): activation checkpointing and compile per block; FSDP2 shards
    # the model and the EMA alike, then the optimizer is made over the shards.
    sync = None
    if args.fsdp or args.grad_ckpt:
        sync = parallel.parallelize(
            model, ema.module if ema is not None else None, grad_ckpt=args.grad_ckpt,
            compile=args.compile, amp=parts.amp, keep_unsharded=args.fsdp_accum == "unsharded",
            mesh=parallel.device_mesh(device, info.world_size) if args.fsdp else None,
        )  # fmt: skip
    if args.fsdp:  # FSDP's precision policy casts (no autocast); the optimizer over the shards
        precision = "bf16 parameters, fp32 reduction" if parts.amp else "fp32"
        log.info("FSDP over %d rank(s): %s, --fsdp-accum %s", info.world_size, precision,
                 args.fsdp_accum)  # fmt: skip
        parts = dataclasses.replace(parts, optimizer=make_optimizer(cfg, model, parts.lr), amp=None)

    # Schedule: the lr is a pure function of the update count (or epoch).
    updates_per_epoch = math.ceil(len(loaders.train.batch_sampler) / accum)
    scheduler, num_epochs = build_scheduler(
        parts.optimizer, base_lr=parts.lr, updates_per_epoch=updates_per_epoch,
        **schedule_kwargs(cfg),
    )  # fmt: skip

    # State: restored from the checkpoint, or a fresh start; sharded runs write DCP folders.
    manager = ShardedCheckpointManager if args.fsdp else CheckpointManager
    saver = manager(out / "checkpoints", args.checkpoint_hist, args.val_metric_mode)
    state = TrainState(
        model.backbone,
        parts.optimizer,
        scheduler,
        parts.scaler,
        saver,
        ema=ema.module.backbone if ema is not None else None,
        epoch=args.start_epoch or 0,
        rank=info.rank,
        world_size=info.world_size,
    )
    if ckpt:
        restore(state, ckpt, ckpt_path(args, out), sharded=args.fsdp)
    else:
        torch.manual_seed(args.seed + info.rank)  # dropout streams differ across ranks
        if args.start_epoch:  # timm: the schedule and the update count start there
            state.step = args.start_epoch * updates_per_epoch
            scheduler.start_at(args.start_epoch, updates_per_epoch)
    if info.is_main:
        write_text(out / "config.yaml", yaml.safe_dump(to_dict(args), sort_keys=False))
        tokenizer.save(out / "tokenizer")
    run_info = RunInfo(
        to_dict(args),
        args.model_name,
        vars(parts.model_config),
        tokenizer_state(tokenizer),
        hierarchy.state_dict(),
    )

    # DDP, then compile, wrap the training view; checkpoints always save the raw module.
    train_model = model
    if info.distributed and not args.fsdp:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile and not (args.fsdp or args.grad_ckpt):  # else compiled per block (above)
        train_model = torch.compile(train_model)

    # Logging: metrics.jsonl and TensorBoard; the meter reads the device at log steps only.
    logger = RunLogger(out, info.is_main)
    if state.epoch_metrics:
        logger.relog(state.epoch_metrics)  # the killed run may not have logged its last epoch
    flops = model.backbone.flops_per_token(args.max_seq_len)  # the model states its FLOPs
    meter = Meter(device, info.world_size, flops, with_xe=args.loss != "XE")
    log.info(
        "training %d epochs x %d updates (batch %d x accum %d x %d ranks, lr %.3g)",
        num_epochs, updates_per_epoch, args.batch_size, accum, info.world_size, parts.lr,
    )  # fmt: skip
    run = Run(
        args, info, out, stop, model, train_model, parts, scheduler, ema, state, saver,
        run_info, loaders, logger, meter, metric_tree=hierarchy if tokenizer.is_codon else None,
        sync=sync,
    )  # fmt: skip
    stop.immediate = False  # from here a signal stops at the next safe point, with a checkpoint
    return loop(run, num_epochs)


@dataclass
class Run:
    """What the loop works with, made by ``_train``'s set-up."""

    args: Any
    info: hdist.DistInfo
    out: Path
    stop: hdist.StopRequest
    model: torch.nn.Module  # the raw LanguageModel (checkpoints, EMA, evaluation); or sharded
    train_model: torch.nn.Module  # the view that trains: DDP and compile wrap the raw model
    parts: Any  # helm.lm.Training: loss, optimizer, scaler, precision
    scheduler: Any
    ema: ModelEma | None
    state: TrainState
    saver: CheckpointManager
    run_info: RunInfo
    loaders: Loaders
    logger: RunLogger
    meter: Meter
    metric_tree: CodonHierarchy | None  # the tree metrics (codon tokenizers only)
    sync: Any = None  # a sharded model's micro-batch context (helm.parallel.accumulation)
    skipped: int = 0  # updates skipped for a non-finite loss (--nan-policy skip)
    first_bad: torch.Tensor = field(init=False)  # the first non-finite step on this rank, or -1

    def __post_init__(self) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.info.device)

    def eval_kw(self) -> dict[str, Any]:
        kw = dict(hierarchy=self.metric_tree, vocab_size=self.loaders.vocab_size,
                  amp=self.parts.amp)  # fmt: skip
        if not self.info.distributed:  # ranks must agree on stopping: they do at log steps
            kw["should_stop"] = lambda: bool(self.stop.signum)
        return kw


def loop(run: Run, num_epochs: int) -> int:
    """The epochs, then the test split. A stop request (SIGINT/SIGTERM) is honoured at safe points
    only: after an update, inside validation (single process) and after the epoch's checkpoint."""
    try:
        for epoch in range(run.state.epoch, num_epochs):
            train_epoch(run, epoch)
            if end_epoch(run, epoch):  # early stopping
                break
    except hdist.Interrupted:  # every rank stops at the same safe point
        code = save_at_stop(run)
        run.logger.close()
        return code or run.stop.exit_code
    except (KeyboardInterrupt, NonFiniteLoss) as exc:  # a second signal, or a non-finite loss
        reason = str(exc) or "stopped at once, saving nothing new"
        log.error("%s; %s", reason, last_good(run.saver))
        run.logger.close()
        return 3 if isinstance(exc, NonFiniteLoss) else 130
    if run.skipped:
        log.warning(
            "%d updates were skipped for non-finite losses (--nan-policy skip)", run.skipped
        )
    code = test_best(run)
    run.logger.close()
    if code == 0:
        log.info("done: checkpoints in %s", run.out / "checkpoints")
    return code


def train_epoch(run: Run, epoch: int) -> None:
    """One epoch of updates from where the state says (a resume starts mid-epoch)."""
    args, state, device, meter = run.args, run.state, run.info.device, run.meter
    state.epoch = epoch
    sampler = run.loaders.train.batch_sampler
    run.loaders.train.dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)
    sampler.load_state_dict({"epoch": epoch, "batches_done": state.batches_done})
    prefetch = device.type == "cuda" and not args.no_prefetcher
    loader = run.loaders.train
    batches = iter(CudaPrefetcher(loader, device) if prefetch else loader)
    run.model.train()
    bar = tqdm(
        total=len(sampler),
        initial=state.batches_done,
        disable=not (run.info.is_main and sys.stderr.isatty()),
        desc=f"epoch {epoch}",
        unit="batch",
        dynamic_ncols=True,
        leave=False,
    )
    meter.reset()
    while micro := list(itertools.islice(batches, args.grad_accum_steps)):
        micro = [to_device(b, device) for b in micro]
        step_xe = meter.zero() if meter.with_xe else None
        step_loss, step_targets, step_tokens = forward_backward(
            run.train_model, micro, run.parts.loss_fn, run.parts.scaler, run.parts.amp,
            run.info.world_size, step_xe, sync=run.sync,
        )  # fmt: skip
        bad = ~torch.isfinite(step_loss)
        run.first_bad = torch.where(
            bad & (run.first_bad < 0), torch.full_like(run.first_bad, state.step), run.first_bad
        )
        # --nan-policy skip reads one scalar per update (a sync): the price of skipping.
        if args.nan_policy == "skip" and bool(hdist.all_reduce_sum(bad.float())):
            run.parts.optimizer.zero_grad(set_to_none=True)
            run.first_bad.fill_(-1)
            run.skipped += 1
            state.batches_done += len(micro)
            bar.update(len(micro))
            continue
        meter.add(step_loss, step_targets, step_tokens, step_xe)
        grad_norm = optimizer_step(
            run.model, run.parts.optimizer, run.parts.scaler, clip_grad=args.clip_grad,
            clip_mode=args.clip_mode,
        )  # fmt: skip
        state.step += 1
        state.batches_done += len(micro)
        run.scheduler.step_update(state.step)
        if run.ema is not None:
            run.ema.update(run.model, step=state.step)
        bar.update(len(micro))
        log_step = state.step % args.log_interval == 0
        if log_step:
            check_finite(run.first_bad)
            stats = meter.stats(run.scheduler.lr, grad_norm)
            bar.set_postfix(loss=f"{stats['train/loss']:.4f}", lr=f"{run.scheduler.lr:.2e}")
            if bar.disable:
                summary = " ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in stats.items())
                log.info("epoch %d step %d: %s", epoch, state.step, summary)
            run.logger.log(state.step, stats, epoch=epoch)
            meter.reset()
        if (log_step or not run.info.distributed) and run.stop.agreed(device):
            raise hdist.Interrupted
    bar.close()
    check_finite(run.first_bad)


def end_epoch(run: Run, epoch: int) -> bool:
    """Validation, the schedule, the epoch's checkpoints and its log line; True to stop early.
    Until the epoch's checkpoint is written, batches_done says the epoch is trained: a stop here
    resumes at validation."""
    args, state, saver = run.args, run.state, run.saver
    metrics = validate(run.model, run.ema, run.loaders.val, run.parts.loss_fn, run.info.device,
                       run.eval_kw())  # fmt: skip
    # As timm: with an EMA, the EMA's metric chooses the best checkpoint.
    key = f"ema_{args.eval_metric}" if run.ema is not None else args.eval_metric
    metric = metrics.get(key)
    run.scheduler.step(epoch + 1, metric)
    improved = saver.update_best(metric, epoch)
    state.bad_epochs = 0 if improved else state.bad_epochs + 1
    state.epoch, state.batches_done = epoch + 1, 0  # a resume starts the next epoch
    state.epoch_metrics = {"step": state.step, "epoch": epoch, "metrics": metrics}
    save(run, epoch, improved)
    summary = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("count"))
    best = " *best*" if improved else ""
    log.info("epoch %d done (step %d): %s%s", epoch, state.step, summary, best)
    run.logger.log(state.step, metrics, epoch=epoch)
    if run.stop.agreed(run.info.device):
        raise hdist.Interrupted
    if args.early_stop and state.bad_epochs >= args.patience_epochs:
        log.info("early stop: %s did not improve for %d epochs", key, state.bad_epochs)
        return True
    return False


def test_best(run: Run) -> int:
    """The test split with the best epoch's own weights (the last ones when no validation chose
    one); 0, or the stop's exit code when a signal stops it."""
    if not run.loaders.has("test"):
        return 0
    hdist.barrier()  # rank 0 wrote the checkpoints
    best = run.saver.load_best()
    use_ema = run.ema is not None and best.checkpoint.get("ema") is not None
    weights = "ema" if use_ema else "model"
    if hdcp.is_sharded(best.path):  # the weights are in the folder; each rank reads its shards
        hdcp.load_weights(best.path, run.model.backbone, weights)
    else:
        run.model.backbone.load_state_dict(best.checkpoint[weights])
    try:
        test = evaluate(
            run.model, run.loaders.evaluation("test"), run.parts.loss_fn, device=run.info.device,
            prefix="test", **run.eval_kw(),
        )  # fmt: skip
    except hdist.Interrupted:
        log.warning("stopped during the test split; the checkpoints are complete in %s", run.out)
        return run.stop.exit_code
    summary = " ".join(f"{k} {v:.4f}" for k, v in test.items())
    log.info("test (epoch %s, %s): %s", best.epoch, best.path.name, summary)
    run.logger.log(run.state.step, test, epoch=best.epoch)
    return 0


class Loaders:
    """The run's datasets and loaders: training (shuffled per epoch, resumable), and validation
    and test with fixed masks (epoch 0) and order, comparable across epochs."""

    def __init__(self, data, args, info: hdist.DistInfo):
        self.stores = data.stores
        self.vocab_size = data.tokenizer.vocab_size
        self.dataset_kw = dataset_kwargs(vars(args)) | {"vocab_size": self.vocab_size}
        self.loader_kw = dict(
            batch_size=args.batch_size,
            num_replicas=info.world_size,
            rank=info.rank,
            seed=args.seed,
            num_workers=num_workers(args.num_workers, info),
            pin_memory=args.pin_mem and info.device.type == "cuda",
            worker_seeding=args.worker_seeding,
        )
        dataset = LMDataset(self.stores["train"], truncation=args.truncation, **self.dataset_kw)
        repeats = args.epoch_repeats or 1.0  # timm: 0 means one pass per epoch
        self.train = build_loader(dataset, train=True, repeats=repeats, **self.loader_kw)
        self.val = self.evaluation("val") if self.has("val") else None

    def has(self, split: str) -> bool:
        return split in self.stores

    def evaluation(self, split: str):
        dataset = LMDataset(self.stores[split], truncation="head", **self.dataset_kw)
        return build_loader(dataset, train=False, **self.loader_kw)


# The parts of train() that are more than a few lines ---------------------------------------------


def run_folder(args) -> Path:
    """Where the run lives: --output; else the run folder of a --resume checkpoint path
    (``<run>/checkpoints/x.pt``); else a fresh runs/<model>-<mode>-<loss>-<time>. Rank 0 names it."""
    if args.resume in RESUME_AUTO and args.output is None:
        raise ConfigError(f"--resume {args.resume} continues the run in --output: name the folder")
    if args.output is not None:
        return Path(hdist.broadcast_object(args.output))
    if args.resume is not None:
        path = Path(args.resume)
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(hdist.broadcast_object(f"runs/{args.model_name}-{args.mode}-{args.loss}-{stamp}"))


RESUME_AUTO = ("auto", "if-exists")


def ckpt_path(args, out: Path) -> Path:
    """--resume's checkpoint: for auto and if-exists the run's last.pt, or last.dcp (sharded)."""
    if args.resume not in RESUME_AUTO:
        return Path(args.resume)
    folder = out / "checkpoints"
    return hdcp.newest(folder, "last") or folder / "last.pt"


def resume_checkpoint(args, out: Path) -> dict | None:
    """The checkpoint --resume names: a path, or <output>/checkpoints/last.pt for ``auto`` (which
    must exist) and ``if-exists`` (a fresh start when there is none)."""
    if not args.resume:
        return None
    path = ckpt_path(args, out)
    if args.resume in RESUME_AUTO and not path.exists():
        if args.resume == "auto":
            raise ConfigError(
                f"--resume auto: {out} holds no run to continue (no {path.relative_to(out)}); "
                "check --output, or use --resume if-exists to start the run when there is none"
            )
        log.info("--resume if-exists: no checkpoint in %s yet, starting the run", path.parent)
        return None
    # A sharded folder's fields first (the weights are read when the model is built).
    ckpt = hdcp.read_state(path) if hdcp.is_sharded(path) else load_checkpoint(path)
    log.info("resuming from %s (epoch %d, step %d)", path, ckpt["epoch"], ckpt["step"])
    return ckpt


def restore(state: TrainState, ckpt: dict, path: Path, sharded: bool) -> None:
    """Load the checkpoint into the state: a DCP folder into any run (each rank reads its part),
    a single file into an unsharded run, or whole on every rank into a sharded one."""
    if hdcp.is_sharded(path):
        hdcp.restore(path, state, ckpt)
    elif sharded:
        hdcp.restore_whole(ckpt, state, path)
    else:
        state.restore(ckpt, path=path)


def num_workers(requested: int, info: hdist.DistInfo) -> int:
    """--num_workers, capped at the cores this process may use (more only queue for them and
    can stall start-up for minutes); for -1 min(4, cores per local rank - 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if requested > cores:
        log.warning("--num_workers %d: this machine gives the run %d cores; using %d workers",
                    requested, cores, cores)  # fmt: skip
        return cores
    if requested >= 0:
        return requested
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    return min(4, max(0, cores // max(local, 1) - 1))


def cuda_defaults(device: torch.device, amp: torch.dtype | None) -> None:
    """CUDA settings that fit LM training, each logged once: TF32 matmuls for fp32 runs (bf16 runs
    do not use fp32 matmuls much); the allocator's expandable segments (set in ``main``)."""
    if device.type != "cuda":
        return
    if amp is None:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log.info("fp32 on CUDA: TF32 tensor-core matmuls enabled (use --amp for bf16)")
    log.info(
        "CUDA allocator: PYTORCH_CUDA_ALLOC_CONF=%s", os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    )


def validate(model, ema, loader, loss_fn, device, eval_kw: dict) -> dict[str, float]:
    """Validation metrics of the model and, with an EMA, of the EMA (``ema_`` keys)."""
    if loader is None:
        return {}
    metrics = evaluate(model, loader, loss_fn, device=device, **eval_kw)
    if ema is not None:
        ema_metrics = evaluate(ema.module, loader, loss_fn, device=ema.device or device, **eval_kw)
        metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
    return metrics


def save_at_stop(run: Run) -> int:
    """Write the last checkpoint where the run stopped (a collective: RNG streams are gathered);
    after a non-finite loss nothing is written, so the last good checkpoint stays (returns 3)."""
    first_bad = hdist.all_reduce_max(run.first_bad.clone())  # every rank decides alike
    if first_bad.item() >= 0:
        step = first_bad.item() + 1
        log.error("stopped after a non-finite loss at optimizer step %d: nothing saved", step)
        return 3
    state = run.state
    save(run)
    if run.info.is_main:
        log.warning(
            "stopped at step %d (epoch %d, %d batches in): saved %s; continue with "
            "--resume auto --output %s",
            state.step, state.epoch, state.batches_done, run.saver.last, run.out,
        )  # fmt: skip
    hdist.barrier()
    return 0


def save(run: Run, epoch: int | None = None, improved: bool = False) -> None:
    """Checkpoint the state at the end of ``epoch``, or where it stands (None). Every rank calls
    it: the RNG states are gathered, and a sharded run's ranks each write their shards."""
    if isinstance(run.saver, ShardedCheckpointManager):
        run.saver.save(run.state, run.run_info, epoch, improved)
        return
    checkpoint = run.state.checkpoint(run.run_info)
    if run.info.is_main and epoch is None:
        run.saver.save_last(checkpoint)
    elif run.info.is_main:
        run.saver.save_epoch(checkpoint, epoch, improved)


def last_good(saver: CheckpointManager) -> str:
    if saver.last.exists():
        return f"the last good checkpoint is {saver.last}"
    return "no checkpoint was written yet"


def convert_sync_bn(model: torch.nn.Module, distributed: bool) -> torch.nn.Module:
    """--sync-bn: BatchNorm layers become SyncBatchNorm under DDP (the built-in models have none)."""
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and distributed:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    why = "single process" if has_bn else "the model has no BatchNorm layers to convert"
    log.info("--sync-bn: %s", why)
    return model


def check_finite(first_bad: torch.Tensor) -> None:
    """Raise at a log point if any update on any rank was non-finite (one sync, here only; a
    collective under DDP, so every rank stops together)."""
    first_bad = hdist.all_reduce_max(first_bad.clone())
    if first_bad.item() >= 0:
        raise NonFiniteLoss(
            f"non-finite loss at optimizer step {first_bad.item() + 1}: stopping (try a lower "
            "--lr, --clip-grad, --amp-dtype bfloat16, or --nan-policy skip)"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before CUDA starts: fewer out-of-memory failures from fragmentation (varying lengths).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        return run_reporting_errors("train.py", lambda: launch(argv))
    finally:
        hdist.cleanup()
        teardown_logging()


def launch(argv: list[str]) -> int:
    """Parse the flags, then train in this process (torchrun or single) or spawn local ranks."""
    try:
        args = parse_config(argv)
    except SystemExit as exc:  # --help, or a command-line error already printed
        return exc.code or 0
    if not hdist.launched_by_torchrun():
        if args.num_nodes > 1:
            raise ConfigError(
                "--num_nodes > 1 needs torchrun (--nnodes, --node_rank, --rdzv-endpoint)"
            )
        if args.num_devices > 1:
            return hdist.spawn_local(args.num_devices, _worker, argv)
    elif args.num_nodes * args.num_devices not in (1, int(os.environ["WORLD_SIZE"])):
        raise ConfigError(
            f"--num_nodes x --num_devices = {args.num_nodes * args.num_devices} but torchrun "
            f"started {os.environ['WORLD_SIZE']} processes"
        )
    return train(args, given_keys(argv))


def _worker(argv: list[str]) -> None:
    code = main(argv)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
