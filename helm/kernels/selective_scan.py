"""Mamba-1's selective scan as a chunked parallel scan, with mamba-ssm's ``selective_scan_fn`` API.

Per batch row b, channel d and state n (zero-order hold on A, Euler on B, as in the Mamba paper):

    h_t = a_t h_{t-1} + x_t,   a_t = exp(dt_t A[d, n]),   x_t = dt_t u_t B_t[n]
    y_t = sum_n C_t[n] h_t[n] + D u_t,   out_t = y_t * silu(z_t)

with dt = softplus(delta + delta_bias) (or delta itself). Shapes as mamba-ssm: u, delta, z
(batch, D, L); A (D, N); B, C (batch, N, L), or (batch, G, N, L) where channel d reads group
d // (D / G), or (D, N) constant over time; D, delta_bias (D,).

Design. A program owns BLOCK_D channels of one group of one batch row and carries their
(BLOCK_D, N) state in registers through the sequence, CHUNK steps at a time. Per chunk it loads
the (BLOCK_D, CHUNK) tiles of u, delta, z and the (N, CHUNK) tiles of B and C, forms a and x as
(BLOCK_D, N, CHUNK) tiles, and solves the recurrence across the chunk with one
``tl.associative_scan`` over pairs (a, x) composed as affine maps, h -> a h + x (``_compose``):
a running product of decays, never a quotient of them, so nothing overflows however strong the
decay (the log-space forms divide by cumulative decays). The scanned pair gives every step's
state from the chunk's entering state, h_t = a_cum_t h_in + x_cum_t; y is reduced over N in
registers, the D skip and the z gate are applied, and y is stored: one pass reads each input
once and writes y once, and nothing of size (batch, D, N, L) ever exists in memory (the PyTorch
path materialises several such tensors per chunk). The state entering each chunk (and the
last) is stored, (batch, D, L / CHUNK + 1, N) in fp32, for the backward pass and
``return_last_state``.

Backward (derivation in ``_selective_scan_bwd_kernel``) visits the chunks last to first with the
same tiles: it recomputes the chunk's states from the stored entering state, runs the adjoint
recurrence g_t = C_t gy_t + a_{t+1} g_{t+1} as a reversed scan of the same affine maps, and
writes every gradient in the same pass; dB and dC are summed over the channel blocks with fp32
atomics, dA, dD and ddelta_bias per batch row and summed afterwards.

Cost (mamba_clm recipe: batch 128, D = 512, N = 16, L = 444, bf16 on an H100): the forward moves
about 4 (batch, D, L) bf16 tensors (0.23 GB) and the backward about 8, against tens of GB of
fp32 traffic per layer for the PyTorch scan; the work is ~20 fp32 operations and one exp per
(b, d, n, t), about 1e10 operations per layer: a few tenths of a millisecond. These are
estimates; ``helm/kernels/bench/bench_scan.py`` measures.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helm.kernels.interpreter import fix_loop_bounds, vectorize_scans

_INTERPRET = triton.knobs.runtime.interpret  # the same switch that made the kernels below
fix_loop_bounds()  # the chunk loops run to a bound computed from L
vectorize_scans()  # the interpreter runs the associative scans in log2(CHUNK) whole-tile steps
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Steps per chunk: the state entering each chunk is stored for the backward pass, so forward and
# backward use the same value. Small under the interpreter so that tiny tests cross chunks.
CHUNK = 16 if _INTERPRET else 32


def _configs() -> list[triton.Config]:
    """Channels per program; one config when interpreting. Compiled ahead of time for sm_90
    (Triton 3.9, N = 16, CHUNK = 32) none of these spills: 106-222 registers forward,
    216-255 backward."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_D": 8}, num_warps=4)]
    return [
        triton.Config({"BLOCK_D": d}, num_warps=w) for d, w in ((4, 4), (8, 4), (8, 8), (16, 8))
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop blocks wider than a group of channels (they would only compute padding)."""
    widest = max(4, triton.next_power_of_2(named_args["ch_per_group"]))
    return [c for c in configs if c.kwargs["BLOCK_D"] <= widest] or configs[:1]


@triton.jit
def _compose(a1, x1, a2, x2):
    """h -> a1 h + x1 (earlier steps), then h -> a2 h + x2 (later steps), as one affine map."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def softplus(x):
    """log(1 + e^x) in ``tl.*`` maths: max(x, 0) + log1p(e^-|x|), log1p by its series where
    log(1 + e) would lose the small e to rounding (relative error < 2e-7 either way)."""
    e = tl.exp(-tl.abs(x))
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * (0.25 - e * (0.2 - e / 6.0)))))
    return tl.maximum(x, 0.0) + tl.where(e < 0.1, series, tl.log(1.0 + e))


@triton.jit
def _load_dt(ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(delta + bias, dt) on a tile; dt = 0 off the mask (no decay, no input: the state passes)."""
    raw = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[:, None]
    if SOFTPLUS:
        dt = softplus(raw)
    else:
        dt = raw
    return raw, tl.where(mask, dt, 0.0)


@triton.autotune(
    configs=_configs(),
    key=["Dch", "N", "G", "HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, state_ptr,
    Dch, N, L, G, ch_per_group,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """y for BLOCK_D channels of group g of batch row b, chunk by chunk; stores entering states."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // G
    g = pid % G
    j = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # channel within group
    offs_d = g * ch_per_group + j
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, CHUNK)
    d_in = j < ch_per_group
    n_in = offs_n < N
    dn_in = d_in[:, None] & n_in[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=dn_in, other=0.0)
    A = A.to(tl.float32)  # padded (d, n): A = 0 and B = 0, so a = 1, x = 0, the state stays 0
    bias = tl.load(bias_ptr + offs_d, mask=d_in, other=0.0).to(tl.float32) if HAS_BIAS else None
    Dv = tl.load(D_ptr + offs_d, mask=d_in, other=0.0).to(tl.float32) if HAS_D else None
    u_row = u_ptr + b * su_b + offs_d[:, None] * su_d
    dt_row = dt_ptr + b * sdt_b + offs_d[:, None] * sdt_d
    z_row = z_ptr + b * sz_b + offs_d[:, None] * sz_d
    y_row = y_ptr + (b * Dch + offs_d[:, None]) * L
    B_row = B_ptr + b * sB_b + g * sB_g + offs_n[:, None] * sB_n
    C_row = C_ptr + b * sC_b + g * sC_g + offs_n[:, None] * sC_n
    n_chunks = tl.cdiv(L, CHUNK)
    state_row = state_ptr + (b * Dch + offs_d[:, None]) * ((n_chunks + 1) * N) + offs_n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(n_chunks):
        tl.store(state_row + c * N, h, mask=dn_in)
        t = c * CHUNK + offs_t
        t_in = t < L
        dt_in = d_in[:, None] & t_in[None, :]
        nt_in = n_in[:, None] & t_in[None, :]
        _, dt = _load_dt(dt_row + t[None, :] * sdt_l, dt_in, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_row + t[None, :] * su_l, mask=dt_in, other=0.0).to(tl.float32)
        Bt = tl.load(B_row + t[None, :] * sB_l, mask=nt_in, other=0.0).to(tl.float32)
        Ct = tl.load(C_row + t[None, :] * sC_l, mask=nt_in, other=0.0).to(tl.float32)
        a = tl.exp(dt[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, CHUNK)
        x = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, x_cum = tl.associative_scan((a, x), axis=2, combine_fn=_compose)
        hs = a_cum * h[:, :, None] + x_cum  # every step's state
        y = tl.sum(hs * Ct[None, :, :], axis=1)  # (BLOCK_D, CHUNK)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_row + t[None, :] * sz_l, mask=dt_in, other=0.0).to(tl.float32)
            y *= z / (1.0 + tl.exp(-z))  # silu
        tl.store(y_row + t[None, :], y.to(y_ptr.dtype.element_ty), mask=dt_in)
        # Steps past L have a = 1, x = 0: the chunk's last column is the state after step L - 1.
        h = tl.sum(tl.where(offs_t[None, None, :] == CHUNK - 1, hs, 0.0), axis=2)
    tl.store(state_row + n_chunks * N, h, mask=dn_in)


@triton.autotune(
    configs=_configs(),
    key=["Dch", "N", "G", "HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS", "HAS_DLAST"],
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["dB_ptr", "dC_ptr"],  # accumulated with atomics
)
@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, state_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dz_ptr,
    Dch, N, L, G, ch_per_group,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l, sdy_b, sdy_d, sdy_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Every gradient for BLOCK_D channels of group g of batch row b, chunks last to first.

    With gout = dL/dout, s = sigmoid(z), y the output before the gate:
      dz_t   = gout_t y_t s_t (1 + z_t (1 - s_t))          (silu'(z) = s (1 + z (1 - s)))
      gy_t   = gout_t z_t s_t                                (dL/dy)
      g_t    = dL/dh_t = C_t gy_t + a_{t+1} g_{t+1}          (g after the last step: dL/dlast)
    and, from h_t = a_t h_{t-1} + x_t with a_t = exp(dt_t A), x_t = dt_t u_t B_t:
      dC_t[n] = sum_d gy_t h_t[n]            dB_t[n] = sum_d g_t[n] dt_t u_t
      dL/d(dt_t A)[n] = g_t[n] a_t h_{t-1}[n] = g_t[n] (h_t[n] - x_t[n])
      dA[n]  = sum_{b,t} dt_t dL/d(dt_t A)[n]
      ddt_t  = sum_n A[n] dL/d(dt_t A)[n] + u_t sum_n g_t[n] B_t[n]
      du_t   = dt_t sum_n g_t[n] B_t[n] + D gy_t          dD = sum_{b,t} gy_t u_t
      ddelta_t = ddt_t sigmoid(delta_t + bias) (softplus' = sigmoid)    dbias = sum_{b,t} ddelta_t
    Within a chunk the adjoint recurrence is the reversed scan of the maps g -> a_{t+1} g + C_t gy_t
    (a_{t+1} loaded one step ahead); g at the chunk's first step is carried to the previous chunk.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // G
    g = pid % G
    j = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_d = g * ch_per_group + j
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, CHUNK)
    d_in = j < ch_per_group
    n_in = offs_n < N
    dn_in = d_in[:, None] & n_in[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=dn_in, other=0.0)
    A = A.to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=d_in, other=0.0).to(tl.float32) if HAS_BIAS else None
    Dv = tl.load(D_ptr + offs_d, mask=d_in, other=0.0).to(tl.float32) if HAS_D else None
    u_row = u_ptr + b * su_b + offs_d[:, None] * su_d
    dt_row = dt_ptr + b * sdt_b + offs_d[:, None] * sdt_d
    z_row = z_ptr + b * sz_b + offs_d[:, None] * sz_d
    dy_row = dy_ptr + b * sdy_b + offs_d[:, None] * sdy_d
    out_row = (b * Dch + offs_d[:, None]) * L  # du, ddelta, dz: contiguous (batch, D, L)
    B_row = B_ptr + b * sB_b + g * sB_g + offs_n[:, None] * sB_n
    C_row = C_ptr + b * sC_b + g * sC_g + offs_n[:, None] * sC_n
    dBC_row = ((b * G + g) * N + offs_n[:, None]) * L  # dB, dC: contiguous fp32 (batch, G, N, L)
    n_chunks = tl.cdiv(L, CHUNK)
    state_row = state_ptr + (b * Dch + offs_d[:, None]) * ((n_chunks + 1) * N) + offs_n[None, :]
    if HAS_DLAST:
        g_next = tl.load(dlast_ptr + (b * Dch + offs_d[:, None]) * N + offs_n[None, :],
                         mask=dn_in, other=0.0).to(tl.float32)  # fmt: skip
    else:
        g_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        h0 = tl.load(state_row + c * N, mask=dn_in, other=0.0)
        t = c * CHUNK + offs_t
        t_in = t < L
        dt_in = d_in[:, None] & t_in[None, :]
        nt_in = n_in[:, None] & t_in[None, :]
        raw, dt = _load_dt(dt_row + t[None, :] * sdt_l, dt_in, bias, HAS_BIAS, SOFTPLUS)
        next_in = d_in[:, None] & (t + 1 < L)[None, :]
        _, dt_next = _load_dt(dt_row + (t + 1)[None, :] * sdt_l, next_in, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_row + t[None, :] * su_l, mask=dt_in, other=0.0).to(tl.float32)
        Bt = tl.load(B_row + t[None, :] * sB_l, mask=nt_in, other=0.0).to(tl.float32)
        Ct = tl.load(C_row + t[None, :] * sC_l, mask=nt_in, other=0.0).to(tl.float32)
        gy = tl.load(dy_row + t[None, :] * sdy_l, mask=dt_in, other=0.0).to(tl.float32)
        # Recompute the chunk's states from the stored entering state.
        a = tl.exp(dt[:, None, :] * A[:, :, None])
        x = (dt * u)[:, None, :] * Bt[None, :, :]
        a_cum, x_cum = tl.associative_scan((a, x), axis=2, combine_fn=_compose)
        hs = a_cum * h0[:, :, None] + x_cum
        if HAS_Z:
            z = tl.load(z_row + t[None, :] * sz_l, mask=dt_in, other=0.0).to(tl.float32)
            s = 1.0 / (1.0 + tl.exp(-z))
            y = tl.sum(hs * Ct[None, :, :], axis=1)
            if HAS_D:
                y += Dv[:, None] * u
            dz = gy * y * s * (1.0 + z * (1.0 - s))
            tl.store(dz_ptr + out_row + t[None, :], dz.to(dz_ptr.dtype.element_ty), mask=dt_in)
            gy = gy * z * s
        # Adjoint states: the reversed scan of g -> a_{t+1} g + C_t gy_t, then the carry.
        a_next = tl.exp(dt_next[:, None, :] * A[:, :, None])
        a_rev, g_rev = tl.associative_scan(
            (a_next, gy[:, None, :] * Ct[None, :, :]), axis=2, combine_fn=_compose, reverse=True
        )
        gh = g_rev + a_rev * g_next[:, :, None]  # (BLOCK_D, BLOCK_N, CHUNK): dL/dh_t
        tl.atomic_add(dC_ptr + dBC_row + t[None, :], tl.sum(hs * gy[:, None, :], axis=0),
                      mask=nt_in)  # fmt: skip
        tl.atomic_add(dB_ptr + dBC_row + t[None, :], tl.sum(gh * (dt * u)[:, None, :], axis=0),
                      mask=nt_in)  # fmt: skip
        gp = tl.sum(gh * Bt[None, :, :], axis=1)  # dL/d(dt_t u_t), (BLOCK_D, CHUNK)
        g_dtA = gh * (hs - x)  # dL/d(dt_t A)
        dA_acc += tl.sum(g_dtA * dt[:, None, :], axis=2)
        ddt = tl.sum(g_dtA * A[:, :, None], axis=1) + gp * u
        du = gp * dt
        if HAS_D:
            du += Dv[:, None] * gy
            dD_acc += tl.sum(gy * u, axis=1)
        if SOFTPLUS:
            ddt *= 1.0 / (1.0 + tl.exp(-raw))  # softplus' = sigmoid
        ddt = tl.where(dt_in, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + out_row + t[None, :], du.to(du_ptr.dtype.element_ty), mask=dt_in)
        tl.store(ddt_ptr + out_row + t[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=dt_in)
        g_next = tl.sum(tl.where(offs_t[None, None, :] == 0, gh, 0.0), axis=2)
    # Per batch row; the launcher sums over the batch (deterministic, no atomics).
    tl.store(dA_ptr + (b * Dch + offs_d[:, None]) * N + offs_n[None, :], dA_acc, mask=dn_in)
    if HAS_D:
        tl.store(dD_ptr + b * Dch + offs_d, dD_acc, mask=d_in)
    if HAS_BIAS:
        tl.store(dbias_ptr + b * Dch + offs_d, dbias_acc, mask=d_in)


def _as_groups(M: torch.Tensor, batch: int, Dch: int, L: int) -> torch.Tensor:
    """B or C as a (batch, G, N, L) view: (batch, N, L) is one group; a constant (D, N) is one
    group per channel with zero strides over batch and time."""
    if M.dim() == 3:
        return M.unsqueeze(1)
    if M.dim() == 2:
        return M[None, :, :, None].expand(batch, Dch, M.shape[1], L)
    return M


def _grad_of_groups(dM: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """dL/dM from the fp32 (batch, G, N, L) gradient of M's ``_as_groups`` view broadcast to the
    kernel's G groups: summed over the groups (and for a constant M, the batch and time) it feeds."""
    if M.dim() == 2:
        return dM.sum(dim=(0, 3)).to(M.dtype)
    batch, G, N, L = dM.shape
    own = 1 if M.dim() == 3 else M.shape[1]
    dM = dM.view(batch, own, G // own, N, L).sum(2)
    return (dM.squeeze(1) if M.dim() == 3 else dM).to(M.dtype)


def _strides(*tensors: torch.Tensor | None) -> list[int]:
    return [s for t in tensors if t is not None for s in t.stride()]


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """(y (batch, D, L) in u's dtype, entering states (batch, D, L / CHUNK + 1, N) fp32)."""
    batch, Dch, L = u.shape
    N = A.shape[1]
    Bg, Cg = _as_groups(B, batch, Dch, L), _as_groups(C, batch, Dch, L)
    G = max(Bg.shape[1], Cg.shape[1])
    Bg, Cg = Bg.expand(batch, G, N, L), Cg.expand(batch, G, N, L)
    y = torch.empty((batch, Dch, L), device=u.device, dtype=u.dtype)
    states = torch.empty((batch, Dch, triton.cdiv(L, CHUNK) + 1, N), device=u.device,
                         dtype=torch.float32)  # fmt: skip
    zt = u if z is None else z  # a stand-in pointer, never read
    grid = lambda meta: (batch * G, triton.cdiv(Dch // G, meta["BLOCK_D"]))
    _selective_scan_fwd_kernel[grid](
        u, delta, A, Bg, Cg, u if D is None else D, zt, u if delta_bias is None else delta_bias,
        y, states, Dch, N, L, G, Dch // G, *_strides(u, delta, Bg, Cg, zt),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, BLOCK_N=triton.next_power_of_2(N), CHUNK=CHUNK,
    )  # fmt: skip
    return y, states


def _scan_bwd(dy, dlast, states, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its input's dtype (None if absent)."""
    batch, Dch, L = u.shape
    N = A.shape[1]
    Bg, Cg = _as_groups(B, batch, Dch, L), _as_groups(C, batch, Dch, L)
    G = max(Bg.shape[1], Cg.shape[1])
    Bg, Cg = Bg.expand(batch, G, N, L), Cg.expand(batch, G, N, L)
    kw = dict(device=u.device, dtype=torch.float32)
    du = torch.empty((batch, Dch, L), device=u.device, dtype=u.dtype)
    ddelta = torch.empty((batch, Dch, L), device=u.device, dtype=delta.dtype)
    dz = None if z is None else torch.empty((batch, Dch, L), device=u.device, dtype=z.dtype)
    dA = torch.empty((batch, Dch, N), **kw)  # per batch row, summed below
    dB, dC = torch.zeros((batch, G, N, L), **kw), torch.zeros((batch, G, N, L), **kw)
    dD = None if D is None else torch.empty((batch, Dch), **kw)
    dbias = None if delta_bias is None else torch.empty((batch, Dch), **kw)
    zt = u if z is None else z
    grid = lambda meta: (batch * G, triton.cdiv(Dch // G, meta["BLOCK_D"]))
    _selective_scan_bwd_kernel[grid](
        u, delta, A, Bg, Cg, u if D is None else D, zt, u if delta_bias is None else delta_bias,
        dy, states, states if dlast is None else dlast,
        du, ddelta, dA, dB, dC, du if dD is None else dD, du if dbias is None else dbias,
        du if dz is None else dz, Dch, N, L, G, Dch // G, *_strides(u, delta, Bg, Cg, zt, dy),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_DLAST=dlast is not None,
        BLOCK_N=triton.next_power_of_2(N), CHUNK=CHUNK,
    )  # fmt: skip
    return (
        du,
        ddelta,
        dA.sum(0).to(A.dtype),
        _grad_of_groups(dB, B),
        _grad_of_groups(dC, C),
        None if D is None else dD.sum(0).to(D.dtype),
        dz,
        None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
    )


class SelectiveScanFn(torch.autograd.Function):
    """Forward: one scan kernel (keeps the entering state of each chunk); backward: one kernel."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        A, D, delta_bias = (None if t is None else t.contiguous() for t in (A, D, delta_bias))
        y, states = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        if return_last_state:
            return y, states[:, :, -1].clone()  # (batch, D, N) fp32
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        if dy is None:  # only the last state was used
            dy = torch.zeros_like(u)
        if dlast is not None:
            dlast = dlast.to(torch.float32).contiguous()
        grads = _scan_bwd(dy, dlast, states, u, delta, A, B, C, D, z, delta_bias,
                          ctx.delta_softplus)  # fmt: skip
        return (*grads, None, None)


# torch.compile runs the kernels as they are (a graph break), as it does mamba-ssm's CUDA kernels:
# the launchers' Python (autotuning, grids, the autograd.Function) is not traced.
@torch.compiler.disable
def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """mamba-ssm's ``selective_scan_fn`` as a Triton kernel (same arguments and results).

    u, delta, z: (batch, D, L); A: (D, N), real; B, C: (batch, N, L), (batch, G, N, L) or (D, N);
    D, delta_bias: (D,). Any strides; fp32, bf16 or fp16, computed in fp32. Returns out
    (batch, D, L) in u's dtype, and with ``return_last_state`` also the state after the last
    step, (batch, D, N) fp32 (differentiable here, unlike in mamba-ssm). Differentiable in every
    tensor.
    """
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must be (batch, D, L), got {tuple(u.shape)}, "
                         f"{tuple(delta.shape)}")  # fmt: skip
    batch, Dch, L = u.shape
    if A.is_complex() or A.dim() != 2 or A.shape[0] != Dch:
        raise ValueError(f"A must be a real ({Dch}, N) tensor, got {A.dtype} {tuple(A.shape)}")
    N = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        ok = (
            (M.dim() == 2 and M.shape == (Dch, N))
            or (M.dim() == 3 and M.shape == (batch, N, L))
            or (M.dim() == 4 and M.shape[0::2] == (batch, N) and M.shape[3] == L
                and M.shape[1] >= 1 and Dch % M.shape[1] == 0)
        )  # fmt: skip
        if not ok:
            raise ValueError(f"{name} must be ({batch}, {N}, {L}), ({batch}, G, {N}, {L}) with G "
                             f"dividing {Dch}, or ({Dch}, {N}); got {tuple(M.shape)}")  # fmt: skip
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same groups, got {B.shape[1]} and {C.shape[1]}")
    if {B.dim(), C.dim()} == {2, 4}:
        raise ValueError("a constant B or C cannot be combined with a grouped one")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must match u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (Dch,):
            raise ValueError(f"{name} must be ({Dch},), got {tuple(v.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(t.dtype not in _DTYPES for t in tensors):
        raise TypeError(f"the selective scan kernel takes float32/bfloat16/float16 tensors, got "
                        f"{[t.dtype for t in tensors]}")  # fmt: skip
    if any(t.device != u.device for t in tensors):
        raise RuntimeError("selective_scan_fn: all tensors must be on one device")
    if u.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"the Triton selective scan needs CUDA tensors (got {u.device.type}); on CPU set "
            "TRITON_INTERPRET=1 before importing triton, or use the PyTorch scan"
        )
    return SelectiveScanFn.apply(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )
