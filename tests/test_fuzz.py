"""Property-based fuzz of the sequence readers: whatever bytes a file holds, and however it is named
(txt, csv, tsv, fasta, each plain or .gz, gzip truncated, corrupted or missing), reading it either
works or raises `DataError`; no other exception escapes. Likewise for checkpoints and exported
folders damaged anywhere (bytes flipped, cut, appended, inserted, overwritten; duplicate zip
entries; any JSON value in a setting): a one-line `CheckpointError` naming the file, or exactly the
original contents.

``HELM_FUZZ_EXAMPLES`` sets the examples per test (default 60, a few seconds on a busy CPU);
``HELM_FUZZ_EXAMPLES=1500 pytest tests/test_fuzz.py --hypothesis-show-statistics`` is a campaign.
"""

import gzip
import os
import shutil
import tempfile
import warnings
import zipfile
from functools import cache
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helm.data.io import DataError, count_records, iter_records, read_sequences

FUZZ = settings(
    max_examples=int(os.environ.get("HELM_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FORMATS = ("txt", "csv", "tsv", "fasta")
# Pieces of plausible and broken sequence files: headers, cells, quotes, line ends, a BOM, bytes
# that are not UTF-8, gzip magic, NUL.
FRAGMENTS = [
    b"ACGT", b"ATGAAATAG", b"acgu", b"NNN", b"<pad>", b"XYZ", b"MKV*", b">", b">seq1 desc", b",",
    b"\t", b";", b"|", b'"', b'""', b"\n", b"\r\n", b"\r", b" ", b"sequence", b"seq,label",
    b"label", b"\xef\xbb\xbf", b"\xff", b"\xc3\xa9", b"\xe2\x82", b"\x1f\x8b", b"\x00", b"0",
]  # fmt: skip

structured = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(b"".join)
contents = st.one_of(st.binary(max_size=300), structured)
# How the bytes reach the disk: as they are, gzipped, gzipped then cut or with a flipped byte.
packings = st.sampled_from(["plain", "gzip", "gzip-truncated", "gzip-flipped", "directory"])


def _write(folder: Path, name: str, data: bytes, packing: str, cut: int) -> Path:
    path = folder / name
    if packing == "directory":
        path.mkdir()
        return path
    if packing != "plain":
        data = gzip.compress(data)
        if packing == "gzip-truncated":
            data = data[: cut % max(1, len(data))]
        elif packing == "gzip-flipped" and len(data) > 10:
            i = 10 + cut % (len(data) - 10)
            data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]
    path.write_bytes(data)
    return path


def _read_all(path: Path, options: dict) -> None:
    for record in iter_records(path, **options):
        assert isinstance(record.sequence, str)


@FUZZ
@given(
    fmt=st.sampled_from(FORMATS),
    gz_name=st.booleans(),
    data=contents,
    packing=packings,
    cut=st.integers(0, 10_000),
    options=st.fixed_dictionaries(
        {
            "on_invalid": st.sampled_from(["error", "skip"]),
            "data_type": st.sampled_from(["nuc", "codon", "aa"]),
            "column_name": st.sampled_from([None, "sequence", "label", "missing"]),
            "require_records": st.booleans(),
            "num_samples": st.sampled_from([None, 1, 3]),
        }
    ),
)
def test_readers_raise_only_data_errors(fmt, gz_name, data, packing, cut, options):
    folder = Path(tempfile.mkdtemp())
    try:
        path = _write(folder, f"x.{fmt}{'.gz' if gz_name else ''}", data, packing, cut)
        for read in (
            lambda: _read_all(path, options),
            lambda: read_sequences(path, options["column_name"], options["on_invalid"]),
            lambda: count_records(path, options["column_name"]),
        ):
            try:
                read()
            except DataError:
                pass
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(
    fmt=st.sampled_from(["csv", "tsv"]),
    gz_name=st.booleans(),
    data=contents,
    delimiter=st.sampled_from([None, "sniff", ",", "tab", ";"]),
    columns=st.sampled_from([None, [], ["label"], ["seq", "label"]]),
    indices=st.one_of(st.none(), st.lists(st.integers(0, 20), min_size=1, max_size=5)),
)
def test_tables_with_columns_raise_only_data_errors(
    fmt, gz_name, data, delimiter, columns, indices
):
    folder = Path(tempfile.mkdtemp())
    try:
        path = _write(
            folder, f"t.{fmt}{'.gz' if gz_name else ''}", data, "gzip" if gz_name else "plain", 0
        )
        try:
            _read_all(
                path,
                {
                    "columns": columns,
                    "delimiter": delimiter,
                    "indices": indices,
                    "on_invalid": "skip",
                },
            )
        except DataError:
            pass
    finally:
        shutil.rmtree(folder)


# Damaged checkpoints and exports: a CheckpointError (or ExportError) of one line naming the file,
# or exactly the original contents; never another exception, never changed contents in silence.

# (kind, position, bytes): what happens to a file's bytes. Positions wrap around the file's size.
damage = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20), st.just(b"")),
    st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("overwrite"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
)


def _damage(raw: bytes, kind: str, at: int, data) -> bytes:
    at = at % max(1, len(raw))
    if kind == "flip":
        return raw[:at] + bytes([raw[at] ^ (1 << data)]) + raw[at + 1 :] if raw else raw
    if kind == "cut":
        return raw[:at]
    if kind == "append":
        return raw + data
    if kind == "insert":
        return raw[:at] + data + raw[at:]
    return raw[:at] + data + raw[at + len(data) :]


@cache
def _checkpoint() -> tuple[bytes, dict]:
    import torch

    from helm.checkpoint import REQUIRED_KEYS, load_checkpoint, save_checkpoint

    ckpt = {key: {} for key in REQUIRED_KEYS}
    ckpt.update(model={"w": torch.arange(6.0), "b": torch.ones(2, dtype=torch.int8)}, epoch=1,
                step=3, batches_done=0, rng=[], config={"lr": 0.1, "name": "x"})  # fmt: skip
    folder = Path(tempfile.mkdtemp())
    save_checkpoint(ckpt, folder / "c.pt")
    raw = (folder / "c.pt").read_bytes()
    state = load_checkpoint(folder / "c.pt")
    shutil.rmtree(folder)
    return raw, state


def _one_line_naming(exc: Exception, path: Path) -> None:
    assert str(path) in str(exc) and "\n" not in str(exc), str(exc)


@FUZZ
@given(damages=st.lists(damage, min_size=1, max_size=3), duplicate=st.integers(-1, 6))
def test_a_damaged_checkpoint_is_refused_in_one_line_or_unchanged(damages, duplicate):
    import torch

    from helm.checkpoint import CheckpointError, load_checkpoint

    raw, original = _checkpoint()
    folder = Path(tempfile.mkdtemp())
    path = folder / "c.pt"
    try:
        if duplicate >= 0:  # a second entry of an existing name (torch reads one, zipfile another)
            path.write_bytes(raw)
            with zipfile.ZipFile(path) as archive:
                names, first = archive.namelist(), archive.read(archive.namelist()[0])
            with zipfile.ZipFile(path, "a") as archive, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Duplicate name": what this makes
                archive.writestr(names[duplicate % len(names)], first)
            raw = path.read_bytes()
        for kind, at, data in damages:
            raw = _damage(raw, kind, at, data)
        path.write_bytes(raw)
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            _one_line_naming(exc, path)
        else:
            assert duplicate < 0 and state["digest"] == original["digest"]
            for key, value in original["model"].items():
                assert torch.equal(state["model"][key], value)
    finally:
        shutil.rmtree(folder)


@cache
def _export() -> Path:
    from helm.checkpoint import LoadedModel
    from helm.hf import export_helm, run_config
    from helm.hierarchy import build_hierarchy
    from helm.models import build_model, model_config
    from helm.tokenizers import KmerTokenizer

    tok = KmerTokenizer(3)
    cfg = model_config("gpt2", vocab_size=tok.vocab_size, d_model=8, num_layers=1, num_heads=2,
                       d_ff=16, max_seq_len=16)  # fmt: skip
    model = build_model("gpt2", cfg).eval()
    about = {"model_name": "gpt2", "source": {"format": "test", "weights": "raw"}}
    loaded = LoadedModel(model, tok, build_hierarchy("true"), run_config("gpt2", cfg, tok), about)
    return export_helm(loaded, Path(tempfile.mkdtemp()) / "export")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 80) | st.floats(-2, 2) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 2))
@given(
    target=st.sampled_from(
        ["helm_config.json", "model.safetensors", "SHA256SUMS", "tokenizer/tokenizer.json"]
    ),  # fmt: skip
    damages=st.lists(damage, max_size=2),
    field=st.sampled_from(
        [
            None,
            "model_name",
            "model_config",
            "config",
            "hierarchy",
            "format",
            "vocab_size",
            "d_model",
            "num_heads",
            "activation",
            "init_std",
        ]
    ),  # fmt: skip
    value=json_values,
    keep_digests=st.booleans(),
)
def test_a_damaged_export_is_refused_in_one_line_or_unchanged(target, damages, field, value,
                                                              keep_digests):  # fmt: skip
    """Bytes damaged anywhere, or one setting of helm_config.json replaced by any JSON value."""
    import json

    from helm.errors import CheckpointError, ExportError
    from helm.fileio import MANIFEST
    from helm.hf import load_model

    folder = Path(tempfile.mkdtemp()) / "export"
    shutil.copytree(_export(), folder)
    try:
        path = folder / target
        raw = before = path.read_bytes()
        if field is not None and target == "helm_config.json":
            meta = json.loads(raw)
            config = meta["model_config"] if field not in meta else meta
            config[field] = value
            raw = json.dumps(meta).encode()
        for kind, at, data in damages:
            raw = _damage(raw, kind, at, data)
        path.write_bytes(raw)
        if not keep_digests and target != MANIFEST:
            (folder / MANIFEST).unlink()
        try:
            loaded = load_model(folder)
        except (CheckpointError, ExportError) as exc:
            _one_line_naming(exc, folder)
        else:  # changed bytes load only where no digest covers them (an export without digests)
            assert raw == before or not keep_digests or target == MANIFEST
            assert loaded.model_name == "gpt2"
    finally:
        shutil.rmtree(folder.parent)
