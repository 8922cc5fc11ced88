"""Parameter counts of the published recipes, built on the meta device (no memory, no init cost).

Recipes (layers x width / FFN, vocabulary 69 codon tokens padded to 72): GPT-2 and Hyena "50M",
and the GPT-2 size presets 20M, 100M, 150M. Each is checked under two settings:
- ``original``: as the original HELM runs were launched: learned absolute positions over
  max_seq_len 444, untied input and output embeddings (its default);
- ``default``: this package's defaults: tied embeddings, max_seq_len 1024 (absolute positions for
  GPT-2, none for Hyena).
Both land within 10% of the nominal size; tied weights are counted once.
"""

from __future__ import annotations

import pytest
import torch

from helm.models import build_model, model_config

RECIPES = [  # model, nominal name, layers, width, FFN, nominal parameters
    ("gpt2", "50M", 10, 640, 2560, 50e6),
    ("hyena", "50M", 7, 768, 3072, 50e6),
    ("gpt2", "20M", 12, 384, 1536, 20e6),
    ("gpt2", "100M", 14, 768, 3072, 100e6),
    ("gpt2", "150M", 12, 1024, 4096, 150e6),
]
SETTINGS = {
    "original": dict(max_seq_len=444, pos_embedding="absolute", tie_embeddings=False),
    "default": dict(max_seq_len=1024, tie_embeddings=True),
}


def count(name: str, layers: int, width: int, ffn: int, **kw) -> int:
    cfg = model_config(
        name, vocab_size=69, num_layers=layers, d_model=width, d_ff=ffn, num_heads=8, **kw
    )
    with torch.device("meta"):
        model = build_model(name, cfg)
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors appear once


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name, recipe, layers, width, ffn, nominal", RECIPES)
def test_recipe_is_within_ten_percent(name, recipe, layers, width, ffn, nominal, setting):
    n = count(name, layers, width, ffn, **SETTINGS[setting])
    assert abs(n - nominal) <= 0.1 * nominal, f"{name} {recipe} ({setting}): {n:,} parameters"


def test_gpt2_count_matches_the_closed_form():
    L, d, f, v, T = 10, 640, 2560, 72, 444
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    tied = L * block + v * d + T * d + 2 * d  # blocks, token + position tables, final LayerNorm
    assert count("gpt2", L, d, f, max_seq_len=T) == tied
    assert count("gpt2", L, d, f, max_seq_len=T, tie_embeddings=False) == tied + v * d


def test_hyena_count_matches_the_closed_form():
    L, d, f, v, order, emb = 7, 768, 3072, 72, 64, 33
    filt = (emb * order + order) + 2 * (order * order + order) + order * d + 3 * order
    operator = (d * 3 * d + 3 * d) + (3 * d * 3 + 3 * d) + filt + d + (d * d + d)
    block = 2 * 2 * d + operator + (d * f + f) + (f * d + d)
    assert count("hyena", L, d, f) == L * block + v * d + 2 * d
