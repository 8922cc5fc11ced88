"""Losses over the codon tree (DESIGN.md), as PyTorch references, and dispatch to kernels/hxe.py.

Every loss here is one formula over per-target tables (``path_loss_ref``)::

    L(z, y) = const[y] + sum_s coef[y, s] * lse_s(z, y) - sum_c soft[y, c] * z_c
    lse_s(z, y) = log sum_{c < V, anc[c, s] == anc[y, s]} exp(z_c)       (slots with anc[y, s] >= 0)

``anc[c, s]`` is the ancestor of leaf c at depth s (-1 past the leaf), so slot 0 is the root (a
log-sum-exp over all V real columns) and the leaf's own slot is just ``z_y``. XE is coef = (+1 at the
root, -1 at the leaf); HXE, the amino-acid losses and soft labels are other coefficients.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


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
    """Reference of the fused kernel ``kernels.hxe.path_loss`` (same signature).

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
