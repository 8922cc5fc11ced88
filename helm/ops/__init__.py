"""Ops with a fused kernel beside their PyTorch reference, and the one rule that picks between them.

Each op module holds the reference (``x_ref``, the CPU path and test oracle) and the dispatcher
``x(..., impl=)``; HELM's Triton kernels live in ``helm/kernels/`` (``helm/kernels/x.py``: ``x_triton``):

- ``helm.ops.path_loss``: every loss over the codon tree (``helm/kernels/path_loss.py``);
- ``helm.ops.fftconv``: Hyena's long convolution (``helm/kernels/fftconv.py``);
- ``helm.ops.selective_scan``: Mamba's scans (``helm/kernels/selective_scan.py`` and
  ``helm/kernels/ssd.py``, with mamba-ssm's API), and mamba-ssm's CUDA kernels when installed.

Every such op takes ``impl``: ``"auto"`` runs the kernel on CUDA tensors (when it can run there)
and the reference elsewhere, ``"torch"`` always runs the reference, and the kernel's own name
(``"triton"`` for HELM's kernels in ``helm/kernels/``, ``"mamba_ssm"`` for mamba-ssm's) always runs the
kernel, raising when it cannot: there is no silent fallback. The scans take both kernels'
names; their "auto" prefers mamba-ssm's where it can run. The submodules are not imported here,
so importing ``helm.ops`` pulls in neither triton nor an optional CUDA extension.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing helm.ops imports no torch: the command line reads IMPLS
    import torch

IMPLS = ("auto", "torch", "triton")
# Mamba's scans: HELM's Triton kernels or mamba-ssm's CUDA kernels (``helm.ops.selective_scan``).
SCAN_KERNEL = "mamba_ssm"
SCAN_IMPLS = ("auto", "torch", "triton", SCAN_KERNEL)


def resolve_impl(
    impl: str,
    tensor: torch.Tensor,
    *,
    kernel: str = "triton",
    op: str = "op",
    unavailable: str | None = None,
) -> str:
    """``"torch"`` or ``kernel`` for an op whose input is ``tensor`` (see the module docstring).

    ``unavailable``: why the kernel cannot run on ``tensor`` (a missing optional package, a CPU
    tensor for a CUDA-only kernel), or None when it can. ``"auto"`` then takes the reference and an
    explicit ``kernel`` raises RuntimeError with that reason.
    """
    if impl not in ("auto", "torch", kernel):
        raise ValueError(f"{op}: impl must be one of auto, torch, {kernel}; got {impl!r}")
    if kernel == "triton" and unavailable is None and not triton_installed():
        unavailable = "the triton package is not installed (it comes with PyTorch's CUDA wheels)"
    if impl == "auto":
        return kernel if tensor.is_cuda and unavailable is None else "torch"
    if impl == kernel and unavailable is not None:
        raise RuntimeError(f"{op}: impl={kernel!r} cannot run here: {unavailable}")
    return impl


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
