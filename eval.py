#!/usr/bin/env python
"""Evaluate a trained HELM checkpoint; the checkpoint alone supplies model, tokenizer and codon tree.

    python eval.py pretrain   CKPT --file test.fasta            # LM loss, perplexity, tree metrics
    python eval.py downstream CKPT --task tc_riboswitches       # probe frozen features (paper protocol)
    python eval.py downstream CKPT --task mlos --finetune       # or train the whole model on the task
    python eval.py generate   CKPT --protein MKV... --num 4     # sample, or design a CDS (CLM only)
    python eval.py embed      CKPT --file seqs.fasta --out e.npy  # one vector per sequence

Every subcommand takes ``--ema`` (the EMA weights) and ``--device cpu|cuda|auto``. User mistakes end
with one ``eval.py: error: ...`` line and exit code 2 (``HELM_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from helm.config import (
    HelmArgumentParser,
    HelpFormatter,
    existing_path,
    fractions,
    output_file,
    output_folder,
    positive_int,
    sequence_file,
)
from helm.downstream.checks import DedupeRenamed
from helm.downstream.runs import Grid
from helm.downstream.tasks import TASK_TYPES, TASKS
from helm.embed import LONG_SEQS, POOLS
from helm.errors import ConfigError, run_reporting_errors
from helm.fileio import atomic_write, write_text
from helm.logger import setup_logging, teardown_logging

# The subcommands import torch and the models when they run: --help and argument errors answer at
# once (no torch).

log = logging.getLogger("helm")


def load(args):
    """The model of a checkpoint (raw or EMA weights), a HELM export or a Hugging Face folder
    (``helm.hf.load_model``) on --device, in eval mode."""
    from helm.hf import load_model

    loaded = load_model(args.checkpoint, ema=args.ema, device=args.device)
    log.info(
        "%s: %s %s, tokenizer %s, %s weights, device %s",
        args.checkpoint, loaded.model_name, loaded.config["mode"], loaded.tokenizer.name,
        "EMA" if args.ema else "raw", next(loaded.model.parameters()).device,
    )  # fmt: skip
    return loaded


def write_json(doc: dict, out: str | None) -> None:
    text = json.dumps(doc, indent=2)
    if out is None:
        print(text)
    else:
        write_text(out, text + "\n", what="results")
        log.info("wrote %s", out)


# pretrain: the training metrics on a sequence file --------------------------------------------------


def pretrain(args) -> int:
    from helm.evaluation import score_file

    loaded = load(args)
    doc = score_file(
        loaded, args.file, column_name=args.column_name, file_extension=args.file_extension,
        on_invalid=args.on_invalid, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
        seed=args.seed,
    )  # fmt: skip
    write_json({"checkpoint": str(args.checkpoint), "weights": "ema" if args.ema else "raw",
                **doc}, args.out)  # fmt: skip
    return 0


# downstream: probes on frozen features (or finetuning), with the paper's grid and the baselines ---


def downstream(args) -> int:
    """``helm.downstream.experiment.run_experiment`` with this command's flags; the report to
    stdout, the JSON to --out with the markdown, the figure and the finished runs beside it."""
    from helm.downstream.experiment import PARAMETERS, ExperimentInterrupted, run_experiment

    name = Path(args.task or args.file or "task").stem
    out = Path(args.out or f"downstream-{name}.json")
    runs = out.with_suffix(".runs.jsonl")
    try:
        result = run_experiment(**{k: getattr(args, k) for k in PARAMETERS}, runs_file=runs)
    except ExperimentInterrupted as exc:
        print(f"eval.py: interrupted; {exc}", file=sys.stderr)
        return 130
    result.info["settings"]["--out"] = str(args.out)
    print(result.report())
    written = result.write(out)
    log.info("wrote %s (runs in %s)", ", ".join(map(str, written)), runs)
    return 0


# generate: sampling and protein-constrained design -------------------------------------------------


def generate(args) -> int:
    import torch

    from helm.embed import read_records
    from helm.generate import build_prompts, fasta_record, generate

    loaded = load(args)
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, loaded.config
    device = next(model.parameters()).device
    if cfg["mode"] != "clm" or model.cfg.bidirectional:
        raise ConfigError(
            f"{args.checkpoint} is a masked (MLM) model: it is bidirectional and defines no "
            "left-to-right distribution to sample from. Generate with a checkpoint trained with "
            "--mode clm; use `eval.py embed` or `eval.py downstream` for this one"
        )
    if args.prefix is not None and args.prefix_file is not None:
        raise ConfigError("give --prefix or --prefix-file, not both")

    # Prompts: designed proteins, or prefixes (none: generate from <cls> alone).
    if args.protein is not None and (args.prefix is not None or args.prefix_file is not None):
        raise ConfigError("--protein designs the whole coding sequence: drop the prefix")
    prefixes = [("sample", args.prefix or "")]
    if args.prefix_file is not None:
        ids, seqs = read_records(
            args.prefix_file, require_codons=tokenizer.is_codon, data_type=loaded.data_type
        )
        prefixes = list(zip(ids, seqs))
    prompts = build_prompts(tokenizer, protein=args.protein, prefixes=prefixes)

    generator = torch.Generator(device).manual_seed(args.seed)
    lines, capped = [], 0
    per_batch = max(1, args.batch_size // args.num)  # prompts decoded together
    for first in range(0, len(prompts), per_batch):
        group = prompts[first : first + per_batch]
        samples = generate(
            model, group, args.num, vocab_size=tokenizer.vocab_size, max_length=args.max_length,
            min_length=args.min_length, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, generator=generator, device=device, use_cache=not args.no_cache,
            stop_codon=args.stop_codon,
        )  # fmt: skip
        for i, s in enumerate(samples):
            seq, nucleotides = tokenizer.decode(s.ids), tokenizer.data_type != "aa"
            source = group[i // args.num].name
            lines.append(fasta_record(len(lines), s, seq, source, nucleotides))
            capped += not s.ended
    index = len(lines)
    if capped:
        log.warning(
            "%d of %d samples reached the length cap without <eos> (end=cap in their headers): "
            "raise --max-length for whole sequences",
            capped,
            index,
        )
    text = "\n".join(lines) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_text(args.out, text, what="samples")
        log.info("wrote %d sequences to %s", index, args.out)
    return 0


# embed: one vector per sequence ------------------------------------------------------------------


def embed(args) -> int:
    import torch

    from helm.embed import extract, read_records, report_truncation

    out = Path(args.out)
    if out.suffix not in (".npy", ".pt"):
        raise ConfigError(f"--out {out}: the file must end in .npy or .pt")
    loaded = load(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.pool == "cls" and not model.cfg.bidirectional:
        log.warning(
            "--pool cls on a causal model: the <cls> state sees no other token, so every "
            "sequence gets the same vector; --pool mean or last is what a causal model offers"
        )
    ids, seqs = read_records(
        args.file,
        args.column_name,
        args.on_invalid,
        file_extension=args.file_extension,
        require_codons=tokenizer.is_codon,
        data_type=loaded.data_type,
        id_column=args.id_column,
    )
    token_ids = tokenizer.encode_batch(seqs)
    report_truncation(token_ids, model, args.long_seqs, "embedded")
    emb = extract(
        model,
        token_ids,
        pool=args.pool,
        long_seqs=args.long_seqs,
        batch_size=args.batch_size,
        device=next(model.parameters()).device,
    ).astype(np.float32)
    with atomic_write(out, "wb", what="embeddings") as f:
        if out.suffix == ".npy":
            np.save(f, emb)
        else:
            torch.save({"embeddings": torch.from_numpy(emb), "ids": ids}, f)
    if out.suffix == ".npy":
        write_text(f"{out}.ids.txt", "".join(f"{i}\n" for i in ids), what="embedding ids")
        log.info("wrote %s %s and %s.ids.txt", out, emb.shape, out)
    else:
        log.info("wrote %s (embeddings %s, ids)", out, tuple(emb.shape))
    return 0


# export: a folder others load with transformers, or with helm.from_pretrained ------------------


def export(args) -> int:
    """``--format hf``: config.json + model.safetensors + tokenizer + model card, loadable by
    ``transformers`` (refused, naming the option, where HF has no exact equivalent); ``--format
    helm``: the HELM-native folder, for every model."""
    from helm.hf import export_helm, export_hf

    write = export_hf if args.format == "hf" else export_helm
    out = write(args.checkpoint, args.out, ema=args.ema)
    log.info("exported %s (%s) to %s", args.checkpoint, args.format, out)
    return 0


# Command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = HelmArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=HelmArgumentParser
    )

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            formatter_class=HelpFormatter,
        )
        p.set_defaults(func=func)
        p.add_argument(
            "checkpoint",
            type=existing_path,
            metavar="CKPT",
            help="a checkpoint written by train.py, a run folder (its best.pt, else last.pt), "
            "a HELM export or a Hugging Face folder",
        )
        p.add_argument("--ema", action="store_true", help="use the EMA weights")
        p.add_argument(
            "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if any"
        )
        return p

    def reading(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--file",
            required=True,
            type=sequence_file,
            help="txt, csv/tsv or fasta, optionally .gz",
        )
        p.add_argument("--column_name", default=None, help="sequence column of csv/tsv files")
        p.add_argument("--file_extension", default=None, help="format, e.g. fasta.gz")
        p.add_argument(
            "--on-invalid",
            default="error",
            choices=["error", "skip"],
            help="bad records: stop, or skip and count",
        )

    p = command("pretrain", pretrain, "language-model metrics of a checkpoint on a sequence file")
    reading(p)
    p.add_argument("--batch_size", type=positive_int, default=32, help="sequences per batch")
    p.add_argument("--max_seq_len", type=int, default=None, help="default: the model's")
    p.add_argument("--seed", type=int, default=0, help="seed of the MLM masks")
    p.add_argument("--out", type=output_file, default=None, help="JSON file (default: stdout)")

    p = command(
        "downstream",
        downstream,
        "probe frozen features (or finetune the model) on a property-prediction task",
    )
    p.add_argument("--task", default=None, help=f"registered task: {', '.join(TASKS)}")
    p.add_argument("--data_dir", default=None, help="folder holding the task files (offline)")
    p.add_argument(
        "--file", default=None, type=existing_path,
        help="your own labelled table or FASTA file, or a folder of FASTA files, one per class "
        "(the file name is the label; sub-folders train/ val/ test/ set the split)",
    )  # fmt: skip
    p.add_argument("--sequence-column", default="Sequence", help="(default: %(default)s)")
    p.add_argument("--target-column", nargs="+", default=["Value"], help="(default: Value)")
    p.add_argument(
        "--task-type", default=None, choices=TASK_TYPES,
        help="default: regression; classification for a folder of FASTA files",
    )  # fmt: skip
    p.add_argument(
        "--header-label", default="none", choices=["none", "pipe"],
        help="FASTA labels: key=value pairs of the header (none), or also >id|label (pipe)",
    )  # fmt: skip
    p.add_argument(
        "--target-transform", default="none", choices=["none", "log", "log1p"],
        help="fit and score regression targets as log or log1p (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--split-column", default=None, help="column holding train/val/test")
    p.add_argument("--group-column", default=None, help="records of a group share a split/fold")
    p.add_argument("--fold-column", default=None, help="column of fold numbers: k-fold over them")
    p.add_argument("--region-columns", metavar="START,END", help="read each record's START..END")
    p.add_argument("--region-base", type=int, default=0, choices=[0, 1], help="1: 1-based, incl.")
    p.add_argument(
        "--split", type=fractions, default=None,
        help="random split fractions (default without a split column: 0.7,0.15,0.15)",
    )  # fmt: skip
    p.add_argument("--kfold", type=int, default=None, help="k-fold cross-validation (k >= 3)")
    p.add_argument(
        "--val-from-train", type=float, default=None, metavar="F",
        help="carve this fraction of train out as val (a split with train and test only)",
    )  # fmt: skip
    p.add_argument(
        "--split-seeds", "--split-seed", type=int, nargs="+", default=None,
        help="one split per seed, pooled into the mean ± sd (default: 0 1 2 for random splits "
        "and --val-from-train, 0 for a split column or --kfold)",
    )  # fmt: skip
    p.add_argument(
        "--duplicates", default=None, choices=["keep", "group", "drop"],
        help="records identical in what the model reads: group before splitting (default: random, "
        "k-fold), drop from val/test (default: split or fold column), keep (warned)",
    )  # fmt: skip
    p.add_argument("--dedupe", action=DedupeRenamed, nargs=0, help=argparse.SUPPRESS)
    p.add_argument("--on-invalid", default="error", choices=["error", "skip"])
    p.add_argument("--head", default="textcnn", choices=["textcnn", "linear"])
    p.add_argument("--finetune", action="store_true", help="train the whole model, not a probe")
    p.add_argument(
        "--backbone-lr-scale", type=float, default=0.1,
        help="--finetune: the backbone's lr as a multiple of the head's (--lrs)",
    )  # fmt: skip
    p.add_argument("--lrs", type=float, nargs="+", default=list(Grid.lrs))
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=list(Grid.batch_sizes))
    p.add_argument("--seeds", type=int, nargs="+", default=list(Grid.seeds), help="head seeds")
    p.add_argument("--max-epochs", type=positive_int, default=Grid.max_epochs)
    p.add_argument("--patience", type=positive_int, default=Grid.patience)
    p.add_argument("--long-seqs", default="truncate", choices=LONG_SEQS)
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--baseline-input", default="same", choices=["same", "full"],
        help="same: baselines read what the model reads (its window unless --long-seqs window); "
        "full: whole records (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--feature-batch-size", type=positive_int, default=32)
    p.add_argument("--feature-cache", default=None, help="default: $HELM_CACHE_DIR/features")
    p.add_argument(
        "--out", type=output_file, default=None,
        help="JSON report (default: downstream-<task>.json); the markdown (.md), the figure "
        "(.svg) and the finished runs (.runs.jsonl, read back by a rerun) go beside it",
    )  # fmt: skip

    p = command("generate", generate, "sample sequences from a causal (CLM) checkpoint")
    p.add_argument("--prefix", default=None, help="sequence the samples continue")
    p.add_argument(
        "--prefix-file",
        default=None,
        type=existing_path,
        help="a file of prefixes: --num samples each",
    )
    p.add_argument("--num", type=positive_int, default=1, help="samples per prompt")
    p.add_argument(
        "--max-length", type=positive_int, default=None,
        help="new tokens at most (default: what fills the model's window after the prompt)",
    )  # fmt: skip
    p.add_argument("--min-length", type=int, default=0, help="no <eos> before this many new tokens")
    p.add_argument(
        "--stop-codon", action="store_true", help="a sample also ends at an in-frame stop codon"
    )
    p.add_argument(
        "--no-cache", action="store_true",
        help="recompute the whole context for every token (the reference path; slower)",
    )  # fmt: skip
    p.add_argument("--batch_size", type=positive_int, default=64, help="samples decoded together")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: mass p")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--protein", default=None, help="design a CDS: a protein, or a file of them")
    p.add_argument("--out", type=output_file, default=None, help="FASTA file (default: stdout)")

    p = command("embed", embed, "one embedding per sequence of a file")
    reading(p)
    p.add_argument(
        "--pool", default="mean", choices=POOLS, help="mean of the tokens, <cls> state, last token"
    )
    p.add_argument("--batch_size", type=positive_int, default=32, help="windows per batch")
    p.add_argument(
        "--long-seqs",
        default="truncate",
        choices=LONG_SEQS,
        help="records longer than the model: their head, or overlapping windows",
    )
    p.add_argument(
        "--out", type=output_file, default="embeddings.npy", help=".npy (+ .ids.txt) or .pt"
    )
    p.add_argument(
        "--id-column", default=None, help="table column naming the records (default: record number)"
    )

    p = command("export", export, "write a Hugging Face or HELM-native folder to share the model")
    p.add_argument("--format", required=True, choices=["hf", "helm"], help="hf: transformers")
    p.add_argument("--out", type=output_folder, required=True, help="the folder to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or a command-line error already printed on one line
        return exc.code or 0
    setup_logging(True, None)
    try:
        return run_reporting_errors("eval.py", lambda: run(args))
    finally:
        teardown_logging()  # an in-process caller (a notebook, the tests) is left as it was


def run(args) -> int:
    """The command, on the checkpoint CKPT names (a run folder's best.pt, else last.pt)."""
    from helm.hf import resolve_checkpoint

    args.checkpoint = resolve_checkpoint(args.checkpoint)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
