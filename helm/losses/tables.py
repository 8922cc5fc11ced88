"""Losses over the codon tree (DESIGN.md): the tables, the functional losses and ``HelmLoss``
(the registry of names and options, and ``build_loss``, are ``helm.losses``'s).

Every loss here is one formula over per-target tables, the path loss of ``helm.ops.path_loss``::

    L(z, y) = const[y] + sum_s coef[y, s] * lse_s(z, y) - sum_c soft[y, c] * z_c

XE is coef = (+1 at the root, -1 at the leaf); HXE, the amino-acid losses and soft labels are other
coefficients. Since ``log P(node) = lse(node) - lse(root)``, any loss that is a weighted sum of log
node probabilities (plus a linear term in z) has this form; ``loss_tables`` builds the tables once,
and ``HelmLoss`` keeps them as buffers so they follow the module to its device. The reference, the
Triton kernel and the choice between them (``impl``) are ``helm.ops.path_loss``'s.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import xlogy
from torch import nn

from helm.hierarchy import CodonHierarchy
from helm.losses import LOSSES, OPTIONS, spec
from helm.ops import IMPLS
from helm.ops.path_loss import LossTables, path_loss
from helm.vocab import IGNORE_INDEX


# Tables --------------------------------------------------------------------------------------------
def hxe_weights(hierarchy: CodonHierarchy, alpha: float, normalize: bool = True) -> np.ndarray:
    """(max_depth + 1,) HXE edge weights ``w_d = exp(-alpha d) / Z`` (index 0 is unused).

    Z sums ``exp(-alpha depth(n))`` over all nodes of the tree (98 for the codon tree), else 1.
    """
    d = np.arange(hierarchy.max_depth + 1, dtype=np.float64)
    z = np.exp(-alpha * hierarchy.depth.astype(np.float64)).sum() if normalize else 1.0
    return np.exp(-alpha * d) / z


def soft_targets(hierarchy: CodonHierarchy, beta: float) -> np.ndarray:
    """(V, V) float64: row y is ``q_y(c) = softmax_c(-beta dist(c, y) / dist_max)``."""
    dist = hierarchy.dist.astype(np.float64)
    logit = -beta * dist / float(hierarchy.height[0])  # dist_max = height of the root = 4
    logit -= logit.max(axis=1, keepdims=True)  # the diagonal (dist 0) is the row maximum
    q = np.exp(logit)
    return q / q.sum(axis=1, keepdims=True)


def _flat_tables(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A two-level tree (root, then one leaf per token) for XE with any vocabulary."""
    anc = np.stack([np.zeros(vocab_size, np.int64), np.arange(1, vocab_size + 1)], axis=1)
    coef = np.zeros((vocab_size, 2))
    coef[:, 0], coef[:, 1] = 1.0, -1.0  # XE = lse(root) - z_y
    return anc, coef


def _build_tables(
    kind: str,
    hierarchy: CodonHierarchy | None,
    alpha: float,
    normalize: bool,
    beta: float,
    aa_weight: float,
    vocab_size: int | None,
) -> LossTables:
    soft = const = None
    if kind == "XE":
        V = vocab_size if vocab_size is not None else hierarchy.num_leaves  # type: ignore[union-attr]
        anc, coef = _flat_tables(V)
    else:
        assert hierarchy is not None  # checked by loss_tables
        if vocab_size is not None and vocab_size != hierarchy.num_leaves:
            raise ValueError(
                f"loss {kind!r} needs the {hierarchy.num_leaves}-token codon vocabulary, "
                f"got vocab_size={vocab_size}"
            )
        anc = hierarchy.paths  # (V, S) ancestor of each leaf at each depth, -1 padded
        V = hierarchy.num_leaves
        rows, D = np.arange(V), hierarchy.leaf_depth  # D[y]: slot of the leaf itself
        coef = np.zeros(anc.shape)
        if kind == "HXE":
            # L = -sum_{d=1..D} w_d (lse_d - lse_{d-1}), since log P(C_d) = lse_d - lse_0.
            # Regroup the telescoping sum by node: slot s appears as +w_{s+1} lse_s (from term
            # d = s + 1) and -w_s lse_s (from term d = s), so
            #   coef_0 = w_1,  coef_s = w_{s+1} - w_s (0 < s < D),  coef_D = -w_D.
            # With all w_d = 1 only the root and leaf survive: XE.
            w = hxe_weights(hierarchy, alpha, normalize)
            for y in rows:
                coef[y, 0] = w[1]
                coef[y, 1 : D[y]] = w[2 : D[y] + 1] - w[1 : D[y]]
                coef[y, D[y]] = -w[D[y]]
        elif kind == "aa_loss_only":
            coef[:, 0] = 1.0  # L_aa = -log P(parent) = lse_0 - lse_{D-1}
            coef[rows, D - 1] = -1.0
        elif kind == "aa_loss_add":
            # XE + lam L_aa = (1 + lam) lse_0 - lam lse_{D-1} - z_y
            coef[:, 0] = 1.0 + aa_weight
            coef[rows, D - 1] = -aa_weight
            coef[rows, D] = -1.0
        elif kind == "soft_labels":
            # KL(q || p) = sum_c q log q - sum_c q (z_c - lse_0) = const + lse_0 - sum_c q z_c,
            # because sum_c q_c = 1.
            q = soft_targets(hierarchy, beta)
            coef[:, 0] = 1.0
            soft = torch.as_tensor(q, dtype=torch.float32)
            const = torch.as_tensor(xlogy(q, q).sum(1), dtype=torch.float32)  # 0 log 0 = 0
    return LossTables(
        torch.as_tensor(anc, dtype=torch.int64).contiguous(),
        torch.as_tensor(coef, dtype=torch.float32).contiguous(),
        soft,
        const,
        is_xe=kind == "XE",
    )


_TABLE_CACHE: dict[tuple, LossTables] = {}


def loss_tables(
    kind: str,
    hierarchy: CodonHierarchy | None,
    *,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
    **options: float | bool,
) -> LossTables:
    """The ``path_loss_ref`` tables of loss ``kind`` (a ``helm.losses.LOSSES`` name), cached per
    device. ``options`` are ``helm.losses.OPTIONS`` keys (``hxe_alpha``, ...; defaults for the rest).

    XE ignores the hierarchy and needs only ``vocab_size`` (any tokenizer); the others need the codon
    hierarchy. Only the options of ``kind`` enter the cache key (XE does not depend on alpha).
    """
    loss = spec(kind)
    opts = {key: options.get(key, option.default) for key, option in OPTIONS.items()}
    for option in OPTIONS.values():
        option.check(opts[option.key])
    if kind == "XE" and vocab_size is None and hierarchy is None:
        raise ValueError("XE tables need vocab_size or a hierarchy")
    params = tuple(opts[key] for key in loss.options)
    tree = None
    if loss.needs_tree:
        if hierarchy is None:
            raise ValueError(f"loss {kind!r} needs the codon hierarchy")
        tree = (hierarchy.kind, hierarchy.seed, tuple(hierarchy.codon_order()))
    V = vocab_size if vocab_size is not None else hierarchy.num_leaves  # type: ignore[union-attr]
    key = (kind, tree, params, V, str(torch.device(device or "cpu")))
    if key not in _TABLE_CACHE:
        tables = _build_tables(
            kind,
            hierarchy,
            opts["hxe_alpha"],
            opts["hxe_normalize"],
            opts["soft_labels_beta"],
            opts["aa_loss_weight"],
            vocab_size,
        )
        _TABLE_CACHE[key] = tables.to(device)
    return _TABLE_CACHE[key]


# Public functional API -----------------------------------------------------------------------------
def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    impl: str = "auto",
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Cross entropy over the first ``vocab_size`` columns (default: all of them)."""
    V = vocab_size if vocab_size is not None else logits.shape[-1]
    tables = loss_tables("XE", None, vocab_size=V, device=logits.device)
    kw = dict(ignore_index=ignore_index, reduction=reduction, impl=impl)
    return path_loss(logits, targets, tables, **kw)


def hxe_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    hierarchy: CodonHierarchy,
    alpha: float = 0.2,
    normalize: bool = True,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """Hierarchical cross entropy: ``-sum_d w_d log(P(C_d) / P(C_{d-1}))`` along the target's path."""
    tables = loss_tables(
        "HXE", hierarchy, hxe_alpha=alpha, hxe_normalize=normalize, device=logits.device
    )
    kw = dict(ignore_index=ignore_index, reduction=reduction, impl=impl)
    return path_loss(logits, targets, tables, **kw)


def soft_label_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    hierarchy: CodonHierarchy,
    beta: float = 15.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """``KL(q_y || p)`` with ``q_y(c) = softmax_c(-beta dist(c, y) / dist_max)``."""
    tables = loss_tables("soft_labels", hierarchy, soft_labels_beta=beta, device=logits.device)
    kw = dict(ignore_index=ignore_index, reduction=reduction, impl=impl)
    return path_loss(logits, targets, tables, **kw)


def aa_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    hierarchy: CodonHierarchy,
    weight: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """Amino-acid loss ``-log P(parent(y))``; with a ``weight``, ``XE + weight * L_aa``."""
    kind, w = ("aa_loss_only", 1.0) if weight is None else ("aa_loss_add", weight)
    tables = loss_tables(kind, hierarchy, aa_loss_weight=w, device=logits.device)
    kw = dict(ignore_index=ignore_index, reduction=reduction, impl=impl)
    return path_loss(logits, targets, tables, **kw)


# Module --------------------------------------------------------------------------------------------
class HelmLoss(nn.Module):
    """One of ``LOSSES`` with its tables as (non-persistent) buffers: built once, moved with ``.to``.

    ``forward(logits (N, Vp), targets (N,), reduction)``; the trainer uses ``reduction="sum"`` and
    divides by the global number of target tokens.
    """

    def __init__(
        self, name: str, tables: LossTables, impl: str = "auto", ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.name, self.impl, self.ignore_index = name, impl, ignore_index
        self.register_buffer("anc", tables.anc.clone(), persistent=False)
        self.register_buffer("coef", tables.coef.clone(), persistent=False)
        soft, const = tables.soft, tables.const
        self.register_buffer("soft", None if soft is None else soft.clone(), persistent=False)
        self.register_buffer("const", None if const is None else const.clone(), persistent=False)

    @property
    def vocab_size(self) -> int:
        return self.anc.shape[0]

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        tables = LossTables(self.anc, self.coef, self.soft, self.const, self.name == "XE")
        return path_loss(
            logits,
            targets,
            tables,
            ignore_index=self.ignore_index,
            reduction=reduction,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, vocab_size={self.vocab_size}, impl={self.impl!r}"
