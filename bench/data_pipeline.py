"""Data-pipeline benchmark: tokenization speed, loader speed, and memory while building the cache.

    python bench/data_pipeline.py --out bench/results/data_pipeline_cpu.json

1. Tokenization: ``3mer`` ``encode_batch`` over the whole corpus on one core (the process is pinned
   to one CPU), in MB of nucleotides per second, against a plain Python loop that slices codons and
   looks them up in a dict, measured in the same run on the same sequences.
2. Loader: tokens per second read from the `TokenStore` in shuffled batches: ``store[i]``,
   truncation to ``--max-seq-len``, framing ``<cls> ... <eos>`` and padding into (B, T) tensors with
   the training code's `frame` and `pad_batch`. Single process.
3. Peak RSS (VmHWM, i.e. ``getrusage``'s ru_maxrss for this process image) of a fresh process that builds the cache for the corpus, and for
   a corpus ten times larger (its records repeated 10x); both corpora are written as txt first so
   only the size differs. Flat RSS means the build streams.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from helm.kernels.bench.rows import cpu_name  # noqa: E402

DEFAULT_CORPUS = (
    "../shared/data/pretrain_human_mrna_orfs_dm3loc/human_refseq_mrna_longest_orf.fa.gz"
)
TARGETS = {"tokenize_MBps": 100.0, "tokenize_speedup": 4.0, "loader_tokens_per_s": 1e6}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    Linux keeps ``ru_maxrss`` across fork + exec, so a child would report its parent's peak; the
    ``VmHWM`` line of /proc/self/status is the same high-water mark for this process image only.
    Elsewhere fall back to getrusage.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def plain_codon_loop(seqs: list[str]) -> list[np.ndarray]:
    """The baseline: slice each codon and look it up in a dict, in pure Python."""
    from helm.vocab import UNK_ID, codon_id, kmers

    table = {c: codon_id(c) for c in kmers(3)}
    out = []
    for s in seqs:
        ids = [table.get(s[i : i + 3], UNK_ID) for i in range(0, len(s) - 2, 3)]
        out.append(np.array(ids, dtype=np.int64))
    return out


def bench_tokenize(seqs: list[str], repeats: int) -> dict:
    from helm.tokenizers import build_tokenizer

    tok = build_tokenizer("3mer")
    mb = sum(map(len, seqs)) / 1e6
    fast = tok.encode_batch(seqs)
    slow = plain_codon_loop(seqs)
    # Both sides must produce the same ids, or the comparison means nothing.
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow)), "tokenizer != plain loop"
    t_fast = best_of(lambda: tok.encode_batch(seqs), repeats)
    t_slow = best_of(lambda: plain_codon_loop(seqs), max(1, repeats // 2))
    return {
        "MB": round(mb, 2),
        "tokenize_MBps": round(mb / t_fast, 1),
        "plain_loop_MBps": round(mb / t_slow, 1),
        "tokenize_speedup": round(t_slow / t_fast, 1),
    }


def bench_loader(store, batch_size: int, max_seq_len: int, epochs: int) -> dict:
    from helm.data.dataset import frame, pad_batch

    def one_epoch(order: np.ndarray) -> int:
        tokens = 0
        for b in range(0, len(order), batch_size):
            rows = [
                frame(store[i][: max_seq_len - 2], causal=False) for i in order[b : b + batch_size]
            ]
            pad_batch(rows)  # (B, T) input ids and attention mask
            tokens += sum(len(r) for r in rows)
        return tokens

    rng = np.random.default_rng(0)
    best = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(store))
        start = time.perf_counter()
        tokens = one_epoch(order)
        best = max(best, tokens / (time.perf_counter() - start))
    return {
        "loader_tokens_per_s": round(best),
        "batch_size": batch_size,
        "max_seq_len": max_seq_len,
    }


def build_in_child(corpus: Path, cache_dir: Path) -> dict:
    """Build the cache in a fresh process so its peak RSS is not the parent's."""
    cmd = [sys.executable, __file__, "--child-build", str(corpus), str(cache_dir)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def child_build(corpus: str, cache_dir: str) -> None:
    from helm.data.cache import build_token_cache
    from helm.tokenizers import build_tokenizer

    tok = build_tokenizer("3mer")
    baseline = peak_rss_mb()
    start = time.perf_counter()
    store = build_token_cache(corpus, tok, cache_dir, on_invalid="skip", show_progress=False)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "corpus_MB": round(os.path.getsize(corpus) / 1e6, 1),
                "records": len(store),
                "tokens": store.num_tokens,
                "build_s": round(seconds, 2),
                "rss_after_imports_MB": round(baseline, 1),
                "peak_rss_MB": round(peak_rss_mb(), 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=os.path.normpath(REPO / DEFAULT_CORPUS))
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--child-build", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_build:
        child_build(*args.child_build)
        return

    from helm.data.cache import build_token_cache
    from helm.data.io import read_sequences
    from helm.tokenizers import build_tokenizer

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, children included
    seqs, report = read_sequences(args.corpus, on_invalid="skip", require_codons=True)
    print(report.summary())
    results: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_name(cores=False),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "corpus": args.corpus,
        "records": len(seqs),
        # The box may be shared: throughput figures mean little without the load they ran under.
        "loadavg_1min_before": round(os.getloadavg()[0], 2),
    }
    results["tokenize"] = bench_tokenize(seqs, args.repeats)

    with tempfile.TemporaryDirectory(prefix="helm-bench-") as tmp:
        tmp = Path(tmp)
        store = build_token_cache(
            args.corpus, build_tokenizer("3mer"), tmp / "c0", on_invalid="skip"
        )
        results["loader"] = bench_loader(store, args.batch_size, args.max_seq_len, args.repeats)
        for factor in (1, 10):
            path = tmp / f"corpus_x{factor}.txt"
            with open(path, "w") as f:
                for _ in range(factor):
                    f.writelines(s + "\n" for s in seqs)
            results[f"build_x{factor}"] = build_in_child(path, tmp / f"c{factor}")
            path.unlink()
    del seqs

    results["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    r1, r10 = results["build_x1"], results["build_x10"]
    results["targets"] = {
        "tokenize_MBps >= 100": results["tokenize"]["tokenize_MBps"] >= 100,
        "tokenize_speedup >= 4": results["tokenize"]["tokenize_speedup"] >= 4,
        "loader_tokens_per_s >= 1e6": results["loader"]["loader_tokens_per_s"] >= 1e6,
        # "Flat": ten times the data may cost at most 10% (or 20 MB) more peak memory.
        "rss_flat_10x": r10["peak_rss_MB"] <= max(1.1 * r1["peak_rss_MB"], r1["peak_rss_MB"] + 20),
    }
    print_table(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


def print_table(r: dict) -> None:
    t, ld, r1, r10 = r["tokenize"], r["loader"], r["build_x1"], r["build_x10"]
    rows = [
        ("corpus", f"{r['records']:,} records, {t['MB']} MB of nucleotides"),
        ("tokenize 3mer (1 core)", f"{t['tokenize_MBps']} MB/s"),
        ("plain Python codon loop", f"{t['plain_loop_MBps']} MB/s"),
        ("speedup", f"{t['tokenize_speedup']}x"),
        ("loader (store+frame+pad)", f"{ld['loader_tokens_per_s'] / 1e6:.2f} M tokens/s"),
        ("cache build 1x", f"{r1['build_s']} s, peak RSS {r1['peak_rss_MB']} MB"),
        ("cache build 10x", f"{r10['build_s']} s, peak RSS {r10['peak_rss_MB']} MB"),
        ("RSS after imports", f"{r1['rss_after_imports_MB']} MB"),
        ("load average (1 min)", f"{r['loadavg_1min_before']} -> {r['loadavg_1min_after']}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for name, ok in r["targets"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")


if __name__ == "__main__":
    main()
