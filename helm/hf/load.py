"""Loading a trained model from a HELM checkpoint, a HELM-native folder or a Hugging Face folder,
and starting a new run from one (``init_from``, train.py --init-from)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from helm.checkpoint import LoadedModel, load_for_eval
from helm.checkpoint.dcp import is_sharded, newest
from helm.checkpoint.format import read_weights_only
from helm.errors import CheckpointError, ExportError
from helm.fileio import MANIFEST, check_manifest
from helm.hf import HF_TYPES, MAPPINGS
from helm.hf.common import flag, from_hf_state, import_refusal, require
from helm.hf.export import HELM_CONFIG, NATIVE_FORMAT_VERSION, WEIGHTS
from helm.hf.tokenizer import helm_tokenizer

log = logging.getLogger("helm")


def inference_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when there is a device, else the CPU; CUDA asked for and absent is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda: no CUDA device is available (use --device cpu)")
    return device


def load_model(
    path: str | os.PathLike, *, ema: bool = False, device: str | torch.device = "cpu"
) -> LoadedModel:
    """A trained model from a HELM checkpoint file, a HELM-native folder (``export_helm``) or a
    Hugging Face folder of a supported architecture with a codon or nucleotide tokenizer.

    ``ema`` chooses a checkpoint's EMA weights; a folder holds the weights chosen at export.
    ``device``: a torch device, or ``"auto"`` (CUDA when there is one, else the CPU).
    """
    device = inference_device(device)
    path = Path(path)
    if path.is_file() or is_sharded(path):  # a checkpoint file, or a sharded run's folder
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
    check_folder(path)
    try:
        loaded = _load_native(path) if kind == "helm" else _load_hf(path)
    except (CheckpointError, ExportError):
        raise
    except Exception as exc:  # a damaged folder: transformers, safetensors and json say why
        damaged = (OSError, KeyError, ValueError, TypeError, AttributeError, pickle.PickleError)
        if not isinstance(exc, damaged) and "safetensors" not in type(exc).__module__:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path} cannot be read: {type(exc).__name__}: {first}") from exc
    loaded.model.to(device).eval()
    return loaded


def check_folder(path: str | os.PathLike, *, card: bool = False) -> int | None:
    """Refuse a damaged or crafted folder before anything reads it: each file against its digest
    in SHA256SUMS (when the export has one; the model card, README.md, only with ``card``: its
    owner may edit it), then each weight file's structure (a ``pytorch_model*.bin`` is read with
    tensors and plain data only). Returns how many files matched their digests (None: no
    SHA256SUMS). Raises `CheckpointError` naming the file."""
    path = Path(path)
    try:
        checked = check_manifest(path, skip=() if card else ("README.md",))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{exc}; nothing in {path} was loaded") from None
    for file in sorted(path.glob("*.safetensors")):
        try:
            with require("safetensors").safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError: a damaged header, a file cut or extended
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"weights file {file} is corrupted: {first}") from None
    for file in sorted(path.glob("pytorch_model*.bin")):
        read_weights_only(file, what="weights file", mmap=True)
    return checked


def verify_folder(path: str | os.PathLike) -> str:
    """``python -m helm.checkpoint verify FOLDER``: every file against SHA256SUMS (the model card
    too), each weight file's structure, then a full load; a line saying what was checked."""
    checked = check_folder(path, card=True)
    loaded = load_model(path)
    kind = "HELM" if (Path(path) / HELM_CONFIG).is_file() else "Hugging Face"
    digests = (
        f"{checked} files match {MANIFEST}"
        if checked is not None
        else f"no {MANIFEST} (an export of an older HELM or of another tool): nothing to compare"
    )
    return f"{path}: ok ({kind} folder, {loaded.model_name}; {digests})"


def _json_object(file: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a config), or a one-line `CheckpointError`."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is damaged: it cannot be read as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{file} is damaged: it holds a JSON {type(value).__name__}, not an object of settings"
        )
    return value


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """``path`` as given, or for a run folder (one holding checkpoints/) its best.pt, else
    last.pt (best.dcp, last.dcp for a sharded run), saying which. Other folders (a HF or
    HELM-native export) are the loader's to read."""
    folder = Path(path)
    if not (folder / "checkpoints").is_dir():
        return str(path)
    for stem in ("best", "last"):
        found = newest(folder / "checkpoints", stem)
        if found is not None:
            log.info("%s is a run folder: using its checkpoints/%s", path, found.name)
            return str(found)
    raise CheckpointError(
        f"{path} is a run folder without a checkpoint yet (no checkpoints/last.pt)"
    )


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
    st = require("safetensors.torch")
    from helm.hierarchy import CodonHierarchy, build_hierarchy
    from helm.tokenizers import load_tokenizer

    meta = _json_object(path / HELM_CONFIG)
    if meta.get("format") != "helm" or meta.get("format_version") != NATIVE_FORMAT_VERSION:
        raise CheckpointError(f"{path / HELM_CONFIG}: not a HELM export this version reads")
    kinds = {
        "model_name": str,
        "model_config": dict,
        "config": dict,
        "hierarchy": (dict, type(None)),
    }
    for key, kind in kinds.items():
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(
                f"{path / HELM_CONFIG} is damaged: its {key!r} is {repr(meta.get(key))[:80]}"
            )
    try:  # settings and weights that disagree: a damaged or a hand-edited folder
        model, _ = _build(meta["model_name"], meta["model_config"])
        missing, unexpected = st.load_model(model, str(path / WEIGHTS), strict=False)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        why = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2]) or repr(exc)
        raise CheckpointError(
            f"{path / WEIGHTS} does not fit {path / HELM_CONFIG}: {why}"
        ) from None
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


def _load_hf(path: Path) -> LoadedModel:
    transformers = require("transformers")
    from helm.hierarchy import build_hierarchy

    _json_object(path / "config.json")  # transformers' own message for a list is a traceback
    hf_cfg = transformers.AutoConfig.from_pretrained(str(path))
    kind = hf_cfg.model_type
    if kind not in HF_TYPES:
        raise import_refusal(path, f"model_type {kind!r}; supported: {', '.join(HF_TYPES)}")
    family = HF_TYPES[kind]
    model_name = next(name for name, m in MAPPINGS.items() if m is family)
    fields = family.helm_fields(hf_cfg, path)
    tokenizer = helm_tokenizer(path)
    if hf_cfg.vocab_size < tokenizer.vocab_size:
        raise import_refusal(path, f"vocab_size {hf_cfg.vocab_size} < the tokenizer's")
    fields |= dict(vocab_size=tokenizer.vocab_size,
                   tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)))  # fmt: skip
    model, cfg = _build(model_name, fields)
    arch = family.hf_class(hf_cfg)
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
    state = from_hf_state(family.weight_map(cfg), cfg, hf_state)
    family.finish_import(state, hf_state)
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
                problems.append(f"{flag(field)} {value} (the model has {theirs.get(field)})")
    if problems:
        raise ValueError(
            f"--init-from {path}: the run's architecture differs from the model's: "
            + "; ".join(problems)
            + ". Set these as the model has them"
        )
    backbone.load_state_dict(loaded.model.state_dict())
    log.info("initialised the weights from %s (%s)", path, loaded.model_name)
