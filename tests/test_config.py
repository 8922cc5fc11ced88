from pathlib import Path

import pytest

from helm.config import ConfigError, build_parser, load_yaml, parse_config

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
    assert args.num_layers == load_yaml(CONFIGS[0].parent / "quickstart.yaml", build_parser())["num_layers"]
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
    flags = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")}
    assert sorted(f for f in flags if f"`{f}" not in readme and f" {f}" not in readme) == []
    test_command = "python -m pytest"
    assert f"{test_command}             # run the tests" in readme
    assert test_command in (root / ".ci" / "run").read_text()
