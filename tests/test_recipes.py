"""The six "50M" reproduction commands of the original HELM README run verbatim on CPU.

Each command is the README's text with $DATA_DIR, $OUTPUT_DIR and NUM_DEVICES=1 filled in; CPU-sized
--batch_size, --max_seq_len and --num_samples are appended, and --epochs 1 (thirty epochs of 50M-parameter
checkpoints is GPU work). The models are the full 50M recipes.
"""

import shlex

import pytest
from helpers import load_script

from helm.checkpoint import load_checkpoint

train = load_script("train.py")

RECIPES = {
    "gpt2-mlm": "python train.py --data_dir $DATA_DIR --train_file sequences_codonized.txt --model_name gpt2 --num_layers 10 --hidden_size 640 --batch_size 128 --intermediate_size 2560 --epochs 30 --lr 1e-3 --weight-decay 0.1 --min-lr 1e-5 --data-type codon --mode mlm --vocab_size 70 --max_seq_len 444 --output $OUTPUT_DIR/gpt2/mlm/ --num_devices $NUM_DEVICES --num_workers 16 --num_samples -1 --bidirectional --amp",
    "gpt2-clm": "python train.py --data_dir $DATA_DIR --train_file sequences_codonized.txt --model_name gpt2 --num_layers 10 --hidden_size 640 --batch_size 128 --intermediate_size 2560 --epochs 30 --lr 1e-3 --weight-decay 0.1 --min-lr 1e-5 --data-type codon --mode clm --vocab_size 70 --max_seq_len 444 --output $OUTPUT_DIR/gpt2/clm/ --num_devices $NUM_DEVICES --num_workers 16 --num_samples -1 --amp",
    "bimamba-mlm": "python train.py --data_dir $DATA_DIR --train_file sequences_codonized.txt --model_name mamba --num_layers 20 --hidden_size 256 --batch_size 128 --intermediate_size 1024 --epochs 30 --lr 1e-3 --weight-decay 0.1 --min-lr 1e-5 --data-type codon --mode mlm --vocab_size 70 --max_seq_len 444 --output $OUTPUT_DIR/mamba/mlm/ --num_devices $NUM_DEVICES  --num_workers 16 --num_samples -1 --pos_embedding absolute --amp --bidirectional",
    "mamba-clm": "python train.py --data_dir $DATA_DIR --train_file sequences_codonized.txt --model_name mamba --num_layers 40 --hidden_size 256 --batch_size 128 --intermediate_size 1024 --epochs 30 --lr 1e-3 --weight-decay 0.1 --min-lr 1e-5 --data-type codon --mode clm --vocab_size 70 --max_seq_len 444 --output $OUTPUT_DIR/mamba/clm/ --num_devices $NUM_DEVICES --num_workers 16 --num_samples -1 --pos_embedding absolute --amp",
    "hyena-mlm": "python train.py --data_dir $DATA_DIR --train_file sequences_codonized.txt --model_name hyena --num_layers 7 --hidden_size 768 --batch_size 128 --intermediate_size 3072 --epochs 30 --lr 1e-4 --weight-decay 0.1 --min-lr 1e-6 --data-type codon --mode mlm --vocab_size 70 --max_seq_len 444 --output $OUTPUT_DIR/hyena/mlm/ --num_devices $NUM_DEVICES --num_workers 16 --num_samples -1 --pos_embedding absolute --amp --bidirectional",
    "hyena-clm": "python train.py --data_dir $DATA_DIR --train_file sequences_codonized.txt --model_name hyena --num_layers 7 --hidden_size 768 --batch_size 128 --intermediate_size 3072 --epochs 30 --lr 1e-4 --weight-decay 0.1 --min-lr 1e-6 --data-type codon --mode clm --vocab_size 70 --max_seq_len 444 --output $OUTPUT_DIR/hyena/clm/ --num_devices $NUM_DEVICES --num_workers 16 --num_samples -1 --pos_embedding absolute --amp",
}
CPU_SIZED = ["--batch_size", "2", "--max_seq_len", "32", "--num_samples", "4", "--epochs", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small codonized corpus (codons separated by spaces, as the file name says)."""
    from helm.data import demo_sequences

    folder = tmp_path_factory.mktemp("data")
    lines = [
        " ".join(s[i : i + 3] for i in range(0, len(s), 3)) for s in demo_sequences(60, seed=1)
    ]
    (folder / "sequences_codonized.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_original_recipe_runs_verbatim(name, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HELM_CACHE_DIR", str(tmp_path / "cache"))
    command = (
        RECIPES[name]
        .replace("$DATA_DIR", str(data_dir))
        .replace("$OUTPUT_DIR", str(tmp_path / "out"))
        .replace("$NUM_DEVICES", "1")
    )
    argv = shlex.split(command)[2:] + CPU_SIZED  # drop "python train.py"
    assert train.main(argv) == 0
    folder = tmp_path / "out" / name.replace("bimamba", "mamba").replace("-", "/")
    ckpt = load_checkpoint(folder / "checkpoints" / "last.pt")
    params = sum(v.numel() for k, v in ckpt["model"].items() if "lm_head" not in k)
    assert 45e6 < params < 55e6, params  # the full 50M recipe, not a shrunken stand-in
    assert ckpt["config"]["data_type"] == "codon" and ckpt["config"]["amp"] is True
