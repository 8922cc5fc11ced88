"""Downstream evaluation: property-prediction tasks probed on frozen backbone features, or the
whole model finetuned (`evaluate_finetune`) under the same protocol.

Typical use (``extract`` maps sequences to per-token (T_i, D) hidden states)::

    data = load_task("tc_riboswitches", data_dir=...)
    splits = make_splits(data)
    features = extract(data.codon_sequences())
    results = {"helm": evaluate_probe(features, data, splits)}
    results |= run_baselines(data, splits)
    print(format_report(results, TASKS["tc_riboswitches"]))
    write_figure({"tc_riboswitches": results}, "report.svg")

Importing the package is light (no torch, for the command line): each name below loads its
submodule on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule of helm.downstream
_LAZY = {
    "BASELINES": "baselines",
    "extent_text": "baselines",
    "format_report": "baselines",
    "run_baselines": "baselines",
    "to_json": "baselines",
    "dedupe": "checks",
    "duplicate_groups": "checks",
    "duplicate_warnings": "checks",
    "duplicates": "checks",
    "resolve_duplicates": "checks",
    "label_warnings": "checks",
    "write_figure": "figure",
    "evaluate_finetune": "finetune",
    "OneHotEncoder": "heads",
    "TextCNN": "heads",
    "codon_frequency_features": "heads",
    "pad_features": "heads",
    "PRIMARY": "metrics",
    "compute_metrics": "metrics",
    "ProbeResult": "protocol",
    "TaskSplit": "splits",
    "evaluate_pooled": "protocol",
    "evaluate_probe": "protocol",
    "make_splits": "splits",
    "repeated_splits": "splits",
    "select_at_best_val": "protocol",
    "Grid": "runs",
    "RunStore": "runs",
    "TASKS": "tasks",
    "TaskData": "tasks",
    "TaskSpec": "tasks",
    "fetch_task": "tasks",
    "input_sha256": "tasks",
    "load_fasta_folder": "tasks",
    "load_task": "tasks",
    "load_task_file": "tasks",
    "transform_targets": "tasks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'helm.downstream' has no attribute {name!r}")
    return getattr(importlib.import_module(f"helm.downstream.{_LAZY[name]}"), name)
