"""Mamba's Triton scans (``helm/kernels/selective_scan.py``, ``helm/kernels/ssd.py``, under
TRITON_INTERPRET on CPU) against mamba-ssm's ``selective_scan_ref`` and the plain SSD recurrence,
forward and every gradient, and wired into the Mamba models."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helm.kernels import mamba_chunk_scan_combined, selective_scan_fn
from helm.kernels import selective_scan as scan_kernels
from helm.kernels import ssd as ssd_kernels
from helm.models.mamba import Mamba, MambaConfig
from helm.ops import selective_scan as scan_ops
from helm.ops.selective_scan import (
    check_scan_impl,
    resolve_scan_impl,
    selective_scan,
    ssd_chunk_scan_ref,
)

# Kernel tests on CPU tensors need the interpreter (set by conftest.py where there is no CUDA); on a
# CUDA machine the compiled kernels are tested by the `gpu` tests instead.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture(autouse=True)
def _cpu_needs_interpreter(request):
    if not INTERPRET and request.node.get_closest_marker("gpu") is None:
        pytest.skip("CPU kernel tests run under TRITON_INTERPRET=1, set where there is no CUDA")


# fp32: both sides compute in fp32 / fp64; observed <= 2e-6 of the largest value (dA, whose terms
# cancel most). bf16: the output and gradients are rounded to bf16 (one ulp is up to 2^-7 of a
# value) and the SSD's tensor-core operands too: a few ulps of the largest magnitude, norm-relative
# error <= 1e-2 (observed <= 1e-2 and 5e-3). A wrong kernel is off by O(1).
FP32_TOL = 1e-5
MODEL_TOL = 1e-3  # see test_models_on_the_triton_path_match_the_pytorch_scan
BF16_MAX_TOL, BF16_NORM_TOL = 4 * 2**-7, 1e-2


def _errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(largest elementwise error, norm error), both relative to ``expected``'s scale."""
    a, e = actual.double(), expected.double()
    scale = e.abs().max().clamp_min(1e-30)
    return ((a - e).abs().max() / scale).item(), ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def _check(names, got, want, dtype):
    for name, a, e in zip(names, got, want, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        max_err, norm_err = _errors(a, e)
        if dtype == torch.float32:
            assert max_err < FP32_TOL, (name, max_err)
        else:
            assert max_err < BF16_MAX_TOL and norm_err < BF16_NORM_TOL, (name, max_err, norm_err)


def _run(fn, inputs: dict, kwargs: dict, seed: int, extra_out: bool = False):
    """fn's outputs and the gradients of every tensor input under a random upstream gradient, on
    fresh leaves (clones). With ``extra_out`` the second output (a state) gets a gradient too."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out = fn(**leaves, **kwargs)
    outs = out if extra_out else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen).to(o)).sum() for o in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    names = ["out", "state"][: len(outs)] + [f"d{k}" for k in leaves]
    return names, [*outs, *grads]


def _r(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


# Mamba-1 ----------------------------------------------------------------------------------------


def mamba_ssm_selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                 delta_softplus=False, return_last_state=False):  # fmt: skip
    """mamba-ssm's ``selective_scan_ref`` (mamba_ssm/ops/selective_scan_interface.py) for real A,
    with B and C (D, N), (batch, N, L) or (batch, G, N, L), in fp64; results in the kernel's
    dtypes (out as u, the last state fp32)."""
    dtype_in = u.dtype
    u, delta, A = u.double(), delta.double(), A.double()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].double()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim = u.shape[:2]
    B, C = B.double(), C.double()
    if B.dim() == 4:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
    if C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    eq = {2: "bdl,dn,bdl->bdln", 3: "bdl,bnl,bdl->bdln", 4: "bdl,bdnl,bdl->bdln"}[B.dim()]
    deltaB_u = torch.einsum(eq, delta, B, u)
    x = A.new_zeros((batch, dim, A.shape[1]))
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        if C.dim() == 2:
            ys.append(torch.einsum("bdn,dn->bd", x, C))
        elif C.dim() == 3:
            ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
        else:
            ys.append(torch.einsum("bdn,bdn->bd", x, C[:, :, :, i]))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.double()[:, None]
    if z is not None:
        out = out * F.silu(z.double())
    out = out.to(dtype_in)
    return (out, x.float()) if return_last_state else out


def scan_case(batch=2, dim=5, N=6, L=37, groups=0, extras=True, dtype=torch.float32, seed=0):
    """selective_scan_fn's tensor arguments, Mamba-like: dt = softplus(delta + bias) in ~[0.05, 1],
    A in [-3.2, -0.2]; groups: 0 for (batch, N, L) B and C, -1 for constant (D, N), else G."""
    g = torch.Generator().manual_seed(seed)
    shape = {0: (batch, N, L), -1: (dim, N)}.get(groups, (batch, groups, N, L))
    return dict(
        u=_r(g, batch, dim, L, dtype=dtype),
        delta=(_r(g, batch, dim, L) * 0.5 - 1).to(dtype),
        A=(-torch.rand(dim, N, generator=g) * 3 - 0.2).to(DEVICE),
        B=_r(g, *shape, dtype=dtype),
        C=_r(g, *shape, dtype=dtype),
        D=_r(g, dim) if extras else None,
        z=_r(g, batch, dim, L, dtype=dtype) if extras else None,
        delta_bias=_r(g, dim) * 0.3 if extras else None,
    )


def _compare_scan(inputs, dtype=torch.float32, return_last_state=False, softplus=True, seed=1):
    kw = dict(delta_softplus=softplus, return_last_state=return_last_state)
    _, got = _run(selective_scan_fn, inputs, kw, seed, return_last_state)
    names, want = _run(mamba_ssm_selective_scan_ref, inputs, kw, seed, return_last_state)
    _check(names, got, want, dtype)


@pytest.mark.parametrize("extras", [True, False])
def test_selective_scan_fp32(extras):
    """Three chunks of 16 (the last ragged); D, z, delta_bias and softplus, or none of them."""
    L = 37 if extras else 21
    _compare_scan(scan_case(L=L, extras=extras), softplus=extras)


def test_selective_scan_bf16_activations_fp32_parameters():
    """As under autocast: u, delta, B, C, z in bf16; A, D, delta_bias stay fp32."""
    _compare_scan(scan_case(dtype=torch.bfloat16, seed=2), torch.bfloat16)


def test_selective_scan_groups_and_last_state():
    """(batch, G, N, L) B and C with 3 channels per group (programs never straddle groups), and
    the last state returned and differentiated."""
    _compare_scan(scan_case(dim=6, L=20, groups=2, seed=3), return_last_state=True)


def test_selective_scan_constant_B_and_C():
    _compare_scan(scan_case(batch=1, dim=2, L=18, groups=-1, seed=4))


def _spy(monkeypatch, module, name: str) -> list:
    """Record the calls of ``module.name`` (still running it); returns the list of calls."""
    calls, fn = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_dispatch_with_the_model_strides(monkeypatch):
    """helm.ops.selective_scan(impl="triton") on the strided views MambaMixer passes (dt and z
    transposed out of (batch, L, .) projections) runs the kernel and equals the PyTorch scan."""
    g = torch.Generator().manual_seed(5)
    batch, dim, N, L = 2, 4, 3, 19
    proj = _r(g, batch, L, 2 * dim).transpose(1, 2)  # (batch, 2 dim, L), stride_l = 2 dim
    dbc = _r(g, batch, L, dim + 2 * N)
    inputs = dict(
        u=_r(g, batch, dim, L), delta=dbc[..., :dim].transpose(1, 2) * 0.5,
        A=-torch.rand(dim, N, generator=g).to(DEVICE) - 0.5,
        B=dbc[..., dim : dim + N].transpose(1, 2), C=dbc[..., dim + N :].transpose(1, 2),
        D=_r(g, dim), z=proj[:, dim:], delta_bias=_r(g, dim),
    )  # fmt: skip
    assert not inputs["z"].is_contiguous() and inputs["delta"].stride(1) == 1
    kw = dict(delta_softplus=True)
    calls = _spy(monkeypatch, scan_kernels, "selective_scan_fn")
    names, got = _run(lambda **a: selective_scan(**a, **kw, impl="triton"), inputs, {}, 6)
    assert calls == ["selective_scan_fn"]
    _, want = _run(lambda **a: selective_scan(**a, **kw, impl="torch"), inputs, {}, 6)
    _check(names, got, want, torch.float32)


def test_selective_scan_bad_arguments():
    inputs = scan_case(batch=1, dim=2, N=3, L=5)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_fn(**{**inputs, "B": inputs["B"][..., :4]})
    with pytest.raises(ValueError, match="A must be a real"):
        selective_scan_fn(**{**inputs, "A": inputs["A"].to(torch.complex64)})


def test_cpu_tensors_without_the_interpreter_raise(monkeypatch):
    monkeypatch.setattr(scan_kernels, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="CUDA"):
        selective_scan_fn(**scan_case(batch=1, dim=2, N=3, L=5))


# Mamba-2 (SSD) ----------------------------------------------------------------------------------


def ssd_recurrence(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                   dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):  # fmt: skip
    """The plain SSD recurrence in fp64, one step at a time (``chunk_size`` unused):
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t, times silu(z_t)."""
    xd, dt = x.double(), dt.double()
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    batch, L, H, P = x.shape
    Bh = B.double().repeat_interleave(H // B.shape[2], dim=2)  # (batch, L, H, N)
    Ch = C.double().repeat_interleave(H // C.shape[2], dim=2)
    h = xd.new_zeros(batch, H, P, B.shape[3])
    if initial_states is not None:
        h = initial_states.double()
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A.double())[..., None, None]  # (batch, H, 1, 1)
        h = decay * h + (dt[:, t, :, None] * xd[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + xd * (D.double()[:, None] if D.dim() == 1 else D.double())
    if z is not None:
        y = y * F.silu(z.double())
    return (y.to(x.dtype), h.float()) if return_final_states else y.to(x.dtype)


def ssd_case(batch=2, L=37, H=2, P=5, G=1, N=6, extras=True, d_per_channel=False,
             dtype=torch.float32, seed=0):  # fmt: skip
    """mamba_chunk_scan_combined's tensor arguments: dt = softplus(dt + bias) ~ [0.1, 1],
    A in [-3.3, -0.3]."""
    g = torch.Generator().manual_seed(seed)
    D_shape = (H, P) if d_per_channel else (H,)
    return dict(
        x=_r(g, batch, L, H, P, dtype=dtype),
        dt=(_r(g, batch, L, H) * 0.5 - 1).to(dtype),
        A=(-torch.rand(H, generator=g) * 3 - 0.3).to(DEVICE),
        B=_r(g, batch, L, G, N, dtype=dtype),
        C=_r(g, batch, L, G, N, dtype=dtype),
        D=_r(g, *D_shape) if extras else None,
        z=_r(g, batch, L, H, P, dtype=dtype) if extras else None,
        dt_bias=_r(g, H) * 0.3 if extras else None,
        initial_states=_r(g, batch, H, P, N) if extras else None,
    )


def _compare_ssd(inputs, dtype=torch.float32, seed=1, **kw):
    kw = {"chunk_size": 16, "dt_softplus": True, **kw}
    final = kw.get("return_final_states", False)
    _, got = _run(mamba_chunk_scan_combined, inputs, kw, seed, final)
    names, want = _run(ssd_recurrence, inputs, kw, seed, final)
    _check(names, got, want, dtype)


def test_ssd_fp32():
    """Three chunks of 16 (the last ragged) with D, z, dt_bias, softplus and initial states."""
    _compare_ssd(ssd_case())


def test_ssd_groups_limit_and_final_states():
    """Two groups of two heads, D per channel, dt clamped by dt_limit, the final states returned
    and differentiated."""
    inputs = ssd_case(batch=1, L=30, H=4, G=2, d_per_channel=True, seed=2)
    _compare_ssd(inputs, dt_limit=(0.1, 0.5), return_final_states=True)


def test_ssd_bf16():
    _compare_ssd(ssd_case(batch=1, dtype=torch.bfloat16, seed=3), torch.bfloat16)


def test_ssd_plain_matches_the_chunked_reference():
    """No extras and no softplus (dt used as given), against helm's chunked SSD reference with its
    own chunking (the kernel rounds chunk_size 8 up to its smallest tile, 16)."""
    inputs = ssd_case(batch=1, L=21, extras=False, seed=4)
    inputs["dt"] = inputs["dt"].abs() * 0.3
    kw = dict(chunk_size=8)
    names, got = _run(mamba_chunk_scan_combined, inputs, kw, 5)
    _, want = _run(ssd_chunk_scan_ref, inputs, kw, 5)
    _check(names, got, want, torch.float32)


def test_ssd_unsupported_arguments_raise():
    inputs = ssd_case(batch=1, L=5, extras=False)
    with pytest.raises(NotImplementedError, match="seq_idx"):
        mamba_chunk_scan_combined(**inputs, chunk_size=16, seq_idx=torch.zeros(1, 5, dtype=int))
    with pytest.raises(ValueError, match="B and C must be"):
        mamba_chunk_scan_combined(**{**inputs, "B": inputs["B"][:, :4]}, chunk_size=16)


# The models on the Triton path ------------------------------------------------------------------


@pytest.mark.parametrize("ssm_layer", ["mamba", "mamba2"])
def test_models_on_the_triton_path_match_the_pytorch_scan(ssm_layer, monkeypatch):
    """scan_impl="triton" (the kernels under the interpreter here) against scan_impl="torch":
    the same hidden states and parameter gradients. Both paths are fp32; A_log's gradient sums
    terms that cancel, and each path is ~1e-4 of its scale off an fp64 run there: MODEL_TOL."""
    base = dict(vocab_size=69, d_model=8, num_layers=1, d_state=4, d_ff=0, ssm_layer=ssm_layer,
                headdim=8, chunk_size=16)  # fmt: skip
    ids = torch.randint(5, 69, (1, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    module, name = {"mamba": (scan_kernels, "selective_scan_fn"),
                    "mamba2": (ssd_kernels, "mamba_chunk_scan_combined")}[ssm_layer]  # fmt: skip
    calls = _spy(monkeypatch, module, name)
    results = []
    for impl in ("triton", "torch"):
        torch.manual_seed(0)
        model = Mamba(MambaConfig(**base, scan_impl=impl)).to(DEVICE)
        hidden = model(ids)
        (
            hidden * torch.linspace(-1, 1, hidden.numel()).view(hidden.shape).to(DEVICE)
        ).sum().backward()
        results.append([hidden] + [p.grad for p in model.parameters()])
    assert calls == [name]  # the triton model ran the kernel, the torch model did not
    for a, e in zip(*results, strict=True):
        assert _errors(a, e)[0] < MODEL_TOL


def test_auto_prefers_mamba_ssm_then_triton(monkeypatch, caplog):
    """scan_impl="auto": mamba-ssm's kernels where they import, else the Triton scans, on CUDA
    tensors; the PyTorch scan on CPU tensors. The path is logged once per model."""
    cuda_input = SimpleNamespace(is_cuda=True, device=SimpleNamespace(type="cuda"))
    monkeypatch.setattr(scan_ops, "_IMPORT_ERRORS", {})
    assert resolve_scan_impl("auto", cuda_input, "mamba") == "mamba_ssm"
    monkeypatch.setattr(scan_ops, "_IMPORT_ERRORS", {"causal_conv1d": "ImportError()"})
    assert resolve_scan_impl("auto", cuda_input, "mamba2") == "triton"
    assert resolve_scan_impl("auto", torch.zeros(1), "mamba") == "torch"
    assert resolve_scan_impl("triton", torch.zeros(1), "mamba") == "triton"  # the interpreter
    monkeypatch.setattr(scan_ops, "_logged", set())
    with caplog.at_level("INFO", logger=scan_ops.logger.name):
        check_scan_impl("auto", "mamba")
        check_scan_impl("auto", "mamba")
    assert [r.message for r in caplog.records] == [
        "mamba: Triton scan kernels on CUDA tensors, PyTorch scan elsewhere "
        "(mamba-ssm / causal-conv1d not importable)"
    ]


# GPU sizes (the compiled kernels) ---------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_scan_gpu_recipe_shape(dtype):
    """A slice of the mamba_clm recipe's scan (d_inner 512, N 16, L 444) against the reference."""
    _compare_scan(scan_case(batch=2, dim=64, N=16, L=444, dtype=dtype, seed=7), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_gpu_shape(dtype):
    inputs = ssd_case(batch=2, L=300, H=4, P=64, G=2, N=32, dtype=dtype, seed=8)
    _compare_ssd(inputs, dtype, chunk_size=64)
