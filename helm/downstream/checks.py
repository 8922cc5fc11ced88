"""Checks of a task's splits that a reader of the report needs: identical sequences on both sides
of a split and what is done about them (`resolve_duplicates`: ``--duplicates keep|group|drop``),
and labels too rare in a split to score (`label_warnings`).

Sequences are compared as the models read them (`TaskData.codon_sequences`: cleaned, U read as
T, cut to whole 3-mers), so two records that differ only in a trailing partial codon are the same.
Records identical within what the model reads (its window) but different later are one input to
the model: they are grouped or dropped with the identical ones, and counted apart (``window_only``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from helm.data.io import DataError
from helm.downstream.splits import TaskSplit
from helm.downstream.tasks import TaskData, TaskType
from helm.errors import ConfigError

MIN_LABEL_COUNT = 5  # fewer positives or negatives than this in val or test: the score is fragile
DUPLICATE_POLICIES = ("keep", "group", "drop")


def _in(keys: Sequence[str], records: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """The records whose key also occurs among the `pool` records."""
    seen = {keys[i] for i in pool}
    return np.array([i for i in records if keys[i] in seen], dtype=np.int64)


def duplicates(
    data: TaskData, split: TaskSplit, keys: Sequence[str] | None = None
) -> dict[str, int]:
    """Counts of val and test records whose sequence (or `keys`, one per record) is also in train,
    and test records whose sequence is also in val (``val_in_train``, ``test_in_train``,
    ``test_in_val``)."""
    keys = data.codon_sequences() if keys is None else keys
    return {
        "val_in_train": len(_in(keys, split.val, split.train)),
        "test_in_train": len(_in(keys, split.test, split.train)),
        "test_in_val": len(_in(keys, split.test, split.val)),
    }


def dedupe(data: TaskData, split: TaskSplit, keys: Sequence[str] | None = None) -> TaskSplit:
    """`split` without the val and test records whose sequence (or `keys`) is in train, and without
    the test records whose sequence is in val: what is scored was never seen in training or
    selection."""
    keys = data.codon_sequences() if keys is None else keys
    val = np.setdiff1d(split.val, _in(keys, split.val, split.train))
    test = np.setdiff1d(split.test, _in(keys, split.test, split.train))
    test = np.setdiff1d(test, _in(keys, test, val))
    return TaskSplit(split.name, split.train, val, test)


def duplicate_groups(keys: Sequence[str], groups: np.ndarray | None = None) -> np.ndarray:
    """One group id per record: records sharing a key, or a group of `groups`, share an id (the
    connected components), so a group-aware split keeps them on one side."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict = {}
    for labels in (keys, groups if groups is not None else ()):
        first.clear()
        for i, label in enumerate(labels):
            j = first.setdefault(label, i)
            parent[root(i)] = root(j)
    return np.array([root(i) for i in range(len(keys))], dtype=np.int64)


def resolve_duplicates(
    data: TaskData,
    split_with: Callable[[TaskData], list[TaskSplit]],
    policy: str | None,
    *,
    fixed: bool,
    carved: bool,
    seen: Sequence[int],
    reads: str = "",
) -> tuple[list[TaskSplit], dict]:
    """The splits under a duplicate `policy`, and what it found and did.

    `split_with(data)` makes the splits (it reads ``data.groups``); `fixed` says a split or fold
    column places the records, `carved` that validation is carved out of train; `seen` holds the
    nucleotides of each record the model reads. Records are compared on what the model reads:

    - ``group`` (default for random and k-fold splits): records identical there share a group
      (joined with the user's groups), so they never straddle train/val/test; a fixed split
      cannot move records, so there it groups only the carved validation records;
    - ``drop`` (default for a split or fold column): val and test records identical to a train
      record, and test records identical to a val record, are dropped (validation carved out of
      train is carved in whole groups of identical records first, so it is not emptied);
    - ``keep``: nothing is done; the counts and warnings still say what is there.

    The summary counts test records (summed over splits) whose whole sequence is in train before
    and after (``train_test_before``, ``train_test_after``) and those identical to a train record
    only within what the model reads (``window_only``, before; ``window_only_after``).
    """
    if policy is None:
        policy = "drop" if fixed else "group"
    if policy not in DUPLICATE_POLICIES:
        raise ConfigError(f"--duplicates must be one of {', '.join(DUPLICATE_POLICIES)}")
    if policy == "group" and fixed and not carved:
        raise ConfigError(
            "--duplicates group regroups records before splitting, but the split (or fold) "
            "column fixes where each record is: use --duplicates drop (the default there) or keep"
        )
    full = data.codon_sequences()
    read = [s[: int(n)] for s, n in zip(full, seen)]
    plain = split_with(data)
    grouped = plain
    if policy == "group" or (policy == "drop" and carved):
        grouped = split_with(replace(data, groups=duplicate_groups(read, data.groups)))
    splits = [dedupe(data, s, read) for s in grouped] if policy == "drop" else grouped
    for split in splits:
        empty = [p for p in ("train", "val", "test") if not len(getattr(split, p))]
        if empty:
            largest = int(np.bincount(duplicate_groups(read)).max())
            raise DataError(
                f"{data.source}: {split.name} has no {' or '.join(empty)} records left under "
                f"--duplicates {policy} (the largest set of records identical in what the model "
                f"reads holds {largest} of {len(data)}); --duplicates keep scores them anyway"
            )

    def count(parts: list[TaskSplit], keys: list[str]) -> int:
        return sum(len(_in(keys, s.test, s.train)) for s in parts)

    def scored(parts: list[TaskSplit]) -> int:
        return sum(len(s.val) + len(s.test) for s in parts)

    before, after = count(plain, full), count(splits, full)
    summary = {
        "policy": policy,
        "train_test_before": before,
        "train_test_after": after,
        "window_only": count(plain, read) - before,
        "window_only_after": count(splits, read) - after,
        "dropped": scored(plain) - scored(splits) if policy == "drop" else 0,
        "test_records": sum(len(s.test) for s in splits),
        "num_splits": len(splits),
        "model_reads": reads,
    }
    return splits, summary


def duplicates_text(summary: dict) -> str:
    """The report's line on duplicates: the policy, and the counts before and after it."""
    s = summary
    text = (
        f"Duplicates (--duplicates {s['policy']}, sequences compared as the model reads them): "
        f"{s['train_test_before']} test records had their whole sequence in train before, "
        f"{s['train_test_after']} after (of {s['test_records']} test records, summed over "
        f"{s['num_splits']} split{'s' if s['num_splits'] > 1 else ''}); {s['window_only']} more "
        f"matched a train record only within what the model reads, {s['window_only_after']} after"
    )
    if s["dropped"]:
        text += f"; {s['dropped']} val and test records dropped"
    return text + "."


class DedupeRenamed(argparse.Action):
    """``eval.py downstream --dedupe``, now ``--duplicates drop``: the error names its successor."""

    def __call__(self, parser, *_):
        parser.error("--dedupe is now --duplicates drop (the default keeps duplicates apart)")


def duplicate_warnings(
    data: TaskData, splits: Sequence[TaskSplit], keys: Sequence[str] | None = None
) -> list[str]:
    """One line per split that still holds identical sequences (or `keys`) on both sides."""
    lines = []
    for split in splits:
        d = duplicates(data, split, keys)
        if any(d.values()):
            lines.append(
                f"{split.name}: identical sequences across splits: {d['test_in_train']} of "
                f"{len(split.test)} test records are in train, {d['val_in_train']} of "
                f"{len(split.val)} val records are in train, {d['test_in_val']} test records are "
                "in val (--duplicates drop removes them from val and test)"
            )
    return lines


def label_warnings(
    data: TaskData, splits: Sequence[TaskSplit], min_count: int = MIN_LABEL_COUNT
) -> list[str]:
    """Classes (classification) or labels (multilabel) with fewer than `min_count` records of a
    kind in a validation or test split, or none at all in train: their metrics rest on a handful
    of records, or are undefined (a label without negatives has no AUROC)."""
    if data.task == TaskType.REGRESSION:
        return []
    lines = []
    for split in splits:
        for part in ("train", "val", "test"):
            idx = getattr(split, part)
            floor = 1 if part == "train" else min_count
            for k, name in enumerate(data.label_names):
                if data.task == TaskType.CLASSIFICATION:
                    counts = {"records": int(np.sum(data.targets[idx] == k))}
                else:
                    pos = int(data.targets[idx, k].sum())
                    counts = {"positives": pos, "negatives": len(idx) - pos}
                rare = [f"{n} {kind}" for kind, n in counts.items() if n < floor]
                if rare:
                    lines.append(
                        f"{split.name}: label {name!r} has {' and '.join(rare)} in the {part} "
                        f"split ({len(idx)} records)"
                    )
    return lines
