"""Losses: closed forms, a literal tree-walking oracle, gradients, padding, ignoring, dispatch."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from helm.hierarchy import build_hierarchy
from helm.losses import LOSSES, build_loss
from helm.losses.tables import (
    HelmLoss,
    aa_loss,
    cross_entropy,
    hxe_loss,
    loss_tables,
    soft_label_loss,
    soft_targets,
)
from helm.ops.path_loss import path_loss_ref
from helm.vocab import codon_id

V, VP = 69, 72
TRUE = build_hierarchy("true")
RANDOM = build_hierarchy("random", seed=3)
GTT, ATG, TAA, EOS = codon_id("GTT"), codon_id("ATG"), codon_id("TAA"), 2


def run_loss(kind: str, logits, targets, h=TRUE, **kw):
    """Each LOSSES entry through its functional API."""
    if kind == "XE":
        return cross_entropy(logits, targets, vocab_size=V, **kw)
    if kind == "HXE":
        return hxe_loss(logits, targets, h, alpha=kw.pop("alpha", 0.3), **kw)
    if kind == "soft_labels":
        return soft_label_loss(logits, targets, h, beta=kw.pop("beta", 7.0), **kw)
    if kind == "aa_loss_only":
        return aa_loss(logits, targets, h, **kw)
    return aa_loss(logits, targets, h, weight=0.7, **kw)


def hxe_w(alpha: float, normalize: bool = True) -> list[float]:
    """w_d from DESIGN.md; the node count per depth read off the tree drawing: 1, 6, 8, 23, 60."""
    z = sum(n * math.exp(-alpha * d) for d, n in enumerate([1, 6, 8, 23, 60])) if normalize else 1
    return [math.exp(-alpha * d) / z for d in range(5)]


def rand_batch(n: int, seed: int, dtype=torch.float32, ignore: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, VP, generator=g)).to(dtype)
    logits[:, V:] = 1e4  # garbage in the padding: would dominate if it got any probability
    targets = torch.randint(0, V, (n,), generator=g)
    targets[:ignore] = -100
    return logits, targets


# Closed forms on uniform logits: P(node) = (#leaves under node) / 69 --------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.5])
def test_hxe_closed_forms_uniform(alpha):
    w = hxe_w(alpha)
    z = torch.zeros(4, VP)
    y = torch.tensor([GTT, ATG, TAA, EOS])
    got = hxe_loss(z, y, TRUE, alpha=alpha, reduction="none").double()
    ln = math.log
    # GTT: root(69) -> codons(64) -> amino_acids(60) -> V(4) -> GTT(1)
    gtt = w[4] * ln(4) + w[3] * ln(60 / 4) + w[2] * ln(64 / 60) + w[1] * ln(69 / 64)
    atg = w[1] * ln(69 / 64) + w[2] * ln(64 / 1)  # codons -> start(1) -> ATG: last step is free
    taa = w[1] * ln(69 / 64) + w[2] * ln(64 / 3) + w[3] * ln(3)  # stop holds 3 codons
    eos = w[1] * ln(69)  # root -> eos(1) -> <eos>(1)
    torch.testing.assert_close(got, torch.tensor([gtt, atg, taa, eos], dtype=torch.float64))


def test_other_losses_closed_forms_uniform():
    z = torch.zeros(3, V)
    y = torch.tensor([GTT, ATG, EOS])
    ln69 = math.log(69)
    f64 = lambda xs: torch.tensor(xs, dtype=torch.float64)
    xe = cross_entropy(z, y, reduction="none").double()
    torch.testing.assert_close(xe, f64([ln69] * 3))
    only = aa_loss(z, y, TRUE, reduction="none").double()  # group sizes 4 (V), 1 (start), 1 (eos)
    torch.testing.assert_close(only, f64([math.log(69 / 4), ln69, ln69]))
    add = aa_loss(z, y, TRUE, weight=0.5, reduction="none").double()
    torch.testing.assert_close(add, f64([ln69 + 0.5 * math.log(69 / 4), 1.5 * ln69, 1.5 * ln69]))
    # Soft labels for GTT: leaves at distance 0..4 number 1, 3 (synonyms), 56 (other amino acid
    # codons), 4 (ATG + stops), 5 (specials); KL(q || uniform) = sum q log q + log 69.
    beta = 6.0
    counts = [1, 3, 56, 4, 5]
    e = [n * math.exp(-beta * d / 4) for d, n in enumerate(counts)]
    qs = [math.exp(-beta * d / 4) / sum(e) for d in range(5)]
    kl = sum(n * q * math.log(q) for n, q in zip(counts, qs)) + ln69
    got = soft_label_loss(z[:1], y[:1], TRUE, beta=beta, reduction="none").double()
    torch.testing.assert_close(got, f64([kl]))


@pytest.mark.parametrize("h", [TRUE, RANDOM], ids=["true", "random"])
def test_hxe_with_unit_weights_is_xe(h):
    logits, targets = rand_batch(32, 0, ignore=3)
    got = hxe_loss(logits, targets, h, alpha=0.0, normalize=False, reduction="none")
    torch.testing.assert_close(got, cross_entropy(logits, targets, vocab_size=V, reduction="none"))


def test_hxe_coefficients_for_gtt():
    w = hxe_w(0.4)
    coef = loss_tables("HXE", TRUE, hxe_alpha=0.4).coef[GTT].double()
    want = torch.tensor([w[1], w[2] - w[1], w[3] - w[2], w[4] - w[3], -w[4]], dtype=torch.float64)
    torch.testing.assert_close(coef, want)


# A literal oracle: walk the tree from each leaf ------------------------------------------------------
def slow_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor, h) -> float:
    """Mean loss straight from the definitions, using only the tree's parent pointers."""
    parent, leaf = h.parent, h.leaf_node

    def up(node: int) -> list[int]:  # node, its parent, ..., root
        out = [node]
        while parent[out[-1]] >= 0:
            out.append(int(parent[out[-1]]))
        return out

    height = np.zeros(len(parent), dtype=np.int64)
    for v in range(V):
        for steps, node in enumerate(up(int(leaf[v]))):
            height[node] = max(height[node], steps)

    def dist(a: int, b: int) -> int:
        above_b = set(up(int(leaf[b])))
        return int(height[next(n for n in up(int(leaf[a])) if n in above_b)])

    total, count = 0.0, 0
    for z, y in zip(logits.double().numpy(), targets.tolist()):
        if y == -100:
            continue
        p = np.exp(z[:V] - z[:V].max())
        p /= p.sum()
        mass = np.zeros(len(parent))
        for v in range(V):
            for node in up(int(leaf[v])):
                mass[node] += p[v]
        chain = up(int(leaf[y]))[::-1]  # C_0 = root, ..., C_D = y
        group = [v for v in range(V) if parent[leaf[v]] == chain[-2]]
        xe = -math.log(p[y])
        l_aa = -math.log(sum(p[v] for v in group))
        if kind == "XE":
            loss = xe
        elif kind == "HXE":
            w = hxe_w(0.3)
            loss = -sum(
                w[d] * math.log(mass[chain[d]] / mass[chain[d - 1]]) for d in range(1, len(chain))
            )
        elif kind == "aa_loss_only":
            loss = l_aa
        elif kind == "aa_loss_add":
            loss = xe + 0.7 * l_aa
        else:
            e = [math.exp(-7.0 * dist(c, y) / 4) for c in range(V)]
            q = [x / sum(e) for x in e]
            loss = sum(qc * math.log(qc / pc) for qc, pc in zip(q, p))
        total, count = total + loss, count + 1
    return total / count


@pytest.mark.parametrize("h", [TRUE, RANDOM], ids=["true", "random"])
@pytest.mark.parametrize("kind", LOSSES)
def test_matches_tree_walk(kind, h):
    logits, targets = rand_batch(12, 1, dtype=torch.float64, ignore=2)
    targets[2:7] = torch.tensor([GTT, ATG, TAA, EOS, 0])  # cover every kind of leaf
    got = run_loss(kind, logits, targets, h)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(slow_loss(kind, logits, targets, h), rel=1e-6)


def test_random_tree_differs_from_true():
    logits, targets = rand_batch(64, 2)
    a, b = hxe_loss(logits, targets, TRUE), hxe_loss(logits, targets, RANDOM)
    assert not torch.allclose(a, b)


# Gradients ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LOSSES)
def test_gradcheck(kind):
    logits, targets = rand_batch(3, 4, dtype=torch.float64, ignore=1)
    logits[:, V:] = torch.randn(3, VP - V, dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: run_loss(kind, z, targets, impl="torch"), (logits,))


@pytest.mark.parametrize("kind", LOSSES)
def test_gradient_rows_sum_to_zero_and_skip_padding_and_ignored(kind):
    logits, targets = rand_batch(16, 5, ignore=4)
    logits.requires_grad_(True)
    run_loss(kind, logits, targets).backward()
    g = logits.grad
    # Adding a constant to every real logit leaves p unchanged, so each row's gradient sums to 0.
    torch.testing.assert_close(g[:, :V].sum(1), torch.zeros(16), atol=1e-6, rtol=0)
    assert (g[:, V:] == 0).all()
    assert (g[:4] == 0).all() and (g[4:, :V].abs().sum(1) > 0).all()


# Reductions, ignoring, padding, dtypes -------------------------------------------------------------
@pytest.mark.parametrize("kind", LOSSES)
def test_reductions_and_ignore(kind):
    logits, targets = rand_batch(20, 6, ignore=5)
    none = run_loss(kind, logits, targets, reduction="none")
    assert none.shape == (20,) and (none[:5] == 0).all()
    total = run_loss(kind, logits, targets, reduction="sum")
    mean = run_loss(kind, logits, targets, reduction="mean")
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.sum() / 15)  # 15 non-ignored rows
    torch.testing.assert_close(total, mean * 15)
    # The ignored rows' logits do not matter; all-ignored batches give 0, not NaN.
    logits[:5] = torch.randn(5, VP) * 100
    torch.testing.assert_close(run_loss(kind, logits, targets), mean)
    assert run_loss(kind, logits, torch.full((20,), -100)).item() == 0.0


@pytest.mark.parametrize("kind", LOSSES)
def test_padding_columns_do_not_matter(kind):
    logits, targets = rand_batch(10, 7)
    ref = run_loss(kind, logits[:, :V].contiguous(), targets)
    logits[:, V:] = torch.tensor([-1e30, 0.0, 88.0])
    torch.testing.assert_close(run_loss(kind, logits, targets), ref)


@pytest.mark.parametrize("kind", LOSSES)
def test_low_precision_logits_compute_in_fp32(kind):
    logits, targets = rand_batch(24, 8)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        got = run_loss(kind, low, targets)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, run_loss(kind, low.float(), targets))  # fp32 maths
        torch.testing.assert_close(got, run_loss(kind, logits, targets), rtol=2e-2, atol=2e-2)


def test_xe_fast_path_matches_reference():
    logits, targets = rand_batch(30, 9, ignore=6)
    t = loss_tables("XE", None, vocab_size=V)
    for red in ("none", "sum", "mean"):
        ref = path_loss_ref(logits, targets, t.anc, t.coef, reduction=red)
        torch.testing.assert_close(cross_entropy(logits, targets, vocab_size=V, reduction=red), ref)


@pytest.mark.parametrize("kind", LOSSES)
def test_any_ignore_index_is_honoured(kind):
    """An ignore index other than -100 (here <pad> = 0, as a caller scoring padded rows would
    pass): those rows get no loss, and the rest equal the -100 convention's values."""
    logits, targets = rand_batch(12, 10)
    targets[:4] = 0
    as_default = targets.clone()
    as_default[:4] = -100
    for red in ("none", "sum", "mean"):
        got = run_loss(kind, logits, targets, ignore_index=0, reduction=red)
        torch.testing.assert_close(got, run_loss(kind, logits, as_default, reduction=red))
    if kind == "XE":
        want = torch.nn.functional.cross_entropy(logits[:, :V], targets, ignore_index=0)
        torch.testing.assert_close(run_loss(kind, logits, targets, ignore_index=0), want)


# Soft targets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [TRUE, RANDOM], ids=["true", "random"])
def test_soft_targets_shape(h):
    q = soft_targets(h, 15.0)
    np.testing.assert_allclose(q.sum(1), 1.0)
    assert (q.argmax(1) == np.arange(V)).all()
    for y in (GTT, ATG, EOS, codon_id("CTG")):
        syn = [c for c in range(V) if c != y and h.parent[h.leaf_node[c]] == h.group[y]]
        np.testing.assert_allclose(q[y, syn], q[y, syn[0]] if syn else [])
        assert all(q[y, c] < q[y, y] for c in syn)
    if h is TRUE:  # mass falls with distance: synonym, other amino acid, start, special
        assert q[GTT, codon_id("GTC")] > q[GTT, codon_id("CTG")] > q[GTT, ATG] > q[GTT, EOS]


def test_soft_loss_nonnegative_and_zero_at_target():
    logits, targets = rand_batch(40, 10)
    assert (soft_label_loss(logits, targets, TRUE, reduction="none") >= -1e-6).all()
    q = torch.as_tensor(soft_targets(TRUE, 15.0))
    at_q = q[targets].log().double()  # p == q_y exactly
    loss = soft_label_loss(at_q, targets, TRUE, reduction="none")
    torch.testing.assert_close(loss, torch.zeros(40, dtype=torch.float64), atol=1e-6, rtol=0)


# Module, builder, dispatch --------------------------------------------------------------------------
def codon(**kw):
    """build_loss's keywords for the codon tokenizer with the true tree."""
    return {"vocab_size": V, "is_codon": True, "hierarchy": TRUE, "impl": "torch", **kw}


@pytest.mark.parametrize("kind", LOSSES)
def test_build_loss_matches_functional(kind):
    extra = {"hxe_alpha": 0.3, "soft_labels_beta": 7.0, "aa_loss_weight": 0.7}
    mod = build_loss(kind, **codon(**extra))
    assert isinstance(mod, HelmLoss) and mod.name == kind and mod.vocab_size == V
    assert not mod.state_dict()  # tables are rebuilt, never checkpointed
    logits, targets = rand_batch(18, 11, ignore=3)
    for red in ("sum", "mean", "none"):
        want = run_loss(kind, logits, targets, reduction=red)
        torch.testing.assert_close(mod(logits, targets, reduction=red), want)
    # (B, T, Vp) logits with (B, T) targets are flattened
    torch.testing.assert_close(
        mod(logits.view(3, 6, VP), targets.view(3, 6), reduction="none"),
        run_loss(kind, logits, targets, reduction="none").view(3, 6),
    )


def test_build_loss_xe_any_tokenizer_and_refusals():
    mod = build_loss("XE", vocab_size=300, is_codon=False, impl="torch")
    logits = torch.randn(5, 304)
    targets = torch.randint(0, 300, (5,))
    torch.testing.assert_close(mod(logits, targets), cross_entropy(logits[:, :300], targets))
    for kind in list(LOSSES)[1:]:
        with pytest.raises(ValueError, match=r"--tokenizer 3mer --overlap 0.*--loss XE"):
            build_loss(kind, vocab_size=4101, is_codon=False)
        with pytest.raises(ValueError, match=r"needs a codon hierarchy.*--hierarchy"):
            build_loss(kind, vocab_size=V, is_codon=True)
    with pytest.raises(ValueError, match=r"unknown --loss 'HCE'.*XE, HXE, soft_labels"):
        build_loss("HCE", **codon())
    for bad, msg in [("hxe_alpha", "alpha"), ("soft_labels_beta", "beta")]:
        with pytest.raises(ValueError, match=msg):
            build_loss("HXE", **codon(**{bad: -1.0}))
    with pytest.raises(ValueError, match="beta"):
        build_loss("soft_labels", **codon(soft_labels_beta=0.0))
    with pytest.raises(ValueError, match="weight"):
        build_loss("aa_loss_add", **codon(aa_loss_weight=float("nan")))
    with pytest.raises(ValueError, match="impl"):
        build_loss("XE", **codon(impl="cuda"))
    with pytest.raises(ValueError, match="impl"):
        cross_entropy(logits, targets, impl="cuda")


def test_dispatch_triton_is_lazy_and_explicit(monkeypatch):
    calls = []

    def fake_path_loss(logits, targets, anc, coef, soft, const, ignore_index, reduction):
        calls.append(anc.shape)
        return path_loss_ref(logits, targets, anc, coef, soft, const, ignore_index, reduction)

    fake = types.ModuleType("helm.kernels.path_loss")
    fake.path_loss_triton = fake_path_loss
    monkeypatch.setitem(sys.modules, "helm.kernels.path_loss", fake)
    logits, targets = rand_batch(6, 12)
    hxe_loss(logits, targets, TRUE, impl="auto")  # CPU tensors: the reference
    assert calls == []
    got = hxe_loss(logits, targets, TRUE, impl="triton")
    assert calls == [(V, 5)]
    torch.testing.assert_close(got, hxe_loss(logits, targets, TRUE, impl="torch"))
    cross_entropy(logits, targets, vocab_size=V, impl="triton")
    assert calls[-1] == (V, 2)


def test_triton_failure_is_not_swallowed(monkeypatch):
    broken = types.ModuleType("helm.kernels.path_loss")  # no path_loss_triton: the import fails
    monkeypatch.setitem(sys.modules, "helm.kernels.path_loss", broken)
    logits, targets = rand_batch(2, 13)
    with pytest.raises(ImportError):
        hxe_loss(logits, targets, TRUE, impl="triton")
