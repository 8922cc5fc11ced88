"""Mutation check: does the test suite notice when the code is wrong?

Each entry of ``MUTATIONS`` is one small, plausible bug: a file, an exact snippet of today's code
(found exactly once), its replacement, and the tests that must catch it. For every entry the
repository is copied to a temporary folder (the working tree is never touched), the snippet is
replaced in the copy, the listed tests run there (``pytest -x``, with a timeout), and the copy is
restored. The mutation is *killed* when the tests fail (or time out), *survived* when they pass.
First every distinct test selection runs once on the unmutated copy and must pass, so that a kill
means the mutation, not a broken test.

    python bench/mutations.py                  # all; writes bench/results/mutations_cpu.json
    python bench/mutations.py --only d03 m07   # some, by id (prints; writes only with --out)
    python bench/mutations.py --list           # the mutations and their tests
    python bench/mutations.py --check          # only that every snippet matches exactly once

When a bug is found, add its mutation here with the test that now kills it. Exit status: 0 when
every mutation is killed, 1 when one survives, 2 when the list itself is wrong (a snippet that no
longer matches once, a test selection that fails or selects nothing on the unmutated tree).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helm.kernels.bench.rows import cpu_name  # noqa: E402

OUT = ROOT / "bench" / "results" / "mutations_cpu.json"


@dataclass(frozen=True)
class Mutation:
    id: str
    area: str
    file: str
    original: str
    replacement: str
    tests: str  # pytest arguments, from the repository root
    bug: str  # what a user would lose


M = Mutation
EQ, MODELS, TRAIN = "tests/test_equivalence.py", "tests/test_models.py", "tests/test_train.py"
PROTOCOL = "helm/downstream/protocol.py"
MUTATIONS = [
    # models ---------------------------------------------------------------------------------
    M("m07", "models", "helm/models/hyena.py", "        return x + self.mlp(self.ln_2(x))\n\n    def allocate",
      "        return self.mlp(self.ln_2(x))\n\n    def allocate",
      f"{EQ} -k hyena", "Hyena block drops its MLP residual"),
    M("m-gpt2-mlp-res", "models", "helm/models/gpt2.py",
      "        x = x + self.attn(self.ln_1(x), att)\n        return x + self.mlp(self.ln_2(x))",
      "        x = x + self.attn(self.ln_1(x), att)\n        return self.mlp(self.ln_2(x))",
      f"{EQ} -k gpt2", "GPT-2 block drops its MLP residual"),
    M("m-bert-post-ln", "models", "helm/models/bert.py", "        x = self.ln_1(x + self.attn(x, att))",
      "        x = x + self.attn(self.ln_1(x), att)", f"{EQ} -k bert", "BERT block turned pre-LN"),
    M("m-bert-head-order", "models", "helm/models/common.py",
      "h = self.norm(F.gelu(self.dense(hidden)))", "h = F.gelu(self.norm(self.dense(hidden)))",
      f"{EQ} -k bert", "BERT MLM head: norm and GELU swapped"),
    M("m-mamba-mlp-res", "models", "helm/models/mamba.py",
      "            delta = delta + mlp(mlp_norm(x + delta))", "            delta = mlp(mlp_norm(x + delta))",
      f"{EQ} -k mamba_block", "Mamba block with MLP drops the mixer's residual update"),
    M("m-mamba-mlp-in", "models", "helm/models/mamba.py",
      "            delta = delta + mlp(mlp_norm(x + delta))", "            delta = delta + mlp(mlp_norm(x))",
      f"{EQ} -k mamba_block", "Mamba MLP reads the block input, not the mixer's output"),
    M("m-mamba-shared-mlp-res", "models", "helm/models/mamba.py",
      "            x = x + self.mlp(self.mlp_norm(x))", "            x = self.mlp(self.mlp_norm(x))",
      "tests/test_mamba.py -k 'shared or no_mlp or sees_both'", "shared-MLP bidirectional Mamba drops the MLP residual"),
    M("m-mamba-decode-mlp", "models", "helm/models/mamba.py",
      "delta = delta + self.mlp(self.mlp_norm(xt + delta))", "delta = delta + self.mlp(self.mlp_norm(xt))",
      "tests/test_generate.py -k cached_logits", "cached Mamba decoding feeds the MLP the wrong input"),
    M("m-mamba-A-sign", "models", "helm/models/mamba.py",
      "        A = -torch.exp(self.A_log.float())  # (d_inner, N)", "        A = torch.exp(self.A_log.float())  # (d_inner, N)",
      f"{EQ} -k mamba", "Mamba-1 state grows instead of decaying"),
    M("m-mamba2-A-sign", "models", "helm/models/mamba.py",
      "            x.reshape(Bsz, T, self.nheads, P), dt, -torch.exp(self.A_log.float()),",
      "            x.reshape(Bsz, T, self.nheads, P), dt, torch.exp(self.A_log.float()),",
      f"{EQ} -k mamba2", "Mamba-2 state grows instead of decaying"),
    M("m-swiglu", "models", "helm/models/common.py", "        return F.silu(a) * b", "        return F.silu(b) * a",
      f"{MODELS} -k every_activation", "swiglu gates the wrong half"),
    M("m-rmsnorm", "models", "helm/models/common.py", "xf.pow(2).mean(-1, keepdim=True) + self.eps",
      "xf.pow(2).sum(-1, keepdim=True) + self.eps", f"{MODELS} -k output_values", "RMSNorm by the sum of squares"),
    M("m-rotary-sign", "models", "helm/models/common.py", "[x1 * cos - x2 * sin, x2 * cos + x1 * sin]",
      "[x1 * cos + x2 * sin, x2 * cos - x1 * sin]", f"{EQ} -k rotary", "rotary rotates the wrong way"),
    M("m-sincos", "models", "helm/models/common.py", "table[:, 1::2] = torch.cos(pos * inv)",
      "table[:, 1::2] = torch.sin(pos * inv)", f"{MODELS} -k position_embeddings", "sincos table without cosines"),
    M("m-hyena-decay", "models", "helm/models/hyena.py", "decay = torch.exp(-t[:, None] * deltas)",
      "decay = torch.exp(-t[:, None] * deltas.flip(0))", f"{EQ} -k hyena", "Hyena filter decay rates reversed"),
    M("m-hyena-features", "models", "helm/models/hyena.py", "torch.cos(angle), -torch.sin(angle)",
      "torch.cos(angle), torch.sin(angle)", f"{EQ} -k hyena", "Hyena filter features conjugated"),
    M("m-hyena-skip", "models", "helm/ops/fftconv.py", "    y = y + x * D.to(acc)[:, None]", "    y = y + x",
      f"{EQ} -k hyena", "Hyena long convolution loses its skip weight D"),
    M("m-residual-init", "models", "helm/models/common.py", "std /= math.sqrt(2 * cfg.num_layers)",
      "std /= 1.0", f"{MODELS} -k depth_scaled", "GPT-2 init without depth-scaled residual projections"),
    M("m-pad-rows", "models", "helm/models/common.py", "                module.tok.weight[cfg.vocab_size :].zero_()",
      "                pass", f"{MODELS} -k padded_embedding", "embedding padding rows left random"),
    # attention masks ------------------------------------------------------------------------
    M("a-key-padding", "masks", "helm/models/gpt2.py",
      "allowed = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): key padding",
      "allowed = torch.ones_like(attention_mask, dtype=torch.bool)[:, None, None, :]",
      f"{MODELS} -k padding", "attention sees padding keys"),
    M("a-causal-triangle", "masks", "helm/models/gpt2.py",
      "torch.ones(T, T, dtype=torch.bool, device=device).tril()", "torch.ones(T, T, dtype=torch.bool, device=device).triu()",
      f"{MODELS} -k 'look_ahead or sdpa_mask'", "padded causal attention looks ahead"),
    M("a-bidirectional", "masks", "helm/models/gpt2.py",
      "sdpa_mask(tokens.attention_mask, T, causal=not cfg.bidirectional)", "sdpa_mask(tokens.attention_mask, T, causal=True)",
      f"{EQ} -k gpt2", "bidirectional attention models are causal"),
    M("a-self-row", "masks", "helm/models/gpt2.py",
      "    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)  # (B, 1, T, T)\n", "",
      f"{MODELS} -k 'only_padding or sdpa_mask'", "rows of only padding attend to nothing (NaN)"),
    M("a-kv-cache", "masks", "helm/models/gpt2.py", "mask = (seen <= step.positions[:, :, None])[:, None]",
      "mask = (seen < step.positions[:, :, None])[:, None]", "tests/test_generate.py -k 'cached_logits or different_lengths'",
      "cached decoding hides each token from itself"),
    M("a-hyena-pad", "masks", "helm/models/hyena.py", "            u = u * mask  # pads must not enter the (centred) short conv",
      "            pass", "tests/test_hyena.py -k garbage", "padding leaks into bidirectional Hyena"),
    M("a-hyena-causal-conv", "masks", "helm/models/hyena.py", "else (s - 1, 0)", "else (0, s - 1)",
      "tests/test_hyena.py -k 'short_conv or future'", "causal Hyena's short conv looks ahead"),
    M("a-mamba-reversal", "masks", "helm/models/mamba.py", "torch.where(t < lengths, lengths - 1 - t, t)",
      "T - 1 - t", "tests/test_mamba.py -k 'reversal or padding'", "bidirectional Mamba reverses the padding too"),
    # losses ---------------------------------------------------------------------------------
    M("l07", "losses", "helm/ops/path_loss.py",
      'loss = F.cross_entropy(z, targets.long(), ignore_index=ignore_index, reduction="none")',
      'loss = F.cross_entropy(z, targets.long(), ignore_index=-100, reduction="none")',
      "tests/test_losses.py -k 'ignore'", "fast XE ignores -100 whatever the caller asked"),
    M("l-xe-padding", "losses", "helm/ops/path_loss.py",
      "    z = logits[:, :V].to(acc)  # padded columns dropped = zero probability\n    loss = F.cross_entropy",
      "    z = logits.to(acc)\n    loss = F.cross_entropy", "tests/test_losses.py -k padding",
      "embedding padding columns get probability in XE"),
    M("l-hxe-weights", "losses", "helm/losses/tables.py", "    return np.exp(-alpha * d) / z",
      "    return np.exp(alpha * d) / z", "tests/test_losses.py -k hxe", "HXE weights grow with depth"),
    M("l-soft-beta", "losses", "helm/losses/tables.py", "logit = -beta * dist / float(hierarchy.height[0])",
      "logit = -beta * dist", "tests/test_losses.py -k 'soft or closed'", "soft labels ignore dist_max"),
    M("l-aa-group", "losses", "helm/losses/tables.py", "            coef[rows, D - 1] = -1.0",
      "            coef[rows, D - 2] = -1.0", "tests/test_losses.py -k 'closed or tree_walk'",
      "amino-acid loss on the grandparent group"),
    M("l-random-tree-seed", "losses", "helm/hierarchy.py", "perm = np.random.default_rng(seed).permutation",
      "perm = np.random.default_rng(0).permutation", "tests/test_hierarchy.py -k seeded",
      "--hierarchy random ignores --seed"),
    M("l-global-norm", "losses", "helm/lm.py", "    scale = world_size / n_targets.clamp(min=1)",
      "    scale = 1 / n_targets.clamp(min=1)", f"{TRAIN} -k gloo", "DDP loss divided by the world size twice"),
    # masking and data -----------------------------------------------------------------------
    M("k-mlm-labels", "masking", "helm/data/dataset.py", "        labels[pos] = framed[pos]",
      "        labels[pos] = self.mask_id", "tests/test_dataset.py -k mlm_targets", "MLM targets are <mask>"),
    M("k-mlm-specials", "masking", "helm/data/dataset.py", "allowed = content >= self.num_special",
      "allowed = content >= 0", "tests/test_dataset.py -k mlm_targets", "<unk> and specials become MLM targets"),
    M("k-clm-shift", "masking", "helm/data/dataset.py", "input_ids, labels = framed[:-1], framed[1:].copy()",
      "input_ids, labels = framed[:-1], framed[:-1].copy()", "tests/test_dataset.py -k clm", "CLM predicts the current token"),
    M("k-clm-cut-eos", "masking", "helm/data/dataset.py", "                labels[-1] = IGNORE_INDEX",
      "                pass", "tests/test_dataset.py -k truncation", "a cut CLM row is taught to end"),
    M("k-bert-80", "masking", "helm/data/dataset.py", "input_ids[pos[u < 0.8]] = self.mask_id",
      "input_ids[pos[u < 0.5]] = self.mask_id", "tests/test_dataset.py -k bert_replacement", "BERT 80/10/10 replacement off"),
    M("k-ratio", "masking", "helm/data/dataset.py", "            return rng.random(n) < ratio",
      "            return rng.random(n) < ratio / 2", "tests/test_dataset.py -k ratio", "half the masking ratio"),
    M("k-collate-labels", "masking", "helm/data/dataset.py",
      '"labels": _padded([item["labels"] for item in batch], T, IGNORE_INDEX)',
      '"labels": _padded([item["labels"] for item in batch], T, pad_id)', "tests/test_dataset.py -k collate",
      "padding becomes a target"),
    # tokenizers -----------------------------------------------------------------------------
    M("t-horner", "tokenizers", "helm/tokenizers/kmer.py", "            value <<= 2  # * 4", "            value <<= 1",
      "tests/test_tokenizers.py -k 'codon_ids or naive'", "k-mer ids folded in base 2"),
    M("t-unk", "tokenizers", "helm/tokenizers/kmer.py", "ids[value >= self._invalid] = UNK_ID",
      "ids[value > self._invalid] = UNK_ID", "tests/test_tokenizers.py -k non_acgt", "some unknown windows get k-mer ids"),
    M("t-overlap-decode", "tokenizers", "helm/tokenizers/kmer.py", "rows[1:, self.overlap :]",
      "rows[1:, self.stride :]", "tests/test_tokenizers.py -k decode", "overlapping k-mers decode wrongly"),
    M("t-u-as-t", "tokenizers", "helm/data/io.py", '_WHITESPACE_AND_U = str.maketrans({"U": "T", ',
      '_WHITESPACE_AND_U = str.maketrans({"U": "U", ', "tests/test_data_io.py", "RNA's U not read as T"),
    # trainer --------------------------------------------------------------------------------
    M("r02", "trainer", "helm/lm.py", "    scaler.unscale_(optimizer)\n    if clip_grad", "    if clip_grad",
      "tests/test_lm.py", "fp16 runs clip still-scaled gradients"),
    M("r13", "trainer", "train.py", "run.ema.update(run.model, step=state.step)", "run.ema.update(run.model)",
      f"{TRAIN} -k ema_with", "--model-ema-warmup ignored"),
    M("r10", "trainer", "helm/data/sampler.py", "    generator.manual_seed(seed)", "    generator.manual_seed(0)",
      "tests/test_sampler.py -k loader_seed", "workers seeded alike whatever --seed"),
    M("r10-order", "trainer", "train.py", "            seed=args.seed,\n            num_workers=num_workers(",
      "            seed=0,\n            num_workers=num_workers(", f"{TRAIN} -k seed_sets",
      "runs with different seeds share data order"),
    M("r-ema-lerp", "trainer", "helm/ema.py", "target.lerp_(value.to(target.dtype), 1.0 - decay)",
      "target.lerp_(value.to(target.dtype), decay)", "tests/test_optim.py -k ema", "EMA weights inverted"),
    M("r-no-decay-tags", "trainer", "helm/optim.py", 'no_decay = getattr(p, "_no_weight_decay", False) or p.ndim <= 1',
      "no_decay = p.ndim <= 1", "tests/test_optim.py -k 'weight_decay or not_decayed'", "position tables and filters decayed"),
    M("r-layer-decay", "trainer", "helm/optim.py", "layer_decay ** (num_layers + 1 - layer_id(name, num_layers))",
      "layer_decay ** layer_id(name, num_layers)", "tests/test_optim.py -k layer_decay", "layer decay upside down"),
    M("r-clip-mode", "trainer", "helm/optim.py", '    if mode == "norm":\n        return torch.nn.utils.clip_grad_norm_(params, value)',
      '    if mode == "norm":\n        return torch.nn.utils.clip_grad_norm_(params, float("inf"))',
      "tests/test_optim.py -k clip tests/test_lm.py", "--clip-grad does not clip"),
    M("r-accum", "trainer", "train.py", "itertools.islice(batches, args.grad_accum_steps)",
      "itertools.islice(batches, 1)", f"{TRAIN} -k many_flags", "--grad-accum-steps ignored"),
    # checkpoints and epoch selection --------------------------------------------------------
    M("c-best-min", "checkpoint", "helm/checkpoint/manager.py",
      'return metric < self.best_metric if self.mode == "min" else metric > self.best_metric',
      'return metric > self.best_metric if self.mode == "min" else metric < self.best_metric',
      "tests/test_checkpoint.py -k best", "best.pt is the worst epoch"),
    M("c-digest", "checkpoint", "helm/checkpoint/format.py", "        if stored != actual:",
      "        if stored is None:", "tests/test_checkpoint.py -k 'flipped or corrupt'", "corrupted checkpoints load"),
    M("c-data-position", "checkpoint", "train.py",
      'sampler.load_state_dict({"epoch": epoch, "batches_done": state.batches_done})',
      'sampler.load_state_dict({"epoch": epoch, "batches_done": 0})', f"{TRAIN} -k 'bit_for_bit and mid-epoch'",
      "a resumed run repeats the epoch's first batches"),
    M("c-rng", "checkpoint", "helm/checkpoint/state.py",
      "        set_rng_state(ckpt[\"rng\"][min(self.rank, len(ckpt[\"rng\"]) - 1)])", "        pass",
      f"{TRAIN} -k 'bit_for_bit and mid-epoch'", "a resumed run draws other dropout masks"),
    M("c-mode-default", "checkpoint", "helm/config.py",
      'args.val_metric_mode = "max" if args.eval_metric in _MAXIMISED else "min"',
      'args.val_metric_mode = "min"', "tests/test_config.py -k derived", "val_accuracy minimised"),
    # downstream -----------------------------------------------------------------------------
    M("d03", "downstream", PROTOCOL, "epoch, _ = select_at_best_val(val_curve, test_curve, mode)",
      "epoch, _ = select_at_best_val(test_curve, test_curve, mode)", "tests/test_protocol.py",
      "the best epoch chosen on the test curve"),
    M("d04", "downstream", PROTOCOL, "mu, sd = y[train].mean(axis=0), y[train].std(axis=0)",
      "mu, sd = y.mean(axis=0), y.std(axis=0)", "tests/test_protocol.py", "targets standardised with val/test"),
    M("d-argmax-epoch", "downstream", PROTOCOL, "epoch = int(np.argmax(keyed))", "epoch = int(np.argmin(keyed))",
      "tests/test_protocol.py", "the worst validation epoch reported"),
    M("d-patience", "downstream", PROTOCOL, "            if since_best >= patience:", "            if since_best > patience:",
      "tests/test_protocol.py", "one epoch more than --patience"),
    M("d-grid-mean", "downstream", PROTOCOL, "val_mean = float(np.nanmean(vals))", "val_mean = float(np.nanmax(vals))",
      "tests/test_protocol.py", "grid point chosen on its luckiest seed"),
    M("d-ridge-on-test", "downstream", PROTOCOL,
      "val = compute_metrics(task, data.targets[split.val], pred[split.val], data.label_names)",
      "val = compute_metrics(task, data.targets[split.test], pred[split.test], data.label_names)",
      "tests/test_protocol.py", "ridge penalty chosen on test"),
    M("d-feature-stats", "downstream", PROTOCOL, "    total = torch.zeros(feats[0].shape[-1], dtype=torch.float64)",
      "    records = range(len(feats))\n    total = torch.zeros(feats[0].shape[-1], dtype=torch.float64)",
      "tests/test_protocol.py", "features standardised with val/test statistics"),
    M("d-class-argmax", "downstream", "helm/downstream/metrics.py", "y_pred = scores.argmax(axis=1)",
      "y_pred = scores.argmin(axis=1)", "tests/test_downstream.py -k classification_metrics", "classes predicted by the lowest score"),
    M("d-auroc", "downstream", "helm/downstream/metrics.py", "ranks[y_true].sum() - n_pos * (n_pos + 1) / 2",
      "ranks[y_true].sum() - n_pos * (n_pos - 1) / 2", "tests/test_downstream.py -k 'auroc or classification_metrics'",
      "AUROC off by n_pos / (n_pos n_neg)"),
    # metrics --------------------------------------------------------------------------------
    M("x-argmax", "metrics", "helm/metrics.py", "        pred = z.argmax(-1)  # (N,)", "        pred = z.argmin(-1)  # (N,)",
      "tests/test_metrics.py", "accuracy of the least likely token"),
    M("x-topk", "metrics", "helm/metrics.py", "top = z.topk(k, dim=-1).indices", "top = z.topk(k, dim=-1, largest=False).indices",
      "tests/test_metrics.py", "dist@5 over the bottom five"),
    M("x-greedy", "metrics", "helm/generate.py", "best = logits.argmax(-1, keepdim=True)", "best = logits.argmin(-1, keepdim=True)",
      "tests/test_generate.py -k filters_keep", "greedy decoding picks the least likely codon"),
    # Hugging Face export --------------------------------------------------------------------
    M("h-conv1d-t", "hf", "helm/hf/gpt2.py", '("attn.c_proj", "attn.proj", "t")', '("attn.c_proj", "attn.proj", None)',
      f"{EQ} -k gpt2", "GPT-2 projections exported untransposed"),
    M("h-is-causal", "hf", "helm/hf/gpt2.py", "is_causal=not cfg.bidirectional,", "is_causal=True,",
      "tests/test_hf.py -k bidirectional_gpt2", "a GPT-2 MLM exports causal"),
    M("h-bert-qkv", "hf", "helm/hf/bert.py", 'enumerate(("query", "key", "value"))',
      'enumerate(("key", "query", "value"))', "tests/test_hf.py -k random_hf_bert",
      "BERT's query and key swapped across the HF boundary"),
]  # fmt: skip


# Running --------------------------------------------------------------------------------------


def copy_tree(dest: Path) -> Path:
    """The repository without git, caches, run folders or recorded results."""
    ignore = shutil.ignore_patterns(
        ".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "results"
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def run_pytest(tree: Path, tests: str, timeout: float, threads: int) -> dict:
    """The tests in ``tree``: outcome passed | failed | timeout | no tests | error, seconds, and
    the first failure's line."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HELM_CACHE_DIR": str(tree / ".helm-cache"),
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    pytest = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    cmd = pytest + shlex.split(tests)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and any worker it started
        proc.communicate()
        return {"outcome": "timeout", "seconds": round(time.perf_counter() - start, 1)}
    finally:
        shutil.rmtree(tree / ".helm-cache", ignore_errors=True)
    outcome = {0: "passed", 1: "failed", 5: "no tests"}.get(proc.returncode, "error")
    first = next((ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))), "")
    tail = "" if outcome in ("passed", "failed") else out.strip().splitlines()[-1:]
    return {"outcome": outcome, "seconds": round(time.perf_counter() - start, 1),
            "first_failure": first[:200], **({"tail": tail} if tail else {})}  # fmt: skip


def mutate(tree: Path, m: Mutation, timeout: float, threads: int) -> dict:
    path = tree / m.file
    text = path.read_text()
    found = text.count(m.original)
    if found != 1:
        return {"outcome": "stale", "seconds": 0.0, "first_failure": f"snippet found {found} times"}
    mutated = text.replace(m.original, m.replacement)
    if path.suffix == ".py":
        try:
            compile(mutated, str(path), "exec")
        except SyntaxError as exc:  # a mutation must be a bug, not a file that cannot import
            return {"outcome": "invalid", "seconds": 0.0, "first_failure": f"SyntaxError: {exc}"}
    path.write_text(mutated)
    try:
        return run_pytest(tree, m.tests, timeout, threads)
    finally:
        path.write_text(text)


def run_all(mutations: list[Mutation], jobs: int, timeout: float) -> tuple[dict, dict]:
    """(baseline per test selection, result per mutation id), ``jobs`` copies in parallel."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with tempfile.TemporaryDirectory(prefix="helm-mutations-") as tmp:
        trees: queue.Queue[Path] = queue.Queue()
        for j in range(jobs):
            trees.put(copy_tree(Path(tmp) / f"tree{j}"))

        def on_a_tree(fn, *args):
            tree = trees.get()
            try:
                return fn(tree, *args)
            finally:
                trees.put(tree)

        with ThreadPoolExecutor(jobs) as pool:

            def baseline(tests: str) -> dict:
                r = on_a_tree(run_pytest, tests, timeout, threads)
                print(f"baseline {r['outcome']:15s} {r['seconds']:6.1f}s  {tests}", flush=True)
                return r

            merged = baseline_runs({m.tests for m in mutations})
            base = dict(zip(merged, pool.map(baseline, merged)))
            if any(r["outcome"] != "passed" for r in base.values()):
                return base, {}

            def one(m: Mutation) -> dict:
                r = on_a_tree(mutate, m, timeout, threads)
                print(f"{m.id:24s} {verdict(r):9s} {r['seconds']:6.1f}s  {r.get('first_failure', '')[:90]}",
                      flush=True)  # fmt: skip
                return r

            results = dict(zip([m.id for m in mutations], pool.map(one, mutations)))
    return base, results


def baseline_runs(selections: set[str]) -> list[str]:
    """The baseline's pytest arguments: one run per test file, selecting the union of that file's
    ``-k`` expressions (or the whole file), and selections over several files as they are."""
    by_file: dict[str, list[str | None]] = {}
    runs = []
    for selection in sorted(selections):
        args = shlex.split(selection)
        if len(args) == 1 or (len(args) == 3 and args[1] == "-k"):
            by_file.setdefault(args[0], []).append(args[2] if len(args) == 3 else None)
        else:
            runs.append(selection)
    for file, exprs in sorted(by_file.items()):
        union = " or ".join(f"({e})" for e in exprs)
        runs.append(file if None in exprs else f"{file} -k {shlex.quote(union)}")
    return runs


def verdict(r: dict) -> str:
    return {"failed": "killed", "error": "killed", "timeout": "killed", "passed": "SURVIVED"}.get(
        r["outcome"], r["outcome"]
    )


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", metavar="ID", help="run these mutations only")
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    p.add_argument("--check", action="store_true", help="check that every snippet matches once")
    p.add_argument("--jobs", type=int, default=2, help="repository copies tested in parallel")
    p.add_argument("--timeout", type=float, default=300, help="seconds per test run")
    p.add_argument("--out", type=Path, default=None, help=f"results JSON (default {OUT.name} "
                   "under bench/results when all mutations run)")  # fmt: skip
    args = p.parse_args(argv)
    ids = [m.id for m in MUTATIONS]
    assert len(set(ids)) == len(ids), "mutation ids must be unique"
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        p.error(f"unknown ids: {sorted(set(args.only) - set(ids))}")
    if args.list:
        for m in chosen:
            print(f"{m.id:24s} {m.area:11s} {m.file:32s} {m.tests}\n{'':24s} {m.bug}")
        return 0
    stale = [m.id for m in chosen if (ROOT / m.file).read_text().count(m.original) != 1]
    if stale or args.check:
        print(f"{len(chosen) - len(stale)} of {len(chosen)} snippets match exactly once; "
              f"stale: {', '.join(stale) or 'none'}")  # fmt: skip
        return 2 if stale else 0
    start, load = time.perf_counter(), os.getloadavg()[0]
    base, results = run_all(chosen, args.jobs, args.timeout)
    if not results:
        print("a test selection fails on the unmutated tree: fix the list first")
        return 2
    killed = sum(verdict(r) == "killed" for r in results.values())
    by_area: dict[str, list[int]] = {}
    for m in chosen:
        by_area.setdefault(m.area, [0, 0])[1] += 1
        by_area[m.area][0] += verdict(results[m.id]) == "killed"
    print(f"score: {killed}/{len(chosen)} killed "
          + " ".join(f"{a} {k}/{n}" for a, (k, n) in by_area.items()))  # fmt: skip
    out = args.out if args.out is not None else (None if args.only else OUT)
    if out is not None:
        import torch  # only for the record

        dirty = bool(git("status", "--porcelain"))
        record = {
            "device": cpu_name(),
            "command": " ".join(["python", "bench/mutations.py", *(argv or sys.argv[1:])]),
            "date": datetime.now().isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else ""),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "jobs": args.jobs,
            "wall_s": round(time.perf_counter() - start, 1),
            "load_average_1min": [round(load, 1), round(os.getloadavg()[0], 1)],  # start, end
            "score": {"killed": killed, "total": len(chosen), "fraction": round(killed / len(chosen), 4)},
            "by_area": {a: f"{k}/{n}" for a, (k, n) in by_area.items()},
            "baseline": {t: {"outcome": r["outcome"], "seconds": r["seconds"]} for t, r in base.items()},
            "mutations": [{"id": m.id, "area": m.area, "file": m.file, "bug": m.bug, "tests": m.tests,
                           "result": verdict(results[m.id]), **results[m.id]} for m in chosen],
        }  # fmt: skip
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    if any(r["outcome"] in ("stale", "invalid", "no tests") for r in results.values()):
        return 2
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
