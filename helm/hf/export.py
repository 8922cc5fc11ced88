"""Exports: a Hugging Face ``transformers`` folder (exact, or refused naming the option) and the
HELM-native folder (any model)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from helm.checkpoint import LoadedModel
from helm.fileio import staged_folder
from helm.hf import mapping
from helm.hf.card import model_card
from helm.hf.common import require, to_hf_state
from helm.hf.tokenizer import hf_tokenizer

log = logging.getLogger("helm")

HELM_CONFIG = "helm_config.json"
WEIGHTS = "model.safetensors"
NATIVE_FORMAT_VERSION = 1


def check_exportable(model_name: str, cfg) -> None:
    """Raise ExportError naming the first option that HF's equivalent model cannot hold."""
    mapping(model_name).check_exportable(cfg)


def hf_config(model_name: str, cfg, vocab_size: int):
    """The ``transformers`` config object of a HELM model config (``check_exportable`` first)."""
    transformers = require("transformers")
    check_exportable(model_name, cfg)
    common = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=cfg.tie_embeddings, vocab_size=vocab_size)  # fmt: skip
    return mapping(model_name).hf_config(transformers, cfg, common)


def _loaded(src, ema: bool) -> LoadedModel:
    from helm.hf.load import load_model

    return src if isinstance(src, LoadedModel) else load_model(src, ema=ema)


def export_hf(src, out_dir: str | os.PathLike, *, ema: bool = False) -> Path:
    """Write a ``transformers`` folder (config.json, model.safetensors, tokenizer, README.md,
    SHA256SUMS) of a checkpoint, HELM folder, HF folder or LoadedModel; refuses what HF cannot
    hold exactly. The files are written beside ``out_dir`` and moved in once all are complete."""
    transformers = require("transformers")
    require("safetensors")
    loaded = _loaded(src, ema)
    name, cfg = loaded.model_name, loaded.model.cfg
    check_exportable(name, cfg)
    V = loaded.tokenizer.vocab_size
    config = hf_config(name, cfg, V)
    arch = config.architectures[0]
    hf = getattr(transformers, arch)(config).eval()
    state = {k: v.detach().float().cpu() for k, v in loaded.model.state_dict().items()}
    mapped = to_hf_state(mapping(name).weight_map(cfg), state, V)
    params = dict(hf.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in mapped.items():
            params[key].copy_(value)
        mapping(name).finish_export(params, mapped)
    written = {params[k].data_ptr() for k in mapped}
    missing = [k for k, p in params.items() if p.data_ptr() not in written]
    if missing:  # a mapping that forgot a parameter must never ship random weights
        raise RuntimeError(f"export_hf({name}): no HELM weights for {missing}")
    out = Path(out_dir)
    with staged_folder(out, what="export") as stage:  # all files or none, SHA256SUMS last
        hf.save_pretrained(stage, safe_serialization=True)
        causal = not cfg.bidirectional
        hf_tokenizer(loaded.tokenizer, causal, cfg.max_seq_len).save_pretrained(stage)
        (stage / "README.md").write_text(model_card(loaded, "hf", arch))
    log.info("wrote %s: transformers.%s, tokenizer %s", out, arch, loaded.tokenizer.name)
    return out


def export_helm(src, out_dir: str | os.PathLike, *, ema: bool = False) -> Path:
    """Write a HELM-native folder (any model): model.safetensors, helm_config.json (model and
    training config, codon tree, last validation metrics), tokenizer/, README.md and SHA256SUMS
    (``export_hf``'s atomicity)."""
    st = require("safetensors.torch")
    loaded = _loaded(src, ema)
    out = Path(out_dir)
    ckpt = loaded.checkpoint
    weights = ckpt.get("source", {}).get("weights", "ema" if ema else "raw")
    meta = {
        "format": "helm",
        "format_version": NATIVE_FORMAT_VERSION,
        "model_name": loaded.model_name,
        "model_config": dataclasses.asdict(loaded.model.cfg),
        "config": loaded.config,
        "hierarchy": loaded.hierarchy.state_dict() if loaded.hierarchy is not None else None,
        "epoch_metrics": ckpt.get("epoch_metrics"),
        "weights": weights,
    }
    with staged_folder(out, what="export") as stage:  # all files or none, SHA256SUMS last
        st.save_model(loaded.model, str(stage / WEIGHTS))  # tied tensors are stored once
        loaded.tokenizer.save(stage / "tokenizer")
        (stage / HELM_CONFIG).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        (stage / "README.md").write_text(model_card(loaded, "helm"))
    log.info("wrote %s: HELM-native %s", out, loaded.model_name)
    return out
