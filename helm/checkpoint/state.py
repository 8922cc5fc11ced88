"""The training state a resume restores (``TrainState``), the RNG and tokenizer states a checkpoint
carries, and a trained model rebuilt from a checkpoint alone (``load_for_eval``)."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from helm import distributed as hdist
from helm.checkpoint.format import (
    COUNTERS,
    FORMAT_VERSION,
    STATE_DICTS,
    CheckpointError,
    RunInfo,
    _bytes_tensor,
    _numpy_rng,
    _python_rng,
    load_checkpoint,
)
from helm.checkpoint.manager import CheckpointManager


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and numbers (what a checkpoint stores)."""
    state = {
        "python": _python_rng(random.getstate()),
        "numpy": _numpy_rng(np.random.get_state(legacy=True)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tokenizer_state(tokenizer) -> dict[str, Any]:
    """The tokenizer's saved folder as a tar (a uint8 tensor), so a checkpoint alone rebuilds it."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(tmp, arcname="tokenizer")
    config = json.dumps(tokenizer.config(), sort_keys=True)
    return {"tar": _bytes_tensor(buf.getvalue()), "config": config}


def tokenizer_from_state(state: dict[str, Any]):
    from helm.tokenizers import load_tokenizer

    tar = state["tar"]
    data = tar.numpy().tobytes() if isinstance(tar, torch.Tensor) else bytes(tar)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as archive:
            archive.extractall(tmp, filter="data")
        return load_tokenizer(Path(tmp) / "tokenizer")


@dataclass
class TrainState:
    """Everything a resume restores: the modules and optimiser state of a run, and where it is.

    ``model`` and ``ema`` are the raw backbones (never a compiled or DDP view). The counters move
    with training: ``step`` counts optimizer updates, ``batches_done`` the batches of ``epoch``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # helm.sched.LRScheduler
    scaler: torch.amp.GradScaler
    saver: CheckpointManager
    ema: nn.Module | None = None
    epoch: int = 0
    step: int = 0
    batches_done: int = 0
    bad_epochs: int = 0
    rank: int = field(default=0, repr=False)
    world_size: int = field(default=1, repr=False)
    # The last finished epoch's validation line: {"step", "epoch", "metrics"} (plain data).
    epoch_metrics: dict[str, Any] | None = None

    def checkpoint(self, run: RunInfo, *, gather: bool = True) -> dict[str, Any]:
        """The checkpoint dict (module docstring). With ``gather`` it is a collective (every rank
        calls it) and holds every rank's RNG; without, rank 0's alone (an interrupt's save)."""
        rngs = [rng_state()]
        if gather and hdist.is_distributed():
            rngs = hdist.all_gather_object(rng_state())
        state: dict[str, Any] = {"format_version": FORMAT_VERSION}
        state |= {name: getattr(self, name).state_dict() for name in STATE_DICTS}
        state["ema"] = self.ema.state_dict() if self.ema is not None else None
        state |= {name: getattr(self, name) for name in COUNTERS}
        state["world_size"] = self.world_size  # batches_done counts each rank's batches
        return state | {"rng": rngs} | run.to_dict()

    def restore(
        self, ckpt: dict[str, Any], path: str | os.PathLike | None = None, *, weights: bool = True
    ) -> None:
        """Load a checkpoint into the modules, the counters and this rank's RNG; a checkpoint of
        another model or size raises `CheckpointError` (naming ``path`` when given). ``weights``
        False: the model, optimizer and EMA are left to the caller (a sharded checkpoint's tensors,
        ``helm.checkpoint.dcp.restore``)."""
        saved_world = ckpt.get("world_size", self.world_size)
        if saved_world != self.world_size and ckpt.get("batches_done", 0):
            raise CheckpointError(
                f"checkpoint {path or ''} was stopped inside epoch {ckpt['epoch']} on {saved_world} "
                f"rank(s); its data position is per rank, so resume it on {saved_world} rank(s), "
                f"or from an epoch checkpoint (epoch-NNNN.pt) on {self.world_size}"
            )
        try:
            for name in STATE_DICTS:
                if weights or name not in ("model", "optimizer"):
                    getattr(self, name).load_state_dict(ckpt[name])
            if weights and self.ema is not None and ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            name = f"checkpoint {path}" if path is not None else "the checkpoint"
            raise CheckpointError(f"{name} does not fit this model and run: {first}") from None
        for name in COUNTERS:  # bad_epochs and epoch_metrics are absent from older files
            setattr(self, name, ckpt.get(name, getattr(TrainState, name)))
        set_rng_state(ckpt["rng"][min(self.rank, len(ckpt["rng"]) - 1)])


@dataclass
class LoadedModel:
    model: nn.Module  # the backbone, with .lm_head, in eval mode
    tokenizer: Any
    hierarchy: Any  # CodonHierarchy
    config: dict[str, Any]  # the resolved training configuration
    checkpoint: dict[str, Any]

    @property
    def model_name(self) -> str:
        return self.checkpoint["model_name"]

    @property
    def data_type(self) -> str:
        """How the model's training data was read (``codon`` data reads as ``nuc``)."""
        kind = self.config.get("data_type", "nuc")
        return "nuc" if kind == "codon" else kind


def _weights(ckpt: dict[str, Any], path, ema: bool) -> dict[str, torch.Tensor]:
    if not ema:
        return ckpt["model"]
    if ckpt.get("ema") is None:
        raise CheckpointError(f"{path} holds no EMA weights (trained without --model-ema)")
    return ckpt["ema"]


def load_for_eval(
    path: str | os.PathLike, *, ema: bool = False, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Rebuild a trained backbone, its tokenizer and codon tree from a checkpoint alone.

    ``ema=True`` loads the EMA weights (an error when the run had no ``--model-ema``).
    """
    from helm.hierarchy import CodonHierarchy
    from helm.models import build_model, model_config

    ckpt = load_checkpoint(path)
    fields = dict(ckpt["model_config"])
    if ckpt["model_name"] == "bert":  # BERT checkpoints from before the MLM head transform
        fields.setdefault("mlm_head", "linear")
    weights = _weights(ckpt, path, ema)
    try:  # a checkpoint whose configuration and weights disagree (crafted: its digest is fine)
        model = build_model(ckpt["model_name"], model_config(ckpt["model_name"], **fields))
        model.load_state_dict(weights)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        why = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2]) or repr(exc)
        raise CheckpointError(f"checkpoint {path} does not rebuild its model: {why}") from None
    model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer_from_state(ckpt["tokenizer"]),
        hierarchy=CodonHierarchy.from_state_dict(ckpt["hierarchy"]),
        config=ckpt["config"],
        checkpoint=ckpt,
    )
