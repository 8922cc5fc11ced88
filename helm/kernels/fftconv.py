"""Hyena's long convolution as a blocked Toeplitz product on tensor cores.

Same signature and semantics as ``helm.ops.fftconv.fftconv_ref``::

    x = u * pregate;   y = postgate * (conv(x, k) + D * x)       u, gates, y: (B, H, L)

causal: k (H, L),      y[t] = sum_{s <= t} k[t - s] x[s]
two-sided: k (H, 2L-1), y[t] = sum_s k[t - s + L - 1] x[s]

Design. Triton has no FFT, so the convolution is computed directly: for channel h it is the matrix
product Y_h (L, B) = T_h (L, L) @ X_h (L, B) with the Toeplitz matrix T_h[t, s] = k_h[t - s (+ L-1)].
A program owns an output tile (BLOCK_P positions x BLOCK_B batch rows) of one channel and loops over
source tiles of BLOCK_Q positions: the Toeplitz tile is gathered straight from k (index arithmetic,
coalesced along t, L1/L2-resident: k_h is at most 64 KiB), the source tile is u * pregate (gate fused
on load), and ``tl.dot`` accumulates in fp32. Causal programs skip the tiles above the diagonal
(about half the work) and start with the heaviest tiles. The skip term is folded into the filter
(k'[lag 0] = k[lag 0] + D: conv(x, k') = conv(x, k) + D x), and the postgate multiplies on store, so
one pass reads u, pregate, postgate and writes y: nothing of size L x L ever exists in memory.

Why not an FFT (Monarch / FlashFFTConv)? The Toeplitz product costs 2 L^2 B H FLOPs (about half
when causal) against O(B H L log L), but it is plain matmul work with everything else fused, and
Hyena's lengths are short. A training step runs 4 products (forward; backward: a recompute for
dpostgate, dx, dk) and moves 18 (B, H, L) tensors through HBM (forward 4, recompute 4, dx 6, dk 4),
against roughly 60-70 for the torch.fft reference (gating, padded fp32 rfft/irfft, complex product,
slicing, skip term, forward and backward). On an H100 (3.35 TB/s; ~600 TFLOP/s bf16 and ~110
TFLOP/s 3xTF32 taken as reachable), B=64, H=768, causal, 64-wide tiles:

    L     FLOP/step  tensor bf16/fp32   memory bf16/fp32   compute bf16/fp32   reference fp32 mem
    444   4.5e10     44 / 87 MB         0.23 / 0.47 ms     0.08 / 0.41 ms      ~1.5 ms
    1024  2.2e11     101 / 201 MB       0.54 / 1.08 ms     0.37 / 2.0 ms       ~4 ms

so bf16 is memory-bound (expected >= 4x over the reference) and fp32 near balance at L=444 (~3x)
and compute-bound at L=1024 (~2x; ``FP32_DOT_PRECISION = "tf32"`` halves that at 1e-3 accuracy).
Two-sided filters double the FLOPs. The quadratic term overtakes the FFT's memory traffic at
L ~ 4-8k (at L=8192 bf16 about even, fp32 slower): the kernel stays correct with bounded memory
there, and a Monarch-FFT path would be the second strategy for very long filters. These are
estimates: the measurements come from helm/kernels/bench/bench_fftconv.py.

Precision: operands are rounded to the input dtype for the tensor cores when u is bf16/fp16 (x = u *
pregate is formed in fp32 first) and products accumulate in fp32; fp32 inputs use 3xTF32
(``FP32_DOT_PRECISION``), accurate to about fp32 rounding. The triton interpreter multiplies bf16
dot operands as raw integers, so under TRITON_INTERPRET the rounded operands are widened to fp32
before ``tl.dot`` (the same products, exactly).

Backward (derivation in ``FFTConvFunction.backward``): dx = T^T g is the same tile loop with the lag
reversed (anti-causal for a causal filter); dk is a per-channel cross-correlation reduced over the
batch, computed by a second tensor-core kernel that writes every filter tap once (deterministic, no
atomics; the batch is folded into the matmul's reduction dimension, so M = 64-128 lags per tile:
wgmma-sized on Hopper); dD is dk at lag 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helm.kernels.interpreter import fix_loop_bounds

_INTERPRET = triton.knobs.runtime.interpret  # the same switch that made the kernels below
fix_loop_bounds()  # program-id-dependent trip counts under Triton < 3.7's interpreter
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# fp32 inputs: "tf32x3" keeps fp32-level accuracy on tensor cores; "tf32" is ~2x faster and
# ~1e-3 accurate; "ieee" is exact but runs on CUDA cores.
FP32_DOT_PRECISION = "tf32x3"


# Where each tile shape builds for an H100 (sm_90) without spilling registers and within its 227 KB
# of shared memory, by operand kind ("16bit": bf16/fp16, "fp32") and Triton release ("3.6": up to
# 3.8, "3.9": 3.9 and later), read off `python -m helm.kernels.bench.compile_report`
# (bench/results/compile_sm90_triton3.6.json, ..._triton3.9.json). The autotuner never compiles a
# tile outside its row for the case at hand: each such compile costs seconds and yields a slow
# kernel. Measured with bf16; fp16 shares the 16-bit rows.
_EVERYWHERE = frozenset({("16bit", "3.6"), ("16bit", "3.9"), ("fp32", "3.6"), ("fp32", "3.9")})
_SIXTEEN = frozenset({("16bit", "3.6"), ("16bit", "3.9")})
# (BLOCK_P, BLOCK_Q, BLOCK_B, num_warps), num_stages 3: the forward and dx kernels (dx is the
# stricter; both share the list)
_CONV_TILES = {
    (64, 64, 32, 4): _EVERYWHERE,
    (64, 64, 32, 8): _EVERYWHERE,
    (128, 64, 32, 8): _EVERYWHERE,
    (64, 64, 64, 8): _SIXTEEN | {("fp32", "3.9")},
    (128, 64, 64, 8): frozenset({("16bit", "3.9")}),
}
# (BLOCK_R, BLOCK_S, BLOCK_K, num_warps, num_stages): the dk kernel. BLOCK_K 64 with 8 warps keeps
# its gathered Hankel tiles in registers; (16, 64, 64) reaches wgmma with Triton 3.6 as well.
_DK_TILES = {
    (16, 64, 64, 8, 2): _SIXTEEN | {("fp32", "3.9")},
    (16, 64, 64, 8, 3): _SIXTEEN,
    (8, 64, 64, 8, 3): _EVERYWHERE,
    (8, 64, 128, 8, 2): _SIXTEEN,
    (4, 64, 64, 8, 2): frozenset({("fp32", "3.6")}),
}


def _release() -> str:
    """The Triton release family of the tables above."""
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return "3.9" if (major, minor) >= (3, 9) else "3.6"


def _builds(rows: dict, key: tuple, op_dtype) -> bool:
    kind = "fp32" if op_dtype == tl.float32 else "16bit"
    return _INTERPRET or (kind, _release()) in rows.get(key, ())


def _conv_configs() -> list[triton.Config]:
    """Tile shapes of the Toeplitz-product kernels; one config when interpreting."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_P": 16, "BLOCK_Q": 16, "BLOCK_B": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_P": p, "BLOCK_Q": q, "BLOCK_B": b}, num_warps=w, num_stages=3)
        for p, q, b, w in _CONV_TILES
    ]


def _conv_key(c: triton.Config) -> tuple:
    return c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_B"], c.num_warps


def _prune_conv(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the tiles that build well for this dtype and Triton (``_CONV_TILES``) and drop tiles
    wider than the problem (all but the smallest would only compute padding)."""
    configs = [c for c in configs if _builds(_CONV_TILES, _conv_key(c), kwargs["OP_DTYPE"])]
    max_p = max(16, triton.next_power_of_2(named_args["L"]))
    max_b = max(16, triton.next_power_of_2(named_args["B"]))
    kept = [c for c in configs if c.kwargs["BLOCK_P"] <= max_p and c.kwargs["BLOCK_B"] <= max_b]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_B"])]


def _dk_configs() -> list[triton.Config]:
    """BLOCK_R lag tiles of BLOCK_S lags per program, BLOCK_K // BLOCK_S batch rows per matmul
    (BLOCK_S >= 64: the M of a Hopper wgmma); one config when interpreting."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_R": 16, "BLOCK_S": 16, "BLOCK_K": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_R": r, "BLOCK_S": s, "BLOCK_K": k}, num_warps=w, num_stages=n)
        for r, s, k, w, n in _DK_TILES
    ]


def _dk_key(c: triton.Config) -> tuple:
    return c.kwargs["BLOCK_R"], c.kwargs["BLOCK_S"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages


def _prune_dk(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the tiles that build well for this dtype and Triton (``_DK_TILES``), lag blocks no
    wider than the filter and batch folds no wider than the batch (wider ones compute only
    padding)."""
    configs = [c for c in configs if _builds(_DK_TILES, _dk_key(c), kwargs["OP_DTYPE"])]
    max_lags = max(512, triton.next_power_of_2(named_args["Lk"]))
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_S"] <= max_lags
        and c.kwargs["BLOCK_K"] // c.kwargs["BLOCK_S"] <= max(1, named_args["B"])
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_S"])]


@triton.jit
def _mma(a, b, acc, OP_DTYPE: tl.constexpr, EMULATE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b with operands rounded to OP_DTYPE and fp32 accumulation."""
    a = a.to(OP_DTYPE)
    b = b.to(OP_DTYPE)
    if EMULATE_DOT:  # interpreter: same rounded operands, multiplied in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _toeplitz_tile(
    k_row, x_row, sx_b, sx_l, g_row, sg_b, sg_l, p0, offs_b, B, L,
    TRANSPOSE: tl.constexpr, BIDIR: tl.constexpr, HAS_GATE: tl.constexpr,
    OP_DTYPE: tl.constexpr, EMULATE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """out[i, c] = sum_q k[lag(p0 + i, q)] * (x * g)[offs_b[c], q]: a (BLOCK_P, BLOCK_B) fp32 tile.

    lag(p, q) = p - q, or q - p when TRANSPOSE (the product with T^T); k index lag + L - 1 when
    BIDIR, else lag itself with negative lags zero (causal, or anti-causal when TRANSPOSE).
    """
    offs_p = p0 + tl.arange(0, BLOCK_P)
    p_in = offs_p < L
    b_in = offs_b < B
    if BIDIR:
        q_lo = 0
        q_hi = L
    elif TRANSPOSE:  # anti-causal: sources q >= p
        q_lo = p0
        q_hi = L
    else:  # causal: sources q <= p, tiles above the diagonal skipped
        q_lo = 0
        q_hi = tl.minimum(p0 + BLOCK_P, L)
    acc = tl.zeros((BLOCK_P, BLOCK_B), dtype=tl.float32)
    for q0 in range(q_lo, q_hi, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        q_in = offs_q < L
        if TRANSPOSE:
            lag = offs_q[None, :] - offs_p[:, None]
        else:
            lag = offs_p[:, None] - offs_q[None, :]
        valid = p_in[:, None] & q_in[None, :]
        if BIDIR:
            kidx = lag + (L - 1)
        else:
            valid = valid & (lag >= 0)
            kidx = lag
        t = tl.load(k_row + kidx, mask=valid, other=0.0)  # Toeplitz tile (BLOCK_P, BLOCK_Q)
        x_mask = q_in[:, None] & b_in[None, :]
        x = tl.load(x_row + offs_b[None, :] * sx_b + offs_q[:, None] * sx_l, mask=x_mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_GATE:
            g = tl.load(
                g_row + offs_b[None, :] * sg_b + offs_q[:, None] * sg_l, mask=x_mask, other=0.0
            )
            x = x * g.to(tl.float32)
        acc = _mma(t, x, acc, OP_DTYPE, EMULATE_DOT, PRECISION)
    return acc


@triton.autotune(
    configs=_conv_configs(),
    key=["L", "B", "BIDIR", "HAS_PRE", "HAS_POST", "OP_DTYPE"],
    prune_configs_by={"early_config_prune": _prune_conv},
)
@triton.jit
def _fftconv_fwd_kernel(
    u_ptr, pre_ptr, post_ptr, k_ptr, y_ptr, B, L, Lk,
    su_b, su_h, su_l, spr_b, spr_h, spr_l, spo_b, spo_h, spo_l, sy_b, sy_h,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, BIDIR: tl.constexpr,
    OP_DTYPE: tl.constexpr, EMULATE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """y[b, h, p] = post[b, h, p] * sum_q k'[h, lag] u[b, h, q] pre[b, h, q] for one output tile."""
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    # Causal tiles late in the sequence loop over the most source tiles: launch them first.
    p0 = (tl.num_programs(0) - 1 - pid_p) * BLOCK_P
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    acc = _toeplitz_tile(
        k_ptr + h * Lk, u_ptr + h * su_h, su_b, su_l, pre_ptr + h * spr_h, spr_b, spr_l,
        p0, offs_b, B, L, False, BIDIR, HAS_PRE, OP_DTYPE, EMULATE_DOT, PRECISION,
        BLOCK_P, BLOCK_Q, BLOCK_B,
    )  # fmt: skip
    offs_p = p0 + tl.arange(0, BLOCK_P)
    mask = (offs_p < L)[:, None] & (offs_b < B)[None, :]
    if HAS_POST:
        post_ptrs = post_ptr + h * spo_h + offs_b[None, :] * spo_b + offs_p[:, None] * spo_l
        acc = acc * tl.load(post_ptrs, mask=mask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + h * sy_h + offs_b[None, :] * sy_b + offs_p[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_conv_configs(),
    key=["L", "B", "BIDIR", "HAS_PRE", "HAS_POST", "OP_DTYPE"],
    prune_configs_by={"early_config_prune": _prune_conv},
)
@triton.jit
def _fftconv_bwd_dx_kernel(
    dy_ptr, post_ptr, u_ptr, pre_ptr, k_ptr, du_ptr, dpre_ptr, B, L, Lk,
    sdy_b, sdy_h, sdy_l, spo_b, spo_h, spo_l, su_b, su_h, su_l, spr_b, spr_h, spr_l, sdu_b, sdu_h,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, BIDIR: tl.constexpr,
    OP_DTYPE: tl.constexpr, EMULATE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """dx = T'^T (dy * post) for one tile of source positions; du = dx * pre, dpre = dx * u."""
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    p0 = pid_p * BLOCK_P  # anti-causal: early tiles have the most work and launch first
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    dx = _toeplitz_tile(
        k_ptr + h * Lk, dy_ptr + h * sdy_h, sdy_b, sdy_l, post_ptr + h * spo_h, spo_b, spo_l,
        p0, offs_b, B, L, True, BIDIR, HAS_POST, OP_DTYPE, EMULATE_DOT, PRECISION,
        BLOCK_P, BLOCK_Q, BLOCK_B,
    )  # fmt: skip
    offs_p = p0 + tl.arange(0, BLOCK_P)
    mask = (offs_p < L)[:, None] & (offs_b < B)[None, :]
    out = h * sdu_h + offs_b[None, :] * sdu_b + offs_p[:, None]
    if HAS_PRE:
        pre = tl.load(pre_ptr + h * spr_h + offs_b[None, :] * spr_b + offs_p[:, None] * spr_l,
                      mask=mask, other=0.0).to(tl.float32)  # fmt: skip
        u = tl.load(u_ptr + h * su_h + offs_b[None, :] * su_b + offs_p[:, None] * su_l,
                    mask=mask, other=0.0).to(tl.float32)  # fmt: skip
        tl.store(dpre_ptr + out, (dx * u).to(dpre_ptr.dtype.element_ty), mask=mask)
        dx = dx * pre
    tl.store(du_ptr + out, dx.to(du_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_dk_configs(),
    key=["L", "B", "BIDIR", "HAS_PRE", "HAS_POST", "OP_DTYPE"],
    prune_configs_by={"early_config_prune": _prune_dk},
)
@triton.jit
def _fftconv_bwd_dk_kernel(
    dy_ptr, post_ptr, u_ptr, pre_ptr, dk_ptr, B, L, Lk,
    sdy_b, sdy_h, sdy_l, spo_b, spo_h, spo_l, su_b, su_h, su_l, spr_b, spr_h, spr_l,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, BIDIR: tl.constexpr,
    OP_DTYPE: tl.constexpr, EMULATE_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dk[h, i] = sum_b sum_s x[b, s] g[b, s + lag(i)] for BLOCK_R tiles of BLOCK_S filter taps.

    Column r of the program's accumulator holds taps r*BS .. r*BS + BS - 1 (lags l_r + d, with
    l_r = r*BS, minus L-1 when two-sided). Stepping a window start t0 by BS, column r pairs the
    source tile s = t0 - l_r + j with targets t = t0 + j + d (j, d < BS):
        acc[d, r] += sum_b sum_j g[b, t0 + j + d] * x[b, t0 - l_r + j]
    so every column shares the same Hankel tile of g (BS x BS, built from g[t0 : t0 + 2 BS - 1]).
    The batch is folded into the reduction: k = (b, j) runs over BLOCK_K // BS batch rows at once,
    and the update is one (BS x BLOCK_K) @ (BLOCK_K x BLOCK_R) matmul, M = BS lags (64 or more:
    wgmma-sized on Hopper), N = BLOCK_R lag tiles. Over all windows, column r sees every source
    tile once, hence every (s, t = s + lag) pair once: each tap is written by exactly one program,
    without atomics.
    """
    pid_r = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    r0 = pid_r * BLOCK_R
    cols = r0 + tl.arange(0, BLOCK_R)  # lag tiles
    d = tl.arange(0, BLOCK_S)  # lag within a tile
    k = tl.arange(0, BLOCK_K)
    kb = (k // BLOCK_S).to(tl.int64)  # batch row of reduction index k
    kj = k % BLOCK_S  # window position of reduction index k
    if BIDIR:
        lag_off = 1 - L
    else:
        lag_off = 0
    lag_r = cols * BLOCK_S + lag_off  # first lag of each tile
    # Windows with some target t in [0, L) and some source in [0, L) for some tile of the block.
    t0_lo = tl.maximum(2 - 2 * BLOCK_S, r0 * BLOCK_S + lag_off + 1 - BLOCK_S)
    t0_hi = tl.minimum(L - 1, L - 1 + (r0 + BLOCK_R - 1) * BLOCK_S + lag_off)
    u_row = u_ptr + h * su_h
    pre_row = pre_ptr + h * spr_h
    dy_row = dy_ptr + h * sdy_h
    post_row = post_ptr + h * spo_h
    acc = tl.zeros((BLOCK_S, BLOCK_R), dtype=tl.float32)
    for t0 in range(t0_lo, t0_hi + 1, BLOCK_S):
        offs_s = t0 - lag_r[None, :] + kj[:, None]  # (BLOCK_K, BLOCK_R) sources
        offs_t = t0 + kj[None, :] + d[:, None]  # (BLOCK_S, BLOCK_K) Hankel targets
        s_in = (offs_s >= 0) & (offs_s < L)
        t_in = (offs_t >= 0) & (offs_t < L)
        for b0 in range(0, B, BLOCK_K // BLOCK_S):
            rb = b0 + kb  # (BLOCK_K,) batch rows
            xs_mask = s_in & (rb < B)[:, None]
            x = tl.load(u_row + rb[:, None] * su_b + offs_s * su_l, mask=xs_mask, other=0.0)
            x = x.to(tl.float32)
            if HAS_PRE:
                x_pre = tl.load(pre_row + rb[:, None] * spr_b + offs_s * spr_l, mask=xs_mask,
                                other=0.0)  # fmt: skip
                x = x * x_pre.to(tl.float32)
            gt_mask = t_in & (rb < B)[None, :]
            g = tl.load(dy_row + rb[None, :] * sdy_b + offs_t * sdy_l, mask=gt_mask, other=0.0)
            g = g.to(tl.float32)
            if HAS_POST:
                g_post = tl.load(post_row + rb[None, :] * spo_b + offs_t * spo_l, mask=gt_mask,
                                 other=0.0)  # fmt: skip
                g = g * g_post.to(tl.float32)
            acc = _mma(g, x, acc, OP_DTYPE, EMULATE_DOT, PRECISION)
    idx = cols[None, :] * BLOCK_S + d[:, None]  # (BLOCK_S, BLOCK_R) taps
    tl.store(dk_ptr + h * Lk + idx, acc, mask=idx < Lk)


def _dot_args(dtype: torch.dtype) -> dict:
    """Operand dtype and precision of tl.dot for inputs of ``dtype`` (fp32 accumulation always)."""
    if dtype == torch.float32:
        return {"OP_DTYPE": tl.float32, "EMULATE_DOT": False, "PRECISION": FP32_DOT_PRECISION}
    # 16-bit operands: the precision flag applies to fp32 operands only (the interpreter's widened
    # operands are multiplied exactly whatever it says).
    return {"OP_DTYPE": _TL_DTYPES[dtype], "EMULATE_DOT": _INTERPRET, "PRECISION": None}


def _gate(gate: torch.Tensor | None, u: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A gate and its strides; a missing gate is stood in for by u (never read: HAS_* is False)."""
    t = u if gate is None else gate
    return t, t.stride()


def _conv_fwd(
    u: torch.Tensor, pre: torch.Tensor | None, post: torch.Tensor | None, k_eff: torch.Tensor,
    bidirectional: bool, out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """post * conv(u * pre, k_eff): (B, H, L) in ``out_dtype``; k_eff (H, Lk) fp32 contiguous."""
    B, H, L = u.shape
    y = torch.empty((B, H, L), device=u.device, dtype=out_dtype)
    pre_t, spr = _gate(pre, u)
    post_t, spo = _gate(post, u)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_P"]), triton.cdiv(B, meta["BLOCK_B"]), H)
    _fftconv_fwd_kernel[grid](
        u, pre_t, post_t, k_eff, y, B, L, k_eff.shape[1], *u.stride(), *spr, *spo,
        y.stride(0), y.stride(1), HAS_PRE=pre is not None, HAS_POST=post is not None,
        BIDIR=bidirectional, **_dot_args(u.dtype),
    )  # fmt: skip
    return y


def _conv_bwd_dx(
    dy: torch.Tensor, post: torch.Tensor | None, u: torch.Tensor, pre: torch.Tensor | None,
    k_eff: torch.Tensor, bidirectional: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(dL/du, dL/dpregate) from dy: the transposed Toeplitz product and the pregate split."""
    B, H, L = u.shape
    du = torch.empty((B, H, L), device=u.device, dtype=u.dtype)
    dpre = None if pre is None else torch.empty((B, H, L), device=u.device, dtype=pre.dtype)
    pre_t, spr = _gate(pre, u)
    post_t, spo = _gate(post, u)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_P"]), triton.cdiv(B, meta["BLOCK_B"]), H)
    _fftconv_bwd_dx_kernel[grid](
        dy, post_t, u, pre_t, k_eff, du, du if dpre is None else dpre, B, L, k_eff.shape[1],
        *dy.stride(), *spo, *u.stride(), *spr, du.stride(0), du.stride(1),
        HAS_PRE=pre is not None, HAS_POST=post is not None, BIDIR=bidirectional,
        **_dot_args(u.dtype),
    )  # fmt: skip
    return du, dpre


def _conv_bwd_dk(
    dy: torch.Tensor, post: torch.Tensor | None, u: torch.Tensor, pre: torch.Tensor | None,
    Lk: int, bidirectional: bool,
) -> torch.Tensor:  # fmt: skip
    """dL/dk' (H, Lk) in fp32: the batch-reduced cross-correlation of dy * post with u * pre."""
    B, H, L = u.shape
    dk = torch.empty((H, Lk), device=u.device, dtype=torch.float32)
    pre_t, spr = _gate(pre, u)
    post_t, spo = _gate(post, u)
    grid = lambda meta: (triton.cdiv(triton.cdiv(Lk, meta["BLOCK_S"]), meta["BLOCK_R"]), H)
    _fftconv_bwd_dk_kernel[grid](
        dy, post_t, u, pre_t, dk, B, L, Lk, *dy.stride(), *spo, *u.stride(), *spr,
        HAS_PRE=pre is not None, HAS_POST=post is not None, BIDIR=bidirectional,
        **_dot_args(u.dtype),
    )  # fmt: skip
    return dk


def _lag0(L: int, bidirectional: bool) -> int:
    """Index of lag 0 in the filter layout."""
    return L - 1 if bidirectional else 0


def _fold_skip(k: torch.Tensor, D: torch.Tensor, L: int, bidirectional: bool) -> torch.Tensor:
    """k' = k with D added at lag 0, fp32 contiguous: conv(x, k') = conv(x, k) + D x."""
    k_eff = k.to(torch.float32, copy=True).contiguous()
    k_eff[:, _lag0(L, bidirectional)] += D.float()
    return k_eff


def _along_l(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` (B, H, L) with rows contiguous along L (a copy only where they are not)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


class FFTConvFunction(torch.autograd.Function):
    """Autograd wrapper: forward one Toeplitz product; backward three (see below)."""

    @staticmethod
    def forward(ctx, u, k, D, pregate, postgate, bidirectional):
        # The tiles read along L: unit stride there makes the loads coalesced. Hyena's u and gates
        # are views of one (B, L, 3H) projection (stride 3H along L), so one copy each is cheaper
        # than the strided reads every tile would repeat.
        u, pregate, postgate = (_along_l(t) for t in (u, pregate, postgate))
        k_eff = _fold_skip(k, D, u.shape[-1], bidirectional)
        y = _conv_fwd(u, pregate, postgate, k_eff, bidirectional, u.dtype)
        ctx.save_for_backward(u, k_eff, pregate, postgate)
        ctx.bidirectional = bidirectional
        ctx.k_dtype = k.dtype
        ctx.d_dtype = D.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        # With x = u * pre, z = conv(x, k') (k' = k + D at lag 0), y = post * z, and dy = dL/dy:
        #   dL/dpost = dy * z                     -> z recomputed by the forward kernel, post := dy
        #   g = dL/dz = dy * post                 -> formed on load, never stored
        #   dL/dx[s] = sum_t k'[t - s] g[t]       -> T'^T g, the tile loop with the lag reversed
        #   dL/du = dL/dx * pre,  dL/dpre = dL/dx * u
        #   dL/dk'[lag] = sum_b sum_t g[b, t] x[b, t - lag]   -> the dk kernel
        #   dL/dk = dL/dk',  dL/dD = dL/dk'[lag 0]  (k' depends on D only through its lag-0 tap)
        u, k_eff, pre, post = ctx.saved_tensors
        # Hyena's dy arrives transposed (strides (L*H, 1, H), from out_proj(y.transpose(1, 2)))
        # and y.sum()'s is expanded (stride 0): unit stride along L, as in the forward.
        dy = _along_l(dy)
        bidir = ctx.bidirectional
        need_u, need_k, need_d, need_pre, need_post, _ = ctx.needs_input_grad
        du = dk = dD = dpre = dpost = None
        if post is not None and need_post:
            dpost = _conv_fwd(u, pre, dy, k_eff, bidir, post.dtype)
        if need_u or need_pre:
            du, dpre = _conv_bwd_dx(dy, post, u, pre, k_eff, bidir)
        if need_k or need_d:
            dk32 = _conv_bwd_dk(dy, post, u, pre, k_eff.shape[1], bidir)
            dk = dk32.to(ctx.k_dtype) if need_k else None
            lag0 = dk32[:, _lag0(u.shape[-1], bidir)]
            dD = lag0.to(ctx.d_dtype, copy=True) if need_d else None  # not a view of dk
        return du, dk, dD, dpre, dpost, None


def fftconv_triton(
    u: torch.Tensor,
    k: torch.Tensor,
    D: torch.Tensor,
    pregate: torch.Tensor | None = None,
    postgate: torch.Tensor | None = None,
    bidirectional: bool = False,
) -> torch.Tensor:
    """Triton twin of ``helm.ops.fftconv.fftconv_ref``: ``postgate * (conv(u * pregate, k) + D u
    pregate)``. u, gates: (B, H, L) fp32/bf16/fp16, any strides; k: (H, L), or (H, 2L - 1) when
    ``bidirectional``; D: (H,). Returns (B, H, L) in u's dtype; differentiable in every tensor."""
    if u.dim() != 3:
        raise ValueError(f"u must be (B, H, L), got shape {tuple(u.shape)}")
    B, H, L = u.shape
    expected = 2 * L - 1 if bidirectional else L
    if k.shape[-1] != expected:
        raise ValueError(f"filter length {k.shape[-1]} does not match {expected} for L={L}")
    if k.shape != (H, expected) or D.shape != (H,):
        raise ValueError(f"k must be ({H}, {expected}) and D ({H},); got {tuple(k.shape)}, "
                         f"{tuple(D.shape)}")  # fmt: skip
    for name, gate in (("pregate", pregate), ("postgate", postgate)):
        if gate is not None and gate.shape != u.shape:
            raise ValueError(
                f"{name} must match u's shape {tuple(u.shape)}, got {tuple(gate.shape)}"
            )
    tensors = [t for t in (u, k, D, pregate, postgate) if t is not None]
    if any(t.dtype not in _DTYPES for t in tensors):
        raise TypeError(f"the fftconv kernel takes float32/bfloat16/float16 tensors, got "
                        f"{[t.dtype for t in tensors]}; use impl='torch' for others")  # fmt: skip
    if any(t.device != u.device for t in tensors):
        raise RuntimeError("fftconv: all tensors must be on one device")
    if u.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"the Triton fftconv kernel needs CUDA tensors (got {u.device.type}); on CPU set "
            "TRITON_INTERPRET=1 before importing triton, or use impl='torch'"
        )
    return FFTConvFunction.apply(u, k, D, pregate, postgate, bidirectional)
