"""BERT <-> ``transformers.BertForMaskedLM`` (``BertLMHeadModel`` when causal): the weight map and
the configs, both directions.

Exact for learned absolute positions that are added, GELU, and BERT's MLM head (dense + GELU +
LayerNorm, then the projection with a bias). HELM has no segment embedding: the export writes one
zero row, and an import folds row 0 of a trained one into the position table (exact for inputs of
segment 0, the default). HELM's fused qkv holds HF's query, key and value stacked.
"""

from __future__ import annotations

from typing import Any

from helm.hf.common import ACTIVATIONS_TO_HELM, ACTIVATIONS_TO_HF, WeightMap, import_refusal, refuse


def weight_map(cfg) -> WeightMap:
    """HF parameter name -> (HELM parameter name, how); ("qkv", i): chunk i of HELM's qkv."""
    e, m = "bert.embeddings.", {}
    m[e + "word_embeddings.weight"] = ("embed.tok.weight", "vocab")
    m[e + "position_embeddings.weight"] = ("embed.pos.weight", None)
    m[e + "LayerNorm.weight"] = ("embed_norm.weight", None)
    m[e + "LayerNorm.bias"] = ("embed_norm.bias", None)
    for i in range(cfg.num_layers):
        h, b = f"bert.encoder.layer.{i}.", f"blocks.{i}."
        for w in ("weight", "bias"):
            for j, x in enumerate(("query", "key", "value")):
                m[h + f"attention.self.{x}.{w}"] = (b + f"attn.qkv.{w}", ("qkv", j))
            for theirs, ours in (("attention.output.dense", "attn.proj"),
                                 ("attention.output.LayerNorm", "ln_1"),
                                 ("intermediate.dense", "mlp.fc_in"),
                                 ("output.dense", "mlp.fc_out"), ("output.LayerNorm", "ln_2")):  # fmt: skip
                m[h + f"{theirs}.{w}"] = (b + f"{ours}.{w}", None)
    p = "cls.predictions."
    for w in ("weight", "bias"):
        m[p + f"transform.dense.{w}"] = (f"lm_head.dense.{w}", None)
        m[p + f"transform.LayerNorm.{w}"] = (f"lm_head.norm.{w}", None)
    m[p + "bias"] = ("lm_head.bias", "vocab")
    m[p + "decoder.bias"] = ("lm_head.bias", "vocab")  # the one HF's forward adds (untied)
    if not cfg.tie_embeddings:  # tied heads are HF's tie_word_embeddings
        m[p + "decoder.weight"] = ("lm_head.proj.weight", "vocab")
    return m


def check_exportable(cfg) -> None:
    if cfg.pos_embedding != "absolute":
        raise refuse(
            f"--pos_embedding {cfg.pos_embedding}", "HF BERT has learned absolute positions only"
        )
    if cfg.pos_embedding_apply != "add":
        raise refuse("--pos_embedding_apply concat", "HF adds positions to the tokens")
    if cfg.activation != "gelu":
        why = (
            "HF BERT's MLM head applies the MLP's activation where HELM's applies GELU"
            if cfg.activation in ACTIVATIONS_TO_HF
            else "the HF model's MLP takes one of gelu"
        )
        raise refuse(f"--activation {cfg.activation}", why)
    if cfg.mlm_head != "transform":
        raise refuse("mlm_head=linear", "HF BERT's MLM head always has the dense transform")


def hf_class(hf_or_cfg) -> str:
    causal = (
        hf_or_cfg.is_decoder if hasattr(hf_or_cfg, "is_decoder") else not hf_or_cfg.bidirectional
    )
    return "BertLMHeadModel" if causal else "BertForMaskedLM"


def hf_config(transformers, cfg, common: dict[str, Any]):
    return transformers.BertConfig(
        hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attn_dropout,
        max_position_embeddings=cfg.max_seq_len, type_vocab_size=1,
        layer_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        is_decoder=not cfg.bidirectional, architectures=[hf_class(cfg)], **common,
    )  # fmt: skip


def helm_fields(hf, path) -> dict[str, Any]:
    """HELM's BertConfig fields of a HF BERT config; refuses what HELM cannot compute exactly."""
    act = hf.hidden_act
    if getattr(hf, "add_cross_attention", False):
        raise import_refusal(path, "cross-attention (add_cross_attention) has no HELM equivalent")
    if ACTIVATIONS_TO_HELM.get(act) != "gelu":
        raise import_refusal(path, f"hidden_act={act!r} has no HELM equivalent here")
    if getattr(hf, "position_embedding_type", "absolute") != "absolute":
        raise import_refusal(path, f"position_embedding_type={hf.position_embedding_type!r}")
    return dict(
        d_model=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, d_ff=hf.intermediate_size, activation="gelu",
        max_seq_len=hf.max_position_embeddings, norm_eps=hf.layer_norm_eps,
        dropout=hf.hidden_dropout_prob, attn_dropout=hf.attention_probs_dropout_prob,
        pos_embedding="absolute", bidirectional=not hf.is_decoder, mlm_head="transform",
    )  # fmt: skip


def finish_export(params: dict, mapped: dict) -> None:
    """HELM has no segment embedding: HF's gets one zero row (marked as written in ``mapped``)."""
    params["bert.embeddings.token_type_embeddings.weight"].zero_()
    mapped["bert.embeddings.token_type_embeddings.weight"] = None


def finish_import(state: dict, hf_state: dict) -> None:
    """Segment 0's embedding is a constant added at every position: fold it into the positions."""
    segment = hf_state["bert.embeddings.token_type_embeddings.weight"][0]
    state["embed.pos.weight"] = state["embed.pos.weight"] + segment
