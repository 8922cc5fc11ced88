#!/usr/bin/env python
"""Train a HELM model: ``python train.py`` (demo corpus, CPU), ``python train.py --config X.yaml``,
or ``torchrun --nproc_per_node N train.py ...``. See README for the flags; ``--help`` lists them all.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from helm import distributed as hdist
from helm.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from helm.config import ConfigError, parse_config, to_dict
from helm.data.dataset import LMDataset
from helm.data.io import DataError
from helm.data.sampler import LengthBucketSampler, build_dataloader
from helm.ema import ModelEma
from helm.hierarchy import CodonHierarchy, build_hierarchy
from helm.losses import build_loss
from helm.models import build_model, model_config
from helm.optim import build_optimizer, clip_gradients, scaled_lr
from helm.sched import build_scheduler
from helm.training import (
    CudaPrefetcher,
    LanguageModel,
    RunLogger,
    evaluate,
    flops_per_token,
    forward_backward,
    lm_collate,
    model_kwargs,
    peak_flops,
    prepare_data,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_logging,
    teardown_logging,
    to_device,
    tokenizer_state,
)

log = logging.getLogger("helm")


class NonFiniteLoss(RuntimeError):
    pass


def train(args) -> int:
    # Distributed setup: ranks from torchrun's environment; rank 0 alone logs and writes.
    info = hdist.init_distributed(args.accelerator, args.distributed_backend)
    device = info.device
    if args.resume == "auto" and args.output is None:
        raise ConfigError("--resume auto continues the run in --output: name the folder")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(
        hdist.broadcast_object(
            args.output or f"runs/{args.model_name}-{args.mode}-{args.loss}-{stamp}"
        )
    )
    setup_logging(info.is_main, out)
    log.info("output %s | device %s | world size %d", out, device, info.world_size)

    # Resume: the checkpoint carries config, tokenizer and hierarchy of the run it continues.
    ckpt = None
    if args.resume:
        path = out / "checkpoints" / "last.pt" if args.resume == "auto" else Path(args.resume)
        if args.resume == "auto" and not path.exists():
            log.info("--resume auto: no checkpoint in %s yet, starting fresh", path.parent)
        else:
            ckpt = load_checkpoint(path)
            log.info("resuming from %s (epoch %d, step %d)", path, ckpt["epoch"], ckpt["step"])
    seed_everything(args.seed)  # same on every rank: identical initial weights

    # Data: splits, tokenizer, token caches, datasets, length-bucketed loaders.
    data = prepare_data(args, info, out, ckpt["tokenizer"] if ckpt else None)
    tokenizer = data.tokenizer
    dataset_kw = dict(
        mode=args.mode,
        max_seq_len=args.max_seq_len,
        masking_strategy=args.masking_strategy,
        masking_ratio=args.masking_ratio,
        mask_replace=args.mask_replace,
        vocab_size=tokenizer.vocab_size,
        seed=args.seed,
        return_position_ids=args.position_ids,
    )
    train_ds = LMDataset(data.stores["train"], truncation=args.truncation, **dataset_kw)
    train_sampler = LengthBucketSampler(
        train_ds.lengths,
        args.batch_size,
        num_replicas=info.world_size,
        rank=info.rank,
        seed=args.seed,
        repeats=args.epoch_repeats or 1.0,  # timm: 0 means one pass per epoch
    )
    loader_kw = dict(
        num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == "cuda",
        worker_seeding=args.worker_seeding,
        seed=args.seed,
        collate_fn=lm_collate,
    )
    train_loader = build_dataloader(train_ds, train_sampler, **loader_kw)

    def eval_loader(name):  # fixed masks (epoch 0) and order: comparable across epochs
        ds = LMDataset(data.stores[name], truncation="head", **dataset_kw)
        sampler = LengthBucketSampler(
            ds.lengths, args.batch_size, num_replicas=info.world_size, rank=info.rank, shuffle=False
        )
        return build_dataloader(ds, sampler, **{**loader_kw, "num_workers": 0})

    val_loader = eval_loader("val") if "val" in data.stores else None

    # Loss and metrics: the codon tree (restored exactly on resume) and the configured loss.
    hierarchy = (
        CodonHierarchy.from_state_dict(ckpt["hierarchy"])
        if ckpt
        else build_hierarchy(args.hierarchy, args.seed)
    )
    loss_fn = build_loss(args, tokenizer, hierarchy).to(device)
    metric_tree = hierarchy if tokenizer.is_codon else None

    # Model: backbone + LM head; the head projects only target positions.
    cfg = model_config(args.model_name, **model_kwargs(args, tokenizer.vocab_size))
    model = LanguageModel(build_model(args.model_name, cfg)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s %s: %.2fM parameters", args.model_name, args.mode, n_params / 1e6)
    if args.sync_bn:
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if has_bn and info.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.info(
                "--sync-bn: %s",
                "single process" if has_bn else "the model has no BatchNorm layers to convert",
            )

    # Optimizer and schedule: the lr is a pure function of the update count (or epoch).
    accum = args.grad_accum_steps
    updates_per_epoch = math.ceil(len(train_sampler) / accum)
    lr = scaled_lr(args, args.batch_size * accum * info.world_size)
    optimizer = build_optimizer(model, args, lr)
    scheduler, num_epochs = build_scheduler(optimizer, args, lr, updates_per_epoch)
    amp_dtype = resolve_amp_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # EMA: made from the raw module after .to(device), before compile and DDP wrap it.
    ema = None
    if args.model_ema:
        ema = ModelEma(
            model, args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None
        )

    # Resume state, or a fresh start.
    saver = CheckpointManager(out / "checkpoints", args.checkpoint_hist, args.val_metric_mode)
    start_epoch, step, batches_done, bad_epochs = (args.start_epoch or 0), 0, 0, 0
    if ckpt:
        model.backbone.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.backbone.load_state_dict(ckpt["ema"])
        saver.load_state_dict(ckpt["saver"])
        start_epoch, step, batches_done = ckpt["epoch"], ckpt["step"], ckpt["batches_done"]
        bad_epochs = ckpt.get("bad_epochs", 0)
        set_rng_state(ckpt["rng"][min(info.rank, len(ckpt["rng"]) - 1)])
    else:
        torch.manual_seed(args.seed + info.rank)  # dropout streams differ across ranks
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(args), sort_keys=False))
        tokenizer.save(out / "tokenizer")
    tok_state = tokenizer_state(tokenizer)

    def checkpoint(epoch: int, batches: int, gather: bool = True) -> dict:
        """The whole training state. With ``gather`` (a collective: every rank calls it) the
        checkpoint holds every rank's RNG; an interrupt saves rank 0's alone."""
        rngs = [rng_state()]
        if info.distributed and gather:  # every rank's RNG, so a resume restores each stream
            rngs = [None] * info.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        return {
            "model": model.backbone.state_dict(),
            "ema": ema.module.backbone.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "saver": saver.state_dict(),
            "epoch": epoch,
            "step": step,
            "batches_done": batches,
            "bad_epochs": bad_epochs,
            "rng": rngs,
            "config": to_dict(args),
            "model_name": args.model_name,
            "model_config": vars(cfg),
            "tokenizer": tok_state,
            "hierarchy": hierarchy.state_dict(),
        }

    # Compile and DDP wrap the training view; checkpoints always save the raw module.
    train_model = torch.compile(model) if args.compile else model
    if info.distributed:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    # Loop.
    logger = RunLogger(out, info.is_main)
    peak = peak_flops(device)
    tok_flops = flops_per_token(
        n_params,
        args.num_layers,
        args.hidden_size,
        args.max_seq_len,
        args.model_name in ("gpt2", "bert"),
    )
    first_bad = torch.full(
        (), -1, dtype=torch.long, device=device
    )  # first non-finite step, no sync
    skipped = 0
    log.info(
        "training %d epochs x %d updates (batch %d x accum %d x %d ranks, lr %.3g)",
        num_epochs,
        updates_per_epoch,
        args.batch_size,
        accum,
        info.world_size,
        lr,
    )
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, num_epochs):
            train_ds.set_epoch(epoch)
            train_sampler.set_epoch(epoch)
            train_sampler.load_state_dict({"epoch": epoch, "batches_done": batches_done})
            batches = iter(
                CudaPrefetcher(train_loader, device)
                if device.type == "cuda" and not args.no_prefetcher
                else train_loader
            )
            model.train()
            bar = tqdm(
                total=len(train_sampler),
                initial=batches_done,
                disable=not (info.is_main and sys.stderr.isatty()),
                desc=f"epoch {epoch}",
                unit="batch",
                dynamic_ncols=True,
                leave=False,
            )
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            targets_seen = torch.zeros((), dtype=torch.long, device=device)
            tokens = torch.zeros((), dtype=torch.long, device=device)  # input tokens: throughput
            t0 = time.time()
            while micro := list(itertools.islice(batches, accum)):
                micro = [to_device(b, device) for b in micro]
                step_loss, step_targets, step_tokens = forward_backward(
                    train_model, micro, loss_fn, scaler, autocast, info.world_size
                )
                bad = ~torch.isfinite(step_loss)
                first_bad = torch.where(
                    bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad
                )
                # --nan-policy skip reads one scalar per update (a sync): the price of skipping.
                if args.nan_policy == "skip" and bool(hdist.all_reduce_sum(bad.float())):
                    optimizer.zero_grad(set_to_none=True)
                    first_bad.fill_(-1)
                    skipped += 1
                    batches_done += len(micro)
                    bar.update(len(micro))
                    continue
                loss_sum += step_loss
                targets_seen += step_targets
                tokens += step_tokens
                scaler.unscale_(optimizer)
                if args.clip_grad is not None:
                    grad_norm = clip_gradients(model.parameters(), args.clip_mode, args.clip_grad)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batches_done += len(micro)
                scheduler.step_update(step)
                if ema is not None:
                    ema.update(model)
                bar.update(len(micro))
                if step % args.log_interval == 0:
                    if first_bad.item() >= 0:
                        raise NonFiniteLoss(
                            f"non-finite loss at optimizer step {first_bad.item() + 1}"
                        )
                    for t in (loss_sum, targets_seen, tokens):
                        hdist.all_reduce_sum(t)
                    dt = time.time() - t0
                    stats = {
                        "train/loss": loss_sum.item() / max(targets_seen.item(), 1),
                        "train/lr": scheduler.lr,
                        "train/tokens_per_s": tokens.item() / dt,
                    }
                    if grad_norm is not None:
                        stats["train/grad_norm"] = float(grad_norm)
                    if peak is not None:
                        stats["train/mfu"] = (
                            stats["train/tokens_per_s"] * tok_flops / peak / info.world_size
                        )
                    bar.set_postfix(loss=f"{stats['train/loss']:.4f}", lr=f"{scheduler.lr:.2e}")
                    if bar.disable:
                        log.info(
                            "epoch %d step %d: %s",
                            epoch,
                            step,
                            " ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in stats.items()),
                        )
                    logger.log(step, stats, epoch=epoch)
                    for t in (loss_sum, targets_seen, tokens):
                        t.zero_()
                    t0 = time.time()
            bar.close()
            if first_bad.item() >= 0:
                raise NonFiniteLoss(f"non-finite loss at optimizer step {first_bad.item() + 1}")
            batches_done = 0

            # Validation, schedule, checkpoints, early stopping.
            metrics = {}
            if val_loader is not None:
                metrics = evaluate(
                    model, val_loader, loss_fn, metric_tree, tokenizer.vocab_size, device, autocast
                )
                if ema is not None:
                    ema_metrics = evaluate(
                        ema.module,
                        val_loader,
                        loss_fn,
                        metric_tree,
                        tokenizer.vocab_size,
                        ema.device or device,
                        autocast,
                    )
                    metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
            # As timm: with an EMA, the EMA's metric chooses the best checkpoint.
            key = f"ema_{args.eval_metric}" if ema is not None else args.eval_metric
            metric = metrics.get(key)
            scheduler.step(epoch + 1, metric)
            improved = saver.update_best(metric, epoch)
            bad_epochs = 0 if improved else bad_epochs + 1
            state = checkpoint(epoch + 1, 0)
            if info.is_main:
                saver.save_epoch(state, epoch, improved)
            summary = " ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("count")
            )
            log.info(
                "epoch %d done (step %d): %s%s", epoch, step, summary, " *best*" if improved else ""
            )
            logger.log(step, metrics, epoch=epoch)
            if args.early_stop and bad_epochs >= args.patience_epochs:
                log.info("early stop: %s did not improve for %d epochs", key, bad_epochs)
                break
    except KeyboardInterrupt:
        if info.is_main:
            saver.save_last(checkpoint(epoch, batches_done, gather=False))
            log.warning(
                "interrupted at step %d: saved %s; continue with --resume %s",
                step,
                saver.last,
                saver.last,
            )
        return 130
    except NonFiniteLoss as exc:
        log.error(
            "%s: stopping. The last good checkpoint is %s. Try a lower --lr, --clip-grad, "
            "--amp-dtype bfloat16, or --nan-policy skip.",
            exc,
            saver.last,
        )
        return 3
    finally:
        logger.close()
    if skipped:
        log.warning("%d updates were skipped for non-finite losses (--nan-policy skip)", skipped)

    # Test split: the best checkpoint's weights (the last ones when no validation chose one).
    if "test" in data.stores:
        hdist.barrier()  # rank 0 wrote the checkpoints
        best = load_checkpoint(saver.best if saver.best.exists() else saver.last)
        weights = best["ema"] if ema is not None and best.get("ema") is not None else best["model"]
        model.backbone.load_state_dict(weights)
        test = evaluate(
            model,
            eval_loader("test"),
            loss_fn,
            metric_tree,
            tokenizer.vocab_size,
            device,
            autocast,
            prefix="test",
        )
        log.info(
            "test (best epoch %s): %s",
            saver.best_epoch,
            " ".join(f"{k} {v:.4f}" for k, v in test.items()),
        )
        logger = RunLogger(out, info.is_main)
        logger.log(step, test, epoch=saver.best_epoch)
        logger.close()
    log.info("done: checkpoints in %s", out / "checkpoints")
    return 0


def resolve_amp_dtype(args, device: torch.device) -> torch.dtype | None:
    """--amp: bf16 where supported (CPU, Ampere+ GPUs), else fp16 with a GradScaler."""
    if not args.amp:
        return None
    if args.amp_dtype == "float16":
        return torch.float16
    if args.amp_dtype == "bfloat16" or device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16


USER_ERRORS = (ConfigError, DataError, CheckpointError, ValueError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_config(argv)
        if not hdist.launched_by_torchrun():
            if args.num_nodes > 1:
                raise ConfigError(
                    "--num_nodes > 1 needs torchrun (--nnodes, --node_rank, --rdzv-endpoint)"
                )
            if args.num_devices > 1:
                hdist.spawn_local(args.num_devices, _worker, argv)
                return 0
        elif args.num_nodes * args.num_devices not in (1, int(os.environ["WORLD_SIZE"])):
            raise ConfigError(
                f"--num_nodes x --num_devices = {args.num_nodes * args.num_devices} but torchrun "
                f"started {os.environ['WORLD_SIZE']} processes"
            )
        return train(args)
    except USER_ERRORS as exc:
        if os.environ.get("HELM_TRACEBACK"):
            raise
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        hdist.cleanup()
        teardown_logging()


def _worker(argv: list[str]) -> None:
    code = main(argv)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
