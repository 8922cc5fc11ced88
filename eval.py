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
import math
import sys
from pathlib import Path

import numpy as np

from helm.config import HelmArgumentParser, dataset_kwargs, loss_kwargs
from helm.downstream.tasks import TASK_TYPES, TASKS
from helm.embed import LONG_SEQS, POOLS
from helm.errors import run_reporting_errors
from helm.logger import setup_logging, teardown_logging

# The subcommands import torch and the models when they run: --help and argument errors answer at
# once (no torch).

log = logging.getLogger("helm")


class EvalError(ValueError):
    """A request this script cannot honour; the message says why and what to do instead."""


def load(args):
    """The model of a checkpoint (raw or EMA weights), a HELM export or a Hugging Face folder
    (``helm.hf.load_model``) on the chosen device, in eval mode."""
    import torch

    from helm.hf import load_model

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EvalError("--device cuda: no CUDA device is available (use --device cpu)")
    loaded = load_model(args.checkpoint, ema=args.ema, device=device)
    cfg = loaded.config
    log.info(
        "%s: %s %s, tokenizer %s, %s weights, device %s",
        args.checkpoint,
        loaded.model_name,
        cfg["mode"],
        loaded.tokenizer.name,
        "EMA" if args.ema else "raw",
        device,
    )
    return loaded


def data_type(loaded) -> str:
    """The reading mode of the model's training data (``codon`` reads as ``nuc``)."""
    kind = loaded.config.get("data_type", "nuc")
    return "nuc" if kind == "codon" else kind


def write_json(doc: dict, out: str | None) -> None:
    text = json.dumps(doc, indent=2)
    if out is None:
        print(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        log.info("wrote %s", out)


# pretrain: the training metrics on a sequence file --------------------------------------------------


def pretrain(args) -> int:
    from tqdm import tqdm

    from helm.data.cache import build_token_cache
    from helm.data.dataset import LMDataset
    from helm.data.sampler import build_loader
    from helm.lm import LanguageModel, amp_dtype, evaluate
    from helm.losses import build_loss

    loaded = load(args)
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, loaded.config
    device = next(model.parameters()).device
    max_seq_len = args.max_seq_len or model.cfg.max_seq_len
    if max_seq_len > model.cfg.max_seq_len and model.cfg.pos_embedding in ("absolute", "sincos"):
        raise EvalError(
            f"--max_seq_len {max_seq_len} exceeds the {model.cfg.max_seq_len} positions the "
            f"model's {model.cfg.pos_embedding} position embedding holds"
        )

    # Data: the trainer's token cache, framing, masking (seeded) or shift, length-sorted batches.
    store = build_token_cache(
        args.file,
        tokenizer,
        column_name=args.column_name,
        on_invalid=args.on_invalid,
        file_extension=args.file_extension,
        data_type=data_type(loaded),
        require_records=True,
    )
    dataset_kw = dataset_kwargs(cfg) | dict(max_seq_len=max_seq_len, seed=args.seed)
    dataset = LMDataset(store, truncation="head", vocab_size=tokenizer.vocab_size, **dataset_kw)
    loader = build_loader(dataset, batch_size=args.batch_size, train=False)
    content, capacity = np.asarray(store.lengths, dtype=np.int64), dataset.row_budget - 2
    truncated = int((content > capacity).sum())
    if truncated:
        log.warning(
            "%d of %d records are longer than the %d tokens the model reads: only their first "
            "%d tokens are scored (the report's tokens count what was scored)",
            truncated,
            len(content),
            capacity,
            capacity,
        )

    # The checkpoint's loss and the tree metrics (codon tokenizers), summed over every target.
    loss_fn = build_loss(
        **loss_kwargs(cfg),
        vocab_size=tokenizer.vocab_size,
        is_codon=tokenizer.is_codon,
        hierarchy=loaded.hierarchy,
    ).to(device)
    bar = tqdm(loader, desc="pretrain eval", unit="batch", disable=not sys.stderr.isatty())
    metrics = evaluate(
        LanguageModel(model),
        bar,
        loss_fn,
        hierarchy=loaded.hierarchy if tokenizer.is_codon else None,
        vocab_size=tokenizer.vocab_size,
        device=device,
        amp=amp_dtype(device, enabled=device.type == "cuda"),
        prefix="eval",
    )
    doc = {
        "checkpoint": str(args.checkpoint),
        "file": str(args.file),
        "weights": "ema" if args.ema else "raw",
        "mode": cfg["mode"],
        "loss": cfg["loss"],
        "seed": args.seed if cfg["mode"] == "mlm" else None,
        "max_seq_len": max_seq_len,
        "records": len(store),
        "tokens": int(np.minimum(content, capacity).sum()),  # the tokens scored
        "tokens_in_file": store.num_tokens,
        "records_truncated": truncated,
        "metrics": {k.removeprefix("eval_"): v for k, v in metrics.items()},
    }
    write_json(doc, args.out)
    return 0


# downstream: probes on frozen features (or finetuning), with the paper's grid and the baselines ---


def downstream(args) -> int:
    from helm.downstream import (
        RunStore,
        dedupe,
        duplicate_warnings,
        evaluate_finetune,
        evaluate_probe,
        extent_text,
        format_report,
        input_sha256,
        label_warnings,
        repeated_splits,
        run_baselines,
        to_json,
        transform_targets,
        write_figure,
    )
    from helm.embed import window_capacity
    from helm.vocab import translate

    if args.finetune and args.long_seqs == "window":
        raise EvalError(
            "--long-seqs window does not apply to --finetune: windows average frozen features, "
            "while finetuning trains on one model input per record. Drop --long-seqs (records "
            "longer than the model are cut to its max_seq_len), or probe frozen features instead"
        )
    if args.backbone_lr_scale < 0:
        raise EvalError("--backbone-lr-scale must be >= 0")
    store = None
    try:
        data, info = load_downstream_task(args)
        data = transform_targets(data, args.target_transform)
        # The spread: repeated random splits (or k-fold) by default, not only head seeds.
        random_split = args.kfold is None and (data.splits is None or args.split is not None)
        split_seeds = args.split_seeds or (
            [0, 1, 2] if random_split or args.val_from_train is not None else [0]
        )
        splits = repeated_splits(
            data,
            split_seeds,
            fractions=args.split,
            kfold=args.kfold,
            use_split_column=args.split is None,
            val_from_train=args.val_from_train,
        )
        warnings = duplicate_warnings(data, splits, dropped=args.dedupe)
        if args.dedupe:
            splits = [dedupe(data, s) for s in splits]
        warnings += label_warnings(data, splits)
        for line in warnings:
            log.warning("%s", line)
        log.info("%d records, splits: %s", len(data), ", ".join(map(repr, splits)))
        loaded = load(args)
        model, tokenizer = loaded.model, loaded.tokenizer
        device = next(model.parameters()).device

        # Model input: coding and non-coding sets alike are cut into consecutive 3-mers
        # (CodonBERT); records longer than the model's window are truncated unless windowed.
        seqs = data.codon_sequences()
        if tokenizer.data_type == "aa":
            seqs = [translate(s) for s in seqs]
        token_ids = tokenizer.encode_batch(seqs)
        capacity = window_capacity(model.cfg.max_seq_len, not model.cfg.bidirectional)
        longer = sum(len(t) > capacity for t in token_ids)
        full = [len(s) for s in data.codon_sequences()]
        if args.long_seqs == "window" and not args.finetune:
            seen = full
        elif tokenizer.data_type == "aa" or tokenizer.is_codon:
            seen = [min(n, 3 * capacity) for n in full]
        else:
            seen = [len(tokenizer.decode(t[:capacity])) if len(t) > capacity else n
                    for t, n in zip(token_ids, full)]  # fmt: skip
        model_extent = extent_text(seen, full)
        if longer:
            log.info("%d of %d records exceed the model's %d tokens: --long-seqs %s",
                     longer, len(token_ids), capacity, args.long_seqs)  # fmt: skip

        # Every setting under its flag's name, the input's and the checkpoint's identity.
        out = Path(args.out or f"downstream-{Path(str(info['name'])).stem}.json")
        ckpt = loaded.checkpoint
        identity = {
            "path": str(args.checkpoint),
            "sha256": input_sha256(args.checkpoint),
            "weights": "ema" if args.ema else "raw",
            "model_name": loaded.model_name,
            "epoch": ckpt.get("epoch"),
            "step": ckpt.get("step"),
            **{k: loaded.config.get(k) for k in ("mode", "loss", "hxe_alpha", "hierarchy")},
        }
        flags = args.flag_names
        settings = {flags[k]: v for k, v in vars(args).items() if k in flags}
        settings |= {"--split-seeds": split_seeds}
        info |= {"input_sha256": input_sha256(info["file"]), "checkpoint": identity}
        # Settings that change a run's result key its stored result; the grid and seeds do not
        # (each run carries its own), so a rerun with a wider grid reuses the runs it shares.
        run_keys = ("--ema", "--target-transform", "--long-seqs", "--max-epochs", "--patience",
                    "--backbone-lr-scale", "--baseline-input", "--dedupe", "--head", "--finetune")  # fmt: skip
        store = RunStore(
            out.with_suffix(".runs.jsonl"),
            context={
                "input_sha256": info["input_sha256"],
                "checkpoint_sha256": identity["sha256"],
                **{k: settings[k] for k in run_keys},
            },
        )
        if len(store):
            log.info("%s: %d finished runs from an earlier start are reused", store.path,
                     len(store))  # fmt: skip

        # The protocol: grid x seeds, early stopping on val, test at the best validation epoch.
        grid = dict(lrs=args.lrs, batch_sizes=args.batch_sizes, seeds=args.seeds,
                    max_epochs=args.max_epochs, patience=args.patience, device=str(device))  # fmt: skip
        name = f"{loaded.model_name}_{loaded.config['mode']}_{args.head}"
        if args.finetune:
            # Every run trains a fresh copy of the backbone with the head, on the same splits.
            name = f"{loaded.model_name}_{loaded.config['mode']}_finetune_{args.head}"
            result = evaluate_finetune(
                model,
                token_ids,
                data,
                splits,
                head=args.head,
                backbone_lr_scale=args.backbone_lr_scale,
                eval_batch_size=args.feature_batch_size,
                method=name,
                store=store,
                input=model_extent,
                **grid,
            )
            setup = {
                "training": "backbone and head finetuned together (AdamW; backbone lr = head lr "
                f"x {args.backbone_lr_scale:g}); the head reads the last hidden states at each "
                "token",
                "backbone_lr_scale": args.backbone_lr_scale,
            }
        else:
            result = evaluate_probe(
                probe_features(args, model, seqs, token_ids, device),
                data,
                splits,
                head=args.head,
                method=name,
                store=store,
                input=model_extent,
                **grid,
            )
            setup = {"features": "last hidden states of the frozen backbone at each token"}
        results = {name: result}
        if args.baselines:
            extent = seen if args.baseline_input == "same" else None
            results |= run_baselines(data, splits, extent=extent, store=store, **grid)
    except KeyboardInterrupt:
        kept = (
            f"; {len(store)} finished runs are kept in {store.path} and the same command "
            "continues from them"
            if store is not None
            else ""
        )
        print(f"eval.py: interrupted{kept}", file=sys.stderr)
        return 130
    info |= {
        "head": args.head,
        **setup,
        "model_input": "sequences cut into consecutive 3-mers from the first nucleotide, a "
        "trailing partial 3-mer dropped (TaskData.codon_sequences), as CodonBERT did; "
        f"{model_extent}",
        "input_extent": {m: r.input for m, r in results.items()},
        "long_seqs": args.long_seqs,
        "records_longer_than_model": longer,
        "target_transform": args.target_transform,
        "splits": [repr(s) for s in splits],
        "split_seeds": split_seeds,
        "settings": settings,
        "warnings": warnings,
    }
    report = format_report(results, info, warnings)
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_json(results, info) + "\n")
    out.with_suffix(".md").write_text(report)
    write_figure({str(info["name"]): results}, out.with_suffix(".svg"), title=str(info["name"]))
    log.info("wrote %s, %s and %s (runs in %s)", out, out.with_suffix(".md"),
             out.with_suffix(".svg"), store.path)  # fmt: skip
    return 0


def probe_features(args, model, seqs, token_ids, device) -> list[np.ndarray]:
    """Per-token features of the frozen backbone, once per (checkpoint, weights, sequences,
    long-seqs mode): the grid and later runs reuse them from the feature cache."""
    from helm.embed import cached_token_features, extract, feature_key
    from helm.hf import weights_file

    key = feature_key(
        weights_file(args.checkpoint),
        seqs,
        ema=args.ema,
        long_seqs=args.long_seqs,
        autocast=device.type == "cuda",
    )
    return cached_token_features(
        key,
        lambda: extract(
            model,
            token_ids,
            long_seqs=args.long_seqs,
            batch_size=args.feature_batch_size,
            device=device,
        ),
        args.feature_cache,
    )


def load_downstream_task(args):
    """(TaskData, task description dict) from ``--task`` or ``--file`` and its column flags;
    ``--file DIR`` reads a folder of FASTA files, one per class (`load_fasta_folder`)."""
    from helm.downstream.tasks import load_fasta_folder, load_task, load_task_file

    if (args.task is None) == (args.file is None):
        raise EvalError("name a registered --task or give a --file (one of the two)")
    if args.kfold is not None and args.split is not None:
        raise EvalError("--kfold and --split are alternatives: give one")
    if args.task is not None:
        spec = TASKS.get(args.task)
        if spec is None:
            raise EvalError(f"unknown --task {args.task!r}; known tasks: {', '.join(TASKS)}")
        data = load_task(spec, data_dir=args.data_dir, on_invalid=args.on_invalid)
        info = {
            "name": spec.name,
            "task": spec.task,
            "description": spec.description,
            "coding": spec.coding,
            "file": data.source,
        }
        return data, info
    if Path(args.file).is_dir():
        if args.task_type not in (None, "classification"):
            raise EvalError(
                f"--file {args.file} is a folder of FASTA files, one per class: a "
                f"classification task, not {args.task_type}"
            )
        data = load_fasta_folder(args.file, on_invalid=args.on_invalid)
        info = {"name": Path(args.file).name, "task": "classification", "coding": None}
        return data, info | {"file": str(args.file), "labels": "file names"}
    task = args.task_type or "regression"
    data = load_task_file(
        args.file,
        sequence_column=args.sequence_column,
        target_columns=args.target_column,
        task=task,
        split_column=args.split_column,
        group_column=args.group_column,
        on_invalid=args.on_invalid,
        pipe_label=args.header_label == "pipe",
    )
    return data, {"name": str(args.file), "task": task, "coding": None, "file": str(args.file)}


# generate: sampling and protein-constrained design -------------------------------------------------


def generate(args) -> int:
    import torch

    from helm.codon_usage import cai
    from helm.embed import read_records
    from helm.generate import gc_content, protein_masks, sample

    loaded = load(args)
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, loaded.config
    device = next(model.parameters()).device
    if cfg["mode"] != "clm" or model.cfg.bidirectional:
        raise EvalError(
            f"{args.checkpoint} is a masked (MLM) model: it is bidirectional and defines no "
            "left-to-right distribution to sample from. Generate with a checkpoint trained with "
            "--mode clm; use `eval.py embed` or `eval.py downstream` for this one"
        )
    if args.prefix is not None and args.prefix_file is not None:
        raise EvalError("give --prefix or --prefix-file, not both")

    # Prompts: designed proteins, or prefixes (none: generate from <cls> alone).
    prompts = []  # (name, prefix ids, allowed-token masks or None)
    if args.protein is not None:
        if not tokenizer.is_codon:
            raise EvalError(
                f"--protein needs the codon tokenizer (3mer, overlap 0); this model uses "
                f"{tokenizer.name}: sample without --protein"
            )
        if args.prefix is not None or args.prefix_file is not None:
            raise EvalError("--protein designs the whole coding sequence: drop the prefix")
        for name, protein in read_proteins(args.protein):
            prompts.append((name, [], protein_masks(protein, tokenizer.vocab_size)))
    else:
        if args.prefix_file is not None:
            records = zip(
                *read_records(
                    args.prefix_file,
                    require_codons=tokenizer.is_codon,
                    data_type=data_type(loaded),
                )
            )
        else:
            records = [("sample", args.prefix or "")]
        for name, prefix in records:
            prefix = "".join(prefix.split()).upper().replace("U", "T")
            if tokenizer.is_codon and len(prefix) % 3:
                raise EvalError(f"prefix {name!r}: length {len(prefix)} is not whole codons")
            prompts.append((name, [int(i) for i in tokenizer.encode(prefix)], None))

    generator = torch.Generator(device).manual_seed(args.seed)
    lines = []
    index = capped = 0
    for name, prefix_ids, allowed in prompts:
        max_length = args.max_length or max(1, model.cfg.max_seq_len - 1 - len(prefix_ids))
        samples = sample(
            model,
            prefix_ids,
            args.num,
            vocab_size=tokenizer.vocab_size,
            max_length=max_length,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
            allowed=allowed,
            device=device,
        )
        for s in samples:
            seq = tokenizer.decode(s.ids)
            fields = [f"source={name}", f"tokens={s.num_generated}"]
            if tokenizer.data_type != "aa":
                fields += [f"gc={gc_content(seq):.4f}", f"cai={cai(seq):.4f}"]
            fields.append(f"loglik={s.log_likelihood:.4f}")
            fields.append("end=eos" if s.ended else "end=cap")  # cap: no <eos> within the length
            capped += not s.ended
            lines.append(f">gen{index} " + " ".join(fields))
            lines += [seq[i : i + 80] for i in range(0, len(seq), 80)] or [""]
            index += 1
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
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        log.info("wrote %d sequences to %s", index, args.out)
    return 0


def read_proteins(value: str) -> list[tuple[str, str]]:
    """(name, protein) pairs from ``--protein``: a sequence, or a FASTA / one-per-line file."""
    from helm.generate import clean_protein

    path = Path(value)
    if not path.is_file():
        return [("protein", clean_protein(value))]
    from helm.data.io import iter_records

    fasta = path.read_text().lstrip().startswith(">")
    out = []
    # Raw records (validate=False): proteins are checked by clean_protein, not as nucleotides.
    for record in iter_records(path, file_extension="fasta" if fasta else "txt", validate=False):
        name = (record.header or f"protein{record.index}") if fasta else f"line{record.line}"
        try:
            out.append((name, clean_protein(record.sequence)))
        except ValueError as exc:
            raise EvalError(f"{path}: {name}: {exc}") from None
    if not out:
        raise EvalError(f"{path}: no protein sequences")
    return out


# embed: one vector per sequence ------------------------------------------------------------------


def embed(args) -> int:
    import torch

    from helm.embed import extract, read_records

    out = Path(args.out)
    if out.suffix not in (".npy", ".pt"):
        raise EvalError(f"--out {out}: the file must end in .npy or .pt")
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
        data_type=data_type(loaded),
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
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, emb)
        Path(f"{out}.ids.txt").write_text("".join(f"{i}\n" for i in ids))
        log.info("wrote %s %s and %s.ids.txt", out, emb.shape, out)
    else:
        torch.save({"embeddings": torch.from_numpy(emb), "ids": ids}, out)
        log.info("wrote %s (embeddings %s, ids)", out, tuple(emb.shape))
    return 0


def report_truncation(token_ids, model, long_seqs: str, what: str) -> int:
    """Say how many records exceed the model's window and what was done with them; their count."""
    from helm.embed import window_capacity

    capacity = window_capacity(model.cfg.max_seq_len, not model.cfg.bidirectional)
    lengths = [len(t) for t in token_ids]
    longer = sum(n > capacity for n in lengths)
    if longer and long_seqs == "truncate":
        log.warning(
            "%d of %d records are longer than the model's window of %d tokens (the longest has "
            "%d): only their first %d tokens were %s; --long-seqs window reads them whole",
            longer,
            len(lengths),
            capacity,
            max(lengths),
            capacity,
            what,
        )
    elif longer:
        log.info(
            "%d of %d records read as overlapping windows of %d tokens",
            longer,
            len(lengths),
            capacity,
        )
    return longer


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


def _floats(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected train,val,test fractions, got {text!r}"
        ) from None
    if len(parts) != 3 or min(parts) < 0 or not math.isclose(sum(parts), 1.0, abs_tol=1e-6):
        raise argparse.ArgumentTypeError(f"expected three fractions summing to 1, got {text!r}")
    return parts


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
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        p.set_defaults(func=func)
        p.add_argument(
            "checkpoint",
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
        p.add_argument("--file", required=True, help="txt, csv/tsv or fasta, optionally .gz")
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
    p.add_argument("--batch_size", type=int, default=32, help="sequences per batch")
    p.add_argument("--max_seq_len", type=int, default=None, help="default: the model's")
    p.add_argument("--seed", type=int, default=0, help="seed of the MLM masks")
    p.add_argument("--out", default=None, help="JSON file (default: stdout)")

    p = command(
        "downstream",
        downstream,
        "probe frozen features (or finetune the model) on a property-prediction task",
    )
    p.add_argument("--task", default=None, help=f"registered task: {', '.join(TASKS)}")
    p.add_argument("--data_dir", default=None, help="folder holding the task files (offline)")
    p.add_argument(
        "--file",
        default=None,
        help="your own labelled table or FASTA file, or a folder of FASTA files, one per class "
        "(the file name is the label; sub-folders train/ val/ test/ set the split)",
    )
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
    p.add_argument(
        "--split", type=_floats, default=None,
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
        "--dedupe", action="store_true",
        help="drop val and test records whose sequence is in train (test: also in val)",
    )  # fmt: skip
    p.add_argument("--on-invalid", default="error", choices=["error", "skip"])
    p.add_argument("--head", default="textcnn", choices=["textcnn", "linear"])
    p.add_argument(
        "--finetune", action="store_true", help="train the whole model, not a probe on its features"
    )
    p.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=0.1,
        help="--finetune: the backbone's lr as a multiple of the head's (--lrs)",
    )
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-4, 1e-5])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="head seeds")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=15)
    p.add_argument("--long-seqs", default="truncate", choices=LONG_SEQS)
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--baseline-input", default="same", choices=["same", "full"],
        help="same: baselines read what the model reads (its window unless --long-seqs window); "
        "full: whole records (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--feature-batch-size", type=int, default=32)
    p.add_argument("--feature-cache", default=None, help="default: $HELM_CACHE_DIR/features")
    p.add_argument(
        "--out", default=None,
        help="JSON report (default: downstream-<task>.json); the markdown (.md), the figure "
        "(.svg) and the finished runs (.runs.jsonl, read back by a rerun) go beside it",
    )  # fmt: skip
    # The report records every setting under its flag's name.
    p.set_defaults(flag_names={a.dest: a.option_strings[0] if a.option_strings else a.metavar
                               for a in p._actions if a.dest not in ("help", "flag_names")})  # fmt: skip

    p = command("generate", generate, "sample sequences from a causal (CLM) checkpoint")
    p.add_argument("--prefix", default=None, help="sequence the samples continue")
    p.add_argument("--prefix-file", default=None, help="a file of prefixes: --num samples each")
    p.add_argument("--num", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-length", type=int, default=None, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: mass p")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--protein", default=None, help="design a CDS: a protein, or a file of them")
    p.add_argument("--out", default=None, help="FASTA file (default: stdout)")

    p = command("embed", embed, "one embedding per sequence of a file")
    reading(p)
    p.add_argument(
        "--pool", default="mean", choices=POOLS, help="mean of the tokens, <cls> state, last token"
    )
    p.add_argument("--batch_size", type=int, default=32, help="windows per batch")
    p.add_argument(
        "--long-seqs",
        default="truncate",
        choices=LONG_SEQS,
        help="records longer than the model: their head, or overlapping windows",
    )
    p.add_argument("--out", default="embeddings.npy", help=".npy (+ .ids.txt) or .pt")
    p.add_argument(
        "--id-column", default=None, help="table column naming the records (default: record number)"
    )

    p = command("export", export, "write a Hugging Face or HELM-native folder to share the model")
    p.add_argument("--format", required=True, choices=["hf", "helm"], help="hf: transformers")
    p.add_argument("--out", required=True, help="the folder to write")
    return parser


def checkpoint_of(path: str) -> str:
    """CKPT as given, or for a run folder (one holding checkpoints/) its best.pt, else last.pt,
    saying which. Other folders (a HF or HELM-native export) are for the loader to read."""
    folder = Path(path)
    if not (folder / "checkpoints").is_dir():
        return path
    for name in ("best.pt", "last.pt"):
        if (folder / "checkpoints" / name).is_file():
            log.info("%s is a run folder: using its checkpoints/%s", path, name)
            return str(folder / "checkpoints" / name)
    raise EvalError(f"{path} is a run folder without a checkpoint yet (no checkpoints/last.pt)")


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


POSITIVE = {
    "num": "--num",
    "batch_size": "--batch_size",
    "feature_batch_size": "--feature-batch-size",
    "max_epochs": "--max-epochs",
    "patience": "--patience",
    "max_length": "--max-length",
}


def run(args) -> int:
    """Check the arguments and the paths they name (before any model loads), then run the command."""
    for dest, flag in POSITIVE.items():
        value = getattr(args, dest, None)
        if value is not None and value < 1:
            raise EvalError(f"{flag} must be >= 1, got {value}")
    if not Path(args.checkpoint).exists():
        raise EvalError(f"{args.checkpoint}: no such checkpoint or folder")
    args.checkpoint = checkpoint_of(args.checkpoint)
    if args.command in ("pretrain", "embed"):
        check_input_file("--file", args.file)
    for flag, dest in (("--file", "file"), ("--prefix-file", "prefix_file")):
        if args.command in ("downstream", "generate") and getattr(args, dest, None) is not None:
            if not Path(getattr(args, dest)).exists():
                raise EvalError(f"{flag} {getattr(args, dest)}: no such file or folder")
    return args.func(args)


def check_input_file(flag: str, path: str) -> None:
    """One line for a sequence file that is missing or is a folder, before anything loads."""
    if Path(path).is_dir():
        raise EvalError(f"{flag} {path} is a folder: give a sequence file (txt, csv/tsv, fasta)")
    if not Path(path).is_file():
        raise EvalError(f"{flag} {path}: no such file")


if __name__ == "__main__":
    sys.exit(main())
