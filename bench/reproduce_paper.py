#!/usr/bin/env python
"""Reproduce the paper's comparison: one recipe trained with XE, HXE (alpha 0.2, 0.4, 0.6) and HXE
on a random codon tree, on one corpus cleaned of every downstream sequence, then all five probed on
the downstream tasks with the paper's protocol and the baselines; one table and one figure.

    python bench/reproduce_paper.py --scale smoke --out runs/paper-smoke           # CPU, < 1 min
    python bench/reproduce_paper.py --scale gpu --out runs/paper-gpu \\
        --corpus /path/to/yeast_cds.fa.gz --data_dir /path/to/codonbert_tasks        # one H100

Scales (`SCALES`): ``smoke`` trains a 2-layer GPT-2 (d 32) for one epoch on the built-in demo corpus
and probes one small synthetic task (GC content of demo-like sequences, some of them also in the
corpus, so the cleaning is exercised) with 1 lr, 1 batch size, 1 head seed and 2 epochs. ``gpu``
trains a 4-layer GPT-2 MLM (d 256, 512 tokens) for 2 epochs on `--corpus` and probes the four
registry tasks found in `--data_dir` (mrfp_expression, cov_vaccine_degradation, tc_riboswitches,
mlos) with lrs 1e-3 3e-4, batch 32, head seeds 0 1 2, 30 epochs, patience 5 (the paper's full grid
is ``--lrs 3e-4 1e-4 1e-5 --batch-sizes 8 16 32 64``; pass ``--paper-grid`` for it).

Cleaning: a pretraining record is dropped when its sequence, normalised like the downstream ones
(upper case, U read as T, a final stop codon dropped), equals a downstream sequence so normalised.
Writes under `--out`: ``corpus.fasta`` (the cleaned corpus), one run folder per variant, one
``<variant>/<task>.json`` report each (with ``.md``, ``.svg``, ``.runs.jsonl``: a rerun continues),
and ``report.md`` (the table: methods x tasks, mean ± sd) with ``report.svg`` (the figure).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helm.data.demo import demo_sequences  # noqa: E402
from helm.data.io import iter_records  # noqa: E402
from helm.downstream import TASKS, ProbeResult, load_task, write_figure  # noqa: E402
from helm.downstream.experiment import run_experiment  # noqa: E402
from helm.vocab import STOP, genetic_code  # noqa: E402

log = logging.getLogger("helm")

VARIANTS = {
    "xe": ["--loss", "XE"],
    "hxe_0.2": ["--loss", "HXE", "--hxe-alpha", "0.2"],
    "hxe_0.4": ["--loss", "HXE", "--hxe-alpha", "0.4"],
    "hxe_0.6": ["--loss", "HXE", "--hxe-alpha", "0.6"],
    "hxe_0.2_random_tree": ["--loss", "HXE", "--hxe-alpha", "0.2", "--hierarchy", "random"],
}
SCALES = {
    "smoke": {
        "train": ["--model_name", "gpt2", "--mode", "mlm", "--num_layers", "2", "--hidden_size",
                  "32", "--num_heads", "2", "--intermediate_size", "64", "--max_seq_len", "48",
                  "--batch_size", "8", "--num_samples", "96", "--epochs", "1", "--warmup-epochs",
                  "0", "--lr", "3e-3", "--num_workers", "0", "--accelerator", "cpu"],
        "eval": dict(lrs=[1e-3], batch_sizes=[16], seeds=[0], max_epochs=2, patience=2,
                     device="cpu"),
        "tasks": ["gc_content"],
    },
    "gpu": {
        "train": ["--model_name", "gpt2", "--mode", "mlm", "--num_layers", "4", "--hidden_size",
                  "256", "--num_heads", "4", "--intermediate_size", "1024", "--max_seq_len", "512",
                  "--batch_size", "64", "--epochs", "2", "--warmup-epochs", "0", "--lr", "1e-3",
                  "--amp", "--num_workers", "4"],
        "eval": dict(lrs=[1e-3, 3e-4], batch_sizes=[32], seeds=[0, 1, 2], max_epochs=30,
                     patience=5),
        "tasks": ["mrfp_expression", "cov_vaccine_degradation", "tc_riboswitches", "mlos"],
    },
}  # fmt: skip
STOPS = {c for c, aa in genetic_code().items() if aa == STOP}


def load_script(name: str):
    """train.py as a module, so each run trains in this process."""
    spec = importlib.util.spec_from_file_location(f"helm_{Path(name).stem}_script", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def normalise(seq: str) -> str:
    """Upper case, U read as T, a final stop codon dropped: how sequences are compared."""
    seq = seq.upper().replace("U", "T")
    return seq[:-3] if len(seq) % 3 == 0 and seq[-3:] in STOPS else seq


def smoke_task(out: Path, corpus: list[str]) -> Path:
    """A small regression task (GC content) whose first 20 records are corpus sequences, written
    the way downstream sets are (final stop dropped, RNA letters), and 40 new ones."""
    seqs = [normalise(s).replace("T", "U") for s in corpus[:20]] + demo_sequences(40, seed=11)
    rows = ["Sequence,Value"] + [f"{s},{(s.count('G') + s.count('C')) / len(s):.5f}" for s in seqs]
    path = out / "gc_content.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def clean_corpus(corpus: Path, downstream: list[str], out: Path) -> tuple[int, int]:
    """Write `corpus` less the records found in `downstream` to `out` (FASTA); (kept, dropped)."""
    banned = {normalise(s) for s in downstream}
    kept = dropped = 0
    with open(out, "w") as f:
        for record in iter_records(corpus, on_invalid="skip"):
            if normalise(record.sequence) in banned:
                dropped += 1
                continue
            kept += 1
            f.write(f">{record.id}\n{record.sequence}\n")
    return kept, dropped


def table(results: dict[str, dict[str, ProbeResult]]) -> str:
    """Markdown: one row per method, one column per task (primary metric, mean ± sd)."""
    tasks = list(results)
    found = {m for t in tasks for m in results[t]}
    methods = [m for m in VARIANTS if m in found] + sorted(found - set(VARIANTS))
    head = [f"{t} ({next(iter(results[t].values())).metric})" for t in tasks]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in methods:
        cells = []
        for t in tasks:
            r = results[t].get(m)
            sd = f" ± {r.std:.3f}" if r is not None and len(r.values) > 1 else ""
            cells.append("" if r is None else f"{r.mean:.3f}{sd} (n={len(r.values)})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    parser.add_argument("--out", default="runs/paper", help="folder for everything written")
    parser.add_argument("--corpus", default=None, help="pretraining file (smoke: the demo corpus)")
    parser.add_argument("--data_dir", default=None, help="folder with the registry task files")
    parser.add_argument("--tasks", nargs="+", default=None, help="registry tasks (gpu scale)")
    parser.add_argument("--paper-grid", action="store_true", help="the paper's full probe grid")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_script("train.py")

    # Downstream sets, and the corpus cleaned of them.
    if args.scale == "smoke":
        raw = out / "demo_corpus.fasta"
        corpus_seqs = demo_sequences(300, seed=0)
        raw.write_text("".join(f">demo{i}\n{s}\n" for i, s in enumerate(corpus_seqs)))
        tasks = {"gc_content": dict(file=str(smoke_task(out, corpus_seqs)), split_seeds=[0])}
    else:
        if args.corpus is None or args.data_dir is None:
            parser.error("--scale gpu needs --corpus and --data_dir")
        raw = Path(args.corpus)
        names = args.tasks or scale["tasks"]
        tasks = {t: dict(task=t, data_dir=args.data_dir) for t in names}
    downstream = []
    for name, where in tasks.items():
        data = load_task(TASKS[name], data_dir=args.data_dir) if name in TASKS else None
        downstream += (
            data.sequences
            if data
            else [r.sequence for r in iter_records(where["file"], column_name="Sequence")]
        )
    corpus = out / "corpus.fasta"
    kept, dropped = clean_corpus(raw, downstream, corpus)
    log.warning("corpus %s: kept %d records, dropped %d found in the downstream sets",
                raw, kept, dropped)  # fmt: skip

    # Pretraining: one run per variant, same recipe and corpus.
    for variant in args.variants:
        run = out / variant
        if not (run / "checkpoints" / "last.pt").is_file():
            code = train.main([*scale["train"], *VARIANTS[variant], "--train_file", str(corpus),
                               "--output", str(run)])  # fmt: skip
            if code != 0:
                return code

    # Probing: every variant on every task, baselines once per task.
    grid = dict(scale["eval"])
    if args.paper_grid:
        grid |= dict(lrs=[3e-4, 1e-4, 1e-5], batch_sizes=[8, 16, 32, 64])
    results: dict[str, dict[str, ProbeResult]] = {t: {} for t in tasks}
    for i, variant in enumerate(args.variants):
        for task, where in tasks.items():
            report = out / variant / f"{task}.json"
            experiment = run_experiment(
                out / variant / "checkpoints" / "last.pt", **where, **grid, baselines=i == 0,
                runs_file=report.with_suffix(".runs.jsonl"),
            )  # fmt: skip
            experiment.write(report)
            for name, r in experiment.results.items():
                method = variant if name == experiment.model_method else name
                results[task][method] = replace(r, method=method)
    text = (
        f"# HELM paper comparison, scale {args.scale}\n\nCorpus {raw}: {kept} records kept, "
        f"{dropped} dropped as downstream sequences. Test metric at the best validation epoch, "
        "mean ± sd (ddof 1) over splits x head seeds (n runs).\n\n" + table(results)
    )
    (out / "report.md").write_text(text)
    write_figure(results, out / "report.svg", title=f"HELM comparison ({args.scale})")
    print(text)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
