"""Selective state-space scans for the Mamba mixers: PyTorch references and the CUDA fast paths.

Mamba-1, per channel d and state n (zero-order hold on A, Euler on B, as in the Mamba paper):

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,    y_t = C_t . h_t + D u_t,    out_t = y_t * silu(z_t)

Mamba-2 (SSD) is the same recurrence with one scalar A per head and an x of width ``headdim`` per
head sharing B and C. Three PyTorch implementations live here:

- ``selective_scan_ref``: one step per token, vectorised over batch, channels and states. The oracle.
- ``selective_scan_lean``: the CPU path of Mamba-1. Per chunk of tokens (64 by default) the
  recurrence is solved in closed form with ``logcumsumexp`` over the cumulative log-decays
  (``_scan_chunk``), so the Python loop runs T / chunk_size times; its own backward recomputes the
  states chunk by chunk, so memory stays linear in T and in the chunk length.
- ``ssd_chunk_scan_ref``: the chunked SSD algorithm of the Mamba-2 paper (its minimal listing), the
  CPU path of Mamba-2, with ``mamba_chunk_scan_combined``'s signature.

Numerical care (all three): the maths runs in fp32 (fp64 stays fp64) whatever the input dtype. None
of them exponentiates a cumulative log-decay S_t on its own (``exp(-S_s)`` overflows once a chunk
decays by more than ~88 nats). The SSD form exponentiates differences ``S_t - S_s`` with s <= t,
sums of log-decays dt A <= 0, hence <= 0 (and still <= 0 in floating point, where a cumulative sum
of non-positive terms is non-increasing); entries with s > t are set to -inf *before* ``exp`` so
that neither pass meets an overflow. The Mamba-1 form exponentiates only logs of decayed sums (see
``_scan_chunk``).

The dispatchers ``causal_conv1d``, ``selective_scan`` and ``ssd_chunk_scan`` take ``impl``: auto |
torch | triton | mamba_ssm, resolved by ``helm.ops.resolve_impl``: "mamba_ssm" runs the kernels of
mamba-ssm and causal-conv1d (an optional CUDA extra; CUDA tensors only), "triton" HELM's Triton
scans (``helm/kernels/selective_scan.py``, ``helm/kernels/ssd.py``; the convolution stays in
PyTorch), "torch" the references here, and "auto" mamba-ssm's kernels on CUDA tensors when they
could be imported, else the Triton scans on CUDA tensors, else the references. ``check_scan_impl``
runs once per model: it refuses an explicit kernel that cannot be imported and logs the path in
use once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from helm.ops import SCAN_IMPLS, SCAN_KERNEL, resolve_impl, triton_installed

logger = logging.getLogger(__name__)

# Optional CUDA kernels; importing them can fail with more than ImportError on a machine without CUDA.
_IMPORT_ERRORS: dict[str, str] = {}
# The compiled extensions are probed by name: upstream imports them lazily, so the Python packages
# can import without them and fail at the first forward.
try:
    import causal_conv1d_cuda  # noqa: F401
    from causal_conv1d import causal_conv1d_fn
except (ImportError, OSError, RuntimeError) as err:
    causal_conv1d_fn = None
    _IMPORT_ERRORS["causal_conv1d"] = repr(err)
try:
    import selective_scan_cuda  # noqa: F401
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except (ImportError, OSError, RuntimeError) as err:
    selective_scan_fn = None
    _IMPORT_ERRORS["mamba_ssm.selective_scan_fn"] = repr(err)
try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except (ImportError, OSError, RuntimeError) as err:
    mamba_chunk_scan_combined = None
    _IMPORT_ERRORS["mamba_ssm.mamba_chunk_scan_combined"] = repr(err)

# What each op and each mixer needs from the optional packages (keys of _IMPORT_ERRORS).
_CONV = "causal_conv1d"
_SCAN = "mamba_ssm.selective_scan_fn"
_SSD = "mamba_ssm.mamba_chunk_scan_combined"
_LAYER_NEEDS = {"mamba": (_CONV, _SCAN), "mamba2": (_CONV, _SSD)}
_INSTALL = "install the CUDA extra (pip install mamba-ssm causal-conv1d) on a CUDA machine"
_logged: set[str] = set()


def mamba_ssm_available(ssm_layer: str) -> bool:
    """Whether the CUDA kernels that ``ssm_layer`` ("mamba" or "mamba2") needs could be imported."""
    return not any(name in _IMPORT_ERRORS for name in _LAYER_NEEDS[ssm_layer])


def _import_errors(needs: tuple[str, ...]) -> str:
    return "; ".join(f"{name}: {_IMPORT_ERRORS[name]}" for name in needs if name in _IMPORT_ERRORS)


def _unavailable(x: torch.Tensor, needs: tuple[str, ...]) -> str | None:
    """Why the mamba-ssm kernels in ``needs`` cannot run on ``x``, or None (``resolve_impl``)."""
    errors = _import_errors(needs)
    if errors:
        return f"the mamba-ssm / causal-conv1d kernels could not be imported ({errors}); {_INSTALL}"
    if not x.is_cuda:
        return f"the mamba-ssm kernels run on CUDA tensors only, got a {x.device.type} tensor"
    return None


def _resolve(impl: str, x: torch.Tensor, needs: tuple[str, ...], op: str) -> str:
    """The path, "torch", "triton" or "mamba_ssm": ``helm.ops.resolve_impl`` with mamba-ssm's
    kernels first for "auto", then the Triton kernels (on CUDA tensors, when triton is installed)."""
    if impl not in SCAN_IMPLS:
        raise ValueError(f"{op}: impl must be one of {', '.join(SCAN_IMPLS)}; got {impl!r}")
    unavailable = _unavailable(x, needs)
    if impl == "triton" or (impl == "auto" and unavailable is not None):
        return resolve_impl(impl, x, op=op)
    return resolve_impl(impl, x, kernel=SCAN_KERNEL, op=op, unavailable=unavailable)


def resolve_scan_impl(scan_impl: str, x: torch.Tensor, ssm_layer: str) -> str:
    """The path ("torch", "triton" or "mamba_ssm") of a ``ssm_layer`` mixer whose input is ``x``:
    the rule of ``_resolve`` over everything the mixer runs (conv and scan), so both agree."""
    return _resolve(scan_impl, x, _LAYER_NEEDS[ssm_layer], f"{ssm_layer} scan")


def check_scan_impl(scan_impl: str, ssm_layer: str) -> None:
    """Once per model: raise if an explicit kernel cannot be imported; log the path once.

    (Whether a given input runs the kernels is ``resolve_scan_impl``'s, per call: CUDA tensors only.)
    """
    if scan_impl not in SCAN_IMPLS:
        raise ValueError(f"scan_impl must be one of {', '.join(SCAN_IMPLS)}; got {scan_impl!r}")
    available = mamba_ssm_available(ssm_layer)
    if scan_impl == SCAN_KERNEL and not available:
        raise RuntimeError(
            f"scan_impl='mamba_ssm' needs the CUDA kernels of mamba-ssm and causal-conv1d for "
            f"ssm_layer={ssm_layer!r}, and they could not be imported "
            f"({_import_errors(_LAYER_NEEDS[ssm_layer])}). Install the CUDA extra (pip install "
            "mamba-ssm causal-conv1d) on a CUDA machine, or set scan_impl to 'auto' (kernels on "
            "CUDA tensors when available), 'triton' (HELM's Triton scans) or 'torch' (PyTorch "
            "scan)."
        )
    if scan_impl == "triton" and not triton_installed():
        raise RuntimeError(
            "scan_impl='triton' needs the triton package (it comes with PyTorch's CUDA wheels); "
            "set scan_impl to 'auto' or 'torch'"
        )
    if scan_impl == "torch":
        msg = f"{ssm_layer}: PyTorch scan (scan_impl='torch')"
    elif scan_impl == "triton":
        msg = f"{ssm_layer}: Triton scan kernels (scan_impl='triton')"
    elif available:
        msg = f"{ssm_layer}: mamba-ssm / causal-conv1d CUDA kernels on CUDA tensors"
    elif triton_installed():
        msg = (f"{ssm_layer}: Triton scan kernels on CUDA tensors, PyTorch scan elsewhere "
               "(mamba-ssm / causal-conv1d not importable)")  # fmt: skip
    else:
        msg = f"{ssm_layer}: PyTorch scan (mamba-ssm / causal-conv1d and triton not importable)"
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


# Shared pieces ----------------------------------------------------------------------------------


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32 maths; fp64 stays fp64


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a: (..., Q) log-decays -> (..., Q, Q) with [t, s] = a_{s+1} + ... + a_t for s <= t, -inf above.

    ``exp(segsum(a))`` is the lower-triangular matrix of decays from step s to step t.
    """
    Q = a.shape[-1]
    S = a.cumsum(-1)
    seg = S[..., :, None] - S[..., None, :]  # (..., Q, Q): S_t - S_s
    causal = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()
    return seg.masked_fill(~causal, float("-inf"))


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, impl: str = "auto"
) -> torch.Tensor:
    """Depthwise causal convolution + SiLU. x: (B, C, T); weight: (C, K); bias: (C,) -> (B, C, T).

    y[c, t] = silu(bias[c] + sum_k weight[c, k] x[c, t - K + 1 + k]) with x = 0 before t = 0.
    ``impl``: auto | torch | mamba_ssm (causal-conv1d's ``causal_conv1d_fn``).
    """
    if _resolve(impl, x, (_CONV,), "causal_conv1d") == SCAN_KERNEL:
        return causal_conv1d_fn(x.contiguous(), weight, bias, activation="silu")
    K = weight.shape[-1]
    y = F.conv1d(F.pad(x, (K - 1, 0)), weight[:, None, :], bias, groups=x.shape[1])
    return F.silu(y)


# Mamba-1 ----------------------------------------------------------------------------------------


def _prepare_delta(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, acc: torch.dtype
) -> torch.Tensor:
    delta = delta.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(
    y: torch.Tensor,
    u: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """y (B, Dch, T) -> y + D u, gated by silu(z), cast back to the input dtype."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Sequential selective scan (the oracle). u, delta, z: (B, Dch, T); A: (Dch, N);
    B, C: (B, N, T); D, delta_bias: (Dch,). Returns (B, Dch, T) in u's dtype."""
    acc = _acc_dtype(u)
    dt = _prepare_delta(delta, delta_bias, delta_softplus, acc)
    uf, A, B, C = u.to(acc), A.to(acc), B.to(acc), C.to(acc)
    decay = torch.exp(dt[:, :, :, None] * A[None, :, None, :])  # (B, Dch, T, N): exp(dt_t A)
    inp = (dt * uf)[:, :, :, None] * B.transpose(1, 2)[:, None]  # (B, Dch, T, N): dt_t B_t u_t
    h = uf.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (B, Dch, N)
    ys = []
    for t in range(u.shape[-1]):
        h = decay[:, :, t] * h + inp[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)  # (B, Dch, T)
    return _finish(y, uf, D, z, u.dtype)


def _scan_chunk(
    log_a: torch.Tensor, p: torch.Tensor, q: torch.Tensor, h0: torch.Tensor
) -> torch.Tensor:
    """States of h_t = exp(log_a_t) h_{t-1} + p_t q_t over one chunk, computed in log space.

    log_a: (B, Dch, N, Tc) log-decays <= 0; p: (B, Dch, Tc); q: (B, N, Tc); h0: (B, Dch, N), the
    state entering the chunk. Returns h: (B, Dch, N, Tc). With L_t = log_a_1 + ... + log_a_t,

        h_t = exp(L_t) h0 + sum_{s<=t} exp(L_t - L_s) p_s q_s.

    exp(-L_s) alone overflows once a chunk decays by ~88 nats, so each sign of the input p_s q_s is
    summed as ``logcumsumexp(log|p_s q_s| - L_s)`` and only ``L_t + logcumsumexp(...)_t`` is
    exponentiated: the log of a sum of |p_s q_s| exp(L_t - L_s) with L_t - L_s <= 0, which cannot
    overflow. log|p_s q_s| = log|p_s| + log|q_s| comes from the factors; a zero input gives -inf and
    adds nothing. The exponents carry a rounding error of about eps |L|, a relative error in h, so
    the chunk length (which bounds |L|) bounds the error.
    """
    L = log_a.cumsum(-1)
    w = p.abs().log()[:, :, None] + q.abs().log()[:, None] - L  # (B, Dch, N, Tc)
    same = (p >= 0)[:, :, None] == (q >= 0)[:, None]  # p_s q_s >= 0
    h = torch.logcumsumexp(w.masked_fill(~same, float("-inf")), -1).add_(L).exp_()
    h -= torch.logcumsumexp(w.masked_fill_(same, float("-inf")), -1).add_(L).exp_()
    return h.addcmul_(L.exp_(), h0[..., None])


class _SelectiveScan(torch.autograd.Function):
    """y_t = sum_n C_t h_t with h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t (per channel and state),
    chunk by chunk; backward keeps only the inputs and the state entering each chunk.

    Backward visits the chunks from last to first, recomputes a chunk's states and runs the adjoint
    recurrence backwards in time with the same decays,

        g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}        (g_t = dL/dh_t per channel and state),

    which is ``_scan_chunk`` on time-reversed inputs with the decays shifted by one step. Then

        dL/d(dt_t u_t) = sum_n g_t B_t,    dL/dB_t = sum_d g_t dt_t u_t,    dL/dC_t = sum_d gy_t h_t,
        dL/d(dt_t A) = g_t exp(dt_t A) h_{t-1}   (reaching dt_t through A and A through dt_t),

    and exp(dt_first A) g_first is the gradient handed to the previous chunk's last state.
    """

    @staticmethod
    def forward(ctx, dt, A, B, C, u, chunk_size):
        # dt, u: (B, Dch, T); A: (Dch, N); B, C: (B, N, T); all in the accumulation dtype.
        h = dt.new_zeros(dt.shape[0], dt.shape[1], A.shape[1])  # (B, Dch, N)
        p = dt * u
        entering, ys = [], []
        for start in range(0, dt.shape[-1], chunk_size):
            span = slice(start, start + chunk_size)
            entering.append(h)
            log_a = dt[:, :, None, span] * A[None, :, :, None]  # (B, Dch, N, Tc)
            hs = _scan_chunk(log_a, p[..., span], B[..., span], h)
            ys.append(torch.einsum("bdnt,bnt->bdt", hs, C[..., span]))
            h = hs[..., -1].clone()  # a copy, so that the chunk's states can be freed
        ctx.save_for_backward(dt, A, B, C, u, *entering)
        ctx.chunk_size = chunk_size
        return torch.cat(ys, dim=-1)  # (B, Dch, T)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        dt, A, B, C, u, *entering = ctx.saved_tensors
        gy = gy.to(dt.dtype)
        Q, T = ctx.chunk_size, dt.shape[-1]
        p = dt * u  # (B, Dch, T)
        g_p, g_dtA = torch.empty_like(dt), torch.empty_like(dt)  # dL/d(dt u), sum_n A dL/d(dt A)
        g_B, g_C, g_A = torch.empty_like(B), torch.empty_like(C), torch.zeros_like(A)
        g = torch.zeros_like(entering[0])  # (B, Dch, N): dL/dh reaching this chunk from later ones
        for k in reversed(range(len(entering))):
            span = slice(k * Q, min((k + 1) * Q, T))
            log_a = dt[:, :, None, span] * A[None, :, :, None]  # (B, Dch, N, Tc)
            hs = _scan_chunk(log_a, p[..., span], B[..., span], entering[k])
            rev_log_a = F.pad(log_a[..., 1:], (0, 1)).flip(-1)  # step t + 1's decay, reversed
            gh = _scan_chunk(rev_log_a, gy[..., span].flip(-1), C[..., span].flip(-1), g).flip(-1)
            g_C[..., span] = torch.einsum("bdnt,bdt->bnt", hs, gy[..., span])
            g_B[..., span] = torch.einsum("bdnt,bdt->bnt", gh, p[..., span])
            g_p[..., span] = torch.einsum("bdnt,bnt->bdt", gh, B[..., span])
            decay = log_a.exp_()  # (B, Dch, N, Tc)
            g = gh[..., 0] * decay[..., 0]
            h_prev = torch.cat([entering[k][..., None], hs[..., :-1]], dim=-1)
            g_la = gh.mul_(decay).mul_(h_prev)  # dL/d(dt_t A)
            g_dtA[..., span] = torch.einsum("bdnt,dn->bdt", g_la, A)
            g_A += torch.einsum("bdnt,bdt->dn", g_la, dt[..., span])
        return g_dtA + g_p * u, g_A, g_B, g_C, g_p * dt, None


def selective_scan_lean(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = 64,
) -> torch.Tensor:
    """``selective_scan_ref`` in log space, chunk by chunk (same arguments, plus ``chunk_size``).

    Each chunk is a handful of vectorised ops over (B, Dch, N, chunk_size) (``_scan_chunk``), so
    the Python loop runs T / chunk_size times and the working memory is linear in chunk_size; for
    backward only the inputs and one (B, Dch, N) state per chunk are kept (``_SelectiveScan``).
    Longer chunks mean fewer steps but a larger rounding error, about eps times the log-decay a
    chunk accumulates. In fp32 on Mamba-like inputs (dt = softplus(N(0, 1) - 2), A in [-16, -1],
    T = 444) outputs and gradients stay within ~1e-5 of their scale with chunks of 64 (~3e-5 with
    one 444-token chunk); under extreme decay (dt A ~ -1e3 per step) the error nears 1e-3.
    """
    acc = _acc_dtype(u)
    dt = _prepare_delta(delta, delta_bias, delta_softplus, acc)
    uf = u.to(acc)
    with torch.autocast(u.device.type, enabled=False):  # keep the einsums in fp32 under AMP
        y = _SelectiveScan.apply(dt, A.to(acc), B.to(acc), C.to(acc), uf, chunk_size)
    return _finish(y, uf, D, z, u.dtype)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = 64,
    impl: str = "auto",
) -> torch.Tensor:
    """mamba-ssm's ``selective_scan_fn``, HELM's Triton twin of it or ``selective_scan_lean``
    (``impl``: auto | torch | triton | mamba_ssm, see ``_resolve``)."""
    path = _resolve(impl, u, (_SCAN,), "selective_scan")
    if path == SCAN_KERNEL:
        return selective_scan_fn(
            u, delta, A, B.contiguous(), C.contiguous(), D, z, delta_bias, delta_softplus
        )
    if path == "triton":
        from helm.kernels import selective_scan as kernels  # imports triton: only when asked for

        return kernels.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_lean(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)


# Mamba-2 (SSD) ----------------------------------------------------------------------------------


def ssd_chunk_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """Chunked SSD. x: (B, T, H, P); dt: (B, T, H); A, D, dt_bias: (H,); B, C: (B, T, G, N) with
    head h reading group h // (H / G). Returns y (B, T, H, P) in x's dtype, where per head

        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T  (P, N),    y_t = h_t C_t + D x_t.
    """
    acc = _acc_dtype(x)
    Bsz, T, H, P = x.shape
    G = B.shape[2]
    Q = chunk_size
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    if dt_softplus:
        dt = F.softplus(dt)
    xf = x.to(acc)
    Bh = B.to(acc).repeat_interleave(H // G, dim=2)  # (B, T, H, N)
    Ch = C.to(acc).repeat_interleave(H // G, dim=2)
    xd = xf * dt[..., None]  # (B, T, H, P): the input term dt_t x_t
    a = dt * A.to(acc)  # (B, T, H) log-decays <= 0
    # Zero padding to whole chunks: dt = 0 there (no decay, no input); only later steps would see it.
    pad = (-T) % Q
    if pad:
        xd, a = F.pad(xd, (0, 0, 0, 0, 0, pad)), F.pad(a, (0, 0, 0, pad))
        Bh, Ch = F.pad(Bh, (0, 0, 0, 0, 0, pad)), F.pad(Ch, (0, 0, 0, 0, 0, pad))
    c = (T + pad) // Q
    xd, Bh, Ch = (t.reshape(Bsz, c, Q, H, -1) for t in (xd, Bh, Ch))  # (B, c, Q, H, P or N)
    a = a.reshape(Bsz, c, Q, H).permute(0, 3, 1, 2)  # (B, H, c, Q)
    S = a.cumsum(-1)  # (B, H, c, Q): cumulative log-decay within each chunk

    # 1. Within chunks: y_t = sum_{s<=t} (C_t . B_s) exp(S_t - S_s) dt_s x_s.
    L = segsum(a).exp()  # (B, H, c, Q, Q)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, L, xd)
    # 2. Each chunk's own contribution to the state at its end: sum_s exp(S_end - S_s) dt_s x_s B_s^T.
    decay_to_end = torch.exp(S[..., -1:] - S)  # (B, H, c, Q), exponents <= 0
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, xd)  # (B, c, H, P, N)
    # 3. Pass states across chunks: the state entering chunk k is sum_{j<k} of chunk j's state decayed
    #    by the total log-decay of chunks j+1 .. k-1, again a segsum (over chunk totals).
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # (B, c+1, H, P, N)
    decay_chunks = segsum(F.pad(S[..., -1], (1, 0))).exp()  # (B, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunks, states)[:, :-1]  # entering each chunk
    # 4. The entering state's share of each output: C_t . exp(S_t) h_in.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, S.exp())

    y = (y_diag + y_off).reshape(Bsz, c * Q, H, P)[:, :T]
    if D is not None:
        y = y + xf * D.to(acc)[:, None]
    return y.to(x.dtype)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """mamba-ssm's ``mamba_chunk_scan_combined``, HELM's Triton twin of it or
    ``ssd_chunk_scan_ref`` (``impl``: auto | torch | triton | mamba_ssm, see ``_resolve``)."""
    path = _resolve(impl, x, (_SSD,), "ssd_chunk_scan")
    if path == "torch":
        return ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus)
    fn = mamba_chunk_scan_combined
    if path == "triton":
        from helm.kernels import ssd  # imports triton: only when asked for

        fn = ssd.mamba_chunk_scan_combined
    return fn(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)


# One step at a time (cached decoding) ----------------------------------------------------------


def causal_conv1d_update(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``causal_conv1d`` for one new step: x (B, C) enters the window ``conv_state`` (B, C, K) of
    the last K inputs (oldest first, zeros before the sequence). Returns (silu(conv), new window),
    the output equal to ``causal_conv1d``'s at that step."""
    window = torch.cat([conv_state[..., 1:], x[..., None]], dim=-1)  # (B, C, K)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return F.silu(y), window


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence the scans solve (mamba-ssm's ``selective_state_update``, returning
    the new state instead of writing it): ``h = exp(dt A) h + dt B x``, ``y = C . h + D x``, gated
    by silu(z). Returns (y, new state), in fp32 maths and x's dtype.

    Mamba-1: state (B, Dch, N); x, dt, z (B, Dch); A (Dch, N); B, C (B, N); D, dt_bias (Dch,).
    Mamba-2: state (B, H, P, N); x, z (B, H, P); dt (B, H); A, D, dt_bias (H,); B, C (B, G, N)
    with head h reading group h // (H / G).
    """
    acc = _acc_dtype(x)
    dt = dt.to(acc) + (dt_bias.to(acc) if dt_bias is not None else 0.0)
    if dt_softplus:
        dt = F.softplus(dt)
    xf, A, B, C = x.to(acc), A.to(acc), B.to(acc), C.to(acc)
    if state.dim() == 4:  # Mamba-2: one scalar decay per head, B and C shared by a group of heads
        H, G = state.shape[1], B.shape[1]
        B, C = B.repeat_interleave(H // G, dim=1), C.repeat_interleave(H // G, dim=1)  # (B, H, N)
        decay = torch.exp(dt * A)[..., None, None]  # (B, H, 1, 1)
        new = state * decay + (dt[..., None] * xf)[..., None] * B[:, :, None, :]  # (B, H, P, N)
        y = (new @ C[..., None]).squeeze(-1)  # (B, H, P)
        Dx = xf * D.to(acc)[:, None] if D is not None else 0.0
    else:
        decay = torch.exp(dt[..., None] * A)  # (B, Dch, N)
        new = state * decay + (dt * xf)[..., None] * B[:, None, :]
        y = (new @ C[..., None]).squeeze(-1)  # (B, Dch)
        Dx = xf * D.to(acc) if D is not None else 0.0
    y = y + Dx
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype), new
