"""The path loss: every loss over the codon tree as one formula over per-target tables.

::

    L(z, y) = const[y] + sum_s coef[y, s] * lse_s(z, y) - sum_c soft[y, c] * z_c
    lse_s(z, y) = log sum_{c < V, anc[c, s] == anc[y, s]} exp(z_c)       (slots with anc[y, s] >= 0)

``anc[c, s]`` is the ancestor of leaf c at depth s (-1 past the leaf), so slot 0 is the root (a
log-sum-exp over all V real columns) and the leaf's own slot is just ``z_y``. XE is coef = (+1 at the
root, -1 at the leaf); HXE, the amino-acid losses and soft labels are other coefficients
(``helm.losses.tables.loss_tables`` builds them).

``path_loss_ref`` is the PyTorch reference: the CPU path, the test oracle and the benchmark
baseline of the fused Triton kernel ``helm.kernels.path_loss.path_loss_triton``, which has the same
signature. ``path_loss(logits, targets, tables, impl=)`` dispatches between them
(``helm.ops.resolve_impl``); on the torch path, plain XE tables go through ``F.cross_entropy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helm.ops import resolve_impl
from helm.vocab import IGNORE_INDEX


@dataclass(frozen=True)
class LossTables:
    """The per-target tables of ``path_loss_ref``: anc (V, S) int64, coef (V, S) float32,
    soft (V, V) float32 or None, const (V,) float32 or None. ``is_xe``: the tables are plain cross
    entropy (root minus leaf), which the torch path computes with ``F.cross_entropy``."""

    anc: torch.Tensor
    coef: torch.Tensor
    soft: torch.Tensor | None = None
    const: torch.Tensor | None = None
    is_xe: bool = False

    @property
    def vocab_size(self) -> int:
        return self.anc.shape[0]

    def to(self, device: torch.device | str | None) -> LossTables:
        move = lambda t: None if t is None else t.to(device)
        return LossTables(
            move(self.anc), move(self.coef), move(self.soft), move(self.const), self.is_xe
        )


def path_loss_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    anc: torch.Tensor,
    coef: torch.Tensor,
    soft: torch.Tensor | None = None,
    const: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference of the fused kernel ``helm.kernels.path_loss.path_loss_triton`` (same signature).

    logits: (N, Vp) any float dtype, Vp >= V (columns >= V are embedding padding: no probability);
    targets: (N,) int, ``ignore_index`` rows contribute nothing; anc: (V, S) int node ids, -1 padded;
    coef: (V, S) float; soft: (V, V) float or None; const: (V,) float or None.
    reduction: "mean" over non-ignored rows (0 when there are none), "sum", or "none" (N,).
    """
    V = anc.shape[0]
    acc = torch.promote_types(logits.dtype, torch.float32)  # fp32 maths; float64 stays float64
    z = logits[:, :V].to(acc)  # (N, V): padded columns dropped = zero probability
    valid = targets != ignore_index
    y = torch.where(valid, targets, 0).long()  # (N,)
    path = anc[y]  # (N, S) ancestor of the target at each depth
    # member[n, s, c]: leaf c lies under the target's depth-s ancestor.
    member = (anc.T[None, :, :] == path[:, :, None]) & (path[:, :, None] >= 0)  # (N, S, V)
    lse = torch.logsumexp(z[:, None, :].masked_fill(~member, float("-inf")), dim=-1)  # (N, S)
    c = coef[y].to(acc)
    loss = (c * torch.where(path >= 0, lse, torch.zeros_like(lse))).sum(-1)  # (N,)
    if soft is not None:
        loss = loss - (soft[y].to(acc) * z).sum(-1)
    if const is not None:
        loss = loss + const[y].to(acc)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def _xe_fast(
    logits: torch.Tensor, targets: torch.Tensor, V: int, ignore_index: int, reduction: str
) -> torch.Tensor:
    """Plain XE through ``F.cross_entropy`` on the real columns, same conventions as the reference."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    z = logits[:, :V].to(acc)  # padded columns dropped = zero probability
    loss = F.cross_entropy(z, targets.long(), ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":  # 0 (not NaN) when every row is ignored, like path_loss_ref
        return loss.sum() / (targets != ignore_index).sum().clamp(min=1)
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def path_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tables: LossTables,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """The path loss of ``tables`` through the Triton kernel or the reference (``impl``: auto |
    torch | triton, see ``helm.ops``). logits (..., Vp) and targets (...) are flattened; reduction
    "none" returns the targets' shape."""
    shape = targets.shape
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    V = tables.vocab_size
    if logits.shape[-1] < V:
        raise ValueError(f"logits have {logits.shape[-1]} columns, the vocabulary has {V}")
    if resolve_impl(impl, logits, op="path_loss") == "triton":
        from helm.kernels.path_loss import (
            path_loss_triton,  # lazy: importing helm never imports triton
        )

        fn = path_loss_triton
    elif tables.is_xe:
        out = _xe_fast(logits, targets, V, ignore_index, reduction)
        return out.reshape(shape) if reduction == "none" else out
    else:
        fn = path_loss_ref
    t = tables.to(logits.device)
    out = fn(logits, targets, t.anc, t.coef, t.soft, t.const, ignore_index, reduction)
    return out.reshape(shape) if reduction == "none" else out
