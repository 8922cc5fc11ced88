"""The downstream experiment: one model on one task, probed (or finetuned) with the paper's protocol
beside the baselines, on the same splits; ``eval.py downstream`` and the paper reproduction call it.

    result = run_experiment("runs/x/checkpoints/best.pt", task="mlos", data_dir="tasks/")
    print(result.report())
    result.write("report.json")   # + report.md, report.svg

Every keyword is the ``eval.py downstream`` flag of the same name (``split_seeds`` is
``--split-seeds``). The result records each setting under its flag, the input's and the
checkpoint's sha256, the splits, the warnings (duplicates across splits, rare labels) and what
each method read of the records; ``result.duplicates`` what the duplicate policy found and did
(``helm.downstream.checks.resolve_duplicates``). Finished runs are stored in ``runs_file`` as
they end: after an interruption (``ExperimentInterrupted``) the same call continues from them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from helm.downstream.baselines import extent_text, format_report, run_baselines, to_json
from helm.downstream.checks import duplicate_warnings, label_warnings, resolve_duplicates
from helm.downstream.figure import write_figure
from helm.downstream.protocol import ProbeResult, evaluate_probe
from helm.downstream.runs import Grid, RunStore
from helm.downstream.splits import TaskSplit, repeated_splits
from helm.downstream.tasks import (
    TASKS,
    TaskData,
    TaskType,
    input_sha256,
    load_fasta_folder,
    load_task,
    load_task_file,
    transform_targets,
)
from helm.errors import ConfigError
from helm.fileio import write_text

log = logging.getLogger("helm")

# Settings that change a run's result key its stored result; the grid and seeds do not (each run
# carries its own), so a rerun with a wider grid reuses the runs it shares.
RUN_KEYS = ("ema", "target_transform", "long_seqs", "max_epochs", "patience",
            "backbone_lr_scale", "baseline_input", "duplicates", "head", "finetune",
            "sequence_column", "target_column", "region_columns", "region_base")  # fmt: skip


class ExperimentInterrupted(KeyboardInterrupt):
    """Ctrl-C during the search; ``kept`` finished runs are in ``runs_file`` for a rerun."""

    def __init__(self, kept: int, runs_file: Path | None):
        super().__init__(
            f"{kept} finished runs are kept in {runs_file} and the same command continues from them"
            if runs_file is not None
            else "no run had finished"
        )
        self.kept, self.runs_file = kept, runs_file


@dataclass
class ExperimentResult:
    """The methods' results on the task, and the task's description (``info``: the report's and
    the JSON's ``task`` block)."""

    results: dict[str, ProbeResult]
    info: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    duplicates: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.info["name"])

    @property
    def model_method(self) -> str:
        """The model's entry in ``results`` (the first; the baselines follow)."""
        return next(iter(self.results))

    def report(self) -> str:
        """Markdown: methods x metrics, the chosen hyperparameters and the warnings."""
        return format_report(self.results, self.info, self.warnings, self.duplicates)

    def to_json(self) -> str:
        return to_json(self.results, self.info, duplicates=self.duplicates)

    def write(self, out: str | Path) -> list[Path]:
        """``out`` (JSON) with the report (``.md``) and the figure (``.svg``) beside it."""
        out = Path(out)
        write_text(out, self.to_json() + "\n", what="results")
        write_text(out.with_suffix(".md"), self.report(), what="report")
        write_figure({self.name: self.results}, out.with_suffix(".svg"), title=self.name)
        return [out, out.with_suffix(".md"), out.with_suffix(".svg")]


def run_experiment(
    checkpoint: str | Path,
    *,
    task: str | None = None,
    file: str | Path | None = None,
    data_dir: str | Path | None = None,
    sequence_column: str = "Sequence",
    target_column: Sequence[str] = ("Value",),
    task_type: str | None = None,
    header_label: str = "none",
    target_transform: str = "none",
    split_column: str | None = None,
    group_column: str | None = None,
    fold_column: str | None = None,
    region_columns: str | Sequence[str] | None = None,
    region_base: int = 0,
    split: tuple[float, float, float] | None = None,
    kfold: int | None = None,
    val_from_train: float | None = None,
    split_seeds: Sequence[int] | None = None,
    duplicates: str | None = None,
    on_invalid: str = "error",
    head: str = "textcnn",
    finetune: bool = False,
    backbone_lr_scale: float = 0.1,
    lrs: Sequence[float] = Grid.lrs,
    batch_sizes: Sequence[int] = Grid.batch_sizes,
    seeds: Sequence[int] = Grid.seeds,
    max_epochs: int = Grid.max_epochs,
    patience: int = Grid.patience,
    long_seqs: str = "truncate",
    baselines: bool = True,
    baseline_input: str = "same",
    feature_batch_size: int = 32,
    feature_cache: str | Path | None = None,
    ema: bool = False,
    device: str = "auto",
    runs_file: str | Path | None = None,
) -> ExperimentResult:
    """Probe (or finetune) the model at ``checkpoint`` on a registered ``task`` or a ``file``; see
    the module docstring, and ``eval.py downstream --help`` for each keyword."""
    from helm.hf import load_model

    settings = {flag(k): str(v) if isinstance(v, Path) else v
                for k, v in locals().items() if k in PARAMETERS}  # fmt: skip
    if finetune and long_seqs == "window":
        raise ConfigError(
            "--long-seqs window does not apply to --finetune: windows average frozen features, "
            "while finetuning trains on one model input per record. Drop --long-seqs (records "
            "longer than the model are cut to its max_seq_len), or probe frozen features instead"
        )
    if backbone_lr_scale < 0:
        raise ConfigError("--backbone-lr-scale must be >= 0")
    grid = Grid(lrs, batch_sizes, seeds, max_epochs, patience)
    if kfold is not None and split is not None:
        raise ConfigError("--kfold and --split are alternatives: give one")
    if fold_column is not None and (split_column is not None or split is not None):
        raise ConfigError("--fold-column places every record: drop --split-column and --split")
    data, info = load_data(
        task, file, data_dir=data_dir, sequence_column=sequence_column,
        target_column=target_column, task_type=task_type, header_label=header_label,
        split_column=split_column, group_column=group_column, fold_column=fold_column,
        region_columns=region_columns, region_base=region_base, on_invalid=on_invalid,
    )  # fmt: skip
    data = transform_targets(data, target_transform)
    loaded = load_model(checkpoint, ema=ema, device=device)
    reading = model_input(loaded, data, long_seqs, finetune)

    # The spread: repeated random splits (or k-fold) by default, not only head seeds. Records
    # identical in what the model reads are kept apart (`resolve_duplicates`).
    from_file = data.folds is not None or (kfold is None and data.splits is not None and not split)
    many = (not from_file and kfold is None) or val_from_train is not None
    split_seeds = list(split_seeds or ([0, 1, 2] if many else [0]))
    settings["--split-seeds"] = split_seeds
    splits, dup = resolve_duplicates(
        data,
        lambda d: repeated_splits(d, split_seeds, fractions=split, kfold=kfold,
                                  use_split_column=split is None, val_from_train=val_from_train),
        duplicates, fixed=from_file, carved=val_from_train is not None, seen=reading.seen,
        reads=reading.extent,
    )  # fmt: skip
    settings["--duplicates"] = dup["policy"]
    warnings = duplicate_warnings(data, splits) + label_warnings(data, splits)
    for line in warnings:
        log.warning("%s", line)
    log.info("%d records, splits: %s", len(data), ", ".join(map(repr, splits)))
    identity = {
        "path": str(checkpoint),
        "sha256": input_sha256(checkpoint),
        "weights": "ema" if ema else "raw",
        "model_name": loaded.model_name,
        "epoch": loaded.checkpoint.get("epoch"),
        "step": loaded.checkpoint.get("step"),
        **{k: loaded.config.get(k) for k in ("mode", "loss", "hxe_alpha", "hierarchy")},
    }
    info |= {"input_sha256": input_sha256(info["file"]), "checkpoint": identity}
    store = None
    if runs_file is not None:
        store = RunStore(
            runs_file,
            context={"input_sha256": info["input_sha256"], "checkpoint_sha256": identity["sha256"],
                     **{flag(k): settings[flag(k)] for k in RUN_KEYS}},
        )  # fmt: skip
        if len(store):
            log.info("%s: %d finished runs from an earlier start are reused", runs_file, len(store))

    device_name = str(next(loaded.model.parameters()).device)
    try:
        name, result, setup = probe_or_finetune(
            loaded, reading, data, splits, grid=grid, head=head, finetune=finetune,
            backbone_lr_scale=backbone_lr_scale, feature_batch_size=feature_batch_size,
            feature_cache=feature_cache, checkpoint=checkpoint, ema=ema, long_seqs=long_seqs,
            device=device_name, store=store,
        )  # fmt: skip
        results = {name: result}
        if baselines:
            extent = reading.seen if baseline_input == "same" else None
            results |= run_baselines(
                data, splits, grid=grid, device=device_name, extent=extent, store=store
            )
    except KeyboardInterrupt:
        kept, path = (len(store), store.path) if store is not None else (0, None)
        raise ExperimentInterrupted(kept, path) from None
    info |= {
        "head": head,
        **setup,
        "model_input": "sequences cut into consecutive 3-mers from the first nucleotide, a "
        "trailing partial 3-mer dropped (TaskData.codon_sequences), as CodonBERT did; "
        f"{reading.extent}",
        "input_extent": {m: r.input for m, r in results.items()},
        "long_seqs": long_seqs,
        "records_longer_than_model": reading.longer,
        "target_transform": target_transform,
        "splits": [repr(s) for s in splits],
        "split_seeds": split_seeds,
        "settings": {"CKPT": str(checkpoint), **settings},
        "warnings": warnings,
    }
    return ExperimentResult(results, info, warnings, dup)


PARAMETERS = tuple(p for p in inspect.signature(run_experiment).parameters if p != "runs_file")


def flag(keyword: str) -> str:
    """The ``eval.py downstream`` flag of a keyword (every flag also takes underscores)."""
    return "--" + keyword.replace("_", "-")


def load_data(
    task: str | None,
    file: str | Path | None,
    *,
    data_dir,
    sequence_column: str,
    target_column: Sequence[str],
    task_type: str | None,
    header_label: str,
    split_column: str | None,
    group_column: str | None,
    on_invalid: str,
    fold_column: str | None = None,
    region_columns: str | Sequence[str] | None = None,
    region_base: int = 0,
) -> tuple[TaskData, dict[str, Any]]:
    """(TaskData, the task's description) of a registered ``task`` or a ``file``; a folder is read
    as FASTA files, one per class (``load_fasta_folder``)."""
    if (task is None) == (file is None):
        raise ConfigError("name a registered --task or give a --file (one of the two)")
    columns = {"--fold-column": fold_column, "--region-columns": region_columns}
    if (task is not None or Path(file).is_dir()) and any(columns.values()):
        given = ", ".join(k for k, v in columns.items() if v)
        raise ConfigError(f"{given} read columns of a table or FASTA headers given as --file")
    if isinstance(region_columns, str):  # the flag's START,END
        region_columns = [c.strip() for c in region_columns.split(",")]
    if region_columns is not None and (len(region_columns) != 2 or not all(region_columns)):
        raise ConfigError(
            f"--region-columns takes two column names START,END, got {region_columns}"
        )
    if region_base not in (0, 1):
        raise ConfigError("--region-base is 0 (0-based, end exclusive) or 1 (1-based, inclusive)")
    if task is not None:
        spec = TASKS.get(task)
        if spec is None:
            raise ConfigError(f"unknown --task {task!r}; known tasks: {', '.join(TASKS)}")
        data = load_task(spec, data_dir=data_dir, on_invalid=on_invalid)
        return data, {"name": spec.name, "task": spec.task, "description": spec.description,
                      "coding": spec.coding, "file": data.source}  # fmt: skip
    if Path(file).is_dir():
        if task_type not in (None, TaskType.CLASSIFICATION):
            raise ConfigError(
                f"--file {file} is a folder of FASTA files, one per class: a classification "
                f"task, not {task_type}"
            )
        data = load_fasta_folder(file, on_invalid=on_invalid)
        return data, {"name": Path(file).name, "task": TaskType.CLASSIFICATION, "coding": None,
                      "file": str(file), "labels": "file names"}  # fmt: skip
    kind = TaskType(task_type or TaskType.REGRESSION)
    data = load_task_file(
        file, sequence_column=sequence_column, target_columns=list(target_column), task=kind,
        split_column=split_column, group_column=group_column, on_invalid=on_invalid,
        pipe_label=header_label == "pipe", fold_column=fold_column,
        region_columns=tuple(region_columns) if region_columns else None, region_base=region_base,
    )  # fmt: skip
    return data, {"name": str(file), "task": kind, "coding": None, "file": str(file)}


@dataclass
class ModelInput:
    """What the model reads of each record: token ids, nucleotides seen, and how many are cut."""

    sequences: list[str]
    token_ids: list[np.ndarray]
    seen: list[int]
    longer: int
    extent: str


def model_input(loaded, data: TaskData, long_seqs: str, finetune: bool) -> ModelInput:
    """Coding and non-coding sets alike are cut into consecutive 3-mers (CodonBERT); records longer
    than the model's window are truncated unless windowed (probes only)."""
    from helm.embed import window_capacity
    from helm.vocab import translate

    model, tokenizer = loaded.model, loaded.tokenizer
    seqs = data.codon_sequences()
    full = [len(s) for s in seqs]
    if tokenizer.data_type == "aa":
        seqs = [translate(s) for s in seqs]
    token_ids = tokenizer.encode_batch(seqs)
    capacity = window_capacity(model.cfg.max_seq_len, not model.cfg.bidirectional)
    longer = sum(len(t) > capacity for t in token_ids)
    if long_seqs == "window" and not finetune:
        seen = full
    elif tokenizer.data_type == "aa" or tokenizer.is_codon:
        seen = [min(n, 3 * capacity) for n in full]
    else:
        seen = [len(tokenizer.decode(t[:capacity])) if len(t) > capacity else n
                for t, n in zip(token_ids, full)]  # fmt: skip
    if longer:
        log.info("%d of %d records exceed the model's %d tokens: --long-seqs %s",
                 longer, len(token_ids), capacity, long_seqs)  # fmt: skip
    return ModelInput(seqs, token_ids, seen, longer, extent_text(seen, full))


def probe_or_finetune(
    loaded,
    reading: ModelInput,
    data: TaskData,
    splits: Sequence[TaskSplit],
    *,
    grid: Grid,
    head: str,
    finetune: bool,
    backbone_lr_scale: float,
    feature_batch_size: int,
    feature_cache,
    checkpoint,
    ema: bool,
    long_seqs: str,
    device: str,
    store: RunStore | None,
) -> tuple[str, ProbeResult, dict[str, Any]]:
    """(method name, result, what the setup was) of the model on the task: a probe on frozen
    per-token features (cached on disk per checkpoint, weights, sequences and long-seqs mode), or
    the whole model finetuned with the head."""
    from helm.downstream.finetune import evaluate_finetune
    from helm.embed import cached_token_features, extract, feature_key
    from helm.hf import weights_file

    prefix = f"{loaded.model_name}_{loaded.config['mode']}"
    if finetune:
        name = f"{prefix}_finetune_{head}"
        result = evaluate_finetune(
            loaded.model, reading.token_ids, data, splits, grid=grid, head=head,
            backbone_lr_scale=backbone_lr_scale, eval_batch_size=feature_batch_size,
            device=device, method=name, store=store, input=reading.extent,
        )  # fmt: skip
        setup = {
            "training": "backbone and head finetuned together (AdamW; backbone lr = head lr "
            f"x {backbone_lr_scale:g}); the head reads the last hidden states at each token",
            "backbone_lr_scale": backbone_lr_scale,
        }
        return name, result, setup
    key = feature_key(
        weights_file(checkpoint), reading.sequences, ema=ema, long_seqs=long_seqs,
        autocast=device.startswith("cuda"),
    )  # fmt: skip
    features = cached_token_features(
        key,
        lambda: extract(
            loaded.model,
            reading.token_ids,
            long_seqs=long_seqs,
            batch_size=feature_batch_size,
            device=device,
        ),  # fmt: skip
        feature_cache,
    )
    name = f"{prefix}_{head}"
    result = evaluate_probe(
        features, data, splits, grid=grid, head=head, device=device, method=name, store=store,
        input=reading.extent,
    )  # fmt: skip
    return name, result, {"features": "last hidden states of the frozen backbone at each token"}
