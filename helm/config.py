"""Command line and YAML configuration of train.py.

Flags keep the original HELM README's names (dashes and underscores as there). A YAML file given with
``--config`` uses the same keys (either spelling); the command line beats YAML, and YAML beats the
defaults; several ``--config`` files stack, later ones winning. When no training data is named anywhere, ``configs/quickstart.yaml`` becomes the base layer:
a tiny model on the built-in synthetic demo corpus that trains on a CPU in a minute or two.
Unknown keys and bad values fail before anything else happens, naming the key.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from helm.hierarchy import HIERARCHIES
from helm.losses import LOSSES
from helm.models import MODELS
from helm.models.common import ACTIVATIONS, POS_EMBEDDING_APPLY, POS_EMBEDDINGS
from helm.optim import OPTIMIZERS
from helm.sched import SCHEDULES
from helm.tokenizers import DATA_TYPES, TOKENIZERS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIG_DIR / "quickstart.yaml"
DATA_KEYS = ("data_dir", "train_file")

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


class ConfigError(ValueError):
    """A user mistake in flags or YAML: reported as one clear message, no traceback."""


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _floats(text: str) -> list[float]:
    return [float(x) for x in str(text).replace(",", " ").split()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a codon-level mRNA language model (HELM).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        nargs="+",
        default=None,
        help="YAML file(s) keyed by flag names; later files win",
    )

    g = p.add_argument_group("loss")
    g.add_argument(
        "--loss",
        default="XE",
        choices=LOSSES,
        help="training loss: XE, or one that knows the genetic code (HXE, soft labels, amino-acid losses)",
    )
    g.add_argument(
        "--hxe-alpha",
        type=float,
        default=0.2,
        help="HXE weight decay per tree level: w_d = exp(-alpha d) / Z",
    )
    g.add_argument(
        "--hxe-normalize",
        type=_bool,
        default=True,
        help="normalise HXE weights by Z (sum over nodes)",
    )
    g.add_argument(
        "--soft-labels-beta", type=float, default=15.0, help="sharpness of soft-label targets"
    )
    g.add_argument(
        "--aa-loss-weight",
        type=float,
        default=1.0,
        help="weight of the amino-acid term in aa_loss_add",
    )
    g.add_argument(
        "--hierarchy",
        default="true",
        choices=HIERARCHIES,
        help="codon tree; random keeps the shape",
    )
    g.add_argument(
        "--loss-impl",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="auto: Triton on CUDA",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--data_dir",
        default=None,
        help="folder holding the data files (none: built-in demo corpus)",
    )
    g.add_argument(
        "--train_file",
        default=None,
        help="training sequences (relative to --data_dir when not found as given)",
    )
    g.add_argument("--val_file", default=None, help="absent: split from the training file, seeded")
    g.add_argument(
        "--test_file", default=None, help="test sequences (absent: split from the training file)"
    )
    g.add_argument(
        "--file_extension",
        default=None,
        help="txt, csv, tsv, fasta, fa (+ .gz); default: from the name",
    )
    g.add_argument("--column_name", default=None, help="sequence column of csv/tsv files")
    g.add_argument(
        "--split",
        type=_floats,
        default=[0.9, 0.05, 0.05],
        help="train/val/test fractions when splitting",
    )
    g.add_argument(
        "--on-invalid",
        default="error",
        choices=["error", "skip"],
        help="bad records: stop, or skip and count",
    )
    g.add_argument(
        "--cache_dir",
        default=None,
        help="token cache (default $HELM_CACHE_DIR or ~/.cache/helm/tokens)",
    )
    g.add_argument(
        "--max_seq_len", type=int, default=256, help="tokens per sequence seen by the model"
    )
    g.add_argument(
        "--truncation",
        default="head",
        choices=["head", "random"],
        help="longer sequences: head or random crop",
    )
    g.add_argument(
        "--masking_strategy",
        default="single",
        choices=["single", "double", "span"],
        help="MLM masks: single tokens, adjacent pairs, or geometric spans (mean 3, max 10)",
    )
    g.add_argument(
        "--masking_ratio",
        type=float,
        default=0.15,
        help="fraction of tokens masked (in expectation) for MLM",
    )
    g.add_argument(
        "--mask-replace",
        default="mask",
        choices=["mask", "bert"],
        help="bert: 80/10/10 replacement",
    )
    g.add_argument(
        "--data-type",
        default="nuc",
        choices=DATA_TYPES,
        help="nuc: nucleotides; codon: nuc read as codons (3mer); aa: proteins (nucleotides translated)",
    )
    g.add_argument(
        "--tokenizer",
        default="3mer",
        choices=TOKENIZERS,
        help="k-mers (3mer = codons, nuc, 6mer) or subwords trained on the training split (bpe, wp, ug)",
    )
    g.add_argument("--overlap", type=int, default=0, help="k-mer overlap: stride k - overlap")
    g.add_argument(
        "--position_ids", action="store_true", help="feed explicit position ids to the model"
    )
    g.add_argument(
        "--mode",
        default="mlm",
        choices=["mlm", "clm"],
        help="mlm: masked LM, bidirectional; clm: next-token LM, causal",
    )
    g.add_argument("--batch_size", type=int, default=64, help="sequences per device per micro-step")
    g.add_argument(
        "--num_samples", type=int, default=-1, help="use the first N training records (-1: all)"
    )

    g = p.add_argument_group("model")
    g.add_argument("--model_name", default="gpt2", choices=list(MODELS), help="backbone")
    g.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on for mlm, off for clm (a bidirectional clm is refused)",
    )
    g.add_argument(
        "--ssm_layer", default=None, type=str.lower, choices=["mamba", "mamba2"], help="mamba only"
    )
    g.add_argument(
        "--vocab_size", type=int, default=None, help="subword vocabulary size; derived for k-mers"
    )
    g.add_argument("--num_layers", type=int, default=4, help="number of blocks")
    g.add_argument("--num_heads", type=int, default=4, help="attention heads (gpt2, bert)")
    g.add_argument(
        "--pad_vocab_size_multiple",
        type=int,
        default=8,
        help="pad the embedding rows to a multiple",
    )
    g.add_argument(
        "--pos_embedding",
        default="absolute",
        choices=POS_EMBEDDINGS,
        help="positions: none, learned absolute, fixed sincos, rotary (attention only)",
    )
    g.add_argument(
        "--pos_embedding_apply",
        default="add",
        choices=POS_EMBEDDING_APPLY,
        help="add positions to tokens, or concatenate them (--pos_embedding_dim wide)",
    )
    g.add_argument(
        "--pos_embedding_dim", type=int, default=None, help="position width under concat"
    )
    g.add_argument(
        "--tie_embeddings",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="share the token embedding with the LM head",
    )
    g.add_argument("--hidden_size", type=int, default=256, help="model width d_model")
    g.add_argument("--intermediate_size", type=int, default=1024, help="MLP width d_ff")
    g.add_argument(
        "--dropout", type=float, default=0.0, help="dropout on residual branches and embeddings"
    )
    g.add_argument(
        "--attn_dropout",
        type=float,
        default=0.0,
        help="dropout on attention probabilities (training only)",
    )
    g.add_argument(
        "--activation",
        default=None,
        choices=ACTIVATIONS,
        help="MLP activation (default: the model's own: gelu; swiglu for mamba's gated MLP)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = p.add_argument_group("optimizer")
    g.add_argument(
        "--opt",
        default="adamw",
        type=str.lower,
        choices=OPTIMIZERS,
        help="optimizer (timm names; sgd and nesterov are Nesterov momentum SGD)",
    )
    g.add_argument(
        "--opt-eps",
        type=float,
        default=None,
        help="optimizer epsilon (default: the optimizer's own)",
    )
    g.add_argument(
        "--opt-betas",
        type=float,
        nargs="+",
        default=None,
        help="optimizer betas, two values (Adam family, LAMB)",
    )
    g.add_argument(
        "--momentum", type=float, default=0.9, help="momentum of sgd, momentum, nesterov, rmsprop"
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=2e-5,
        help="decoupled weight decay (never on norms, biases, position tables, SSM A/D, filters)",
    )
    g.add_argument(
        "--clip-grad", type=float, default=None, help="clip threshold (none: no clipping)"
    )
    g.add_argument(
        "--clip-mode",
        default="norm",
        choices=["norm", "value", "agc"],
        help="gradient clipping: total norm, per value, or adaptive (AGC)",
    )
    g.add_argument(
        "--layer-decay",
        type=float,
        default=None,
        help="per-layer lr scale: lr * decay^(depth from top)",
    )
    g.add_argument(
        "--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer update"
    )

    g = p.add_argument_group("learning-rate schedule (timm semantics)")
    g.add_argument(
        "--early-stop", action="store_true", help="stop after --patience-epochs without improvement"
    )
    g.add_argument(
        "--sched",
        default="cosine",
        choices=SCHEDULES,
        help="learning-rate schedule",
    )
    g.add_argument(
        "--sched-on-updates",
        action="store_true",
        help="step the schedule per optimizer update (recommended)",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (none: --lr-base scaled by global batch)",
    )
    g.add_argument(
        "--lr-base",
        type=float,
        default=1e-3,
        help="lr for --lr-base-size sequences, scaled to the global batch when --lr is not given",
    )
    g.add_argument(
        "--lr-base-size", type=int, default=256, help="global batch size at which --lr-base applies"
    )
    g.add_argument(
        "--lr-base-scale",
        default="",
        choices=["", "linear", "sqrt"],
        help="'': sqrt for adaptive optimizers, else linear",
    )
    g.add_argument(
        "--lr-noise",
        type=float,
        nargs="+",
        default=None,
        help="noise window as epoch fractions/epochs",
    )
    g.add_argument(
        "--lr-noise-pct",
        type=float,
        default=0.67,
        help="noise is resampled until |noise| < this fraction",
    )
    g.add_argument(
        "--lr-noise-std", type=float, default=1.0, help="standard deviation of the lr noise"
    )
    g.add_argument(
        "--lr-cycle-mul",
        type=float,
        default=1.0,
        help="each cosine/poly/tanh cycle is this much longer than the last",
    )
    g.add_argument(
        "--lr-cycle-decay",
        type=float,
        default=0.5,
        help="each cycle's peak lr is this fraction of the last",
    )
    g.add_argument("--lr-cycle-limit", type=int, default=1, help="number of cycles")
    g.add_argument(
        "--lr-k-decay",
        type=float,
        default=1.0,
        help="k-decay exponent on the position within a cycle (1: plain schedule)",
    )
    g.add_argument(
        "--warmup-lr", type=float, default=1e-8, help="lr at the start of the linear warmup"
    )
    g.add_argument(
        "--min-lr",
        type=float,
        default=0.0,
        help="floor of cosine/poly/tanh schedules and of plateau reductions",
    )
    g.add_argument(
        "--epochs", type=int, default=300, help="training epochs (plus --cooldown-epochs)"
    )
    g.add_argument(
        "--epoch-repeats",
        type=float,
        default=0.0,
        help="passes over the data per epoch (0 or 1: one; 2.5: two and a half)",
    )
    g.add_argument(
        "--start-epoch", type=int, default=None, help="manual start epoch (resume overrides)"
    )
    g.add_argument(
        "--decay-milestones",
        type=int,
        nargs="+",
        default=[90, 180, 270],
        help="epochs at which multistep decays the lr",
    )
    g.add_argument(
        "--decay-epochs", type=float, default=90, help="interval of step decay, in epochs"
    )
    g.add_argument("--warmup-epochs", type=int, default=5, help="linear warmup length, in epochs")
    g.add_argument(
        "--warmup-prefix", action="store_true", help="warmup does not count toward the decay"
    )
    g.add_argument(
        "--cooldown-epochs",
        type=int,
        default=0,
        help="epochs added at the end (at --min-lr for cycle schedules)",
    )
    g.add_argument(
        "--patience-epochs",
        type=int,
        default=10,
        help="epochs without improvement before plateau cuts the lr / early stopping stops",
    )
    g.add_argument(
        "--decay-rate",
        type=float,
        default=0.1,
        help="lr factor of step/multistep/plateau decays; power of poly",
    )

    g = p.add_argument_group("exponential moving average of the weights")
    g.add_argument(
        "--model-ema",
        action="store_true",
        help="keep an exponential moving average of the weights (validated and saved beside them)",
    )
    g.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU")
    g.add_argument(
        "--model-ema-decay", type=float, default=0.9998, help="EMA decay per optimizer update"
    )

    g = p.add_argument_group("run")
    g.add_argument(
        "--seed",
        type=int,
        default=42,
        help="seed of initialisation, splits, masks, data order and dropout",
    )
    g.add_argument(
        "--resume", default=None, help="checkpoint path, or 'auto' for <output>/checkpoints/last.pt"
    )
    g.add_argument(
        "--accelerator",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps", "tpu"],
        help="device (auto: cuda, then mps, then cpu); tpu is refused",
    )
    g.add_argument(
        "--num_workers", type=int, default=4, help="DataLoader worker processes per rank"
    )
    g.add_argument(
        "--distributed-backend", default="auto", help="auto (nccl on CUDA, gloo on CPU), nccl, gloo"
    )
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="convert BatchNorm layers to SyncBatchNorm under DDP (the built-in models have none)",
    )
    g.add_argument("--num_nodes", type=int, default=1, help="nodes; more than one needs torchrun")
    g.add_argument(
        "--num_devices",
        type=int,
        default=1,
        help="processes per node; without torchrun they are spawned",
    )
    g.add_argument(
        "--worker-seeding",
        default="all",
        choices=["all", "part"],
        help="DataLoader worker seeding as in timm: all (python, numpy, torch) or part",
    )
    g.add_argument(
        "--checkpoint-hist",
        type=int,
        default=10,
        help="epoch checkpoints kept beside last and best",
    )
    g.add_argument(
        "--eval-metric",
        default="val_loss",
        choices=list(EVAL_METRICS),
        help="validation metric choosing best.pt and driving plateau and early stopping",
    )
    g.add_argument(
        "--val-metric-mode", default=None, choices=["min", "max"], help="default: from the metric"
    )
    g.add_argument("--log-interval", type=int, default=10, help="optimizer steps between log lines")
    g.add_argument(
        "--amp",
        action="store_true",
        help="bf16 autocast (fp16 + GradScaler where bf16 is unsupported)",
    )
    g.add_argument(
        "--amp-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16"],
        help="autocast dtype under --amp (auto: bf16 where supported, else fp16 + GradScaler)",
    )
    g.add_argument("--pin-mem", action="store_true", help="pin host memory of batches (CUDA)")
    g.add_argument(
        "--no-prefetcher", action="store_true", help="no CUDA-stream prefetching of batches"
    )
    g.add_argument(
        "--nan-policy",
        default="stop",
        choices=["stop", "skip"],
        help="non-finite loss: stop, or skip the step",
    )
    g.add_argument(
        "--output", default=None, help="run folder (default runs/<model>-<mode>-<loss>-<time>)"
    )
    return p


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """Check one YAML value the way argparse would check it on the command line."""
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
    user_yaml: dict[str, Any] = {}
    for path in pre.config or []:
        user_yaml.update(load_yaml(path, parser))
    named_data = any(getattr(pre, k) for k in DATA_KEYS) or any(user_yaml.get(k) for k in DATA_KEYS)
    if not named_data:
        layers.update(load_yaml(QUICKSTART, parser))
    layers.update(user_yaml)
    parser.set_defaults(**layers)
    args = parser.parse_args(argv)
    args.demo_corpus = not named_data
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    """Cross-flag checks: combinations that cannot apply are refused with what would work."""
    if args.accelerator == "tpu":
        raise ConfigError("--accelerator tpu is not supported: use cuda, cpu or mps")
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
    if args.pos_embedding == "rotary" and args.model_name not in ("gpt2", "bert"):
        raise ConfigError(
            "--pos_embedding rotary needs attention: use --model_name gpt2 or bert, or another embedding"
        )
    if args.distributed_backend not in ("auto", "ddp", "nccl", "gloo"):
        raise ConfigError(
            f"--distributed-backend {args.distributed_backend!r}: use auto, nccl or gloo (ddp means auto)"
        )
    if args.distributed_backend == "ddp":
        args.distributed_backend = "auto"
    checks = [
        ("--masking_ratio", 0.0 < args.masking_ratio < 1.0, "must be in (0, 1)"),
        ("--max_seq_len", args.max_seq_len >= 4, "must be >= 4"),
        ("--batch_size", args.batch_size >= 1, "must be >= 1"),
        ("--grad-accum-steps", args.grad_accum_steps >= 1, "must be >= 1"),
        ("--epochs", args.epochs >= 1, "must be >= 1"),
        ("--epoch-repeats", args.epoch_repeats >= 0, "must be >= 0 (0: one pass per epoch)"),
        ("--num_devices", args.num_devices >= 1, "must be >= 1"),
        ("--num_nodes", args.num_nodes >= 1, "must be >= 1"),
        ("--num_workers", args.num_workers >= 0, "must be >= 0"),
        ("--log-interval", args.log_interval >= 1, "must be >= 1"),
        ("--checkpoint-hist", args.checkpoint_hist >= 0, "must be >= 0"),
        ("--model-ema-decay", 0.0 < args.model_ema_decay < 1.0, "must be in (0, 1)"),
        ("--hxe-alpha", args.hxe_alpha >= 0, "must be >= 0"),
        ("--soft-labels-beta", args.soft_labels_beta > 0, "must be > 0"),
        ("--aa-loss-weight", args.aa_loss_weight >= 0, "must be >= 0"),
        (
            "--split",
            len(args.split) == 3
            and all(f >= 0 for f in args.split)
            and abs(sum(args.split) - 1) < 1e-6,
            "needs three non-negative fractions summing to 1",
        ),
        (
            "--num_samples",
            args.num_samples == -1 or args.num_samples >= 1,
            "must be -1 (all) or >= 1",
        ),
    ]
    for flag, ok, why in checks:
        if not ok:
            raise ConfigError(f"{flag} {why}; got {getattr(args, _key(flag))}")
    if args.val_metric_mode is None:
        args.val_metric_mode = "max" if args.eval_metric in _MAXIMISED else "min"
    if args.num_samples == -1:
        args.num_samples = None


def to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved configuration (written next to the checkpoints and into each of them)."""
    return {k: v for k, v in sorted(vars(args).items())}
