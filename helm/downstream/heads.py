"""Probe heads on frozen per-token features: TextCNN, closed-form ridge, L2 logistic regression.

Also the feature side of the no-pretraining baselines: `OneHotEncoder` (one-hot codons per token)
and `codon_frequency_features` (64 codon frequencies per sequence), and `pad_features`, which turns
a list of (T_i, D) arrays into a padded (B, T, D) batch and its (B, T) mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from helm.vocab import kmers

NUM_CODONS = len(kmers(3))


def pad_features(
    features: Sequence[np.ndarray | torch.Tensor], device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (T_i, D) arrays into a zero-padded (B, T_max, D) float tensor and a (B, T_max) mask."""
    tensors = [torch.as_tensor(f, dtype=torch.float32) for f in features]
    lengths = torch.tensor([len(t) for t in tensors])
    x = nn.utils.rnn.pad_sequence(tensors, batch_first=True)  # (B, T, D)
    mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]  # (B, T)
    return x.to(device), mask.to(device)


def mean_pool(features: Sequence[np.ndarray]) -> np.ndarray:
    """(N, D) mean over the tokens of each (T_i, D) array (the linear probe's input)."""
    return np.stack([np.asarray(f, dtype=np.float64).mean(axis=0) for f in features])


class TextCNN(nn.Module):
    """Kim's TextCNN over token features, as used by CodonBERT's probes.

    linear D -> hidden, then one 1-D convolution per width (``channels`` filters each) along the
    token axis, ReLU, global max-pool over real tokens, concatenation, dropout, linear to outputs.

    Padding never changes the output: padded positions are zeroed after the input projection and
    the sequence is right-padded with ``max(widths) - 1`` zeros, so the window at real position t
    sees real tokens and zeros beyond the end whatever the batch's padding; only windows starting at
    real positions enter the max (the others are set to -inf), and every sequence of at least one
    token has one.
    """

    def __init__(
        self,
        d_in: int,
        num_outputs: int,
        hidden: int | None = None,
        channels: int = 100,
        widths: tuple[int, ...] = (3, 4, 5),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        hidden = hidden or 2 * d_in
        self.widths = tuple(widths)
        self.proj = nn.Linear(d_in, hidden)
        self.convs = nn.ModuleList(nn.Conv1d(hidden, channels, w) for w in self.widths)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(channels * len(self.widths), num_outputs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) features and (B, T) bool mask of real tokens -> (B, num_outputs)."""
        B, T, _ = x.shape
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        h = self.proj(x) * mask[..., None]  # (B, T, H); the bias must not leak into padding
        h = F.pad(h.transpose(1, 2), (0, max(self.widths) - 1))  # (B, H, T + w_max - 1)
        pooled = []
        for conv in self.convs:
            c = F.relu(conv(h))[..., :T]  # (B, C, T): windows starting at each position
            c = c.masked_fill(~mask[:, None, :], float("-inf"))
            pooled.append(c.amax(dim=-1))  # (B, C)
        return self.out(self.dropout(torch.cat(pooled, dim=-1)))  # (B, num_outputs)


class OneHotEncoder:
    """Sequences -> one (T, 65) float32 array each: T = whole codons, 64 codon columns + 1 other.

    Codons are read in frame 0 (non-coding sequences are thereby cut into 3-mers); a codon holding
    a letter other than ACGT (e.g. N) sets the last column; a trailing partial codon is dropped.
    Same interface as a backbone's feature extractor, so the TextCNN baseline runs through the
    same `evaluate_probe` harness.
    """

    dim = NUM_CODONS + 1

    def __init__(self) -> None:
        # Letter -> base-4 digit (A C G T in `kmers` order); any other byte -> 4 marks "other".
        self.digit = np.full(256, 4, dtype=np.int64)
        for d, letter in enumerate(b"ACGT"):
            self.digit[letter] = d

    def codon_ids(self, seq: str) -> np.ndarray:
        """Column of each whole codon of `seq` (64 for a codon with a non-ACGT letter).

        Vectorised: a 100 kb record is one numpy pass, not 33,000 dictionary look-ups."""
        n = len(seq) // 3
        digits = self.digit[np.frombuffer(seq[: 3 * n].encode("ascii", "replace"), np.uint8)]
        digits = digits.reshape(n, 3)  # (T, 3)
        ids = digits @ np.array([16, 4, 1])  # lexicographic index of the codon among kmers(3)
        return np.where((digits == 4).any(axis=1), NUM_CODONS, ids)

    def __call__(self, seqs: Sequence[str]) -> list[np.ndarray]:
        out = []
        for seq in seqs:
            ids = self.codon_ids(seq)
            onehot = np.zeros((len(ids), self.dim), dtype=np.float32)
            onehot[np.arange(len(ids)), ids] = 1.0
            out.append(onehot)
        return out


def codon_frequency_features(seqs: Sequence[str]) -> np.ndarray:
    """(N, 64) codon frequencies per sequence (frame 0, ACGT codons only; all-zero if none)."""
    encoder = OneHotEncoder()
    feats = np.zeros((len(seqs), NUM_CODONS))
    for row, seq in enumerate(seqs):
        ids = encoder.codon_ids(seq)
        counts = np.bincount(ids[ids < NUM_CODONS], minlength=NUM_CODONS)
        feats[row] = counts / max(counts.sum(), 1)
    return feats


# --------------------------------------------------------------------------------------------------
# Linear heads on pooled features


class Standardizer:
    """Per-column (x - mean) / std fitted on the training rows; constant columns are left at 0."""

    def __init__(self, x: np.ndarray) -> None:
        self.mean = x.mean(axis=0)
        std = x.std(axis=0)
        self.std = np.where(std > 1e-12, std, 1.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


def ridge_path(
    x: np.ndarray, y: np.ndarray, alphas: Sequence[float]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ridge solutions (w, b) of min |y - x w - b|^2 + alpha |w|^2 for every alpha, closed form.

    One SVD of the centred x serves all alphas: w = V diag(s / (s^2 + alpha)) U^T (y - mean y).
    `y` is (N,) or (N, K); w is (D,) or (D, K).
    """
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    u, s, vt = np.linalg.svd(x - x_mean, full_matrices=False)
    uty = u.T @ (y - y_mean)
    out = []
    for alpha in alphas:
        shrink = s / (s**2 + alpha)
        w = vt.T @ (shrink[:, None] * uty if uty.ndim == 2 else shrink * uty)
        out.append((w, y_mean - x_mean @ w))
    return out


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    num_outputs: int,
    l2: float,
    multilabel: bool = False,
    max_iter: int = 200,
) -> nn.Linear:
    """L2-penalised logistic regression (softmax, or one sigmoid per label) fitted by L-BFGS.

    Full-batch L-BFGS on a convex loss makes the fit deterministic and needs no learning rate.
    The penalty ``l2 * |W|^2 / 2`` leaves the bias free, like scikit-learn's.
    """
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32 if multilabel else torch.int64)
    model = nn.Linear(x.shape[1], num_outputs)
    nn.init.zeros_(model.weight)  # a fixed start: the fit is the same on every call
    nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = model(xt)
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, yt)
        else:
            loss = F.cross_entropy(logits, yt)
        loss = loss + 0.5 * l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def logistic_scores(model: nn.Linear, x: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Class probabilities (softmax) or label probabilities (sigmoid) of a fitted logistic model."""
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32))
        probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)
    return probs.numpy().astype(np.float64)
