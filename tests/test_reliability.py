"""Reliability: every loader refuses a crafted or damaged file in one line, and nothing in it runs;
exports carry their digests; a full disk or a file-size limit is one line naming the path, with
the previous file intact and no temporary left; paths and settings that cannot be meant are refused
before any work; Ctrl-C during set-up stops at once; an interrupted 2-rank torchrun run resumes bit
for bit. (The fuzz tests in test_fuzz.py keep these fixed for arbitrary damage.)"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, TINY, load_script, require

from helm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from helm.checkpoint.__main__ import main as checkpoint_cli
from helm.config import ConfigError, config_warnings, parse_config
from helm.data.cache import build_token_cache
from helm.data.demo import write_demo_corpus
from helm.errors import WriteError
from helm.fileio import MANIFEST, read_manifest
from helm.tokenizers import KmerTokenizer

train = load_script("train.py")
evalpy = load_script("eval.py")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _minimal(w: float = 1.0) -> dict:
    from helm.checkpoint import REQUIRED_KEYS

    ckpt = {key: {} for key in REQUIRED_KEYS}
    ckpt.update(model={"w": torch.full((3,), w)}, epoch=0, step=0, batches_done=0, rng=[])
    return ckpt


def _fasta(path: Path) -> str:
    path.write_text("".join(f">s{i}\nATGAAACCCGGGTTT{'GCT' * i}TAA\n" for i in range(4)))
    return str(path)


def _error_lines(err: str, prog: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A HELM-native and a Hugging Face export of a tiny random GPT-2."""
    require("transformers")
    from helm.checkpoint import LoadedModel
    from helm.hf import export_helm, export_hf, run_config
    from helm.hierarchy import build_hierarchy
    from helm.models import build_model, model_config

    tok = KmerTokenizer(3)
    cfg = model_config("gpt2", vocab_size=tok.vocab_size, d_model=16, num_layers=1, num_heads=2,
                       d_ff=32, max_seq_len=32)  # fmt: skip
    model = build_model("gpt2", cfg).eval()
    about = {"model_name": "gpt2", "source": {"format": "test", "weights": "raw"}}
    loaded = LoadedModel(model, tok, build_hierarchy("true"), run_config("gpt2", cfg, tok), about)
    root = tmp_path_factory.mktemp("exports")
    return {"helm": export_helm(loaded, root / "helm"), "hf": export_hf(loaded, root / "hf")}


def _copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


# Loading: one line, nothing runs ---------------------------------------------------------------


def test_a_pickle_in_a_hugging_face_folder_is_refused_in_one_line(exports, tmp_path, capsys):
    transformers = require("transformers")
    folder = _copy(exports["hf"], tmp_path)
    for name in ("model.safetensors", MANIFEST):
        (folder / name).unlink()
    state = transformers.GPT2LMHeadModel.from_pretrained(exports["hf"]).state_dict()
    marker = tmp_path / "MARKER"
    torch.save({**state, "x": _Payload(marker)}, folder / "pytorch_model.bin")
    code = evalpy.main(["pretrain", str(folder), "--file", _fasta(tmp_path / "s.fasta")])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    (line,) = _error_lines(err, "eval.py")
    assert f"{folder / 'pytorch_model.bin'} is refused: it holds a reference to" in line


@pytest.mark.parametrize(
    "kind, name, text, says",
    [
        ("helm", "helm_config.json", "[1, 2]", "holds a JSON list"),
        ("helm", "helm_config.json", '{"format": "helm", ', "cannot be read as JSON"),
        ("helm", "helm_config.json",
         '{"format": "helm", "format_version": 1, "model_name": "gpt2", "model_config": [1], '
         '"config": {}}', "'model_config' is [1]"),
        ("hf", "config.json", '["gpt2"]', "holds a JSON list"),
    ],
)  # fmt: skip
def test_a_damaged_export_config_is_one_line_naming_it(exports, tmp_path, kind, name, text, says):
    from helm.hf import load_model

    folder = _copy(exports[kind], tmp_path)
    (folder / MANIFEST).unlink()  # damage that no digest reports: the config's own check
    (folder / name).write_text(text)
    with pytest.raises(CheckpointError, match=f"{folder / name} is damaged: ") as err:
        load_model(folder)
    assert says in str(err.value) and "\n" not in str(err.value)


# Digests and zip structure -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["helm", "hf"])
def test_exports_carry_digests_that_name_a_changed_file(exports, tmp_path, kind, capsys):
    from helm.hf import load_model

    folder = exports[kind]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(read_manifest(folder)) == [f for f in files if f != MANIFEST]
    assert checkpoint_cli(["verify", str(folder)]) == 0
    assert f"ok ({'HELM' if kind == 'helm' else 'Hugging Face'} folder" in capsys.readouterr().out
    copy = _copy(folder, tmp_path)
    with open(copy / "README.md", "a") as f:
        f.write("edited by its owner\n")
    load_model(copy)  # the model card is text; verify still names it
    assert checkpoint_cli(["verify", str(copy)]) == 2
    assert "README.md is damaged or was changed" in capsys.readouterr().err
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-3] ^= 0x01  # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match="model.safetensors is damaged or was changed"):
        load_model(copy)


def test_a_new_export_replaces_the_files_of_the_one_before(exports, tmp_path):
    """Re-exported in the other format: the earlier export's files go, the owner's stay."""
    from helm.hf import export_hf, load_model

    folder = _copy(exports["helm"], tmp_path)
    (folder / "notes.txt").write_text("mine")
    export_hf(load_model(folder), folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    assert names == sorted([*read_manifest(exports["hf"]), MANIFEST, "notes.txt"])
    assert load_model(folder).checkpoint["source"]["format"] == "hf"
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == dict.fromkeys(names, 0o666 & ~mask)  # safetensors alone writes 0600


def _rezip(src: Path, dst: Path, extra: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": what the test makes
        for info in old.infolist():
            new.writestr(info, old.read(info))
        for name, data in extra.items():
            new.writestr(name, data)


def _damaged(good: Path, how: str, dst: Path) -> Path:
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        first = archive.infolist()[0]  # <archive>/data.pkl, at offset 0
    name_len, extra_len = struct.unpack("<HH", raw[26:30])
    if how == "a second data.pkl":
        other = dst.with_suffix(".other")
        save_checkpoint(_minimal(w=5.0), other)
        with zipfile.ZipFile(other) as archive:
            _rezip(good, dst, {first.filename: archive.read(archive.infolist()[0])})
        return dst
    if how == "bytes appended":
        raw += b"\0" * 64
    elif how == "a CRC in the central directory":
        raw[raw.find(b"PK\x01\x02", 30 + name_len + extra_len + first.compress_size) + 16] ^= 1
    elif how == "a time in a local header":
        raw[10] ^= 0x01
    elif how == "a data descriptor":  # after data.pkl's bytes: [signature] CRC, sizes
        end = 30 + name_len + extra_len + first.compress_size
        raw[end + (4 if raw[end : end + 4] == b"PK\x07\x08" else 0)] ^= 0x01
    dst.write_bytes(bytes(raw))
    return dst


@pytest.mark.parametrize(
    "how",
    ["a second data.pkl", "bytes appended", "a CRC in the central directory",
     "a time in a local header", "a data descriptor"],
)  # fmt: skip
def test_zip_damage_outside_the_tensors_is_caught(tmp_path, how, capsys):
    good = tmp_path / "good.pt"
    save_checkpoint(_minimal(), good)
    bad = _damaged(good, how, tmp_path / "bad.pt")
    torch.load(bad, weights_only=True)  # torch alone reads every one of them without a word
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} is corrupted: "):
        load_checkpoint(bad)
    assert checkpoint_cli(["verify", str(bad)]) == 2
    assert "is corrupted" in capsys.readouterr().err
    assert checkpoint_cli(["verify", str(good)]) == 0


# A full disk, a file-size limit ------------------------------------------------------------------


@contextlib.contextmanager
def file_size_limit(limit: int):
    """A real EFBIG for any write past ``limit`` bytes (RLIMIT_FSIZE), in this process."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def full_disk(monkeypatch, module, when=lambda path: True) -> None:
    """A real ENOSPC: files that ``module`` opens for writing (and ``when`` picks) are /dev/full."""

    def opened(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax") and when(Path(file)):
            return builtins.open("/dev/full", mode, *args, **kwargs)
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(module, "open", opened, raising=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


@pytest.mark.parametrize("cause", ["no space left on device", "file too large"])
def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch, cause):
    import helm.fileio

    path = tmp_path / "last.pt"
    save_checkpoint(_minimal(w=1.0), path)
    big = {**_minimal(w=0.0), "model": {"w": torch.zeros(100_000)}}
    with pytest.raises(CheckpointError) as err:
        if cause == "file too large":
            with file_size_limit(16384):
                save_checkpoint(big, path)
        else:
            full_disk(monkeypatch, helm.fileio)
            save_checkpoint(big, path)
    assert (
        str(err.value)
        == f"cannot write checkpoint {path}: {cause}; the previous last.pt is unchanged"
    )
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert _leftovers(tmp_path) == []


def test_torchs_short_write_wording_is_a_full_disk_and_names_no_previous_file(
    tmp_path, monkeypatch
):
    def save(obj, f, *a, **k):  # torch 2.13's zip writer, out of room (no OSError attached)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save)
    path = tmp_path / "epoch-0002.pt"
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(_minimal(), path)
    assert "no space left on device" in str(err.value) and "previous" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_the_demo_corpus_or_token_cache(tmp_path, monkeypatch):
    import helm.data.cache

    corpus = write_demo_corpus(tmp_path / "demo.txt", n=5)
    before = corpus.read_bytes()
    with file_size_limit(16384), pytest.raises(WriteError) as err:
        write_demo_corpus(corpus, n=100)
    assert str(err.value) == (
        f"cannot write the demo corpus {corpus}: file too large; the previous demo.txt is unchanged"
    )
    assert corpus.read_bytes() == before and _leftovers(tmp_path) == []

    big = write_demo_corpus(tmp_path / "big.txt", n=100)
    cache = tmp_path / "cache"
    for trouble in ("limit", "full"):
        with contextlib.ExitStack() as stack:
            if trouble == "limit":
                stack.enter_context(file_size_limit(16384))
            else:
                full_disk(monkeypatch, helm.data.cache)
            with pytest.raises(WriteError, match=f"cannot write the token cache {cache}/"):
                build_token_cache(big, KmerTokenizer(3), cache)
        monkeypatch.undo()
        assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    assert len(build_token_cache(big, KmerTokenizer(3), cache)) == 100  # room again: it builds


def test_a_full_disk_while_exporting_leaves_the_export_as_it_was(exports, tmp_path):
    from helm.hf import export_helm, load_model

    folder = _copy(exports["helm"], tmp_path)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    bigger = load_model(folder)
    with torch.no_grad():
        bigger.model.embed.tok.weight.add_(1.0)
    with file_size_limit(4096), pytest.raises(WriteError) as err:
        export_helm(bigger, folder)
    assert str(err.value) == f"cannot write export {folder}: file too large; {folder} is as it was"
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert _leftovers(tmp_path) == []


def test_a_full_disk_is_one_line_and_a_non_zero_exit(exports, tmp_path, monkeypatch, capsys):
    """eval.py's embeddings and results, train.py's checkpoints: the previous file survives."""
    import helm.fileio

    fasta = _fasta(tmp_path / "s.fasta")
    out = tmp_path / "e.npy"
    out.write_bytes(b"previous")
    full_disk(monkeypatch, helm.fileio)
    code = evalpy.main(["embed", str(exports["helm"]), "--file", fasta, "--out", str(out)])
    (line,) = _error_lines(capsys.readouterr().err, "eval.py")
    assert code == 2 and out.read_bytes() == b"previous"
    assert line == (
        f"eval.py: error: cannot write embeddings {out}: no space left on device; the previous "
        "e.npy is unchanged"
    )
    results = tmp_path / "m.json"
    code = evalpy.main(["pretrain", str(exports["helm"]), "--file", fasta, "--out", str(results)])
    (line,) = _error_lines(capsys.readouterr().err, "eval.py")
    assert code == 2 and not results.exists() and _leftovers(tmp_path) == []
    assert line == f"eval.py: error: cannot write results {results}: no space left on device"

    monkeypatch.undo()
    full_disk(monkeypatch, helm.fileio, when=lambda p: p.name.startswith(".epoch-"))
    monkeypatch.setenv("HELM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    code = train.main([*TINY, "--epochs", "1", "--warmup-epochs", "0", "--output", str(run)])
    (line,) = _error_lines(capsys.readouterr().err, "train.py")
    path = run / "checkpoints" / "epoch-0000.pt"
    assert (
        code == 2
        and line == f"train.py: error: cannot write checkpoint {path}: no space left on device"
    )
    assert _leftovers(run) == []


def test_a_full_disk_anywhere_else_is_one_line(capsys):
    """Writes outside helm.fileio (logs, TensorBoard): the scripts still answer in one line."""
    from helm.errors import run_reporting_errors

    def run() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "run/metrics.jsonl")

    assert run_reporting_errors("train.py", run) == 2
    err = capsys.readouterr().err
    assert err == "train.py: error: cannot write run/metrics.jsonl: no space left on device\n"


# Paths of the wrong kind, settings that cannot be meant ------------------------------------------


def test_paths_of_the_wrong_kind_are_one_line_before_any_work(
    exports, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HELM_CACHE_DIR", str(tmp_path / "cache"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, says in [
        (["--output", str(a_file)], f"--output {a_file} is a file"),
        (
            ["--output", str(a_file / "run")],
            f"--output {a_file / 'run'} is inside {a_file}, a file",
        ),
        (["--cache_dir", str(a_file)], f"--cache_dir {a_file} is a file"),
        (["--resume", str(tmp_path)], f"--resume {tmp_path} is a folder"),
    ]:
        assert train.main([*TINY, *argv]) == 2
        (line,) = _error_lines(capsys.readouterr().err, "train.py")
        assert says in line
    assert not (tmp_path / "cache").exists()  # nothing started
    fasta = _fasta(tmp_path / "s.fasta")
    for argv, says in [
        (["embed", str(exports["helm"]), "--file", fasta, "--out", str(tmp_path)], "is a folder"),
        (["export", str(exports["helm"]), "--format", "helm", "--out", str(a_file)], "is a file"),
    ]:
        assert evalpy.main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err


def test_num_workers_above_the_cores_is_capped_with_a_warning(caplog):
    cores = len(os.sched_getaffinity(0))
    info = SimpleNamespace(world_size=1)
    with caplog.at_level("WARNING", logger="helm"):
        assert train.num_workers(1000, info) == cores
        assert train.num_workers(cores, info) == cores
    (record,) = caplog.records
    assert (
        record.getMessage()
        == f"--num_workers 1000: this machine gives the run {cores} cores; using {cores} workers"
    )


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr 0.01 is above --lr 0.001"),
        (["--epochs", "3", "--warmup-epochs", "3", "--no-sched-on-updates"],
         "--warmup-epochs 3 >= --epochs 3"),
        (["--layer-decay", "5"], "--layer-decay must be <= 1"),
        (["--layer-decay", "0"], "--layer-decay must be > 0"),
        (["--decay-rate", "3", "--sched", "step"], "--decay-rate must be <= 1"),
        (["--decay-rate", "0"], "--decay-rate must be > 0"),
    ],
)  # fmt: skip
def test_settings_that_cannot_be_meant_are_refused(argv, says):
    with pytest.raises(ConfigError, match=says):
        parse_config(argv)


def test_extreme_but_possible_settings_are_warned_of():
    for argv in (
        ["--epochs", "3", "--warmup-epochs", "3", "--no-sched-on-updates", "--warmup-prefix"],
        ["--decay-rate", "2", "--sched", "poly"],  # poly's power
        ["--layer-decay", "1"],
    ):
        assert config_warnings(parse_config(argv)) == []
    for argv, says in [
        (["--lr", "1e10"], "--lr 1e+10 is far above"),
        (["--opt-eps", "1e11"], "--opt-eps 1e+11 dwarfs"),
        (["--epochs", "2", "--warmup-epochs", "2"], "the whole run is warm-up"),
    ]:
        (warning,) = config_warnings(parse_config(argv))
        assert says in warning


# Interrupts -------------------------------------------------------------------------------------


def test_ctrl_c_while_the_token_cache_builds_stops_at_once(tmp_path, monkeypatch, capsys):
    import helm.data.cache as cache

    real, steps = cache._chunks, []

    def chunks(*a, **k):  # Ctrl-C as the first chunk of records is tokenized
        for chunk in real(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)
            yield chunk

    monkeypatch.setattr(cache, "_chunks", chunks)
    monkeypatch.setattr(train, "forward_backward", lambda *a, **k: steps.append(1))
    monkeypatch.setenv("HELM_CACHE_DIR", str(tmp_path / "cache"))
    code = train.main([*TINY, "--output", str(tmp_path / "run")])
    assert code == 130 and steps == []
    assert "train.py: interrupted" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a fresh run that never started leaves nothing
    assert [p for p in (tmp_path / "cache").glob(".*.tmp-*")] == []


WRAPPER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import train
real, calls = train.optimizer_step, {{"n": 0}}


def optimizer_step(*a, **k):  # after rank 0's third update, Ctrl-C reaches torchrun
    out = real(*a, **k)
    calls["n"] += 1
    if calls["n"] == 3 and os.environ["RANK"] == "0":
        os.kill(os.getppid(), signal.SIGINT)  # torchrun forwards it to every rank
        time.sleep(1)  # it arrives before the next update: the stop is at update 3
    return out


train.optimizer_step = optimizer_step
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigint_to_a_two_rank_torchrun_run_resumes_bit_for_bit(tmp_path):
    from helm.distributed import free_port  # a port of its own: other runs may hold 29500

    script = tmp_path / "interrupted_train.py"
    script.write_text(WRAPPER.format(root=str(ROOT)))
    env = {**os.environ, "HELM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # Dropout: each rank's RNG stream then shapes the weights, so the resume must restore them all.
    flags = [*TINY, "--epochs", "1", "--warmup-epochs", "0", "--sched-on-updates",
             "--log-interval", "1", "--dropout", "0.1"]  # fmt: skip

    def torchrun(entry: Path, out: str, *extra: str) -> tuple[subprocess.Popen, Path]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(entry),
               *flags, "--output", str(tmp_path / out), *extra]  # fmt: skip
        log = tmp_path / f"{out}{len(extra)}.log"
        with open(log, "w") as f:
            return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), log

    def finish(started: tuple[subprocess.Popen, Path]) -> tuple[int, str]:
        proc, log = started
        return proc.wait(timeout=180), log.read_text()

    full, part = torchrun(ROOT / "train.py", "full"), torchrun(script, "part")  # side by side
    code, err = finish(full)
    assert code == 0, err[-3000:]
    code, err = finish(part)
    assert code != 0 and "SIGINT received" in err, err[-3000:]
    stopped = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert stopped["epoch"] == 0 and 3 <= stopped["batches_done"] == stopped["step"] < 6
    code, err = finish(torchrun(ROOT / "train.py", "part", "--resume", "auto"))
    assert code == 0, err[-3000:]
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert resumed["step"] == full["step"] > 3 and resumed["world_size"] == 2
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    _same(resumed["optimizer"], full["optimizer"])
    assert resumed["scheduler"] == full["scheduler"]


def _same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b
