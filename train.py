#!/usr/bin/env python
"""Train a HELM model: ``python train.py`` (demo corpus, CPU), ``python train.py --config X.yaml``,
or ``torchrun --nproc_per_node N train.py ...``. See README for the flags; ``--help`` lists them all.

The story, top to bottom: distributed setup, resume, data, loss, model and optimizer, schedule,
EMA, state, compile and DDP, then the loop (updates, logging, validation, checkpoints) and the test
split. Each part is a call into ``helm``; what happens inside an update lives in ``helm/lm.py``, the
checkpoint format in ``helm/checkpoint.py``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

from helm.config import (
    ConfigError,
    check_flags,
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
from helm.checkpoint import (
    CheckpointManager,
    RunInfo,
    TrainState,
    load_checkpoint,
    seed_everything,
    tokenizer_state,
)
from helm.data.dataset import LMDataset
from helm.data.prepare import prepare_data
from helm.data.sampler import build_loader
from helm.ema import ModelEma
from helm.hf import init_from
from helm.hierarchy import CodonHierarchy, build_hierarchy
from helm.lm import (
    CudaPrefetcher,
    build_training,
    evaluate,
    flops_per_token,
    forward_backward,
    optimizer_step,
    peak_flops,
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
    info = hdist.init_distributed(args.accelerator, args.distributed_backend)
    device = info.device
    out = run_folder(args)
    fresh_folder = info.is_main and not out.exists()
    setup_logging(info.is_main, out)
    log.info("output %s | device %s | world size %d", out, device, info.world_size)
    with hdist.StopRequest() as stop:
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
    dataset_kw = dataset_kwargs(cfg) | {"vocab_size": tokenizer.vocab_size}
    loader_kw = dict(
        batch_size=args.batch_size,
        num_replicas=info.world_size,
        rank=info.rank,
        seed=args.seed,
        num_workers=num_workers(args.num_workers, info),
        pin_memory=args.pin_mem and device.type == "cuda",
        worker_seeding=args.worker_seeding,
    )
    train_ds = LMDataset(data.stores["train"], truncation=args.truncation, **dataset_kw)
    repeats = args.epoch_repeats or 1.0  # timm: 0 means one pass per epoch
    train_loader = build_loader(train_ds, train=True, repeats=repeats, **loader_kw)
    train_sampler = train_loader.batch_sampler

    def eval_loader(name):  # fixed masks (epoch 0) and order: comparable across epochs
        dataset = LMDataset(data.stores[name], truncation="head", **dataset_kw)
        return build_loader(dataset, train=False, **loader_kw)

    val_loader = eval_loader("val") if "val" in data.stores else None

    # Loss, model and optimizer: the codon tree (restored exactly on resume), the configured loss,
    # backbone + LM head, the lr scaled to the global batch; CUDA precision settings.
    hierarchy = (
        CodonHierarchy.from_state_dict(ckpt["hierarchy"])
        if ckpt
        else build_hierarchy(args.hierarchy, args.seed)
    )
    metric_tree = hierarchy if tokenizer.is_codon else None
    accum = args.grad_accum_steps
    parts = build_training(
        cfg,
        tokenizer=tokenizer,
        hierarchy=hierarchy,
        device=device,
        global_batch=args.batch_size * accum * info.world_size,
    )
    model, loss_fn, optimizer, amp = parts.model, parts.loss_fn, parts.optimizer, parts.amp
    cuda_defaults(device, amp)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s %s: %.2fM parameters", args.model_name, args.mode, n_params / 1e6)
    if args.init_from and ckpt is None:  # trained weights of this architecture (not on resume)
        init_from(model.backbone, args.init_from, model_name=args.model_name, tokenizer=tokenizer)
    if args.sync_bn:
        model = convert_sync_bn(model, info.distributed)

    # Schedule: the lr is a pure function of the update count (or epoch).
    updates_per_epoch = math.ceil(len(train_sampler) / accum)
    scheduler, num_epochs = build_scheduler(
        optimizer, base_lr=parts.lr, updates_per_epoch=updates_per_epoch, **schedule_kwargs(cfg)
    )

    # EMA: made from the raw module after .to(device), before compile and DDP wrap it.
    ema = None
    if args.model_ema:
        ema_device = "cpu" if args.model_ema_force_cpu else None
        ema = ModelEma(model, args.model_ema_decay, ema_device, warmup=args.model_ema_warmup)

    # State: restored from the checkpoint, or a fresh start.
    saver = CheckpointManager(out / "checkpoints", args.checkpoint_hist, args.val_metric_mode)
    state = TrainState(
        model.backbone,
        optimizer,
        scheduler,
        parts.scaler,
        saver,
        ema=ema.module.backbone if ema is not None else None,
        epoch=args.start_epoch or 0,
        rank=info.rank,
        world_size=info.world_size,
    )
    if ckpt:
        state.restore(ckpt, path=ckpt_path(args, out))
    else:
        torch.manual_seed(args.seed + info.rank)  # dropout streams differ across ranks
        if args.start_epoch:  # timm: the schedule and the update count start there
            state.step = args.start_epoch * updates_per_epoch
            scheduler.start_at(args.start_epoch, updates_per_epoch)
    if info.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(args), sort_keys=False))
        tokenizer.save(out / "tokenizer")
    run = RunInfo(
        to_dict(args),
        args.model_name,
        vars(parts.model_config),
        tokenizer_state(tokenizer),
        hierarchy.state_dict(),
    )

    # DDP, then compile, wrap the training view; checkpoints always save the raw module.
    train_model = model
    if info.distributed:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    # Loop. A stop request (SIGINT/SIGTERM) is honoured at safe points only: after an update,
    # inside validation (single process) and after the epoch's checkpoint.
    logger = RunLogger(out, info.is_main)
    if state.epoch_metrics:
        logger.relog(state.epoch_metrics)  # the killed run may not have logged its last epoch
    meter = Meter(device, info.world_size, n_params, args, with_xe=args.loss != "XE")
    eval_kw = dict(hierarchy=metric_tree, vocab_size=tokenizer.vocab_size, amp=amp)
    if not info.distributed:  # ranks must agree on stopping, so they do at log steps instead
        eval_kw["should_stop"] = lambda: bool(stop.signum)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step
    skipped = 0
    log.info(
        "training %d epochs x %d updates (batch %d x accum %d x %d ranks, lr %.3g)",
        num_epochs,
        updates_per_epoch,
        args.batch_size,
        accum,
        info.world_size,
        parts.lr,
    )
    try:
        for epoch in range(state.epoch, num_epochs):
            state.epoch = epoch
            train_ds.set_epoch(epoch)
            train_sampler.set_epoch(epoch)
            train_sampler.load_state_dict({"epoch": epoch, "batches_done": state.batches_done})
            use_prefetcher = device.type == "cuda" and not args.no_prefetcher
            batches = iter(CudaPrefetcher(train_loader, device) if use_prefetcher else train_loader)
            model.train()
            bar = tqdm(
                total=len(train_sampler),
                initial=state.batches_done,
                disable=not (info.is_main and sys.stderr.isatty()),
                desc=f"epoch {epoch}",
                unit="batch",
                dynamic_ncols=True,
                leave=False,
            )
            meter.reset()
            while micro := list(itertools.islice(batches, accum)):
                micro = [to_device(b, device) for b in micro]
                step_xe = meter.zero() if meter.with_xe else None
                step_loss, step_targets, step_tokens = forward_backward(
                    train_model, micro, loss_fn, parts.scaler, amp, info.world_size, step_xe
                )
                bad = ~torch.isfinite(step_loss)
                first_bad = torch.where(
                    bad & (first_bad < 0), torch.full_like(first_bad, state.step), first_bad
                )
                # --nan-policy skip reads one scalar per update (a sync): the price of skipping.
                if args.nan_policy == "skip" and bool(hdist.all_reduce_sum(bad.float())):
                    optimizer.zero_grad(set_to_none=True)
                    first_bad.fill_(-1)
                    skipped += 1
                    state.batches_done += len(micro)
                    bar.update(len(micro))
                    continue
                meter.add(step_loss, step_targets, step_tokens, step_xe)
                grad_norm = optimizer_step(
                    model,
                    optimizer,
                    parts.scaler,
                    clip_grad=args.clip_grad,
                    clip_mode=args.clip_mode,
                )
                state.step += 1
                state.batches_done += len(micro)
                scheduler.step_update(state.step)
                if ema is not None:
                    ema.update(model, step=state.step)
                bar.update(len(micro))
                log_step = state.step % args.log_interval == 0
                if log_step:
                    check_finite(first_bad)
                    stats = meter.stats(scheduler.lr, grad_norm)
                    bar.set_postfix(loss=f"{stats['train/loss']:.4f}", lr=f"{scheduler.lr:.2e}")
                    if bar.disable:
                        summary = " ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in stats.items())
                        log.info("epoch %d step %d: %s", epoch, state.step, summary)
                    logger.log(state.step, stats, epoch=epoch)
                    meter.reset()
                if (log_step or not info.distributed) and stop.agreed(device):
                    raise hdist.Interrupted
            bar.close()
            check_finite(first_bad)

            # Validation, schedule, checkpoints, early stopping. Until the epoch's checkpoint is
            # written, batches_done says the epoch is trained: a stop here resumes at validation.
            metrics = validate(model, ema, val_loader, loss_fn, device, eval_kw)
            # As timm: with an EMA, the EMA's metric chooses the best checkpoint.
            key = f"ema_{args.eval_metric}" if ema is not None else args.eval_metric
            metric = metrics.get(key)
            scheduler.step(epoch + 1, metric)
            improved = saver.update_best(metric, epoch)
            state.bad_epochs = 0 if improved else state.bad_epochs + 1
            state.epoch, state.batches_done = epoch + 1, 0  # a resume starts the next epoch
            state.epoch_metrics = {"step": state.step, "epoch": epoch, "metrics": metrics}
            checkpoint = state.checkpoint(run)
            if info.is_main:
                saver.save_epoch(checkpoint, epoch, improved)
            summary = " ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("count")
            )
            best = " *best*" if improved else ""
            log.info("epoch %d done (step %d): %s%s", epoch, state.step, summary, best)
            logger.log(state.step, metrics, epoch=epoch)
            if stop.agreed(device):
                raise hdist.Interrupted
            if args.early_stop and state.bad_epochs >= args.patience_epochs:
                log.info("early stop: %s did not improve for %d epochs", key, state.bad_epochs)
                break
    except hdist.Interrupted:  # every rank stops at the same safe point
        code = save_at_stop(state, run, saver, first_bad, out, info.is_main)
        logger.close()
        return code or stop.exit_code
    except (KeyboardInterrupt, NonFiniteLoss) as exc:  # a second signal, or a non-finite loss
        log.error("%s; %s", str(exc) or "stopped at once, saving nothing new", last_good(saver))
        logger.close()
        return 3 if isinstance(exc, NonFiniteLoss) else 130
    if skipped:
        log.warning("%d updates were skipped for non-finite losses (--nan-policy skip)", skipped)

    # Test split: the best epoch's own weights (the last ones when no validation chose one).
    if "test" in data.stores:
        hdist.barrier()  # rank 0 wrote the checkpoints
        best = saver.load_best()
        use_ema = ema is not None and best.checkpoint.get("ema") is not None
        model.backbone.load_state_dict(best.checkpoint["ema" if use_ema else "model"])
        try:
            test = evaluate(
                model, eval_loader("test"), loss_fn, device=device, prefix="test", **eval_kw
            )
        except hdist.Interrupted:
            log.warning("stopped during the test split; the checkpoints are complete in %s", out)
            logger.close()
            return stop.exit_code
        summary = " ".join(f"{k} {v:.4f}" for k, v in test.items())
        log.info("test (epoch %s, %s): %s", best.epoch, best.path.name, summary)
        logger.log(state.step, test, epoch=best.epoch)
    logger.close()
    log.info("done: checkpoints in %s", out / "checkpoints")
    return 0


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
    return out / "checkpoints" / "last.pt" if args.resume in RESUME_AUTO else Path(args.resume)


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
    ckpt = load_checkpoint(path)
    log.info("resuming from %s (epoch %d, step %d)", path, ckpt["epoch"], ckpt["step"])
    return ckpt


def num_workers(requested: int, info: hdist.DistInfo) -> int:
    """--num_workers, or for -1 min(4, cores per local rank - 1): no oversubscribed cores."""
    if requested >= 0:
        return requested
    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(4, max(0, (cores or 1) // max(local, 1) - 1))


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


def save_at_stop(state, run, saver, first_bad, out: Path, is_main: bool) -> int:
    """Write last.pt where the run stopped (a collective under DDP: RNG streams are gathered);
    after a non-finite loss nothing is written, so the last good checkpoint stays (returns 3)."""
    first_bad = hdist.all_reduce_max(first_bad.clone())  # every rank decides alike
    if first_bad.item() >= 0:
        step = first_bad.item() + 1
        log.error("stopped after a non-finite loss at optimizer step %d: nothing saved", step)
        return 3
    checkpoint = state.checkpoint(run)
    if is_main:
        saver.save_last(checkpoint)
        log.warning(
            "stopped at step %d (epoch %d, %d batches in): saved %s; continue with "
            "--resume auto --output %s",
            state.step,
            state.epoch,
            state.batches_done,
            saver.last,
            out,
        )
    hdist.barrier()
    return 0


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


class Meter:
    """Loss, targets and tokens summed on the device between log steps; read (and summed across
    ranks) only when ``stats`` is called, so the loop never waits for the device otherwise."""

    def __init__(
        self, device: torch.device, world_size: int, n_params: int, args, with_xe: bool = False
    ):
        self.device, self.world_size, self.with_xe = device, world_size, with_xe
        self.peak = peak_flops(device)
        attention = args.model_name in ("gpt2", "bert")
        self.tok_flops = flops_per_token(
            n_params, args.num_layers, args.hidden_size, args.max_seq_len, attention
        )
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.targets = torch.zeros((), dtype=torch.long, device=self.device)
        self.tokens = torch.zeros((), dtype=torch.long, device=self.device)  # input tokens
        # Cross entropy in nats beside a hierarchical loss (forward_backward adds to it).
        self.xe = self.zero() if self.with_xe else None
        self.t0 = time.time()

    def zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.device)

    def add(
        self,
        loss_sum: torch.Tensor,
        targets: torch.Tensor,
        tokens: torch.Tensor,
        xe_sum: torch.Tensor | None = None,
    ) -> None:
        if xe_sum is not None:
            self.xe += xe_sum
        self.loss_sum += loss_sum
        self.targets += targets
        self.tokens += tokens

    def stats(self, lr: float, grad_norm: torch.Tensor | None) -> dict[str, float]:
        for t in (self.loss_sum, self.targets, self.tokens, self.xe):
            if t is not None:
                hdist.all_reduce_sum(t)
        dt = time.time() - self.t0
        stats = {
            "train/loss": self.loss_sum.item() / max(self.targets.item(), 1),
            "train/lr": lr,
            "train/tokens_per_s": self.tokens.item() / dt,
        }
        if self.xe is not None:
            stats["train/xe"] = self.xe.item() / max(self.targets.item(), 1)
        if grad_norm is not None:
            stats["train/grad_norm"] = float(grad_norm)
        if self.peak is not None:
            mfu = stats["train/tokens_per_s"] * self.tok_flops / self.peak / self.world_size
            stats["train/mfu"] = mfu
        return stats


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
