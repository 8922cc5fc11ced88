"""Property-based fuzz of the sequence readers: whatever bytes a file holds, and however it is named
(txt, csv, tsv, fasta, each plain or .gz, gzip truncated, corrupted or missing), reading it either
works or raises `DataError`; no other exception escapes.

``HELM_FUZZ_EXAMPLES`` sets the examples per test (default 60, a few seconds on a busy CPU);
``HELM_FUZZ_EXAMPLES=1500 pytest tests/test_fuzz.py --hypothesis-show-statistics`` is a campaign.
"""

import gzip
import os
import shutil
import tempfile
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
