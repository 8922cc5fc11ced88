"""The fused path-loss kernel (helm/kernels/path_loss.py) against its PyTorch twin ``path_loss_ref``.

Runs on CPU under TRITON_INTERPRET=1 (set in conftest.py), so shapes stay tiny; the realistic size is
behind the ``gpu`` marker. Every case draws its own random logits and targets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import helm.kernels.path_loss as kernel_module
from helm.hierarchy import build_hierarchy
from helm.kernels.path_loss import path_loss_triton
from helm.ops.path_loss import path_loss_ref

# Kernel tests on CPU tensors need the interpreter (set by conftest.py where there is no CUDA); on a
# CUDA machine the compiled kernels are tested by the `gpu` tests instead.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _cpu_needs_interpreter(request):
    if not INTERPRET and request.node.get_closest_marker("gpu") is None:
        pytest.skip("CPU kernel tests run under TRITON_INTERPRET=1, set where there is no CUDA")


V = 69
DIST_MAX = 4
LOSSES = ("xe", "hxe", "soft", "aa_only", "aa_add")
TOL = {  # (loss rtol, loss atol, grad rtol, grad atol)
    torch.float32: (1e-5, 1e-6, 1e-5, 1e-7),
    torch.bfloat16: (1e-5, 1e-5, 1.6e-2, 1e-6),  # grads: 2 bf16 ulps (stored, then scaled)
    # grads: stored in fp16, then scaled (two roundings); below fp16's smallest normal the spacing is
    # absolute, 2**-24, so two roundings may differ by 2**-23 there.
    torch.float16: (1e-5, 1e-5, 2e-3, 2**-23),
}


def loss_tables(
    loss: str, tree: str = "true", alpha: float = 0.2, beta: float = 15.0, aa_weight: float = 0.5
) -> dict[str, torch.Tensor | None]:
    """anc, coef, soft, const of one loss, built from the codon tree as DESIGN.md defines it."""
    h = build_hierarchy(tree, seed=3)
    anc = torch.as_tensor(h.paths)  # (V, S) root ... leaf, -1 padded
    S = anc.shape[1]
    leaf = torch.as_tensor(h.leaf_depth)  # slot of the leaf itself
    slots = torch.arange(S)[None, :]
    at = lambda d: (slots == d[:, None]).double()  # (V, S) one-hot at slot d
    soft = const = None
    if loss == "xe":
        coef = at(torch.zeros(V, dtype=torch.long)) - at(leaf)
    elif loss == "hxe":
        # L = -sum_{d=1..D} w_d (lse_d - lse_{d-1}): slot s gets w_{s+1} (if s < D) - w_s (if s >= 1).
        z = np.exp(-alpha * h.depth).sum()
        w = torch.exp(-alpha * torch.arange(S + 1, dtype=torch.double)) / z  # w_d by depth d
        on = (anc >= 0).double()
        nxt = torch.cat([on[:, 1:], torch.zeros(V, 1, dtype=torch.double)], 1)
        coef = w[1 : S + 1][None, :] * nxt - w[:S][None, :] * (slots >= 1) * on
    elif loss in ("aa_only", "aa_add"):
        # L_aa = lse_root - lse_parent; aa_add = XE + aa_weight * L_aa.
        root, parent = at(torch.zeros(V, dtype=torch.long)), at(leaf - 1)
        coef = root - parent
        if loss == "aa_add":
            coef = root - at(leaf) + aa_weight * coef
    elif loss == "soft":
        # KL(q || p) = sum q log q + lse_root - sum_c q_c z_c
        dist = torch.as_tensor(h.dist, dtype=torch.double)
        q = torch.softmax(-beta * dist / DIST_MAX, dim=1)
        soft, const = q, (q * q.log()).sum(1)
        coef = at(torch.zeros(V, dtype=torch.long))
    else:
        raise ValueError(loss)
    f32 = lambda t: None if t is None else t.float()
    return {"anc": anc, "coef": f32(coef), "soft": f32(soft), "const": f32(const)}


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded per test case: fresh inputs for every case, reproducible on rerun."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_inputs(gen, N, Vp, V, dtype, scale=4.0, p_ignore=0.2, device="cpu"):
    logits = (torch.randn(N, Vp, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < p_ignore] = -100
    return logits.to(device), targets.to(device)


def compare(logits, targets, tables, reduction="mean", dtype=torch.float32, grad_scale=None):
    """Loss and gradient of the kernel vs the reference on clones of the same inputs."""
    rl, al, rg, ag = TOL[dtype]
    if grad_scale is None:  # one random grad_output, per row for "none"
        shape = targets.shape if reduction == "none" else ()
        grad_scale = torch.randn(shape, device=logits.device)
    out = {}
    for name, fn in (("kernel", path_loss_triton), ("ref", path_loss_ref)):
        z = logits.detach().clone().requires_grad_()
        loss = fn(z, targets, reduction=reduction, **tables)
        (loss * grad_scale).sum().backward()
        out[name] = (loss.detach(), z.grad)
    (lk, gk), (lr, gr) = out["kernel"], out["ref"]
    assert lk.dtype == lr.dtype and gk.dtype == gr.dtype and gk.shape == gr.shape
    torch.testing.assert_close(lk, lr, rtol=rl, atol=al)
    torch.testing.assert_close(gk.float(), gr.float(), rtol=rg, atol=ag)
    Vt = tables["anc"].shape[0]
    assert (gk[:, Vt:] == 0).all(), "padded columns must get zero gradient"
    assert (gk[targets == -100] == 0).all(), "ignored rows must get zero gradient"
    return lk, gk


@pytest.mark.parametrize("tree", ["true", "random"])
@pytest.mark.parametrize("loss", LOSSES)
def test_losses_match_reference(gen, loss, tree):
    tables = loss_tables(loss, tree)
    N, Vp = [(7, 72), (33, 77), (1, 69), (16, 72), (5, 77)][LOSSES.index(loss)]
    logits, targets = make_inputs(gen, N, Vp, V, torch.float32)
    targets[0] = int(torch.randint(0, V, (1,), generator=gen))  # at least one real target
    compare(logits, targets, tables, grad_scale=3.7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_reductions(gen, dtype, reduction):
    loss = ("hxe", "soft", "aa_add")[["mean", "sum", "none"].index(reduction)]
    logits, targets = make_inputs(gen, 13, 72, V, dtype)
    compare(logits, targets, loss_tables(loss), reduction, dtype)


@pytest.mark.parametrize("Vp", [69, 72, 77])
@pytest.mark.parametrize("N", [1, 7, 33])
def test_odd_shapes(gen, N, Vp):
    logits, targets = make_inputs(gen, N, Vp, V, torch.float32)
    compare(logits, targets, loss_tables("hxe", "random"), grad_scale=1.0)


def generic_tables(gen, Vt, S=3, groups=10):
    """XE over Vt columns, plus a random 3-level grouping (root, random group, leaf) and coefs."""
    xe = {
        "anc": torch.stack([torch.zeros(Vt, dtype=torch.long), torch.arange(Vt) + 1], 1),
        "coef": torch.tensor([[1.0, -1.0]]).expand(Vt, 2),
    }
    anc = torch.stack(
        [
            torch.zeros(Vt, dtype=torch.long),
            torch.randint(1, 1 + groups, (Vt,), generator=gen),
            torch.arange(Vt) + 1 + groups,
        ],
        1,
    )
    anc[torch.rand(Vt, generator=gen) < 0.3, 2] = -1  # some leaves one level up
    rnd = {
        "anc": anc,
        "coef": torch.randn(Vt, S, generator=gen),
        "soft": torch.softmax(torch.randn(Vt, Vt, generator=gen), 1),
        "const": torch.randn(Vt, generator=gen),
    }
    return xe, rnd


@pytest.mark.parametrize("max_block_v", [128, kernel_module.MAX_BLOCK_V])
@pytest.mark.parametrize("Vp", [300, 307])
def test_generic_tables_multi_block(gen, monkeypatch, Vp, max_block_v):
    """V = 300 over column blocks of 128 (online max, two passes) and as one block."""
    monkeypatch.setattr(kernel_module, "MAX_BLOCK_V", max_block_v)
    xe, rnd = generic_tables(gen, 300)
    for tables, dtype in ((xe, torch.float32), (rnd, torch.bfloat16)):
        logits, targets = make_inputs(gen, 6, Vp, 300, dtype, scale=6.0)
        compare(logits, targets, tables, "sum", dtype)


def test_xe_equals_cross_entropy(gen):
    logits, targets = make_inputs(gen, 9, 72, V, torch.float32)
    masked = logits.clone()
    masked[:, V:] = float("-inf")
    expect = torch.nn.functional.cross_entropy(masked, targets)
    torch.testing.assert_close(path_loss_triton(logits, targets, **loss_tables("xe")), expect)


def test_wide_logit_range(gen):
    """Logits around +150 spread over ~120 nats: exp overflows unless the row max is subtracted
    (group maxima stay within the fp32 exp range of the row max)."""
    logits, targets = make_inputs(gen, 8, 72, V, torch.float32, scale=20.0)
    logits += 150.0
    compare(logits, targets, loss_tables("aa_add"), "none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(gen, reduction):
    logits, targets = make_inputs(gen, 5, 72, V, torch.float32)
    targets[:] = -100
    loss, grad = compare(logits, targets, loss_tables("soft"), reduction)
    assert (loss == 0).all() and (grad == 0).all()


def test_empty_batch():
    z = torch.zeros(0, 72, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    tables = loss_tables("hxe")
    for reduction in ("mean", "sum"):
        loss = path_loss_triton(z, t, reduction=reduction, **tables)
        loss.backward()
        assert loss.item() == 0 and z.grad.shape == (0, 72)
    assert path_loss_triton(z, t, reduction="none", **tables).shape == (0,)


def test_noncontiguous_and_no_grad(gen):
    tables = loss_tables("hxe")
    base, targets = make_inputs(gen, 6, 90, V, torch.float32)
    strided = base[:, 5:77]  # rows 90 apart
    transposed = base[:, :72].t().contiguous().t()  # columns not contiguous
    for logits in (strided, transposed):
        compare(logits, targets, tables)
    with torch.no_grad():
        torch.testing.assert_close(
            path_loss_triton(strided, targets, **tables), path_loss_ref(strided, targets, **tables)
        )


def test_backward_writes_the_grad_once(gen, monkeypatch):
    """Backward is one launch whose output, already scaled by grad_output, becomes logits.grad."""
    launches = []
    launch = kernel_module._launch

    def spy(*args, **kwargs):
        out = launch(*args, **kwargs)
        launches.append((len(args) > 5 or "grad_output" in kwargs, out.data_ptr()))
        return out

    monkeypatch.setattr(kernel_module, "_launch", spy)
    logits, targets = make_inputs(gen, 5, 72, V, torch.bfloat16)
    z = logits.requires_grad_()
    (path_loss_triton(z, targets, **loss_tables("hxe")) * 2.0).backward()
    assert [grad for grad, _ in launches] == [False, True]
    assert z.grad.data_ptr() == launches[1][1]


def test_second_backward_recomputes(gen):
    """Nothing is modified in place: a retained graph gives the same gradient twice."""
    logits, targets = make_inputs(gen, 4, 72, V, torch.float32, p_ignore=0.0)
    z = logits.requires_grad_()
    loss = path_loss_triton(z, targets, **loss_tables("xe"))
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * first)


@pytest.mark.parametrize("loss", LOSSES)
def test_spread_logits_stay_finite(gen, loss):
    """Logits ~1e4 apart: every group is reduced around its own max, so the kernel is finite
    wherever the reference (and, for XE, F.cross_entropy) is, for bf16 logits too."""
    logits, targets = make_inputs(gen, 9, 72, V, torch.float32, scale=1e4)
    targets[0] = int(logits[0, :V].argmin())  # a target ~3e4 below the row max
    tables = loss_tables(loss)
    for dtype in (torch.float32, torch.bfloat16):
        lk, gk = compare(logits.to(dtype), targets, tables, "none", dtype)
        assert lk.isfinite().all() and gk.isfinite().all()
    if loss == "xe":
        expect = torch.nn.functional.cross_entropy(logits[:, :V], targets, reduction="none")
        assert expect.isfinite().all()
        torch.testing.assert_close(
            path_loss_triton(logits, targets, reduction="none", **tables), expect
        )


def test_bad_target_is_nan_and_bad_args_raise(gen):
    tables = loss_tables("xe")
    logits, targets = make_inputs(gen, 4, 72, V, torch.float32, p_ignore=0.0)
    targets[1] = V  # out of range and not ignore_index
    loss = path_loss_triton(logits, targets, reduction="none", **tables)
    assert loss[1].isnan() and not loss[[0, 2, 3]].isnan().any()
    with pytest.raises(ValueError, match="reduction"):
        path_loss_triton(logits, targets, reduction="max", **tables)
    with pytest.raises(TypeError):
        path_loss_triton(logits.double(), targets, **tables)
    with pytest.raises(ValueError):
        path_loss_triton(logits[:, :60], targets, **tables)


def test_cpu_without_interpreter_raises():
    """No silent fallback: on CPU without TRITON_INTERPRET=1 the kernel refuses clearly."""
    code = (
        "import torch\nfrom helm.kernels.path_loss import path_loss_triton\n"
        "anc = torch.tensor([[0, 1], [0, 2]]); coef = torch.tensor([[1.0, -1.0]] * 2)\n"
        "try:\n    path_loss_triton(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), anc, coef)\n"
        "except RuntimeError as e:\n    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120
    )
    assert "RAISED" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("loss", LOSSES)
def test_realistic_size_cuda(loss):
    gen = torch.Generator().manual_seed(zlib.crc32(loss.encode()))
    tables = {k: None if v is None else v.cuda() for k, v in loss_tables(loss).items()}
    logits, targets = make_inputs(gen, 4096, 72, V, torch.bfloat16, device="cuda")
    compare(logits, targets, tables, "mean", torch.bfloat16, grad_scale=3.7)
