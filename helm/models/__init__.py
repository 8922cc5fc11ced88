"""Model registry: ``build_model(name, **config)`` -> backbone with ``.lm_head``.

Importing this package imports no torch: the configs (``helm.models.config``) are plain dataclasses,
and each backbone's module is imported when it is first built.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, NamedTuple

from helm.models.config import BertConfig, GPT2Config, HyenaConfig, MambaConfig, ModelConfig

if TYPE_CHECKING:
    import torch.nn as nn


class ModelEntry(NamedTuple):
    config: type[ModelConfig]  # the options, defaults and facts (helm.models.config)
    module: str  # where the nn.Module lives, imported on first use
    cls: str


MODELS: dict[str, ModelEntry] = {
    "gpt2": ModelEntry(GPT2Config, "helm.models.gpt2", "GPT2"),
    "bert": ModelEntry(BertConfig, "helm.models.bert", "Bert"),
    "mamba": ModelEntry(MambaConfig, "helm.models.mamba", "Mamba"),
    "hyena": ModelEntry(HyenaConfig, "helm.models.hyena", "Hyena"),
}


def _entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"--model_name must be one of {', '.join(MODELS)}; got {name!r}")
    return MODELS[name]


def config_class(name: str) -> type[ModelConfig]:
    """The config dataclass of model ``name`` (no torch import)."""
    return _entry(name).config


def model_class(name: str) -> type[nn.Module]:
    """The backbone class of model ``name`` (imports its module)."""
    entry = _entry(name)
    return getattr(importlib.import_module(entry.module), entry.cls)


def model_config(name: str, **kwargs) -> ModelConfig:
    """The config dataclass of ``name`` filled from kwargs; unknown keys are an error."""
    cfg_cls = config_class(name)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"{name} has no option(s) {', '.join(unknown)}; known: {sorted(fields)}")
    return cfg_cls(**kwargs)


def build_model(name: str, cfg: ModelConfig | None = None, **kwargs) -> nn.Module:
    """Build backbone ``name`` from a config (or kwargs for one)."""
    return model_class(name)(cfg if cfg is not None else model_config(name, **kwargs))
