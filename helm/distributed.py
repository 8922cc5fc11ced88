"""Process-group setup for torchrun (and a local launcher for ``--num_devices N`` without torchrun).

Ranks come from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE). The backend is nccl on CUDA
and gloo on CPU unless ``--distributed-backend`` names one. Only rank 0 logs and writes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(accelerator: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit choice that is unavailable is an error."""
    if accelerator == "auto":
        accelerator = (
            "cuda"
            if torch.cuda.is_available()
            else "mps"
            if torch.backends.mps.is_available()
            else "cpu"
        )
    if accelerator == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--accelerator cuda: no CUDA device is visible (use cpu or auto)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if accelerator == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("--accelerator mps: MPS is not available on this machine")
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(accelerator: str, backend: str = "auto", always: bool = False) -> DistInfo:
    """Join the process group when launched with several ranks; a single process needs none,
    unless ``always`` (``--fsdp``: sharding works on a device mesh, also of one rank), when it
    forms a group of one over an in-process store."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(accelerator, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (world_size > 1 or always) and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise ValueError("--distributed-backend nccl needs CUDA devices; use gloo on CPU")
        store = {"store": dist.HashStore()} if world_size == 1 else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **store)
    return DistInfo(rank, local_rank, world_size, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (a no-op in a single process); returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place maximum across ranks (a no-op in a single process); returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def is_distributed() -> bool:
    """Whether this process is one rank of several (a process group is up)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, world_size: int, port: int, fn: Callable, argv: list[str]) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(argv)


def spawn_local(num_devices: int, fn: Callable[[list[str]], None], argv: list[str]) -> int:
    """Start ``num_devices`` local ranks running ``fn(argv)``, as torchrun would on one node, and
    return their exit code. A SIGINT/SIGTERM to this launcher is passed to the ranks, which stop
    at a safe point (a terminal's Ctrl-C reaches them directly as well)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _spawned, args=(num_devices, free_port(), fn, argv), nprocs=num_devices, join=False
    )

    def forward(signum, frame):
        for proc in ctx.processes:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not ctx.join():
            pass
    except mp.ProcessExitedException as exc:
        if exc.exit_code in (2, 3, 130, 143):  # the rank already said why
            return exc.exit_code
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


DUPLICATE_WINDOW_S = 1.0


class Interrupted(Exception):
    """Work stopped at a safe point because the process was asked to stop (``StopRequest``)."""


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send before a kill) only set a flag;
    the trainer reads it at its safe points, saves a consistent checkpoint and exits 130 / 143.
    A second signal stops at once (KeyboardInterrupt). Use as a context manager.

    While ``immediate`` (set-up: data preparation, token caches, model building, when there is
    nothing to save) the first signal stops at once too; the trainer clears it when the loop starts.
    """

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate
        self.signum = 0
        self._at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.immediate:
            if self.signum and now - self._at < DUPLICATE_WINDOW_S:
                return  # the same Ctrl-C delivered twice (see below): it is already stopping
            self.signum, self._at = signum, now
            raise KeyboardInterrupt
        if self.signum:
            # One Ctrl-C can arrive twice (from the terminal's process group and forwarded by a
            # launcher): only a signal a moment later is a second request.
            if now - self._at < DUPLICATE_WINDOW_S:
                return
            raise KeyboardInterrupt
        self.signum, self._at = signum, now
        logging.getLogger("helm").warning(
            "%s received: stopping at the next safe point (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    @property
    def exit_code(self) -> int:
        """128 + the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + (self.signum or signal.SIGINT)

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (a collective under DDP: call it on every rank at
        the same point)."""
        if not dist.is_initialized():
            return bool(self.signum)
        flag = torch.tensor(float(self.signum), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = self.signum or int(flag.item())
        return bool(self.signum)
