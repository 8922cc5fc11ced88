"""Hyena's long convolution: the FFT reference against a direct convolution, and the Triton kernel
(``helm/kernels/fftconv.py``, under TRITON_INTERPRET on CPU) against the reference, forward and backward."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from helm.kernels import fftconv as fftconv_kernels
from helm.kernels.fftconv import fftconv_triton
from helm.ops.fftconv import fftconv, fftconv_ref

ROOT = Path(__file__).resolve().parents[1]

# Kernel tests on CPU tensors need the interpreter (set by conftest.py where there is no CUDA); on a
# CUDA machine the compiled kernels are tested by the `gpu` tests instead.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _cpu_needs_interpreter(request):
    if not INTERPRET and request.node.get_closest_marker("gpu") is None:
        pytest.skip("CPU kernel tests run under TRITON_INTERPRET=1, set where there is no CUDA")


# fp32: both sides compute in fp32 (FFT round-off ~1e-7 of the largest value); observed ~3e-7.
FP32_TOL = 1e-5
# bf16 (8 significant bits; one ulp is up to 2^-7 of a value): both sides round their fp32 result
# to bf16 once, and the kernel also rounds its tensor-core operands (u * pregate, k + D at lag 0,
# dy * postgate) to bf16 before the fp32-accumulated products. Elements may differ by a few ulps:
# max error <= 4 * 2^-7 of the largest magnitude, norm-relative error <= 1e-2. A wrong kernel is off
# by O(1).
BF16_MAX_TOL, BF16_NORM_TOL = 4 * 2**-7, 1e-2


def _direct_conv(u, k, D, pregate=None, postgate=None, bidirectional=False):
    """The definition, O(L^2): y[t] = sum_s k[t - s (+ L - 1)] x[s] + D x[t], x = u * pregate."""
    L = u.shape[-1]
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]  # (L, L): t - s
    if bidirectional:
        toeplitz = k[:, lag + L - 1]  # (H, L, L)
    else:
        toeplitz = torch.where(lag >= 0, k[:, lag.clamp(min=0)], torch.zeros((), dtype=k.dtype))
    x = u if pregate is None else u * pregate
    y = torch.einsum("hts,bhs->bht", toeplitz, x) + D[:, None] * x
    return y if postgate is None else y * postgate


def _inputs(B, H, L, bidirectional, gates, dtype, seed):
    """Fresh random (u, k, D, pregate, postgate), all requiring grad; gates None when not asked."""
    gen = torch.Generator().manual_seed(seed)
    Lk = 2 * L - 1 if bidirectional else L

    def make(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    u, k, D = make(B, H, L), make(H, Lk), make(H)
    pre, post = (make(B, H, L), make(B, H, L)) if gates else (None, None)
    return u, k, D, pre, post


def _forward_backward(fn, inputs, bidirectional, dy):
    """Output and gradients of every tensor input, run on clones so both sides see fresh leaves."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves, bidirectional=bidirectional)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return [y, *grads]


def _max_err(actual, expected):
    """Largest elementwise error relative to the largest magnitude of ``expected``."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def _norm_err(actual, expected):
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


NAMES = ("y", "du", "dk", "dD", "dpregate", "dpostgate")


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("gates", [False, True])
def test_reference_matches_direct_convolution(bidirectional, gates):
    B, H, L = 3, 4, 37
    inputs = _inputs(
        B, H, L, bidirectional, gates, torch.float64, seed=10 + 2 * gates + bidirectional
    )
    dy = torch.randn(B, H, L, dtype=torch.float64)
    ref = _forward_backward(fftconv_ref, inputs, bidirectional, dy)
    direct = _forward_backward(_direct_conv, inputs, bidirectional, dy)
    for name, a, e in zip(NAMES, ref, direct):
        assert a.dtype == torch.float64
        assert _max_err(a, e) < 1e-12, name


SHAPES = [(1, 2, 16), (3, 5, 23), (3, 2, 40)]  # (B, H, L): one, two and three 16-wide tiles


@pytest.mark.parametrize("B,H,L", SHAPES)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("gates", [False, True])
def test_kernel_matches_reference_fp32(B, H, L, bidirectional, gates):
    seed = hash((B, H, L, bidirectional, gates)) % 2**31
    inputs = _inputs(B, H, L, bidirectional, gates, torch.float32, seed)
    dy = torch.randn(B, H, L, generator=torch.Generator().manual_seed(seed + 1))
    got = _forward_backward(fftconv_triton, inputs, bidirectional, dy)
    want = _forward_backward(fftconv_ref, inputs, bidirectional, dy)
    for name, a, e in zip(NAMES, got, want):
        assert a.dtype == e.dtype == torch.float32 and a.shape == e.shape, name
        assert _max_err(a, e) < FP32_TOL, name


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("gates", [False, True])
def test_kernel_matches_reference_bf16(bidirectional, gates):
    B, H, L = 3, 2, 40
    seed = 100 + 2 * gates + bidirectional
    inputs = _inputs(B, H, L, bidirectional, gates, torch.bfloat16, seed)
    dy = torch.randn(B, H, L, generator=torch.Generator().manual_seed(seed)).bfloat16()
    got = _forward_backward(fftconv_triton, inputs, bidirectional, dy)
    want = _forward_backward(fftconv_ref, inputs, bidirectional, dy)
    for name, a, e in zip(NAMES, got, want):
        assert a.dtype == e.dtype == torch.bfloat16, name
        assert _max_err(a, e) < BF16_MAX_TOL, name
        assert _norm_err(a, e) < BF16_NORM_TOL, name


def test_kernel_bf16_activations_fp32_filter():
    """Under autocast u and the gates arrive in bf16 while k and D stay fp32; grads keep dtypes."""
    inputs = list(_inputs(2, 3, 23, False, True, torch.bfloat16, seed=11))
    inputs[1] = inputs[1].detach().float().requires_grad_()
    inputs[2] = inputs[2].detach().float().requires_grad_()
    dy = torch.randn(2, 3, 23, generator=torch.Generator().manual_seed(12)).bfloat16()
    got = _forward_backward(fftconv_triton, inputs, False, dy)
    want = _forward_backward(fftconv_ref, inputs, False, dy)
    for name, a, e in zip(NAMES, got, want):
        assert a.dtype == e.dtype, name
        assert _max_err(a, e) < BF16_MAX_TOL and _norm_err(a, e) < BF16_NORM_TOL, name


def test_kernel_strided_inputs_and_partial_grads():
    """Hyena splits one (B, L, 3H) projection into u and the gates: strided views, not copies."""
    B, H, L = 2, 3, 21
    gen = torch.Generator().manual_seed(7)
    proj = torch.randn(B, L, 3 * H, generator=gen).transpose(1, 2)  # (B, 3H, L), stride_l = 3H
    pre, post, u = (t.requires_grad_() for t in proj.detach().clone().split(H, dim=1))
    assert not u.is_contiguous()
    k = torch.randn(H, L, generator=gen)  # no grad wanted for k
    D = torch.randn(H, generator=gen, requires_grad=True)
    dy = torch.randn(B, L, H, generator=gen).transpose(1, 2)  # non-contiguous upstream gradient
    y = fftconv_triton(u, k, D, pre, post)
    got = [y, *torch.autograd.grad(y, (u, D, pre, post), dy)]
    y_ref = fftconv_ref(u, k, D, pre, post)
    want = [y_ref, *torch.autograd.grad(y_ref, (u, D, pre, post), dy)]
    for a, e in zip(got, want):
        assert _max_err(a, e) < FP32_TOL


def test_kernels_read_unit_stride_rows_from_hyenas_transposed_views(monkeypatch):
    """Hyena's u, gates and dy are transposed views (stride 3H or H along L); the launchers get
    rows with unit stride along L, so every tile load is coalesced on a GPU."""
    B, H, L = 2, 3, 17
    gen = torch.Generator().manual_seed(8)
    proj = torch.randn(B, L, 3 * H, generator=gen).transpose(1, 2)
    pre, post, u = (t.requires_grad_() for t in proj.detach().clone().split(H, dim=1))
    k = torch.randn(H, L, generator=gen, requires_grad=True)
    D = torch.randn(H, generator=gen, requires_grad=True)
    dy = torch.randn(B, L, H, generator=gen).transpose(1, 2)
    seen = []
    for name in ("_conv_fwd", "_conv_bwd_dx", "_conv_bwd_dk"):
        launcher = getattr(fftconv_kernels, name)

        def spy(*args, _launcher=launcher, _name=name, **kwargs):
            seen.extend((_name, a.stride(-1)) for a in args if isinstance(a, torch.Tensor))
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(fftconv_kernels, name, spy)
    y = fftconv_triton(u, k, D, pre, post)
    got = torch.autograd.grad(y, (u, k, D, pre, post), dy)
    want = torch.autograd.grad(fftconv_ref(u, k, D, pre, post), (u, k, D, pre, post), dy)
    assert {name for name, _ in seen} == {"_conv_fwd", "_conv_bwd_dx", "_conv_bwd_dk"}
    assert all(stride == 1 for _, stride in seen), seen
    for a, e in zip(got, want):
        assert _max_err(a, e) < FP32_TOL


def test_kernel_expanded_upstream_gradient():
    """y.sum().backward() hands the kernel a gradient with zero strides."""
    u, k, D, pre, post = _inputs(2, 2, 18, False, True, torch.float32, 5)
    (got,) = torch.autograd.grad(fftconv_triton(u, k, D, pre, post).sum(), (k,))
    (want,) = torch.autograd.grad(fftconv_ref(u, k, D, pre, post).sum(), (k,))
    assert _max_err(got, want) < FP32_TOL


def test_dispatch_runs_the_kernel(monkeypatch):
    u, k, D, pre, post = (t.detach() for t in _inputs(2, 2, 19, True, True, torch.float32, 3))
    want = fftconv_ref(u, k, D, pre, post, bidirectional=True)
    calls = []
    kernel = fftconv_kernels.fftconv_triton

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    def no_reference(*args, **kwargs):
        raise AssertionError("impl='triton' dispatched to the reference")

    monkeypatch.setattr(fftconv_kernels, "fftconv_triton", spy)
    monkeypatch.setattr("helm.ops.fftconv.fftconv_ref", no_reference)
    got = fftconv(u, k, D, pre, post, bidirectional=True, impl="triton")
    assert calls == [u.shape]
    assert _max_err(got, want) < FP32_TOL


def test_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(fftconv_kernels, "_INTERPRET", False)
    u, k, D, _, _ = _inputs(1, 1, 8, False, False, torch.float32, 0)
    with pytest.raises(RuntimeError, match="CUDA"):
        fftconv_triton(u, k, D)


def test_bad_arguments_raise():
    u, k, D, _, _ = _inputs(1, 2, 8, False, False, torch.float32, 0)
    with pytest.raises(ValueError, match="filter length"):
        fftconv_triton(u, k, D, bidirectional=True)
    with pytest.raises(TypeError, match="float32"):
        fftconv_triton(u.double(), k.double(), D.double())


@pytest.mark.gpu
@pytest.mark.parametrize("L", [444, 1024])  # each (L, mode, dtype) autotunes and compiles
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_gpu(L, bidirectional, dtype):
    B, H = 4, 64
    inputs = [t.detach().cuda() for t in _inputs(B, H, L, bidirectional, True, dtype, seed=L)]
    dy = torch.randn(B, H, L, device="cuda").to(dtype)
    got = _forward_backward(fftconv_triton, inputs, bidirectional, dy)
    want = _forward_backward(fftconv_ref, inputs, bidirectional, dy)
    tol = 1e-4 if dtype == torch.float32 else BF16_NORM_TOL  # fp32 runs on 3xTF32 tensor cores
    for name, a, e in zip(NAMES, got, want):
        assert a.dtype == e.dtype == dtype, name
        assert _norm_err(a, e) < tol, name


@pytest.mark.parametrize("release", ["3.6", "3.9"])
def test_autotune_tables_admit_only_configs_that_build_well_on_an_h100(release):
    """The tile tables (which configs the autotuner may compile, per dtype and Triton release)
    agree with the ahead-of-time sm_90 compile report of that release: no admitted config spills
    or exceeds shared memory, every config in the lists was compiled, each case keeps some."""
    path = ROOT / "bench" / "results" / f"compile_sm90_triton{release}.json"
    report = json.loads(path.read_text())
    assert report["triton"].startswith(release)
    tables = {"_fftconv_fwd_kernel": fftconv_kernels._CONV_TILES,
              "_fftconv_bwd_dx_kernel": fftconv_kernels._CONV_TILES,
              "_fftconv_bwd_dk_kernel": fftconv_kernels._DK_TILES}  # fmt: skip
    compiled = set()
    for row in report["rows"]:
        if row["kernel"] == "_fftconv_bwd_dk_kernel":
            key = (row["BLOCK_R"], row["BLOCK_S"], row["BLOCK_K"], row["num_warps"],
                   row["num_stages"])  # fmt: skip
        else:
            key = (row["BLOCK_P"], row["BLOCK_Q"], row["BLOCK_B"], row["num_warps"])
        kind = "fp32" if row["dtype"] == "fp32" else "16bit"
        compiled.add((row["kernel"], key, kind))
        if (kind, release) in tables[row["kernel"]].get(key, ()):
            assert "error" not in row and not row["wasted"], row
    for kernel, table in tables.items():
        for kind in ("16bit", "fp32"):
            admitted = [key for key, where in table.items() if (kind, release) in where]
            assert admitted, (kernel, kind)
            assert all((kernel, key, kind) in compiled for key in admitted)
