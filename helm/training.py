"""The pieces train.py composes: the LM wrapper, data preparation, evaluation, state capture, logging.

train.py reads top to bottom; what it needs beyond a few lines lives here, one function per concern.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import random
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from helm import distributed as hdist
from helm.data import build_token_cache, resolve_splits, write_demo_corpus
from helm.data.dataset import collate
from helm.data.io import Split, iter_sequences
from helm.distributed import all_reduce_sum
from helm.metrics import MetricAccumulator

log = logging.getLogger("helm")
DEMO_RECORDS = 3000  # size of the built-in synthetic corpus (before --num_samples)


# Model wrapper ----------------------------------------------------------------------------------


class LanguageModel(nn.Module):
    """Backbone + LM head over target positions only: MLM projects the masked tokens alone.

    ``forward`` returns ``(logits (N, V_pad), targets (N,))`` for the N positions whose label is not
    -100; the loss is computed outside, on these. DDP and compile wrap this module.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        keep = labels != -100  # (B, T)
        return self.backbone.lm_head(hidden[keep]), labels[keep]  # (N, V_pad), (N,)


def forward_backward(
    model: nn.Module,
    micro: list[dict[str, torch.Tensor]],
    loss_fn,
    scaler: torch.amp.GradScaler,
    autocast,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches of one optimizer update.

    The loss is normalised by the GLOBAL number of target tokens of the update (all micro-batches,
    all ranks): MLM masks vary per row, so a mean of per-rank means would weight tokens unequally.
    DDP averages gradients over ranks, hence the factor world_size. Gradients are synchronised on the
    last micro-batch only (``no_sync`` before). Returns (loss sum, targets, input tokens), on device.
    """
    n_targets = all_reduce_sum(sum((b["labels"] != -100).sum() for b in micro).float())
    scale = world_size / n_targets.clamp(min=1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=n_targets.device)
    targets_seen = torch.zeros((), dtype=torch.long, device=n_targets.device)
    tokens = torch.zeros((), dtype=torch.long, device=n_targets.device)
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        # no_sync() is a one-shot context: it must span both the forward and the backward.
        sync = (
            contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        )
        with sync:
            with autocast():
                logits, targets = model(**batch)
                micro_sum = loss_fn(logits, targets, reduction="sum")
            scaler.scale(micro_sum * scale).backward()  # backward outside autocast, as recommended
        loss_sum += micro_sum.detach().double()
        targets_seen += targets.numel()
        mask = batch.get("attention_mask")
        tokens += mask.sum() if mask is not None else batch["input_ids"].numel()
    return loss_sum, targets_seen, tokens


def lm_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``collate``, minus the attention mask when no row is padded (decided on the host, no sync):
    a mask-free batch lets causal attention take SDPA's flash path."""
    batch = collate(items)
    if bool(batch["attention_mask"].all()):
        del batch["attention_mask"]
    return batch


def model_kwargs(args, vocab_size: int) -> dict[str, Any]:
    """Map the CLI's names onto the model configs' fields."""
    kw = dict(
        vocab_size=vocab_size,
        pad_vocab_size_multiple=args.pad_vocab_size_multiple,
        d_model=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        d_ff=args.intermediate_size,
        dropout=args.dropout,
        attn_dropout=args.attn_dropout,
        tie_embeddings=args.tie_embeddings,
        pos_embedding=args.pos_embedding,
        pos_embedding_apply=args.pos_embedding_apply,
        pos_embedding_dim=args.pos_embedding_dim,
        max_seq_len=args.max_seq_len,
        bidirectional=args.bidirectional,
    )
    if args.activation is not None:  # otherwise each model keeps its own default
        kw["activation"] = args.activation
    if args.model_name == "mamba" and args.ssm_layer is not None:
        kw["ssm_layer"] = args.ssm_layer
    return kw


# Data -------------------------------------------------------------------------------------------


@dataclass
class Data:
    tokenizer: Any
    stores: dict[str, Any]  # split name -> TokenStore
    splits: dict[str, Split]


def _resolve(path: str | None, data_dir: str | None) -> str | None:
    """Files are taken relative to --data_dir when they are not found as given (original usage)."""
    if path is None or data_dir is None or Path(path).is_absolute() or Path(path).exists():
        return path
    return str(Path(data_dir) / path)


def demo_corpus_path(cache_dir: Path) -> Path:
    return cache_dir / "demo" / f"demo-{DEMO_RECORDS}.txt"


def prepare_data(args, info: hdist.DistInfo, out_dir: Path, tokenizer_state: dict | None) -> Data:
    """Splits, tokenizer (built, trained on the training split, or restored) and token caches."""
    from helm.data.cache import default_cache_dir
    from helm.tokenizers import build_tokenizer

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    data_type = "nuc" if args.data_type == "codon" else args.data_type
    if args.demo_corpus:
        train_file = demo_corpus_path(cache_dir)
        if info.is_main and not train_file.exists():
            write_demo_corpus(train_file, n=DEMO_RECORDS, seed=0)
        hdist.barrier()
        log.info(
            "no --data_dir/--train_file: training on the built-in SYNTHETIC demo corpus %s",
            train_file,
        )
        splits = resolve_splits(train_file=train_file, seed=args.seed, split=tuple(args.split))
    else:
        splits = resolve_splits(
            data_dir=args.data_dir,
            train_file=_resolve(args.train_file, args.data_dir),
            val_file=_resolve(args.val_file, args.data_dir),
            test_file=_resolve(args.test_file, args.data_dir),
            file_extension=args.file_extension,
            seed=args.seed,
            split=tuple(args.split),
        )

    if tokenizer_state is not None:
        tokenizer = tokenizer_from_state(tokenizer_state)
    elif args.tokenizer in ("bpe", "wp", "ug"):
        tok_dir = out_dir / "tokenizer"
        if info.is_main:
            sample = _training_sequences(splits["train"], args, data_type)
            log.info("training the %s tokenizer on a sample of the training split", args.tokenizer)
            tokenizer = build_tokenizer(
                args.tokenizer,
                overlap=args.overlap,
                vocab_size=args.vocab_size,
                data_type=args.data_type,
                train_sequences=sample,
                seed=args.seed,
            )
            tokenizer.save(tok_dir)
        hdist.barrier()
        if not info.is_main:
            from helm.tokenizers import load_tokenizer

            tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = build_tokenizer(
            args.tokenizer,
            overlap=args.overlap,
            vocab_size=args.vocab_size,
            data_type=args.data_type,
        )

    stores = {}
    for name, split in splits.items():
        stores[name] = build_token_cache(
            split,
            tokenizer,
            cache_dir,
            column_name=args.column_name,
            on_invalid=args.on_invalid,
            num_samples=args.num_samples if name == "train" else None,
            file_extension=args.file_extension,
            data_type=data_type,
            show_progress=info.is_main and sys.stderr.isatty(),
        )
        log.info(
            "%s: %s records, %s tokens",
            name,
            f"{len(stores[name]):,}",
            f"{stores[name].num_tokens:,}",
        )
    return Data(tokenizer, stores, splits)


def _training_sequences(split: Split, args, data_type: str):
    """The training split as a stream (its first ``--num_samples`` records, like the token cache);
    the tokenizer reservoir-samples what it trains on."""
    stream = iter_sequences(
        split.path,
        indices=split.indices,
        column_name=args.column_name,
        on_invalid=args.on_invalid,
        file_extension=args.file_extension,
        data_type=data_type,
    )
    return itertools.islice(stream, args.num_samples)


# State capture ----------------------------------------------------------------------------------


def tokenizer_state(tokenizer) -> dict[str, bytes]:
    """The tokenizer's saved folder as bytes, so a checkpoint alone can rebuild it."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(tmp, arcname="tokenizer")
        return {"tar": buf.getvalue(), "config": json.dumps(tokenizer.config(), sort_keys=True)}


def tokenizer_from_state(state: dict[str, bytes]):
    from helm.tokenizers import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(state["tar"]), mode="r") as tar:
            tar.extractall(tmp, filter="data")
        return load_tokenizer(Path(tmp) / "tokenizer")


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    loss_fn,
    hierarchy,
    vocab_size: int,
    device,
    autocast,
    prefix: str = "val",
) -> dict[str, float]:
    """Loss and metrics over a loader, summed across ranks (sums and counts, not means of means)."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(hierarchy=hierarchy, vocab_size=vocab_size)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast():
            logits, targets = model(**batch)
        acc.update(logits, targets, loss_sum=loss_fn(logits, targets, reduction="sum"))
    acc.all_reduce()
    out = {f"{prefix}_{k}": v for k, v in acc.compute().items()}
    model.train(was_training)
    return out


def to_device(
    batch: dict[str, torch.Tensor], device: torch.device, non_blocking: bool = False
) -> dict:
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


class CudaPrefetcher:
    """Copies the next batch to the GPU on a side stream while the current one computes."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self):
        stream = torch.cuda.Stream(device=self.device)
        it = iter(self.loader)
        nxt = None
        for batch in it:
            with torch.cuda.stream(stream):
                batch = to_device(batch, self.device, non_blocking=True)
            if nxt is not None:
                yield nxt
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for v in batch.values():
                v.record_stream(torch.cuda.current_stream(self.device))
            nxt = batch
        if nxt is not None:
            yield nxt


# Throughput -------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, for MFU.
_PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "L40S": 362e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


def flops_per_token(
    n_params: int, num_layers: int, d_model: int, seq_len: int, attention: bool
) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus, for attention
    models, 12 * layers * d_model * seq_len for the score and value products (PaLM appendix B)."""
    return 6 * n_params + (12 * num_layers * d_model * seq_len if attention else 0)


# Logging ----------------------------------------------------------------------------------------


def setup_logging(is_main: bool, out_dir: Path | None) -> None:
    """stdlib logging on rank 0 only (console + <output>/train.log); other ranks log warnings."""
    root = logging.getLogger("helm")
    root.handlers.clear()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if is_main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False


def teardown_logging() -> None:
    """Undo ``setup_logging`` (close the log file, let records propagate again), so a process that
    calls train.main in-process (a notebook, the tests) is left as it was."""
    root = logging.getLogger("helm")
    for handler in list(root.handlers):
        handler.close()
        root.removeHandler(handler)
    root.setLevel(logging.NOTSET)
    root.propagate = True


class RunLogger:
    """metrics.jsonl (one JSON line per log step) and TensorBoard under <output>/tb, rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tb"))
            except (
                ImportError
            ):  # tensorboard is a dependency; a broken install should not stop training
                log.warning("tensorboard is not importable: logging to metrics.jsonl only")

    def log(self, step: int, values: dict[str, float], **extra) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **extra, **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


# Loading a trained model -------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: nn.Module  # the backbone, with .lm_head, in eval mode
    tokenizer: Any
    hierarchy: Any  # CodonHierarchy
    config: dict[str, Any]  # the resolved training configuration
    checkpoint: dict[str, Any]


def load_checkpoint_model(
    path, *, ema: bool = False, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Rebuild a trained backbone, its tokenizer and codon tree from a checkpoint alone.

    ``ema=True`` loads the EMA weights (an error when the run had no ``--model-ema``).
    """
    from helm.checkpoint import CheckpointError, load_checkpoint
    from helm.hierarchy import CodonHierarchy
    from helm.models import build_model, model_config

    ckpt = load_checkpoint(path)
    weights = ckpt["model"]
    if ema:
        if ckpt.get("ema") is None:
            raise CheckpointError(f"{path} holds no EMA weights (trained without --model-ema)")
        weights = ckpt["ema"]
    cfg = model_config(ckpt["model_name"], **ckpt["model_config"])
    model = build_model(ckpt["model_name"], cfg)
    model.load_state_dict(weights)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer_from_state(ckpt["tokenizer"]),
        hierarchy=CodonHierarchy.from_state_dict(ckpt["hierarchy"]),
        config=ckpt["config"],
        checkpoint=ckpt,
    )
