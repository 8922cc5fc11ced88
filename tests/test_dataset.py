"""LMDataset: framing, truncation, CLM shift, MLM masking statistics, determinism, collate."""

import numpy as np
import pytest
import torch

from helm.data.dataset import (
    IGNORE_INDEX,
    LMDataset,
    collate,
    collate_lm,
    double_start_prob,
    frame,
    pad_batch,
    sample_spans,
    span_length_probs,
    span_start_prob,
)
from helm.vocab import CLS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, UNK_ID

VOCAB = 69


class ListStore:
    """In-memory stand-in for the token cache: len, [i] -> ids, lengths."""

    def __init__(self, seqs):
        self._seqs = [np.asarray(s, dtype=np.uint16) for s in seqs]
        self.lengths = np.array([len(s) for s in self._seqs], dtype=np.int64)

    def __len__(self):
        return len(self._seqs)

    def __getitem__(self, i):
        return self._seqs[i]


def random_store(n, lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    return ListStore([rng.integers(NUM_SPECIAL, VOCAB, rng.integers(lo, hi + 1)) for _ in range(n)])


def original_row(item):
    """The framed row before masking: labels where there is a target, inputs elsewhere."""
    labels, inputs = item["labels"], item["input_ids"]
    return torch.where(labels != IGNORE_INDEX, labels, inputs)


def runs(mask):
    """Lengths of the maximal runs of True in a 1-D boolean array."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges[1::2] - edges[::2]


# --- framing and truncation -------------------------------------------------------------------


def test_mlm_frame_without_truncation():
    seq = np.arange(NUM_SPECIAL, NUM_SPECIAL + 20)
    ds = LMDataset(ListStore([seq]), mode="mlm", max_seq_len=64)
    item = ds[0]
    expected = np.concatenate(([CLS_ID], seq, [EOS_ID]))
    assert item["input_ids"].dtype == torch.int64
    assert original_row(item).tolist() == expected.tolist()


@pytest.mark.parametrize("mode", ["mlm", "clm"])
def test_head_truncation_keeps_frame(mode):
    seq = np.arange(NUM_SPECIAL, NUM_SPECIAL + 50)
    ds = LMDataset(ListStore([seq]), mode=mode, max_seq_len=10)
    item = ds[0]
    assert len(item["input_ids"]) == 10
    if mode == "mlm":
        assert original_row(item).tolist() == [CLS_ID, *seq[:8].tolist(), EOS_ID]
    else:
        # CLM rows hold max_seq_len + 1 tokens: <cls> + 9 content + <eos>, inputs drop the last.
        assert item["input_ids"].tolist() == [CLS_ID, *seq[:9].tolist()]
        assert item["labels"].tolist() == [*seq[:9].tolist(), IGNORE_INDEX]


def test_random_crop_is_a_window_and_covers_all_offsets():
    seq = np.arange(NUM_SPECIAL, NUM_SPECIAL + 12)
    ds = LMDataset(ListStore([seq]), mode="mlm", max_seq_len=10, truncation="random")
    offsets = set()
    for epoch in range(200):
        ds.set_epoch(epoch)
        row = original_row(ds[0]).numpy()
        assert row[0] == CLS_ID and row[-1] == EOS_ID and len(row) == 10
        offset = row[1] - NUM_SPECIAL
        assert row[1:-1].tolist() == seq[offset : offset + 8].tolist()
        offsets.add(int(offset))
    assert offsets == set(range(5))  # 12 - 8 + 1 window positions, each reachable


@pytest.mark.parametrize("mode", ["mlm", "clm"])
@pytest.mark.parametrize("truncation", ["head", "random"])
def test_lengths_bounded_and_reported(mode, truncation):
    store = random_store(60, 0, 40, seed=1)
    ds = LMDataset(store, mode=mode, max_seq_len=16, truncation=truncation)
    sizes = np.array([len(ds[i]["input_ids"]) for i in range(len(ds))])
    assert sizes.max() == 16 and (sizes <= 16).all()
    assert sizes.tolist() == ds.lengths.tolist()


# --- CLM --------------------------------------------------------------------------------------


def test_clm_shift_and_padding_after_collate():
    store = random_store(5, 3, 30, seed=2)
    ds = LMDataset(store, mode="clm", max_seq_len=64)
    items = [ds[i] for i in range(len(ds))]
    for i, item in enumerate(items):
        framed = [CLS_ID, *store[i].tolist(), EOS_ID]
        assert item["input_ids"].tolist() == framed[:-1]
        assert item["labels"].tolist() == framed[1:]
    batch = collate(items)
    real = batch["attention_mask"].bool()
    assert (batch["labels"][~real] == IGNORE_INDEX).all()
    assert (batch["input_ids"][~real] == PAD_ID).all()
    assert (batch["labels"][real] != IGNORE_INDEX).all()


# --- MLM masking ------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["single", "double", "span"])
def test_mlm_targets_only_at_masked_content(strategy):
    rng = np.random.default_rng(3)
    seqs = [rng.integers(NUM_SPECIAL, VOCAB, int(rng.integers(1, 40))) for _ in range(80)]
    for s in seqs[::4]:
        s[rng.integers(len(s))] = UNK_ID  # <unk> inside content: never a target
    seqs += [[], [UNK_ID, UNK_ID], [7]]
    ds = LMDataset(ListStore(seqs), mode="mlm", max_seq_len=64, masking_strategy=strategy)
    for i, seq in enumerate(seqs):
        item = ds[i]
        row = np.concatenate(([CLS_ID], seq, [EOS_ID]))
        inputs, labels = item["input_ids"].numpy(), item["labels"].numpy()
        target = labels != IGNORE_INDEX
        assert (labels[target] == row[target]).all()
        assert (inputs[target] == MASK_ID).all()
        assert (inputs[~target] == row[~target]).all()
        assert not (target & (row < NUM_SPECIAL)).any()  # frame and <unk> never masked
        assert target.any() == (np.asarray(seq) >= NUM_SPECIAL).any()
    assert ds[len(seqs) - 1]["labels"].tolist() == [IGNORE_INDEX, 7, IGNORE_INDEX]


@pytest.mark.parametrize("strategy", ["single", "double", "span"])
@pytest.mark.parametrize("ratio", [0.15, 0.4])
def test_each_strategy_reaches_the_ratio(strategy, ratio):
    # ~100k content tokens. Over seeds the pooled fraction's sd is ~0.0015 for single masking and
    # ~0.0033 for spans (targets arrive in clumps), so 0.012 is ~4 sd for the clumpiest strategy,
    # while a start probability that ignored overlaps (q = ratio / 2 for pairs, ratio / 3 for
    # spans) misses by 0.006 (pairs at 0.15) to 0.06 (spans at 0.4); the exact maths, boundaries
    # included, is checked at short lengths below.
    store = random_store(500, 100, 300, seed=4)
    ds = LMDataset(
        store, mode="mlm", max_seq_len=512, masking_strategy=strategy, masking_ratio=ratio
    )
    masked = sum(int((ds[i]["labels"] != IGNORE_INDEX).sum()) for i in range(len(ds)))
    assert abs(masked / store.lengths.sum() - ratio) < 0.012


@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("ratio", [0.15, 0.5])
def test_double_start_prob_is_exact_at_short_lengths(n, ratio):
    q = double_start_prob(n, ratio)
    rng = np.random.default_rng(5)
    starts = rng.random((20000, n - 1)) < q
    cover = np.zeros((20000, n), dtype=bool)
    cover[:, :-1] |= starts
    cover[:, 1:] |= starts
    # Row fractions lie in [0, 1]: sd of the mean <= 0.5 / sqrt(20000) = 0.0035.
    assert abs(cover.mean() - ratio) < 0.015


@pytest.mark.parametrize("n", [1, 4, 12, 40])
def test_span_start_prob_is_exact_with_clipping_and_overlap(n):
    probs = span_length_probs(3.0, 10)
    ratio = 0.3
    q = span_start_prob(n, ratio, probs)
    rng = np.random.default_rng(6)
    rows = 5000
    starts = rng.random((rows, n)) < q
    lengths = rng.choice(10, size=(rows, n), p=probs) + 1
    pos = np.arange(n)
    cover = np.zeros((rows, n), dtype=bool)
    for s in range(n):
        cover |= starts[:, s, None] & (pos >= s) & (pos < s + lengths[:, s, None])
    assert abs(cover.mean() - ratio) < 0.02  # sd of the mean <= 0.5 / sqrt(5000) = 0.007


def test_double_masks_come_in_adjacent_pairs():
    store = random_store(200, 2, 120, seed=7)
    ds = LMDataset(store, mode="mlm", max_seq_len=256, masking_strategy="double")
    all_runs = []
    for i in range(len(ds)):
        target = (ds[i]["labels"] != IGNORE_INDEX).numpy()[1:-1]
        all_runs += runs(target).tolist()
    assert min(all_runs) >= 2
    assert np.mean(np.array(all_runs) == 2) > 0.8  # mostly lone pairs at ratio 0.15


def test_span_length_distribution():
    probs = span_length_probs(3.0, 10)
    k = np.arange(1, 11)
    assert len(probs) == 10 and probs.sum() == pytest.approx(1.0)
    assert probs @ k == pytest.approx(3.0, abs=1e-6)
    assert (np.diff(probs) < 0).all()  # geometric: decreasing
    _, lengths = sample_spans(np.random.default_rng(8), 200_000, 0.05, probs)
    # ~10k spans, length sd ~2.3: sd of the mean ~0.023.
    assert abs(lengths.mean() - 3.0) < 0.1
    assert lengths.min() >= 1 and lengths.max() <= 10


def test_span_strategy_masks_spans():
    store = random_store(100, 300, 400, seed=9)
    ds = LMDataset(store, mode="mlm", max_seq_len=512, masking_strategy="span", masking_ratio=0.05)
    all_runs = np.concatenate(
        [runs((ds[i]["labels"] != IGNORE_INDEX).numpy()[1:-1]) for i in range(len(ds))]
    )
    # Runs are spans, occasionally two merged: mean a little above 3, far from single masking's ~1.
    assert 2.8 < all_runs.mean() < 3.6


def test_bert_replacement_proportions():
    store = random_store(200, 100, 200, seed=10)
    ds = LMDataset(store, mode="mlm", max_seq_len=256, mask_replace="bert", vocab_size=VOCAB)
    kinds = []
    for i in range(len(ds)):
        item = ds[i]
        target = item["labels"] != IGNORE_INDEX
        inp, lab = item["input_ids"][target], item["labels"][target]
        assert ((inp == MASK_ID) | (inp >= NUM_SPECIAL)).all() and (inp < VOCAB).all()
        kinds += np.select([inp == MASK_ID, inp == lab], [0, 1], 2).tolist()
    kinds = np.array(kinds)  # ~4500 targets: sd of each share <= 0.0075
    chance = 1 / (VOCAB - NUM_SPECIAL)  # a random token may equal the original
    assert abs(np.mean(kinds == 0) - 0.8) < 0.03
    assert abs(np.mean(kinds == 1) - (0.1 + 0.1 * chance)) < 0.03
    assert abs(np.mean(kinds == 2) - 0.1 * (1 - chance)) < 0.03


# --- determinism ------------------------------------------------------------------------------


def test_items_depend_only_on_seed_epoch_index():
    store = random_store(30, 20, 60, seed=11)
    kwargs = dict(mode="mlm", max_seq_len=32, truncation="random", masking_strategy="span")
    a, b = LMDataset(store, **kwargs), LMDataset(store, **kwargs)
    forward = [a[i] for i in range(len(a))]
    backward = [b[i] for i in reversed(range(len(b)))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["labels"], y["labels"])
    assert torch.equal(a[-1]["labels"], forward[-1]["labels"])
    a.set_epoch(1)
    assert any(not torch.equal(a[i]["labels"], forward[i]["labels"]) for i in range(len(a)))
    a.set_epoch(0)
    assert all(torch.equal(a[i]["labels"], forward[i]["labels"]) for i in range(len(a)))
    c = LMDataset(store, seed=1, **kwargs)
    assert any(not torch.equal(c[i]["labels"], forward[i]["labels"]) for i in range(len(c)))


# --- collate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("multiple", [None, 8])
def test_collate_shapes_and_padding(multiple):
    store = random_store(4, 1, 20, seed=12)
    ds = LMDataset(store, mode="mlm", max_seq_len=64, return_position_ids=True)
    items = [ds[i] for i in range(4)]
    sizes = [len(it["input_ids"]) for it in items]
    batch = collate(items, pad_to_multiple_of=multiple)
    T = max(sizes) if multiple is None else -(-max(sizes) // 8) * 8
    for key in ("input_ids", "labels", "attention_mask", "position_ids"):
        assert batch[key].shape == (4, T) and batch[key].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == sizes
    for b, (item, n) in enumerate(zip(items, sizes)):
        assert torch.equal(batch["input_ids"][b, :n], item["input_ids"])
        assert torch.equal(batch["labels"][b, :n], item["labels"])
        assert batch["position_ids"][b, :n].tolist() == list(range(n))
        assert (batch["input_ids"][b, n:] == PAD_ID).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][b, n:] == 0).all()


def test_invalid_arguments_are_refused():
    store = random_store(2, 1, 5)
    with pytest.raises(ValueError, match="mode"):
        LMDataset(store, mode="lm", max_seq_len=8)
    with pytest.raises(ValueError, match="masking_ratio"):
        LMDataset(store, mode="mlm", max_seq_len=8, masking_ratio=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        LMDataset(store, mode="mlm", max_seq_len=8, mask_replace="bert")
    with pytest.raises(ValueError, match="max_seq_len"):
        LMDataset(store, mode="mlm", max_seq_len=2)


def test_repeated_pass_index_reads_the_same_record_with_its_own_mask():
    store = ListStore([np.arange(5, 65) for _ in range(3)])
    ds = LMDataset(store, mode="mlm", max_seq_len=100, masking_ratio=0.3, seed=0)
    a, b = ds[1], ds[1 + len(ds)]

    def unmasked(item):
        return torch.where(item["labels"] != -100, item["labels"], item["input_ids"])

    # Same record underneath (index i + n is record i in a repeated pass), different masks.
    assert torch.equal(unmasked(a), unmasked(b))
    assert not torch.equal(a["labels"], b["labels"])


def test_frame_and_pad_batch():
    assert frame(np.array([7, 8], dtype=np.uint8), causal=False).tolist() == [CLS_ID, 7, 8, EOS_ID]
    assert frame([7, 8], causal=True).tolist() == [CLS_ID, 7, 8]
    assert frame([], causal=False).dtype == np.int64
    ids, mask = pad_batch([np.array([1, 5, 2]), torch.tensor([1, 6])], pad_to_multiple_of=4)
    assert ids.tolist() == [[1, 5, 2, PAD_ID], [1, 6, PAD_ID, PAD_ID]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="empty"):
        pad_batch([])


def test_collate_lm_drops_the_mask_only_when_nothing_is_padded():
    items = [{"input_ids": torch.tensor([1, 5, 2]), "labels": torch.tensor([-100, 5, -100])}] * 2
    full = collate_lm(items)
    assert "attention_mask" not in full and full["input_ids"].shape == (2, 3)
    padded = collate_lm(
        [items[0], {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([5, 2])}]
    )
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["labels"][1].tolist() == [5, 2, IGNORE_INDEX]
