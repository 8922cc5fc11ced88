"""Fused path loss: XE, HXE, soft labels and the amino-acid losses in one Triton kernel.

Every loss over the codon tree is one formula over per-target tables (``path_loss_ref`` in
``helm/ops/path_loss.py`` is the PyTorch twin and the test oracle)::

    L(z, y) = const[y] + sum_s coef[y, s] * lse_s - sum_c soft[y, c] * z_c
    lse_s   = log sum_{c < V: anc[c, s] == anc[y, s]} exp(z_c)        (slots with anc[y, s] >= 0)

Gradient (written during the forward pass; backward only scales it by ``grad_output``)::

    d lse_s / d z_c = [anc[c, s] == anc[y, s]] * exp(z_c - lse_s)     (softmax restricted to group s)
    dL / d z_c      = sum_s coef[y, s] * [c in group s] * exp(z_c - lse_s) - soft[y, c]

With one row max m, e_c = exp(z_c - m) and the group sums d_s = sum_{c in group s} e_c, this is
``lse_s = m + log d_s`` and ``dL/dz_c = e_c * w_c - soft[y, c]`` with ``w_c = sum_s [c in s] coef_s / d_s``:
one exp per logit serves every slot. Padded columns (c >= V) get no probability and zero gradient;
ignored rows get zero loss and zero gradient.

Work split: one program takes BLOCK_N rows (BLOCK_N * BLOCK_V ~ TILE logits, autotuned). When the
padded row fits one block (Vp <= MAX_BLOCK_V; 72 columns for codons) it is loaded once, upcast to
fp32, and the S <= 5 slot sums are masked reductions of the same exps: memory traffic per row is one
read of the logits, one write of the gradient (logits' dtype) and one fp32 loss, plus the target's
S path entries and coefficients, its soft row when given, and the (V, S) ancestor table that all
programs share from cache. Wider rows loop over column blocks: pass 1 keeps an online row max and
rescales the slot sums, pass 2 re-reads the row to write the gradient (two reads, one write).

Numerical range: each group sum shares the row max, so the result is exact while every path group's
largest logit lies within ~87 nats (the fp32 exp range) of the row's largest logit. Past that the
group's sum underflows and the loss comes out non-finite (reported by the trainer) instead of a
large finite value. A target outside [0, V) that is not ``ignore_index`` gives a NaN loss row.
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


def _configs() -> list[triton.Config]:
    """TILE = logits per program (BLOCK_N rows x BLOCK_V columns); one config when interpreting."""
    if triton.knobs.runtime.interpret:
        return [triton.Config({"TILE": 512}, num_warps=4)]
    return [
        triton.Config({"TILE": tile}, num_warps=warps)
        for tile in (1024, 2048, 4096, 8192)
        for warps in (2, 4, 8)
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles narrower than one column block (they all mean BLOCK_N = 1): keep the smallest."""
    wide = [c for c in configs if c.kwargs["TILE"] >= kwargs["BLOCK_V"]]
    if wide:
        return wide
    smallest = min(c.kwargs["TILE"] for c in configs)
    return [c for c in configs if c.kwargs["TILE"] == smallest]


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


@triton.autotune(
    configs=_configs(),
    key=["V", "Vp", "S", "HAS_SOFT", "COMPUTE_GRAD"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.heuristics({"BLOCK_N": lambda args: max(1, args["TILE"] // args["BLOCK_V"])})
@triton.jit
def _path_loss_kernel(
    logits_ptr,  # (N, Vp) any float dtype; columns contiguous, rows stride_logits apart
    stride_logits,
    targets_ptr,  # (N,) int
    anc_ptr,  # (V, S) int, contiguous
    coef_ptr,  # (V, S) float, contiguous
    soft_ptr,  # (V, V) float or None
    const_ptr,  # (V,) float or None
    num_valid_ptr,  # () int64: rows with target != ignore_index (read only for the mean)
    loss_ptr,  # (N,) fp32 out
    grad_ptr,  # (N, Vp) contiguous, logits dtype, out (or None)
    N,
    V,
    Vp,
    ignore_index,
    S: tl.constexpr,
    S_BLOCK: tl.constexpr,  # next power of two >= S
    HAS_SOFT: tl.constexpr,
    HAS_CONST: tl.constexpr,
    MEAN: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # BLOCK_V >= Vp: the row stays in registers, read once
    BLOCK_V: tl.constexpr,
    TILE: tl.constexpr,  # autotuned; only sets BLOCK_N
    BLOCK_N: tl.constexpr,
):
    """BLOCK_N rows per program: loss rows and, when COMPUTE_GRAD, their gradient rows."""
    pid = tl.program_id(0).to(tl.int64)  # int64 before it meets a stride
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    y = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
    valid = row_in & (y != ignore_index)
    bad = valid & ((y < 0) | (y >= V))  # out-of-range target: NaN row, memory stays in bounds
    y = tl.where(valid & ~bad, y, 0)
    row_ptrs = logits_ptr + rows[:, None] * stride_logits
    if MEAN:
        scale = 1.0 / tl.maximum(tl.load(num_valid_ptr), 1).to(tl.float32)
    else:
        scale = 1.0

    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_V)
        col_in = cols < V
        load_mask = valid[:, None] & col_in[None, :]
        z = tl.load(row_ptrs + cols[None, :], mask=load_mask, other=float("-inf")).to(tl.float32)
        m = tl.where(valid, tl.max(z, axis=1), 0.0)  # ignored rows: 0, so e = exp(-inf) = 0
        e = tl.exp(z - m[:, None])  # (BLOCK_N, BLOCK_V), the only exps of the row
        loss = tl.zeros([BLOCK_N], dtype=tl.float32)
        w = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)  # w_c = sum_s [c in s] coef_s / d_s
        for s in tl.static_range(S):
            member, on, coef_s = _slot(anc_ptr, coef_ptr, y, valid, cols, col_in, s, S)
            d_s = tl.where(on, tl.sum(tl.where(member, e, 0.0), axis=1), 1.0)
            loss += coef_s * (m + tl.log(d_s))  # coef_s * lse_s
            w += tl.where(member, (coef_s / d_s)[:, None], 0.0)
        g = e * w
        if HAS_SOFT:
            q = tl.load(soft_ptr + y[:, None] * V + cols[None, :], mask=load_mask, other=0.0)
            q = q.to(tl.float32)
            loss -= tl.sum(q * tl.where(load_mask, z, 0.0), axis=1)
            g -= q
    else:
        # Pass 1: online row max m and per-slot sums d (BLOCK_N, S_BLOCK), rescaled as m grows.
        s_idx = tl.arange(0, S_BLOCK)[None, :]
        m = tl.where(valid, float("-inf"), 0.0)
        d = tl.zeros([BLOCK_N, S_BLOCK], dtype=tl.float32)
        zq = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_c soft[y, c] * z_c
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            col_in = cols < V
            load_mask = valid[:, None] & col_in[None, :]
            z = tl.load(row_ptrs + cols[None, :], mask=load_mask, other=float("-inf"))
            z = z.to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            d = d * tl.exp(m - m_new)[:, None]
            e = tl.exp(z - m_new[:, None])
            for s in tl.static_range(S):
                member, on, coef_s = _slot(anc_ptr, coef_ptr, y, valid, cols, col_in, s, S)
                d += tl.where(s_idx == s, tl.sum(tl.where(member, e, 0.0), axis=1)[:, None], 0.0)
            if HAS_SOFT:
                q = tl.load(soft_ptr + y[:, None] * V + cols[None, :], mask=load_mask, other=0.0)
                zq += tl.sum(q.to(tl.float32) * tl.where(load_mask, z, 0.0), axis=1)
            m = m_new
        loss = -zq
        inv = tl.zeros([BLOCK_N, S_BLOCK], dtype=tl.float32)  # coef_s / d_s per slot
        for s in tl.static_range(S):
            path_s = tl.load(anc_ptr + y * S + s, mask=valid, other=-1)
            on = path_s >= 0
            coef_s = tl.load(coef_ptr + y * S + s, mask=valid, other=0.0).to(tl.float32)
            coef_s = tl.where(on, coef_s, 0.0)
            d_s = tl.where(on, tl.sum(tl.where(s_idx == s, d, 0.0), axis=1), 1.0)
            loss += coef_s * (m + tl.log(d_s))
            inv += tl.where(s_idx == s, (coef_s / d_s)[:, None], 0.0)

    if HAS_CONST:
        loss += tl.load(const_ptr + y, mask=valid, other=0.0).to(tl.float32)
    loss = tl.where(bad, float("nan"), tl.where(valid, loss, 0.0))
    tl.store(loss_ptr + rows, loss * scale, mask=row_in)

    if COMPUTE_GRAD:
        grad_ptrs = grad_ptr + rows[:, None] * Vp
        if SINGLE_BLOCK:
            g = tl.where(bad[:, None], float("nan"), tl.where(valid[:, None], g * scale, 0.0))
            store_mask = row_in[:, None] & (cols < Vp)[None, :]
            tl.store(grad_ptrs + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=store_mask)
        else:
            # Pass 2: re-read each block, e_c = exp(z_c - m) with the final max, write the gradient.
            for start in range(0, Vp, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                col_in = cols < V
                load_mask = valid[:, None] & col_in[None, :]
                z = tl.load(row_ptrs + cols[None, :], mask=load_mask, other=float("-inf"))
                e = tl.exp(z.to(tl.float32) - m[:, None])
                w = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
                for s in tl.static_range(S):
                    member, on, coef_s = _slot(anc_ptr, coef_ptr, y, valid, cols, col_in, s, S)
                    inv_s = tl.sum(tl.where(s_idx == s, inv, 0.0), axis=1)
                    w += tl.where(member, inv_s[:, None], 0.0)
                g = e * w
                if HAS_SOFT:
                    q = tl.load(
                        soft_ptr + y[:, None] * V + cols[None, :], mask=load_mask, other=0.0
                    )
                    g -= q.to(tl.float32)
                g = tl.where(bad[:, None], float("nan"), tl.where(valid[:, None], g * scale, 0.0))
                store_mask = row_in[:, None] & (cols < Vp)[None, :]
                tl.store(
                    grad_ptrs + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=store_mask
                )


def _check_runnable(logits: torch.Tensor) -> None:
    """Raise unless Triton can run on ``logits``: a CUDA tensor, or the interpreter (CPU)."""
    fn = _path_loss_kernel
    while not isinstance(fn, (triton.JITFunction, InterpretedFunction)):
        fn = fn.fn
    if logits.is_cuda or isinstance(fn, InterpretedFunction):
        return
    raise RuntimeError(
        f"kernels.path_loss.path_loss_triton needs a CUDA tensor (got device {logits.device}); to run the "
        "Triton kernel on CPU set TRITON_INTERPRET=1 before triton is imported, or use the "
        "PyTorch reference (helm.ops.path_loss.path_loss_ref)"
    )


def _path_loss_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    anc: torch.Tensor,
    coef: torch.Tensor,
    soft: torch.Tensor | None,
    const: torch.Tensor | None,
    ignore_index: int,
    mean: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel: per-row losses (N,) fp32 (already / num_valid for the mean) and the
    gradient (N, Vp) in the logits' dtype (None unless ``compute_grad``)."""
    N, Vp = logits.shape
    V, S = anc.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    grad = torch.empty((N, Vp), dtype=logits.dtype, device=logits.device) if compute_grad else None
    if N == 0:
        return loss, grad
    num_valid = (targets != ignore_index).sum() if mean else None  # stays on device: no sync
    block_v = triton.next_power_of_2(Vp)
    single = block_v <= MAX_BLOCK_V
    block_v = min(block_v, MAX_BLOCK_V)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _path_loss_kernel[grid](
        logits,
        logits.stride(0),
        targets.contiguous(),
        anc.contiguous(),
        coef.contiguous(),
        None if soft is None else soft.contiguous(),
        None if const is None else const.contiguous(),
        num_valid,
        loss,
        grad,
        N,
        V,
        Vp,
        ignore_index,
        S=S,
        S_BLOCK=triton.next_power_of_2(S),
        HAS_SOFT=soft is not None,
        HAS_CONST=const is not None,
        MEAN=mean,
        COMPUTE_GRAD=compute_grad,
        SINGLE_BLOCK=single,
        BLOCK_V=block_v,
    )
    return loss, grad


class PathLossFunction(torch.autograd.Function):
    """Forward computes the loss and stores its gradient; backward scales it by ``grad_output``."""

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
        loss, grad = _path_loss_forward(
            logits,
            targets,
            anc,
            coef,
            soft,
            const,
            ignore_index,
            mean=reduction == "mean",
            compute_grad=ctx.needs_input_grad[0],
        )
        ctx.reduction = reduction
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss if reduction == "none" else loss.sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple:
        # The gradient was written in the forward pass, already / num_valid for the mean; scale it
        # in place (a second backward through the same graph is refused by autograd's version check).
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_output[:, None] if ctx.reduction == "none" else grad_output)
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
