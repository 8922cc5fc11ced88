"""No-pretraining baselines in the same harness and splits, and the markdown / JSON report.

- ``onehot_textcnn``: the TextCNN of `evaluate_probe` on one-hot codons (`OneHotEncoder`), so the
  only difference from a pretrained probe is where the token features come from;
- ``codon_freq``: 64 codon frequencies per sequence into ridge regression (classification and
  multilabel: L2 logistic regression), the penalty chosen on validation (`evaluate_pooled`).

Both read what the probe reads: given `extent` (nucleotides of each record the model saw, e.g.
its first ``max_seq_len - 2`` codons), the baselines read the same prefix; without it, whole
records. The report names every method's input, so the comparison is never between a truncated
model and a whole-sequence baseline without saying so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from helm.downstream.checks import duplicates_text
from helm.downstream.heads import OneHotEncoder, codon_frequency_features
from helm.downstream.metrics import LOWER_IS_BETTER
from helm.downstream.protocol import ProbeResult, evaluate_pooled, evaluate_probe
from helm.downstream.runs import PAPER_GRID, Grid, RunStore
from helm.downstream.splits import TaskSplit
from helm.downstream.tasks import TaskData, TaskSpec

BASELINES = ("onehot_textcnn", "codon_freq")


def run_baselines(
    data: TaskData,
    splits: Sequence[TaskSplit],
    *,
    methods: Sequence[str] = BASELINES,
    grid: Grid = PAPER_GRID,
    device: str = "cpu",
    progress: bool = True,
    extent: Sequence[int] | None = None,
    store: RunStore | None = None,
) -> dict[str, ProbeResult]:
    """Run the baselines named in `methods`; the one-hot TextCNN searches `grid` (`evaluate_probe`).

    `extent` gives the nucleotides of each record to read (what the probed model saw); None
    reads whole records. `store` keeps finished TextCNN runs for a rerun (`RunStore`).
    """
    unknown = sorted(set(methods) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {', '.join(BASELINES)}")
    seqs = data.codon_sequences()
    if extent is not None:
        if len(extent) != len(seqs):
            raise ValueError(f"{len(extent)} extents for {len(seqs)} records")
        seqs = [s[: int(n)] for s, n in zip(seqs, extent)]
    input = extent_text([len(s) for s in seqs], [len(s) for s in data.codon_sequences()])
    results = {}
    if "onehot_textcnn" in methods:
        results["onehot_textcnn"] = evaluate_probe(
            OneHotEncoder()(seqs),
            data,
            splits,
            grid=grid,
            device=device,
            progress=progress,
            method="onehot_textcnn",
            store=store,
            input=input,
        )
    if "codon_freq" in methods:
        x = codon_frequency_features(seqs)
        results["codon_freq"] = evaluate_pooled(x, data, splits, method="codon_freq", input=input)
    return results


def extent_text(seen: Sequence[int], full: Sequence[int]) -> str:
    """What a method read of the records, from nucleotides read and record lengths (3-mer cut):
    ``whole records``, or e.g. ``first 138 nt (46 codons); 12 of 40 records cut``."""
    cut = sum(s < f for s, f in zip(seen, full))
    if not cut:
        return "whole records"
    longest = max(seen)
    return f"first {longest} nt ({longest // 3} codons); {cut} of {len(full)} records cut"


# --------------------------------------------------------------------------------------------------
# Report


def _task_info(info: TaskSpec | TaskData | dict | str | None) -> dict:
    """A plain dict (name, task, description, coding) from whatever describes the task."""
    if isinstance(info, TaskSpec):
        return {
            "name": info.name,
            "task": info.task,
            "description": info.description,
            "coding": info.coding,
            "file": info.file_name,
        }
    if isinstance(info, TaskData):
        return {"name": info.source, "task": info.task, "coding": None}
    if isinstance(info, str):
        return {"name": info, "coding": None}
    return dict(info or {})


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "nan"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _chosen(result: ProbeResult) -> str:
    parts = []
    for c in result.chosen:
        params = ", ".join(
            f"{'batch' if k == 'batch_size' else k} {v:g}" for k, v in c.items() if k != "split"
        )
        if params not in parts:
            parts.append(params)
    return "; ".join(parts)


def _runs(result: ProbeResult) -> str:
    seeds = f" x {result.num_seeds} seeds" if result.num_seeds > 1 else ""
    splits = f"{result.num_splits} split{'s' if result.num_splits > 1 else ''}"
    return f"{len(result.values)} ({splits}{seeds})"


def format_report(
    results: dict[str, ProbeResult],
    task_spec_or_info: TaskSpec | TaskData | dict | str | None,
    warnings: Sequence[str] = (),
    duplicates: dict | None = None,
) -> str:
    """Markdown: one row per method with the primary test metric (mean ± sd over runs, ddof 1),
    the number of runs (splits x seeds), the method's input, the other metrics and the
    hyperparameters chosen on validation; per-label AUROCs of a multilabel task in a second
    table; what the duplicate policy found and did (`checks.resolve_duplicates`); then
    `warnings` (duplicates across splits, rare labels)."""
    info = _task_info(task_spec_or_info)
    first = next(iter(results.values()), None)
    metric = first.metric if first else "?"
    task = info.get("task") or (first.task if first else "?")
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    lines = [f"## Downstream task: {info.get('name', '?')}", ""]
    if info.get("description"):
        lines += [info["description"], ""]
    lines.append(
        f"{task}; primary metric {metric} ({direction} is better) on the test set at the epoch "
        "of best validation metric, mean ± sd (ddof 1) over splits and seeds."
    )
    if info.get("target_transform") not in (None, "none"):
        lines.append(f"Targets fitted and scored as {info['target_transform']}(target).")
    if info.get("coding") is False:
        lines.append(
            "Non-coding sequences: cut into consecutive 3-mers from the first nucleotide (a "
            "trailing partial 3-mer dropped), as CodonBERT did, and read with the codon vocabulary."
        )
    lines += [
        "",
        f"| method | {metric} | runs | input | other test metrics | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        others = ", ".join(
            f"{k} {_fmt(*v)}" for k, v in r.test_metrics.items() if k != r.metric and "/" not in k
        )
        lines.append(
            f"| {name} | {_fmt(r.mean, r.std)} | {_runs(r)} | {r.input or '?'} | {others} "
            f"| {_chosen(r)} |"
        )
    labels = sorted({k for r in results.values() for k in r.test_metrics if "/" in k})
    if labels:
        lines += ["", "| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for name, r in results.items():
            cells = [_fmt(*r.test_metrics[k]) if k in r.test_metrics else "" for k in labels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if duplicates:
        lines += ["", duplicates_text(duplicates)]
    if warnings:
        lines += ["", "Warnings:", *(f"- {w}" for w in warnings)]
    return "\n".join(lines) + "\n"


def _finite(obj):
    # JSON has no nan: undefined metrics (e.g. a correlation of constant predictions) become null.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def to_json(
    results: dict[str, ProbeResult],
    task_spec_or_info: TaskSpec | TaskData | dict | str | None = None,
    duplicates: dict | None = None,
) -> str:
    """The results, the task description and what the duplicate policy found and did as a JSON
    document (nan written as null)."""
    doc = {
        "task": _task_info(task_spec_or_info),
        "results": {name: r.to_dict() for name, r in results.items()},
    }
    if duplicates:
        doc["duplicates"] = duplicates
    return json.dumps(_finite(doc), indent=2)
