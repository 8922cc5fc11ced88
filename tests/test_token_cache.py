"""The token cache (helm.data.cache): contents, memmap backing, reuse, keys, crash safety, sharing."""

from __future__ import annotations

import fcntl
import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helm.data.cache import (
    TokenStore,
    build_token_cache,
    cache_dir,
    default_cache_dir,
    remove_stale_builds,
)
from helm.data.demo import write_demo_corpus
from helm.data.io import DataError, read_sequences
from helm.data.splits import resolve_splits
from helm.tokenizers import build_tokenizer

SEQS = ["ATGAAATAA", "ATGCCCGGGTGA", "ATGNNNTTTTAG", "ATG"]


def fasta(path: Path, seqs: list[str]) -> Path:
    path.write_text("".join(f">r{i}\n{s[:6]}\n{s[6:]}\n" for i, s in enumerate(seqs)))
    return path


def expected_codon_ids(seq: str) -> list[int]:
    """Codon ids from the vocabulary rule (AAA=5 ... TTT=68, base-4 over ACGT), N -> <unk>=3."""
    ids = []
    for i in range(0, len(seq) - len(seq) % 3, 3):
        codon = seq[i : i + 3]
        if set(codon) <= set("ACGT"):
            ids.append(5 + sum("ACGT".index(ch) * 4 ** (2 - j) for j, ch in enumerate(codon)))
        else:
            ids.append(3)
    return ids


class Counting:
    """A tokenizer wrapper that counts encode_batch calls and can fail on a chosen call."""

    def __init__(
        self, tokenizer, fail_on_call: int | None = None, extra_config: dict | None = None
    ):
        self._tok, self.calls, self.fail_on_call = tokenizer, 0, fail_on_call
        self._extra = extra_config or {}
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def config(self) -> dict:
        return {**self._tok.config(), **self._extra}

    def encode_batch(self, seqs):
        with self._lock:
            self.calls += 1
            if self.fail_on_call is not None and self.calls >= self.fail_on_call:
                raise RuntimeError("simulated crash")
        return self._tok.encode_batch(seqs)


@pytest.fixture
def codon_tok():
    return build_tokenizer("3mer")


def cache_entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir())


def test_store_matches_direct_encoding_and_vocabulary_rule(tmp_path, codon_tok):
    path = fasta(tmp_path / "x.fa", SEQS)
    store = build_token_cache(path, codon_tok, tmp_path / "cache")
    assert len(store) == 4 and store.vocab_size == 69
    assert store[0].tolist() == [19, 5, 53]  # ATG AAA TAA
    for i, seq in enumerate(SEQS):
        assert store[i].tolist() == expected_codon_ids(seq)
        assert np.array_equal(store[i], codon_tok.encode(seq))
    assert store[-1].tolist() == store[3].tolist()
    with pytest.raises(IndexError):
        store[4]
    assert store.lengths.tolist() == [3, 4, 4, 1]
    assert store.num_tokens == 12 and store.tokens.dtype == np.uint8
    assert store.meta["report"]["num_valid"] == 4 and store.meta["trailing_bases"] == 0


def test_store_is_memory_mapped_and_pickles_by_path(tmp_path, codon_tok):
    path = write_demo_corpus(tmp_path / "demo.txt", n=30, seed=0)
    store = build_token_cache(path, codon_tok, tmp_path / "cache")
    assert isinstance(store.tokens, np.memmap) and isinstance(store[5], np.memmap)
    assert isinstance(store.offsets, np.memmap)
    assert Path(store.tokens.filename) == (store.directory / "tokens.bin").resolve()
    blob = pickle.dumps(store)
    assert len(blob) < 1000  # the path, not the tokens
    clone = pickle.loads(blob)
    assert all(np.array_equal(clone[i], store[i]) for i in range(len(store)))


def test_second_build_reuses_the_cache(tmp_path, codon_tok):
    path = write_demo_corpus(tmp_path / "demo.txt", n=20, seed=0)
    first = Counting(codon_tok)
    a = build_token_cache(path, first, tmp_path / "cache")
    assert first.calls >= 1
    mtime = (a.directory / "tokens.bin").stat().st_mtime_ns
    again = Counting(codon_tok)
    b = build_token_cache(path, again, tmp_path / "cache")
    assert again.calls == 0 and b.directory == a.directory
    assert (b.directory / "tokens.bin").stat().st_mtime_ns == mtime
    assert cache_entries(tmp_path / "cache") == [a.directory.name]


def test_key_changes_with_file_tokenizer_options_and_split(tmp_path, codon_tok):
    cache = tmp_path / "cache"
    path = fasta(tmp_path / "x.fa", SEQS)
    base = build_token_cache(path, codon_tok, cache)
    other_config = build_token_cache(path, Counting(codon_tok, extra_config={"x": 1}), cache)
    assert other_config.directory != base.directory
    limited = build_token_cache(path, codon_tok, cache, num_samples=2)
    assert limited.directory != base.directory and len(limited) == 2

    fasta(path, SEQS + ["ATGGGGTGA"])
    os.utime(path, ns=(1, 1))  # even an old mtime: size and content changed
    changed = build_token_cache(path, codon_tok, cache)
    assert changed.directory != base.directory and len(changed) == 5
    assert changed[4].tolist() == expected_codon_ids("ATGGGGTGA")


def test_splits_tokenize_their_own_records(tmp_path, codon_tok):
    path = write_demo_corpus(tmp_path / "demo.txt", n=60, seed=2)
    seqs = read_sequences(path)[0]
    splits = resolve_splits(train_file=path, seed=0)
    stores = {k: build_token_cache(s, codon_tok, tmp_path / "cache") for k, s in splits.items()}
    assert len({s.directory for s in stores.values()}) == 3
    for name, split in splits.items():
        assert len(stores[name]) == len(split.indices)
        for j, i in enumerate(split.indices[:5]):
            assert stores[name][j].tolist() == expected_codon_ids(seqs[i])


def test_crash_mid_build_leaves_nothing_reusable(tmp_path, codon_tok):
    path = write_demo_corpus(tmp_path / "demo.txt", n=40, seed=0)
    cache = tmp_path / "cache"
    crashing = Counting(codon_tok, fail_on_call=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_token_cache(path, crashing, cache, chunk_chars=5000)
    assert crashing.calls == 2 and cache_entries(cache) == []  # no final dir, no temp dir left
    healthy = Counting(codon_tok)
    store = build_token_cache(path, healthy, cache, chunk_chars=5000)
    assert healthy.calls > 2 and len(store) == 40


def test_invalid_records_error_or_are_skipped_and_recorded(tmp_path, codon_tok):
    path = fasta(tmp_path / "x.fa", ["ATGAAATAA", "ATGAAAT", "ATGXAATAA"])
    with pytest.raises(DataError, match="2 invalid record"):
        build_token_cache(path, codon_tok, tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []
    store = build_token_cache(path, codon_tok, tmp_path / "cache", on_invalid="skip")
    assert len(store) == 1
    assert store.meta["report"]["invalid"] == {
        "length not a multiple of 3": 1,
        "invalid character": 1,
    }


def test_trailing_bases_of_a_non_codon_tokenizer_are_recorded(tmp_path):
    tok = build_tokenizer("6mer")
    path = tmp_path / "x.txt"
    path.write_text("ATGAAATAA\nATGAAATAAC\nACGTAC\n")
    store = build_token_cache(path, tok, tmp_path / "cache")
    assert store.meta["trailing_bases"] == 3 + 4 + 0
    assert store.lengths.tolist() == [1, 1, 1]


def test_concurrent_builders_tokenize_once(tmp_path, codon_tok):
    path = write_demo_corpus(tmp_path / "demo.txt", n=40, seed=0)
    counters = [Counting(codon_tok) for _ in range(3)]
    stores = [None] * 3

    def run(i: int) -> None:
        stores[i] = build_token_cache(path, counters[i], tmp_path / "cache", chunk_chars=5000)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c.calls > 0 for c in counters) == [False, False, True]
    assert len({s.directory for s in stores}) == 1


def _ddp_worker(rank: int, world_size: int, init_file: str, path: str, cache: str, out: str):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        counter = Counting(build_tokenizer("3mer"))
        store = build_token_cache(path, counter, cache)
        Path(out, f"rank{rank}").write_text(f"{counter.calls} {store.directory} {len(store)}")
    finally:
        dist.destroy_process_group()


def test_distributed_rank_zero_builds_and_others_reuse(tmp_path):
    import torch.multiprocessing as mp

    path = write_demo_corpus(tmp_path / "demo.txt", n=20, seed=0)
    args = (2, str(tmp_path / "init"), str(path), str(tmp_path / "cache"), str(tmp_path))
    # fork: the children inherit the imported modules instead of importing torch again.
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")
    calls0, dir0, n0 = (tmp_path / "rank0").read_text().split()
    calls1, dir1, n1 = (tmp_path / "rank1").read_text().split()
    assert int(calls0) > 0 and int(calls1) == 0
    assert dir0 == dir1 and n0 == n1 == "20"


def test_default_cache_dir_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HELM_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("HELM_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "helm" / "tokens"


def test_cache_dirs_of_every_kind(tmp_path, monkeypatch):
    monkeypatch.delenv("HELM_CACHE_DIR", raising=False)
    home = Path.home() / ".cache" / "helm"
    for kind in ("tokens", "features", "downstream"):
        assert cache_dir(kind) == home / kind
    monkeypatch.setenv("HELM_CACHE_DIR", str(tmp_path))
    assert cache_dir("tokens") == cache_dir("downstream") == tmp_path
    assert cache_dir("features") == tmp_path / "features"
    with pytest.raises(ValueError, match="kind"):
        cache_dir("nope")


def test_empty_corpus_gives_an_empty_store(tmp_path, codon_tok):
    path = tmp_path / "x.txt"
    path.write_text("\n")
    store = build_token_cache(path, codon_tok, tmp_path / "cache")
    assert len(store) == 0 and store.num_tokens == 0
    assert isinstance(TokenStore(store.directory), TokenStore)


def test_empty_or_all_invalid_corpus_is_refused_when_records_are_required(tmp_path, codon_tok):
    empty = tmp_path / "x.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match=f"{empty}: no records"):
        build_token_cache(empty, codon_tok, tmp_path / "cache", require_records=True)
    bad = tmp_path / "bad.txt"
    bad.write_text("ATGA\nXYZ\n")
    for _ in range(2):  # built, then reused: the same answer
        with pytest.raises(DataError, match=f"{bad}: no usable records \\(all 2 invalid"):
            build_token_cache(
                bad, codon_tok, tmp_path / "cache", on_invalid="skip", require_records=True
            )


def _leftover(cache: Path, key: str, owner: str) -> Path:
    folder = cache / f".{key}.tmp-{owner}-abc123"
    folder.mkdir(parents=True)
    (folder / "tokens.bin").write_bytes(b"\0" * 10)
    return folder


def test_killed_builds_are_removed_unless_a_live_build_holds_them(tmp_path, codon_tok):
    """A killed build's folder (this host, lock free) goes; a live build's (its key's lock held)
    stays, as does a recent one of another host (a shared filesystem); an old foreign one goes."""
    from helm.data.cache import HOST

    cache = tmp_path / "cache"
    dead = _leftover(cache, "a" * 20, HOST)
    live = _leftover(cache, "b" * 20, HOST)
    foreign = _leftover(cache, "c" * 20, "otherhost")
    old_foreign = _leftover(cache, "d" * 20, "otherhost")
    two_days_ago = time.time() - 2 * 86400
    for path in (old_foreign, old_foreign / "tokens.bin"):
        os.utime(path, (two_days_ago, two_days_ago))
    with open(cache / f"{'b' * 20}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder at work
        assert sorted(remove_stale_builds(cache)) == [dead, old_foreign]
    assert live.is_dir() and foreign.is_dir()

    # The next build of any corpus sweeps too; the lock is free now.
    path = fasta(tmp_path / "x.fasta", SEQS[:2])
    build_token_cache(path, codon_tok, cache)
    assert not live.exists() and foreign.is_dir()
