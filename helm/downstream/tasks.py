"""Downstream property-prediction tasks: the CodonBERT benchmark registry, fetching and loading.

`TASKS` lists the fine-tuning sets of the CodonBERT benchmark (Li et al. 2023) used by the HELM
paper. `fetch_task` finds a set's file locally (``data_dir`` / ``$HELM_DATA_DIR``, flat or one
folder per set), in the cache (``$HELM_CACHE_DIR`` or ``~/.cache/helm/downstream``) or downloads
it, always checking its sha256. `load_task_file` reads any user table or FASTA file into a
`TaskData` (sequences cleaned and validated by `helm.data.io`); `protocol.make_splits` splits it.

Non-coding sets (UTRs, riboswitches) are read like coding ones: the model sees them cut into
consecutive 3-mers from the first nucleotide, a trailing partial 3-mer dropped, as CodonBERT did
(`TaskData.codon_sequences`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from helm.data import cache as data_cache
from helm.data.io import (
    DataError,
    FileFormat,
    ReadReport,
    Record,
    clean_sequence,
    detect_format,
    iter_records,
    table_rows,
)
from helm.data.splits import SPLIT_STEMS

logger = logging.getLogger("helm")


class TaskType(str, Enum):
    """What a task predicts: one number, one class, or a set of labels per record."""

    REGRESSION = "regression"
    CLASSIFICATION = "classification"
    MULTILABEL = "multilabel"

    def __str__(self) -> str:  # the name users give and reports print
        return str(self.value)

    __format__ = str.__format__


TASK_TYPES = tuple(t.value for t in TaskType)
CODONBERT_COMMIT = "9c31ecc6631df08794c373c5d715235649e2181a"
_CODONBERT_URL = (
    "https://raw.githubusercontent.com/Sanofi-Public/CodonBERT/"
    f"{CODONBERT_COMMIT}/benchmarks/CodonBERT/data/fine-tune/"
)


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark set: where its file comes from and how to read and score it.

    `sha256` None means the hash is not pinned yet: it is verified on first download, recorded in
    the cache beside the file (``<file>.sha256``) and checked against that record afterwards.
    `split_column` None means the file has no split: a seeded random 0.7/0.15/0.15 split is used.
    """

    name: str
    file_name: str
    sha256: str | None
    task: str
    metric: str
    coding: bool
    description: str
    sequence_column: str = "Sequence"
    target_columns: tuple[str, ...] = ("Value",)
    split_column: str | None = "Split"
    url: str = ""

    def __post_init__(self) -> None:
        if not self.url:
            object.__setattr__(self, "url", _CODONBERT_URL + self.file_name)


def _spec(name: str, file_name: str, sha256: str | None, coding: bool, text: str, **kw) -> TaskSpec:
    kw.setdefault("task", TaskType.REGRESSION)
    kw.setdefault("metric", "spearman" if kw["task"] == TaskType.REGRESSION else "accuracy")
    return TaskSpec(name, file_name, sha256, coding=coding, description=text, **kw)


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        _spec("mrfp_expression", "mRFP_Expression.csv",
              "ed32c1e547ca4db464ef873768fcc6b3f4738704981a88bd9b842bd4e630ed99", True,
              "mRFP protein expression of synonymous CDS variants in E. coli (Nieuwkoop 2023)"),
        _spec("cov_vaccine_degradation", "CoV_Vaccine_Degradation.csv",
              "361828d96bfc52d91d74bc11042e399e2aea78a7d83b352227aca7f3bf43420c", False,
              "mean deg_Mg_50C degradation of OpenVaccine RNA constructs (Wayment-Steele 2022)"),
        _spec("tc_riboswitches", "Tc-Riboswitches.csv",
              "707ffde524aa790647cffa6bce787f981c9fd0a095bee953657688f461c4678c", False,
              "switching factor of tetracycline riboswitches (Groher 2018)"),
        _spec("mlos", "MLOS.csv",
              "25fcddaad8eb387de72df5323b90d62e76c7a3b28634df1b696f7d64ae26725b", True,
              "flu vaccine HA antigen expression (Sanofi); no split column",
              sequence_column="CDS", split_column=None),
        # Not pinned: verified on first download (the hash is then recorded and reported).
        _spec("ecoli_proteins", "E.Coli_proteins.csv", None, True,
              "E. coli protein expression class low/medium/high (MPEPE, Ding 2022)",
              task=TaskType.CLASSIFICATION),
        _spec("fungal_expression", "Fungal_expression.csv", None, True,
              "protein expression of fungal genes (Wint 2022)"),
        _spec("mrna_stability", "mRNA_Stability.csv", None, True,
              "mRNA half-life across species (iCodon, Diez 2022)"),
    )
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Fetching


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, expected: str | None, spec: TaskSpec, delete: bool) -> None:
    if expected is None:
        return
    actual = _sha256(path)
    if actual != expected:
        if delete:
            path.unlink(missing_ok=True)
        raise DataError(
            f"{path}: sha256 mismatch for task {spec.name!r}: expected {expected}, got {actual}"
            + (" (the file was deleted)" if delete else "; is it a modified copy?")
        )


def fetch_task(
    name: str | TaskSpec,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Path of a task's file, verified against its checksum; downloaded into the cache if needed.

    Looks in `data_dir` (default ``$HELM_DATA_DIR``) for ``<file>`` or ``<any folder>/<file>``, then
    in the cache, then downloads ``spec.url`` to a temporary file in the cache and renames it into
    place, so an interrupted download never leaves a file that looks complete.
    """
    spec = name if isinstance(name, TaskSpec) else TASKS.get(name)
    if spec is None:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    data_dir = data_dir or os.environ.get("HELM_DATA_DIR")
    if data_dir:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"data_dir {root} is not a directory")
        for path in [root / spec.file_name, *sorted(root.glob(f"*/{spec.file_name}"))]:
            if path.is_file():
                _check(path, spec.sha256, spec, delete=False)
                return path
    # $HELM_CACHE_DIR itself, else ~/.cache/helm/downstream.
    cache = Path(cache_dir) if cache_dir is not None else data_cache.cache_dir("downstream")
    path, record = cache / spec.file_name, cache / f"{spec.file_name}.sha256"
    expected = spec.sha256 or (record.read_text().strip() if record.is_file() else None)
    if path.is_file():
        _check(path, expected, spec, delete=True)
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, prefix=f".{spec.file_name}.", delete=False) as tmp:
        try:
            with urllib.request.urlopen(spec.url, timeout=60) as response:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    tmp.write(chunk)
        except (urllib.error.URLError, OSError) as err:
            tmp.close()
            Path(tmp.name).unlink(missing_ok=True)
            where = f" (looked in {data_dir})" if data_dir else ""
            raise DataError(
                f"could not download task {spec.name!r} from {spec.url}: {err}. Without network "
                f"access, pass --data_dir DIR holding a local copy of {spec.file_name}{where}"
            ) from err
    _check(Path(tmp.name), expected, spec, delete=True)
    os.replace(tmp.name, path)
    if expected is None:
        actual = _sha256(path)
        record.write_text(actual + "\n")
        logger.warning(
            "task %s: downloaded %s with sha256 %s (not pinned; recorded in %s)",
            spec.name, spec.file_name, actual, record,
        )  # fmt: skip
    return path


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class TaskData:
    """A loaded task: cleaned sequences, targets and optional fixed split and groups.

    `targets` is float (n,) or (n, k) for regression, int (n,) class ids for classification and
    0/1 float (n, k) for multilabel. `label_names` are the class names (classification: id i is
    ``label_names[i]``), the label names (multilabel) or the target columns (regression).
    """

    sequences: list[str]
    targets: np.ndarray
    task: str
    label_names: list[str]
    splits: np.ndarray | None = None  # "train" / "val" / "test" per record
    groups: np.ndarray | None = None
    folds: np.ndarray | None = None  # a fold column's value per record (k-fold, fold i = test)
    ids: list[str] = field(default_factory=list)
    source: str = ""
    report: ReadReport | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def num_outputs(self) -> int:
        """Width of a prediction head: classes, labels or regression targets."""
        if self.task == TaskType.CLASSIFICATION or self.targets.ndim == 2:
            return len(self.label_names)
        return 1

    def codon_sequences(self) -> list[str]:
        """Sequences cut to whole 3-mers (a trailing 1-2 nucleotides dropped), as fed to models."""
        return [s[: len(s) - len(s) % 3] for s in self.sequences]


def _header_fields(header: str, pipe_label: bool = False) -> dict[str, str]:
    """Fields of a FASTA header: the record id (its first word, whole: ``lcl|NC_000913.3_cds_1``
    stays one id) under ``id``, and every whitespace-separated ``key=value`` pair.

    A label is read only by an explicit rule: a ``key=value`` pair named as a column, or with
    `pipe_label` the text after the first word's last ``|`` (``>s1|0.3``) under the key ``label``.
    """
    first, _, rest = header.strip().partition(" ")
    fields = {"id": first}
    if pipe_label:
        record_id, bar, value = first.rpartition("|")
        if bar:
            fields["id"], fields["label"] = record_id, value
    for token in rest.split():
        k, eq, v = token.partition("=")
        if eq:
            fields[k] = v
    return fields


def _label_table(label_file: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Rows of a csv/tsv side file by record id (column ``id``, else the first column)."""
    header, rows = table_rows(label_file, gz=detect_format(label_file)[1], delimiter="sniff")
    header = header or []
    key = header.index("id") if "id" in header else 0
    return {row[key].strip(): dict(zip(header, (c.strip() for c in row))) for _, row in rows}


def load_task_file(
    path: str | os.PathLike,
    *,
    sequence_column: str = "Sequence",
    target_columns: str | tuple[str, ...] | list[str] = ("Value",),
    task: str = TaskType.REGRESSION,
    split_column: str | None = None,
    group_column: str | None = None,
    fmt: str | None = None,
    sep: str | None = None,
    on_invalid: str = "error",
    label_file: str | os.PathLike | None = None,
    require_codons: bool = False,
    pipe_label: bool = False,
    id_column: str | None = None,
    fold_column: str | None = None,
    region_columns: tuple[str, str] | None = None,
    region_base: int = 0,
) -> TaskData:
    """Read a labelled sequence file: csv, tsv or any delimited table, or FASTA; optionally ``.gz``.

    Tables need a header; `sep` forces the separator, otherwise it is sniffed; `id_column` names
    the records (default: an ``id`` column, else the line number). FASTA ids are the header's first word; labels come
    from ``key=value`` pairs of the header (``>id label=0.3``; other pairs serve as split or group
    columns), from ``>id|0.3`` with `pipe_label`, or from `label_file`. A folder of FASTA files,
    one per class, is read by `load_fasta_folder`. Records are read by `helm.data.io.iter_records` (cleaned:
    upper case, U read as T; validated); regression targets must be numbers; classification labels
    are mapped to ids in sorted order (numeric order when all are numbers); multilabel targets are
    several 0/1 columns or one column of ``;``-separated label names. Invalid records raise
    `DataError` naming file, line and reason (``on_invalid="skip"`` drops and counts them).

    `fold_column` names a column of fold labels (numbers or names; `protocol.make_splits` runs
    k-fold over them). `region_columns` (start, end) name columns that cut each record to the
    region it holds (a coding region within a transcript), `region_base` 0 for 0-based starts
    with exclusive ends (Python, BED), 1 for 1-based starts with inclusive ends (GenBank, GFF).
    """
    if task not in TASK_TYPES:
        raise ValueError(f"task must be one of {TASK_TYPES}, got {task!r}")
    targets = [target_columns] if isinstance(target_columns, str) else list(target_columns)
    others = [*targets, *filter(None, (split_column, group_column, fold_column))]
    others += list(region_columns or ())
    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"{path} is a folder: a folder of FASTA files, one per class, is read as a "
            "classification task (load_fasta_folder; --file DIR --task-type classification)"
        )
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if id_column is not None and id_column not in others:
        others.append(id_column)
    if fmt is None:
        try:
            fmt = detect_format(path)[0]
        except DataError:
            fmt = "table"  # an unknown extension (.psv, .dat, ...) is read as a delimited table
    gz = ".gz" if path.name.lower().endswith(".gz") else ""
    fasta = fmt == FileFormat.FASTA
    side = _label_table(label_file) if fasta and label_file is not None else None

    def fields_of(record: Record) -> dict[str, str]:
        if not fasta:
            return record.fields
        fields = _header_fields(record.header, pipe_label)
        if side is not None:
            fields.update(side.get(fields["id"], {}))
        return fields

    def check(record: Record) -> tuple[str, str] | None:
        """The task's own reasons to drop a record (its sequence is validated by the reader)."""
        if side is not None:
            record_id = _header_fields(record.header, pipe_label)["id"]
            if record_id not in side:
                return "missing label", f"id {record_id!r} not in {label_file}"
        fields = fields_of(record)
        absent = [c for c in others if c not in fields]
        if absent:
            return "missing field", ", ".join(absent)
        values = [fields[c].strip() for c in targets]
        empty = [c for c, v in zip(targets, values) if not v]
        if empty and task != TaskType.MULTILABEL:
            return "empty target", f"column {empty[0]}"
        if task == TaskType.REGRESSION:
            bad = next((v for v in values if not _is_float(v)), None)
            if bad is not None:
                return "non-numeric target", repr(bad)
        if split_column is not None and fields[split_column].strip().lower() not in SPLIT_STEMS:
            value = fields[split_column].strip()
            hint = "; a column of fold numbers is read by --fold-column" if value.isdigit() else ""
            return "unknown split", repr(value) + hint
        if fold_column is not None and not fields[fold_column].strip():
            return "missing fold", f"column {fold_column}"
        if region_columns is not None:
            where = region(fields, len(clean_sequence(record.sequence)))
            if isinstance(where, str):
                return "bad region", where
        return None

    def region(fields: dict[str, str], length: int) -> tuple[int, int] | str:
        """The [start, end) slice of the record that `region_columns` give, else why not."""
        cells = [fields[c].strip() for c in region_columns]
        if not all(c.lstrip("-").isdigit() for c in cells):
            return f"{region_columns[0]}, {region_columns[1]} = {cells} are not whole numbers"
        start, end = int(cells[0]) - region_base, int(cells[1])
        if not 0 <= start < end <= length:
            base = "1-based, end inclusive" if region_base else "0-based, end exclusive"
            return (
                f"{region_columns[0]} {cells[0]}, {region_columns[1]} {cells[1]} is not a region "
                f"of its {length} nt (read {base}: --region-base)"
            )
        return start, end

    report = ReadReport(str(path))
    seqs, raw_targets, split_values, group_values, ids, folds = [], [], [], [], [], []
    framed = [0, 0]  # regions that look like coding regions as given, and with the other base
    for record in iter_records(
        path,
        column_name=None if fasta else sequence_column,
        on_invalid=on_invalid,
        file_extension=f"{FileFormat.FASTA if fasta else fmt if fmt == FileFormat.TSV else FileFormat.CSV}{gz}",
        require_codons=require_codons,
        report=report,
        columns=None if fasta else others,
        delimiter=None if fasta else sep or "sniff",
        check=check,
    ):
        fields = fields_of(record)
        seq = record.sequence
        if region_columns is not None:
            start, end = region(fields, len(seq))
            # The other convention reads the same numbers one nucleotide apart at the start.
            other = start - 1 if region_base == 0 else start + 1
            framed[0] += _looks_coding(seq[start:end])
            framed[1] += other >= 0 and _looks_coding(seq[other:end])
            seq = seq[start:end]
        seqs.append(seq)
        if fold_column is not None:
            folds.append(_canonical(fields[fold_column].strip()))
        raw_targets.append([fields[c].strip() for c in targets])
        if split_column is not None:
            split_values.append(SPLIT_STEMS[fields[split_column].strip().lower()])
        group_values.append(fields[group_column].strip() if group_column else None)
        if id_column is not None:
            ids.append(fields[id_column].strip())
        else:
            ids.append(fields.get("id", str(record.line)))
    if not seqs:
        raise DataError(f"{path}: no usable records")
    if framed[1] > max(framed[0], len(seqs) // 2):
        logger.warning(
            "%s: %d of %d regions start with ATG and hold whole codons when read %s, %d as read "
            "now: check --region-base", path, framed[1], len(seqs),
            "1-based, end inclusive (--region-base 1)" if region_base == 0
            else "0-based, end exclusive (--region-base 0)", framed[0],
        )  # fmt: skip
    y, names = _encode_targets(raw_targets, targets, task, path)
    return TaskData(
        sequences=seqs,
        targets=y,
        task=task,
        label_names=names,
        splits=np.array(split_values) if split_column else None,
        groups=np.array(group_values) if group_column else None,
        folds=np.array(folds) if fold_column else None,
        ids=ids,
        source=str(path),
        report=report,
    )


def _looks_coding(seq: str) -> bool:
    return seq.startswith("ATG") and len(seq) % 3 == 0


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.lower() not in ("nan", "inf", "-inf", "+inf")


def _sort_labels(labels: set[str]) -> list[str]:
    if all(_is_float(v) for v in labels):
        return sorted(labels, key=float)
    return sorted(labels)


def _encode_targets(
    values: list[list[str]], columns: list[str], task: str, path: Path
) -> tuple[np.ndarray, list[str]]:
    if task == TaskType.REGRESSION:
        y = np.array(values, dtype=np.float64)
        return (y[:, 0] if len(columns) == 1 else y), list(columns)
    if task == TaskType.CLASSIFICATION:
        if len(columns) != 1:
            raise DataError(f"{path}: classification takes one target column, got {columns}")
        # "1" and "1.0" are one class: numeric labels are compared by value.
        labels = [_canonical(v[0]) for v in values]
        names = _sort_labels(set(labels))
        index = {name: i for i, name in enumerate(names)}
        logger.info("%s: class labels -> ids %s", path, index)
        return np.array([index[v] for v in labels], dtype=np.int64), names
    if len(columns) > 1:
        try:
            y = np.array([[float(v) for v in row] for row in values])
        except ValueError as err:
            raise DataError(f"{path}: multilabel columns {columns} must hold 0/1: {err}") from None
        if not np.isin(y, (0.0, 1.0)).all():
            raise DataError(f"{path}: multilabel columns {columns} must hold only 0 or 1")
        return y, list(columns)
    sets = [{t.strip() for t in v[0].split(";") if t.strip()} for v in values]
    names = _sort_labels(set().union(*sets))
    y = np.array([[float(name in s) for name in names] for s in sets])
    return y, names


def _canonical(label: str) -> str:
    if _is_float(label) and float(label).is_integer():
        return str(int(float(label)))
    return label


FASTA_SUFFIXES = (".fasta", ".fa", ".fna", ".ffn", ".fas")


def _fasta_label(path: Path) -> str | None:
    """The class a FASTA file names (its name less the FASTA and ``.gz`` suffixes), else None."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    for suffix in FASTA_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def load_fasta_folder(
    root: str | os.PathLike, *, on_invalid: str = "error", require_codons: bool = False
) -> TaskData:
    """A classification task from a folder holding one FASTA file per class.

    The file name less its suffixes is the label (``human.fa.gz`` -> ``human``); record ids are
    the headers' first words, and headers carry no label. When the folder has sub-folders named
    like splits (``train/``, ``val/``, ``test/``; synonyms as in `helm.data.splits.SPLIT_STEMS`),
    each holds one file per class and sets the records' split; a folder with only ``train/`` and
    ``test/`` needs validation carved from train (`make_splits(val_from_train=...)`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    parts = {
        SPLIT_STEMS[d.name.lower()]: d
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name.lower() in SPLIT_STEMS
    }
    order = ("train", "val", "test")
    folders = sorted(parts.items(), key=lambda kv: order.index(kv[0])) if parts else [(None, root)]
    seqs, labels, split_values, ids = [], [], [], []
    reports = ReadReport(str(root))
    for split, folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and _fasta_label(p) is not None)
        if not files:
            raise DataError(f"{folder}: no FASTA files (.fasta, .fa, .fna; optionally .gz)")
        for path in files:
            report = ReadReport(str(path))
            for record in iter_records(
                path,
                on_invalid=on_invalid,
                file_extension="fasta.gz" if path.name.lower().endswith(".gz") else "fasta",
                require_codons=require_codons,
                report=report,
            ):
                seqs.append(record.sequence)
                labels.append([_fasta_label(path)])
                split_values.append(split)
                ids.append(record.id)
            reports.num_records += report.num_records
            reports.num_valid += report.num_valid
            for reason, count in report.invalid.items():
                reports.invalid[reason] = reports.invalid.get(reason, 0) + count
    if not seqs:
        raise DataError(f"{root}: no usable records")
    y, names = _encode_targets(labels, ["class"], TaskType.CLASSIFICATION, root)
    logger.info("%s: %d records of %d classes from file names", root, len(seqs), len(names))
    return TaskData(
        sequences=seqs,
        targets=y,
        task=TaskType.CLASSIFICATION,
        label_names=names,
        splits=np.array(split_values) if parts else None,
        ids=ids,
        source=str(root),
        report=reports,
    )


TARGET_TRANSFORMS = ("none", "log", "log1p")


def transform_targets(data: TaskData, transform: str) -> TaskData:
    """Regression targets through ``log`` (all must be > 0) or ``log1p`` (all > -1); ``none``
    returns `data` itself. Heavy-tailed targets (copies per cell) are then fitted and scored on
    the log scale: Spearman is unchanged, Pearson, R^2 and RMSE are those of the log values."""
    if transform not in TARGET_TRANSFORMS:
        raise ValueError(f"target transform must be one of {TARGET_TRANSFORMS}, got {transform!r}")
    if transform == "none":
        return data
    if data.task != TaskType.REGRESSION:
        raise DataError(f"a target transform ({transform}) applies to regression, not {data.task}")
    floor = 0.0 if transform == "log" else -1.0
    bad = np.flatnonzero((data.targets <= floor).reshape(len(data), -1).any(axis=1))
    if len(bad):
        first = ", ".join(data.ids[i] if data.ids else str(i) for i in bad[:3])
        raise DataError(
            f"{data.source}: {transform} needs targets > {floor:g}; {len(bad)} record(s) are not "
            f"(first: {first})" + ("; log1p takes zeros" if transform == "log" else "")
        )
    fn = np.log if transform == "log" else np.log1p
    return TaskData(**{**data.__dict__, "targets": fn(data.targets)})


def input_sha256(path: str | os.PathLike) -> str:
    """sha256 of a task's input: the file, or for a folder the sorted (relative name, file hash)
    list of every file beneath it."""
    path = Path(path)
    if path.is_file():
        return _sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()}\t{_sha256(f)}\n".encode())
    return digest.hexdigest()


def load_task(
    name: str | TaskSpec,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    on_invalid: str = "error",
) -> TaskData:
    """Fetch a registered task and load it with its registry columns.

    Lengths are not required to be whole codons even for coding sets: like CodonBERT, every record
    is kept and cut into 3-mers (`TaskData.codon_sequences`), so results stay comparable.
    """
    spec = name if isinstance(name, TaskSpec) else TASKS[name]
    return load_task_file(
        fetch_task(spec, data_dir, cache_dir),
        sequence_column=spec.sequence_column,
        target_columns=spec.target_columns,
        task=spec.task,
        split_column=spec.split_column,
        on_invalid=on_invalid,
    )
