"""Map-style dataset over a token store: framing, truncation, MLM masking or CLM shift; batching.

`frame` and `pad_batch` are the one framing (``<cls> ids <eos>``) and right padding (with its
attention mask) of every model input in HELM: training rows, features, finetuning, generation.

Determinism: item ``i`` in epoch ``e`` draws every random number (crop offset, mask, replacements)
from ``np.random.default_rng(SeedSequence([seed, e, i]))``. An item therefore depends on nothing but
``(seed, epoch, i)``: not on the number of workers, the order of access or the resume point.

Framing and truncation: a record becomes ``<cls> content <eos>``. The model sees at most
``max_seq_len`` tokens. In MLM the input is the framed row, so the row may hold ``max_seq_len``
tokens; in CLM the input is the row minus its last token (labels are the row minus its first), so
the row may hold ``max_seq_len + 1`` tokens. Content longer than the row budget minus two is cut to
exactly that many tokens: its head (``truncation="head"``) or a window at a uniformly random offset
(``"random"``, every window position equally likely). Both frame tokens are always kept, so a cut
row is still ``<cls> window <eos>``. In CLM the ``<eos>`` label of a cut row is -100: the model is
never taught to end a sequence where the sequence did not end.

MLM targets: content tokens that are not special ids (an ``<unk>`` inside the content is never a
target, as in BERT). ``masking_ratio`` is the expected fraction of content positions selected; the
three strategies and the maths that make each reach it are documented on the functions below. Every
row with at least one maskable token gets at least one target (otherwise it would carry no loss): a
row whose draw selected nothing gets one unit of its strategy (a token, a pair, a span) at a
uniformly random maskable position. This adds ``P(no draw) * unit / n`` to the expected fraction:
about 1e-4 for spans (less for the others) once a row holds 100 tokens at ratio 0.15.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from helm.vocab import CLS_ID, EOS_ID, IGNORE_INDEX, MASK_ID, NUM_SPECIAL, PAD_ID


class TokenStoreLike(Protocol):
    """What the dataset reads: ``len(store)``, ``store[i]`` (token ids, no framing), ``lengths``."""

    lengths: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


def double_start_prob(n: int, ratio: float) -> float:
    """Probability with which each pair start is drawn so that ``E[masked] = ratio * n``.

    Pairs cover positions ``(s, s + 1)`` with starts ``s`` in ``0..n-2``, so every pair is whole.
    The two end positions are covered by one start each (probability ``q``), interior positions by
    two (probability ``1 - (1 - q)^2``), so ``E = 2q + (n - 2)(1 - (1 - q)^2)``. With ``a = 1 - q``
    setting ``E = ratio * n`` gives ``(n - 2) a^2 + 2a - n (1 - ratio) = 0``, whose root in [0, 1]
    is ``a = (sqrt(1 + n (n - 2)(1 - ratio)) - 1) / (n - 2)``. For ``n == 2`` one pair exists and
    ``q = ratio``. For large ``n`` this tends to ``q = 1 - sqrt(1 - ratio)`` (0.078 at 0.15).
    """
    if n <= 2:
        return ratio
    a = (math.sqrt(1.0 + n * (n - 2) * (1.0 - ratio)) - 1.0) / (n - 2)
    return 1.0 - a


def span_length_probs(mean: float = 3.0, max_len: int = 10) -> np.ndarray:
    """``P(length = k)`` for ``k = 1..max_len``: a geometric law truncated to ``max_len`` and
    renormalised, its parameter solved (bisection) so that the mean is exactly ``mean``."""
    if not 1.0 < mean < (max_len + 1) / 2:
        raise ValueError(f"span mean must lie in (1, {(max_len + 1) / 2}), got {mean}")
    k = np.arange(1, max_len + 1)

    def probs(g: float) -> np.ndarray:
        p = g * (1.0 - g) ** (k - 1)
        return p / p.sum()

    # The truncated mean falls from (max_len + 1) / 2 (g -> 0) to 1 (g -> 1) as g grows.
    lo, hi = 1e-9, 1.0 - 1e-9
    for _ in range(60):
        g = (lo + hi) / 2
        lo, hi = (g, hi) if probs(g) @ k > mean else (lo, g)
    return probs((lo + hi) / 2)


def span_start_prob(n: int, ratio: float, length_probs: np.ndarray) -> float:
    """Probability with which each of ``n`` positions starts a span so ``E[masked] = ratio * n``.

    Starts are independent Bernoulli(q), lengths independent draws from ``length_probs``; spans may
    overlap and are clipped at the end. With ``S(d) = P(length > d)``, position ``j`` is uncovered
    with probability ``prod_{d=0}^{min(j, M-1)} (1 - q S(d))`` (a start ``d`` positions before
    it must not reach it), so ``E[masked] = sum_j (1 - that product)``. E is increasing in ``q``
    (and equals ``n`` at ``q = 1``), so bisection finds the exact ``q`` for each ``n``.
    """
    survival = 1.0 - np.concatenate(([0.0], np.cumsum(length_probs)[:-1]))  # S(d), d = 0..M-1
    m = min(n, len(survival))

    def expected(q: float) -> float:
        uncovered = np.exp(np.cumsum(np.log1p(-q * survival[:m])))
        # Positions past the first M see all M offsets: same probability as position M - 1.
        return float((1.0 - uncovered).sum() + (n - m) * (1.0 - uncovered[-1]))

    lo, hi = 0.0, 1.0
    for _ in range(50):
        q = (lo + hi) / 2
        lo, hi = (q, hi) if expected(q) < ratio * n else (lo, q)
    return (lo + hi) / 2


def sample_spans(
    rng: np.random.Generator, n: int, q: float, length_probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Span starts (each position with probability ``q``) and their lengths (unclipped)."""
    starts = np.flatnonzero(rng.random(n) < q)
    lengths = rng.choice(len(length_probs), size=len(starts), p=length_probs) + 1
    return starts, lengths


def _cover(n: int, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Boolean mask of the union of ``[start, start + length)`` clipped to ``n``."""
    diff = np.zeros(n + 1, dtype=np.int64)
    np.add.at(diff, starts, 1)
    np.add.at(diff, np.minimum(starts + lengths, n), -1)
    return np.cumsum(diff[:n]) > 0


class LMDataset(Dataset):
    """Framed, truncated, masked (MLM) or shifted (CLM) rows of a token store (see module doc).

    Items are dicts of 1-D int64 tensors: ``input_ids``, ``labels`` (-100 where there is no
    target) and, with ``return_position_ids``, ``position_ids`` (0..T-1).
    """

    def __init__(
        self,
        store: TokenStoreLike,
        *,
        mode: Literal["mlm", "clm"],
        max_seq_len: int,
        truncation: Literal["head", "random"] = "head",
        masking_strategy: Literal["single", "double", "span"] = "single",
        masking_ratio: float = 0.15,
        mask_replace: Literal["mask", "bert"] = "mask",
        vocab_size: int | None = None,
        seed: int = 0,
        return_position_ids: bool = False,
        span_mean: float = 3.0,
        span_max: int = 10,
        cls_id: int = CLS_ID,
        eos_id: int = EOS_ID,
        mask_id: int = MASK_ID,
        num_special: int = NUM_SPECIAL,
    ) -> None:
        if mode not in ("mlm", "clm"):
            raise ValueError(f"mode must be 'mlm' or 'clm', got {mode!r}")
        if truncation not in ("head", "random"):
            raise ValueError(f"truncation must be 'head' or 'random', got {truncation!r}")
        if masking_strategy not in ("single", "double", "span"):
            raise ValueError(f"unknown masking_strategy {masking_strategy!r}")
        if mask_replace not in ("mask", "bert"):
            raise ValueError(f"mask_replace must be 'mask' or 'bert', got {mask_replace!r}")
        if not 0.0 < masking_ratio <= 1.0:
            raise ValueError(f"masking_ratio must lie in (0, 1], got {masking_ratio}")
        if mask_replace == "bert" and (vocab_size is None or vocab_size <= num_special):
            raise ValueError("mask_replace='bert' needs vocab_size > the number of special ids")
        self.store = store
        self.mode = mode
        self.max_seq_len = max_seq_len
        # Tokens a framed row may hold: CLM drops one token from each end for input and labels.
        self.row_budget = max_seq_len + (1 if mode == "clm" else 0)
        if self.row_budget < 3:
            raise ValueError(f"max_seq_len={max_seq_len} leaves no room for content in {mode}")
        self.truncation = truncation
        self.masking_strategy = masking_strategy
        self.masking_ratio = masking_ratio
        self.mask_replace = mask_replace
        self.vocab_size = vocab_size
        self.seed = seed
        self.return_position_ids = return_position_ids
        self.cls_id, self.eos_id, self.mask_id = cls_id, eos_id, mask_id
        self.num_special = num_special
        self.span_probs = span_length_probs(span_mean, span_max)
        self._start_prob: dict[int, float] = {}  # content length -> start probability, lazily
        # Shared memory, so that set_epoch in the main process reaches persistent workers.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose masks and crops ``__getitem__`` draws (visible to workers)."""
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def lengths(self) -> np.ndarray:
        """Model input length of every item (after framing and truncation): for the sampler."""
        framed = np.minimum(np.asarray(self.store.lengths, dtype=np.int64) + 2, self.row_budget)
        return framed - 1 if self.mode == "clm" else framed

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Item ``i``; indices past ``len(self)`` address repeated passes of one epoch
        (``--epoch-repeats``): record ``i % len(self)`` with masks and crops of its own."""
        i = int(i)
        if i < 0:
            i += len(self)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, i]))
        content = np.asarray(self.store[i % len(self)], dtype=np.int64)
        capacity = self.row_budget - 2
        cut = len(content) > capacity
        if cut:
            offset = (
                0 if self.truncation == "head" else int(rng.integers(len(content) - capacity + 1))
            )
            content = content[offset : offset + capacity]
        framed = frame(content, causal=False, cls_id=self.cls_id, eos_id=self.eos_id)
        if self.mode == "clm":
            input_ids, labels = framed[:-1], framed[1:].copy()
            if cut:
                labels[-1] = IGNORE_INDEX
        else:
            input_ids, labels = self._mask(rng, framed)
        item = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        if self.return_position_ids:
            item["position_ids"] = torch.arange(len(input_ids), dtype=torch.int64)
        return item

    def _mask(self, rng: np.random.Generator, framed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """MLM inputs and labels for one framed row (frame positions are never selected)."""
        content = framed[1:-1]
        n = len(content)
        allowed = content >= self.num_special
        selected = self._select(rng, n) & allowed if n else allowed
        if not selected.any() and allowed.any():
            selected |= self._unit(rng, n, int(rng.choice(np.flatnonzero(allowed)))) & allowed
        pos = np.flatnonzero(selected) + 1  # positions in the framed row
        labels = np.full(len(framed), IGNORE_INDEX, dtype=np.int64)
        labels[pos] = framed[pos]
        input_ids = framed.copy()
        if self.mask_replace == "mask":
            input_ids[pos] = self.mask_id
        else:
            # BERT: 80% <mask>, 10% a random non-special token, 10% left unchanged.
            u = rng.random(len(pos))
            input_ids[pos[u < 0.8]] = self.mask_id
            rand = pos[(u >= 0.8) & (u < 0.9)]
            input_ids[rand] = rng.integers(self.num_special, self.vocab_size, size=len(rand))
        return input_ids, labels

    def _select(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """The strategy's draw over ``n`` content positions (before the at-least-one rule)."""
        ratio = self.masking_ratio
        if self.masking_strategy == "single" or (self.masking_strategy == "double" and n < 2):
            return rng.random(n) < ratio
        if self.masking_strategy == "double":
            starts = np.flatnonzero(rng.random(n - 1) < self._cached_start_prob(n))
            return _cover(n, starts, np.full(len(starts), 2))
        starts, lengths = sample_spans(rng, n, self._cached_start_prob(n), self.span_probs)
        return _cover(n, starts, lengths)

    def _unit(self, rng: np.random.Generator, n: int, at: int) -> np.ndarray:
        """One unit of the strategy covering position ``at``: a token, a pair or a span."""
        if self.masking_strategy == "single" or n < 2:
            starts, lengths = np.array([at]), np.array([1])
        elif self.masking_strategy == "double":
            starts, lengths = np.array([min(at, n - 2)]), np.array([2])
        else:
            starts = np.array([at])
            lengths = rng.choice(len(self.span_probs), size=1, p=self.span_probs) + 1
        return _cover(n, starts, lengths)

    def _cached_start_prob(self, n: int) -> float:
        q = self._start_prob.get(n)
        if q is None:
            if self.masking_strategy == "double":
                q = double_start_prob(n, self.masking_ratio)
            else:
                q = span_start_prob(n, self.masking_ratio, self.span_probs)
            self._start_prob[n] = q
        return q


def frame(
    ids: Sequence[int] | np.ndarray, causal: bool, *, cls_id: int = CLS_ID, eos_id: int = EOS_ID
) -> np.ndarray:
    """One model input: ``<cls> ids <eos>`` as int64, without ``<eos>`` for causal models at
    inference (their training inputs are the framed row minus its last token)."""
    n = len(ids)
    row = np.empty(n + (1 if causal else 2), dtype=np.int64)
    row[0] = cls_id
    row[1 : n + 1] = ids
    if not causal:
        row[-1] = eos_id
    return row


def _padded(rows: Sequence[torch.Tensor | np.ndarray], T: int, value: int) -> torch.Tensor:
    """(B, T) int64: the rows left-aligned, `value` after their ends."""
    out = torch.full((len(rows), T), value, dtype=torch.int64)
    for r, row in enumerate(rows):
        if not isinstance(row, torch.Tensor):
            row = torch.from_numpy(np.asarray(row, dtype=np.int64))
        out[r, : len(row)] = row
    return out


def pad_batch(
    rows: Sequence[torch.Tensor | np.ndarray],
    pad_id: int = PAD_ID,
    pad_to_multiple_of: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input ids and their attention mask (1 real, 0 pad), both int64.

    ``T`` is the longest row, rounded up to ``pad_to_multiple_of`` when given (tensor-core
    friendly shapes, fewer recompilations).
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    sizes = torch.tensor([len(row) for row in rows], dtype=torch.int64)
    T = int(sizes.max())
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    mask = (torch.arange(T)[None, :] < sizes[:, None]).to(torch.int64)  # (B, T)
    return _padded(rows, T, pad_id), mask


def collate(
    batch: Sequence[dict[str, torch.Tensor]],
    pad_id: int = PAD_ID,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad `LMDataset` items to ``(B, T)`` (`pad_batch`): ``input_ids`` with ``pad_id``,
    ``labels`` with -100, ``position_ids`` (when present) with 0; ``attention_mask`` is 1 at real
    tokens, 0 at padding."""
    input_ids, mask = pad_batch([item["input_ids"] for item in batch], pad_id, pad_to_multiple_of)
    T = input_ids.shape[1]
    out = {
        "input_ids": input_ids,
        "labels": _padded([item["labels"] for item in batch], T, IGNORE_INDEX),
        "attention_mask": mask,
    }
    if "position_ids" in batch[0]:
        out["position_ids"] = _padded([item["position_ids"] for item in batch], T, 0)
    return out


def collate_lm(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`collate`, minus the attention mask when no row is padded (decided on the host, no sync):
    a mask-free batch lets causal attention take SDPA's flash path. The training collate_fn."""
    out = collate(batch)
    if bool(out["attention_mask"].all()):
        del out["attention_mask"]
    return out
