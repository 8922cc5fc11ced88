"""Model registry: ``build_model(name, **config)`` -> backbone with ``.lm_head``.

Backbones are imported lazily so that importing helm never pulls in an optional fast path.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch.nn as nn

from helm.models.common import ModelConfig

# name -> (module, config class, model class)
MODELS: dict[str, tuple[str, str, str]] = {
    "gpt2": ("helm.models.gpt2", "GPT2Config", "GPT2"),
    "bert": ("helm.models.bert", "BertConfig", "Bert"),
    "mamba": ("helm.models.mamba", "MambaConfig", "Mamba"),
    "hyena": ("helm.models.hyena", "HyenaConfig", "Hyena"),
}


def _lookup(name: str) -> tuple[type[ModelConfig], type[nn.Module]]:
    if name not in MODELS:
        raise ValueError(f"--model_name must be one of {', '.join(MODELS)}; got {name!r}")
    module, cfg_cls, model_cls = MODELS[name]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_cls), getattr(mod, model_cls)


def model_config(name: str, **kwargs) -> ModelConfig:
    """The config dataclass of ``name`` filled from kwargs; unknown keys are an error."""
    cfg_cls, _ = _lookup(name)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"{name} has no option(s) {', '.join(unknown)}; known: {sorted(fields)}")
    return cfg_cls(**kwargs)


def build_model(name: str, cfg: ModelConfig | None = None, **kwargs) -> nn.Module:
    """Build backbone ``name`` from a config (or kwargs for one)."""
    _, model_cls = _lookup(name)
    return model_cls(cfg if cfg is not None else model_config(name, **kwargs))
