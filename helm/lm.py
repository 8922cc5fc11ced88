"""The language-model step: backbone + LM head, building a run's model/loss/optimizer, one update
(forward/backward, optimizer step), evaluation, the mixed-precision policy and MFU.

``train.py``, ``eval.py`` and ``bench/`` run the model through these functions, so the loss
normalisation, the precision policy, the clipping and the metrics cannot differ between them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from helm.distributed import Interrupted, all_reduce_sum
from helm.metrics import MetricAccumulator
from helm.optim import build_optimizer, clip_gradients, scaled_lr
from helm.vocab import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


class LanguageModel(nn.Module):
    """Backbone + LM head; the loss is computed outside. DDP and compile wrap this module.

    ``forward`` returns ``(logits (N, V_pad), labels (N,))``. On CUDA with a small vocabulary the
    head runs on every position, N = B * T, and rows whose label is ``IGNORE_INDEX`` are masked by
    the loss and the metrics: selecting the targets would need their count on the host (a sync and
    a graph break under ``torch.compile``), while the head is cheap at V_pad = 72. Elsewhere (the
    CPU, where a sync costs nothing and every row scored costs time) and for large subword
    vocabularies (``SELECT_ABOVE``: (B * T, V_pad) logits would cost more memory than the sync),
    only the N target rows are projected. ``select`` forces either way.
    """

    SELECT_ABOVE = 1024

    def __init__(self, backbone: nn.Module, select: bool | None = None):
        super().__init__()
        self.backbone = backbone
        self.select = select

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        select = self.select
        if select is None:
            large = self.backbone.cfg.padded_vocab_size > self.SELECT_ABOVE
            select = large or not hidden.is_cuda
        if select:
            keep = labels != IGNORE_INDEX  # (B, T)
            return self.backbone.lm_head(hidden[keep]), labels[keep]  # (N_targets, V_pad)
        logits = self.backbone.lm_head(hidden)  # (B, T, V_pad)
        return logits.flatten(0, 1), labels.flatten()  # (N, V_pad), (N,)


# Mixed precision -----------------------------------------------------------------------------------


def amp_dtype(device: torch.device, enabled: bool, requested: str = "auto") -> torch.dtype | None:
    """The autocast dtype (None: full precision). ``requested`` is auto | bfloat16 | float16; auto
    is bf16 where supported (CPU, Ampere+ GPUs), else fp16, which needs a GradScaler to train."""
    if not enabled:
        return None
    if requested == "float16":
        return torch.float16
    if requested == "bfloat16" or device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` at ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The policy of evaluation and feature extraction: bf16 (fp16 where unsupported) on CUDA,
    full precision elsewhere."""
    return autocast(device, amp_dtype(device, enabled=device.type == "cuda"))


# One update and evaluation -------------------------------------------------------------------------


def to_device(batch: Batch, device: torch.device, non_blocking: bool = False) -> Batch:
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def forward_backward(
    model: nn.Module,
    micro: list[Batch],
    loss_fn: Callable,
    scaler: torch.amp.GradScaler,
    amp: torch.dtype | None,
    world_size: int,
    xe_sum: torch.Tensor | None = None,
    sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches of one optimizer update.

    The loss is normalised by the GLOBAL number of target tokens of the update (all micro-batches,
    all ranks): MLM masks vary per row, so a mean of per-rank means would weight tokens unequally.
    DDP averages gradients over ranks, hence the factor world_size. Gradients are synchronised on the
    last micro-batch only (``no_sync`` before). Returns (loss sum, targets, input tokens), on device.
    ``xe_sum`` (a float64 scalar), when given, accumulates the plain cross entropy in nats of the
    same targets: a hierarchical loss's runs stay comparable with XE runs at a glance.
    ``sync(last)``, when given, is the context of each micro-batch in place of DDP's ``no_sync``
    (a sharded model's accumulation policy, ``helm.parallel.accumulation``).
    """
    n_targets = all_reduce_sum(sum((b["labels"] != IGNORE_INDEX).sum() for b in micro).float())
    scale = world_size / n_targets.clamp(min=1)
    device = n_targets.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    targets_seen = torch.zeros((), dtype=torch.long, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        # no_sync() is a one-shot context: it must span both the forward and the backward.
        if sync is not None:
            context = sync(last)
        elif last or not hasattr(model, "no_sync"):
            context = contextlib.nullcontext()
        else:
            context = model.no_sync()
        with context:
            with autocast(device, amp):
                logits, targets = model(**batch)
                micro_sum = loss_fn(logits, targets, reduction="sum")
            scaler.scale(micro_sum * scale).backward()  # backward outside autocast, as recommended
        loss_sum += micro_sum.detach().double()
        if xe_sum is not None:
            with torch.no_grad():
                z = logits[:, : loss_fn.vocab_size].float()  # padded columns hold no probability
                xe_sum += F.cross_entropy(z, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        targets_seen += (targets != IGNORE_INDEX).sum()
        mask = batch.get("attention_mask")
        tokens += mask.sum() if mask is not None else batch["input_ids"].numel()
    return loss_sum, targets_seen, tokens


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    loss_fn: Callable,
    *,
    hierarchy=None,
    vocab_size: int,
    device: torch.device,
    amp: torch.dtype | None = None,
    prefix: str = "val",
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Loss and metrics over a loader, summed across ranks (sums and counts, not means of means).
    ``hierarchy`` (codon tokenizers only) adds the tree metrics. ``should_stop`` is asked before
    each batch; when it says so, ``Interrupted`` is raised (single process only: ranks must agree)."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(hierarchy=hierarchy, vocab_size=vocab_size)
    for batch in loader:
        if should_stop is not None and should_stop():
            model.train(was_training)
            raise Interrupted("evaluation interrupted")
        batch = to_device(batch, device)
        with autocast(device, amp):
            logits, targets = model(**batch)
        acc.update(logits, targets, loss_sum=loss_fn(logits, targets, reduction="sum"))
    acc.all_reduce()
    out = {f"{prefix}_{k}": v for k, v in acc.compute().items()}
    model.train(was_training)
    return out


class CudaPrefetcher:
    """Copies the next batch to the GPU on a side stream while the current one computes."""

    def __init__(self, loader: Iterable[Batch], device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self):
        stream = torch.cuda.Stream(device=self.device)
        nxt = None
        for batch in self.loader:
            with torch.cuda.stream(stream):
                batch = to_device(batch, self.device, non_blocking=True)
            if nxt is not None:
                yield nxt
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for v in batch.values():
                v.record_stream(torch.cuda.current_stream(self.device))
            nxt = batch
        if nxt is not None:
            yield nxt


# Throughput ----------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, for MFU.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "L40S": 362e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation of one device: the FLOP/s the tokens need over the device's peak."""
    return tokens_per_s * flops_per_token / peak


class Meter:
    """Loss, targets and tokens summed on the device between log steps; read (and summed across
    ranks) only when ``stats`` is called, so the loop never waits for the device otherwise."""

    def __init__(
        self,
        device: torch.device,
        world_size: int,
        flops_per_token: float,
        with_xe: bool = False,
    ):
        self.device, self.world_size, self.with_xe = device, world_size, with_xe
        self.peak = peak_flops(device)
        self.tok_flops = flops_per_token  # the model's (Backbone.flops_per_token)
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
                all_reduce_sum(t)
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
            stats["train/mfu"] = mfu(stats["train/tokens_per_s"], self.tok_flops, self.peak)
            stats["train/mfu"] /= self.world_size
        return stats


# Building and stepping a run's model -------------------------------------------------------------


@dataclass
class Training:
    """The parts of an update: the model (backbone + head), loss, optimizer and precision."""

    model: LanguageModel
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer | None  # None until sharded (--fsdp: make_optimizer)
    lr: float  # the base learning rate (scaled to the global batch unless --lr was given)
    amp: torch.dtype | None
    scaler: torch.amp.GradScaler
    model_config: Any  # the backbone's config dataclass


def build_training(
    cfg: Mapping[str, Any],
    *,
    tokenizer,
    hierarchy,
    device: torch.device,
    global_batch: int,
    shard_over: int | None = None,
) -> Training:
    """Model, loss and optimizer of a resolved configuration (``vars(args)``), as train.py and the
    benchmarks build them. The model is initialised from the current RNG state.

    ``shard_over`` (``--fsdp``: the number of ranks): the model stays on the CPU, for
    ``helm.parallel.shard`` to move each unit to the device as it shards it (no device ever holds
    the whole model), and the optimizer is left to ``make_optimizer`` over the sharded parameters."""
    from helm.config import loss_kwargs, lr_kwargs, model_kwargs
    from helm.losses import build_loss
    from helm.models import build_model, model_config

    model_cfg = model_config(cfg["model_name"], **model_kwargs(cfg, tokenizer.vocab_size))
    ema = cfg.get("model_ema", False)
    check_fits(cfg["model_name"], model_cfg, device, ema=ema, shards=shard_over or 1)
    model = LanguageModel(build_model(cfg["model_name"], model_cfg))
    if shard_over is None:
        model.to(device)
    loss_fn = build_loss(
        **loss_kwargs(cfg),
        vocab_size=tokenizer.vocab_size,
        is_codon=tokenizer.is_codon,
        hierarchy=hierarchy,
    ).to(device)
    lr = scaled_lr(**lr_kwargs(cfg), global_batch=global_batch)
    optimizer = make_optimizer(cfg, model, lr) if shard_over is None else None
    amp = amp_dtype(device, cfg["amp"], cfg["amp_dtype"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    return Training(model, loss_fn, optimizer, lr, amp, scaler, model_cfg)


def make_optimizer(cfg: Mapping[str, Any], model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s parameters (whole or sharded) at base lr ``lr``."""
    from helm.config import optimizer_kwargs

    return build_optimizer(model, lr=lr, **optimizer_kwargs(cfg))


def check_fits(
    model_name: str, model_cfg, device: torch.device, ema: bool = False, shards: int = 1
) -> None:
    """Refuse, before allocating anything, a model whose weights, gradients and Adam moments
    (16 bytes a parameter, 20 with an EMA; activations come on top), divided over ``shards``
    ranks when sharded, exceed the device's memory. The count comes from the model built on the
    meta device (no memory, no RNG draws)."""
    from helm.models import build_model

    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            n_params = sum(p.numel() for p in build_model(model_name, model_cfg).parameters())
    except Exception:  # a model that cannot be built on meta is checked by its real build
        return
    need = n_params * (20 if ema else 16) // shards
    have = device_memory(device)
    if have is not None and need > have:
        raise ValueError(
            f"the model has {n_params / 1e6:,.0f}M parameters: its weights, gradients and optimizer "
            f"state alone need about {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB "
            f"of this {device.type} device{f' ({shards} shards)' if shards > 1 else ''}; reduce "
            "--hidden_size, --num_layers or --intermediate_size, or shard it over more ranks (--fsdp)"
        )


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device, or the host's RAM for the CPU (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
) -> torch.Tensor | None:
    """Unscale, clip (``clip_mode`` at ``clip_grad``, or only measure the norm), step, zero the
    gradients. Returns the gradient norm before clipping (None for value and AGC clipping)."""
    scaler.unscale_(optimizer)
    if clip_grad is not None:
        grad_norm = clip_gradients(model, clip_mode, clip_grad)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
