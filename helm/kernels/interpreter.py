"""Loop bounds computed at run time under Triton's interpreter, for Triton < 3.7 with NumPy >= 2.4.

The interpreter holds every scalar as a NumPy array of shape (1,) and turns a loop bound such as
``range(q_lo, tl.minimum(p0 + BLOCK_P, L), BLOCK_Q)`` into a Python int with ``int(array)``, which
NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"). Triton 3.7
squeezes the array first (triton-lang/triton#9172); ``fix_loop_bounds`` applies the same one-line
change to older interpreters. Kernels whose trip counts depend on the program id (the causal tile
loops of ``helm/kernels/fftconv.py``) need it; compiled kernels are not affected.
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
