"""Ops with a fused kernel beside their PyTorch reference, and the one rule that picks between them.

Every such op takes ``impl``: ``"auto"`` runs the kernel on CUDA tensors (when it can run there)
and the reference elsewhere, ``"torch"`` always runs the reference, and the kernel's own name
(``"triton"`` for HELM's kernels in ``kernels/``) always runs the kernel, raising when it cannot:
there is no silent fallback.
"""

from __future__ import annotations

import torch

IMPLS = ("auto", "torch", "triton")


def resolve_impl(impl: str, tensor: torch.Tensor, *, kernel: str = "triton", op: str = "op") -> str:
    """``"torch"`` or ``kernel`` for an op whose input is ``tensor`` (see the module docstring)."""
    if impl not in ("auto", "torch", kernel):
        raise ValueError(f"{op}: impl must be one of auto, torch, {kernel}; got {impl!r}")
    if impl == "auto":
        return kernel if tensor.is_cuda else "torch"
    return impl
