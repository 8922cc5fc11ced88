"""Train / val / test splits: which files, or which records of the training file, make each split.

`resolve_splits` takes explicit files first, then files named ``train``/``val``/``test`` (or a
synonym in `SPLIT_STEMS`) in a data directory, and carves a missing val or test split out of the
training file with a seeded permutation of its record numbers. A `Split` is read with
``iter_records(split.path, indices=split.indices, ...)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from helm.data.io import DataError, count_records, detect_format

logger = logging.getLogger("helm")

# File stems (and task-table split values) naming a split, lower case -> the split's name.
SPLIT_STEMS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}


@dataclass(eq=False)
class Split:
    """One split of the data: a file and, when the split is carved out of a file, its records.

    `indices` holds sorted 0-based record numbers of `path` (as counted by `count_records`);
    None means every record. `iter_records(split.path, indices=split.indices, ...)` reads it.
    """

    name: str
    path: str
    indices: np.ndarray | None = None
    file_extension: str | None = None

    def __repr__(self) -> str:
        which = "all records" if self.indices is None else f"{len(self.indices):,} records"
        return f"Split({self.name!r}, {self.path!r}, {which})"


def _find_split_files(data_dir: str | os.PathLike, file_extension: str | None) -> dict[str, str]:
    found: dict[str, list[str]] = {}
    for entry in sorted(Path(data_dir).iterdir()):
        if not entry.is_file():
            continue
        try:
            detect_format(entry, file_extension)
        except DataError:
            continue
        name = SPLIT_STEMS.get(entry.name.split(".")[0].lower())
        if name is not None:
            found.setdefault(name, []).append(str(entry))
    for name, paths in found.items():
        if len(paths) > 1:
            raise DataError(
                f"{data_dir}: several {name} files {paths}; pass {name}_file explicitly"
            )
    return {name: paths[0] for name, paths in found.items()}


def resolve_splits(
    data_dir: str | os.PathLike | None = None,
    train_file: str | os.PathLike | None = None,
    val_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    file_extension: str | None = None,
    seed: int = 0,
    split: tuple[float, float, float] = (0.9, 0.05, 0.05),
) -> dict[str, Split]:
    """Decide which files, or which records of the training file, make train, val and test.

    Explicit files win; otherwise `data_dir` is searched for files named ``train``, ``val`` (or
    ``valid``, ``validation``, ``dev``) and ``test`` with a known extension. A missing val or test
    split is carved out of the training file: a permutation of its record numbers seeded by `seed`
    gives ``round(n * fraction)`` records (at least one) to each missing split, in the proportions
    of `split` = (train, val, test); a zero fraction leaves that split out of the result.

    Returns:
        ``{"train": Split, "val": Split, "test": Split}`` (val/test absent when their fraction is 0).
    """
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {split}")
    files = {"train": train_file, "val": val_file, "test": test_file}
    for name, path in files.items():
        if path is not None and not str(path).strip():
            raise DataError(f"{name}_file is an empty path: name a file, or leave it out")
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise DataError(f"data_dir {data_dir} is not a directory")
        for name, path in _find_split_files(data_dir, file_extension).items():
            files[name] = files[name] or path
    if files["train"] is None:
        where = f" (found none named train.* in {data_dir})" if data_dir is not None else ""
        raise DataError(f"no training data: pass train_file or a data_dir with train.<ext>{where}")
    for name, path in files.items():
        if path is not None and not Path(path).is_file():
            what = "is a directory, not a file" if Path(path).is_dir() else "does not exist"
            raise DataError(f"{name} file {path} {what}")

    splits = {
        name: Split(name, str(path), None, file_extension)
        for name, path in files.items()
        if path is not None
    }
    fractions = dict(zip(("train", "val", "test"), split))
    missing = [name for name in ("val", "test") if name not in splits and fractions[name] > 0]
    if not missing:
        return splits

    train_path = splits["train"].path
    n = count_records(train_path, file_extension=file_extension)
    sizes = {name: max(1, round(n * fractions[name])) for name in missing}
    if n - sum(sizes.values()) < 1:
        raise DataError(f"{train_path}: {n} record(s) are too few to carve out {missing} splits")
    perm = np.random.default_rng(seed).permutation(n)
    start = 0
    for name in missing:
        part = perm[start : start + sizes[name]]
        splits[name] = Split(name, train_path, np.sort(part), file_extension)
        start += sizes[name]
    splits["train"] = Split("train", train_path, np.sort(perm[start:]), file_extension)
    logger.info(
        "no %s file: split %s (%d records) with seed %d into %s",
        "/".join(missing),
        train_path,
        n,
        seed,
        ", ".join(f"{k} {len(s.indices):,}" for k, s in splits.items() if s.indices is not None),
    )
    return {name: splits[name] for name in ("train", "val", "test") if name in splits}
