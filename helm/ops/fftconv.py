"""Hyena's long convolution ``y = postgate * (conv(u * pregate, k) + D * (u * pregate))``.

``fftconv_ref`` is the PyTorch reference (torch.fft, FFT size >= 2L, fp32 maths): the CPU path, the
test oracle and the benchmark baseline of the Triton kernel ``helm.kernels.fftconv.fftconv_triton``, which
has the same signature. ``fftconv(..., impl=)`` dispatches between them (``helm.ops.resolve_impl``).

Causal (``bidirectional=False``): ``k`` is (D, L) and ``y[t] = sum_{s <= t} k[t - s] u[s]``.
Two-sided (``bidirectional=True``): ``k`` is (D, 2L - 1), index j holding lag j - (L - 1), and
``y[t] = sum_s k[t - s + L - 1] u[s]`` over all s, so every position sees every other.
"""

from __future__ import annotations

import torch

from helm.ops import resolve_impl


def fftconv_ref(
    u: torch.Tensor,
    k: torch.Tensor,
    D: torch.Tensor,
    pregate: torch.Tensor | None = None,
    postgate: torch.Tensor | None = None,
    bidirectional: bool = False,
) -> torch.Tensor:
    """u, pregate, postgate: (B, H, L); k: (H, L) or (H, 2L - 1); D: (H,). Returns (B, H, L), u's dtype."""
    L = u.shape[-1]
    expected = 2 * L - 1 if bidirectional else L
    if k.shape[-1] != expected:
        raise ValueError(f"filter length {k.shape[-1]} does not match {expected} for L={L}")
    acc = torch.promote_types(u.dtype, torch.float32)  # fp32 maths; float64 stays float64
    x = u.to(acc)
    if pregate is not None:
        x = x * pregate.to(acc)
    # Linear (not circular) convolution needs n >= L + Lk - 1 for the causal case; the two-sided case
    # reads outputs L-1 .. 2L-2 of a length-3L-2 full convolution, and wrap-around only pollutes
    # indices below 3L-2-n, so n >= 2L suffices for both.
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(k.to(acc), n=n), n=n)  # (B, H, n)
    y = y[..., L - 1 : 2 * L - 1] if bidirectional else y[..., :L]
    y = y + x * D.to(acc)[:, None]
    if postgate is not None:
        y = y * postgate.to(acc)
    return y.to(u.dtype)


def fftconv(
    u: torch.Tensor,
    k: torch.Tensor,
    D: torch.Tensor,
    pregate: torch.Tensor | None = None,
    postgate: torch.Tensor | None = None,
    bidirectional: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """``fftconv_ref`` or its Triton kernel (``impl``: auto | torch | triton, see ``helm.ops``)."""
    if resolve_impl(impl, u, op="fftconv") == "torch":
        return fftconv_ref(u, k, D, pregate, postgate, bidirectional)
    from helm.kernels.fftconv import fftconv_triton  # imports triton: only when asked for

    return fftconv_triton(u, k, D, pregate, postgate, bidirectional)
