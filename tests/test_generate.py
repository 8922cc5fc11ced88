"""Cached decoding and generation: every backbone's cache (GPT-2's keys and values, Mamba's
recurrent state, Hyena's filter and history) gives the full forward pass's logits at every
position, for prompts of different lengths too; generation is the same with and without the
cache; rows stop on their own; protein design still translates back."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_checkpoint

from helm.generate import Prompt, filter_logits, generate, protein_masks
from helm.models import MODELS, build_model
from helm.vocab import EOS_ID, codon_id, translate

V = 69
CACHED = [name for name, entry in MODELS.items() if entry.config.cached_decoding]
VARIANTS = {
    "gpt2": dict(num_heads=4),
    "gpt2-rotary": dict(num_heads=4, pos_embedding="rotary"),
    "gpt2-sincos-mlp": dict(num_heads=4, pos_embedding="sincos", activation="swiglu"),
    "mamba": dict(scan_impl="torch"),
    "mamba-no-mlp-positions": dict(scan_impl="torch", d_ff=0, pos_embedding="absolute"),
    "mamba-2": dict(scan_impl="torch", ssm_layer="mamba2", headdim=16, chunk_size=8),
    "hyena": dict(),
    "hyena-positions": dict(pos_embedding="absolute", short_filter_size=4),
}


def tiny(variant: str, seed: int = 0, max_seq_len: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    name = variant.split("-")[0]
    cfg = dict(vocab_size=V, d_model=32, num_layers=2, max_seq_len=max_seq_len) | VARIANTS.get(
        variant, {}
    )
    return build_model(name, **cfg).eval()


def test_every_model_that_decodes_is_covered():
    assert set(CACHED) == {"gpt2", "mamba", "hyena"}
    assert {v.split("-")[0] for v in VARIANTS} == set(CACHED)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_the_full_forward_at_every_position(variant):
    model = tiny(variant)
    ids = torch.randint(5, V, (3, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.lm_head(model(ids))
        cache = model.allocate_cache(3, 30)
        parts = [model.decode(ids[:, :6], cache)]  # a prompt, then one token at a time
        parts += [model.decode(ids[:, t : t + 1], cache) for t in range(6, 30)]
        cached = model.lm_head(torch.cat(parts, dim=1))
    assert cache.end == 30 and cache.lengths.tolist() == [30, 30, 30]
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "gpt2-rotary", "mamba", "mamba-2", "hyena"])
def test_prompts_of_different_lengths_decode_as_each_alone(variant):
    model = tiny(variant)
    ids = torch.randint(5, V, (3, 20), generator=torch.Generator().manual_seed(2))
    prompt = torch.tensor([3, 7, 5])
    with torch.no_grad():
        cache = model.allocate_cache(3, 20)
        mask = (torch.arange(7)[None] < prompt[:, None]).long()
        first = model.decode(ids[:, :7], cache, attention_mask=mask)  # right-padded prompts
        assert cache.lengths.tolist() == prompt.tolist() and not cache.uniform
        steps = [model.decode(ids[torch.arange(3), prompt + i][:, None], cache) for i in range(8)]
        for b in range(3):
            alone = model(ids[b : b + 1, : prompt[b] + 8])[0]
            got = torch.cat([first[b, : prompt[b]]] + [s[b] for s in steps])
            torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


def test_an_encoder_model_refuses_cached_decoding():
    bert = build_model("bert", vocab_size=V, d_model=32, num_layers=1, bidirectional=False)
    with pytest.raises(ValueError, match="no cached decoding.*--no-cache"):
        bert.allocate_cache(1, 8)
    causal = tiny("gpt2")
    causal.cfg.bidirectional = True
    with pytest.raises(ValueError, match="causal"):
        causal.allocate_cache(1, 8)


def prompts() -> list[Prompt]:
    return [Prompt("a", []), Prompt("b", [codon_id("ATG"), codon_id("GCC")]), Prompt("c", [7] * 5)]


def test_filters_keep_the_most_likely_tokens():
    """Greedy keeps the argmax alone; top-k the k largest; top-p the fewest largest whose
    probability reaches p; temperature divides the logits."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, 0.0, None, None)) == [1]
    assert kept(filter_logits(logits, 1.0, 2, None)) == [1, 3]
    p = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ... for tokens 1, 3, 2
    assert kept(filter_logits(logits, 1.0, None, float(p[1] + p[3]) - 1e-3)) == [1, 3]
    torch.testing.assert_close(filter_logits(logits, 2.0, None, None), logits / 2)


@pytest.mark.parametrize("variant", ["gpt2", "mamba", "mamba-2", "hyena"])
@pytest.mark.parametrize("max_length", [12, 40])  # 40 runs past the 24-token window
def test_greedy_generation_is_the_same_with_and_without_the_cache(variant, max_length):
    model = tiny(variant, max_seq_len=24)
    runs = [
        generate(
            model,
            prompts(),
            2,
            vocab_size=V,
            max_length=max_length,
            min_length=max_length,
            temperature=0.0,
            use_cache=use_cache,
        )  # fmt: skip
        for use_cache in (True, False)
    ]
    assert [s.ids for s in runs[0]] == [s.ids for s in runs[1]]
    for cached, recomputed in zip(*runs):
        assert cached.num_generated == max_length and cached.end == "cap"
        assert cached.log_likelihood == pytest.approx(recomputed.log_likelihood, abs=1e-4)


def test_sampling_with_and_without_the_cache_draws_the_same_sequences():
    model = tiny("gpt2")
    runs = [
        generate(
            model,
            prompts(),
            3,
            vocab_size=V,
            max_length=15,
            temperature=1.0,
            generator=torch.Generator().manual_seed(5),
            use_cache=use_cache,
        )  # fmt: skip
        for use_cache in (True, False)
    ]
    assert [s.ids for s in runs[0]] == [s.ids for s in runs[1]]


def test_rows_stop_on_their_own():
    model = tiny("gpt2")
    with torch.no_grad():  # a model that always prefers <eos>: rows end at once, or at min_length
        model.lm_head.proj.weight[EOS_ID] = 0.0
        model.lm_head.proj.weight[EOS_ID, 0] = 50.0 * model.norm_f.weight[0].sign()
        model.norm_f.bias[0] = 10.0
    free = generate(model, prompts(), 1, vocab_size=V, max_length=20, temperature=0.0)
    assert [(s.end, s.num_generated) for s in free] == [("eos", 1)] * 3
    late = generate(model, prompts(), 1, vocab_size=V, max_length=20, min_length=4, temperature=0.0)
    assert [(s.end, s.num_generated) for s in late] == [("eos", 5)] * 3
    assert all(len(s.ids) - len(p.ids) == 4 for s, p in zip(late, prompts()))


def test_a_stop_codon_ends_a_row_when_asked_and_a_designed_protein_always():
    model = tiny("mamba")
    stops = {codon_id(c) for c in ("TAA", "TAG", "TGA")}
    rows = generate(model, prompts(), 4, vocab_size=V, max_length=60, stop_codon=True,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    for s in rows:
        assert s.end in ("eos", "stop", "cap")
        new = s.ids[-s.num_generated :] if s.end != "eos" else []
        if s.end == "stop":
            assert new[-1] in stops and not stops & set(new[:-1])
    design = [Prompt("p", [], protein_masks("MKWV", V)), Prompt("q", [], protein_masks("MA", V))]
    out = generate(model, design, 2, vocab_size=V, generator=torch.Generator().manual_seed(1))
    vocab = {codon_id(a + b + c): a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT"}
    seqs = ["".join(vocab[i] for i in s.ids) for s in out]
    assert [translate(q) for q in seqs] == ["MKWV*", "MKWV*", "MA*", "MA*"]
    assert [s.end for s in out] == ["stop"] * 4


def test_eval_generate_is_the_same_with_and_without_the_cache(tiny_runs, eval_run):
    ckpt = tiny_checkpoint(tiny_runs, "clm")
    argv = ["generate", ckpt, "--num", 3, "--temperature", 0, "--prefix", "ATGGCC", "--min-length", 20,
            "--max-length", 30]  # fmt: skip
    code, cached, err = eval_run(*argv)
    assert code == 0, err
    code, recomputed, err = eval_run(*argv, "--no-cache")
    assert code == 0, err
    assert cached == recomputed and cached.count(">gen") == 3


def test_past_the_window_the_model_sees_cls_and_the_latest_tokens():
    # An independent check of the window: each greedy token is the argmax of the model over
    # <cls> + the last window - 1 tokens of its row, as it saw long records in training.
    from helm.generate import NEVER_SAMPLED
    from helm.vocab import CLS_ID

    model, W = tiny("gpt2", max_seq_len=16), 16
    (out,) = generate(model, [Prompt("p", [9, 10])], 1, vocab_size=V, max_length=30, min_length=30,
                      temperature=0.0)  # fmt: skip
    tokens = [CLS_ID, *out.ids]
    for n in range(3, len(tokens)):
        context = tokens[:n] if n <= W else [CLS_ID, *tokens[n - W + 1 : n]]
        with torch.no_grad():
            logits = model.lm_head(model(torch.tensor([context]))[0, -1])[:V]
        logits[list(NEVER_SAMPLED) + [EOS_ID]] = -float("inf")
        assert int(logits.argmax()) == tokens[n], n
