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
"""

from helm.downstream.baselines import (
    BASELINES,
    extent_text,
    format_report,
    run_baselines,
    to_json,
)
from helm.downstream.checks import dedupe, duplicate_warnings, duplicates, label_warnings
from helm.downstream.figure import write_figure
from helm.downstream.finetune import evaluate_finetune
from helm.downstream.heads import OneHotEncoder, TextCNN, codon_frequency_features, pad_features
from helm.downstream.metrics import PRIMARY, compute_metrics
from helm.downstream.protocol import (
    ProbeResult,
    TaskSplit,
    evaluate_pooled,
    evaluate_probe,
    make_splits,
    repeated_splits,
    select_at_best_val,
)
from helm.downstream.runs import RunStore
from helm.downstream.tasks import (
    TASKS,
    TaskData,
    TaskSpec,
    fetch_task,
    input_sha256,
    load_fasta_folder,
    load_task,
    load_task_file,
    transform_targets,
)

__all__ = [
    "BASELINES",
    "PRIMARY",
    "TASKS",
    "OneHotEncoder",
    "ProbeResult",
    "RunStore",
    "TaskData",
    "TaskSpec",
    "TaskSplit",
    "TextCNN",
    "codon_frequency_features",
    "compute_metrics",
    "dedupe",
    "duplicate_warnings",
    "duplicates",
    "evaluate_finetune",
    "evaluate_pooled",
    "evaluate_probe",
    "extent_text",
    "fetch_task",
    "format_report",
    "input_sha256",
    "label_warnings",
    "load_fasta_folder",
    "load_task",
    "load_task_file",
    "make_splits",
    "pad_features",
    "repeated_splits",
    "run_baselines",
    "select_at_best_val",
    "to_json",
    "transform_targets",
    "write_figure",
]
