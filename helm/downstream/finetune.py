"""Finetuning: the whole model (backbone and head) trained on a task, under the probes' protocol.

Each run starts from a fresh copy of the pretrained backbone and a new head on its last hidden
states at the sequence's own tokens: the TextCNN of the probes, or ``head="linear"``, one linear
layer on their mean. A record is framed by `helm.data.dataset.frame` as `helm.embed` frames it
(``<cls> tokens <eos>`` for a bidirectional model, ``<cls> tokens`` for a causal one) and cut to
the model's window (``max_seq_len``); batches are right-padded (`helm.data.dataset.pad_batch`). AdamW trains the head at the
grid's learning rate and the backbone at ``backbone_lr_scale`` times it (per-parameter ``_optim``
hints and ``_no_weight_decay`` tags honoured, as in pretraining), under bf16 autocast on CUDA.

Everything else is the probe protocol of `helm.downstream.protocol`: the same splits, training-set
target standardisation and losses, early stopping on the validation metric with the test metric
taken at the best validation epoch (`train_with_early_stopping`), the grid point chosen on mean
validation over seeds (`search_grid`), and a `ProbeResult` for the same report and JSON.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from helm.data.dataset import frame, pad_batch
from helm.data.io import DataError
from helm.downstream.heads import TextCNN
from helm.downstream.protocol import (
    ProbeResult,
    search_grid,
    task_loss,
    train_with_early_stopping,
    training_targets,
)
from helm.downstream.runs import PAPER_GRID, Grid, RunStore
from helm.downstream.splits import TaskSplit, check_splits
from helm.downstream.tasks import TaskData, TaskType
from helm.embed import window_capacity
from helm.lm import amp_dtype, inference_autocast
from helm.optim import build_optimizer, param_groups

HEADS = ("textcnn", "linear")


class MeanPoolLinear(nn.Module):
    """The mean of the real tokens' states, then one linear layer (the ``linear`` head)."""

    def __init__(self, d_in: int, num_outputs: int) -> None:
        super().__init__()
        self.out = nn.Linear(d_in, num_outputs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) states and (B, T) bool mask of real tokens -> (B, num_outputs)."""
        m = mask[..., None].to(x.dtype)  # (B, T, 1)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1)  # (B, D)
        return self.out(pooled)


class FinetuneModel(nn.Module):
    """A backbone and a head reading its hidden states at the sequence's tokens (frame dropped)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, T) framed ids and padding mask, (B, T - 1) mask of sequence tokens -> (B, K)."""
        hidden = self.backbone(input_ids, attention_mask=attention_mask)  # (B, T, D)
        return self.head(hidden[:, 1:], token_mask)  # the tokens after <cls>


def build_head(head: str, d_model: int, num_outputs: int) -> nn.Module:
    """The TextCNN of the probes, or the mean-pooled linear layer (``"linear"``)."""
    if head == "textcnn":
        return TextCNN(d_model, num_outputs)
    if head == "linear":
        return MeanPoolLinear(d_model, num_outputs)
    raise ValueError(f"head must be one of {HEADS}, got {head!r}")


def frame_tokens(
    token_ids: Sequence[np.ndarray], max_seq_len: int, causal: bool
) -> list[np.ndarray]:
    """Each sequence's ids cut to the model's window and framed as `helm.embed.extract` frames them."""
    capacity = window_capacity(max_seq_len, causal)
    return [frame(np.asarray(ids)[:capacity], causal) for ids in token_ids]


def collate(
    rows: Sequence[np.ndarray], causal: bool, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Right-padded (B, T) input ids, their attention mask (None when nothing is padded) and the
    (B, T - 1) bool mask of each row's sequence tokens (after ``<cls>``, before ``<eos>``)."""
    input_ids, attention_mask = pad_batch(rows)  # (B, T)
    T = input_ids.shape[1]
    lengths = attention_mask.sum(1)
    num_tokens = lengths - (1 if causal else 2)
    token_mask = torch.arange(T - 1)[None, :] < num_tokens[:, None]  # (B, T - 1)
    mask = None if bool(attention_mask.all()) else attention_mask.to(device)
    return input_ids.to(device), mask, token_mask.to(device)


def finetune_param_groups(
    model: FinetuneModel, backbone_lr_scale: float, weight_decay: float = 0.01
) -> list[dict]:
    """Optimizer groups with the head at the base lr and the backbone at ``backbone_lr_scale``
    times it, from `helm.optim.param_groups` (no decay for tagged and 1-D parameters, a
    parameter's ``lr_scale`` hint multiplies its lr); each group is named ``head`` or ``backbone``."""
    groups = []
    for name, module, scale in (
        ("head", model.head, 1.0),
        ("backbone", model.backbone, backbone_lr_scale),
    ):
        for group in param_groups(module, weight_decay, lr_scale=scale):
            groups.append(group | {"name": name})
    return groups


def finetune_run(
    backbone: nn.Module,
    framed: Sequence[np.ndarray],
    data: TaskData,
    split: TaskSplit,
    lr: float,
    batch_size: int,
    seed: int,
    *,
    head: str = "textcnn",
    backbone_lr_scale: float = 0.1,
    weight_decay: float = 0.01,
    max_epochs: int = 100,
    patience: int = 15,
    eval_batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> tuple[float, dict[str, float], int, FinetuneModel]:
    """One run on a copy of `backbone`: (best val value, test metrics there, epoch, the model).

    `framed` holds one framed id array per record (`frame_tokens`). The returned model is the one
    after the last epoch trained; `backbone` itself is left untouched.
    """
    device = torch.device(device)
    task, causal = data.task, not backbone.cfg.bidirectional
    y, mu, sd = training_targets(data, split.train)
    y_train = torch.as_tensor(
        y, dtype=torch.int64 if task == TaskType.CLASSIFICATION else torch.float32
    )
    torch.manual_seed(seed)  # the head's initialisation and the dropout
    order = torch.Generator().manual_seed(seed)  # the epochs' shuffling
    model = FinetuneModel(
        copy.deepcopy(backbone), build_head(head, backbone.cfg.d_model, data.num_outputs)
    ).to(device)
    opt = build_optimizer(finetune_param_groups(model, backbone_lr_scale, weight_decay), lr=lr)
    # bf16 autocast needs no loss scaling; the fp16 fallback of the inference policy does.
    fp16 = amp_dtype(device, enabled=device.type == "cuda") == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    def train_epoch() -> None:
        model.train()
        perm = split.train[torch.randperm(len(split.train), generator=order).numpy()]
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            with inference_autocast(device):
                out = model(*collate([framed[i] for i in idx], causal, device))
            loss = task_loss(task, out.float(), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    @torch.no_grad()
    def predict(idx: np.ndarray) -> torch.Tensor:
        model.eval()
        outs = []
        for start in range(0, len(idx), eval_batch_size):
            rows = [framed[i] for i in idx[start : start + eval_batch_size]]
            with inference_autocast(device):
                outs.append(model(*collate(rows, causal, device)).float())
        return torch.cat(outs)

    val, test, epoch = train_with_early_stopping(
        train_epoch, predict, data, split, mu, sd, max_epochs, patience
    )
    return val, test, epoch, model


def evaluate_finetune(
    backbone: nn.Module,
    token_ids: Sequence[np.ndarray],
    data: TaskData,
    splits: Sequence[TaskSplit],
    *,
    grid: Grid = PAPER_GRID,
    head: str = "textcnn",
    backbone_lr_scale: float = 0.1,
    weight_decay: float = 0.01,
    eval_batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = True,
    method: str | None = None,
    store: RunStore | None = None,
    input: str = "",
) -> ProbeResult:
    """Finetune `backbone` with a head on a task, under the probe protocol (module docstring).

    Args:
        backbone: a pretrained backbone with ``.cfg`` (e.g. ``helm.hf.load_model(...).model``);
            every run trains a fresh copy, so it is never modified.
        token_ids: one array of token ids per record of `data` (no frame), as from the
            checkpoint's tokenizer; records longer than the model's window are cut to its head.
        splits: from `make_splits`; several (k-fold) pool their runs into one mean and std.
        grid: the search, as in `evaluate_probe` (`Grid`); its lrs are the head's.
        head: ``"textcnn"`` or ``"linear"`` (mean-pooled linear layer).
        backbone_lr_scale: the backbone's learning rate as a multiple of the head's.
        weight_decay: AdamW's decoupled weight decay (never on biases, norms or tagged tensors).
        eval_batch_size: records per forward pass when scoring validation and test.
        device: where to train (default: the backbone's device).
        method: the name in the result (default ``finetune_<head>``).
        store: finished runs are kept there and read back on a rerun (`RunStore`).
        input: what the model reads of each record, for the report.
    """
    if len(token_ids) != len(data):
        raise DataError(f"{len(token_ids)} token arrays for {len(data)} records of {data.source}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if backbone_lr_scale < 0:
        raise ValueError(f"backbone_lr_scale must be >= 0, got {backbone_lr_scale}")
    check_splits(splits, len(data))
    empty = [i for i, t in enumerate(token_ids) if len(t) == 0]
    if empty:
        raise DataError(f"records {empty[:5]} have no tokens (shorter than one 3-mer?)")
    causal = not backbone.cfg.bidirectional
    if window_capacity(backbone.cfg.max_seq_len, causal) < 1:
        raise ValueError(f"max_seq_len {backbone.cfg.max_seq_len} leaves no room for tokens")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    framed = frame_tokens(token_ids, backbone.cfg.max_seq_len, causal)

    def run(split: TaskSplit, lr: float, batch_size: int, seed: int):
        return finetune_run(
            backbone,
            framed,
            data,
            split,
            lr,
            batch_size,
            seed,
            head=head,
            backbone_lr_scale=backbone_lr_scale,
            weight_decay=weight_decay,
            max_epochs=grid.max_epochs,
            patience=grid.patience,
            eval_batch_size=eval_batch_size,
            device=device,
        )[:3]

    result = search_grid(
        run,
        data,
        splits,
        grid=grid,
        progress=progress,
        method=method or f"finetune_{head}",
        store=store,
    )
    result.input = input
    return result
