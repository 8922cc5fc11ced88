"""Training-throughput benchmark: tokens per second, step time, MFU and peak memory of the real
training step, on synthetic batches.

    python bench/train_throughput.py --preset quickstart            # CPU: the quickstart model
    python bench/train_throughput.py --preset recipes [--compile]   # one CUDA device: 50M recipes

What is measured is one optimizer update exactly as train.py runs it, nothing more: the
``LanguageModel`` (backbone + LM head on every position), the configured ``HelmLoss``, the
optimizer, built by ``helm.lm.build_training`` as train.py builds them, ``helm.lm.forward_backward``
under train.py's precision policy (bf16 autocast with ``--amp``), and ``helm.lm.optimizer_step``
(the gradient norm, clipped when the config sets ``clip-grad``, the step, ``zero_grad``). Each case is
resolved from its YAML file by ``helm.config.parse_config``, so flags, defaults and validation are
train.py's own; extra train.py flags after ``--`` apply to every case (``-- --loss HXE``).

The data are SYNTHETIC: no files are read and no loader runs. A few fixed-length batches of random
codons, framed ``<cls> ... <eos>`` as the dataset frames them, are built on the device once and
cycled: CLM inputs and labels are the row shifted by one; MLM selects each content position with
probability ``masking_ratio`` (0.15) and replaces it with ``<mask>``. No row is padded, so there is
no attention mask (as ``collate_lm`` drops it). Data loading, evaluation, logging and checkpoints
are therefore excluded.

Timing: ``--warmup`` updates (autotuning, ``--compile``'s compilation, allocator growth) are run
and discarded; then ``--repeats`` blocks of ``--steps`` updates are timed with ``time.perf_counter``
around ``torch.cuda.synchronize()`` on both ends (on CPU the step is synchronous). The step time is
the median over blocks of block time / steps; tokens/s is batch x length / step time (input tokens,
as train.py's ``train/tokens_per_s``). MFU = tokens/s x ``flops_per_token`` (6N + the attention term
for gpt2/bert) / ``peak_flops`` (dense bf16 peak, known GPUs only). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed updates on CUDA and the process's peak RSS
(VmHWM) on CPU. On a CPU shared with other work, ``--threads 1`` keeps OpenMP workers from
waiting on busy cores (on a busy 2-core host the quickstart step ran several times slower with 2
threads).

Presets:
- ``recipes`` (CUDA only; without one it says so and exits 0): the original HELM 50M recipes from
  configs/ at L = 444, batch 128, bf16, vocabulary 69: gpt2 10x640/2560 CLM and MLM, mamba CLM
  40x256/1024, bi-mamba MLM 20x256/1024, hyena 7x768/3072 CLM and MLM; ``bert_mlm`` (gpt2_mlm's
  dimensions, post-LN) when named in ``--cases``. Target: GPT-2 50M at >= 40% MFU on one H100.
- ``quickstart`` (CPU or CUDA): configs/quickstart.yaml's gpt2 2x128, 4 heads, FFN 512, length
  128, batch 32, MLM with the HXE loss, fp32 unless ``--amp``.

Results are printed as a table and written as JSON (device, versions, date, command, one row per
case) to ``--out`` (default bench/results/train_throughput_<device>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from helm.checkpoint import seed_everything
from helm.config import parse_config
from helm.hierarchy import build_hierarchy
from helm.kernels.bench.rows import RowLog
from helm.lm import build_training, forward_backward, mfu, optimizer_step, peak_flops
from helm.logger import setup_logging
from helm.tokenizers import build_tokenizer
from helm.vocab import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# case -> train.py flags; every recipe is its configs/ file as released.
PRESETS: dict[str, dict[str, list[str]]] = {
    "recipes": {
        "gpt2_clm": ["--config", str(CONFIGS / "gpt2_clm.yaml")],
        "gpt2_mlm": ["--config", str(CONFIGS / "gpt2_mlm.yaml")],
        "bert_mlm": ["--config", str(CONFIGS / "gpt2_mlm.yaml"), "--model_name", "bert"],
        "mamba_clm": ["--config", str(CONFIGS / "mamba_clm.yaml")],
        "bimamba_mlm": ["--config", str(CONFIGS / "bimamba_mlm.yaml")],
        "hyena_clm": ["--config", str(CONFIGS / "hyena_clm.yaml")],
        "hyena_mlm": ["--config", str(CONFIGS / "hyena_mlm.yaml")],
    },
    "quickstart": {"gpt2_quickstart": ["--config", str(CONFIGS / "quickstart.yaml")]},
}
DEFAULT_CASES = {"recipes": [c for c in PRESETS["recipes"] if c != "bert_mlm"]}
MFU_TARGET = ("gpt2", 0.40, "H100")  # GPT-2 50M >= 40% MFU on one H100
TARGET_NOTE = "GPT-2 50M (gpt2_clm, gpt2_mlm) >= 40% MFU on one H100 (bf16, L 444, batch 128)"
NUM_BATCHES = 4  # distinct synthetic batches cycled through the steps


def resolve_case(
    flags: list[str], extra: list[str], opts: argparse.Namespace
) -> argparse.Namespace:
    """train.py's resolved config for one case. A (never read) --train_file keeps parse_config from
    layering quickstart.yaml under a recipe, exactly as a real run that names its data."""
    argv = [*flags, "--train_file", "synthetic", *extra]
    if opts.batch_size is not None:
        argv += ["--batch_size", str(opts.batch_size)]
    if opts.seq_len is not None:
        argv += ["--max_seq_len", str(opts.seq_len)]
    if opts.amp:
        argv += ["--amp"]
    if opts.compile:
        argv += ["--compile"]
    args = parse_config(argv)
    if opts.amp is False:  # --no-amp: a store_true flag set by YAML has no command-line "off"
        args.amp = False
    return args


def synthetic_batches(args, tokenizer, device: torch.device, n: int) -> list[dict]:
    """``n`` fixed-length (B, T) batches of random codons, framed and masked as LMDataset does."""
    B, T = args.batch_size, args.max_seq_len
    tokens = tokenizer.tokens
    codons = torch.tensor([i for i, t in enumerate(tokens) if not t.startswith("<")])
    cls, eos, mask = (tokenizer.token_to_id(t) for t in ("<cls>", "<eos>", "<mask>"))
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(n):
        width = T + 1 if args.mode == "clm" else T  # CLM drops one token from each end
        row = codons[torch.randint(len(codons), (B, width), generator=gen)]  # (B, width)
        row[:, 0], row[:, -1] = cls, eos
        if args.mode == "clm":
            input_ids, labels = row[:, :-1], row[:, 1:].clone()
        else:
            picked = torch.rand(B, T, generator=gen) < args.masking_ratio
            picked[:, [0, -1]] = False  # frame tokens are never targets
            labels = torch.where(picked, row, IGNORE_INDEX)
            input_ids = torch.where(picked, mask, row)
        batch = {"input_ids": input_ids.contiguous(), "labels": labels}
        if args.position_ids:
            batch["position_ids"] = torch.arange(T).expand(B, T).contiguous()
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float | None:
    """This process's peak resident set size (VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure(case: str, args, opts: argparse.Namespace, device: torch.device) -> dict:
    """Build the case as train.py would, run the warm-up, time the repeats; one result row."""
    tokenizer = build_tokenizer(
        args.tokenizer, overlap=args.overlap, vocab_size=None, data_type=args.data_type
    )
    seed_everything(args.seed)
    parts = build_training(
        vars(args),
        tokenizer=tokenizer,
        hierarchy=build_hierarchy(args.hierarchy, args.seed),
        device=device,
        global_batch=args.batch_size,
    )
    model, cfg = parts.model, parts.model_config
    n_params = sum(p.numel() for p in model.parameters())
    train_model = torch.compile(model) if args.compile else model
    batches = synthetic_batches(args, tokenizer, device, NUM_BATCHES)
    model.train()
    losses = []

    def step(i: int) -> None:
        loss_sum, n_targets, _ = forward_backward(
            train_model, [batches[i % NUM_BATCHES]], parts.loss_fn, parts.scaler, parts.amp, 1
        )
        optimizer_step(
            model, parts.optimizer, parts.scaler, clip_grad=args.clip_grad, clip_mode=args.clip_mode
        )
        if i % opts.steps == 0:
            losses.append(loss_sum / n_targets)  # a tensor: read after timing, no sync here

    t_start = time.perf_counter()
    for i in range(opts.warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - t_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    block_s = []
    for r in range(opts.repeats):
        sync(device)
        t0 = time.perf_counter()
        for i in range(opts.steps):
            step(r * opts.steps + i)
        sync(device)
        block_s.append(time.perf_counter() - t0)
    step_s = [t / opts.steps for t in block_s]
    median_s = statistics.median(step_s)
    tokens = args.batch_size * args.max_seq_len
    flops = model.backbone.flops_per_token(args.max_seq_len)  # the model states its FLOPs
    peak = peak_flops(device)
    final_loss = float(losses[-1])
    if not torch.isfinite(torch.tensor(final_loss)):
        raise RuntimeError(f"{case}: non-finite loss {final_loss}")
    if device.type == "cuda":
        peak_mem, mem_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak_mem, mem_kind = peak_rss_mb(), "process_peak_rss"
    tok_s = tokens / median_s
    row = {
        "case": case,
        "model": args.model_name,
        "mode": args.mode,
        "loss": args.loss,
        "params_M": round(n_params / 1e6, 3),
        "num_layers": args.num_layers,
        "d_model": args.hidden_size,
        "d_ff": cfg.d_ff,
        "vocab_size": tokenizer.vocab_size,
        "batch_size": args.batch_size,
        "seq_len": args.max_seq_len,
        "amp": "bfloat16" if args.amp else "float32",
        "compile": bool(args.compile),
        "step_ms_median": median_s * 1e3,
        "step_ms_min": min(step_s) * 1e3,
        "step_ms_repeats": [round(s * 1e3, 3) for s in step_s],
        "tokens_per_s": tok_s,
        "flops_per_token": flops,
        "achieved_tflops": tok_s * flops / 1e12,
        "mfu": mfu(tok_s, flops, peak) if peak else None,
        "peak_mem_mb": peak_mem,
        "peak_mem_kind": mem_kind,
        "warmup_s": warmup_s,
        "final_loss": final_loss,
    }
    if args.compile:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def device_label(device: torch.device) -> tuple[str, str]:
    """(human-readable name, file-name slug) of the device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name, "cpu"


def print_table(rows: list[dict], device_name: str) -> None:
    head = (
        f"{'case':<16} {'params':>7} {'B x T':>9} {'dtype':>8} | {'step ms':>9} "
        f"{'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>7} | {'peak MB':>9}"
    )
    print(head)
    print("-" * len(head))
    model, target, gpu = MFU_TARGET
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:5.1f}%"
        mark = ""
        if r["mfu"] is not None and r["model"] == model and gpu in device_name:
            mark = " " if r["mfu"] >= target else "!"
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:9.0f}"
        print(
            f"{r['case']:<16} {r['params_M']:6.2f}M {r['batch_size']:>3}x{r['seq_len']:<5} "
            f"{r['amp'][:8]:>8} | {r['step_ms_median']:9.2f} {r['tokens_per_s']:11,.0f} "
            f"{r['achieved_tflops']:8.3f} {mfu:>6}{mark or ' '}| {mem:>9}"
        )
    print(f"target: {TARGET_NOTE} ('!' marks a miss). peak MB: {rows[0]['peak_mem_kind']}.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags after '--' are train.py flags applied to every case (e.g. -- --loss HXE).",
    )
    p.add_argument("--preset", choices=list(PRESETS), default="quickstart")
    p.add_argument("--cases", nargs="+", default=None, help="subset of the preset's cases")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: as the case's config says: on for recipes)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as train.py")
    p.add_argument("--batch-size", type=int, default=None, help="override the config's batch")
    p.add_argument("--seq-len", type=int, default=None, help="override the config's max_seq_len")
    p.add_argument("--warmup", type=int, default=None, help="discarded updates (default 3; 10 GPU)")
    p.add_argument("--steps", type=int, default=10, help="updates per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/...)")
    opts = p.parse_args(argv)

    cases = opts.cases or DEFAULT_CASES.get(opts.preset, list(PRESETS[opts.preset]))
    unknown = sorted(set(cases) - set(PRESETS[opts.preset]))
    if unknown:
        p.error(
            f"--preset {opts.preset} has no case(s) {unknown}; known: {list(PRESETS[opts.preset])}"
        )
    cuda = torch.cuda.is_available()
    if opts.preset == "recipes" and not cuda:
        print(
            "train_throughput --preset recipes needs a CUDA device; none found, nothing measured."
        )
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.warmup is None:
        opts.warmup = 10 if cuda else 3
    setup_logging(True, None)  # fast-path choices (mamba-ssm, kernels) are logged once
    logging.getLogger("helm").setLevel(logging.WARNING)

    device_name, slug = device_label(device)
    load_before = os.getloadavg()[0]  # other work on the host skews CPU timings
    print(f"{opts.preset}: {', '.join(cases)} on {device_name} (torch {torch.__version__})")
    out = opts.out or REPO / "bench" / "results" / f"train_throughput_{slug}.json"
    log = RowLog(out.parent, out.stem)  # each case as it is measured: <out>.jsonl
    rows = []
    for case in cases:
        args = resolve_case(PRESETS[opts.preset][case], extra, opts)
        rows.append(measure(case, args, opts, device))
        log.append(rows[-1])
        r = rows[-1]
        print(f"done {case}: {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    print_table(rows, device_name)

    meta = {
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "loadavg_1min_before": load_before,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "preset": opts.preset,
        "peak_flops": peak_flops(device),
        "warmup_steps": opts.warmup,
        "steps_per_repeat": opts.steps,
        "repeats": opts.repeats,
        "data": "synthetic fixed-length batches on the device; no data loading",
        "target": TARGET_NOTE,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
