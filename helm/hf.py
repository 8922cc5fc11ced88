"""Sharing models: an exact Hugging Face ``transformers`` export, a HELM-native folder for every
model, and one loader for a checkpoint, a HELM folder or a HF folder.

    export_hf(CKPT, DIR)      config.json + model.safetensors + tokenizer + README.md (model card)
    export_helm(CKPT, DIR)    helm_config.json + model.safetensors + tokenizer/ + README.md
    load_model(PATH)          -> LoadedModel, from any of the three (``helm.from_pretrained``)

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

import dataclasses
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from helm.checkpoint import LoadedModel, load_for_eval
from helm.errors import CheckpointError, ExportError
from helm.vocab import NUM_SPECIAL, SPECIAL_TOKENS

log = logging.getLogger("helm")

HELM_CONFIG = "helm_config.json"
WEIGHTS = "model.safetensors"
NATIVE_FORMAT_VERSION = 1
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
# HF activation name -> HELM's (gelu_new is the tanh formula written out).
HELM_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                    "relu": "relu", "silu": "silu", "swish": "silu"}  # fmt: skip
# Model-config fields under their command-line names (for messages).
FLAG_NAMES = {"d_model": "hidden_size", "d_ff": "intermediate_size"}
NATIVE_HINT = "export the HELM-native folder instead: eval.py export CKPT --format helm --out DIR"


def _flag(field: str) -> str:
    return "--" + FLAG_NAMES.get(field, field)


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"this needs the {module} package: pip install -e '.[hf]' (transformers, safetensors)"
        ) from None


# The weight mapping: HF parameter name -> (HELM parameter name, how) ------------------------------
# how: None (copy), "t" (transpose: HF GPT-2's Conv1D stores (in, out)), "vocab" (rows are the
# vocabulary: HF holds the tokenizer's rows, HELM pads them), ("qkv", i) (HELM's fused qkv holds
# HF's query, key, value stacked: chunk i of 3).


def weight_map(model_name: str, cfg) -> dict[str, tuple[str, Any]]:
    """The one mapping between a HELM backbone's parameters and its HF model's (module comment)."""
    m: dict[str, tuple[str, Any]] = {}
    L = cfg.num_layers
    if model_name == "gpt2":
        m["transformer.wte.weight"] = ("embed.tok.weight", "vocab")
        m["transformer.wpe.weight"] = ("embed.pos.weight", None)
        for i in range(L):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            pairs = (("ln_1", "ln_1", None), ("ln_2", "ln_2", None), ("attn.c_attn", "attn.qkv", "t"),
                     ("attn.c_proj", "attn.proj", "t"), ("mlp.c_fc", "mlp.fc_in", "t"),
                     ("mlp.c_proj", "mlp.fc_out", "t"))  # fmt: skip
            for theirs, ours, how in pairs:
                m[h + theirs + ".weight"] = (b + ours + ".weight", how)
                m[h + theirs + ".bias"] = (b + ours + ".bias", None)
        m["transformer.ln_f.weight"] = ("norm_f.weight", None)
        m["transformer.ln_f.bias"] = ("norm_f.bias", None)
        head = "lm_head.weight"
    elif model_name == "bert":
        e = "bert.embeddings."
        m[e + "word_embeddings.weight"] = ("embed.tok.weight", "vocab")
        m[e + "position_embeddings.weight"] = ("embed.pos.weight", None)
        m[e + "LayerNorm.weight"] = ("embed_norm.weight", None)
        m[e + "LayerNorm.bias"] = ("embed_norm.bias", None)
        for i in range(L):
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
        head = p + "decoder.weight"
    elif model_name == "mamba":
        names = (("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                  "dt_proj.bias", "A_log", "D", "out_proj.weight") if cfg.ssm_layer == "mamba" else
                 ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
                  "norm.weight", "out_proj.weight"))  # fmt: skip
        m["backbone.embeddings.weight"] = ("embed.tok.weight", "vocab")
        for i in range(L):
            m[f"backbone.layers.{i}.norm.weight"] = (f"blocks.{i}.mixer_norm.weight", None)
            for n in names:
                m[f"backbone.layers.{i}.mixer.{n}"] = (f"blocks.{i}.mixer.{n}", None)
        m["backbone.norm_f.weight"] = ("norm_f.weight", None)
        head = "lm_head.weight"
    else:
        raise ExportError(
            f"--model_name {model_name} has no Hugging Face equivalent; {NATIVE_HINT}"
        )
    if not cfg.tie_embeddings:  # tied heads are HF's tie_word_embeddings
        m[head] = ("lm_head.proj.weight", "vocab")
    return m


def to_hf_state(model_name: str, cfg, state: dict[str, torch.Tensor], vocab_size: int) -> dict:
    """HF parameter name -> tensor, from a HELM backbone's state dict (``weight_map``)."""
    out = {}
    for theirs, (ours, how) in weight_map(model_name, cfg).items():
        value = state[ours]
        if how == "t":
            value = value.T
        elif how == "vocab":
            value = value[:vocab_size]
        elif isinstance(how, tuple):
            value = value.chunk(3, dim=0)[how[1]]
        out[theirs] = value.contiguous()
    return out


def from_hf_state(model_name: str, cfg, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A HELM backbone's state dict from HF parameters (the inverse of ``to_hf_state``): vocabulary
    rows padded with zeros to ``cfg.padded_vocab_size``; tied heads share the embedding."""
    state: dict[str, Any] = {}
    for theirs, (ours, how) in weight_map(model_name, cfg).items():
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


# HELM model config <-> HF config ------------------------------------------------------------------


def _refuse(option: str, why: str) -> ExportError:
    return ExportError(f"cannot export to Hugging Face: {option}: {why}; {NATIVE_HINT}")


def check_exportable(model_name: str, cfg) -> None:
    """Raise ExportError naming the first option that HF's equivalent model cannot hold."""
    if model_name not in ("gpt2", "bert", "mamba"):
        raise _refuse(f"--model_name {model_name}", "transformers has no such architecture")
    if model_name in ("gpt2", "bert"):
        if cfg.pos_embedding != "absolute":
            raise _refuse(
                f"--pos_embedding {cfg.pos_embedding}",
                f"HF {model_name.upper()} has learned absolute positions only",
            )
        if cfg.pos_embedding_apply != "add":
            raise _refuse("--pos_embedding_apply concat", "HF adds positions to the tokens")
        allowed = HF_ACTIVATIONS if model_name == "gpt2" else {"gelu": "gelu"}
        if cfg.activation not in allowed:
            why = (
                "HF BERT's MLM head applies the MLP's activation where HELM's applies GELU"
                if model_name == "bert" and cfg.activation in HF_ACTIVATIONS
                else f"the HF model's MLP takes one of {', '.join(allowed)}"
            )
            raise _refuse(f"--activation {cfg.activation}", why)
        if model_name == "bert" and cfg.mlm_head != "transform":
            raise _refuse("mlm_head=linear", "HF BERT's MLM head always has the dense transform")
        return
    if cfg.bidirectional:
        raise _refuse("--bidirectional (mamba)", "HF Mamba scans one direction")
    if cfg.d_ff:
        raise _refuse(
            f"--intermediate_size {cfg.d_ff} (mamba)",
            "HF Mamba's block is the mixer alone, without an MLP; train with --intermediate_size 0",
        )
    if cfg.pos_embedding != "none":
        raise _refuse(f"--pos_embedding {cfg.pos_embedding} (mamba)", "HF Mamba has no positions")


def hf_config(model_name: str, cfg, vocab_size: int):
    """The ``transformers`` config object of a HELM model config (``check_exportable`` first)."""
    transformers = _require("transformers")
    check_exportable(model_name, cfg)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tie = dict(tie_word_embeddings=cfg.tie_embeddings, vocab_size=vocab_size)
    if model_name == "gpt2":
        return transformers.GPT2Config(
            n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.num_layers,
            n_head=cfg.num_heads, n_inner=cfg.d_ff, activation_function=HF_ACTIVATIONS[cfg.activation],
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout,
            layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
            is_causal=not cfg.bidirectional, architectures=["GPT2LMHeadModel"], **ids, **tie,
        )  # fmt: skip
    if model_name == "bert":
        causal = not cfg.bidirectional
        return transformers.BertConfig(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff, hidden_act="gelu",
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attn_dropout,
            max_position_embeddings=cfg.max_seq_len, type_vocab_size=1,
            layer_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, is_decoder=causal,
            architectures=["BertLMHeadModel" if causal else "BertForMaskedLM"], **ids, **tie,
        )  # fmt: skip
    common = dict(
        hidden_size=cfg.d_model, state_size=cfg.d_state, num_hidden_layers=cfg.num_layers,
        expand=cfg.expand, conv_kernel=cfg.d_conv, use_bias=False, use_conv_bias=True,
        hidden_act="silu", layer_norm_epsilon=cfg.norm_eps, time_step_min=cfg.dt_min,
        time_step_max=cfg.dt_max, time_step_floor=cfg.dt_init_floor, **ids, **tie,
    )  # fmt: skip
    if cfg.ssm_layer == "mamba":
        return transformers.MambaConfig(
            time_step_rank=cfg.dt_rank, architectures=["MambaForCausalLM"], **common
        )
    return transformers.Mamba2Config(
        num_heads=cfg.d_inner // cfg.headdim, head_dim=cfg.headdim, n_groups=cfg.ngroups,
        chunk_size=cfg.chunk_size, architectures=["Mamba2ForCausalLM"], **common,
    )  # fmt: skip


def _import_refusal(path, what: str) -> ExportError:
    return ExportError(f"{path}: cannot load this Hugging Face model into HELM: {what}")


def helm_fields(hf, path) -> tuple[str, dict[str, Any]]:
    """(HELM model name, model-config fields) of a ``transformers`` config; refuses what HELM
    cannot compute exactly."""
    kind = hf.model_type
    act_key = "activation_function" if kind == "gpt2" else "hidden_act"
    act = getattr(hf, act_key, None)
    if kind in ("gpt2", "bert"):
        if getattr(hf, "add_cross_attention", False):
            raise _import_refusal(
                path, "cross-attention (add_cross_attention) has no HELM equivalent"
            )
        if act not in HELM_ACTIVATIONS or (kind == "bert" and HELM_ACTIVATIONS[act] != "gelu"):
            raise _import_refusal(path, f"{act_key}={act!r} has no HELM equivalent here")
    if kind == "gpt2":
        if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx:
            raise _import_refusal(path, "GPT-2 attention scaling other than 1/sqrt(head_dim)")
        return "gpt2", dict(
            d_model=hf.n_embd, num_layers=hf.n_layer, num_heads=hf.n_head,
            d_ff=hf.n_inner or 4 * hf.n_embd, activation=HELM_ACTIVATIONS[act],
            max_seq_len=hf.n_positions, norm_eps=hf.layer_norm_epsilon, dropout=hf.resid_pdrop,
            attn_dropout=hf.attn_pdrop, pos_embedding="absolute",
            bidirectional=not getattr(hf, "is_causal", True),
        )  # fmt: skip
    if kind == "bert":
        if getattr(hf, "position_embedding_type", "absolute") != "absolute":
            raise _import_refusal(path, f"position_embedding_type={hf.position_embedding_type!r}")
        return "bert", dict(
            d_model=hf.hidden_size, num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads, d_ff=hf.intermediate_size, activation="gelu",
            max_seq_len=hf.max_position_embeddings, norm_eps=hf.layer_norm_eps,
            dropout=hf.hidden_dropout_prob, attn_dropout=hf.attention_probs_dropout_prob,
            pos_embedding="absolute", bidirectional=not hf.is_decoder, mlm_head="transform",
        )  # fmt: skip
    if kind in ("mamba", "mamba2"):
        if hf.use_bias or not hf.use_conv_bias or act != "silu":
            raise _import_refusal(path, "use_bias, no conv bias or an activation other than silu")
        fields = dict(
            d_model=hf.hidden_size, num_layers=hf.num_hidden_layers, d_ff=0,
            d_state=hf.state_size, d_conv=hf.conv_kernel, expand=hf.expand,
            norm_eps=hf.layer_norm_epsilon, ssm_layer=kind, pos_embedding="none",
        )  # fmt: skip
        if kind == "mamba":
            return "mamba", fields | dict(dt_rank=hf.time_step_rank)
        limit = tuple(float(x) for x in hf.time_step_limit)
        if limit != (0.0, float("inf")) or hf.num_heads * hf.head_dim != hf.expand * hf.hidden_size:
            raise _import_refusal(path, "a time_step_limit or num_heads * head_dim != d_inner")
        return "mamba", fields | dict(headdim=hf.head_dim, ngroups=hf.n_groups,
                                      chunk_size=hf.chunk_size)  # fmt: skip
    raise _import_refusal(path, f"model_type {kind!r}; supported: gpt2, bert, mamba, mamba2")


# Tokenizers ---------------------------------------------------------------------------------------


def hf_tokenizer(tokenizer, causal: bool, max_length: int):
    """A ``transformers.PreTrainedTokenizerFast`` with the HELM tokenizer's ids and framing.

    k-mers without overlap split the raw sequence (a trailing partial k-mer dropped, a k-mer with
    another letter <unk>, lower case and U read as ACGT); overlapping k-mers are given as words
    separated by spaces (the DNABERT convention: HF tokenizers cannot emit overlapping pieces);
    sentencepiece and WordPiece models are carried over piece for piece.
    """
    transformers = _require("transformers")
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    from helm.tokenizers import KmerTokenizer, ProteinTokenizer, SentencePieceTokenizer

    vocab = {t: i for i, t in enumerate(tokenizer.tokens)}
    unk = SPECIAL_TOKENS[3]
    if isinstance(tokenizer, (KmerTokenizer, ProteinTokenizer)):
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
        k = getattr(tokenizer, "k", 1)
        if isinstance(tokenizer, KmerTokenizer):
            fixes = [normalizers.Replace(a, b) for a, b in zip("acgtuU", "ACGTTT")]
            backend.normalizer = normalizers.Sequence([normalizers.Strip(), *fixes])
        if getattr(tokenizer, "overlap", 0):
            backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        else:
            steps = [pre_tokenizers.Split(Regex(f".{{{k}}}"), behavior="isolated")]
            if k > 1:  # the trailing partial k-mer is its own piece: remove it
                steps.append(pre_tokenizers.Split(Regex(f"^.{{1,{k - 1}}}$"), behavior="removed"))
            backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        sp = tokenizer._sp
        if tokenizer.name == "ug":
            pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
            backend = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
        else:  # BPE: a piece's merge ranks by its id (sentencepiece orders BPE pieces by score)
            merges = [
                (p[:j], p[j:])
                for p in tokenizer.tokens[NUM_SPECIAL:]
                for j in range(1, len(p))
                if p[:j] in vocab and p[j:] in vocab
            ]
            merges.sort(key=lambda m: vocab[m[0] + m[1]])
            backend = Tokenizer(
                models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True)
            )
    else:  # WordPiece: already a HF tokenizers model
        backend = Tokenizer.from_str(tokenizer._hf.to_str())
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    cls, eos = SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]
    single = f"{cls} $A" if causal else f"{cls} $A {eos}"
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(cls, vocab[cls]), (eos, vocab[eos])]
    )
    pad, _, _, _, mask = SPECIAL_TOKENS
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=cls, eos_token=eos, unk_token=unk, pad_token=pad,
        mask_token=mask, cls_token=cls, sep_token=eos, model_max_length=max_length,
    )  # fmt: skip


def helm_tokenizer(path: Path):
    """The HELM k-mer tokenizer whose vocabulary, in order, is the HF folder's (codon or
    nucleotide); anything else is refused."""
    transformers = _require("transformers")
    from helm.tokenizers import KmerTokenizer
    from helm.vocab import kmer_vocab

    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise _import_refusal(path, f"no tokenizer could be read ({exc})") from None
    vocab = hf_tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    for k, name in ((3, "codon"), (1, "nucleotide")):
        if tokens == kmer_vocab(k) and [vocab[t] for t in tokens] == list(range(len(tokens))):
            log.info("%s: %s vocabulary (HELM order)", path, name)
            return KmerTokenizer(k)
    shown = ", ".join(tokens[:8])
    raise _import_refusal(
        path,
        f"its tokenizer's vocabulary ({len(tokens)} tokens: {shown}, ...) is not HELM's codon or "
        f"nucleotide vocabulary in HELM's order ({', '.join(SPECIAL_TOKENS)}, then the k-mers "
        "over ACGT in lexicographic order)",
    )


# Model card ---------------------------------------------------------------------------------------


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
    loss = cfg.get("loss", "unknown")
    if loss == "HXE":
        norm = "normalised" if cfg.get("hxe_normalize", True) else "unnormalised"
        loss += f" (alpha {cfg.get('hxe_alpha')}, {norm} weights)"
    elif loss == "soft_labels":
        loss += f" (beta {cfg.get('soft_labels_beta')})"
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


# Export -------------------------------------------------------------------------------------------


def _loaded(src, ema: bool) -> LoadedModel:
    return src if isinstance(src, LoadedModel) else load_model(src, ema=ema)


def export_hf(src, out_dir: str | os.PathLike, *, ema: bool = False) -> Path:
    """Write a ``transformers`` folder (config.json, model.safetensors, tokenizer, README.md) of a
    checkpoint, HELM folder, HF folder or LoadedModel; refuses what HF cannot hold exactly."""
    transformers = _require("transformers")
    _require("safetensors")
    loaded = _loaded(src, ema)
    name, cfg = loaded.model_name, loaded.model.cfg
    check_exportable(name, cfg)
    V = loaded.tokenizer.vocab_size
    config = hf_config(name, cfg, V)
    arch = config.architectures[0]
    hf = getattr(transformers, arch)(config).eval()
    state = {k: v.detach().float().cpu() for k, v in loaded.model.state_dict().items()}
    mapped = to_hf_state(name, cfg, state, V)
    params = dict(hf.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in mapped.items():
            params[key].copy_(value)
        if name == "bert":  # HELM has no segment embedding: one zero row
            params["bert.embeddings.token_type_embeddings.weight"].zero_()
            mapped["bert.embeddings.token_type_embeddings.weight"] = None
    written = {params[k].data_ptr() for k in mapped}
    missing = [k for k, p in params.items() if p.data_ptr() not in written]
    if missing:  # a mapping that forgot a parameter must never ship random weights
        raise RuntimeError(f"export_hf({name}): no HELM weights for {missing}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    causal = not cfg.bidirectional
    hf_tokenizer(loaded.tokenizer, causal, cfg.max_seq_len).save_pretrained(out)
    (out / "README.md").write_text(model_card(loaded, "hf", arch))
    log.info("wrote %s: transformers.%s, tokenizer %s", out, arch, loaded.tokenizer.name)
    return out


def export_helm(src, out_dir: str | os.PathLike, *, ema: bool = False) -> Path:
    """Write a HELM-native folder (any model): model.safetensors, helm_config.json (model and
    training config, codon tree, last validation metrics), tokenizer/ and README.md."""
    st = _require("safetensors.torch")
    loaded = _loaded(src, ema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    st.save_model(loaded.model, str(out / WEIGHTS))  # tied tensors are stored once
    loaded.tokenizer.save(out / "tokenizer")
    (out / HELM_CONFIG).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (out / "README.md").write_text(model_card(loaded, "helm"))
    log.info("wrote %s: HELM-native %s", out, loaded.model_name)
    return out


# Loading ------------------------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike, *, ema: bool = False, device: str | torch.device = "cpu"
) -> LoadedModel:
    """A trained model from a HELM checkpoint file, a HELM-native folder (``export_helm``) or a
    Hugging Face folder of a supported architecture with a codon or nucleotide tokenizer.

    ``ema`` chooses a checkpoint's EMA weights; a folder holds the weights chosen at export.
    """
    path = Path(path)
    if path.is_file():
        return load_for_eval(path, ema=ema, device=device)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    kind = (
        "helm"
        if (path / HELM_CONFIG).is_file()
        else "hf"
        if (path / "config.json").is_file()
        else None
    )
    if kind is None:
        raise CheckpointError(
            f"{path} is a folder without {HELM_CONFIG} (HELM export) or config.json (Hugging "
            "Face): give a checkpoint file (.pt) or an exported folder"
        )
    if ema:
        raise CheckpointError(
            f"--ema: {path} is an exported folder holding one set of weights (chosen at export); "
            "drop --ema"
        )
    try:
        loaded = _load_native(path) if kind == "helm" else _load_hf(path)
    except (CheckpointError, ExportError):
        raise
    except Exception as exc:  # a damaged folder: transformers, safetensors and json say why
        if not isinstance(exc, (OSError, KeyError, ValueError)) and "safetensors" not in str(
            type(exc).__module__
        ):
            raise
        raise CheckpointError(f"{path} cannot be read: {type(exc).__name__}: {exc}") from None
    loaded.model.to(device).eval()
    return loaded


def weights_file(path: str | os.PathLike) -> Path:
    """The file whose contents identify the model at ``path`` (for cache keys): a checkpoint
    file itself, or an exported folder's ``model.safetensors``."""
    path = Path(path)
    return path / WEIGHTS if path.is_dir() else path


def _build(model_name: str, fields: dict[str, Any]):
    from helm.models import build_model, model_config

    cfg = model_config(model_name, **fields)
    return build_model(model_name, cfg), cfg


def _load_native(path: Path) -> LoadedModel:
    st = _require("safetensors.torch")
    from helm.hierarchy import CodonHierarchy, build_hierarchy
    from helm.tokenizers import load_tokenizer

    meta = json.loads((path / HELM_CONFIG).read_text())
    if meta.get("format") != "helm" or meta.get("format_version") != NATIVE_FORMAT_VERSION:
        raise CheckpointError(f"{path / HELM_CONFIG}: not a HELM export this version reads")
    model, _ = _build(meta["model_name"], meta["model_config"])
    missing, unexpected = st.load_model(model, str(path / WEIGHTS), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS} does not fit its config: {missing or unexpected}")
    tree = meta.get("hierarchy")
    checkpoint = {
        "model_name": meta["model_name"],
        "model_config": meta["model_config"],
        "config": meta["config"],
        "hierarchy": tree,
        "epoch_metrics": meta.get("epoch_metrics"),
        "source": {"format": "helm", "path": str(path), "weights": meta.get("weights", "raw")},
    }
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(path / "tokenizer"),
        hierarchy=CodonHierarchy.from_state_dict(tree) if tree else build_hierarchy("true"),
        config=meta["config"],
        checkpoint=checkpoint,
    )


LM_CLASSES = {"gpt2": "GPT2LMHeadModel", "mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}


def _load_hf(path: Path) -> LoadedModel:
    transformers = _require("transformers")
    from helm.hierarchy import build_hierarchy

    hf_cfg = transformers.AutoConfig.from_pretrained(str(path))
    model_name, fields = helm_fields(hf_cfg, path)
    tokenizer = helm_tokenizer(path)
    if hf_cfg.vocab_size < tokenizer.vocab_size:
        raise _import_refusal(path, f"vocab_size {hf_cfg.vocab_size} < the tokenizer's")
    fields |= dict(vocab_size=tokenizer.vocab_size,
                   tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)))  # fmt: skip
    model, cfg = _build(model_name, fields)
    kind = hf_cfg.model_type
    arch = LM_CLASSES.get(kind) or ("BertLMHeadModel" if hf_cfg.is_decoder else "BertForMaskedLM")
    hf, info = getattr(transformers, arch).from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True
    )
    if info.get("missing_keys"):
        log.warning(
            "%s holds no weights for %s: they are randomly initialised (language-model metrics "
            "and generation are meaningless; features and fine-tuning are not affected)",
            path,
            ", ".join(sorted(info["missing_keys"])),
        )
    hf_state = {k: v.detach() for k, v in hf.state_dict().items()}
    state = from_hf_state(model_name, cfg, hf_state)
    if kind == "bert":  # segment 0's embedding is a constant added at every position: fold it
        segment = hf_state["bert.embeddings.token_type_embeddings.weight"][0]
        state["embed.pos.weight"] = state["embed.pos.weight"] + segment
    model.load_state_dict(state)
    config = run_config(model_name, cfg, tokenizer)
    checkpoint = {
        "model_name": model_name,
        "model_config": dataclasses.asdict(cfg),
        "config": config,
        "hierarchy": None,
        "epoch_metrics": None,
        "source": {"format": "hf", "path": str(path), "weights": "raw", "class": arch},
    }
    return LoadedModel(model, tokenizer, build_hierarchy("true"), config, checkpoint)


def run_config(model_name: str, cfg, tokenizer) -> dict[str, Any]:
    """A resolved training configuration for a model HELM did not train: train.py's defaults with
    the model's own settings (eval.py reads mode, loss, masking and data type from it)."""
    from helm.config import build_parser, to_dict

    args = build_parser().parse_args([])
    mode = "mlm" if cfg.bidirectional else "clm"
    settings = dict(
        model_name=model_name, mode=mode, bidirectional=cfg.bidirectional,
        tokenizer=tokenizer.name, overlap=getattr(tokenizer, "overlap", 0), data_type="nuc",
        hidden_size=cfg.d_model, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        intermediate_size=cfg.d_ff, max_seq_len=cfg.max_seq_len, activation=cfg.activation,
        pos_embedding=cfg.pos_embedding, tie_embeddings=cfg.tie_embeddings,
        dropout=cfg.dropout, attn_dropout=cfg.attn_dropout, demo_corpus=False,
        ssm_layer=getattr(cfg, "ssm_layer", None), num_samples=None,
        val_metric_mode="min",
    )  # fmt: skip
    for key, value in settings.items():
        setattr(args, key, value)
    return to_dict(args)


# Initialising a run from a trained model -----------------------------------------------------------

# Options that do not change the weights' meaning: a new run may set them freely.
FREE_OPTIONS = ("dropout", "attn_dropout", "init_std", "scan_impl", "fftconv_impl", "chunk_size",
                "dt_min", "dt_max", "dt_init_floor")  # fmt: skip


def init_from(
    backbone: torch.nn.Module, path: str | os.PathLike, *, model_name: str, tokenizer
) -> None:
    """Copy the weights of a checkpoint, HELM folder or HF folder into a new run's ``backbone``
    (``train.py --init-from``). The architecture options must match; mismatches are named."""
    loaded = load_model(path)
    problems = []
    if loaded.model_name != model_name:
        problems.append(f"--model_name {model_name} (the model is {loaded.model_name})")
    if loaded.tokenizer.tokens != tokenizer.tokens:
        problems.append(
            f"--tokenizer {tokenizer.name} ({tokenizer.vocab_size} tokens; the model's is "
            f"{loaded.tokenizer.name}, {loaded.tokenizer.vocab_size} tokens, or in another order)"
        )
    if not problems:
        ours, theirs = dataclasses.asdict(backbone.cfg), dataclasses.asdict(loaded.model.cfg)
        for field, value in ours.items():
            if field not in FREE_OPTIONS and theirs.get(field) != value:
                problems.append(f"{_flag(field)} {value} (the model has {theirs.get(field)})")
    if problems:
        raise ValueError(
            f"--init-from {path}: the run's architecture differs from the model's: "
            + "; ".join(problems)
            + ". Set these as the model has them"
        )
    backbone.load_state_dict(loaded.model.state_dict())
    log.info("initialised the weights from %s (%s)", path, loaded.model_name)
