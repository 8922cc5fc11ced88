"""GPT-2 <-> ``transformers.GPT2LMHeadModel``: the weight map and the configs, both directions.

Exact for learned absolute positions that are added, and the activations HF GPT-2 has (gelu,
gelu_tanh, relu, silu); a bidirectional (MLM) model exports with ``is_causal: false``.
"""

from __future__ import annotations

from typing import Any

from helm.hf.common import ACTIVATIONS_TO_HELM, ACTIVATIONS_TO_HF, WeightMap, import_refusal, refuse

HF_CLASS = "GPT2LMHeadModel"


def weight_map(cfg) -> WeightMap:
    """HF parameter name -> (HELM parameter name, how); HF's Conv1D stores (in, out): "t"."""
    m: WeightMap = {
        "transformer.wte.weight": ("embed.tok.weight", "vocab"),
        "transformer.wpe.weight": ("embed.pos.weight", None),
    }
    for i in range(cfg.num_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        pairs = (("ln_1", "ln_1", None), ("ln_2", "ln_2", None), ("attn.c_attn", "attn.qkv", "t"),
                 ("attn.c_proj", "attn.proj", "t"), ("mlp.c_fc", "mlp.fc_in", "t"),
                 ("mlp.c_proj", "mlp.fc_out", "t"))  # fmt: skip
        for theirs, ours, how in pairs:
            m[h + theirs + ".weight"] = (b + ours + ".weight", how)
            m[h + theirs + ".bias"] = (b + ours + ".bias", None)
    m["transformer.ln_f.weight"] = ("norm_f.weight", None)
    m["transformer.ln_f.bias"] = ("norm_f.bias", None)
    if not cfg.tie_embeddings:  # tied heads are HF's tie_word_embeddings
        m["lm_head.weight"] = ("lm_head.proj.weight", "vocab")
    return m


def check_exportable(cfg) -> None:
    if cfg.pos_embedding != "absolute":
        raise refuse(
            f"--pos_embedding {cfg.pos_embedding}", "HF GPT2 has learned absolute positions only"
        )
    if cfg.pos_embedding_apply != "add":
        raise refuse("--pos_embedding_apply concat", "HF adds positions to the tokens")
    if cfg.activation not in ACTIVATIONS_TO_HF:
        raise refuse(
            f"--activation {cfg.activation}",
            f"the HF model's MLP takes one of {', '.join(ACTIVATIONS_TO_HF)}",
        )


def hf_config(transformers, cfg, common: dict[str, Any]):
    return transformers.GPT2Config(
        n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.num_layers,
        n_head=cfg.num_heads, n_inner=cfg.d_ff, activation_function=ACTIVATIONS_TO_HF[cfg.activation],
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout,
        layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
        is_causal=not cfg.bidirectional, architectures=[HF_CLASS], **common,
    )  # fmt: skip


def helm_fields(hf, path) -> dict[str, Any]:
    """HELM's GPT2Config fields of a HF GPT-2 config; refuses what HELM cannot compute exactly."""
    act = hf.activation_function
    if getattr(hf, "add_cross_attention", False):
        raise import_refusal(path, "cross-attention (add_cross_attention) has no HELM equivalent")
    if act not in ACTIVATIONS_TO_HELM:
        raise import_refusal(path, f"activation_function={act!r} has no HELM equivalent here")
    if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx:
        raise import_refusal(path, "GPT-2 attention scaling other than 1/sqrt(head_dim)")
    return dict(
        d_model=hf.n_embd, num_layers=hf.n_layer, num_heads=hf.n_head,
        d_ff=hf.n_inner or 4 * hf.n_embd, activation=ACTIVATIONS_TO_HELM[act],
        max_seq_len=hf.n_positions, norm_eps=hf.layer_norm_epsilon, dropout=hf.resid_pdrop,
        attn_dropout=hf.attn_pdrop, pos_embedding="absolute",
        bidirectional=not getattr(hf, "is_causal", True),
    )  # fmt: skip


def hf_class(hf) -> str:
    return HF_CLASS


def finish_export(params: dict, mapped: dict) -> None:
    """Parameters of the HF model that HELM has no weights for: none."""


def finish_import(state: dict, hf_state: dict) -> None:
    """HF weights that fold into HELM's: none."""
