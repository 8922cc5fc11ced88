"""Sharing models: an exact Hugging Face ``transformers`` export, a HELM-native folder for every
model, and one loader for a checkpoint, a HELM folder or a HF folder.

    export_hf(CKPT, DIR)      config.json + model.safetensors + tokenizer + README.md (model card)
    export_helm(CKPT, DIR)    helm_config.json + model.safetensors + tokenizer/ + README.md
    load_model(PATH)          -> LoadedModel, from any of the three (``helm.from_pretrained``)
    init_from(backbone, PATH) a new run's weights from any of the three (train.py --init-from)

By direction: ``export`` (both formats) and ``load`` (the three sources, ``init_from``); by model:
``gpt2``, ``bert`` and ``mamba`` hold each architecture's weight map and configs both ways;
``tokenizer`` converts tokenizers both ways and ``card`` writes the model card.

What exports to ``transformers`` exactly (same weights, same logits over the real vocabulary):

=============  ======================================  =========================================
HELM model     HF class (Auto class)                   required options
=============  ======================================  =========================================
gpt2           GPT2LMHeadModel (AutoModelForCausalLM)  pos_embedding absolute, apply add;
                                                       activation gelu | gelu_tanh | relu | silu;
                                                       bidirectional -> ``is_causal: false``
bert           BertForMaskedLM (AutoModelForMaskedLM)  pos_embedding absolute, apply add;
               BertLMHeadModel when causal             activation gelu; mlm_head transform
mamba          MambaForCausalLM                        ssm_layer mamba, d_ff 0 (no MLP),
                                                       pos_embedding none, causal
mamba (2)      Mamba2ForCausalLM                       ssm_layer mamba2, d_ff 0, pos_embedding none,
                                                       causal
=============  ======================================  =========================================

Everything else is refused with a message naming the option: hyena; sincos, none or concatenated
positions and rotary for the attention models (HF GPT-2 and BERT learn one absolute table that is
added); swiglu (and relu/silu for BERT, whose HF MLM head applies the MLP's activation where HELM's
uses GELU); BERT's bare linear head; bidirectional Mamba, Mamba with an MLP (HF's block is a mixer
alone) or with positions. Every model, those included, has the HELM-native export. Dropout is
carried over where HF has it (GPT-2, BERT) and has no effect at inference either way.

The vocabulary: HF gets the tokenizer's rows only (embedding padding dropped: it never receives
probability in HELM), and a ``PreTrainedTokenizerFast`` that frames input as HELM does
(``<cls> seq <eos>``; ``<cls> seq`` for causal models). BERT's segment embedding is exported as
one zero row; importing folds row 0 of a trained one into the position table (exact for inputs
of segment 0, the default).

Importing a HF folder needs a supported architecture and a tokenizer whose vocabulary is HELM's
codon (``3mer``) or nucleotide (``nuc``) vocabulary in HELM's order; it gets the true codon tree.
"""

from __future__ import annotations

from types import ModuleType

from helm.errors import ExportError
from helm.hf import bert, gpt2, mamba
from helm.hf.common import NATIVE_HINT, WeightMap

# HELM model name -> its mapping; HF model_type -> the same.
MAPPINGS: dict[str, ModuleType] = {"gpt2": gpt2, "bert": bert, "mamba": mamba}
HF_TYPES: dict[str, ModuleType] = {"gpt2": gpt2, "bert": bert, "mamba": mamba, "mamba2": mamba}


def mapping(model_name: str) -> ModuleType:
    """The Hugging Face mapping of a HELM model; refused, naming it, when transformers has none."""
    if model_name not in MAPPINGS:
        raise ExportError(
            f"cannot export to Hugging Face: --model_name {model_name}: transformers has no such "
            f"architecture; {NATIVE_HINT}"
        )
    return MAPPINGS[model_name]


def weight_map(model_name: str, cfg) -> WeightMap:
    """HF parameter name -> (HELM parameter name, how) of a HELM model (``helm.hf.common``)."""
    return mapping(model_name).weight_map(cfg)


from helm.hf.export import check_exportable, export_helm, export_hf, hf_config  # noqa: E402
from helm.hf.load import (  # noqa: E402
    init_from,
    load_model,
    resolve_checkpoint,
    run_config,
    weights_file,
)
from helm.hf.tokenizer import helm_tokenizer, hf_tokenizer  # noqa: E402

__all__ = [
    "ExportError",
    "check_exportable",
    "export_helm",
    "export_hf",
    "hf_config",
    "hf_tokenizer",
    "helm_tokenizer",
    "init_from",
    "load_model",
    "mapping",
    "resolve_checkpoint",
    "run_config",
    "weight_map",
    "weights_file",
]
