"""The training losses (``--loss``): one registry of their names, options and documentation.

The command line builds its loss flags from ``LOSSES`` and ``OPTIONS``, the trainer and eval.py
build a loss with ``build_loss(name, **options)``, and an export's model card describes it with
``describe``: an option has one name (``hxe_alpha``) from the flag to the loss tables. The formulas
and the module are in ``helm.losses.tables``; importing this package imports no torch.

    XE            cross entropy
    HXE           hierarchical cross entropy, w_d = exp(-alpha d) / Z along the target's path
    soft_labels   KL(q_y || p), q_y(c) = softmax_c(-beta dist(c, y) / dist_max)
    aa_loss_only  -log P(amino acid of y)
    aa_loss_add   XE + weight * (-log P(amino acid of y))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from helm.hierarchy import CodonHierarchy
    from helm.losses.tables import HelmLoss

CODON_HINT = "--tokenizer 3mer --overlap 0 (--data-type nuc or codon)"


@dataclass(frozen=True)
class LossOption:
    """A setting of one or more losses, under its flag (the key is the flag with underscores)."""

    flag: str
    default: Any
    kind: Any  # float, or "bool" (true/false): the flag table's kinds
    help: str
    valid: Callable[[Any], bool] | None = None  # a bound, written so that NaN fails it
    requirement: str = ""

    @property
    def key(self) -> str:
        return self.flag[2:].replace("-", "_")

    def check(self, value: Any) -> None:
        if self.valid is not None and not self.valid(value):
            raise ValueError(f"{self.flag} {self.requirement}, got {value}")


@dataclass(frozen=True)
class LossSpec:
    name: str
    help: str
    options: tuple[str, ...] = ()  # the keys of OPTIONS this loss reads
    needs_tree: bool = True  # the codon tree, hence the codon tokenizer


OPTIONS: dict[str, LossOption] = {
    o.key: o
    for o in (
        LossOption("--hxe-alpha", 0.2, float, "HXE weight decay per tree level: w_d = exp(-alpha d) / Z",
                   lambda v: v >= 0, "must be >= 0"),
        LossOption("--hxe-normalize", True, "bool", "normalise HXE weights by Z (sum over nodes)"),
        LossOption("--soft-labels-beta", 15.0, float, "sharpness of soft-label targets",
                   lambda v: v > 0 and math.isfinite(v), "must be > 0"),
        LossOption("--aa-loss-weight", 1.0, float, "weight of the amino-acid term in aa_loss_add",
                   lambda v: v >= 0 and math.isfinite(v), "must be >= 0"),
    )
}  # fmt: skip

LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec("XE", "cross entropy", needs_tree=False),
        LossSpec("HXE", "hierarchical cross entropy over the codon tree", ("hxe_alpha", "hxe_normalize")),
        LossSpec("soft_labels", "KL to targets softened by tree distance", ("soft_labels_beta",)),
        LossSpec("aa_loss_add", "cross entropy plus the amino-acid loss", ("aa_loss_weight",)),
        LossSpec("aa_loss_only", "the amino-acid loss alone: -log P(amino acid)"),
    )
}  # fmt: skip


def spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown --loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name]


def loss_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Every loss option of a resolved configuration (its default where the config has none)."""
    return {key: cfg.get(key, option.default) for key, option in OPTIONS.items()}


def describe(name: str, options: Mapping[str, Any]) -> str:
    """The loss and the options it reads, for a model card: ``HXE (hxe_alpha 0.2, ...)``."""
    used = [f"{key} {options.get(key, OPTIONS[key].default)}" for key in spec(name).options]
    return f"{name} ({', '.join(used)})" if used else name


def build_loss(
    name: str,
    *,
    vocab_size: int,
    is_codon: bool,
    hierarchy: CodonHierarchy | None = None,
    impl: str = "auto",
    **options: Any,
) -> HelmLoss:
    """The loss ``name`` for a tokenizer of ``vocab_size`` tokens; ``options`` are keys of
    ``OPTIONS`` (defaults for those not given). Tree losses need the codon tokenizer (``is_codon``)
    and its ``hierarchy``; XE works with any vocabulary. ``impl``: auto | torch | triton."""
    from helm.losses.tables import HelmLoss, loss_tables

    loss = spec(name)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown loss option(s) {unknown}; known: {sorted(OPTIONS)}")
    if loss.needs_tree:
        if not is_codon:
            raise ValueError(
                f"--loss {name} needs the codon tree, which only the codon tokenizer has: "
                f"use {CODON_HINT}, or --loss XE"
            )
        if hierarchy is None:
            raise ValueError(f"--loss {name} needs a codon hierarchy (--hierarchy true|random)")
    tables = loss_tables(name, hierarchy, vocab_size=vocab_size, **options)
    return HelmLoss(name, tables, impl=impl)
