"""Reading, cleaning and validating sequence files.

Formats: ``txt`` (one sequence a line; blank lines are not records), ``csv``/``tsv`` (one column holds
the sequences), ``fasta``/``fa``/``fna`` (multi-line records), each optionally gzip-compressed
(``.gz``). Cleaning strips whitespace, drops a literal ``<pad>`` filler, upper-cases and reads U as T.
Validation reports empty records, letters outside ``ACGTN`` and, for codon tokenizers, lengths that
are not a multiple of 3, naming the file, line (txt/csv) or record and header (fasta), and the reason.

`iter_sequences` streams cleaned records (the token cache builds from it in bounded memory);
`read_sequences` collects them into a list. Record *indices* count every record in the file, valid
or not, so the train/val/test split of a file (`resolve_splits`) does not depend on `on_invalid`.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from helm.vocab import AMINO_ACIDS, STOP, translate

logger = logging.getLogger("helm")

FORMATS = ("txt", "csv", "tsv", "fasta")
_FORMAT_ALIASES = {
    "txt": "txt",
    "text": "txt",
    "seq": "txt",
    "csv": "csv",
    "tsv": "tsv",
    "tab": "tsv",
    "fasta": "fasta",
    "fa": "fasta",
    "fna": "fasta",
    "ffn": "fasta",
    "fas": "fasta",
}
# Column names tried, case-insensitively and in this order, when no column_name is given.
_SEQUENCE_COLUMNS = ("sequence", "seq", "cds", "sequences", "mrna", "rna", "dna", "nucleotides")
_MAX_EXAMPLES = 5

_BAD_NUCLEOTIDE = re.compile(r"[^ACGTN]")
_BAD_AMINO_ACID = re.compile(f"[^{AMINO_ACIDS}X{re.escape(STOP)}]")
_WHITESPACE_AND_U = str.maketrans({"U": "T", " ": None, "\t": None, "\r": None, "\n": None})
_WHITESPACE = str.maketrans({" ": None, "\t": None, "\r": None, "\n": None})

# Reasons an invalid record is dropped; the keys of ReadReport.invalid.
EMPTY, BAD_CHARACTER, NOT_CODONS = "empty", "invalid character", "length not a multiple of 3"


class DataError(ValueError):
    """A data file that cannot be used as given: the message names the file, place and reason."""


@dataclass
class ReadReport:
    """What reading one file found: record counts, invalid counts by reason, a few examples."""

    path: str
    num_records: int = 0  # records seen (valid or not) among those asked for
    num_valid: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def num_invalid(self) -> int:
        """Total invalid records seen."""
        return sum(self.invalid.values())

    def add_invalid(self, location: str, reason: str, detail: str = "") -> None:
        """Count one invalid record under `reason`; keep its description among the first few."""
        self.invalid[reason] = self.invalid.get(reason, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{location}: {reason}{': ' + detail if detail else ''}")

    def summary(self) -> str:
        """One line for the log."""
        text = f"{self.path}: {self.num_valid:,} valid of {self.num_records:,} records"
        if self.invalid:
            parts = ", ".join(f"{n:,} {reason}" for reason, n in sorted(self.invalid.items()))
            text += f"; {self.num_invalid:,} invalid ({parts})"
        return text

    def to_dict(self) -> dict:
        """JSON-able form (token cache meta.json)."""
        return {
            "path": self.path,
            "num_records": self.num_records,
            "num_valid": self.num_valid,
            "invalid": dict(self.invalid),
            "examples": list(self.examples),
        }


def detect_format(path: str | os.PathLike, file_extension: str | None = None) -> tuple[str, bool]:
    """(format, gzipped) of a file from its suffixes, or from `file_extension` (e.g. ``"fa.gz"``)."""
    name = (file_extension or Path(path).name).lower()
    parts = name.lstrip(".").split(".")
    gz = parts[-1] == "gz"
    if gz:
        parts = parts[:-1]
    fmt = _FORMAT_ALIASES.get(parts[-1]) if parts else None
    if fmt is None:
        known = ", ".join(sorted(_FORMAT_ALIASES))
        raise DataError(
            f"{path}: cannot tell the file format from {name!r}; use one of the extensions "
            f"{known} (optionally + .gz) or pass file_extension"
        )
    return fmt, gz


def _open_text(path: str | os.PathLike, gz: bool) -> io.TextIOBase:
    # newline="" lets the csv module see quoted newlines; the other readers strip line ends anyway.
    if gz:
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _pick_column(path: str | os.PathLike, header: list[str], column_name: str | None) -> int:
    if column_name is not None:
        if column_name in header:
            return header.index(column_name)
        raise DataError(f"{path}: no column {column_name!r}; the header has {header}")
    lowered = [h.strip().lower() for h in header]
    for candidate in _SEQUENCE_COLUMNS:
        if candidate in lowered:
            return lowered.index(candidate)
    if len(header) == 1:
        return 0
    raise DataError(
        f"{path}: cannot tell which column holds the sequences; pass column_name (one of {header})"
    )


def iter_raw_records(
    path: str | os.PathLike,
    column_name: str | None = None,
    *,
    file_extension: str | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield ``(location, raw_text)`` for every record of a file, uncleaned and unvalidated.

    The location is ``file:line`` for txt and csv/tsv, ``file:line record N (>header)`` for fasta.
    """
    fmt, gz = detect_format(path, file_extension)
    with _open_text(path, gz) as f:
        if fmt == "txt":
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{line_no}", line
        elif fmt in ("csv", "tsv"):
            reader = _csv_reader(f, fmt)
            header = next(reader, None)
            if header is None:
                return
            col = _pick_column(path, header, column_name)
            for row in reader:
                if not row:
                    continue
                yield f"{path}:{reader.line_num}", row[col] if col < len(row) else ""
        else:
            yield from _fasta_records(path, f)


def _csv_reader(f: io.TextIOBase, fmt: str):
    # Sequences can exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    return csv.reader(f, delimiter="," if fmt == "csv" else "\t")


def _fasta_records(path: str | os.PathLike, f: io.TextIOBase) -> Iterator[tuple[str, str]]:
    header, header_line, chunks, count = None, 0, [], 0
    for line_no, line in enumerate(f, 1):
        if line.startswith(">"):
            if header is not None:
                yield f"{path}:{header_line} record {count} (>{header})", "".join(chunks)
            count += 1
            header, header_line, chunks = line[1:].strip(), line_no, []
        elif header is None:
            if line.strip():
                raise DataError(f"{path}:{line_no}: sequence data before the first '>' header")
        else:
            chunks.append(line)
    if header is not None:
        yield f"{path}:{header_line} record {count} (>{header})", "".join(chunks)


def count_records(
    path: str | os.PathLike, column_name: str | None = None, *, file_extension: str | None = None
) -> int:
    """Number of records in a file, valid or not (the index space of `iter_sequences`)."""
    fmt, gz = detect_format(path, file_extension)
    if fmt in ("csv", "tsv"):
        # Rows count the same whichever column is read, so no column has to be chosen here.
        with _open_text(path, gz) as f:
            reader = _csv_reader(f, fmt)
            next(reader, None)
            return sum(1 for row in reader if row)
    return sum(1 for _ in iter_raw_records(path, column_name, file_extension=file_extension))


def clean_sequence(raw: str, data_type: str = "nuc") -> str:
    """Strip whitespace, drop ``<pad>`` filler, upper-case; for nucleotides also read U as T."""
    seq = raw.replace("<pad>", "").upper()
    return seq.translate(_WHITESPACE_AND_U if data_type == "nuc" else _WHITESPACE)


def iter_sequences(
    path: str | os.PathLike,
    column_name: str | None = None,
    on_invalid: str = "error",
    *,
    file_extension: str | None = None,
    num_samples: int | None = None,
    require_codons: bool = False,
    data_type: str = "nuc",
    indices: np.ndarray | None = None,
    report: ReadReport | None = None,
) -> Iterator[str]:
    """Stream cleaned, validated sequences of a file (see `read_sequences` for the arguments).

    `indices` restricts reading to those record numbers (0-based over all records); `report`, when
    given, is filled in as records go by. With ``on_invalid="error"`` the stream stops yielding at
    the first invalid record, reads on to count the others, then raises `DataError` listing the
    first few and the total.
    """
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    if data_type == "codon":  # the CLI's name for nucleotide data read as whole codons
        data_type, require_codons = "nuc", True
    if data_type not in ("nuc", "aa"):
        raise ValueError(f"data_type must be 'nuc', 'codon' or 'aa', got {data_type!r}")
    report = report if report is not None else ReadReport(str(path))
    wanted, last = None, -1
    if indices is not None:
        # A boolean mask costs one byte a record, a set of ints ~60: splits of huge files stay small.
        indices = np.asarray(indices, dtype=np.int64)
        last = int(indices.max()) if indices.size else -1
        wanted = np.zeros(last + 1, dtype=bool)
        wanted[indices] = True
    failed = False
    records = iter_raw_records(path, column_name, file_extension=file_extension)
    for index, (location, raw) in enumerate(records):
        if wanted is not None:
            if index > last:
                break
            if not wanted[index]:
                continue
        report.num_records += 1
        seq, reason, detail = _validate(clean_sequence(raw, data_type), require_codons, data_type)
        if reason is not None:
            report.add_invalid(location, reason, detail)
            failed = failed or on_invalid == "error"
            continue
        if failed:
            continue
        report.num_valid += 1
        yield seq
        if num_samples is not None and report.num_valid >= num_samples:
            break
    if report.invalid and not failed:
        # Skipping is a choice, never silent: whoever reads the file hears what was dropped.
        logger.warning(
            "skipped invalid records: %s (first: %s)", report.summary(), report.examples[0]
        )
    if failed:
        listed = "\n  ".join(report.examples)
        raise DataError(
            f"{report.num_invalid:,} invalid record(s) in {path} (first {len(report.examples)}):"
            f"\n  {listed}\nfix the file or pass on_invalid='skip' (--on-invalid skip) to drop them"
        )


def _validate(seq: str, require_codons: bool, data_type: str) -> tuple[str, str | None, str]:
    """(sequence to use, reason it is invalid or None, detail)."""
    if not seq:
        return seq, EMPTY, ""
    protein = data_type == "aa" and not _looks_like_nucleotides(seq)
    if data_type == "aa" and not protein:
        seq = seq.replace("U", "T")  # cleaning keeps U for proteins (selenocysteine)
    bad = (_BAD_AMINO_ACID if protein else _BAD_NUCLEOTIDE).search(seq)
    if bad is not None:
        return seq, BAD_CHARACTER, f"{bad.group()!r} at position {bad.start() + 1}"
    if require_codons and not protein and len(seq) % 3:
        return seq, NOT_CODONS, f"length {len(seq)}"
    if data_type == "aa" and not protein:
        # Protein models read coding sequences as their translation; the stop stays as '*'.
        return translate(seq), None, ""
    return seq, None, ""


def _looks_like_nucleotides(seq: str) -> bool:
    from helm.tokenizers.protein import looks_like_nucleotides

    return looks_like_nucleotides(seq)


def read_sequences(
    path: str | os.PathLike,
    column_name: str | None = None,
    on_invalid: str = "error",
    *,
    file_extension: str | None = None,
    num_samples: int | None = None,
    require_codons: bool = False,
    data_type: str = "nuc",
) -> tuple[list[str], ReadReport]:
    """Read, clean and validate every sequence of a file.

    Args:
        path: a txt, csv, tsv or fasta file, optionally ``.gz``.
        column_name: the csv/tsv column holding sequences; by default a column named like
            ``sequence``/``seq``/``CDS`` or the only column. Ignored for txt and fasta.
        on_invalid: ``"error"`` raises `DataError` naming the first invalid records and the total;
            ``"skip"`` drops them and counts them in the report.
        file_extension: overrides the format read from the file name (e.g. ``"fasta.gz"``).
        num_samples: keep only the first N valid records.
        require_codons: lengths must be a multiple of 3 (codon tokenizers).
        data_type: ``"nuc"``; ``"codon"`` (nucleotides with `require_codons`); or ``"aa"``: nucleotide records are translated in frame (stop kept as
            ``*``) and protein records validated against the amino-acid alphabet.

    Returns:
        The cleaned sequences and a `ReadReport`.
    """
    report = ReadReport(str(path))
    seqs = list(
        iter_sequences(
            path,
            column_name,
            on_invalid,
            file_extension=file_extension,
            num_samples=num_samples,
            require_codons=require_codons,
            data_type=data_type,
            report=report,
        )
    )
    return seqs, report


# ---------------------------------------------------------------------------------------------------
# Train / val / test splits

_SPLIT_STEMS = {
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
    None means every record. `iter_sequences(split.path, indices=split.indices, ...)` reads it.
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
        name = _SPLIT_STEMS.get(entry.name.split(".")[0].lower())
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
            raise DataError(f"{name} file {path} does not exist")

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
