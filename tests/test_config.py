import os
import re
from pathlib import Path

import pytest
from helpers import load_script

from helm.config import (
    ConfigError,
    build_parser,
    flag_reference,
    given_keys,
    load_yaml,
    parse_config,
    resume_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

# The flags of the original HELM README; every one must be accepted.
ORIGINAL_FLAGS = """--config --loss --hxe-alpha --soft-labels-beta --hierarchy --data_dir --train_file --val_file
--test_file --file_extension --column_name --max_seq_len --masking_strategy --masking_ratio
--data-type --tokenizer --overlap --position_ids --mode --batch_size --num_samples --model_name
--bidirectional --ssm_layer --vocab_size --num_layers --num_heads --pad_vocab_size_multiple
--pos_embedding --pos_embedding_apply --pos_embedding_dim --tie_embeddings --hidden_size
--intermediate_size --dropout --attn_dropout --activation --opt --opt-eps --opt-betas --momentum
--weight-decay --clip-grad --clip-mode --layer-decay --grad-accum-steps --early-stop --sched
--sched-on-updates --lr --lr-base --lr-base-size --lr-noise --lr-noise-pct --lr-noise-std
--lr-cycle-mul --lr-cycle-decay --lr-cycle-limit --lr-k-decay --warmup-lr --min-lr --epochs
--epoch-repeats --start-epoch --decay-milestones --decay-epochs --warmup-epochs --warmup-prefix
--cooldown-epochs --patience-epochs --decay-rate --model-ema --model-ema-force-cpu --model-ema-decay
--seed --resume --accelerator --num_workers --distributed-backend --sync-bn --num_nodes --num_devices
--worker-seeding --checkpoint-hist --val-metric-mode --log-interval --amp --pin-mem --no-prefetcher
--output --eval-metric""".split()


def test_every_original_flag_exists():
    known = {s for a in build_parser()._actions for s in a.option_strings}
    assert [f for f in ORIGINAL_FLAGS if f not in known] == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads_and_validates(path, tmp_path):
    data = load_yaml(path, build_parser())
    assert data, f"{path.name} is empty"
    args = parse_config(["--config", str(path), "--train_file", str(tmp_path / "x.txt")])
    for key, value in data.items():
        if key != "num_samples" or value != -1:
            assert getattr(args, key) == value, key


def test_quickstart_is_the_base_without_data():
    args = parse_config([])
    assert args.demo_corpus
    assert (
        args.num_layers
        == load_yaml(CONFIGS[0].parent / "quickstart.yaml", build_parser())["num_layers"]
    )
    with_data = parse_config(["--train_file", "x.txt"])
    assert not with_data.demo_corpus and with_data.num_layers == 4  # the parser default


def test_cli_beats_yaml_beats_default(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("hidden_size: 96\nhxe-alpha: 0.4\nlr_base: 0.01\n")
    args = parse_config(["--config", str(cfg), "--train_file", "t.txt", "--hidden_size", "64"])
    assert args.hidden_size == 64 and args.hxe_alpha == 0.4 and args.lr_base == 0.01
    assert args.num_heads == 4


def test_configs_stack_later_wins(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("hidden_size: 96\nnum_layers: 3\n")
    b.write_text("hidden_size: 32\n")
    args = parse_config(["--config", str(a), str(b), "--train_file", "t.txt"])
    assert (args.hidden_size, args.num_layers) == (32, 3)


@pytest.mark.parametrize(
    "text, match",
    [
        ("hiden_size: 3\n", "unknown key 'hiden_size'"),
        ("hidden_size: big\n", "hidden_size has a bad value"),
        ("loss: HXEE\n", "loss must be one of"),
        ("amp: 3\n", "amp must be true or false"),
        ("- a\n- b\n", "expected a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_named(tmp_path, text, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_config(["--config", str(cfg)])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--accelerator", "tpu"], "tpu is not supported"),
        (["--mode", "clm", "--bidirectional"], "--bidirectional with --mode clm"),
        (["--data-type", "codon", "--tokenizer", "6mer"], "--data-type codon"),
        (["--model_name", "gpt2", "--ssm_layer", "mamba2"], "--ssm_layer applies to"),
        (["--model_name", "hyena", "--pos_embedding", "rotary"], "rotary needs attention"),
        (["--distributed-backend", "horovod"], "--distributed-backend"),
        (["--masking_ratio", "1.5"], "--masking_ratio"),
        (["--split", "0.5,0.2,0.2"], "--split"),
        (["--tokenizer", "nuc", "--loss", "HXE"], "needs the codon tree"),
        (["--overlap", "1", "--loss", "soft_labels"], "--tokenizer 3mer --overlap 0"),
        (["--data-type", "aa", "--loss", "aa_loss_add"], "needs the codon tree"),
    ],
)
def test_bad_combinations_are_refused(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_bad_cli_value_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--loss", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_derived_values():
    assert parse_config(["--mode", "mlm"]).bidirectional is True
    assert parse_config(["--mode", "clm"]).bidirectional is False
    assert parse_config(["--mode", "mlm", "--no-bidirectional"]).bidirectional is False
    assert parse_config(["--eval-metric", "val_accuracy"]).val_metric_mode == "max"
    assert parse_config(["--eval-metric", "val_loss"]).val_metric_mode == "min"
    assert parse_config(["--distributed-backend", "ddp"]).distributed_backend == "auto"
    assert parse_config(["--num_samples", "-1", "--train_file", "t"]).num_samples is None


def test_readme_documents_every_flag_and_ci_runs_its_test_command():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert flag_reference() in readme  # regenerate with `python -m helm.config`
    names = {a.option_strings[0] for a in build_parser()._actions if a.option_strings[0] != "-h"}
    assert sorted(f for f in names if f"`{f}" not in readme) == []
    test_command = "python -m pytest"
    assert f"{test_command}             # run the tests" in readme
    assert test_command in (root / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-1"], "--seed must be in"),
        (["--lr-cycle-mul", "inf"], "--lr-cycle-mul"),
        (["--warmup-lr", "-1"], "--warmup-lr must be >= 0"),
        (["--min-lr", "-1"], "--min-lr must be >= 0"),
        (["--clip-grad", "-1"], "--clip-grad must be > 0"),
        (["--layer-decay", "-0.5"], "--layer-decay must be > 0"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--train_file", ""], "--train_file is empty"),
        (["--test_file", "t.txt"], "--test_file needs the training data"),
        (["--hidden_size", "10000000"], "--hidden_size must be in"),
        (
            ["--tokenizer", "wp", "--loss", "XE", "--vocab_size", "1000000000"],
            "--vocab_size must be in",
        ),
    ],
)
def test_bad_values_name_their_flag(argv, message, capsys):
    try:
        parse_config(argv)
    except ConfigError as exc:
        text = str(exc)
    except SystemExit:
        text = capsys.readouterr().err
    else:
        raise AssertionError(f"{argv} was accepted")
    assert message in text


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("data_dir: .inf", "data_dir must be text"),
        ("lr: [1, 2]", "lr takes one value"),
        ("epochs: 2.5", "epochs has a bad value"),
        ("lr: .nan", "lr has a bad value"),
        ("output: {a: 1}", "output takes one value"),
    ],
)
def test_yaml_values_of_the_wrong_type(tmp_path, yaml_text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(["--config", str(cfg)])


def test_both_spellings_and_one_line_errors(capsys):
    assert parse_config(["--batch-size", "4"]).batch_size == 4
    assert parse_config(["--grad_accum_steps", "2"]).grad_accum_steps == 2
    with pytest.raises(SystemExit):
        parse_config(["--hiden_size", "8"])
    err = capsys.readouterr().err
    assert "did you mean --hidden_size?" in err and "usage" not in err


def test_resume_config_keeps_the_run_and_refuses_changes():
    saved = vars(parse_config(["--mode", "clm", "--epochs", "2"]))
    now = parse_config(["--resume", "auto", "--output", "x", "--epochs", "5"])
    merged, changed = resume_config(
        now, saved, given_keys(["--resume", "auto", "--output", "x", "--epochs", "5"])
    )
    assert (
        merged.mode == "clm"
        and merged.epochs == 5
        and set(changed) == {"epochs", "output", "resume"}
    )
    now = parse_config(["--mode", "mlm", "--resume", "auto", "--output", "x"])
    with pytest.raises(ConfigError, match="--mode 'mlm' \\(the run has 'clm'\\)"):
        resume_config(
            now, saved, given_keys(["--mode", "mlm", "--resume", "auto", "--output", "x"])
        )


def test_help_says_what_a_bare_run_uses(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "configs/quickstart.yaml is layered over the defaults" in out and "loss HXE" in out


def test_defaults_fit_lm_pretraining(monkeypatch):
    args = parse_config(["--train_file", "x.txt"])
    assert args.sched_on_updates is True and args.num_workers == -1 and args.pin_mem is True
    assert (
        parse_config(["--train_file", "x.txt", "--no-sched-on-updates"]).sched_on_updates is False
    )
    train = load_script("train.py")
    from helm.distributed import DistInfo

    info = DistInfo(0, 0, 1, None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert train.num_workers(-1, info) == 1  # a 2-core box: one worker, no oversubscription
    assert train.num_workers(2, info) == 2  # as asked, up to the cores (more are capped)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert train.num_workers(-1, info) == 0


def test_a_cpu_install_does_not_pull_triton():
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[1] / "setup.py").read_text())
    call = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"
    )
    kw = {
        k.arg: ast.literal_eval(k.value)
        for k in call.keywords
        if k.arg in ("install_requires", "extras_require")
    }
    assert not [r for r in kw["install_requires"] if r.startswith("triton")]
    assert any(r.startswith("triton") for r in kw["extras_require"]["dev"])


def test_tensorboard_tags_are_grouped_by_split():
    from helm.logger import tensorboard_tag

    assert (
        tensorboard_tag("val_loss") == "val/loss"
        and tensorboard_tag("test_dist@1") == "test/dist@1"
    )
    assert (
        tensorboard_tag("ema_val_xe") == "ema/val_xe" and tensorboard_tag("train/lr") == "train/lr"
    )


def test_yaml_null_only_where_the_default_is_unset(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mode: null\n")
    with pytest.raises(ConfigError, match="mode needs a value"):
        parse_config(["--config", str(cfg)])
    cfg.write_text("bidirectional: null\nlr: null\n")
    args = parse_config(["--config", str(cfg), "--mode", "clm"])
    assert args.bidirectional is False and args.lr is None


def test_no_ambiguous_abbreviations(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--batch", "8"])
    assert "did you mean --batch_size?" in capsys.readouterr().err


def test_resume_may_move_a_demo_run_to_real_data():
    saved = vars(parse_config([]))  # the demo corpus
    assert saved["demo_corpus"] is True
    argv = ["--resume", "auto", "--output", "x", "--train_file", "data.txt"]
    merged, changed = resume_config(parse_config(argv), saved, given_keys(argv))
    assert (
        merged.demo_corpus is False and merged.train_file == "data.txt" and "train_file" in changed
    )


def test_resume_ignores_the_quickstart_layer():
    """A resumed run's flags are checked against its checkpoint, not against quickstart.yaml."""
    args = parse_config(["--resume", "auto", "--output", "x", "--tokenizer", "nuc"])
    assert args.loss == "XE"  # quickstart's HXE would have refused --tokenizer nuc


@pytest.mark.parametrize("name", ["gpt2", "bert", "mamba", "hyena"])
def test_each_model_owns_its_default_positions(name):
    from helm.models import config_class

    args = parse_config(["--model_name", name, "--train_file", "x.txt"])
    assert args.pos_embedding == config_class(name).pos_embedding  # recorded, not left unset
    assert args.pos_embedding == ("absolute" if name in ("gpt2", "bert") else "none")
    given = parse_config(
        ["--model_name", name, "--train_file", "x.txt", "--pos_embedding", "sincos"]
    )
    assert given.pos_embedding == "sincos"
    help_text = " ".join(build_parser().format_help().split())
    assert "default: the model's own (absolute for gpt2, bert; none for mamba, hyena)" in help_text
