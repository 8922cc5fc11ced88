"""Metrics: hand-made predictions with known answers, exact accumulation, padding, non-codon mode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helm.hierarchy import build_hierarchy
from helm.metrics import MetricAccumulator
from helm.vocab import codon_id

V, VP = 69, 72
TRUE = build_hierarchy("true")
c = codon_id
EOS = 2

# (target, top-5 predictions best first); the last row is ignored.
ROWS = [
    (c("GTT"), [c("GTT"), c("GTC"), c("GTA"), c("CTG"), c("ATG")]),  # right
    (c("GTT"), [c("GTC"), c("GTT"), c("TAA"), 0, c("AAA")]),  # synonym
    (c("GTT"), [c("CTG"), c("GTG"), c("TGG"), c("TTT"), 4]),  # other amino acid
    (c("TAA"), [c("TGA"), c("TAG"), c("TAA"), c("ATG"), 1]),  # other stop codon
    (EOS, [c("AAA"), 3, EOS, c("ATG"), c("CCC")]),  # codon for a special token
    (-100, [0, c("TTT"), 1, 2, 3]),  # would be "right" if ignored rows were read as <pad>
]


def hand_batch() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.zeros(len(ROWS), VP)
    logits[:, V:] = 1e3  # padding would win every argmax if it were looked at
    for i, (_, top) in enumerate(ROWS):
        logits[i, top] = torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0])
    return logits, torch.tensor([t for t, _ in ROWS])


def test_hand_made_values():
    logits, targets = hand_batch()
    m = MetricAccumulator(TRUE)
    m.update(logits, targets)
    out = m.compute()
    d = TRUE.dist
    scored = ROWS[:-1]
    d1 = [d[top[0], t] for t, top in scored]
    assert d1 == [0, 1, 2, 1, 4]  # the cases the rows were written for
    wrong = [x for x in d1 if x > 0]
    assert out["accuracy"] == pytest.approx(1 / 5)
    assert out["aa_accuracy"] == pytest.approx(3 / 5)  # right, synonym, other stop
    assert out["mistake_severity"] == pytest.approx(sum(wrong) / len(wrong))
    assert out["dist@1"] == pytest.approx(sum(d1) / 5)
    d5 = [sum(d[p, t] for p in top) / 5 for t, top in scored]
    assert out["dist@5"] == pytest.approx(sum(d5) / 5)
    want_xe = F.cross_entropy(logits[:, :V], targets).item()
    assert out["xe"] == pytest.approx(want_xe, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(want_xe), rel=1e-6)
    assert m.count == 5


def test_random_batches_perplexity_and_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, VP, generator=g, dtype=torch.float64)
    logits[:, V:] = 50.0
    targets = torch.randint(0, V, (50,), generator=g)
    targets[::7] = -100
    m = MetricAccumulator(TRUE)
    m.update(logits, targets)
    out = m.compute()
    real = logits[:, :V]
    assert out["perplexity"] == pytest.approx(math.exp(F.cross_entropy(real, targets).item()))
    keep = targets != -100
    pred = real.argmax(1)
    assert out["accuracy"] == pytest.approx((pred == targets)[keep].double().mean().item())
    d = torch.as_tensor(TRUE.dist)
    top5 = real.topk(5, dim=1).indices
    want5 = d[top5, targets.clamp(min=0)[:, None]].double().mean(1)[keep].mean().item()
    assert out["dist@5"] == pytest.approx(want5)


def test_accumulation_is_exact_over_batches():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(37, VP, generator=g)
    targets = torch.randint(0, V, (37,), generator=g)
    targets[[0, 1, 2, 3, 30]] = -100  # batch 1: 4 ignored of 8; batch 2: 1 ignored of 29
    loss = torch.rand(37, generator=g)
    whole = MetricAccumulator(TRUE)
    whole.update(logits, targets, loss_sum=loss[targets != -100].sum())
    parts = MetricAccumulator(TRUE)
    for sl in (slice(0, 8), slice(8, 37)):
        t = targets[sl]
        parts.update(logits[sl].view(1, -1, VP), t.view(1, -1), loss_sum=loss[sl][t != -100].sum())
    a, b = whole.compute(), parts.compute()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-6), k
    # A mean of the two batch means would weigh the 4 targets of batch 1 like the 28 of batch 2.
    first, second = MetricAccumulator(TRUE), MetricAccumulator(TRUE)
    first.update(logits[:8], targets[:8])
    second.update(logits[8:], targets[8:])
    naive = (first.compute()["xe"] + second.compute()["xe"]) / 2
    assert naive != pytest.approx(a["xe"], rel=1e-6)
    assert parts.counts.dtype == torch.int64 and parts.sums.dtype == torch.float64
    parts.reset()
    assert parts.count == 0 and parts.compute()["accuracy"] == 0.0


def test_non_codon_mode():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(20, 304, generator=g).to(torch.bfloat16)
    logits[:, 300:] = 1e4
    targets = torch.randint(0, 300, (20,), generator=g)
    m = MetricAccumulator(None, vocab_size=300)
    m.update(logits, targets)
    out = m.compute()
    assert set(out) == {"accuracy", "xe", "perplexity"}
    want = F.cross_entropy(logits[:, :300].float(), targets).item()
    assert out["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    acc = (logits[:, :300].float().argmax(1) == targets).double().mean().item()
    assert out["accuracy"] == pytest.approx(acc)
    m.update(logits, targets, loss_sum=torch.tensor(40.0))
    assert m.compute()["loss"] == pytest.approx(1.0)  # 40 over the 40 targets of both batches
    with pytest.raises(ValueError, match="vocab_size"):
        MetricAccumulator(TRUE, vocab_size=300)


def test_all_reduce_single_rank(tmp_path):
    logits, targets = hand_batch()
    m = MetricAccumulator(TRUE)
    m.update(logits, targets)
    before = m.compute()
    m.all_reduce()  # not initialised: a no-op
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        m.all_reduce()
        idle = MetricAccumulator(TRUE)  # a rank that saw no batch contributes zeros
        idle.all_reduce()
    finally:
        dist.destroy_process_group()
    assert m.compute() == before
    assert idle.count == 0
