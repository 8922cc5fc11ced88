"""LengthBucketSampler: coverage, rank semantics, determinism, padding, resume; the DataLoader."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from helm.data.dataset import LMDataset
from helm.data.sampler import LengthBucketSampler, build_dataloader, padding_efficiency
from helm.vocab import NUM_SPECIAL


def varied_lengths(n, seed=0):
    return np.random.default_rng(seed).integers(10, 501, n)


def all_ranks(lengths, batch_size, num_replicas, epoch=0, **kwargs):
    """Every rank's batches for one epoch."""
    out = []
    for rank in range(num_replicas):
        s = LengthBucketSampler(lengths, batch_size, num_replicas=num_replicas, rank=rank, **kwargs)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(s) == len(out[-1])
    return out


@pytest.mark.parametrize("num_replicas", [1, 3, 4])
def test_every_index_at_least_once_and_repeats_bounded(num_replicas):
    n, bs = 1003, 8
    per_rank = all_ranks(varied_lengths(n), bs, num_replicas, bucket_size_multiplier=10)
    counts = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(counts) == set(range(n))
    assert len({len(batches) for batches in per_rank}) == 1  # equal batch counts
    extra = sum(counts.values()) - n
    # Whole batches are repeated to fill the last step: fewer than num_replicas of them.
    assert 0 <= extra <= (num_replicas - 1) * bs
    assert len(per_rank[0]) == math.ceil(math.ceil(n / bs) / num_replicas)


def test_even_split_is_exact_and_disjoint():
    n, bs, R = 960, 8, 4  # 120 batches: a multiple of 4, nothing to repeat
    per_rank = all_ranks(varied_lengths(n), bs, R)
    sets = [{i for b in batches for i in b} for batches in per_rank]
    assert sum(len(s) for s in sets) == n and set().union(*sets) == set(range(n))
    assert all(len(b) == bs for batches in per_rank for b in batches)


def test_drop_last_gives_full_disjoint_batches():
    n, bs, R = 1003, 8, 3
    per_rank = all_ranks(varied_lengths(n), bs, R, drop_last=True, bucket_size_multiplier=10)
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen)) == (n // bs) // R * R * bs
    assert all(len(b) == bs for batches in per_rank for b in batches)


def test_deterministic_per_epoch_and_different_across_epochs():
    lengths = varied_lengths(300)
    a = all_ranks(lengths, 8, 2, epoch=5, seed=3)
    assert a == all_ranks(lengths, 8, 2, epoch=5, seed=3)
    assert a != all_ranks(lengths, 8, 2, epoch=6, seed=3)
    assert a != all_ranks(lengths, 8, 2, epoch=5, seed=4)
    fixed = all_ranks(lengths, 8, 2, epoch=0, shuffle=False)
    assert fixed == all_ranks(lengths, 8, 2, epoch=1, shuffle=False)


def test_bucketing_pads_far_less_than_random_batches():
    lengths = varied_lengths(2000, seed=1)
    s = LengthBucketSampler(lengths, 16, bucket_size_multiplier=50)
    bucketed = padding_efficiency(lengths, list(s))
    perm = np.random.default_rng(0).permutation(len(lengths))
    random_batches = [perm[i : i + 16] for i in range(0, len(perm), 16)]
    # Random batches of 16 over lengths U(10, 500): mean ~255 against an expected max ~470.
    assert padding_efficiency(lengths, random_batches) < 0.65
    assert bucketed > 0.95


def test_padding_efficiency_by_hand():
    assert padding_efficiency([2, 4, 3, 3], [[0, 1], [2, 3]]) == pytest.approx(12 / 14)


def test_steps_group_similar_lengths_across_ranks():
    lengths = varied_lengths(4000, seed=2)
    r0, r1 = all_ranks(lengths, 16, 2, bucket_size_multiplier=50)
    longest = np.array([[lengths[b].max() for b in r] for r in (r0, r1)])
    # At every step both ranks hold neighbouring batches of one sorted chunk.
    assert np.abs(longest[0] - longest[1]).max() < 30


def test_max_tokens_budget():
    lengths = varied_lengths(500, seed=3)
    lengths[7] = 5000  # longer than the budget: a batch on its own
    s = LengthBucketSampler(lengths, 32, max_tokens=2048, bucket_size_multiplier=4)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        assert len(b) <= 32
        assert len(b) * lengths[b].max() <= 2048 or len(b) == 1
    assert [7] in batches
    # Greedy packing fills the budget; only the last batch of each sorted chunk (500 / 128 -> 4)
    # may be left part-empty.
    fill = [len(b) * lengths[b].max() / 2048 for b in batches if b != [7]]
    assert sum(f < 0.75 for f in fill) <= 4 and np.mean(fill) > 0.8
    per_rank = all_ranks(lengths, 32, 3, max_tokens=2048)
    assert len({len(r) for r in per_rank}) == 1


@pytest.mark.parametrize("k", [0, 5, 12])
def test_resume_mid_epoch_yields_exactly_the_rest(k):
    lengths = varied_lengths(400, seed=4)
    kwargs = dict(num_replicas=2, rank=1, seed=7)
    a = LengthBucketSampler(lengths, 8, **kwargs)
    a.set_epoch(2)
    full = list(a)
    it = iter(a)
    consumed = [next(it) for _ in range(k)]
    state = a.state_dict()
    assert state == {"epoch": 2, "batches_done": k} and consumed == full[:k]

    b = LengthBucketSampler(lengths, 8, **kwargs)
    b.load_state_dict(state)
    b.set_epoch(2)  # the trainer re-selects the epoch it resumes: must not rewind
    assert list(b) == full[k:]
    assert list(b) == full  # the resume point is used once
    b.set_epoch(3)
    fresh = LengthBucketSampler(lengths, 8, **kwargs)
    fresh.set_epoch(3)
    assert list(b) == list(fresh)


def test_state_dict_takes_the_trainers_count():
    s = LengthBucketSampler(varied_lengths(100), 4)
    list(s)  # a prefetching loader may have drawn everything
    assert s.state_dict(batches_done=3) == {"epoch": 0, "batches_done": 3}


class _ListStore:
    def __init__(self, seqs):
        self._seqs = seqs
        self.lengths = np.array([len(s) for s in seqs])

    def __len__(self):
        return len(self._seqs)

    def __getitem__(self, i):
        return self._seqs[i]


def _run_epochs(num_workers, epochs=(0, 1)):
    rng = np.random.default_rng(0)
    store = _ListStore([rng.integers(NUM_SPECIAL, 69, rng.integers(5, 40)) for _ in range(24)])
    ds = LMDataset(store, mode="mlm", max_seq_len=32, truncation="random", masking_strategy="span")
    sampler = LengthBucketSampler(ds.lengths, 4, seed=1)
    loader = build_dataloader(ds, sampler, num_workers=num_workers, seed=1)
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)  # reaches persistent workers through shared memory
        out.append([{k: v.clone() for k, v in batch.items()} for batch in loader])
    return out


def test_dataloader_workers_do_not_change_batches():
    serial, parallel = _run_epochs(0), _run_epochs(2)
    for e in range(2):
        assert len(serial[e]) == len(parallel[e]) == 6
        for x, y in zip(serial[e], parallel[e]):
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x)
    assert any(
        x["labels"].shape != y["labels"].shape or not torch.equal(x["labels"], y["labels"])
        for x, y in zip(serial[0], serial[1])
    )


class _GlobalDraws(torch.utils.data.Dataset):
    """Reports the worker seed and the first draws of the global numpy and torch generators."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return info.seed, int(np.random.randint(2**31)), int(torch.randint(2**31, ()))


def _first(batch):
    return batch[0]


@pytest.mark.parametrize("worker_seeding", ["all", "part"])
def test_worker_seeding_follows_timm(worker_seeding):
    sampler = LengthBucketSampler([1, 1], 1, shuffle=False)
    loader = build_dataloader(
        _GlobalDraws(), sampler, num_workers=2, worker_seeding=worker_seeding, collate_fn=_first
    )
    for seed, np_draw, torch_draw in loader:
        # PyTorch seeds torch (and random) from the worker seed in either mode.
        assert torch_draw == int(
            torch.randint(2**31, (), generator=torch.Generator().manual_seed(seed))
        )
        numpy_seeded = np_draw == np.random.RandomState(seed % (2**32 - 1)).randint(2**31)
        assert numpy_seeded == (worker_seeding == "all")


def test_the_loader_seed_sets_the_worker_seeds():
    """``seed`` (the run's --seed) fixes the loader's generator: one seed, one set of worker
    seeds; another seed, others."""
    sampler = LengthBucketSampler([1], 1, shuffle=False)

    def worker_seed(seed: int) -> int:
        loader = build_dataloader(_GlobalDraws(), sampler, num_workers=1, seed=seed,
                                  collate_fn=_first)  # fmt: skip
        return next(iter(loader))[0]

    first, second, again = worker_seed(1), worker_seed(2), worker_seed(1)
    assert first == again != second


def test_epoch_repeats_make_extra_passes_with_fresh_indices():
    lengths = np.arange(10, 50)
    n = len(lengths)
    one = LengthBucketSampler(lengths, 4, seed=3)
    two = LengthBucketSampler(lengths, 4, seed=3, repeats=2.0)
    half = LengthBucketSampler(lengths, 4, seed=3, repeats=1.5)
    idx_two = np.concatenate([np.asarray(b) for b in two])
    assert len(two) == 2 * len(one) and len(half) == 15
    # Every record twice, as two distinct virtual indices (i and i + n).
    assert sorted(idx_two.tolist()) == list(range(2 * n))
    assert sorted((idx_two % n).tolist()) == sorted(list(range(n)) * 2)
    with pytest.raises(ValueError, match="repeats"):
        LengthBucketSampler(lengths, 4, repeats=0)
