"""Tokenizers: ids of DESIGN.md, k-mers against a naive reference, subword training, persistence."""

from __future__ import annotations

import gzip
import itertools
import json
import logging

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from helm.tokenizers import (
    DATA_TYPES,
    TOKENIZERS,
    KmerTokenizer,
    ProteinTokenizer,
    build_tokenizer,
    load_tokenizer,
    looks_like_nucleotides,
)
from helm.vocab import translate

SPECIALS = ["<pad>", "<cls>", "<eos>", "<unk>", "<mask>"]
KMER_CONFIGS = [
    (name, k, o) for name, k in (("nuc", 1), ("3mer", 3), ("6mer", 6)) for o in range(k)
]
SUBWORDS = ("bpe", "ug", "wp")


def naive_kmer_ids(seq: str, k: int, overlap: int) -> list[int]:
    """Reference: slide a window by k - overlap, read each complete window as a base-4 number."""
    stride, out = k - overlap, []
    for start in range(0, len(seq) - k + 1, stride):
        window = seq[start : start + k]
        if all(c in "ACGT" for c in window):
            out.append(5 + int(window.translate(str.maketrans("ACGT", "0123")), 4))
        else:
            out.append(3)
    return out


def random_dna(rng: np.random.Generator, n: int, alphabet: str = "ACGT") -> str:
    return "".join(rng.choice(list(alphabet), n))


@pytest.fixture(scope="module")
def train_seqs() -> list[str]:
    rng = np.random.default_rng(7)
    # Codon-like repeats give the subword trainers something to learn beyond letters.
    motifs = ["ATG", "GCC", "AAA", "GAT", "TTC", "CTG"]
    return [
        "".join(rng.choice(motifs, int(rng.integers(20, 70)))) + random_dna(rng, 10)
        for _ in range(150)
    ]


@pytest.fixture(scope="module")
def subword(train_seqs) -> dict:
    return {n: build_tokenizer(n, vocab_size=48, train_sequences=train_seqs) for n in SUBWORDS}


def all_tokenizers(subword: dict) -> dict:
    toks = {f"{n}/o{o}": build_tokenizer(n, overlap=o) for n, _, o in KMER_CONFIGS}
    toks["aa"] = build_tokenizer("nuc", data_type="aa")
    toks.update(subword)
    return toks


# k-mer ids --------------------------------------------------------------------------------------


def test_codon_ids_follow_design():
    tok = build_tokenizer("3mer")
    assert tok.vocab_size == 69 and tok.is_codon and tok.name == "3mer"
    assert tok.tokens[:5] == SPECIALS
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    assert tok.token_to_id("AAA") == 5 and tok.token_to_id("AAC") == 6
    assert tok.token_to_id("TTT") == 68
    for i, codon in enumerate("".join(p) for p in itertools.product("ACGT", repeat=3)):
        assert tok.id_to_token(5 + i) == codon
    assert tok.encode("AAAAACTTTATG").tolist() == [5, 6, 68, 5 + 0 * 16 + 3 * 4 + 2]


def test_kmer_sizes_and_codon_flag():
    assert build_tokenizer("nuc").vocab_size == 5 + 4
    assert build_tokenizer("6mer").vocab_size == 5 + 4096
    assert build_tokenizer("nuc").encode("ACGT").tolist() == [5, 6, 7, 8]
    assert build_tokenizer("6mer").encode("TTTTTT").tolist() == [5 + 4095]
    assert not build_tokenizer("3mer", overlap=1).is_codon
    assert not build_tokenizer("6mer").is_codon and not build_tokenizer("nuc").is_codon


def test_overlap_strides_example():
    tok = build_tokenizer("3mer", overlap=2)
    assert [tok.id_to_token(i) for i in tok.encode("ATGCA")] == ["ATG", "TGC", "GCA"]
    tok = build_tokenizer("6mer", overlap=3)
    assert [tok.id_to_token(i) for i in tok.encode("AAACCCGGGT")] == ["AAACCC", "CCCGGG"]


@pytest.mark.parametrize("name,k,overlap", KMER_CONFIGS)
def test_kmers_match_naive_reference(name, k, overlap):
    rng = np.random.default_rng(k * 10 + overlap)
    tok = build_tokenizer(name, overlap=overlap)
    for n in list(range(0, 14)) + [50, 101]:
        seq = random_dna(rng, n, "ACGTACGTACGTN")
        assert tok.encode(seq).tolist() == naive_kmer_ids(seq, k, overlap), seq


@settings(max_examples=60, deadline=None)
@given(
    cfg=st.sampled_from(KMER_CONFIGS),
    seqs=st.lists(st.text(alphabet="ACGTNRY-", max_size=30), max_size=6),
)
def test_encode_batch_equals_encode_and_reference(cfg, seqs):
    name, k, overlap = cfg
    tok = build_tokenizer(name, overlap=overlap)
    batch = tok.encode_batch(seqs)
    assert len(batch) == len(seqs)
    for ids, seq in zip(batch, seqs):
        assert ids.tolist() == naive_kmer_ids(seq, k, overlap)
        assert np.array_equal(ids, tok.encode(seq))


@pytest.mark.parametrize("name,k,overlap", KMER_CONFIGS)
def test_trailing_bases_agree_with_encode(name, k, overlap):
    tok = build_tokenizer(name, overlap=overlap)
    stride = k - overlap
    for length in range(0, 40):
        n = len(tok.encode("A" * length))
        covered = (n - 1) * stride + k if n else 0
        assert tok.trailing_bases(length) == length - covered
        assert 0 <= tok.trailing_bases(length) < max(k, stride) or length < k
    # Decoding what was encoded gives back the sequence minus exactly the dropped tail.
    rng = np.random.default_rng(1)
    for length in rng.integers(0, 60, size=20):
        seq = random_dna(rng, int(length))
        assert tok.decode(tok.encode(seq)) == seq[: len(seq) - tok.trailing_bases(len(seq))]


def test_non_acgt_is_unk():
    tok = build_tokenizer("3mer")
    assert tok.encode("ATGNNNCCCATX").tolist() == [5 + 14, 3, 5 + 21, 3]
    assert tok.encode("atg").tolist() == [3]  # input is upper-case after cleaning
    assert build_tokenizer("nuc").encode("ANé").tolist() == [5, 3, 3]  # one id per letter
    assert build_tokenizer("6mer", overlap=5).encode("AAAAAAN").tolist() == [5, 3]


@pytest.mark.parametrize("name,k,overlap", KMER_CONFIGS)
def test_decode_inverts_encode_at_every_overlap(name, k, overlap):
    """Overlapping k-mers share ``overlap`` letters: each after the first adds its last ``stride``."""
    rng = np.random.default_rng(31 + 7 * k + overlap)
    tok = build_tokenizer(name, overlap=overlap)
    for n in (k, k + 1, 3 * k + 2, 40):
        seq = random_dna(rng, n)
        assert tok.decode(tok.encode(seq)) == seq[: n - tok.trailing_bases(n)], seq


def test_decode_skips_specials_and_checks_range():
    tok = build_tokenizer("3mer")
    assert tok.decode([1, 5, 3, 68, 2, 0]) == "AAATTT"
    with pytest.raises(ValueError, match="69"):
        tok.decode([69])


# Subword tokenizers ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SUBWORDS)
def test_subword_specials_round_trip_and_determinism(name, train_seqs, subword):
    tok = subword[name]
    assert tok.tokens[:5] == SPECIALS
    assert tok.vocab_size == len(tok.tokens) <= 48 and not tok.is_codon
    again = build_tokenizer(name, vocab_size=48, train_sequences=list(train_seqs))
    assert again.tokens == tok.tokens
    assert again.config() == tok.config()
    for seq in train_seqs[:30] + ["", "A", "TTTTGCA"]:
        ids = tok.encode(seq)
        assert ids.dtype == np.int64 and (ids >= 5).all() and (ids < tok.vocab_size).all()
        assert tok.decode(ids) == seq
        assert np.array_equal(ids, again.encode(seq))
    batch = ["ATGGCC", "", "GATTTC" * 300] + train_seqs[:5]
    assert all(np.array_equal(a, tok.encode(s)) for a, s in zip(tok.encode_batch(batch), batch))
    assert tok.trailing_bases(1000) == 0
    pieces = [tok.id_to_token(i) for i in tok.encode(train_seqs[0])]
    assert max(len(p.removeprefix("##")) for p in pieces) > 1  # something beyond letters learned


@pytest.mark.parametrize("name", SUBWORDS)
def test_subword_long_sequences_and_unknown_letters(name, subword):
    tok = subword[name]
    long = random_dna(np.random.default_rng(3), 12_000)
    assert tok.decode(tok.encode(long)) == long
    ids = tok.encode("ATGNATG").tolist()
    assert 3 in ids and tok.decode(ids) == "ATGATG"  # an unseen letter costs one <unk>


def test_subword_model_files_hold_specials_at_fixed_ids(subword, tmp_path):
    for name in ("bpe", "ug"):
        subword[name].save(tmp_path / name)
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / name / "spm.model"))
        assert [sp.id_to_piece(i) for i in range(5)] == SPECIALS
        assert sp.piece_to_id("<mask>") == 4
    subword["wp"].save(tmp_path / "wp")
    hf = HFTokenizer.from_file(str(tmp_path / "wp" / "wordpiece.json"))
    assert [hf.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]


def test_subword_seed_and_model_change_config(train_seqs):
    a = build_tokenizer("bpe", vocab_size=40, train_sequences=train_seqs, seed=0)
    b = build_tokenizer("bpe", vocab_size=30, train_sequences=train_seqs, seed=0)
    assert a.config()["model_sha256"] != b.config()["model_sha256"]
    # A cap below the corpus size samples by seed: different seeds, different samples.
    c = build_tokenizer("bpe", vocab_size=40, train_sequences=train_seqs, max_train_sequences=20)
    d = build_tokenizer("bpe", vocab_size=40, train_sequences=train_seqs, max_train_sequences=20)
    e = build_tokenizer(
        "bpe", vocab_size=40, train_sequences=train_seqs, max_train_sequences=20, seed=5
    )
    assert c.config() == d.config() and c.config()["train_sequences"] == 20
    assert c.config()["model_sha256"] != e.config()["model_sha256"]


# Persistence ----------------------------------------------------------------------------------


def test_save_load_round_trip_every_tokenizer(subword, train_seqs, tmp_path):
    probe = train_seqs[:10] + ["ATGCNNACGTAG", "", "AC", "MKV*X"]
    for key, tok in all_tokenizers(subword).items():
        folder = tmp_path / key.replace("/", "_")
        tok.save(folder)
        json.loads((folder / "tokenizer.json").read_text())
        back = load_tokenizer(folder)
        assert type(back) is type(tok), key
        assert back.config() == tok.config() and back.tokens == tok.tokens, key
        json.dumps(back.config())
        for seq in probe:
            assert np.array_equal(back.encode(seq), tok.encode(seq)), (key, seq)


def test_load_refuses_missing_or_changed_files(subword, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")
    subword["bpe"].save(tmp_path / "bpe")
    model = tmp_path / "bpe" / "spm.model"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer(tmp_path / "bpe")


# Factory flags --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(name="4mer"), "--tokenizer"),
        (dict(name="3mer", overlap=3), "--overlap"),
        (dict(name="3mer", overlap=-1), "--overlap"),
        (dict(name="nuc", overlap=1), "--overlap"),
        (dict(name="3mer", data_type="rna"), "--data-type"),
        (dict(name="bpe", train_sequences=["ACGT"]), "--vocab_size"),
        (dict(name="ug", vocab_size=8, train_sequences=["ACGT"]), "--vocab_size"),
        (dict(name="wp", vocab_size=40, overlap=1, train_sequences=["ACGT"]), "--overlap"),
        (dict(name="bpe", vocab_size=40), "--tokenizer bpe"),
        (dict(name="nuc", data_type="codon"), "--data-type codon"),
        (dict(name="3mer", data_type="codon", overlap=1), "--data-type codon"),
        (dict(name="6mer", data_type="aa"), "--data-type aa"),
        (dict(name="aa"), "--tokenizer"),
    ],
)
def test_bad_flags_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        build_tokenizer(**kwargs)


def test_choice_lists_are_exported_and_listed_in_errors():
    assert TOKENIZERS == ("3mer", "nuc", "6mer", "bpe", "wp", "ug")
    assert DATA_TYPES == ("nuc", "codon", "aa")
    with pytest.raises(ValueError) as err:
        build_tokenizer("bogus")
    assert all(name in str(err.value) for name in TOKENIZERS)


def test_conflicting_vocab_size_warns_and_is_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="helm"):
        tok = build_tokenizer("3mer", vocab_size=100)
    assert tok.vocab_size == 69
    assert "100" in caplog.text and "69" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="helm"):
        build_tokenizer("3mer", vocab_size=69)
    assert caplog.text == ""


def test_codon_data_type_is_the_3mer_tokenizer():
    codon = build_tokenizer("3mer", data_type="codon")
    assert codon.is_codon and codon.config() == build_tokenizer("3mer").config()


# Protein --------------------------------------------------------------------------------------


def test_protein_tokenizer():
    tok = build_tokenizer("aa", data_type="aa")
    assert isinstance(tok, ProteinTokenizer) and tok.vocab_size == 27 and not tok.is_codon
    letters = "ACDEFGHIKLMNPQRSTVWY*X"
    assert tok.tokens == SPECIALS + list(letters)
    assert tok.encode(letters).tolist() == list(range(5, 27))
    assert tok.encode("MBZ").tolist() == [5 + letters.index("M"), 3, 3]
    assert tok.decode([1, 5 + letters.index("K"), 3, 26, 2]) == "KX"
    batch = ["MKV", "", "WB*"]
    assert [a.tolist() for a in tok.encode_batch(batch)] == [tok.encode(s).tolist() for s in batch]
    for name in ("nuc", "3mer"):  # selected by the data type (one token per residue)
        assert isinstance(build_tokenizer(name, data_type="aa"), ProteinTokenizer)
    dna = "ATGAAAGTTTAAGGNCCC"
    assert translate(dna) == "MKV*XP" and tok.decode(tok.encode(translate(dna))) == "MKV*XP"


def test_looks_like_nucleotides():
    assert looks_like_nucleotides("ACGTUN") and looks_like_nucleotides("acgu")
    assert not looks_like_nucleotides("MKVLA") and not looks_like_nucleotides("ACGTE")


def test_subword_on_proteins_round_trips():
    rng = np.random.default_rng(2)
    prots = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 80)) for _ in range(60)]
    tok = build_tokenizer("wp", data_type="aa", vocab_size=40, train_sequences=prots)
    assert tok.data_type == "aa"
    assert all(tok.decode(tok.encode(p)) == p for p in prots[:10])
    assert tok.decode(tok.encode("MK*V")) == "MKV"  # '*' never seen: one <unk>, rest kept


# Real data ------------------------------------------------------------------------------------


def read_fasta(path, limit: int) -> list[str]:
    records, parts = [], None
    with gzip.open(path, "rt") as handle:
        for line in handle:
            if line.startswith(">"):
                if parts is not None:
                    records.append("".join(parts).upper().replace("U", "T"))
                    if len(records) == limit:
                        return records
                parts = []
            else:
                parts.append(line.strip())
    if parts is not None:
        records.append("".join(parts).upper().replace("U", "T"))
    return records


def test_real_sequences_round_trip(shared_data):
    seqs = read_fasta(shared_data / "pretrain_yeast_cds_cubar" / "yeast_cds.fa.gz", 300)
    assert len(seqs) == 300
    toks = {f"{n}/o{o}": KmerTokenizer(k, o) for n, k, o in KMER_CONFIGS if o in (0, k - 1)}
    train = [s[:900] for s in seqs[:40]]
    toks.update({n: build_tokenizer(n, vocab_size=64, train_sequences=train) for n in SUBWORDS})
    for key, tok in toks.items():
        batch = tok.encode_batch(seqs)
        for ids, seq in zip(batch, seqs):
            kept = len(seq) - tok.trailing_bases(len(seq))
            assert tok.decode(ids) == seq[:kept], key
            assert int(ids.max(initial=0)) < min(tok.vocab_size, 1 << 16)
    codons = toks["3mer/o0"]
    for seq, ids in zip(seqs[:20], codons.encode_batch(seqs[:20])):
        assert ids.tolist() == naive_kmer_ids(seq, 3, 0)
        aa = ProteinTokenizer()
        assert aa.decode(aa.encode(translate(seq))) == translate(seq)
