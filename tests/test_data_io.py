"""Reading, cleaning, validation (helm.data.io) and splits (helm.data.splits); the demo corpus;
codon usage and CAI."""

from __future__ import annotations

import gzip
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from helm.codon_usage import cai, codon_frequencies, relative_adaptiveness
from helm.data.demo import demo_sequences, write_demo_corpus
from helm.data.io import (
    DataError,
    ReadReport,
    count_records,
    iter_records,
    iter_sequences,
    read_sequences,
)
from helm.data.splits import resolve_splits
from helm.vocab import genetic_code, synonymous_codons

SEQS = ["ATGAAATAA", "ATGCCCGGGTGA", "ATGTTTTAG"]


def write(path: Path, text: str) -> Path:
    """Write `text`, gzip-compressed when the name ends in .gz."""
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def as_fasta(seqs: list[str], width: int = 4) -> str:
    """Multi-line FASTA: each sequence wrapped at `width` letters."""
    out = []
    for i, s in enumerate(seqs):
        out.append(f">rec{i} some description")
        out += [s[j : j + width] for j in range(0, len(s), width)]
    return "\n".join(out) + "\n"


FORMAT_TEXT = {
    "txt": "\n".join(SEQS) + "\n",
    "csv": "id,Sequence,value\n" + "".join(f"r{i},{s},{i}\n" for i, s in enumerate(SEQS)),
    "tsv": "id\tseq\n" + "".join(f"r{i}\t{s}\n" for i, s in enumerate(SEQS)),
    "fa": as_fasta(SEQS),
    "fasta": as_fasta(SEQS, width=5),
    "fna": as_fasta(SEQS, width=100),
}


# ---- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("ext", sorted(FORMAT_TEXT))
def test_every_format_reads_the_same_sequences(tmp_path, ext, gz):
    path = write(tmp_path / f"data.{ext}{'.gz' if gz else ''}", FORMAT_TEXT[ext])
    seqs, report = read_sequences(path)
    assert seqs == SEQS
    assert (report.num_records, report.num_valid, report.num_invalid) == (3, 3, 0)
    assert count_records(path) == 3


def test_file_extension_overrides_the_name(tmp_path):
    path = write(tmp_path / "data.dat", as_fasta(SEQS))
    with pytest.raises(DataError, match="file format"):
        read_sequences(path)
    assert read_sequences(path, file_extension="fasta")[0] == SEQS
    gz = tmp_path / "blob"
    gz.write_bytes(gzip.compress(FORMAT_TEXT["txt"].encode()))
    assert read_sequences(gz, file_extension=".txt.gz")[0] == SEQS


def test_cleaning(tmp_path):
    text = "  atgaaa taa \n\nAUGCCCGGGUGA\r\nATG<pad>TTTTAG<pad><pad>\n\tatg\tccc\tTGA\n"
    seqs, report = read_sequences(write(tmp_path / "x.txt", text))
    assert seqs == ["ATGAAATAA", "ATGCCCGGGTGA", "ATGTTTTAG", "ATGCCCTGA"]
    assert report.num_records == 4  # the blank line is not a record


def test_csv_column_choice_and_errors(tmp_path):
    path = write(tmp_path / "x.csv", "name,seq_a,seq_b\nr,AAA,CCC\ns,GGG,TTT\n")
    assert read_sequences(path, column_name="seq_b")[0] == ["CCC", "TTT"]
    with pytest.raises(DataError) as err:
        read_sequences(path, column_name="nope")
    assert "'nope'" in str(err.value) and "seq_a" in str(err.value) and "seq_b" in str(err.value)
    with pytest.raises(DataError, match="column_name"):
        read_sequences(path)  # no column looks like the sequence column
    single = write(tmp_path / "one.csv", "whatever\nACG\nTTT\n")
    assert read_sequences(single)[0] == ["ACG", "TTT"]
    cds = write(tmp_path / "cds.csv", "CDS,Value\nAUGUAA,1.0\n")
    assert read_sequences(cds)[0] == ["ATGTAA"]


def test_fasta_data_before_header_is_an_error(tmp_path):
    path = write(tmp_path / "x.fa", "ACGT\n>r\nACG\n")
    with pytest.raises(DataError, match=r"x\.fa:1"):
        read_sequences(path)


# ---- validation -------------------------------------------------------------------------------


def test_each_invalid_kind_names_file_place_and_reason(tmp_path):
    txt = write(tmp_path / "bad.txt", "ATGAAA\nATGXAA\n<pad>\nATGAA\n")
    _, report = read_sequences(txt, on_invalid="skip", require_codons=True)
    assert report.invalid == {"invalid character": 1, "empty": 1, "length not a multiple of 3": 1}
    assert report.examples[0].startswith(f"{txt}:2: invalid character")
    assert "'X' at position 4" in report.examples[0]
    assert report.examples[1].startswith(f"{txt}:3: empty")
    assert report.examples[2].startswith(f"{txt}:4: length not a multiple of 3")

    fa = write(tmp_path / "bad.fa", ">good\nATG\nAAA\n>nothing here\n>odd one\nATGA\n")
    _, report = read_sequences(fa, on_invalid="skip", require_codons=True)
    assert report.examples[0] == f"{fa}:4 record 2 (>nothing here): empty"
    assert report.examples[1].startswith(f"{fa}:5 record 3 (>odd one): length not a multiple")

    csv = write(tmp_path / "bad.csv", 'Sequence\nATG\n""\nAT-G\n')
    _, report = read_sequences(csv, on_invalid="skip")
    assert report.examples == [f"{csv}:3: empty", f"{csv}:4: invalid character: '-' at position 3"]


def test_lengths_are_free_without_require_codons(tmp_path):
    path = write(tmp_path / "x.txt", "ACGTA\nNNN\n")
    seqs, report = read_sequences(path)
    assert seqs == ["ACGTA", "NNN"] and report.num_invalid == 0
    _, report = read_sequences(path, data_type="codon", on_invalid="skip")
    assert report.invalid == {"length not a multiple of 3": 1}


def test_error_lists_first_five_and_total_while_skip_counts(tmp_path, caplog):
    lines = ["ATG", "AXG", "ATG", "A1G", "B", "ATG", "Z", "Q", "ATG", "J"]
    path = write(tmp_path / "x.txt", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_sequences(path)
    msg = str(err.value)
    assert msg.startswith(f"6 invalid record(s) in {path}")
    for line_no in (2, 4, 5, 7, 8):
        assert f"{path}:{line_no}:" in msg
    assert f"{path}:10:" not in msg  # only the first five are listed
    assert isinstance(err.value, ValueError)

    with caplog.at_level("WARNING", logger="helm"):
        seqs, report = read_sequences(path, on_invalid="skip")
    assert "skipped invalid records" in caplog.text and f"{path}:2:" in caplog.text
    assert seqs == ["ATG"] * 4
    assert (report.num_records, report.num_valid, report.num_invalid) == (10, 4, 6)
    assert "4 valid of 10 records" in report.summary() and "6 invalid" in report.summary()


def test_num_samples_keeps_the_first_valid_records(tmp_path):
    path = write(tmp_path / "x.txt", "AAA\nXXX\nCCC\nGGG\nTTT\n")
    seqs, report = read_sequences(path, on_invalid="skip", num_samples=2)
    assert seqs == ["AAA", "CCC"]
    assert report.num_valid == 2 and report.num_invalid == 1


def test_bad_option_values_are_refused(tmp_path):
    path = write(tmp_path / "x.txt", "AAA\n")
    with pytest.raises(ValueError, match="on_invalid"):
        read_sequences(path, on_invalid="ignore")
    with pytest.raises(ValueError, match="data_type"):
        read_sequences(path, data_type="protein")


def test_amino_acid_mode_translates_nucleotides_and_checks_proteins(tmp_path):
    path = write(tmp_path / "x.txt", "AUGAAAUGGUAA\nMKWLV*\nMKB\n")
    seqs, report = read_sequences(path, data_type="aa", on_invalid="skip")
    assert seqs == ["MKW*", "MKWLV*"]
    assert report.invalid == {"invalid character": 1}
    assert "'B' at position 3" in report.examples[0]


def test_records_carry_place_index_id_and_header(tmp_path):
    fa = write(tmp_path / "x.fa", ">r0 first one\nATG\nAAA\n>r1|7\nATXG\n>\nCCC\n")
    report = ReadReport(str(fa))
    records = list(iter_records(fa, on_invalid="skip", report=report))
    assert [(r.location, r.line, r.index, r.id, r.header) for r in records] == [
        (f"{fa}:1", 1, 0, "r0", "r0 first one"),
        (f"{fa}:6", 6, 2, "", ""),
    ]
    assert records[0].sequence == "ATGAAA" and records[0].fields is None
    assert report.examples == [f"{fa}:4 record 2 (>r1|7): invalid character: 'X' at position 3"]

    txt = write(tmp_path / "x.txt", "acg\n\nTTT\n")
    records = list(iter_records(txt))
    assert [(r.location, r.index, r.id, r.header) for r in records] == [
        (f"{txt}:1", 0, "1", None),
        (f"{txt}:3", 1, "2", None),
    ]


def test_table_columns_come_along_and_missing_ones_are_named(tmp_path):
    path = write(tmp_path / "x.psv", "Sequence|Value\nATG|1\n|\nCCC|2\n")
    records = list(iter_records(path, file_extension="csv", columns=["Value"], delimiter="sniff"))
    assert [(r.sequence, r.fields, r.line) for r in records] == [
        ("ATG", {"Sequence": "ATG", "Value": "1"}, 2),
        ("CCC", {"Sequence": "CCC", "Value": "2"}, 4),  # the all-blank row is not a record
    ]
    with pytest.raises(DataError, match=r"no column\(s\) \['Label'\]"):
        list(iter_records(path, file_extension="csv", delimiter="|", columns=["Label"]))


def test_check_adds_reasons_under_the_same_policy(tmp_path):
    path = write(tmp_path / "x.txt", "ATG\nCCC\nGGG\n")

    def odd_lines(record):
        return None if record.line % 2 else ("even line", str(record.line))

    with pytest.raises(DataError, match=r"x\.txt:2: even line: 2"):
        list(iter_records(path, check=odd_lines))
    seqs = [r.sequence for r in iter_records(path, check=odd_lines, on_invalid="skip")]
    assert seqs == ["ATG", "GGG"]
    raw = [r.sequence for r in iter_records(path, validate=False)]
    assert raw == ["ATG\n", "CCC\n", "GGG\n"]


def test_indices_select_records_counted_over_the_whole_file(tmp_path):
    path = write(tmp_path / "x.txt", "AAA\nXXX\nCCC\nGGG\n")
    records = list(iter_records(path, indices=np.array([2, 3]), on_invalid="skip"))
    assert [(r.index, r.sequence) for r in records] == [(2, "CCC"), (3, "GGG")]
    assert list(iter_sequences(path, indices=[0, 2])) == ["AAA", "CCC"]


# ---- splits -----------------------------------------------------------------------------------


def test_split_of_one_file_is_seeded_disjoint_and_proportional(tmp_path, caplog):
    path = write(tmp_path / "all.txt", "".join(f"{'ACGT'[i % 4] * 3}\n" for i in range(1000)))
    with caplog.at_level("INFO", logger="helm"):
        a = resolve_splits(train_file=path, seed=3)
    assert "no val/test file" in caplog.text
    b = resolve_splits(train_file=path, seed=3)
    c = resolve_splits(train_file=path, seed=4)
    assert list(a) == ["train", "val", "test"]
    assert {k: len(s.indices) for k, s in a.items()} == {"train": 900, "val": 50, "test": 50}
    joined = np.concatenate([s.indices for s in a.values()])
    assert sorted(joined.tolist()) == list(range(1000))  # disjoint and complete
    assert all(np.array_equal(a[k].indices, b[k].indices) for k in a)
    assert not np.array_equal(a["val"].indices, c["val"].indices)
    # Reading a split yields exactly its records, in file order.
    got = list(iter_sequences(path, indices=a["val"].indices))
    assert got == ["ACGT"[i % 4] * 3 for i in a["val"].indices]


def test_split_fractions_and_missing_only_test(tmp_path):
    train = write(tmp_path / "t.txt", "AAA\n" * 200)
    val = write(tmp_path / "v.txt", "CCC\n")
    splits = resolve_splits(train_file=train, val_file=val, split=(0.8, 0.1, 0.1))
    assert splits["val"].indices is None and splits["val"].path == str(val)
    assert len(splits["test"].indices) == 20 and len(splits["train"].indices) == 180
    no_test = resolve_splits(train_file=train, split=(0.9, 0.1, 0.0))
    assert list(no_test) == ["train", "val"]
    with pytest.raises(ValueError, match="split"):
        resolve_splits(train_file=train, split=(0.9, 0.2, 0.1))


def test_data_dir_finds_files_by_name_and_explicit_files_win(tmp_path):
    write(tmp_path / "train.fa.gz", as_fasta(SEQS))
    write(tmp_path / "validation.txt", "AAA\n")
    write(tmp_path / "test.csv", "seq\nCCC\n")
    write(tmp_path / "notes.md", "not data")
    splits = resolve_splits(data_dir=tmp_path)
    assert {k: Path(s.path).name for k, s in splits.items()} == {
        "train": "train.fa.gz",
        "val": "validation.txt",
        "test": "test.csv",
    }
    assert all(s.indices is None for s in splits.values())
    other = write(tmp_path / "other.txt", "GGG\n")
    assert resolve_splits(data_dir=tmp_path, test_file=other)["test"].path == str(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no training data"):
        resolve_splits(data_dir=empty)
    with pytest.raises(DataError, match="does not exist"):
        resolve_splits(train_file=tmp_path / "missing.txt")


# ---- demo corpus, codon usage, CAI ------------------------------------------------------------


def test_demo_corpus_is_deterministic_and_well_formed(tmp_path):
    seqs = demo_sequences(40, seed=1)
    assert seqs == demo_sequences(40, seed=1)
    assert seqs[:10] == demo_sequences(10, seed=1)
    assert seqs != demo_sequences(40, seed=2)
    code = genetic_code()
    for s in seqs:
        assert len(s) % 3 == 0 and 300 <= len(s) <= 3000
        codons = [s[i : i + 3] for i in range(0, len(s), 3)]
        assert codons[0] == "ATG" and code[codons[-1]] == "*"
        assert all(code[c] != "*" for c in codons[:-1])
    path = write_demo_corpus(tmp_path / "demo" / "corpus.txt", n=40, seed=1)
    assert read_sequences(path, require_codons=True)[0] == seqs


def test_demo_codon_frequencies_follow_the_usage_table():
    counts = Counter()
    for s in demo_sequences(200, seed=0):
        counts.update(s[i : i + 3] for i in range(3, len(s) - 3, 3))  # body codons only
    sense = [c for c, aa in genetic_code().items() if aa != "*"]
    observed = np.array([counts[c] for c in sense], dtype=float)
    expected = np.array([codon_frequencies()[c] for c in sense])
    assert np.corrcoef(observed, expected)[0, 1] > 0.99


def test_usage_table_facts():
    freq = codon_frequencies("human")
    assert len(freq) == 64 and abs(sum(freq.values()) - 1000) < 1
    # Well-known human biases: CTG is the most used leucine codon, GAG > GAA, TGA the main stop.
    assert max(synonymous_codons()["L"], key=freq.get) == "CTG"
    assert freq["GAG"] > freq["GAA"] and max(synonymous_codons()["*"], key=freq.get) == "TGA"
    with pytest.raises(ValueError, match="species"):
        codon_frequencies("martian")


def test_cai_of_preferred_codons_is_one_and_rare_codons_lower():
    freq = codon_frequencies()
    groups = synonymous_codons()
    best = {aa: max(codons, key=freq.get) for aa, codons in groups.items()}
    preferred = "ATG" + "".join(best[aa] for aa in "ACDEFGHIKLNPQRSTVWY") + "TAA"
    assert cai(preferred) == pytest.approx(1.0)
    assert cai(preferred.lower().replace("t", "u")) == pytest.approx(1.0)
    worst = {aa: min(codons, key=freq.get) for aa, codons in groups.items()}
    rare = "".join(worst[aa] for aa in "LLRS")
    w = relative_adaptiveness()
    expected = math.exp(np.mean([math.log(w[worst[aa]]) for aa in "LLRS"]))
    assert cai(rare) == pytest.approx(expected) and cai(rare) < 0.3
    assert math.isnan(cai("ATGTGGTAA"))  # only excluded codons


# ---- real data --------------------------------------------------------------------------------


def test_real_yeast_fasta(shared_data):
    path = shared_data / "pretrain_yeast_cds_cubar" / "yeast_cds.fa.gz"
    seqs, report = read_sequences(path, on_invalid="skip", require_codons=True)
    assert report.num_records == 6600
    assert report.num_valid > 6000 and len(seqs) == report.num_valid
    assert all(len(s) % 3 == 0 and set(s) <= set("ACGTN") for s in seqs)
    assert sum(s.startswith("ATG") for s in seqs) > 0.95 * len(seqs)


@pytest.mark.parametrize(
    "relpath",
    ["codonbert_mrfp_expression/mRFP_Expression.csv", "codonbert_mlos/MLOS.csv"],
)
def test_real_codonbert_csv(shared_data, relpath):
    path = shared_data / relpath
    column = "Sequence" if "mRFP" in relpath else None  # MLOS: the CDS column is found by name
    seqs, report = read_sequences(path, column_name=column, on_invalid="skip")
    assert report.num_valid > 100 and report.num_invalid == 0
    assert all("U" not in s and s.startswith("ATG") for s in seqs[:50])


# Faults of the file itself: each one a DataError naming it -------------------------------------------


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


FAULTS = {
    "x.txt.gz": (b"ATGAAATAA\n", "not gzip-compressed, though its name ends in .gz"),
    "y.txt.gz": (_gz(b"ATGAAATAA\n" * 500)[:-12], "gzip stream is truncated"),
    "z.fasta.gz": (_gz(b">a\nATG\n")[:-8] + b"\xff\xff\xff\xff\0\0\0\0", "corrupt gzip data"),
    "w.txt": (_gz(b"ATGAAATAA\n"), "w.txt:1: not UTF-8 text .*looks gzip-compressed"),
    "u.txt": (b"ATG\nATGAAA\nATGA\xffAA\n", r"u.txt:3: not UTF-8 text \(byte 0xff at column 5\)"),
    "v.csv": (
        b"sequence\nATG\n\xc3\xa9\xe2\x82\n",
        r"v.csv:3: not UTF-8 text \(byte 0xe2 at column 2\)",
    ),
    "t.fasta": (b">a\nATG\n>b \x80\nATG\n", r"t.fasta:3: not UTF-8 text \(byte 0x80 at column 4\)"),
}


@pytest.mark.parametrize("name", FAULTS)
def test_file_faults_are_data_errors_naming_file_and_line(tmp_path, name):
    data, message = FAULTS[name]
    path = tmp_path / name
    path.write_bytes(data)
    for read in (lambda: read_sequences(path), lambda: count_records(path)):
        with pytest.raises(DataError, match=message):
            read()


def test_a_directory_or_missing_file_is_a_data_error(tmp_path):
    (tmp_path / "d.fasta").mkdir()
    with pytest.raises(DataError, match="d.fasta is a directory"):
        read_sequences(tmp_path / "d.fasta")
    with pytest.raises(DataError, match="e.txt does not exist"):
        read_sequences(tmp_path / "e.txt")


@pytest.mark.parametrize("ext", ["txt", "csv", "tsv", "fasta", "txt.gz", "csv.gz"])
def test_a_byte_order_mark_is_read_as_the_encoding_marker(tmp_path, ext):
    text = {"txt": "\n".join(SEQS), "fasta": as_fasta(SEQS)}.get(ext.split(".")[0])
    if text is None:
        sep = "," if ext.startswith("csv") else "\t"
        text = f"sequence{sep}id\n" + "".join(f"{s}{sep}{i}\n" for i, s in enumerate(SEQS))
    data = b"\xef\xbb\xbf" + text.encode()
    path = tmp_path / f"bom.{ext}"
    path.write_bytes(gzip.compress(data) if ext.endswith(".gz") else data)
    assert read_sequences(path)[0] == SEQS


@pytest.mark.parametrize("ext", ["txt", "csv", "fasta", "txt.gz"])
def test_zero_usable_records_are_refused_when_asked(tmp_path, ext):
    path = write(tmp_path / f"e.{ext}", "")
    assert read_sequences(path)[0] == []  # an empty file is no error by default
    with pytest.raises(DataError, match=f"{path}: no records"):
        read_sequences(path, require_records=True)
    bad = write(tmp_path / f"b.{ext}", as_fasta(["XYZ"]) if ext == "fasta" else "sequence\nXYZ\n")
    with pytest.raises(DataError, match=f"{bad}: no usable records \\(all \\d invalid"):
        read_sequences(bad, on_invalid="skip", require_records=True)


def test_empty_or_directory_split_paths_are_named(tmp_path):
    with pytest.raises(DataError, match="train_file is an empty path"):
        resolve_splits(train_file="")
    with pytest.raises(DataError, match=f"val file {tmp_path} is a directory"):
        resolve_splits(train_file=write(tmp_path / "t.txt", "ATG\n"), val_file=tmp_path)
