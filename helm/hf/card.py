"""The model card (README.md) of an exported folder: model, tokenizer, training data and loss,
validation metrics, usage and the training configuration."""

from __future__ import annotations

import json

from helm.checkpoint import LoadedModel
from helm.losses import describe
from helm.vocab import SPECIAL_TOKENS


def model_card(loaded: LoadedModel, fmt: str, hf_class: str | None = None) -> str:
    """README.md of an exported folder: model, tokenizer, training data and loss, metrics, usage."""
    cfg, ckpt = loaded.config, loaded.checkpoint
    mcfg = loaded.model.cfg
    mode = cfg.get("mode", "mlm" if mcfg.bidirectional else "clm")
    tags = ["helm", "mRNA", "codon", "biology", fmt if fmt == "helm" else "transformers"]
    lines = ["---", "tags:"] + [f"- {t}" for t in tags]
    if fmt == "hf":
        task = "fill-mask" if mcfg.bidirectional and mode == "mlm" else "text-generation"
        lines += ["library_name: transformers", f"pipeline_tag: {task}"]
    lines += ["---", "", f"# HELM {loaded.model_name} ({mode.upper()})", ""]
    size = sum(p.numel() for p in loaded.model.parameters())
    lines += [
        f"- Architecture: HELM `{loaded.model_name}`"
        + (f", exported exactly as `transformers.{hf_class}`" if hf_class else "")
        + f"; {size / 1e6:.2f}M parameters; {'bidirectional' if mcfg.bidirectional else 'causal'}.",
        f"- Tokenizer: `{loaded.tokenizer.name}` ({loaded.tokenizer.vocab_size} tokens; "
        f"{', '.join(SPECIAL_TOKENS)} at ids 0-4); input framed as `<cls> sequence"
        + ("`." if not mcfg.bidirectional else " <eos>`."),
    ]
    if cfg.get("train_file") or cfg.get("data_dir"):
        data = ", ".join(f"{k}={cfg[k]}" for k in ("data_dir", "train_file", "val_file",
                                                   "test_file") if cfg.get(k))  # fmt: skip
    else:
        data = "the built-in synthetic demo corpus" if cfg.get("demo_corpus") else "not recorded"
    lines.append(f"- Training data: {data}.")
    loss = describe(cfg["loss"], cfg) if "loss" in cfg else "unknown"
    tree = loaded.hierarchy.state_dict() if loaded.hierarchy is not None else {}
    seed = f", seed {tree['seed']}" if tree.get("seed") is not None else ""
    lines.append(f"- Loss: {loss}; codon tree: {tree.get('kind', 'none')}{seed}.")
    weights = ckpt.get("source", {}).get("weights", "raw")
    lines.append(f"- Weights: {weights}.")
    lines += ["", "## Validation metrics", ""]
    epoch_metrics = ckpt.get("epoch_metrics") or {}
    metrics = epoch_metrics.get("metrics") or {}
    if metrics:
        lines.append(
            f"After epoch {epoch_metrics.get('epoch')} (step {epoch_metrics.get('step')}):"
        )
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    else:
        lines.append("None recorded (the run had no validation split, or it was not HELM's).")
    lines += ["", "## Usage", "", "```python"]
    if fmt == "hf":
        auto = "AutoModelForMaskedLM" if hf_class == "BertForMaskedLM" else "AutoModelForCausalLM"
        lines += [
            f"from transformers import AutoTokenizer, {auto}",
            "tok = AutoTokenizer.from_pretrained(PATH)",
            f"model = {auto}.from_pretrained(PATH)",
            'logits = model(**tok(["ATGAAACCCGGGTAA"], return_tensors="pt")).logits',
        ]
    else:
        lines += ["import helm", "loaded = helm.from_pretrained(PATH)  # model, tokenizer, tree"]
    lines += ["```", ""]
    if fmt == "hf" and getattr(loaded.tokenizer, "overlap", 0):
        lines += ["Overlapping k-mers: give the sequence as k-mers separated by spaces.", ""]
    config = {k: v for k, v in cfg.items() if k != "config"}
    lines += ["## Training configuration", "", "```json"]
    lines += [json.dumps(config, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)
