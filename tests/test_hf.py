"""Sharing models (helm.hf): the exact Hugging Face export of every supported architecture and mode,
checked by ``transformers`` in a process that never imports HELM; refusals; importing HF models
into eval.py and round trips; the HELM-native folder; initialising a run from a trained model.
Offline and on the CPU; skipped without the ``hf`` extra (transformers, safetensors)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from helpers import load_script, require, tiny_checkpoint

transformers = require("transformers")
require("safetensors")

from helm.checkpoint import LoadedModel  # noqa: E402
from helm.data.dataset import frame  # noqa: E402
from helm.hf import (  # noqa: E402
    ExportError,
    export_helm,
    export_hf,
    hf_tokenizer,
    init_from,
    load_model,
    run_config,
    weights_file,
)
from helm.hierarchy import build_hierarchy  # noqa: E402
from helm.models import build_model, model_config  # noqa: E402
from helm.tokenizers import KmerTokenizer  # noqa: E402

SEQS = ["ATGAAACCCGGGTTTTAA", "atgGCUNNNcccGA"]  # lower case, U, an unknown codon, a partial codon
MAMBA = ["--model_name", "mamba", "--mode", "clm", "--intermediate_size", "0", "--pos_embedding", "none"]  # fmt: skip
# Runs beside the session's gpt2 mlm/clm: what each needs to be exportable, on a smaller corpus.
EXTRA_RUNS = {
    "bert_mlm": ["--model_name", "bert", "--mode", "mlm"],
    "mamba_clm": MAMBA,
    "mamba2_clm": [*MAMBA, "--ssm_layer", "mamba2"],
}
AUTO = {"gpt2_clm": "AutoModelForCausalLM", "gpt2_mlm": "AutoModelForCausalLM",
        "bert_mlm": "AutoModelForMaskedLM", "mamba_clm": "AutoModelForCausalLM",
        "mamba2_clm": "AutoModelForCausalLM"}  # fmt: skip

# Loads every exported folder with transformers alone and writes its tokenization and logits.
CHILD = """
import json, sys
import torch, transformers
out = {}
for name, (folder, auto) in json.loads(sys.argv[1]).items():
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = getattr(transformers, auto).from_pretrained(folder).eval()
    enc = tok(json.loads(sys.argv[3]), return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**{k: enc[k] for k in ("input_ids", "attention_mask")}).logits
    out[name] = {"ids": enc["input_ids"], "mask": enc["attention_mask"], "logits": logits,
                 "class": type(model).__name__}
assert not [m for m in sys.modules if m == "helm" or m.startswith("helm.")], "helm was imported"
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def runs(tiny_runs, tmp_path_factory) -> dict:
    """name -> last.pt: the session's gpt2 runs and a bert, mamba and mamba2 run trained here."""
    root = tmp_path_factory.mktemp("hf_runs")
    train = load_script("train.py")
    paths = {f"gpt2_{m}": tiny_checkpoint(tiny_runs, m) for m in ("clm", "mlm")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HELM_CACHE_DIR", str(tiny_runs / "cache"))
        for name, extra in EXTRA_RUNS.items():
            argv = [*TINY_RUN, "--num_samples", "32", *extra, "--output", str(root / name)]
            assert train.main(argv) == 0
            paths[name] = root / name / "checkpoints" / "last.pt"
    return paths


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict:
    """name -> (folder, what transformers computed there in a process without HELM)."""
    root = tmp_path_factory.mktemp("hf_exports")
    folders = {name: str(export_hf(path, root / name)) for name, path in runs.items()}
    result = root / "child.pt"
    spec = json.dumps({name: (folders[name], AUTO[name]) for name in folders})
    subprocess.run(
        [sys.executable, "-I", "-c", CHILD, spec, str(result), json.dumps(SEQS)],
        cwd=root, check=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    done = torch.load(result)
    return {name: (folders[name], done[name]) for name in folders}


@pytest.mark.parametrize("name", list(AUTO))
def test_export_loads_in_transformers_with_helms_tokens_and_logits(name, runs, exported):
    folder, theirs = exported[name]
    loaded = load_model(runs[name])
    cfg, tok = loaded.model.cfg, loaded.tokenizer
    causal = not cfg.bidirectional
    clean = [s.upper().replace("U", "T") for s in SEQS]
    mask = theirs["mask"].bool()
    for row, seq in enumerate(clean):  # HF's tokenizer frames and tokenizes as HELM does
        assert theirs["ids"][row][mask[row]].tolist() == frame(tok.encode(seq), causal).tolist()
    with torch.no_grad():
        ours = loaded.model.lm_head(loaded.model(theirs["ids"], theirs["mask"]))
    assert theirs["logits"].shape[-1] == tok.vocab_size  # the real vocabulary, padding dropped
    tol = 1e-5 if name.startswith(("gpt2", "bert")) else 1e-4
    torch.testing.assert_close(
        theirs["logits"][mask], ours[..., : tok.vocab_size][mask], atol=tol, rtol=tol
    )
    card = open(f"{folder}/README.md").read()
    assert "Loss: " in card and "codon tree: " in card and "val_loss" in card


def test_gpt2_mlm_exports_bidirectional(exported):
    assert json.load(open(f"{exported['gpt2_mlm'][0]}/config.json"))["is_causal"] is False
    assert exported["bert_mlm"][1]["class"] == "BertForMaskedLM"


# Refusals ------------------------------------------------------------------------------------------


def _loaded(name: str, **fields) -> LoadedModel:
    tok = KmerTokenizer(3)
    cfg = model_config(name, vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2,
                       d_ff=fields.pop("d_ff", 64), max_seq_len=32, **fields)  # fmt: skip
    model = build_model(name, cfg).eval()
    config = run_config(name, cfg, tok)
    ckpt = {"model_name": name, "source": {"format": "test", "weights": "raw"}}
    return LoadedModel(model, tok, build_hierarchy("true"), config, ckpt)


@pytest.mark.parametrize(
    "name, fields, option",
    [
        ("hyena", {}, "--model_name hyena"),
        ("gpt2", {"pos_embedding": "sincos"}, "--pos_embedding sincos"),
        ("gpt2", {"pos_embedding": "none"}, "--pos_embedding none"),
        ("gpt2", {"pos_embedding": "rotary"}, "--pos_embedding rotary"),
        ("gpt2", {"pos_embedding_apply": "concat", "pos_embedding_dim": 8, "tie_embeddings": False},
         "--pos_embedding_apply concat"),
        ("gpt2", {"activation": "swiglu"}, "--activation swiglu"),
        ("bert", {"activation": "relu"}, "--activation relu"),
        ("bert", {"mlm_head": "linear"}, "mlm_head=linear"),
        ("mamba", {"d_ff": 64, "pos_embedding": "none"}, "--intermediate_size 64"),
        ("mamba", {"d_ff": 0, "bidirectional": True}, "--bidirectional"),
        ("mamba", {"d_ff": 0, "pos_embedding": "absolute"}, "--pos_embedding absolute"),
    ],
)  # fmt: skip
def test_options_without_an_hf_equivalent_are_refused(name, fields, option, tmp_path):
    with pytest.raises(ExportError, match="--format helm") as err:
        export_hf(_loaded(name, **fields), tmp_path / "out")
    assert option in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_bidirectional_gpt2_exports_bidirectional(tmp_path):
    """transformers computes the export's logits at every position, with and without a mask: the
    first position sees the last token (a causal export would not)."""
    src = _loaded("gpt2", bidirectional=True)
    _random(src.model)
    hf = transformers.GPT2LMHeadModel.from_pretrained(export_hf(src, tmp_path / "hf")).eval()
    ids = torch.tensor([[1, 5, 9, 68, 40, 2]])
    with torch.no_grad():
        ours = src.model.lm_head(src.model(ids))[..., :69]
        for mask in (None, torch.ones_like(ids)):
            torch.testing.assert_close(hf(ids, attention_mask=mask).logits, ours, atol=1e-5, rtol=0)


def test_export_command_and_its_refusal(eval_run, tiny_runs, tmp_path):
    code, _, err = eval_run("export", tiny_checkpoint(tiny_runs, "mlm"), "--format", "hf",
                            "--out", tmp_path / "hf", "--ema")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    hyena = export_helm(_loaded("hyena"), tmp_path / "hyena")
    code, _, err = eval_run("export", hyena, "--format", "hf", "--out", tmp_path / "no")
    assert code == 2 and "--model_name hyena" in err and "--format helm" in err


# Importing Hugging Face models --------------------------------------------------------------------


def _hf_folder(path, model) -> None:
    model.save_pretrained(path)
    causal = not isinstance(model, transformers.BertForMaskedLM)
    hf_tokenizer(KmerTokenizer(3), causal, 48).save_pretrained(path)


def _fasta(path) -> str:
    rng = np.random.default_rng(0)
    codons = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT"]
    path.write_text("".join(f">s{i}\nATG{''.join(rng.choice(codons, 20))}TAA\n" for i in range(8)))
    return str(path)


def _random(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_random_hf_bert_imports_exactly_and_evaluates(eval_run, tmp_path):
    cfg = transformers.BertConfig(
        vocab_size=69,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=48,
    )  # fmt: skip (2 segment rows)
    hf = _random(transformers.BertForMaskedLM(cfg))
    _hf_folder(tmp_path / "bert", hf)
    loaded = load_model(tmp_path / "bert")
    assert loaded.config["mode"] == "mlm" and loaded.hierarchy.kind == "true"
    ids = torch.tensor([[1, 19, 5, 26, 47, 2, 0], [1, 19, 44, 3, 26, 68, 2]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = loaded.model.lm_head(loaded.model(ids, mask))[..., :69]
        ref = hf(input_ids=ids, attention_mask=mask).logits  # segment 0 folded into positions
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    fasta = _fasta(tmp_path / "seqs.fasta")
    code, _, err = eval_run("pretrain", tmp_path / "bert", "--file", fasta, "--out",
                            tmp_path / "m.json")  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["loss"] > 0
    code, _, err = eval_run(
        "embed", tmp_path / "bert", "--file", fasta, "--out", tmp_path / "e.npy"
    )
    assert code == 0, err
    assert np.load(tmp_path / "e.npy").shape == (8, 32)


@pytest.mark.parametrize("kind", ["gpt2", "mamba", "mamba2"])
def test_random_hf_causal_model_round_trips_and_generates(kind, eval_run, tmp_path):
    common = dict(vocab_size=69, num_hidden_layers=2, hidden_size=32)
    cfg = {
        "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=48,
                                                vocab_size=69, tie_word_embeddings=False),
        "mamba": lambda: transformers.MambaConfig(state_size=4, time_step_rank=2, **common),
        "mamba2": lambda: transformers.Mamba2Config(num_heads=4, head_dim=16, n_groups=2,
                                                    state_size=4, chunk_size=8, **common),
    }[kind]()  # fmt: skip
    arch = {"gpt2": "GPT2LMHeadModel", "mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}
    hf = _random(getattr(transformers, arch[kind])(cfg))
    _hf_folder(tmp_path / "hf", hf)
    export_hf(load_model(tmp_path / "hf"), tmp_path / "back")  # HF -> HELM -> HF
    again = getattr(transformers, arch[kind]).from_pretrained(tmp_path / "back")
    theirs = dict(again.state_dict())
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(theirs[key], value, atol=0, rtol=0, msg=key)
    code, out, err = eval_run("generate", tmp_path / "hf", "--num", "2", "--max-length", "5")
    assert code == 0, err
    assert out.count(">gen") == 2


def test_hf_folder_with_another_vocabulary_is_refused(tmp_path):
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=69)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    tok = hf_tokenizer(KmerTokenizer(3), True, 16)
    backend = json.loads(tok.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    vocab["AAA"], vocab["AAC"] = vocab["AAC"], vocab["AAA"]  # another order
    (tmp_path / "tokenizer.json").write_text(json.dumps(backend))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})
    )
    with pytest.raises(ExportError, match="not HELM's codon or nucleotide vocabulary"):
        load_model(tmp_path)


# HELM-native folders -------------------------------------------------------------------------------


def test_native_round_trip_of_hyena(tmp_path):
    import helm

    src = _loaded("hyena", fftconv_impl="torch")
    folder = helm.export_helm(src, tmp_path / "hyena")
    back = helm.from_pretrained(folder)
    assert back.model_name == "hyena" and back.tokenizer.tokens == src.tokenizer.tokens
    for key, value in src.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[key], value), key
    ids = torch.tensor([[1, 5, 9, 68, 2]])
    torch.testing.assert_close(back.model(ids), src.model(ids), atol=0, rtol=0)


def test_native_export_of_a_checkpoint_evaluates_as_the_checkpoint(eval_run, tiny_runs, tmp_path):
    ckpt = tiny_checkpoint(tiny_runs, "mlm")
    folder = export_helm(ckpt, tmp_path / "native", ema=True)
    assert "val_loss" in (folder / "README.md").read_text()
    fasta = _fasta(tmp_path / "seqs.fasta")
    outs = []
    for source, extra in ((ckpt, ["--ema"]), (folder, [])):
        out = tmp_path / f"{len(outs)}.json"
        code, _, err = eval_run("pretrain", source, "--file", fasta, "--out", out, *extra)
        assert code == 0, err
        outs.append(json.loads(out.read_text())["metrics"])
    assert outs[0] == outs[1]
    assert weights_file(folder) == folder / "model.safetensors" and weights_file(ckpt) == ckpt
    code, _, err = eval_run("embed", folder, "--file", fasta, "--ema", "--out", tmp_path / "e.npy")
    assert code == 2 and "drop --ema" in err


def test_init_from_copies_matching_weights_and_names_mismatches(runs, tmp_path):
    loaded = load_model(runs["gpt2_mlm"])
    fields = dict(vars(loaded.model.cfg))
    fresh = build_model("gpt2", model_config("gpt2", **fields))
    init_from(fresh, runs["gpt2_mlm"], model_name="gpt2", tokenizer=loaded.tokenizer)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    wider = build_model("gpt2", model_config("gpt2", **(fields | {"d_model": 64, "d_ff": 32})))
    with pytest.raises(ValueError, match="--hidden_size 64 .*--intermediate_size 32"):
        init_from(wider, runs["gpt2_mlm"], model_name="gpt2", tokenizer=loaded.tokenizer)
    with pytest.raises(ValueError, match="--model_name bert"):
        init_from(wider, runs["gpt2_mlm"], model_name="bert", tokenizer=loaded.tokenizer)


def test_a_damaged_hf_folder_is_one_error(tmp_path):
    from helm.checkpoint import CheckpointError
    from helm.hf import load_model

    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": ')
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(tmp_path)
