"""Splits of a downstream task into train, validation and test records: random (group-aware),
k-fold (groups never straddle folds), the file's own fold column, or the file's own split column
(optionally with validation carved out of train), each deterministic given its seed, and repeated
over split seeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from helm.data.io import DataError
from helm.downstream.tasks import TaskData


@dataclass(eq=False)
class TaskSplit:
    """Sorted record indices of a `TaskData` for training, model selection and testing."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k} {len(getattr(self, k))}" for k in ("train", "val", "test"))
        return f"TaskSplit({self.name!r}, {sizes})"


DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def make_splits(
    data: TaskData,
    fractions: tuple[float, float, float] | None = None,
    *,
    kfold: int | None = None,
    seed: int = 0,
    use_split_column: bool = True,
    val_from_train: float | None = None,
) -> list[TaskSplit]:
    """Train/val/test index sets of a task.

    - ``kfold=k``: k splits; fold i is the test set, fold i+1 (mod k) the validation set and the
      rest train. Records sharing a group (`data.groups`; each record its own group when None)
      always land in the same fold, so no group straddles train and test.
    - the file's fold column (`data.folds`, when `use_split_column`): one split per fold value,
      in sorted (numeric) order, by the same rule; with `val_from_train`, val is carved out of
      the training folds instead of being the next fold.
    - otherwise the file's split column when present (and `use_split_column`); a column with
      train and test only needs `val_from_train`: that fraction of train becomes val (seeded,
      whole groups);
    - otherwise a random split with `fractions` (default 0.7/0.15/0.15), group-aware.
    Every rule is deterministic given `seed`.
    """
    n = len(data)
    groups = data.groups if data.groups is not None else np.arange(n)
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(seed)
    if data.folds is not None and use_split_column:
        return _fold_column_splits(data, inverse, rng, kfold, val_from_train, seed)
    if kfold is not None:
        if kfold < 3 or kfold > len(uniq):
            raise ValueError(f"kfold needs 3 <= k <= number of groups ({len(uniq)}), got {kfold}")
        # Shuffle then place the largest groups first, each into the currently smallest fold: a
        # seeded version of GroupKFold's greedy balancing (ties between equal groups are random).
        order = rng.permutation(len(uniq))
        order = order[np.argsort(-counts[order], kind="stable")]
        fold_of_group, sizes = np.empty(len(uniq), dtype=np.int64), np.zeros(kfold, dtype=np.int64)
        for g in order:
            fold_of_group[g] = int(np.argmin(sizes))
            sizes[fold_of_group[g]] += counts[g]
        fold = fold_of_group[inverse]
        return [
            TaskSplit(
                f"fold {i + 1}/{kfold} (seed={seed})",
                np.flatnonzero((fold != i) & (fold != (i + 1) % kfold)),
                np.flatnonzero(fold == (i + 1) % kfold),
                np.flatnonzero(fold == i),
            )
            for i in range(kfold)
        ]
    if data.splits is not None and use_split_column:
        train, val, test = (np.flatnonzero(data.splits == k) for k in ("train", "val", "test"))
        if val_from_train is not None:
            if len(val):
                raise DataError(
                    f"{data.source}: the split column already has {len(val)} val records; "
                    "--val-from-train is for a split with train and test only"
                )
            train, val = _carve(train, inverse, val_from_train, rng)
            name = f"fixed, val {val_from_train:g} of train (seed={seed})"
        else:
            name = "fixed"
        empty = [k for k, p in zip(("train", "val", "test"), (train, val, test)) if not len(p)]
        if empty:
            hint = (
                "; carve validation out of train with --val-from-train F (e.g. 0.15)"
                if empty == ["val"]
                else ""
            )
            where = (
                "split folders" if data.source and Path(data.source).is_dir() else "split column"
            )
            raise DataError(f"{data.source}: the {where} hold no {empty} records{hint}")
        return [TaskSplit(name, train, val, test)]
    fractions = DEFAULT_FRACTIONS if fractions is None else tuple(fractions)
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three numbers summing to 1, got {fractions}")
    # Whole groups are taken in a seeded order until test, then val, hold at least their share.
    order = rng.permutation(len(uniq))
    cum = np.concatenate([[0], np.cumsum(counts[order])])  # records in the first j groups
    n_test, n_val = (max(1, round(n * f)) if f > 0 else 0 for f in (fractions[2], fractions[1]))
    end_test = int(np.searchsorted(cum, n_test))
    end_val = int(np.searchsorted(cum, cum[end_test] + n_val))
    part = np.zeros(len(uniq), dtype=np.int64)  # 0 train, 1 val, 2 test
    part[order[:end_test]], part[order[end_test:end_val]] = 2, 1
    where = part[inverse]
    return [TaskSplit(f"random(seed={seed})", *(np.flatnonzero(where == k) for k in range(3)))]


def _fold_column_splits(
    data: TaskData,
    group_of: np.ndarray,
    rng: np.random.Generator,
    kfold: int | None,
    val_from_train: float | None,
    seed: int,
) -> list[TaskSplit]:
    """One split per value of the fold column: that fold is the test set; val is the next fold,
    or carved out of the training folds (`val_from_train`)."""
    names, fold = np.unique(data.folds, return_inverse=True)
    if all(name.lstrip("-").isdigit() for name in names):  # fold 10 after fold 9
        order = np.argsort([int(name) for name in names], kind="stable")
        names, fold = names[order], np.argsort(order)[fold]
    k = len(names)
    if k < (2 if val_from_train is not None else 3) or (kfold is not None and kfold != k):
        raise DataError(
            f"{data.source}: the fold column holds {k} folds ({', '.join(map(str, names[:10]))})"
            + (f", not --kfold {kfold}" if kfold is not None and kfold != k else "")
            + "; k-fold needs at least 3 (a test, a validation and a training fold), or 2 with "
            "--val-from-train"
        )
    splits = []
    for i in range(k):
        test = np.flatnonzero(fold == i)
        if val_from_train is not None:
            train, val = _carve(np.flatnonzero(fold != i), group_of, val_from_train, rng)
            name = f"fold {names[i]} ({i + 1}/{k}), val {val_from_train:g} of train (seed={seed})"
        else:
            val = np.flatnonzero(fold == (i + 1) % k)
            train = np.flatnonzero((fold != i) & (fold != (i + 1) % k))
            name = f"fold {names[i]} ({i + 1}/{k})"
        splits.append(TaskSplit(name, train, val, test))
    return splits


def _carve(
    train: np.ndarray, group_of: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): whole groups of `train`, in a seeded order, until val holds `fraction`."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_from_train must be a fraction in (0, 1), got {fraction}")
    groups, counts = np.unique(group_of[train], return_counts=True)
    order = rng.permutation(len(groups))
    cum = np.cumsum(counts[order])
    end = int(np.searchsorted(cum, max(1, round(len(train) * fraction)))) + 1
    in_val = np.isin(group_of[train], groups[order[:end]])
    return train[~in_val], train[in_val]


def repeated_splits(data: TaskData, split_seeds: Sequence[int], **kw) -> list[TaskSplit]:
    """`make_splits` once per split seed, identical splits kept once (a fixed split column
    without `val_from_train` gives one split whatever the seeds)."""
    out: list[TaskSplit] = []
    seen = set()
    for seed in split_seeds:
        for split in make_splits(data, seed=seed, **kw):
            key = tuple(p.tobytes() for p in (split.train, split.val, split.test))
            if key not in seen:
                seen.add(key)
                out.append(split)
    return out


def check_splits(splits: Sequence[TaskSplit], n: int) -> None:
    """Raise unless every split has train, val and test records, all among the `n` of the task."""
    if not splits:
        raise ValueError("no splits given")
    for split in splits:
        parts = (split.train, split.val, split.test)
        if any(len(p) == 0 for p in parts):
            raise DataError(f"{split!r}: train, val and test must each hold at least one record")
        if max(int(p.max()) for p in parts) >= n:
            raise DataError(f"{split!r} indexes past the {n} records of the task")
