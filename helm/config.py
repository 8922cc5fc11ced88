"""The configuration of a training run: the flags, YAML layers, validation, and the mapping from
the user's names to the components' keywords.

Flags keep the original HELM README's names (dashes and underscores as there) and are listed once,
one row each, in ``FLAGS``. A YAML file given with ``--config`` uses the same keys (either
spelling); the command line beats YAML, and YAML beats the defaults; several ``--config`` files
stack, later ones winning. When no training data is named anywhere, ``configs/quickstart.yaml``
becomes the base layer: a tiny model on the built-in synthetic demo corpus that trains on a CPU in
a minute or two. Unknown keys and bad values fail before anything else happens, naming the key.

The library never sees the argparse namespace: ``model_kwargs``, ``loss_kwargs``, ``optimizer_kwargs``
and their siblings turn the resolved configuration into the keywords of each builder.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from helm.errors import ConfigError
from helm.fileio import blocking_file
from helm.hierarchy import HIERARCHIES
from helm.losses import LOSSES, OPTIONS, loss_options
from helm.models import MODELS, config_class
from helm.models.config import ACTIVATIONS, POS_EMBEDDING_APPLY, POS_EMBEDDINGS
from helm.ops import IMPLS
from helm.sched import SCHEDULES
from helm.tokenizers import DATA_TYPES, TOKENIZERS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIG_DIR / "quickstart.yaml"
DATA_KEYS = ("data_dir", "train_file")

# --opt: timm's names; helm.optim.build_optimizer builds each (the optimizers import torch, which the
# command line does not).
OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "nesterov", "rmsprop", "adagrad", "radam", "radamw",
              "nadam", "adafactor", "lamb")  # fmt: skip
EVAL_METRICS = (
    "val_loss",
    "val_perplexity",
    "val_accuracy",
    "val_aa_accuracy",
    "val_mistake_severity",
    "val_dist@1",
    "val_dist@5",
)
_MAXIMISED = ("val_accuracy", "val_aa_accuracy")
# Bounds that no real run reaches; past them a typo would end in an allocation failure.
MAX_SEQ_LEN, MAX_WIDTH, MAX_LAYERS, MAX_VOCAB = 1 << 20, 1 << 16, 1024, 1 << 20


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _floats(text: str) -> list[float]:
    return [_number(x) for x in str(text).replace(",", " ").split()]


def _number(text: str) -> float:
    """A finite float (inf and nan are refused: no flag means them)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _integer(text: str) -> int:
    if isinstance(text, float) and not text.is_integer():  # YAML 2.5 where a count belongs
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _model_defaults(field: str) -> str:
    """Each model's default of a config field, for --help: ``absolute for gpt2, bert; none ...``."""
    by_value: dict[str, list[str]] = {}
    for name, entry in MODELS.items():
        by_value.setdefault(getattr(entry.config, field), []).append(name)
    return "; ".join(f"{value} for {', '.join(names)}" for value, names in by_value.items())


# Argument types of eval.py (and of any script that reads sequence files and checkpoints).


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


def output_file(text: str) -> str:
    """A file to write: not a folder, and no file where one of its folders belongs."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give a file name")
    block = blocking_file(Path(text).parent)
    if block is not None:
        raise argparse.ArgumentTypeError(f"{text}: {block} is a file, not a folder")
    return text


def output_folder(text: str) -> str:
    """A folder to write into: no file where it, or one of its parents, belongs."""
    block = blocking_file(text)
    if block is not None:
        where = "is a file: give a folder" if block == Path(text) else f"is inside {block}, a file"
        raise argparse.ArgumentTypeError(f"{text} {where}")
    return text


def sequence_file(text: str) -> str:
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is a folder: give a sequence file (txt, csv/tsv, fasta)"
        )
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected train,val,test fractions, got {text!r}"
        ) from None
    if len(parts) != 3 or min(parts) < 0 or not math.isclose(sum(parts), 1.0, abs_tol=1e-6):
        raise argparse.ArgumentTypeError(f"expected three fractions summing to 1, got {text!r}")
    return parts


class _Lower(tuple):
    """Choices matched case-insensitively (the value is lower-cased first)."""


# One row a flag: (flag, default, kind, help). kind: a type (int, float; None for text), a tuple of
# choices, "on" (a switch), "bool" (true/false), "onoff" (--x / --no-x), "fractions" (three numbers,
# comma- or space-separated), [type] (one or more values). Groups head their rows.
FLAGS: dict[str, list[tuple[str, Any, Any, str]]] = {
    "general": [
        ("--config", None, [None], "YAML file(s) keyed by flag names; later files win"),
    ],
    "loss": [
        ("--loss", "XE", tuple(LOSSES), "training loss: XE, or one that knows the genetic code (HXE, soft labels, amino-acid losses)"),
        *((o.flag, o.default, o.kind, o.help) for o in OPTIONS.values()),  # helm.losses.OPTIONS
        ("--hierarchy", "true", HIERARCHIES, "codon tree; random keeps the shape"),
        ("--loss-impl", "auto", IMPLS, "auto: Triton on CUDA"),
    ],
    "data": [
        ("--data_dir", None, None, "folder holding the data files (none: built-in demo corpus)"),
        ("--train_file", None, None, "training sequences (relative to --data_dir when not found as given)"),
        ("--val_file", None, None, "absent: split from the training file, seeded"),
        ("--test_file", None, None, "test sequences (absent: split from the training file)"),
        ("--file_extension", None, None, "txt, csv, tsv, fasta, fa (+ .gz); default: from the name"),
        ("--column_name", None, None, "sequence column of csv/tsv files"),
        ("--split", [0.9, 0.05, 0.05], "fractions", "train/val/test fractions when splitting, e.g. 0.9,0.05,0.05"),
        ("--on-invalid", "error", ("error", "skip"), "bad records: stop, or skip and count"),
        ("--cache_dir", None, None, "token cache (default $HELM_CACHE_DIR or ~/.cache/helm/tokens)"),
        ("--max_seq_len", 256, int, "tokens per sequence seen by the model"),
        ("--truncation", "head", ("head", "random"), "longer sequences: head or random crop"),
        ("--masking_strategy", "single", ("single", "double", "span"), "MLM masks: single tokens, adjacent pairs, or geometric spans (mean 3, max 10)"),
        ("--masking_ratio", 0.15, float, "fraction of tokens masked (in expectation) for MLM"),
        ("--mask-replace", "mask", ("mask", "bert"), "bert: 80/10/10 replacement"),
        ("--data-type", "nuc", DATA_TYPES, "nuc: nucleotides; codon: nuc read as codons (3mer); aa: proteins (nucleotides translated)"),
        ("--tokenizer", "3mer", TOKENIZERS, "k-mers (3mer = codons, nuc, 6mer) or subwords trained on the training split (bpe, wp, ug)"),
        ("--overlap", 0, int, "k-mer overlap: stride k - overlap"),
        ("--position_ids", False, "on", "feed explicit position ids to the model"),
        ("--mode", "mlm", ("mlm", "clm"), "mlm: masked LM, bidirectional; clm: next-token LM, causal"),
        ("--batch_size", 64, int, "sequences per device per micro-step"),
        ("--num_samples", -1, int, "use the first N training records (-1: all)"),
    ],
    "model": [
        ("--model_name", "gpt2", tuple(MODELS), "backbone"),
        ("--bidirectional", None, "onoff", "default: on for mlm, off for clm (a bidirectional clm is refused)"),
        ("--ssm_layer", None, _Lower(("mamba", "mamba2")), "mamba only"),
        ("--vocab_size", None, int, "subword vocabulary size; derived for k-mers"),
        ("--num_layers", 4, int, "number of blocks"),
        ("--num_heads", 4, int, "attention heads (gpt2, bert)"),
        ("--pad_vocab_size_multiple", 8, int, "pad the embedding rows to a multiple"),
        ("--pos_embedding", None, POS_EMBEDDINGS, f"positions: none, learned absolute, fixed sincos, rotary (attention only); default: the model's own ({_model_defaults('pos_embedding')})"),
        ("--pos_embedding_apply", "add", POS_EMBEDDING_APPLY, "add positions to tokens, or concatenate them (--pos_embedding_dim wide)"),
        ("--pos_embedding_dim", None, int, "position width under concat"),
        ("--tie_embeddings", False, "onoff", "share the token embedding with the LM head"),
        ("--hidden_size", 256, int, "model width d_model"),
        ("--intermediate_size", 1024, int, "MLP width d_ff"),
        ("--dropout", 0.0, float, "dropout on residual branches and embeddings"),
        ("--attn_dropout", 0.0, float, "dropout on attention probabilities (training only)"),
        ("--activation", None, ACTIVATIONS, f"MLP activation; default: the model's own ({_model_defaults('activation')})"),
        ("--compile", False, "on", "torch.compile the model (each block under --fsdp or --grad-ckpt)"),
    ],
    "optimizer": [
        ("--opt", "adamw", _Lower(OPTIMIZERS), "optimizer, as timm names it (sgd and nesterov are Nesterov momentum SGD); L2 decay in the gradient for adam/sgd/momentum/nesterov/rmsprop/adagrad/radam/nadam/lamb, decoupled for adamw/radamw/adafactor"),
        ("--opt-eps", None, float, "optimizer epsilon (default: the optimizer's own)"),
        ("--opt-betas", None, [float], "optimizer betas, two values (Adam family, LAMB)"),
        ("--momentum", 0.9, float, "momentum of sgd, momentum, nesterov, rmsprop"),
        ("--weight-decay", 2e-5, float, "weight decay (decoupled for adamw/radamw/adafactor, L2 for the others, as timm); never on norms, biases, position tables, SSM A/D, filters"),
        ("--clip-grad", None, float, "clip threshold (none: no clipping)"),
        ("--clip-mode", "norm", ("norm", "value", "agc"), "gradient clipping: total norm, per value, or adaptive (AGC, leaving the LM head's own parameters out, as timm)"),
        ("--layer-decay", None, float, "per-layer lr scale: lr * decay^(depth from top), decay in (0, 1]"),
        ("--grad-accum-steps", 1, int, "micro-batches per optimizer update"),
    ],
    "learning-rate schedule (timm semantics)": [
        ("--early-stop", False, "on", "stop after --patience-epochs without improvement"),
        ("--sched", "cosine", SCHEDULES, "learning-rate schedule"),
        ("--sched-on-updates", True, "onoff", "step the schedule per optimizer update; --no-sched-on-updates steps it per epoch (timm's default, used by the original recipes)"),
        ("--lr", None, float, "learning rate (none: --lr-base scaled by global batch)"),
        ("--lr-base", 1e-3, float, "lr for --lr-base-size sequences, scaled to the global batch when --lr is not given"),
        ("--lr-base-size", 256, int, "global batch size at which --lr-base applies"),
        ("--lr-base-scale", "", ("", "linear", "sqrt"), "'': sqrt for adaptive optimizers, else linear"),
        ("--lr-noise", None, [float], "noise window as epoch fractions/epochs"),
        ("--lr-noise-pct", 0.67, float, "noise is resampled until |noise| < this fraction"),
        ("--lr-noise-std", 1.0, float, "standard deviation of the lr noise"),
        ("--lr-cycle-mul", 1.0, float, "each cosine/poly/tanh cycle is this much longer than the last"),
        ("--lr-cycle-decay", 0.5, float, "each cycle's peak lr is this fraction of the last"),
        ("--lr-cycle-limit", 1, int, "number of cycles"),
        ("--lr-k-decay", 1.0, float, "k-decay exponent on the position within a cycle (1: plain schedule)"),
        ("--warmup-lr", 1e-8, float, "lr at the start of the linear warmup"),
        ("--min-lr", 0.0, float, "floor of cosine/poly/tanh schedules and of plateau reductions (at most --lr)"),
        ("--epochs", 300, int, "training epochs (cosine/poly/tanh: their cycles plus --cooldown-epochs; --warmup-prefix adds the warmup)"),
        ("--epoch-repeats", 0.0, float, "passes over the data per epoch (0 or 1: one; 2.5: two and a half)"),
        ("--start-epoch", None, int, "epoch a fresh run starts at: the schedule and update count start there (resume overrides)"),
        ("--decay-milestones", [90, 180, 270], [int], "epochs at which multistep decays the lr"),
        ("--decay-epochs", 90, float, "interval of step decay, in epochs"),
        ("--warmup-epochs", 5, int, "linear warmup length, in epochs (fewer than --epochs when the schedule steps per epoch)"),
        ("--warmup-prefix", False, "on", "warmup does not count toward the decay"),
        ("--cooldown-epochs", 0, int, "epochs at --min-lr after the cycles of cosine/poly/tanh (an error for other schedules)"),
        ("--patience-epochs", 10, int, "epochs without improvement before plateau cuts the lr / early stopping stops"),
        ("--decay-rate", 0.1, float, "lr factor of step/multistep/plateau decays, in (0, 1] (plateau: in (0, 1)); power of poly"),
    ],
    "exponential moving average of the weights": [
        ("--model-ema", False, "on", "keep an exponential moving average of the weights (validated and saved beside them)"),
        ("--model-ema-force-cpu", False, "on", "keep the EMA on the CPU"),
        ("--model-ema-decay", 0.9998, float, "EMA decay per optimizer update"),
        ("--model-ema-warmup", False, "on", "EMA decay warmup as timm's ModelEmaV3: min(decay, 1 - (1 + n)^(-2/3)) after n + 1 updates"),
    ],
    "run": [
        ("--seed", 42, int, "seed of initialisation, splits, masks, data order and dropout"),
        ("--resume", None, None, "continue a run: a checkpoint path; 'auto' for <output>/checkpoints/last.pt (which must exist); 'if-exists' to continue it when it exists, else start it"),
        ("--init-from", None, None, "start a new run from trained weights: a checkpoint, a HELM export folder or a Hugging Face folder (same architecture options; ignored when resuming)"),
        ("--accelerator", "auto", ("auto", "cpu", "cuda", "mps", "tpu"), "device (auto: cuda, then mps, then cpu); tpu is refused"),
        ("--num_workers", -1, int, "DataLoader worker processes per rank (-1: min(4, cores per rank - 1)); at most the cores"),
        ("--distributed-backend", "auto", None, "auto (nccl on CUDA, gloo on CPU), nccl, gloo"),
        ("--sync-bn", False, "on", "convert BatchNorm layers to SyncBatchNorm under DDP (the built-in models have none)"),
        ("--fsdp", False, "onoff", "shard weights, gradients and optimizer state over the ranks (FSDP2) instead of DDP; checkpoints become sharded .dcp folders; with --amp, bf16 mixed precision through FSDP in place of autocast"),
        ("--fsdp-accum", "sharded", ("sharded", "unsharded"), "--fsdp between micro-batches of --grad-accum-steps: sharded (gradients reduce-scattered after each, memory stays 1/N) or unsharded (parameters and gradients kept whole until the update: DDP's communication, more memory)"),
        ("--grad-ckpt", False, "onoff", "activation checkpointing: recompute each block's activations in the backward pass (less memory, about a third more compute)"),
        ("--num_nodes", 1, int, "nodes; more than one needs torchrun"),
        ("--num_devices", 1, int, "processes per node; without torchrun they are spawned"),
        ("--worker-seeding", "all", ("all", "part"), "DataLoader worker seeding as in timm: all (python, numpy, torch) or part"),
        ("--checkpoint-hist", 10, int, "epoch checkpoints kept beside last and best"),
        ("--eval-metric", "val_loss", EVAL_METRICS, "validation metric choosing best.pt and driving plateau and early stopping"),
        ("--val-metric-mode", None, ("min", "max"), "default: from the metric"),
        ("--log-interval", 10, int, "optimizer steps between log lines"),
        ("--amp", False, "on", "bf16 autocast (fp16 + GradScaler where bf16 is unsupported)"),
        ("--amp-dtype", "auto", ("auto", "bfloat16", "float16"), "autocast dtype under --amp (auto: bf16 where supported, else fp16 + GradScaler)"),
        ("--pin-mem", True, "onoff", "pin host memory of batches (CUDA only)"),
        ("--no-prefetcher", False, "on", "no CUDA-stream prefetching of batches"),
        ("--nan-policy", "stop", ("stop", "skip"), "non-finite loss: stop, or skip the step"),
        ("--output", None, None, "run folder (default runs/<model>-<mode>-<loss>-<time>)"),
    ],
}  # fmt: skip


def _add_flag(group, flag: str, default: Any, kind: Any, help: str) -> None:
    kw: dict[str, Any] = {"default": default, "help": help}
    numbers = {float: _number, int: _integer}
    if kind in (float, int):
        kind = numbers[kind]
    if kind == "on":
        kw["action"] = "store_true"
    elif kind == "onoff":
        kw["action"] = argparse.BooleanOptionalAction
    elif kind == "bool":
        kw["type"] = _bool
    elif kind == "fractions":
        kw["type"] = _floats
    elif isinstance(kind, list):
        item = numbers.get(kind[0], kind[0])
        kw.update(nargs="+", **({"type": item} if item is not None else {}))
    elif isinstance(kind, tuple):
        kw["choices"] = list(kind)
        if isinstance(kind, _Lower):
            kw["type"] = str.lower
    elif kind is not None:
        kw["type"] = kind
    # Every flag answers to both spellings (--batch_size and --batch-size); the first is the name.
    other = "--" + (flag[2:].replace("_", "-") if "_" in flag else flag[2:].replace("-", "_"))
    names = [flag] if other == flag else [flag, other]
    group.add_argument(*names, dest=_key(flag), **kw)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, except where there is none to show (None, or a help
    text that already says what the default means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class HelmArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (the message, a "did you mean" for an unknown flag, and a
    pointer to --help instead of the whole usage block) and both spellings of every flag
    (``--batch_size`` is also ``--batch-size``; the first spelling given is the name)."""

    def add_argument(self, *names, **kw):
        flags = [n for n in names if n.startswith("--")]
        if flags and len(names) == 1:
            other = "--" + (
                flags[0][2:].replace("_", "-")
                if "_" in flags[0]
                else flags[0][2:].replace("-", "_")
            )
            if other != flags[0]:
                kw.setdefault("dest", _key(flags[0]))
                names = (flags[0], other)
        return super().add_argument(*names, **kw)

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            unknown = [a for a in message.split(":", 1)[1].split() if a.startswith("-")]
            parsers = [self] + [
                sub
                for a in self._actions
                if isinstance(a, argparse._SubParsersAction)
                for sub in a.choices.values()
            ]
            known = sorted({s for p in parsers for a in p._actions for s in a.option_strings})
            hints = []
            for arg in unknown:
                close = difflib.get_close_matches(arg.split("=")[0], known, n=1, cutoff=0.6)
                if close:
                    hints.append(f"{arg}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        self.exit(
            2, f"{self.prog}: error: {message}\nRun `python {self.prog} --help` for the flags.\n"
        )


def build_parser() -> argparse.ArgumentParser:
    p = HelmArgumentParser(
        prog="train.py",
        allow_abbrev=False,  # --batch would match both spellings of --batch_size
        description="Train a codon-level mRNA language model (HELM).",
        epilog=_quickstart_note(),
        formatter_class=HelpFormatter,
    )
    for title, rows in FLAGS.items():
        group = p if title == "general" else p.add_argument_group(title)
        for row in rows:
            _add_flag(group, *row)
    return p


def _quickstart_note() -> str:
    """--help's note on a bare ``python train.py``: the defaults above, under configs/quickstart.yaml."""
    try:
        values = yaml.safe_load(QUICKSTART.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    settings = ", ".join(f"{k} {v}" for k, v in values.items())
    return (
        "With no --data_dir/--train_file (in flags or YAML), the built-in synthetic demo corpus is "
        f"used and configs/quickstart.yaml is layered over the defaults shown above: {settings}."
    )


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """Check one YAML value the way argparse would check it on the command line."""
    if value is None:  # YAML null: only where the flag's own default is "not set"
        if action.default is not None:
            raise ConfigError(f"{source}: {key} needs a value (its default is {action.default!r})")
        return None
    if (
        isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
        or action.type is _bool
    ):
        if not isinstance(value, bool) and not (action.type is _bool and isinstance(value, str)):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        value = _bool(value) if isinstance(value, str) else value
    elif value is not None and action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        value = [_convert(action, key, v, source) for v in items]
    elif value is not None:
        value = _convert(action, key, value, source)
    return value


def _convert(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    if isinstance(value, (dict, list)) and action.type is not _floats:
        raise ConfigError(f"{source}: {key} takes one value, got {value!r}")
    if action.type is None and not isinstance(value, str):  # a name or path: YAML text only
        raise ConfigError(f"{source}: {key} must be text (a name or a path), got {value!r}")
    try:
        if action.type is _floats:
            value = _floats(" ".join(map(str, value)) if isinstance(value, list) else value)
        elif action.type is not None and not isinstance(value, list):
            if isinstance(value, bool):  # YAML true/false where a number or name belongs
                raise ValueError(value)
            value = action.type(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{source}: {key} has a bad value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(
            f"{source}: {key} must be one of {', '.join(map(str, action.choices))}; got {value!r}"
        )
    return value


def load_yaml(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML config and validate its keys and values against the parser."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    out = {}
    for raw_key, value in data.items():
        key = _key(str(raw_key))
        if key not in actions or key == "config":
            close = [k for k in actions if k.startswith(key[:4])][:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"--config {path}: unknown key {raw_key!r}{hint}")
        out[key] = _coerce(actions[key], key, value, f"--config {path}")
    return out


def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults < quickstart (when no data is named) < --config YAML < command line."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    layers: dict[str, Any] = {}
    user_yaml = _user_yaml(pre.config, parser)
    named_data = any(getattr(pre, k) is not None for k in DATA_KEYS) or any(
        user_yaml.get(k) is not None for k in DATA_KEYS
    )
    if not named_data and pre.resume is None:  # a resumed run has its checkpoint's configuration
        layers.update(load_yaml(QUICKSTART, parser))
    layers.update(user_yaml)
    parser.set_defaults(**layers)
    args = parser.parse_args(argv)
    args.demo_corpus = not named_data
    validate(args)
    return args


def check_flags(argv: list[str]) -> int:
    """0 when ``argv`` parses and validates: a mistake raises ConfigError, and --help (or an
    argparse error) exits. Cheap, so a script can answer before it imports torch."""
    parse_config(argv)
    return 0


def _user_yaml(paths: list[str] | None, parser: argparse.ArgumentParser) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in paths or []:
        out.update(load_yaml(path, parser))
    return out


def given_keys(argv: list[str]) -> set[str]:
    """The settings the user gave (on the command line or in --config files), not defaults."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_known_args(argv)[0])
    return (set(given) | set(_user_yaml(given.get("config"), build_parser()))) - {"config"}


# Settings a resumed run may change: where and how it runs, not what it trains.
RESUME_MAY_CHANGE = frozenset(
    "epochs output resume num_workers log_interval checkpoint_hist cache_dir pin_mem "
    "no_prefetcher compile accelerator distributed_backend data_dir train_file val_file "
    "test_file early_stop patience_epochs fsdp fsdp_accum grad_ckpt".split()
)


def resume_config(
    args: argparse.Namespace, saved: Mapping[str, Any], given: set[str]
) -> tuple[argparse.Namespace, dict[str, tuple[Any, Any]]]:
    """The configuration of a resumed run: the checkpoint's, with only the settings in
    ``RESUME_MAY_CHANGE`` taken from what the user gave now. Any other given setting that differs
    from the checkpoint's is refused, naming each. Returns (config, {key: (was, now)} changed)."""
    differ = {
        k: (saved[k], getattr(args, k))
        for k in sorted(given)
        if k in saved and saved[k] != getattr(args, k)
    }
    refused = {k: v for k, v in differ.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        listed = "; ".join(
            f"--{k} {now!r} (the run has {was!r})" for k, (was, now) in refused.items()
        )
        raise ConfigError(
            f"--resume continues a run as it was configured, and these settings differ from its "
            f"checkpoint: {listed}. Drop them, or start a new run (a new --output)"
        )
    merged = {**vars(args), **saved, **{k: getattr(args, k) for k in differ}}
    merged["demo_corpus"] = merged["data_dir"] is None and merged["train_file"] is None
    return argparse.Namespace(**merged), differ


def validate(args: argparse.Namespace) -> None:
    """Cross-flag checks: combinations that cannot apply are refused with what would work."""
    if args.accelerator == "tpu":
        raise ConfigError("--accelerator tpu is not supported: use cuda, cpu or mps")
    for flag in ("data_dir", "train_file", "val_file", "test_file", "output", "cache_dir"):
        if getattr(args, flag) is not None and not str(getattr(args, flag)).strip():
            raise ConfigError(f"--{flag} is empty: give a path, or leave the flag out")
    if args.train_file is None and args.data_dir is None:
        for flag in ("val_file", "test_file"):
            if getattr(args, flag) is not None:
                raise ConfigError(
                    f"--{flag} needs the training data too: give --train_file or --data_dir"
                )
    for flag in ("train_file", "val_file", "test_file"):
        path = getattr(args, flag)
        if path is not None and Path(path).is_dir():
            raise ConfigError(
                f"--{flag} {path} is a directory: give a file, or the folder as --data_dir "
                "(it holds train.*, val.*, test.*)"
            )
    if (
        args.data_dir is not None
        and Path(args.data_dir).exists()
        and not Path(args.data_dir).is_dir()
    ):
        raise ConfigError(f"--data_dir {args.data_dir} is a file: give it as --train_file")
    for flag in ("output", "cache_dir"):  # folders HELM writes into: answered before any work
        path = getattr(args, flag)
        block = blocking_file(path) if path is not None else None
        if block is not None:
            where = "is a file" if block == Path(path) else f"is inside {block}, a file"
            raise ConfigError(f"--{flag} {path} {where}: give a folder")
    resume_dir = args.resume not in (None, "auto", "if-exists") and Path(args.resume).is_dir()
    if resume_dir and not (Path(args.resume) / ".metadata").is_file():  # .dcp: a checkpoint
        raise ConfigError(
            f"--resume {args.resume} is a folder: give its checkpoints/last.pt, or continue the run "
            f"with --resume auto --output {args.resume}"
        )
    if args.data_type == "codon":
        if args.tokenizer != "3mer":
            raise ConfigError(
                "--data-type codon reads codons: use it with --tokenizer 3mer (the default)"
            )
    if args.loss != "XE" and (
        args.tokenizer != "3mer" or args.overlap != 0 or args.data_type == "aa"
    ):
        raise ConfigError(
            f"--loss {args.loss} needs the codon tree, which only the codon tokenizer has (got "
            f"--tokenizer {args.tokenizer} --overlap {args.overlap} --data-type {args.data_type}): use "
            "--tokenizer 3mer --overlap 0 (--data-type nuc or codon), or --loss XE"
        )
    if args.bidirectional is None:
        args.bidirectional = args.mode == "mlm"
    if args.bidirectional and args.mode == "clm":
        raise ConfigError(
            "--bidirectional with --mode clm would let each position see its own target; drop one"
        )
    if args.ssm_layer is not None and args.model_name != "mamba":
        raise ConfigError(f"--ssm_layer applies to --model_name mamba only, not {args.model_name}")
    model = config_class(args.model_name)
    if args.pos_embedding is None:  # each model's own default, recorded in config.yaml
        args.pos_embedding = model.pos_embedding
    if args.pos_embedding == "rotary" and not model.attention:
        attentive = ", ".join(n for n, e in MODELS.items() if e.config.attention)
        raise ConfigError(
            f"--pos_embedding rotary needs attention: use --model_name {attentive}, or another "
            "embedding"
        )
    if args.distributed_backend not in ("auto", "ddp", "nccl", "gloo"):
        raise ConfigError(
            f"--distributed-backend {args.distributed_backend!r}: use auto, nccl or gloo (ddp means auto)"
        )
    if args.distributed_backend == "ddp":
        args.distributed_backend = "auto"
    if args.fsdp and args.model_ema_force_cpu:
        raise ConfigError(
            "--model-ema-force-cpu does not combine with --fsdp: the EMA is sharded over the ranks "
            "like the model (1/N of it on each device); drop --model-ema-force-cpu"
        )
    if args.fsdp and args.amp and args.amp_dtype == "float16":
        raise ConfigError(
            "--fsdp mixes precision in bf16 (fp16 would need a loss scaler over sharded "
            "gradients): use --amp-dtype bfloat16 or auto"
        )
    positive = lambda v: v is None or v > 0
    checks = [
        ("--masking_ratio", 0.0 < args.masking_ratio < 1.0, "must be in (0, 1)"),
        ("--max_seq_len", 4 <= args.max_seq_len <= MAX_SEQ_LEN, f"must be in [4, {MAX_SEQ_LEN}]"),
        ("--batch_size", args.batch_size >= 1, "must be >= 1"),
        ("--grad-accum-steps", args.grad_accum_steps >= 1, "must be >= 1"),
        ("--epochs", args.epochs >= 1, "must be >= 1"),
        ("--epoch-repeats", args.epoch_repeats >= 0, "must be >= 0 (0: one pass per epoch)"),
        ("--num_devices", args.num_devices >= 1, "must be >= 1"),
        ("--num_nodes", args.num_nodes >= 1, "must be >= 1"),
        ("--num_workers", args.num_workers >= -1, "must be >= 0, or -1 (automatic)"),
        ("--log-interval", args.log_interval >= 1, "must be >= 1"),
        ("--checkpoint-hist", args.checkpoint_hist >= 0, "must be >= 0"),
        ("--model-ema-decay", 0.0 < args.model_ema_decay < 1.0, "must be in (0, 1)"),
        *(
            (o.flag, o.valid is None or o.valid(getattr(args, o.key)), o.requirement)
            for o in OPTIONS.values()
        ),  # fmt: skip
        ("--seed", 0 <= args.seed < 2**32, "must be in [0, 2**32)"),
        ("--lr", positive(args.lr), "must be > 0"),
        ("--lr-base", args.lr_base > 0, "must be > 0"),
        ("--lr-base-size", args.lr_base_size >= 1, "must be >= 1"),
        ("--warmup-lr", args.warmup_lr >= 0, "must be >= 0"),
        ("--min-lr", args.min_lr >= 0, "must be >= 0"),
        ("--warmup-epochs", args.warmup_epochs >= 0, "must be >= 0"),
        ("--cooldown-epochs", args.cooldown_epochs >= 0, "must be >= 0"),
        ("--decay-epochs", args.decay_epochs > 0, "must be > 0"),
        ("--decay-rate", args.decay_rate > 0, "must be > 0"),
        ("--lr-cycle-mul", args.lr_cycle_mul > 0, "must be > 0"),
        ("--lr-cycle-decay", args.lr_cycle_decay > 0, "must be > 0"),
        ("--lr-cycle-limit", args.lr_cycle_limit >= 1, "must be >= 1"),
        ("--lr-k-decay", args.lr_k_decay > 0, "must be > 0"),
        ("--lr-noise-pct", args.lr_noise_pct >= 0, "must be >= 0"),
        ("--lr-noise-std", args.lr_noise_std >= 0, "must be >= 0"),
        ("--weight-decay", args.weight_decay >= 0, "must be >= 0"),
        ("--momentum", args.momentum >= 0, "must be >= 0"),
        ("--opt-eps", positive(args.opt_eps), "must be > 0"),
        ("--clip-grad", positive(args.clip_grad), "must be > 0"),
        ("--layer-decay", positive(args.layer_decay), "must be > 0"),
        (
            "--layer-decay",
            args.layer_decay is None or args.layer_decay <= 1,
            "must be <= 1 (lower layers get lr x decay^depth: above 1 they would learn faster)",
        ),
        (
            "--decay-rate",
            args.sched == "poly" or args.decay_rate <= 1,
            f"must be <= 1: --sched {args.sched} multiplies the lr by it at each decay (only poly "
            "reads it as a power)",
        ),
        ("--start-epoch", args.start_epoch is None or args.start_epoch >= 0, "must be >= 0"),
        ("--patience-epochs", args.patience_epochs >= 1, "must be >= 1"),
        ("--hidden_size", 1 <= args.hidden_size <= MAX_WIDTH, f"must be in [1, {MAX_WIDTH}]"),
        (
            "--intermediate_size",
            0 <= args.intermediate_size <= 4 * MAX_WIDTH,
            f"must be in [0, {4 * MAX_WIDTH}]",
        ),
        ("--num_layers", 1 <= args.num_layers <= MAX_LAYERS, f"must be in [1, {MAX_LAYERS}]"),
        ("--num_heads", args.num_heads >= 1, "must be >= 1"),
        ("--overlap", args.overlap >= 0, "must be >= 0"),
        ("--pad_vocab_size_multiple", args.pad_vocab_size_multiple >= 1, "must be >= 1"),
        ("--dropout", 0 <= args.dropout < 1, "must be in [0, 1)"),
        ("--attn_dropout", 0 <= args.attn_dropout < 1, "must be in [0, 1)"),
        (
            "--vocab_size",
            args.vocab_size is None or 6 <= args.vocab_size <= MAX_VOCAB,
            f"must be in [6, {MAX_VOCAB:,}]",
        ),
        (
            "--split",
            len(args.split) == 3
            and all(f >= 0 for f in args.split)
            and abs(sum(args.split) - 1) < 1e-6,
            "needs three non-negative fractions summing to 1",
        ),
        (
            "--num_samples",
            args.num_samples is None or args.num_samples == -1 or args.num_samples >= 1,
            "must be -1 (all) or >= 1",
        ),
    ]
    for flag, ok, why in checks:
        if not ok:
            raise ConfigError(f"{flag} {why}; got {getattr(args, _key(flag))}")
    if args.lr is not None and args.min_lr > args.lr:
        raise ConfigError(
            f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the schedule decays from --lr "
            "down to --min-lr"
        )
    if _whole_run_warms_up(args) and not args.sched_on_updates:
        raise ConfigError(
            f"--warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: the schedule steps "
            "per epoch (--no-sched-on-updates), so the run would end before its warm-up does; "
            "use fewer warm-up epochs, or --warmup-prefix to train them before the --epochs"
        )
    if args.val_metric_mode is None:
        args.val_metric_mode = "max" if args.eval_metric in _MAXIMISED else "min"
    if args.num_samples == -1:
        args.num_samples = None


def _whole_run_warms_up(args: argparse.Namespace) -> bool:
    # --warmup-prefix trains the warm-up before the epochs; more cycles train more epochs.
    prefixed_or_cycled = args.warmup_prefix or args.lr_cycle_limit > 1
    return 0 < args.epochs <= args.warmup_epochs and not prefixed_or_cycled


def config_warnings(args: argparse.Namespace) -> list[str]:
    """Settings that are possible but almost never meant, one line each (train.py logs them)."""
    found = []
    lr = ("--lr", args.lr) if args.lr is not None else ("--lr-base", args.lr_base)
    if lr[1] > 1:
        found.append(
            f"{lr[0]} {lr[1]:g} is far above the usual 1e-5 to 1e-1: the loss will likely diverge"
        )
    if args.opt_eps is not None and args.opt_eps > 0.1:
        found.append(
            f"--opt-eps {args.opt_eps:g} dwarfs the gradients' scale (usual: 1e-8 to 1e-6): "
            "updates shrink to about lr x gradient / eps"
        )
    if args.lr is not None and args.warmup_epochs and args.warmup_lr > args.lr:
        found.append(
            f"--warmup-lr {args.warmup_lr:g} is above --lr {args.lr:g}: the warm-up lowers the lr"
        )
    if args.sched_on_updates and _whole_run_warms_up(args):
        found.append(
            f"--warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: the whole run is "
            "warm-up; the lr never reaches its peak"
        )
    return found


def to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved configuration (written next to the checkpoints and into each of them)."""
    return {k: v for k, v in sorted(vars(args).items())}


# From the user's names to the components' keywords -------------------------------------------------
# The library's builders take keywords; these functions are the one place that knows which flag feeds
# which keyword. Each takes the resolved configuration as a mapping (``vars(args)``, or the ``config``
# stored in a checkpoint).


def _keywords(cfg: Mapping[str, Any], same: str, **renamed: str) -> dict[str, Any]:
    """The values of ``cfg`` under a builder's keywords: ``same`` names the settings whose key is
    the keyword, ``renamed`` maps a keyword to its setting's key."""
    return {k: cfg[k] for k in same.split()} | {kw: cfg[key] for kw, key in renamed.items()}


def model_kwargs(cfg: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """The model config's fields (``helm.models.model_config``)."""
    kw = _keywords(
        cfg,
        "pad_vocab_size_multiple num_layers num_heads dropout attn_dropout tie_embeddings "
        "pos_embedding pos_embedding_apply pos_embedding_dim max_seq_len bidirectional",
        d_model="hidden_size",
        d_ff="intermediate_size",
    )
    kw["vocab_size"] = vocab_size
    if cfg["activation"] is not None:  # otherwise each model keeps its own default
        kw["activation"] = cfg["activation"]
    if cfg["model_name"] == "mamba" and cfg["ssm_layer"] is not None:
        kw["ssm_layer"] = cfg["ssm_layer"]
    return kw


def loss_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``helm.losses.build_loss``'s keywords, less the tokenizer's and the tree's."""
    return dict(name=cfg["loss"], impl=cfg["loss_impl"], **loss_options(cfg))


def data_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``helm.data.prepare.prepare_data``'s keywords, less the run's folders and rank."""
    return _keywords(
        cfg,
        "demo_corpus data_dir train_file val_file test_file file_extension column_name split seed "
        "on_invalid num_samples tokenizer overlap vocab_size data_type cache_dir",
    )


def dataset_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``helm.data.dataset.LMDataset``'s keywords, less the store, vocabulary and truncation."""
    kw = _keywords(cfg, "mode max_seq_len masking_strategy masking_ratio mask_replace seed")
    return kw | {"return_position_ids": cfg.get("position_ids", False)}  # absent from old runs


def lr_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``helm.optim.scaled_lr``'s keywords, less the global batch."""
    return _keywords(cfg, "lr lr_base lr_base_size lr_base_scale opt")


def optimizer_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``helm.optim.build_optimizer``'s keywords, less the parameters and the lr."""
    return _keywords(cfg, "opt weight_decay layer_decay momentum", eps="opt_eps", betas="opt_betas")


def schedule_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``helm.sched.build_scheduler``'s keywords, less the optimizer, base lr and epoch length."""
    return _keywords(
        cfg,
        "sched epochs min_lr warmup_epochs warmup_lr warmup_prefix cooldown_epochs decay_epochs "
        "decay_milestones decay_rate seed patience_epochs",
        on_updates="sched_on_updates",
        cycle_mul="lr_cycle_mul",
        cycle_decay="lr_cycle_decay",
        cycle_limit="lr_cycle_limit",
        k_decay="lr_k_decay",
        noise="lr_noise",
        noise_pct="lr_noise_pct",
        noise_std="lr_noise_std",
        plateau_mode="val_metric_mode",
    )


def flag_reference() -> str:
    """README's flag reference, generated from ``FLAGS`` (``python -m helm.config``)."""
    lines = [
        "`python train.py --help` prints the same list. Every flag also answers to its other "
        "spelling (`--batch_size` and `--batch-size` are one flag).",
    ]
    for title, rows in FLAGS.items():
        lines += ["", f"**{title}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for flag, default, kind, help in rows:
            name = f"{flag} / --no-{flag[2:]}" if kind == "onoff" else flag
            if kind == "on":
                shown = "on" if default else "off"
            elif default is None:
                shown = "-"
            elif isinstance(default, list):
                shown = ("," if kind == "fractions" else " ").join(map(str, default))
            else:
                shown = str(default) if default != "" else "''"
            meaning = help.replace("|", "\\|")
            if isinstance(kind, tuple):
                meaning += " (" + " \\| ".join(map(str, kind)) + ")"
            lines.append(f"| `{name}` | {shown} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(flag_reference(), end="")
