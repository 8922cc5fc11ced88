"""HELM: hierarchical encoding for mRNA language models.

Importing ``helm`` is light (no torch): the sharing functions below load ``helm.hf`` on first use.

    loaded = helm.from_pretrained(PATH)   # a checkpoint, a HELM export or a Hugging Face folder
    helm.export_hf(CKPT, DIR); helm.export_helm(CKPT, DIR)
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute), loaded on first access
_LAZY = {
    "from_pretrained": ("helm.hf", "load_model"),
    "load_model": ("helm.hf", "load_model"),
    "export_hf": ("helm.hf", "export_hf"),
    "export_helm": ("helm.hf", "export_helm"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'helm' has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
