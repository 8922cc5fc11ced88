"""What every Hugging Face mapping shares: activation names, refusals, and the conversion of state
dicts through a model's weight map (``helm.hf.gpt2``, ``bert``, ``mamba``)."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from helm.errors import ExportError

# A weight map: HF parameter name -> (HELM parameter name, how). how: None (copy), "t" (transpose),
# "vocab" (rows are the vocabulary: HF holds the tokenizer's rows, HELM pads them), ("qkv", i)
# (chunk i of 3 of HELM's fused qkv).
WeightMap = dict[str, tuple[str, Any]]

ACTIVATIONS_TO_HF = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "relu": "relu",
    "silu": "silu",
}
# HF activation name -> HELM's (gelu_new is the tanh formula written out).
ACTIVATIONS_TO_HELM = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                       "relu": "relu", "silu": "silu", "swish": "silu"}  # fmt: skip
NATIVE_HINT = "export the HELM-native folder instead: eval.py export CKPT --format helm --out DIR"
# Model-config fields under their command-line names (for messages).
FLAG_NAMES = {"d_model": "hidden_size", "d_ff": "intermediate_size"}


def flag(field: str) -> str:
    return "--" + FLAG_NAMES.get(field, field)


def require(module: str):
    """Import an optional package of the ``hf`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"this needs the {module} package: pip install -e '.[hf]' (transformers, safetensors)"
        ) from None


def refuse(option: str, why: str) -> ExportError:
    return ExportError(f"cannot export to Hugging Face: {option}: {why}; {NATIVE_HINT}")


def import_refusal(path, what: str) -> ExportError:
    return ExportError(f"{path}: cannot load this Hugging Face model into HELM: {what}")


def to_hf_state(
    weights: WeightMap, state: dict[str, torch.Tensor], vocab_size: int
) -> dict[str, torch.Tensor]:
    """HF parameter name -> tensor, from a HELM backbone's state dict."""
    out = {}
    for theirs, (ours, how) in weights.items():
        value = state[ours]
        if how == "t":
            value = value.T
        elif how == "vocab":
            value = value[:vocab_size]
        elif isinstance(how, tuple):
            value = value.chunk(3, dim=0)[how[1]]
        out[theirs] = value.contiguous()
    return out


def from_hf_state(weights: WeightMap, cfg, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A HELM backbone's state dict from HF parameters (the inverse of ``to_hf_state``): vocabulary
    rows padded with zeros to ``cfg.padded_vocab_size``; tied heads share the embedding."""
    state: dict[str, Any] = {}
    for theirs, (ours, how) in weights.items():
        value = hf[theirs]
        if how == "t":
            value = value.T
        elif how == "vocab":
            rows = value[: cfg.vocab_size]
            value = rows.new_zeros((cfg.padded_vocab_size, *rows.shape[1:]))
            value[: cfg.vocab_size] = rows
        elif isinstance(how, tuple):
            state.setdefault(ours, [None] * 3)[how[1]] = value
            continue
        state[ours] = value.contiguous()
    for key, parts in state.items():
        if isinstance(parts, list):
            state[key] = torch.cat(parts, dim=0)
    if cfg.tie_embeddings:
        state["lm_head.proj.weight"] = state["embed.tok.weight"]
    return state
