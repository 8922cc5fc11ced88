"""Mamba-2's SSD scan as Triton kernels, with mamba-ssm's ``mamba_chunk_scan_combined`` API.

Per batch row and head h (headdim P, state size N, heads sharing B and C in G groups):

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T   (P, N),   y_t = h_t C_t + D x_t,
    out_t = y_t * silu(z_t),     dt = softplus(dt + dt_bias) (optionally), clamped to dt_limit

Shapes as mamba-ssm: x, z (batch, L, H, P); dt (batch, L, H); A, dt_bias (H,); D (H,) or (H, P);
B, C (batch, L, G, N), head h reading group h // (H / G); initial and final states (batch, H, P, N).

Design: the chunked SSD algorithm (Mamba-2 paper, section 6), in two kernels per pass where
mamba-ssm's Triton SSD uses five forward and eight backward. Within a chunk of Q steps, with
S_t = dt_1 A + ... + dt_t A (the cumulative log-decay in the chunk):

    y_t = sum_{s <= t} (C_t . B_s) exp(S_t - S_s) dt_s x_s  +  exp(S_t) h_in C_t  +  D x_t,
    h_out = exp(S_Q) h_in + sum_s exp(S_Q - S_s) dt_s x_s B_s^T.

``_ssd_state_fwd_kernel``: one program per (batch row, head) walks the chunks in order, forms each
chunk's own state contribution as one (P, Q) @ (Q, N) product and passes the state on, storing
the state entering every chunk (fp32) and the final state. ``_ssd_chunk_fwd_kernel``: one program
per (chunk, batch row, head) computes the chunk's outputs from its entering state with three
products, (Q, N) @ (N, Q) for C B^T, (Q, Q) @ (Q, P) for the masked, decayed mixing matrix and
(Q, N) @ (N, P) for the entering state; D, z and the gate are fused. Every exponent is S_t,
S_Q - S_t or S_t - S_s with s <= t (entries above the diagonal are masked before ``exp``): never
positive for a decaying A, so nothing overflows. The backward pass mirrors it: the state
gradients are passed backwards through the chunks by ``_ssd_state_bwd_kernel``, then one program
per chunk computes dx, ddt, dB, dC, dA, dD, dz and dt_bias's gradient with eight products and no
atomics. The kernels and the gradient derivations are in ``helm/kernels/ssd_kernels.py``; this
module holds the launchers, the ``autograd.Function`` and the public function.

Traffic: the forward reads x, dt, B, C (and z) once per chunk kernel and x, dt, B once per state
pass, writes out and the fp32 entering states (batch, L / Q, H, P, N); at Mamba-2 sizes the
products are small (Q = 64) and both passes are memory-bound.

``chunk_size`` is a tile size here, not part of the result (which is the same for any chunking
up to rounding): the kernels use chunks of ``chunk_size`` rounded up to a power of two and
clamped to [16, 64], whose (Q, Q) tiles stay in registers. Operands of the products are rounded
to x's dtype for tensor cores (fp32 inputs use 3xTF32), accumulation is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from helm.kernels.ssd_kernels import (
    _ssd_chunk_bwd_kernel,
    _ssd_chunk_fwd_kernel,
    _ssd_state_bwd_kernel,
    _ssd_state_fwd_kernel,
)

_INTERPRET = triton.knobs.runtime.interpret
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
FP32_DOT_PRECISION = "tf32x3"  # fp32 inputs: fp32-level accuracy on tensor cores


def _dot_args(dtype: torch.dtype) -> dict:
    """Operand dtype and precision of the products for inputs of ``dtype``."""
    if dtype == torch.float32:
        return {"OP_DTYPE": tl.float32, "EMULATE_DOT": False, "PRECISION": FP32_DOT_PRECISION}
    return {"OP_DTYPE": _TL_DTYPES[dtype], "EMULATE_DOT": _INTERPRET, "PRECISION": None}


def _chunk_len(chunk_size: int) -> int:
    return min(64, max(16, triton.next_power_of_2(chunk_size)))


class _Problem:
    """Sizes, flags and shared launch arguments of one call."""

    def __init__(self, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit):
        self.batch, self.L, self.H, self.P = x.shape
        self.G, self.N = B.shape[2], B.shape[3]
        self.Q = _chunk_len(chunk_size)
        self.n_chunks = triton.cdiv(self.L, self.Q)
        has_limit = tuple(dt_limit) != (0.0, float("inf"))
        self.sizes = (self.L, self.H, self.G, self.P, self.N, float(dt_limit[0]),
                      float(dt_limit[1]))  # fmt: skip
        self.flags = dict(SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit, HAS_BIAS=dt_bias is not None,
                          Q=self.Q, BLOCK_P=max(16, triton.next_power_of_2(self.P)),
                          BLOCK_N=max(16, triton.next_power_of_2(self.N)), **_dot_args(x.dtype))  # fmt: skip
        self.d_flags = dict(HAS_D=D is not None, D_HAS_HDIM=D is not None and D.dim() == 2)

    def empty(self, *shape: int, like: torch.Tensor, dtype: torch.dtype | None = None):
        return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def _ssd_fwd(x, dt, A, B, C, pb: _Problem, D, z, dt_bias, initial_states):
    """(out, y before the gate or None, entering states (batch, chunks, H, P, N) fp32, final)."""
    f32 = torch.float32
    states = pb.empty(pb.batch, pb.n_chunks, pb.H, pb.P, pb.N, like=x, dtype=f32)
    final = pb.empty(pb.batch, pb.H, pb.P, pb.N, like=x, dtype=f32)
    bias = x if dt_bias is None else dt_bias  # stand-in pointers are never read
    _ssd_state_fwd_kernel[(pb.batch * pb.H,)](
        x, dt, A, B, bias, x if initial_states is None else initial_states, states, final,
        *pb.sizes, *x.stride(), *dt.stride(), *B.stride(),
        HAS_INIT=initial_states is not None, **pb.flags,
    )  # fmt: skip
    out = pb.empty(pb.batch, pb.L, pb.H, pb.P, like=x)
    ypre = None if z is None else torch.empty_like(out)
    zt = x if z is None else z
    _ssd_chunk_fwd_kernel[(pb.n_chunks, pb.batch * pb.H)](
        x, dt, A, B, C, x if D is None else D, zt, bias, states, out,
        out if ypre is None else ypre, *pb.sizes, *x.stride(), *dt.stride(), *B.stride(),
        *C.stride(), *zt.stride(), HAS_Z=z is not None, **pb.d_flags, **pb.flags,
    )  # fmt: skip
    return out, ypre, states, final


def _ssd_bwd(dout, dfinal, x, dt, A, B, C, pb: _Problem, D, z, dt_bias, init, ypre, states):
    """(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states), each in its input's dtype."""
    f32 = torch.float32
    nc, bh = pb.n_chunks, pb.batch * pb.H
    dstates = pb.empty(pb.batch, nc, pb.H, pb.P, pb.N, like=x, dtype=f32)
    dsend = pb.empty(pb.batch, nc, pb.H, like=x, dtype=f32)
    dinit = None if init is None else pb.empty(*init.shape, like=x, dtype=f32)
    bias = x if dt_bias is None else dt_bias
    zt = dout if z is None else z
    _ssd_state_bwd_kernel[(bh,)](
        dout, zt, dt, A, C, bias, states, states if dfinal is None else dfinal, dstates, dsend,
        dsend if dinit is None else dinit, *pb.sizes, *dout.stride(), *zt.stride(), *dt.stride(),
        *C.stride(), HAS_Z=z is not None, HAS_DFINAL=dfinal is not None,
        HAS_INIT=init is not None, **pb.flags,
    )  # fmt: skip
    dx, dz = torch.empty_like(x, memory_format=torch.contiguous_format), None
    if z is not None:
        dz = pb.empty(pb.batch, pb.L, pb.H, pb.P, like=z)
    ddt = pb.empty(pb.batch, pb.L, pb.H, like=dt)
    dB_h = pb.empty(pb.batch, pb.L, pb.H, pb.N, like=x, dtype=f32)  # per head, summed per group
    dC_h = torch.empty_like(dB_h)
    dA = pb.empty(pb.batch, nc, pb.H, like=x, dtype=f32)
    dD = None
    if D is not None:
        dD = pb.empty(pb.batch, nc, pb.H, *([pb.P] if D.dim() == 2 else []), like=x, dtype=f32)
    dbias = None if dt_bias is None else pb.empty(pb.batch, nc, pb.H, like=x, dtype=f32)
    _ssd_chunk_bwd_kernel[(nc, bh)](
        x, dt, A, B, C, x if D is None else D, zt, bias, dout, zt if ypre is None else ypre,
        states, dstates, dsend, dx, ddt, dB_h, dC_h, dA, dA if dD is None else dD,
        dA if dbias is None else dbias, dx if dz is None else dz,
        *pb.sizes, *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *zt.stride(),
        *dout.stride(), HAS_Z=z is not None, **pb.d_flags, **pb.flags,
    )  # fmt: skip

    def per_group(d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        d = d.view(pb.batch, pb.L, pb.G, pb.H // pb.G, pb.N).sum(3)
        return d.to(like.dtype)

    return (
        dx,
        ddt,
        dA.sum((0, 1)).to(A.dtype),
        per_group(dB_h, B),
        per_group(dC_h, C),
        None if D is None else dD.sum((0, 1)).to(D.dtype),
        dz,
        None if dt_bias is None else dbias.sum((0, 1)).to(dt_bias.dtype),
        None if init is None else dinit.to(init.dtype),
    )


class MambaChunkScanCombinedFn(torch.autograd.Function):
    """Forward: the state pass and the chunk kernel; backward: the reverse state pass and the
    chunk gradient kernel. Saves the inputs, the entering states and (with z) y before the gate."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus,
                dt_limit, return_final_states):  # fmt: skip
        A, D, dt_bias = (None if t is None else t.contiguous() for t in (A, D, dt_bias))
        if initial_states is not None:
            initial_states = initial_states.contiguous()
        pb = _Problem(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit)
        out, ypre, states, final = _ssd_fwd(x, dt, A, B, C, pb, D, z, dt_bias, initial_states)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, ypre, states)
        ctx.pb = pb
        ctx.set_materialize_grads(False)
        return (out, final) if return_final_states else out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dfinal=None):
        x, dt, A, B, C, D, z, dt_bias, init, ypre, states = ctx.saved_tensors
        if dout is None:  # only the final state was used
            dout = torch.zeros_like(x)
        if dfinal is not None:
            dfinal = dfinal.to(torch.float32).contiguous()
        dx, ddt, dA, dB, dC, dD, dz, dbias, dinit = _ssd_bwd(
            dout, dfinal, x, dt, A, B, C, ctx.pb, D, z, dt_bias, init, ypre, states
        )
        return dx, ddt, dA, dB, dC, None, dD, dz, dbias, dinit, None, None, None


# torch.compile runs the kernels as they are (a graph break), as it does mamba-ssm's CUDA kernels:
# the launchers' Python (autotuning, grids, the autograd.Function) is not traced.
@torch.compiler.disable
def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    state_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """mamba-ssm's ``mamba_chunk_scan_combined`` as Triton kernels (same arguments and results).

    x, z: (batch, L, H, P); dt: (batch, L, H); A, dt_bias: (H,); B, C: (batch, L, G, N) with G
    dividing H; D: (H,) or (H, P); initial_states: (batch, H, P, N). Any strides; fp32, bf16 or
    fp16, computed in fp32. Returns out (batch, L, H, P) in x's dtype and, with
    ``return_final_states``, the final states (batch, H, P, N) in fp32. Differentiable in every
    tensor (the final states included). ``chunk_size`` sets the kernels' chunk (see the module
    docstring); the states stay fp32 whatever ``state_dtype``. Variable-length batches
    (``seq_idx``, ``cu_seqlens``, ``return_varlen_states``) are not supported.
    """
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("the Triton SSD does not take seq_idx, cu_seqlens or "
                                  "return_varlen_states; use mamba-ssm's kernels for those")  # fmt: skip
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, L, H, P), got shape {tuple(x.shape)}")
    batch, L, H, P = x.shape
    if dt.shape != (batch, L, H) or A.shape != (H,):
        raise ValueError(f"dt must be ({batch}, {L}, {H}) and A ({H},); got {tuple(dt.shape)}, "
                         f"{tuple(A.shape)}")  # fmt: skip
    if B.dim() != 4 or B.shape[:2] != (batch, L) or C.shape != B.shape or H % B.shape[2]:
        raise ValueError(f"B and C must be ({batch}, {L}, G, N) with G dividing {H}; got "
                         f"{tuple(B.shape)}, {tuple(C.shape)}")  # fmt: skip
    if D is not None and D.shape not in ((H,), (H, P)):
        raise ValueError(f"D must be ({H},) or ({H}, {P}), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must match x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (H,):
        raise ValueError(f"dt_bias must be ({H},), got {tuple(dt_bias.shape)}")
    state_shape = (batch, H, P, B.shape[3])
    if initial_states is not None and initial_states.shape != state_shape:
        raise ValueError(f"initial_states must be {state_shape}, got "
                         f"{tuple(initial_states.shape)}")  # fmt: skip
    tensors = [t for t in (x, dt, A, B, C, D, z, dt_bias, initial_states) if t is not None]
    if any(t.dtype not in _DTYPES for t in tensors):
        raise TypeError(f"the SSD kernels take float32/bfloat16/float16 tensors, got "
                        f"{[t.dtype for t in tensors]}")  # fmt: skip
    if any(t.device != x.device for t in tensors):
        raise RuntimeError("mamba_chunk_scan_combined: all tensors must be on one device")
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"the Triton SSD needs CUDA tensors (got {x.device.type}); on CPU set "
            "TRITON_INTERPRET=1 before importing triton, or use the PyTorch SSD"
        )
    return MambaChunkScanCombinedFn.apply(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit,
        return_final_states,
    )  # fmt: skip
