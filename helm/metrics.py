"""Pretraining metrics over target positions (DESIGN.md), accumulated as exact sums across steps.

Over the positions whose target is not ``ignore_index``:

- ``accuracy``: argmax == target; ``xe``: mean cross entropy (nats); ``perplexity = exp(xe)``;
- ``loss``: mean training loss, when ``update`` is given the summed loss of the batch;
- with the codon tree only:
  ``aa_accuracy``: the argmax lies in the target's parent group (its amino acid, start, stop or
  special node), i.e. the predicted codon is synonymous or exact;
  ``mistake_severity``: mean ``dist(pred, target)`` over the wrong predictions (0 when none are wrong);
  ``dist@1`` / ``dist@5``: mean over targets of the mean ``dist`` over the top-1 / top-5 predictions.

Argmax and top-k look only at the V real columns: embedding padding is never predicted. Every
quantity is kept as a sum (fp64) or a count (int64) on the logits' device, so ``update`` never
synchronises with the host and batches of any size combine exactly (sums, never means of means).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from helm.hierarchy import CodonHierarchy
from helm.vocab import IGNORE_INDEX

TOP_K = 5

# Slots of the two accumulators.
_COUNT, _CORRECT, _AA_CORRECT, _DIST1 = range(4)  # int64 counts (dist is an integer)
_XE, _LOSS, _DIST5 = range(3)  # fp64 sums


class MetricAccumulator:
    """Sums and counts of the pretraining metrics; ``compute()`` turns them into a dict of floats.

    Build with the codon ``hierarchy`` for the tree metrics, or ``hierarchy=None`` (any tokenizer:
    accuracy, xe, perplexity and loss only). ``vocab_size`` defaults to the hierarchy's 69 leaves,
    else to the logits' width; columns past it are padding.
    """

    def __init__(
        self,
        hierarchy: CodonHierarchy | None = None,
        vocab_size: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if hierarchy is not None and vocab_size not in (None, hierarchy.num_leaves):
            raise ValueError(
                f"the codon tree has {hierarchy.num_leaves} leaves, got vocab_size={vocab_size}"
            )
        self.hierarchy = hierarchy
        self.vocab_size = hierarchy.num_leaves if hierarchy is not None else vocab_size
        self.ignore_index = ignore_index
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.counts: torch.Tensor | None = None  # (4,) int64
        self.sums: torch.Tensor | None = None  # (3,) float64
        self._has_loss = False

    # Accumulation --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything accumulated so far (the device tables are kept)."""
        self.counts = self.sums = None
        self._has_loss = False

    def _state(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.counts is None or self.sums is None:
            self.counts = torch.zeros(4, dtype=torch.int64, device=device)
            self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        return self.counts, self.sums

    def _tree(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (V, V) distance and same-group tables, copied to ``device`` once."""
        key = str(device)
        if key not in self._tables:
            h = self.hierarchy
            assert h is not None
            self._tables[key] = (
                torch.as_tensor(h.dist, device=device),
                torch.as_tensor(h.same_group, device=device),
            )
        return self._tables[key]

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        loss_sum: torch.Tensor | float | None = None,
    ) -> None:
        """Add a batch: logits (..., Vp), targets (...); ``loss_sum`` is the batch's summed loss."""
        Vp = logits.shape[-1]
        V = self.vocab_size if self.vocab_size is not None else Vp
        if Vp < V:
            raise ValueError(f"logits have {Vp} columns, the vocabulary has {V}")
        acc = torch.promote_types(logits.dtype, torch.float32)
        z = logits.reshape(-1, Vp)[:, :V].to(acc)  # (N, V) real columns only
        targets = targets.reshape(-1)
        counts, sums = self._state(z.device)

        # Rows are masked arithmetically rather than selected, which would need a host sync.
        valid = targets != self.ignore_index  # (N,)
        y = torch.where(valid, targets, 0).long()  # (N,)
        pred = z.argmax(-1)  # (N,)
        counts[_COUNT] += valid.sum()
        counts[_CORRECT] += (valid & (pred == y)).sum()
        xe = F.cross_entropy(z, targets.long(), ignore_index=self.ignore_index, reduction="sum")
        sums[_XE] += xe.double()
        if loss_sum is not None:
            sums[_LOSS] += torch.as_tensor(loss_sum, device=z.device).detach().double()
            self._has_loss = True

        if self.hierarchy is None:
            return
        dist_tab, same = self._tree(z.device)
        counts[_AA_CORRECT] += (valid & same[pred, y]).sum()
        # dist(pred, y) is 0 for a correct prediction, so its sum over all targets is also the sum
        # over the wrong ones: severity and dist@1 share one accumulator.
        counts[_DIST1] += torch.where(valid, dist_tab[pred, y], 0).sum()
        k = min(TOP_K, V)
        top = z.topk(k, dim=-1).indices  # (N, k)
        d_top = dist_tab[top, y[:, None]].double().mean(-1)  # (N,) mean dist over the top k
        sums[_DIST5] += torch.where(valid, d_top, 0.0).sum()

    def all_reduce(self) -> None:
        """Sum the accumulators over all ranks (no-op outside ``torch.distributed``).

        Every rank must call it; a rank that saw no batch contributes zeros.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        nccl = dist.get_backend() == "nccl"  # nccl reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        counts, sums = self._state(device)
        dist.all_reduce(counts)
        dist.all_reduce(sums)

    # Results -------------------------------------------------------------------------------------
    def compute(self) -> dict[str, float]:
        """The metrics as Python floats (one host sync); empty accumulators give zeros."""
        if self.counts is None or self.sums is None:
            counts, sums = [0] * 4, [0.0] * 3
        else:
            counts, sums = self.counts.tolist(), self.sums.tolist()
        n = max(counts[_COUNT], 1)
        xe = sums[_XE] / n
        out = {"accuracy": counts[_CORRECT] / n, "xe": xe, "perplexity": math.exp(xe)}
        if self._has_loss:
            out["loss"] = sums[_LOSS] / n
        if self.hierarchy is not None:
            wrong = max(counts[_COUNT] - counts[_CORRECT], 1)
            out["aa_accuracy"] = counts[_AA_CORRECT] / n
            out["mistake_severity"] = counts[_DIST1] / wrong
            out["dist@1"] = counts[_DIST1] / n
            out[f"dist@{TOP_K}"] = sums[_DIST5] / n
        return out

    @property
    def count(self) -> int:
        """Target tokens seen so far (a host sync)."""
        return 0 if self.counts is None else int(self.counts[_COUNT])
