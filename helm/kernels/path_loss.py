"""Fused path loss: XE, HXE, soft labels and the amino-acid losses in one Triton kernel.

Every loss over the codon tree is one formula over per-target tables (``path_loss_ref`` in
``helm/ops/path_loss.py`` is the PyTorch twin and the test oracle)::

    L(z, y) = const[y] + sum_s coef[y, s] * lse_s - sum_c soft[y, c] * z_c
    lse_s   = log sum_{c < V: anc[c, s] == anc[y, s]} exp(z_c)        (slots with anc[y, s] >= 0)

Gradient::

    d lse_s / d z_c = [anc[c, s] == anc[y, s]] * exp(z_c - lse_s)     (softmax restricted to group s)
    dL / d z_c      = sum_s coef[y, s] * [c in group s] * exp(z_c - lse_s) - soft[y, c]

Numerical range: each group s is reduced around its own maximum m_s (``lse_s = m_s + log d_s``,
``d_s = sum_{c in s} exp(z_c - m_s) >= 1``), so every exponent is <= 0 and the result is finite
wherever the reference's ``logsumexp`` is (logits 1e4 apart included; plain XE equals
``F.cross_entropy`` there). That costs one exp per logit and slot (S <= 5 for codons), cheap next to
the memory traffic at V = 69. Padded columns (c >= V) get no probability and zero gradient; ignored
rows get zero loss and zero gradient; a target outside [0, V) that is not ``ignore_index`` gives a
NaN row.

Passes: the forward pass reads the logits once and writes one fp32 loss per row. The backward pass
runs the same kernel in gradient mode: it re-reads the logits, recomputes the group sums and writes
the gradient already multiplied by ``grad_output`` (read from device memory: no host sync) and by
1 / num_valid for the mean. Logits are read twice and the gradient written once, with no scaling
pass over it and no gradient buffer held between forward and backward.

Work split: one program takes BLOCK_N rows (BLOCK_N * BLOCK_V ~ TILE logits, autotuned). V, the
padded width Vp and the row stride are compile-time constants, so the masks are known and a row of
72 bf16 logits (144 bytes) is read with 16-byte vector loads. When the padded row fits one block
(Vp <= MAX_BLOCK_V) it stays in registers; wider rows loop over column blocks (pass 1 keeps an
online maximum and rescaled sum per slot, pass 2 writes the gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Widest column block held in registers at once; rows with more columns loop over blocks of this
# width with an online max (two passes over the row instead of one).
MAX_BLOCK_V = 2048

_REDUCTIONS = ("mean", "sum", "none")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (TILE, num_warps): the tiles that compile for sm_90 without register spills (wider tiles, and
# 2048 with <= 4 warps, spill to the stack and take 15-150 s each to compile).
AUTOTUNE = ((512, 2), (1024, 4), (1024, 8), (2048, 8))


def _configs() -> list[triton.Config]:
    """TILE = logits per program (BLOCK_N rows x BLOCK_V columns); one config when interpreting."""
    if triton.knobs.runtime.interpret:
        return [triton.Config({"TILE": 512}, num_warps=4)]
    return [triton.Config({"TILE": tile}, num_warps=warps) for tile, warps in AUTOTUNE]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles narrower than one column block (they all mean BLOCK_N = 1): keep the smallest."""
    wide = [c for c in configs if c.kwargs["TILE"] >= kwargs["BLOCK_V"]]
    if wide:
        return wide
    smallest = min(c.kwargs["TILE"] for c in configs)
    return [c for c in configs if c.kwargs["TILE"] == smallest][:1]


@triton.jit
def _slot(anc_ptr, coef_ptr, y, valid, cols, col_in, s, S: tl.constexpr):
    """Membership of columns ``cols`` in the target's slot-s group, and the slot's coefficient.

    Returns member (BLOCK_N, BLOCK_V) bool, on (BLOCK_N,) bool (slot exists for the target) and
    coef (BLOCK_N,) fp32, zero where the slot is off.
    """
    path_s = tl.load(anc_ptr + y * S + s, mask=valid, other=-1)  # (BLOCK_N,) target's ancestor
    on = path_s >= 0
    coef_s = tl.load(coef_ptr + y * S + s, mask=valid, other=0.0).to(tl.float32)
    anc_s = tl.load(anc_ptr + cols * S + s, mask=col_in, other=-2)  # (BLOCK_V,) -2: no node
    member = (anc_s[None, :] == path_s[:, None]) & on[:, None]
    return member, on, tl.where(on, coef_s, 0.0)


@triton.jit
def _column(mat, s_idx, s, other):
    """Column s of a (BLOCK_N, S_BLOCK) per-slot matrix, as (BLOCK_N,)."""
    return tl.max(tl.where(s_idx == s, mat, other), axis=1)


@triton.autotune(
    configs=_configs(),
    key=["V", "Vp", "S", "HAS_SOFT", "COMPUTE_GRAD"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.heuristics({"BLOCK_N": lambda args: max(1, args["TILE"] // args["BLOCK_V"])})
@triton.jit
def _path_loss_kernel(
    logits_ptr,  # (N, Vp) any float dtype; columns contiguous, rows STRIDE apart
    targets_ptr,  # (N,) int
    anc_ptr,  # (V, S) int, contiguous
    coef_ptr,  # (V, S) float, contiguous
    soft_ptr,  # (V, V) float or None
    const_ptr,  # (V,) float or None
    num_valid_ptr,  # () int64: rows with target != ignore_index (read only for the mean)
    grad_out_ptr,  # gradient mode: dL_total/dloss, () or (N,) fp32, stride_go apart (0: scalar)
    stride_go,
    loss_ptr,  # (N,) fp32 out (loss mode)
    grad_ptr,  # (N, Vp) contiguous, logits dtype, out (gradient mode)
    N,
    ignore_index,
    V: tl.constexpr,
    Vp: tl.constexpr,
    STRIDE: tl.constexpr,  # row stride of the logits (Vp when contiguous)
    S: tl.constexpr,
    S_BLOCK: tl.constexpr,  # next power of two >= S
    HAS_SOFT: tl.constexpr,
    HAS_CONST: tl.constexpr,
    MEAN: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,  # False: write the loss rows; True: write the gradient rows
    SINGLE_BLOCK: tl.constexpr,  # BLOCK_V >= Vp: the row stays in registers
    BLOCK_V: tl.constexpr,
    TILE: tl.constexpr,  # autotuned; only sets BLOCK_N
    BLOCK_N: tl.constexpr,
):
    """BLOCK_N rows per program: their loss rows, or (COMPUTE_GRAD) their scaled gradient rows."""
    pid = tl.program_id(0).to(tl.int64)  # int64 before it meets a stride
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    y = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
    valid = row_in & (y != ignore_index)
    bad = valid & ((y < 0) | (y >= V))  # out-of-range target: NaN row, memory stays in bounds
    y = tl.where(valid & ~bad, y, 0)
    row_ptrs = logits_ptr + rows[:, None] * STRIDE
    if MEAN:
        scale = 1.0 / tl.maximum(tl.load(num_valid_ptr), 1).to(tl.float32)
    else:
        scale = 1.0
    if COMPUTE_GRAD:  # fold grad_output into the one write of the gradient
        go = tl.load(grad_out_ptr + rows * stride_go, mask=row_in, other=0.0).to(tl.float32)
        row_scale = tl.where(valid, go * scale, 0.0)
        grad_ptrs = grad_ptr + rows[:, None] * Vp
    s_idx = tl.arange(0, S_BLOCK)[None, :]

    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_V)
        col_in = cols < V
        load_mask = valid[:, None] & col_in[None, :]
        z = tl.load(row_ptrs + cols[None, :], mask=load_mask, other=float("-inf")).to(tl.float32)
        loss = tl.zeros([BLOCK_N], dtype=tl.float32)
        g = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for s in tl.static_range(S):
            member, on, coef_s = _slot(anc_ptr, coef_ptr, y, valid, cols, col_in, s, S)
            m_s = tl.where(on, tl.max(tl.where(member, z, float("-inf")), axis=1), 0.0)
            p = tl.exp(tl.where(member, z - m_s[:, None], float("-inf")))  # exponents <= 0
            d_s = tl.where(on, tl.sum(p, axis=1), 1.0)  # >= 1: the group's max contributes 1
            if COMPUTE_GRAD:
                g += p * (coef_s / d_s)[:, None]  # coef_s * exp(z_c - lse_s) on the group
            else:
                loss += coef_s * (m_s + tl.log(d_s))  # coef_s * lse_s
        if HAS_SOFT:
            q = tl.load(soft_ptr + y[:, None] * V + cols[None, :], mask=load_mask, other=0.0)
            q = q.to(tl.float32)
            if COMPUTE_GRAD:
                g -= q
            else:
                loss -= tl.sum(q * tl.where(load_mask, z, 0.0), axis=1)
        if COMPUTE_GRAD:
            g = tl.where(bad[:, None], float("nan"), g * row_scale[:, None])
            store_mask = row_in[:, None] & (cols < Vp)[None, :]
            tl.store(grad_ptrs + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=store_mask)
    else:
        # Pass 1: per slot, an online group max M[:, s] and the sum D[:, s] of exp(z - M[:, s]),
        # rescaled whenever the max grows.
        M = tl.full([BLOCK_N, S_BLOCK], float("-inf"), dtype=tl.float32)
        D = tl.zeros([BLOCK_N, S_BLOCK], dtype=tl.float32)
        zq = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_c soft[y, c] * z_c
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            col_in = cols < V
            load_mask = valid[:, None] & col_in[None, :]
            z = tl.load(row_ptrs + cols[None, :], mask=load_mask, other=float("-inf"))
            z = z.to(tl.float32)
            for s in tl.static_range(S):
                member, on, coef_s = _slot(anc_ptr, coef_ptr, y, valid, cols, col_in, s, S)
                m_old = _column(M, s_idx, s, float("-inf"))
                m_new = tl.maximum(m_old, tl.max(tl.where(member, z, float("-inf")), axis=1))
                seen = m_new > float("-inf")  # the group has a member so far
                m_ref = tl.where(seen, m_new, 0.0)
                d = _column(D, s_idx, s, 0.0) * tl.where(seen, tl.exp(m_old - m_ref), 0.0)
                d += tl.sum(tl.exp(tl.where(member, z - m_ref[:, None], float("-inf"))), axis=1)
                M = tl.where(s_idx == s, m_new[:, None], M)
                D = tl.where(s_idx == s, d[:, None], D)
            if HAS_SOFT and not COMPUTE_GRAD:
                q = tl.load(soft_ptr + y[:, None] * V + cols[None, :], mask=load_mask, other=0.0)
                zq += tl.sum(q.to(tl.float32) * tl.where(load_mask, z, 0.0), axis=1)
        # lse_s per slot, 0 where the slot is off.
        LSE = tl.zeros([BLOCK_N, S_BLOCK], dtype=tl.float32)
        loss = -zq
        for s in tl.static_range(S):
            path_s = tl.load(anc_ptr + y * S + s, mask=valid, other=-1)
            on = path_s >= 0
            coef_s = tl.load(coef_ptr + y * S + s, mask=valid, other=0.0).to(tl.float32)
            coef_s = tl.where(on, coef_s, 0.0)
            m_s = tl.where(on, _column(M, s_idx, s, float("-inf")), 0.0)
            lse_s = m_s + tl.log(tl.where(on, _column(D, s_idx, s, 0.0), 1.0))
            loss += coef_s * lse_s
            LSE = tl.where(s_idx == s, lse_s[:, None], LSE)
        if COMPUTE_GRAD:
            # Pass 2: re-read each block and write its gradient.
            for start in range(0, Vp, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                col_in = cols < V
                load_mask = valid[:, None] & col_in[None, :]
                z = tl.load(row_ptrs + cols[None, :], mask=load_mask, other=float("-inf"))
                z = z.to(tl.float32)
                g = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
                for s in tl.static_range(S):
                    member, on, coef_s = _slot(anc_ptr, coef_ptr, y, valid, cols, col_in, s, S)
                    lse_s = _column(LSE, s_idx, s, float("-inf"))
                    p = tl.exp(tl.where(member, z - lse_s[:, None], float("-inf")))
                    g += p * coef_s[:, None]
                if HAS_SOFT:
                    q = tl.load(
                        soft_ptr + y[:, None] * V + cols[None, :], mask=load_mask, other=0.0
                    )
                    g -= q.to(tl.float32)
                g = tl.where(bad[:, None], float("nan"), g * row_scale[:, None])
                store_mask = row_in[:, None] & (cols < Vp)[None, :]
                tl.store(
                    grad_ptrs + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=store_mask
                )

    if not COMPUTE_GRAD:
        if HAS_CONST:
            loss += tl.load(const_ptr + y, mask=valid, other=0.0).to(tl.float32)
        loss = tl.where(bad, float("nan"), tl.where(valid, loss, 0.0))
        tl.store(loss_ptr + rows, loss * scale, mask=row_in)


def _check_runnable(logits: torch.Tensor) -> None:
    """Raise unless Triton can run on ``logits``: a CUDA tensor, or the interpreter (CPU)."""
    fn = _path_loss_kernel
    while not isinstance(fn, (triton.JITFunction, InterpretedFunction)):
        fn = fn.fn
    if logits.is_cuda or isinstance(fn, InterpretedFunction):
        return
    raise RuntimeError(
        f"helm.kernels.path_loss.path_loss_triton needs a CUDA tensor (got device {logits.device}); to run the "
        "Triton kernel on CPU set TRITON_INTERPRET=1 before triton is imported, or use the "
        "PyTorch reference (helm.ops.path_loss.path_loss_ref)"
    )


def _launch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    num_valid: torch.Tensor | None,
    ignore_index: int,
    grad_output: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row losses (N,) fp32 (already / num_valid for the mean, when ``num_valid`` is given), or,
    with ``grad_output``, the gradient (N, Vp) in the logits' dtype, already scaled by it."""
    N, Vp = logits.shape
    anc, coef, soft, const = tables
    V, S = anc.shape
    compute_grad = grad_output is not None
    if compute_grad:
        out = torch.empty((N, Vp), dtype=logits.dtype, device=logits.device)
        go = grad_output.to(torch.float32)
        stride_go = 0 if go.dim() == 0 else go.stride(0)
    else:
        out = torch.empty(N, dtype=torch.float32, device=logits.device)
        go, stride_go = None, 0
    if N == 0:
        return out
    block_v = triton.next_power_of_2(Vp)
    single = block_v <= MAX_BLOCK_V
    block_v = min(block_v, MAX_BLOCK_V)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _path_loss_kernel[grid](
        logits,
        targets,
        anc,
        coef,
        soft,
        const,
        num_valid,
        go,
        stride_go,
        None if compute_grad else out,
        out if compute_grad else None,
        N,
        ignore_index,
        V=V,
        Vp=Vp,
        STRIDE=logits.stride(0),
        S=S,
        S_BLOCK=triton.next_power_of_2(S),
        HAS_SOFT=soft is not None,
        HAS_CONST=const is not None,
        MEAN=num_valid is not None,
        COMPUTE_GRAD=compute_grad,
        SINGLE_BLOCK=single,
        BLOCK_V=block_v,
    )
    return out


class PathLossFunction(torch.autograd.Function):
    """Forward writes the loss rows; backward re-reads the logits and writes the gradient, scaled
    by ``grad_output`` inside the kernel."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        anc: torch.Tensor,
        coef: torch.Tensor,
        soft: torch.Tensor | None,
        const: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
    ) -> torch.Tensor:
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        targets = targets.contiguous()
        tables = tuple(None if t is None else t.contiguous() for t in (anc, coef, soft, const))
        mean = reduction == "mean"
        num_valid = (targets != ignore_index).sum() if mean else None  # on device: no sync
        loss = _launch(logits, targets, tables, num_valid, ignore_index)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, targets, num_valid, *tables)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        return loss if reduction == "none" else loss.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple:
        logits, targets, num_valid, *tables = ctx.saved_tensors
        grad = _launch(logits, targets, tuple(tables), num_valid, ctx.ignore_index, grad_output)
        return grad, None, None, None, None, None, None, None


def path_loss_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    anc: torch.Tensor,
    coef: torch.Tensor,
    soft: torch.Tensor | None = None,
    const: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Fused path loss; same signature and result as ``helm.ops.path_loss.path_loss_ref``.

    logits: (N, Vp) fp32/bf16/fp16, Vp >= V (columns >= V are padding: no probability, zero grad);
    targets: (N,) int, ``ignore_index`` rows contribute nothing; anc: (V, S) int node ids, -1 padded;
    coef: (V, S) float; soft: (V, V) float or None; const: (V,) float or None.
    reduction: "mean" over non-ignored rows (0 when there are none), "sum", or "none" (N,) fp32.
    Maths in fp32 whatever the logits' dtype; the gradient is stored in the logits' dtype.
    Runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1; raises RuntimeError otherwise.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, Vp), got shape {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise TypeError(
            f"path_loss kernel takes float32/bfloat16/float16 logits, got {logits.dtype}; "
            "use helm.ops.path_loss.path_loss_ref for other dtypes"
        )
    N, Vp = logits.shape
    V, S = anc.shape
    if targets.shape != (N,):
        raise ValueError(f"targets must be ({N},), got {tuple(targets.shape)}")
    if V > Vp or coef.shape != anc.shape:
        raise ValueError(f"need anc and coef (V, S) with V <= {Vp}: {anc.shape}, {coef.shape}")
    if soft is not None and soft.shape != (V, V):
        raise ValueError(f"soft must be ({V}, {V}), got {tuple(soft.shape)}")
    if const is not None and const.shape != (V,):
        raise ValueError(f"const must be ({V},), got {tuple(const.shape)}")
    tables = [t for t in (targets, anc, coef, soft, const) if t is not None]
    if any(t.device != logits.device for t in tables):
        raise ValueError(f"targets and tables must be on the logits' device {logits.device}")
    _check_runnable(logits)
    return PathLossFunction.apply(logits, targets, anc, coef, soft, const, ignore_index, reduction)
