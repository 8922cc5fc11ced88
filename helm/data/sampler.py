"""Length-bucketed, distributed, resumable batches and the DataLoader that serves them.

One epoch of :class:`LengthBucketSampler`, computed alike on every rank from ``(seed, epoch)``:

1. permute all indices (``shuffle``) or keep them in order;
2. cut the order into chunks of ``batch_size * bucket_size_multiplier`` indices and sort each chunk
   by length (stable), so items of similar length sit together;
3. cut each sorted chunk into batches: ``batch_size`` indices each, or with ``max_tokens`` as many
   (up to ``batch_size``) as keep ``len(batch) * longest <= max_tokens`` (a single item longer than
   ``max_tokens`` forms a batch alone);
4. make the batch count a multiple of ``num_replicas``: with ``drop_last=False`` the first batches
   of the epoch are repeated (their indices are seen twice this epoch, the batch-level analogue of
   DistributedSampler's index padding); with ``drop_last=True`` the trailing batches are dropped,
   and in fixed-size mode the one short batch as well, so every batch is full;
5. group consecutive batches into steps of ``num_replicas`` (neighbours in a sorted chunk, so all
   ranks get similar lengths at the same step and none waits for a straggler), shuffle the steps,
   and give rank ``r`` the ``r``-th batch of every step.

Ranks thus get the same number of batches and, apart from the repeated batches, disjoint indices.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit hook before ours (_exiting)
import os
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from functools import cache, partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from helm.data.dataset import collate, collate_lm


class LengthBucketSampler(Sampler[list[int]]):
    """Batch sampler of length-bucketed batches with DistributedSampler semantics (module doc).

    ``lengths`` are the lengths the batches are padded to (e.g. ``LMDataset.lengths``). Call
    ``set_epoch`` before each epoch. ``len(sampler)`` is the number of batches this rank gets in a
    whole epoch, including any already consumed before a resume. A resume recomputes the epoch's
    order rather than storing it, so it needs the same lengths, batch size, replicas and seed.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        bucket_size_multiplier: int = 100,
        max_tokens: int | None = None,
        repeats: float = 1.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        if bucket_size_multiplier < 1:
            raise ValueError(f"bucket_size_multiplier must be >= 1, got {bucket_size_multiplier}")
        if repeats <= 0:
            raise ValueError(f"repeats must be > 0, got {repeats}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.bucket_size_multiplier = bucket_size_multiplier
        self.max_tokens = max_tokens
        self.repeats = repeats
        self.epoch = 0
        self._start = 0  # batches to skip on the next __iter__ (set by load_state_dict)
        self._yielded = 0  # batches of the current epoch handed out so far
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; re-selecting the current one keeps a loaded resume point."""
        if epoch != self.epoch:
            self._start = self._yielded = 0
        self.epoch = epoch

    def state_dict(self, batches_done: int | None = None) -> dict[str, int]:
        """``{"epoch", "batches_done"}``. Pass the number of batches the trainer consumed: with
        DataLoader workers the sampler runs ahead of consumption by the prefetched batches, so its
        own count (the default) is exact only with ``num_workers=0``."""
        done = self._yielded if batches_done is None else batches_done
        return {"epoch": self.epoch, "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next iteration yields the batches of ``epoch`` after ``batches_done``."""
        self.epoch = int(state["epoch"])
        self._start = self._yielded = int(state["batches_done"])

    def __len__(self) -> int:
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        # The resume point is used once: a later pass over the same epoch starts from its beginning.
        start, self._start = self._start, 0
        self._yielded = start
        return self._serve(batches, start)

    def _serve(self, batches: list[np.ndarray], start: int) -> Iterator[list[int]]:
        for batch in batches[start:]:
            self._yielded += 1
            yield batch.tolist()

    def _rank_batches(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch, in order (cached per epoch)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._build(self.epoch))
        return self._cache[1]

    def _build(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        n = len(self.lengths)
        batches = self._one_pass(rng, n, offset=0)
        if self.repeats != 1.0:
            # Extra passes (--epoch-repeats): own shuffles, and virtual indices i + p * n so that
            # the dataset draws fresh masks for record i in pass p; then cut to repeats passes.
            per_pass = len(batches)
            for p in range(1, int(np.ceil(self.repeats))):
                pass_rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, p]))
                batches += self._one_pass(pass_rng, n, offset=p * n)
            batches = batches[: max(1, round(per_pass * self.repeats))]

        R = self.num_replicas
        if self.drop_last:
            if self.max_tokens is None and batches and len(batches[-1]) < self.batch_size:
                batches.pop()  # only the last chunk can end in a short batch
            batches = batches[: len(batches) - len(batches) % R]
        elif batches and len(batches) % R:
            batches += [batches[k % len(batches)] for k in range(R - len(batches) % R)]

        steps = len(batches) // R
        step_order = rng.permutation(steps) if self.shuffle else range(steps)
        return [batches[s * R + self.rank] for s in step_order]

    def _one_pass(self, rng: np.random.Generator, n: int, offset: int) -> list[np.ndarray]:
        """Steps 1-3 of the module doc for one pass over the data."""
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        chunk = self.batch_size * self.bucket_size_multiplier
        batches: list[np.ndarray] = []
        for lo in range(0, n, chunk):
            idx = order[lo : lo + chunk]
            batches += self._cut(idx[np.argsort(self.lengths[idx], kind="stable")])
        return [b + offset for b in batches] if offset else batches

    def _cut(self, idx: np.ndarray) -> list[np.ndarray]:
        """Cut indices sorted by ascending length into batches."""
        if self.max_tokens is None:
            return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        batches, lo = [], 0
        for hi in range(1, len(idx) + 1):
            # Ascending lengths: the item at hi - 1 is the longest, so it sets the padded size.
            size = hi - lo
            if size > self.batch_size or size * self.lengths[idx[hi - 1]] > self.max_tokens:
                if size > 1:
                    batches.append(idx[lo : hi - 1])
                    lo = hi - 1
        if lo < len(idx):
            batches.append(idx[lo:])
        return batches


def padding_efficiency(
    lengths: Sequence[int] | np.ndarray, batches: Sequence[Sequence[int]]
) -> float:
    """Real tokens / padded tokens (``len(batch) * longest`` summed over batches); 1.0 is none."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[list(b)].sum()) for b in batches if len(b))
    padded = sum(len(b) * int(lengths[list(b)].max()) for b in batches if len(b))
    return real / padded if padded else 1.0


@cache
def _exiting() -> Any:
    """An event set when this (main) process exits; its DataLoader workers then obey SIGTERM.

    Workers ignore SIGINT and SIGTERM while the process runs (``_worker_init``). At exit,
    multiprocessing ends the workers that are still alive (those of an iterator an exception kept
    referenced, e.g. a failed test's) with SIGTERM and waits for them: without this event, an
    ignored SIGTERM would make that wait, hence the exit, hang. The hook is registered after
    multiprocessing's own, so it runs first (atexit runs hooks last-in, first-out).
    """
    event = multiprocessing.Event()
    atexit.register(event.set)
    return event


def _end_on_sigterm_at_exit(exiting: Any, signum: int, frame: Any) -> None:
    if exiting.is_set():
        os._exit(0)  # the main process is exiting and ends its workers: nothing to clean up


def _worker_init(
    worker_id: int, worker_seeding: str | Callable[[Any], int] = "all", exiting: Any = None
) -> None:
    """Seed a DataLoader worker the way timm's ``--worker-seeding`` does.

    PyTorch itself seeds ``random`` and ``torch`` in each worker with ``worker_info.seed`` (the
    loader's base seed + worker id). ``"all"`` also seeds numpy's global state from it, so workers
    do not share numpy streams; ``"part"`` leaves numpy as inherited (reproduces old runs that
    relied on it); a callable maps ``worker_info`` to a seed used for all three. ``LMDataset``
    draws from its own per-item generators, so this matters only for code using global RNGs.
    """
    # Ctrl-C and SIGTERM reach every process of the group; the trainer stops at a safe point and
    # ends its workers itself, so a worker must not die first and break the loader. Only once the
    # main process exits does SIGTERM end a worker (``_exiting``).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if exiting is None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, partial(_end_on_sigterm_at_exit, exiting))
    info = torch.utils.data.get_worker_info()
    if callable(worker_seeding):
        seed = worker_seeding(info)
        random.seed(seed)
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32 - 1))
    elif worker_seeding == "all":
        np.random.seed(info.seed % (2**32 - 1))
    elif worker_seeding != "part":
        raise ValueError(
            f"worker_seeding must be 'all', 'part' or a callable, got {worker_seeding!r}"
        )


def build_dataloader(
    dataset: Dataset,
    sampler: Sampler[list[int]],
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    worker_seeding: str | Callable[[Any], int] = "all",
    seed: int = 0,
    collate_fn: Callable[[list[Any]], Any] = collate,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` whose batches come from ``sampler`` (a batch sampler).

    Workers persist across epochs (no re-fork per epoch; ``LMDataset.set_epoch`` reaches them
    through shared memory). ``seed`` fixes the loader's generator, hence the workers' seeds.
    """
    if worker_seeding not in ("all", "part") and not callable(worker_seeding):
        raise ValueError(
            f"worker_seeding must be 'all', 'part' or a callable, got {worker_seeding!r}"
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        worker_init_fn=partial(_worker_init, worker_seeding=worker_seeding, exiting=_exiting())
        if num_workers
        else None,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers else None,
        generator=generator,
    )


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    num_replicas: int = 1,
    rank: int = 0,
    seed: int = 0,
    repeats: float = 1.0,
    num_workers: int = 0,
    pin_memory: bool = False,
    worker_seeding: str = "all",
) -> DataLoader:
    """The loader of an ``LMDataset`` (its ``lengths`` bucket the batches), as training and
    evaluation read it: ``train`` shuffles per epoch and resumes (``loader.batch_sampler`` has
    ``set_epoch`` and ``load_state_dict``); otherwise a fixed order, read in the main process.
    Batches are ``collate_lm``'s: no attention mask when no row is padded."""
    if train:
        sampler = LengthBucketSampler(
            dataset.lengths,
            batch_size,
            num_replicas=num_replicas,
            rank=rank,
            seed=seed,
            repeats=repeats,
        )
    else:
        sampler = LengthBucketSampler(
            dataset.lengths, batch_size, num_replicas=num_replicas, rank=rank, shuffle=False
        )
    return build_dataloader(
        dataset,
        sampler,
        num_workers=num_workers if train else 0,
        pin_memory=pin_memory,
        worker_seeding=worker_seeding,
        seed=seed,
        collate_fn=collate_lm,
    )
