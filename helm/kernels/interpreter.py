"""Two patches to Triton's interpreter (compiled kernels are not affected).

``fix_loop_bounds``: loop bounds computed at run time, for Triton < 3.7 with NumPy >= 2.4.

The interpreter holds every scalar as a NumPy array of shape (1,) and turns a loop bound such as
``range(q_lo, tl.minimum(p0 + BLOCK_P, L), BLOCK_Q)`` into a Python int with ``int(array)``, which
NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"). Triton 3.7
squeezes the array first (triton-lang/triton#9172); ``fix_loop_bounds`` applies the same one-line
change to older interpreters. Kernels whose trip counts depend on the program id (the causal tile
loops of ``helm/kernels/fftconv.py``) need it.

``vectorize_scans``: ``tl.associative_scan`` with a combine function of its own, in log2(n)
whole-array steps instead of element by element (the Mamba-1 scan of
``helm/kernels/selective_scan.py``).
"""

from __future__ import annotations

import triton


def fix_loop_bounds() -> None:
    """Make the interpreter's ``tensor.__index__`` squeeze its (1,)-shaped array (idempotent)."""
    if not triton.knobs.runtime.interpret:
        return
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "squeezes_index", False):
        return

    def patched(tensor, *args) -> None:  # (tensor) in Triton 3.4, (tensor, scope) from 3.5
        patch(tensor, *args)  # a scope restores the class's attributes when the call ends
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    patched.squeezes_index = True
    interpreter._patch_lang_tensor = patched


def vectorize_scans() -> None:
    """Make the interpreter's ``tl.associative_scan`` with a combine function of its own run in
    log2(n) whole-array steps instead of element by element (idempotent).

    The interpreter runs such a scan as a Python loop over every element, calling the combine
    function on scalars (~0.4 ms each: a (4, 16, 16) tile takes 0.4 s). This runs the
    Hillis-Steele scan instead: at step k every position i >= 2^k combines the running value at
    i - 2^k (covering earlier positions, the left operand) with its own, over all positions at
    once. The combine function must be associative for any scan (compiled kernels use a tree of
    their own), so the result is the same up to floating-point rounding; compiled kernels are not
    affected. The Mamba-1 scan (``helm/kernels/selective_scan.py``) needs it to test in seconds.
    """
    if not triton.knobs.runtime.interpret:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    ops = getattr(interpreter, "ScanOps", None)
    if ops is None or getattr(ops.generic_scan, "vectorized", False):
        return

    def generic_scan(self, input) -> list:
        datas = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in input]
        n, k = datas[0].shape[0], 1
        while k < n:
            # Block shapes stay powers of two: the left operands are the values rolled by k, and
            # the first k results (which paired with wrapped-around values) are dropped.
            args = [
                self.to_tensor(np.roll(d, k, axis=0), arg.dtype) for d, arg in zip(datas, input)
            ]
            args += [self.to_tensor(d, arg.dtype) for d, arg in zip(datas, input)]
            with np.errstate(all="ignore"):
                ret = self.combine_fn.fn(*args)
            ret = ret if isinstance(ret, tuple) else (ret,)
            datas = [d.copy() for d in datas]
            for d, r in zip(datas, ret):
                r = r.handle.data if isinstance(r, tl.tensor) else r
                d[k:] = np.broadcast_to(r, d.shape)[k:]
            k *= 2
        return [
            self.to_tensor(np.ascontiguousarray(np.moveaxis(d, 0, self.axis)), arg.dtype)
            for d, arg in zip(datas, input)
        ]

    generic_scan.vectorized = True
    ops.generic_scan = generic_scan
