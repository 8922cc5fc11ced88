"""HELM's Triton kernels (CUDA): ``path_loss`` (the HXE loss family) and ``fftconv`` (Hyena's long
convolution), each with the signature of its PyTorch reference in ``helm.ops``, and Mamba's scans
with mamba-ssm's signatures, so that code written for mamba-ssm runs unchanged:
``selective_scan_fn`` (Mamba-1, ``selective_scan.py``) and ``mamba_chunk_scan_combined``
(Mamba-2's SSD, ``ssd.py``), both exported here. ``bench/`` holds their microbenchmarks.

The package lives under ``helm`` (as ``mamba_ssm.ops.triton`` and ``liger_kernel.ops`` do) and
never at the top level: the import name ``kernels`` belongs to Hugging Face's kernel hub, which
``transformers`` depends on. Importing this package imports nothing (the exported functions load
their module on first use); each module imports torch and triton only, never the rest of helm.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"selective_scan_fn": "selective_scan", "mamba_chunk_scan_combined": "ssd"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
