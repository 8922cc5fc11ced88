"""Mamba <-> ``transformers.MambaForCausalLM`` / ``Mamba2ForCausalLM``: the weight map and the
configs, both directions.

HF's Mamba block is the mixer alone: a causal HELM Mamba exports exactly when trained without an
MLP (``--intermediate_size 0``) and without positions (``--pos_embedding none``).
"""

from __future__ import annotations

from typing import Any

from helm.hf.common import WeightMap, import_refusal, refuse

MIXER_1 = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
           "dt_proj.bias", "A_log", "D", "out_proj.weight")  # fmt: skip
MIXER_2 = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
           "norm.weight", "out_proj.weight")  # fmt: skip


def weight_map(cfg) -> WeightMap:
    """HF parameter name -> (HELM parameter name, how): the same names inside each mixer."""
    names = MIXER_1 if cfg.ssm_layer == "mamba" else MIXER_2
    m: WeightMap = {"backbone.embeddings.weight": ("embed.tok.weight", "vocab")}
    for i in range(cfg.num_layers):
        m[f"backbone.layers.{i}.norm.weight"] = (f"blocks.{i}.mixer_norm.weight", None)
        for n in names:
            m[f"backbone.layers.{i}.mixer.{n}"] = (f"blocks.{i}.mixer.{n}", None)
    m["backbone.norm_f.weight"] = ("norm_f.weight", None)
    if not cfg.tie_embeddings:  # tied heads are HF's tie_word_embeddings
        m["lm_head.weight"] = ("lm_head.proj.weight", "vocab")
    return m


def check_exportable(cfg) -> None:
    if cfg.bidirectional:
        raise refuse("--bidirectional (mamba)", "HF Mamba scans one direction")
    if cfg.d_ff:
        raise refuse(
            f"--intermediate_size {cfg.d_ff} (mamba)",
            "HF Mamba's block is the mixer alone, without an MLP; train with --intermediate_size 0",
        )
    if cfg.pos_embedding != "none":
        raise refuse(f"--pos_embedding {cfg.pos_embedding} (mamba)", "HF Mamba has no positions")


def hf_class(hf_or_cfg) -> str:
    kind = getattr(hf_or_cfg, "model_type", None) or hf_or_cfg.ssm_layer
    return "MambaForCausalLM" if kind == "mamba" else "Mamba2ForCausalLM"


def hf_config(transformers, cfg, common: dict[str, Any]):
    shared = dict(
        hidden_size=cfg.d_model, state_size=cfg.d_state, num_hidden_layers=cfg.num_layers,
        expand=cfg.expand, conv_kernel=cfg.d_conv, use_bias=False, use_conv_bias=True,
        hidden_act="silu", layer_norm_epsilon=cfg.norm_eps, time_step_min=cfg.dt_min,
        time_step_max=cfg.dt_max, time_step_floor=cfg.dt_init_floor,
        architectures=[hf_class(cfg)], **common,
    )  # fmt: skip
    if cfg.ssm_layer == "mamba":
        return transformers.MambaConfig(time_step_rank=cfg.dt_rank, **shared)
    return transformers.Mamba2Config(
        num_heads=cfg.d_inner // cfg.headdim, head_dim=cfg.headdim, n_groups=cfg.ngroups,
        chunk_size=cfg.chunk_size, **shared,
    )  # fmt: skip


def helm_fields(hf, path) -> dict[str, Any]:
    """HELM's MambaConfig fields of a HF Mamba or Mamba-2 config; refuses what HELM cannot
    compute exactly."""
    if hf.use_bias or not hf.use_conv_bias or hf.hidden_act != "silu":
        raise import_refusal(path, "use_bias, no conv bias or an activation other than silu")
    fields = dict(
        d_model=hf.hidden_size, num_layers=hf.num_hidden_layers, d_ff=0,
        d_state=hf.state_size, d_conv=hf.conv_kernel, expand=hf.expand,
        norm_eps=hf.layer_norm_epsilon, ssm_layer=hf.model_type, pos_embedding="none",
    )  # fmt: skip
    if hf.model_type == "mamba":
        return fields | dict(dt_rank=hf.time_step_rank)
    limit = tuple(float(x) for x in hf.time_step_limit)
    if limit != (0.0, float("inf")) or hf.num_heads * hf.head_dim != hf.expand * hf.hidden_size:
        raise import_refusal(path, "a time_step_limit or num_heads * head_dim != d_inner")
    return fields | dict(headdim=hf.head_dim, ngroups=hf.n_groups, chunk_size=hf.chunk_size)


def finish_export(params: dict, mapped: dict) -> None:
    """Parameters of the HF model that HELM has no weights for: none."""


def finish_import(state: dict, hf_state: dict) -> None:
    """HF weights that fold into HELM's: none."""
