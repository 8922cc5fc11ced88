#!/usr/bin/env python
"""Reproduce the paper's comparison: one recipe trained with XE, HXE (alpha 0.2, 0.4, 0.6) and HXE
on a random codon tree, on one corpus cleaned of every downstream sequence, then all five probed on
the downstream tasks with the paper's protocol beside the same architecture left at its random
initialisation (``random_init``, the control that shows what pretraining adds) and the baselines;
one table, one results file and one figure, every number a mean ± sd.

    python bench/reproduce_paper.py --scale smoke --out runs/paper-smoke           # CPU, ~1 min
    python bench/reproduce_paper.py --scale gpu --out runs/paper-gpu \\
        --corpus /path/to/yeast_cds.fa.gz --data_dir /path/to/codonbert_tasks        # one H100

Spread: every task is split 3 times (split seeds 0 1 2; random 0.7/0.15/0.15 splits, identical
sequences kept on one side; ``--splits official`` keeps a registry task's published split instead),
each split is probed with every head seed, and each variant is pretrained once per training seed
(``--train-seeds``); a figure is the mean ± sd (ddof 1) over all those runs.

Scales (`SCALES`): ``smoke`` trains a 2-layer GPT-2 (d 32, 48 tokens) for one epoch on the built-in
demo corpus, once (training seed 0), and probes one synthetic task whose target is a function of
what the models read: the GC content of each record's first 138 nt (the models' window), 700
records, so each test set holds 105; the models with the linear probe, the one-hot TextCNN with
1 lr, 1 batch size, 1 head seed, 2 epochs. ``gpu`` trains a
4-layer GPT-2 MLM (d 256, 512 tokens) for 2 epochs on `--corpus` with training seeds 0 1 2 and
probes the four registry tasks found in `--data_dir` (mrfp_expression, cov_vaccine_degradation,
tc_riboswitches, mlos) with lrs 1e-3 3e-4, batch 32, head seeds 0 1 2, 30 epochs, patience 5 (the
paper's full grid is ``--lrs 3e-4 1e-4 1e-5 --batch-sizes 8 16 32 64``: ``--paper-grid``).

Cleaning: a pretraining record is dropped when its sequence, normalised like the downstream ones
(upper case, U read as T, a final stop codon dropped), equals a downstream sequence so normalised.
Writes under `--out`: ``corpus.fasta`` (the cleaned corpus), one run folder per variant and
training seed (``<variant>/seed<S>/``) with one ``<task>.json`` report each (with ``.md``, ``.svg``,
``.runs.jsonl``: a rerun continues), ``report.md`` (the table: methods x tasks, mean ± sd),
``results.json`` (one row per task and method: mean, sd, splits, seeds, runs; with the command,
date and device) and ``report.png`` (methods x tasks with error bars; needs matplotlib, in the dev
extra) beside ``report.svg``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helm.data.demo import demo_sequences  # noqa: E402
from helm.data.io import iter_records  # noqa: E402
from helm.downstream import TASKS, ProbeResult, load_task, write_figure  # noqa: E402
from helm.downstream.experiment import run_experiment  # noqa: E402
from helm.embed import window_capacity  # noqa: E402
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
        # The linear probe (ridge on mean-pooled states) keeps the smoke fast; the one-hot
        # TextCNN baseline still runs the TextCNN protocol.
        "eval": dict(head="linear", lrs=[1e-3], batch_sizes=[16], seeds=[0], max_epochs=2,
                     patience=2, device="cpu"),
        "tasks": ["gc_window"],
        "train_seeds": [0],
    },
    "gpu": {
        "train": ["--model_name", "gpt2", "--mode", "mlm", "--num_layers", "4", "--hidden_size",
                  "256", "--num_heads", "4", "--intermediate_size", "1024", "--max_seq_len", "512",
                  "--batch_size", "64", "--epochs", "2", "--warmup-epochs", "0", "--lr", "1e-3",
                  "--amp", "--num_workers", "4"],
        "eval": dict(lrs=[1e-3, 3e-4], batch_sizes=[32], seeds=[0, 1, 2], max_epochs=30,
                     patience=5),
        "tasks": ["mrfp_expression", "cov_vaccine_degradation", "tc_riboswitches", "mlos"],
        "train_seeds": [0, 1, 2],
    },
}  # fmt: skip
CONTROL = "random_init"  # the recipe's architecture at its seeded initialisation, not trained
SPLIT_SEEDS = [0, 1, 2]
SMOKE_RECORDS = 700  # 105 test records at 0.15: a chance Spearman has sd ~0.1, not ~0.35
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


def window_nt(train_args: list[str]) -> int:
    """Nucleotides of a record that a model of the recipe reads: its window of whole codons."""
    max_seq_len = int(train_args[train_args.index("--max_seq_len") + 1])
    causal = train_args[train_args.index("--mode") + 1] == "clm"
    return 3 * window_capacity(max_seq_len, causal)


def smoke_task(out: Path, corpus: list[str], window: int) -> Path:
    """A regression task whose target is the GC content of what the models and the baselines read:
    each record's first `window` nt (whole codons). `SMOKE_RECORDS` records; the first 20 are
    corpus sequences written the way downstream sets are (final stop dropped, RNA letters), so the
    corpus cleaning is exercised."""
    seqs = [normalise(s).replace("T", "U") for s in corpus[:20]]
    seqs += demo_sequences(SMOKE_RECORDS - len(seqs), seed=11)
    rows = ["Sequence,Value"]
    for s in seqs:
        read = s[: min(window, len(s) - len(s) % 3)]
        rows.append(f"{s},{(read.count('G') + read.count('C')) / len(read):.5f}")
    path = out / "gc_window.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def random_init(trained: Path, out: Path, seed: int) -> Path:
    """A checkpoint of `trained`'s architecture, tokenizer and config with the weights it starts
    from (seeded as train.py seeds them), untrained: what the probes get without pretraining."""
    from helm.checkpoint import load_checkpoint, save_checkpoint, seed_everything
    from helm.models import build_model, model_config

    if not out.is_file():
        ckpt = load_checkpoint(trained)
        seed_everything(seed)
        name = ckpt["model_name"]
        model = build_model(name, model_config(name, **ckpt["model_config"]))
        state = {**ckpt, "model": model.state_dict(), "ema": None, "epoch": 0, "step": 0}
        save_checkpoint(state, out)
    return out


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


def pool(runs: list[ProbeResult], method: str) -> ProbeResult:
    """One method's results over training seeds as one result: every run's test value pooled."""
    return replace(runs[0], method=method, values=[v for r in runs for v in r.values])


def table(results: dict[str, dict[str, ProbeResult]]) -> str:
    """Markdown: one row per method, one column per task (primary metric, mean ± sd)."""
    tasks = list(results)
    methods = ordered({m for t in tasks for m in results[t]})
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


def ordered(methods: set[str]) -> list[str]:
    """The variants in their order, the control, then the baselines by name."""
    known = [*VARIANTS, CONTROL]
    return [m for m in known if m in methods] + sorted(methods - set(known))


def result_rows(results: dict[str, dict[str, ProbeResult]], train_seeds: int) -> list[dict]:
    """One row per task and method: mean and sd (ddof 1) of the primary test metric over its runs
    (splits x head seeds x training seeds; the baselines are not pretrained)."""
    rows = []
    for task, by_method in results.items():
        for m in ordered(set(by_method)):
            r = by_method[m]
            pretrained = m in VARIANTS or m == CONTROL
            rows.append({
                "task": task, "method": m, "metric": r.metric,
                "mean": r.mean if math.isfinite(r.mean) else None,
                "sd": r.std if math.isfinite(r.std) else None, "n_splits": r.num_splits,
                "n_head_seeds": r.num_seeds, "n_train_seeds": train_seeds if pretrained else 1,
                "n_runs": len(r.values), "input": r.input,
            })  # fmt: skip
    return rows


def device_text(device: str | None) -> str:
    """The machine the probes and training ran on, for the results file."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    return f"CPU: {cpu} (torch threads: {torch.get_num_threads()})"


def write_png(results: dict[str, dict[str, ProbeResult]], path: Path, title: str) -> Path:
    """Methods x tasks as grouped bars (mean) with sd error bars, as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    tasks = list(results)
    methods = ordered({m for t in tasks for m in results[t]})
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(2.2 + 1.4 * len(tasks) * max(1, len(methods) / 4), 4.2))
    for i, m in enumerate(methods):
        xs, means, sds = [], [], []
        for j, t in enumerate(tasks):
            r = results[t].get(m)
            if r is not None and math.isfinite(r.mean):
                xs.append(j - 0.4 + (i + 0.5) * width)
                means.append(r.mean)
                sds.append(r.std if math.isfinite(r.std) else 0.0)
        ax.bar(xs, means, width * 0.9, yerr=sds, capsize=2, label=m, color=f"C{i % 10}")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n({next(iter(results[t].values())).metric})" for t in tasks])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("test metric, mean ± sd")
    ax.set_title(title)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    parser.add_argument("--out", default="runs/paper", help="folder for everything written")
    parser.add_argument("--corpus", default=None, help="pretraining file (smoke: the demo corpus)")
    parser.add_argument("--data_dir", default=None, help="folder with the registry task files")
    parser.add_argument("--tasks", nargs="+", default=None, help="registry tasks (gpu scale)")
    parser.add_argument("--paper-grid", action="store_true", help="the paper's full probe grid")
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, CONTROL],
                        choices=[*VARIANTS, CONTROL])  # fmt: skip
    parser.add_argument("--train-seeds", type=int, nargs="+", default=None,
                        help="pretraining seeds of each variant (default: smoke 0, gpu 0 1 2)")  # fmt: skip
    parser.add_argument(
        "--splits", choices=["random", "official"], default="random",
        help="random: 3 seeded 0.7/0.15/0.15 splits of every task; official: a registry task's "
        "published split (comparable with published numbers; the spread is then over seeds only)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    trained = [v for v in args.variants if v in VARIANTS]
    if not trained:
        parser.error(f"--variants: {CONTROL} takes its architecture from a trained variant")
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("report.png needs matplotlib: pip install -e '.[dev]' (or matplotlib)")
    train_seeds = args.train_seeds or scale["train_seeds"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_script("train.py")

    # Downstream sets, and the corpus cleaned of them.
    resplit = dict(split=(0.7, 0.15, 0.15)) if args.splits == "random" else {}
    if args.scale == "smoke":
        raw = out / "demo_corpus.fasta"
        corpus_seqs = demo_sequences(300, seed=0)
        raw.write_text("".join(f">demo{i}\n{s}\n" for i, s in enumerate(corpus_seqs)))
        task_file = smoke_task(out, corpus_seqs, window_nt(scale["train"]))
        tasks = {"gc_window": dict(file=str(task_file))}
    else:
        if args.corpus is None or args.data_dir is None:
            parser.error("--scale gpu needs --corpus and --data_dir")
        raw = Path(args.corpus)
        names = args.tasks or scale["tasks"]
        tasks = {t: dict(task=t, data_dir=args.data_dir, **resplit) for t in names}
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

    # Pretraining: one run per variant and training seed, same recipe and corpus; the control
    # takes the first variant's architecture at that seed's initialisation.
    checkpoints: dict[tuple[str, int], Path] = {}
    for seed in train_seeds:
        for variant in trained:
            run = out / variant / f"seed{seed}"
            if not (run / "checkpoints" / "last.pt").is_file():
                code = train.main([*scale["train"], *VARIANTS[variant], "--seed", str(seed),
                                   "--train_file", str(corpus), "--output", str(run)])  # fmt: skip
                if code != 0:
                    return code
            checkpoints[variant, seed] = run / "checkpoints" / "last.pt"
        if CONTROL in args.variants:
            first = checkpoints[trained[0], seed]
            path = out / CONTROL / f"seed{seed}" / "checkpoints" / "last.pt"
            checkpoints[CONTROL, seed] = random_init(first, path, seed)

    # Probing: every variant on every task over the split seeds, baselines once per task.
    grid = dict(scale["eval"])
    if args.paper_grid:
        grid |= dict(lrs=[3e-4, 1e-4, 1e-5], batch_sizes=[8, 16, 32, 64])
    runs: dict[str, dict[str, list[ProbeResult]]] = {t: {} for t in tasks}
    for (variant, seed), checkpoint in checkpoints.items():
        first = (variant, seed) == next(iter(checkpoints))
        for task, where in tasks.items():
            report = checkpoint.parents[1] / f"{task}.json"
            experiment = run_experiment(
                checkpoint, **where, **grid, split_seeds=SPLIT_SEEDS, baselines=first,
                runs_file=report.with_suffix(".runs.jsonl"),
            )  # fmt: skip
            experiment.write(report)
            for name, r in experiment.results.items():
                method = variant if name == experiment.model_method else name
                runs[task].setdefault(method, []).append(r)
    results = {t: {m: pool(rs, m) for m, rs in by.items()} for t, by in runs.items()}

    n_train = len(train_seeds)
    text = (
        f"# HELM paper comparison, scale {args.scale}\n\nCorpus {raw}: {kept} records kept, "
        f"{dropped} dropped as downstream sequences. Test metric at the best validation epoch, "
        f"mean ± sd (ddof 1) over splits (seeds {' '.join(map(str, SPLIT_SEEDS))}) x head seeds "
        f"x training seeds ({' '.join(map(str, train_seeds))}) for the pretrained variants (n "
        f"runs); {CONTROL} is the same architecture untrained.\n\n" + table(results)
    )
    (out / "report.md").write_text(text)
    title = f"HELM comparison ({args.scale})"
    write_figure(results, out / "report.svg", title=title)
    write_png(results, out / "report.png", title)
    doc = {
        "command": "python bench/reproduce_paper.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": device_text(grid.get("device")),
        "scale": args.scale, "corpus": str(raw), "corpus_kept": kept, "corpus_dropped": dropped,
        "split_seeds": SPLIT_SEEDS, "train_seeds": train_seeds, "grid": grid,
        "rows": result_rows(results, n_train),
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
