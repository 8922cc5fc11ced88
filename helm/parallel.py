"""Parallelism applied to a built model, which knows nothing of it (as in torchtitan): activation
checkpointing per block (``--grad-ckpt``), ``torch.compile`` per block, and FSDP2 sharding
(``--fsdp``) with its mixed-precision policy and its gradient-accumulation choices.

Order matters and is torchtitan's: checkpointing wraps each block's forward, compile compiles the
block with its checkpointed forward, and ``fully_shard`` hooks around both, so a block's parameters
are gathered before its forward and before its recomputation in the backward pass.

FSDP2 (``fully_shard``) shards every parameter along its first dimension over the ranks of a 1-D
device mesh: each block is one unit (its parameters are all-gathered just before it runs and freed
after), and the root (embeddings, final norm, LM head: the parameters outside the blocks) is another.
A rank holds 1/N of the weights, gradients and optimizer state; the optimizer, gradient clipping,
layer decay and the EMA work on the DTensor shards as they would on whole tensors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from helm.models.common import TAGS

# Activation checkpointing --------------------------------------------------------------------------


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them: between
    forward and backward a block holds only its input (B, T, D). ``torch.utils.checkpoint`` with
    ``use_reentrant=False`` restores the RNG state for the recomputation, so dropout draws the same
    masks and the gradients equal those without checkpointing.

    Each block's class becomes a subclass whose ``forward`` runs the original under ``checkpoint``:
    parameter names stay as they were (layer decay, checkpoints, EMA and state dicts see no
    wrapper), and a deep copy of the block is checkpointed alike."""
    for block in model.backbone.blocks:
        block.__class__ = _checkpointed(type(block))


@functools.cache
def _checkpointed(cls: type[nn.Module]) -> type[nn.Module]:
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each block in place (``nn.Module.compile``: names unchanged). The blocks
    share their code, so one compiled graph serves them all."""
    for block in model.backbone.blocks:
        block.compile()


# FSDP2 -------------------------------------------------------------------------------------------


def device_mesh(device: torch.device, world_size: int):
    """The 1-D mesh of all ranks (pure FSDP; the process group must be up, also for one rank)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


def precision_policy(amp: torch.dtype | None):
    """FSDP's mixed precision in place of autocast: parameters gathered and computed in ``amp``
    (bf16), gradients reduced in fp32 into fp32 shards (the optimizer's master weights). None
    (``--amp`` off): everything in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if amp is None:
        return None
    if amp != torch.bfloat16:
        raise ValueError(
            f"--fsdp mixes precision in bf16; this device resolved --amp to {amp} (fp16 would need "
            "a loss scaler over sharded gradients): use --amp-dtype bfloat16, or leave --amp out"
        )
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(
    model: nn.Module, mesh, policy=None, *, training: bool = True, gathered: bool = False
) -> None:
    """``fully_shard`` each block, then the root ``model`` (a LanguageModel), in place.

    For training, the last block and the root keep their parameters gathered after the forward:
    the backward needs them first, so resharding them would only gather them again at once
    (torchtitan's choice); with ``gathered`` (``--fsdp-accum unsharded``, see `accumulation`)
    every block does. A model that only evaluates (the EMA) reshards everything after use.
    The optimizer tags (``_no_weight_decay``, ``_optim``) of the replaced parameters are copied onto
    the sharded ones, so weight decay and lr hints are as without sharding."""
    from torch.distributed.fsdp import fully_shard

    tags = {
        name: {attr: getattr(p, attr) for attr in TAGS if hasattr(p, attr)}
        for name, p in model.named_parameters()
    }
    kw = {"mesh": mesh, "mp_policy": policy} if policy is not None else {"mesh": mesh}
    blocks = model.backbone.blocks
    for i, block in enumerate(blocks):
        reshard = not training or (i < len(blocks) - 1 and not gathered)
        fully_shard(block, reshard_after_forward=reshard, **kw)
    fully_shard(model, reshard_after_forward=not training, **kw)
    for name, p in model.named_parameters():
        for attr, value in tags[name].items():
            setattr(p, attr, value)


def accumulation(model: nn.Module, keep_unsharded: bool) -> Callable[[bool], Any] | None:
    """The context of each micro-batch of a sharded model, given whether it is the last of the
    update (``helm.lm.forward_backward``'s ``sync``).

    None (``--fsdp-accum sharded``, FSDP's default): each micro-batch's gradients are
    reduce-scattered into the fp32 shards at once and the parameters resharded, so memory stays at
    1/N of the model; every micro-batch gathers the parameters again. ``keep_unsharded``
    (``--fsdp-accum unsharded``, with ``shard(gathered=True)``): before the last micro-batch the
    gradients are accumulated whole on each rank and the parameters stay gathered, so an update
    gathers each parameter once and reduce-scatters each gradient once, as DDP's ``no_sync`` does,
    at the price of whole parameters and gradients in memory during the update. That pays when the
    model is small next to the device's memory and the interconnect is slow."""
    if not keep_unsharded:
        return None

    @contextlib.contextmanager
    def micro_batch(last: bool) -> Iterator[None]:
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)
        yield

    return micro_batch


def parallelize(
    model: nn.Module,
    ema: nn.Module | None = None,
    *,
    grad_ckpt: bool = False,
    compile: bool = False,
    mesh=None,
    amp: torch.dtype | None = None,
    keep_unsharded: bool = False,
) -> Callable[[bool], Any] | None:
    """Everything above, in torchtitan's order, on a built LanguageModel: activation
    checkpointing, compile per block, then (given a ``mesh``) sharding of ``model`` with the
    precision policy of ``amp``, and of the EMA's model alike. Returns the micro-batch context of
    the accumulation (`accumulation`); the optimizer is to be made over the shards after this."""
    if grad_ckpt:
        checkpoint_blocks(model)
    if compile:
        compile_blocks(model)
    if mesh is None:
        return None
    policy = precision_policy(amp)
    shard(model, mesh, policy, gathered=keep_unsharded)
    if ema is not None:
        shard(ema, mesh, policy, training=False)
    return accumulation(model, keep_unsharded)
