"""Reading, cleaning and validating sequence files: one reader, one invalid-record policy.

Formats: ``txt`` (one sequence a line; blank lines are not records), ``csv``/``tsv`` or any
delimited table (one column holds the sequences; the other columns can come along as
`Record.fields`), ``fasta``/``fa``/``fna`` (multi-line records), each optionally gzip-compressed
(``.gz``). Cleaning strips whitespace, drops a literal ``<pad>`` filler, upper-cases and reads U as
T. Validation reports empty records, letters outside ``ACGTN`` and, for codon tokenizers, lengths
that are not a multiple of 3, naming the file, line (txt/csv) or record and header (fasta), and the
reason.

`iter_records` is the reader: it streams `Record` objects (place, index, id, header, cleaned
sequence) in bounded memory and applies the invalid-record policy (``on_invalid="error"`` raises
`DataError` listing the first few invalid records and the total, ``"skip"`` drops them with a logged
count; `ReadReport` keeps the counts). `iter_sequences` and `read_sequences` are views of it that
keep only the sequences. Record *indices* count every record in the file, valid or not, so the
train/val/test split of a file (`helm.data.splits.resolve_splits`) does not depend on `on_invalid`.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import itertools
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from helm.errors import DataError
from helm.vocab import AMINO_ACIDS, STOP, translate

logger = logging.getLogger("helm")


class FileFormat(str, Enum):
    """The formats a sequence file can have (each optionally gzipped)."""

    TXT = "txt"  # one sequence a line
    CSV = "csv"  # a table; TSV: tab-separated
    TSV = "tsv"
    FASTA = "fasta"

    def __str__(self) -> str:
        return str(self.value)

    __format__ = str.__format__


FORMATS = tuple(f.value for f in FileFormat)
ON_INVALID = ("error", "skip")
# File extensions (and --file_extension names) of each format.
_FORMAT_ALIASES = {
    "txt": FileFormat.TXT,
    "text": FileFormat.TXT,
    "seq": FileFormat.TXT,
    "csv": FileFormat.CSV,
    "tsv": FileFormat.TSV,
    "tab": FileFormat.TSV,
    "fasta": FileFormat.FASTA,
    "fa": FileFormat.FASTA,
    "fna": FileFormat.FASTA,
    "ffn": FileFormat.FASTA,
    "fas": FileFormat.FASTA,
}
# Names accepted for a table's delimiter beside the character itself.
_DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
# Column names tried, case-insensitively and in this order, when no column_name is given.
_SEQUENCE_COLUMNS = ("sequence", "seq", "cds", "sequences", "mrna", "rna", "dna", "nucleotides")
MAX_EXAMPLES = 5

_BAD_NUCLEOTIDE = re.compile(r"[^ACGTN]")
_BAD_AMINO_ACID = re.compile(f"[^{AMINO_ACIDS}X{re.escape(STOP)}]")
_WHITESPACE_AND_U = str.maketrans({"U": "T", " ": None, "\t": None, "\r": None, "\n": None})
_WHITESPACE = str.maketrans({" ": None, "\t": None, "\r": None, "\n": None})

# Reasons an invalid record is dropped; the keys of ReadReport.invalid.
EMPTY, BAD_CHARACTER, NOT_CODONS = "empty", "invalid character", "length not a multiple of 3"


@dataclass(slots=True)
class Record:
    """One record of a sequence file.

    `location` is ``file:line`` (for FASTA the header's line); `index` counts every record of the
    file from 0, valid or not; `id` is the FASTA header's first word, else the 1-based record
    number; `header` is the whole FASTA header (None for other formats); `sequence` is cleaned and
    validated (raw text with ``validate=False``); `fields` maps a table's header to the row's cells
    when `iter_records` was asked for `columns`.
    """

    location: str
    line: int
    index: int
    id: str
    sequence: str
    header: str | None = None
    fields: dict[str, str] | None = None

    @property
    def where(self) -> str:
        """The record's place in messages: ``file:line``, or for FASTA
        ``file:line record N (>header)``."""
        if self.header is None:
            return self.location
        return f"{self.location} record {self.index + 1} (>{self.header})"


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
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{location}: {reason}{': ' + detail if detail else ''}")

    def summary(self) -> str:
        """One line for the log."""
        text = f"{self.path}: {self.num_valid:,} valid of {self.num_records:,} records"
        if self.invalid:
            parts = ", ".join(f"{n:,} {reason}" for reason, n in sorted(self.invalid.items()))
            text += f"; {self.num_invalid:,} invalid ({parts})"
        return text

    def error(self) -> DataError:
        """The error that stops a read with invalid records under ``on_invalid="error"``."""
        listed = "\n  ".join(self.examples)
        return DataError(
            f"{self.num_invalid:,} invalid record(s) in {self.path} (first {len(self.examples)}):"
            f"\n  {listed}\nfix the file or pass on_invalid='skip' (--on-invalid skip) to drop them"
        )

    def to_dict(self) -> dict:
        """JSON-able form (token cache meta.json)."""
        return {
            "path": self.path,
            "num_records": self.num_records,
            "num_valid": self.num_valid,
            "invalid": dict(self.invalid),
            "examples": list(self.examples),
        }


def check_on_invalid(on_invalid: str) -> None:
    """Refuse an `on_invalid` value other than ``"error"`` or ``"skip"``."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")


def detect_format(
    path: str | os.PathLike, file_extension: str | None = None
) -> tuple[FileFormat, bool]:
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


def open_text(path: str | os.PathLike, gz: bool | None = None) -> io.TextIOBase:
    """A file opened for reading text, gunzipped when `gz` (default: the name ends in ``.gz``).
    A leading UTF-8 byte-order mark is read as the encoding marker it is, not as text."""
    if gz is None:
        gz = Path(path).name.lower().endswith(".gz")
    # newline="" lets the csv module see quoted newlines; the other readers strip line ends anyway.
    if gz:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def text_lines(path: str | os.PathLike, gz: bool | None = None) -> Iterator[str]:
    """The lines of a text file (`open_text`); any fault of the file (missing, a directory, not
    gzip, truncated or corrupt gzip, not UTF-8) raises `DataError` naming it and the line."""
    count = 0
    try:
        with open_text(path, gz) as f:
            for line in f:
                count += 1
                yield line
    except UnicodeDecodeError:
        raise _not_utf8(path, gz) from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a sequence file") from None
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (OSError, EOFError, zlib.error) as exc:
        after = f" (after line {count})" if count else ""
        raise DataError(f"{path}: {_read_fault(exc)}{after}") from None


def _read_fault(exc: BaseException) -> str:
    if isinstance(exc, gzip.BadGzipFile) and str(exc).startswith("Not a gzipped file"):
        return "not gzip-compressed, though its name ends in .gz (rename it without .gz)"
    if isinstance(exc, EOFError):
        return "the gzip stream is truncated (the file ends before its end-of-stream marker)"
    if isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        return f"corrupt gzip data ({exc})"
    return f"cannot be read ({getattr(exc, 'strerror', None) or exc})"


def _not_utf8(path: str | os.PathLike, gz: bool | None) -> DataError:
    """The first line that is not UTF-8 (found by reading the raw bytes again, on error only)."""
    if gz is None:
        gz = Path(path).name.lower().endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    column = len(raw[: exc.start].decode("utf-8", "replace")) + 1
                    hint = ""
                    if line_no == 1 and raw.startswith(b"\x1f\x8b"):
                        hint = "; it looks gzip-compressed: name it .gz"
                    return DataError(
                        f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                        f"column {column}){hint}"
                    )
    except (OSError, EOFError, zlib.error):
        pass
    return DataError(f"{path}: not UTF-8 text")


def table_rows(
    path: str | os.PathLike, *, gz: bool | None = None, delimiter: str = ","
) -> tuple[list[str] | None, Iterator[tuple[int, list[str]]]]:
    """(header with names stripped, or None for an empty file; iterator of (line, row)) of a
    delimited file. `delimiter` is a character, a name (``tab``, ``comma``, ``semicolon``,
    ``pipe``) or ``"sniff"`` (guessed among ``, tab ; |`` from the first lines, else ``,``)."""
    if delimiter == "sniff":
        with contextlib.closing(text_lines(path, gz)) as lines:
            sample = "".join(itertools.islice(lines, 20))
        try:
            delimiter = csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
        except csv.Error:
            delimiter = ","
    csv.field_size_limit(2**31 - 1)  # sequences can exceed the default 128 KiB field limit
    lines = text_lines(path, gz)
    reader = csv.reader(lines, delimiter=_DELIMITER_NAMES.get(delimiter, delimiter))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        lines.close()
        raise DataError(f"{path}:{reader.line_num}: {exc}") from None

    def rows() -> Iterator[tuple[int, list[str]]]:
        try:
            for row in reader:
                if row:
                    yield reader.line_num, row
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: {exc}") from None
        finally:
            lines.close()

    return (None if header is None else [h.strip() for h in header]), rows()


def _pick_column(path: str | os.PathLike, header: list[str], column_name: str | None) -> int:
    if column_name is not None:
        if column_name in header:
            return header.index(column_name)
        raise DataError(f"{path}: no column {column_name!r}; the header has {header}")
    lowered = [h.lower() for h in header]
    for candidate in _SEQUENCE_COLUMNS:
        if candidate in lowered:
            return lowered.index(candidate)
    if len(header) == 1:
        return 0
    raise DataError(
        f"{path}: cannot tell which column holds the sequences; pass column_name (one of {header})"
    )


def _raw_records(
    path: str | os.PathLike,
    column_name: str | None,
    file_extension: str | None,
    columns: Sequence[str] | None,
    delimiter: str | None,
) -> Iterator[Record]:
    """Every record of a file with its raw (uncleaned, unvalidated) text as `sequence`."""
    fmt, gz = detect_format(path, file_extension)
    if fmt == FileFormat.FASTA:
        yield from _fasta_records(path, gz)
        return
    if fmt == FileFormat.TXT:
        index = 0
        for line_no, line in enumerate(text_lines(path, gz), 1):
            if line.strip():
                index += 1
                yield Record(f"{path}:{line_no}", line_no, index - 1, str(index), line)
        return
    default = "," if fmt == FileFormat.CSV else "\t"
    header, rows = table_rows(path, gz=gz, delimiter=delimiter or default)
    if columns is None:
        if header is None:
            return
    else:
        header = header or []
        wanted = [*([column_name] if column_name is not None else []), *columns]
        missing = [c for c in wanted if c not in header]
        if missing:
            rows.close()
            raise DataError(f"{path}: no column(s) {missing}; the header has {header}")
    col = _pick_column(path, header, column_name)
    index = 0
    for line_no, row in rows:
        # A labelled table's all-blank row (a spreadsheet's trailing ",,,") is not a record.
        if columns is not None and not any(cell.strip() for cell in row):
            continue
        index += 1
        yield Record(
            f"{path}:{line_no}",
            line_no,
            index - 1,
            str(index),
            row[col] if col < len(row) else "",
            fields=None if columns is None else dict(zip(header, row)),
        )


def _fasta_records(path: str | os.PathLike, gz: bool) -> Iterator[Record]:
    def record(header: str, line_no: int, index: int, chunks: list[str]) -> Record:
        words = header.split(maxsplit=1)
        return Record(
            f"{path}:{line_no}", line_no, index, words[0] if words else "", "".join(chunks), header
        )

    header, header_line, chunks, count = None, 0, [], 0
    for line_no, line in enumerate(text_lines(path, gz), 1):
        if line.startswith(">"):
            if header is not None:
                yield record(header, header_line, count - 1, chunks)
            count += 1
            header, header_line, chunks = line[1:].strip(), line_no, []
        elif header is None:
            if line.strip():
                raise DataError(f"{path}:{line_no}: sequence data before the first '>' header")
        else:
            chunks.append(line)
    if header is not None:
        yield record(header, header_line, count - 1, chunks)


def count_records(
    path: str | os.PathLike, column_name: str | None = None, *, file_extension: str | None = None
) -> int:
    """Number of records in a file, valid or not (the index space of `iter_records`)."""
    fmt, gz = detect_format(path, file_extension)
    if fmt in (FileFormat.CSV, FileFormat.TSV):
        # Rows count the same whichever column is read, so no column has to be chosen here.
        _, rows = table_rows(path, gz=gz, delimiter="," if fmt == FileFormat.CSV else "\t")
        return sum(1 for _ in rows)
    return sum(1 for _ in _raw_records(path, column_name, file_extension, None, None))


def clean_sequence(raw: str, data_type: str = "nuc") -> str:
    """Strip whitespace, drop ``<pad>`` filler, upper-case; for nucleotides also read U as T."""
    seq = raw.replace("<pad>", "").upper()
    return seq.translate(_WHITESPACE_AND_U if data_type == "nuc" else _WHITESPACE)


def validate_sequence(
    seq: str, require_codons: bool = False, data_type: str = "nuc"
) -> tuple[str, str | None, str]:
    """(sequence to use, reason it is invalid or None, detail) for a cleaned sequence.

    ``data_type="aa"``: a record that looks like nucleotides is checked as such and translated in
    frame (stop kept as ``*``); any other is checked against the amino-acid alphabet.
    """
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


def iter_records(
    path: str | os.PathLike,
    *,
    column_name: str | None = None,
    on_invalid: str = "error",
    file_extension: str | None = None,
    data_type: str = "nuc",
    require_codons: bool = False,
    indices: np.ndarray | None = None,
    num_samples: int | None = None,
    report: ReadReport | None = None,
    columns: Sequence[str] | None = None,
    delimiter: str | None = None,
    check: Callable[[Record], tuple[str, str] | None] | None = None,
    validate: bool = True,
    require_records: bool = False,
) -> Iterator[Record]:
    """Stream the records of a sequence file, cleaned and validated, under one invalid-record policy.

    Args:
        path: a txt, csv, tsv (or other delimited table) or fasta file, optionally ``.gz``.
        column_name: the table column holding sequences; by default a column named like
            ``sequence``/``seq``/``CDS`` or the only column. Ignored for txt and fasta.
        on_invalid: ``"error"``: the stream stops yielding at the first invalid record, reads on
            to count the others, then raises `DataError` listing the first few and the total;
            ``"skip"``: invalid records are dropped, counted in `report` and logged at the end.
        file_extension: overrides the format read from the file name (e.g. ``"fasta.gz"``).
        data_type: ``"nuc"``; ``"codon"`` (nucleotides with `require_codons`); or ``"aa"``
            (see `validate_sequence`).
        require_codons: lengths must be a multiple of 3 (codon tokenizers).
        indices: read only these record numbers (0-based over all records).
        num_samples: stop after this many valid records.
        report: filled in as records go by (default: a fresh `ReadReport`).
        columns: table columns that must exist beside the sequence column; when given (even
            empty), each record carries its row as `Record.fields` and all-blank rows are skipped.
        delimiter: a table's delimiter (default ``,`` for csv, tab for tsv; see `table_rows`).
        check: a further test of each record (before its sequence is validated): None when the
            record is good, else ``(reason, detail)``, counted like any invalid record.
        validate: False yields the raw text as `Record.sequence` (no cleaning, no validation).
        require_records: a read that yields no record at all (an empty file, or only invalid
            records skipped) raises `DataError`.

    Every fault of the file itself (missing, a directory, not UTF-8, bad gzip, a malformed
    table) raises `DataError` naming the file and, where there is one, the line.
    """
    check_on_invalid(on_invalid)
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
    for record in _raw_records(path, column_name, file_extension, columns, delimiter):
        if wanted is not None:
            if record.index > last:
                break
            if not wanted[record.index]:
                continue
        report.num_records += 1
        problem = check(record) if check is not None else None
        if problem is None and validate:
            seq, reason, detail = validate_sequence(
                clean_sequence(record.sequence, data_type), require_codons, data_type
            )
            record.sequence = seq
            problem = None if reason is None else (reason, detail)
        if problem is not None:
            report.add_invalid(record.where, *problem)
            failed = failed or on_invalid == "error"
            continue
        if failed:
            continue
        report.num_valid += 1
        yield record
        if num_samples is not None and report.num_valid >= num_samples:
            break
    if failed:
        raise report.error()
    if require_records and report.num_valid == 0:
        raise no_records_error(report)
    if report.invalid:
        # Skipping is a choice, never silent: whoever reads the file hears what was dropped.
        logger.warning(
            "skipped invalid records: %s (first: %s)", report.summary(), report.examples[0]
        )


def no_records_error(report: ReadReport) -> DataError:
    """The error for a read that found no usable record."""
    if report.num_records == 0:
        return DataError(f"{report.path}: no records (the file, or the part asked for, is empty)")
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(report.invalid.items()))
    first = f"; first: {report.examples[0]}" if report.examples else ""
    return DataError(
        f"{report.path}: no usable records (all {report.num_records:,} invalid: {reasons}){first}"
    )


def iter_sequences(
    path: str | os.PathLike,
    column_name: str | None = None,
    on_invalid: str = "error",
    **options,
) -> Iterator[str]:
    """The cleaned, validated sequences of `iter_records` (same arguments)."""
    for record in iter_records(path, column_name=column_name, on_invalid=on_invalid, **options):
        yield record.sequence


def read_sequences(
    path: str | os.PathLike,
    column_name: str | None = None,
    on_invalid: str = "error",
    *,
    file_extension: str | None = None,
    num_samples: int | None = None,
    require_codons: bool = False,
    data_type: str = "nuc",
    require_records: bool = False,
) -> tuple[list[str], ReadReport]:
    """Every cleaned, validated sequence of a file and the `ReadReport` (see `iter_records`)."""
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
            require_records=require_records,
        )
    )
    return seqs, report
