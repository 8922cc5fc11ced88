"""Checks of a task's splits that a reader of the report needs: identical sequences on both sides
of a split (`duplicates`, `dedupe`) and labels too rare in a split to score (`label_warnings`).

Sequences are compared as the models read them (`TaskData.codon_sequences`: cleaned, U read as
T, cut to whole 3-mers), so two records that differ only in a trailing partial codon are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from helm.downstream.splits import TaskSplit
from helm.downstream.tasks import TaskData, TaskType

MIN_LABEL_COUNT = 5  # fewer positives or negatives than this in val or test: the score is fragile


def _in(seqs: list[str], records: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """The records whose sequence also occurs among the `pool` records."""
    seen = {seqs[i] for i in pool}
    return np.array([i for i in records if seqs[i] in seen], dtype=np.int64)


def duplicates(data: TaskData, split: TaskSplit) -> dict[str, int]:
    """Counts of val and test records whose sequence is also in train, and test records whose
    sequence is also in val (``val_in_train``, ``test_in_train``, ``test_in_val``)."""
    seqs = data.codon_sequences()
    return {
        "val_in_train": len(_in(seqs, split.val, split.train)),
        "test_in_train": len(_in(seqs, split.test, split.train)),
        "test_in_val": len(_in(seqs, split.test, split.val)),
    }


def dedupe(data: TaskData, split: TaskSplit) -> TaskSplit:
    """`split` without the val and test records whose sequence is in train, and without the test
    records whose sequence is in val: what is scored was never seen in training or selection."""
    seqs = data.codon_sequences()
    val = np.setdiff1d(split.val, _in(seqs, split.val, split.train))
    test = np.setdiff1d(split.test, _in(seqs, split.test, split.train))
    test = np.setdiff1d(test, _in(seqs, test, val))
    return TaskSplit(split.name, split.train, val, test)


def duplicate_warnings(
    data: TaskData, splits: Sequence[TaskSplit], dropped: bool = False
) -> list[str]:
    """One line per split holding identical sequences on both sides (`dropped`: the caller
    removes them with `dedupe`, and the line says so)."""
    lines = []
    for split in splits:
        d = duplicates(data, split)
        if any(d.values()):
            lines.append(
                f"{split.name}: identical sequences across splits: {d['test_in_train']} of "
                f"{len(split.test)} test records are in train, {d['val_in_train']} of "
                f"{len(split.val)} val records are in train, {d['test_in_val']} test records are "
                + (
                    "in val; dropped from val and test (--dedupe)"
                    if dropped
                    else "in val (--dedupe drops them from val and test)"
                )
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
