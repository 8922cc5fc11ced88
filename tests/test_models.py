"""The backbone contract, for every model that imports: shapes, causality, bidirectionality,
padding, position embeddings, activations, tying, optimizer tags, gradients, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helm.models import MODELS, build_model, model_config
from helm.models.common import RMSNorm
from helm.models.config import ACTIVATIONS, POS_EMBEDDING_APPLY, POS_EMBEDDINGS
from helm.models.gpt2 import sdpa_mask

V, D, B, T = 69, 32, 2, 12


def tiny(name: str, bidirectional: bool = False, seed: int = 0, **kw) -> nn.Module:
    cfg = dict(
        vocab_size=V,
        pad_vocab_size_multiple=8,
        d_model=D,
        num_layers=2,
        num_heads=4 if MODELS[name].config.attention else 2,
        max_seq_len=64,
        bidirectional=bidirectional,
    )
    cfg.update(kw)
    torch.manual_seed(seed)
    return build_model(name, model_config(name, **cfg)).eval()


def tokens(b: int = B, t: int = T, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, V, (b, t), generator=g)


def _changed(ids: torch.Tensor, where: slice | int) -> torch.Tensor:
    out = ids.clone()
    out[:, where] = 5 + (out[:, where] - 5 + 7) % (V - 5)  # a different codon everywhere in `where`
    return out


@pytest.fixture(params=[False, True], ids=["clm", "mlm"])
def bidirectional(request) -> bool:
    return request.param


# Shapes and information flow ------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_output_values_and_logits(name, bidirectional):
    model = tiny(name, bidirectional)
    ids, seen = tokens(), {}
    model.blocks[-1].register_forward_hook(lambda m, args, out: seen.update(last=out))
    with torch.no_grad():
        hidden = model(ids)
        last = seen["last"]  # (B, T, D) the last block's output
        alone = model(ids[1:])
        logits = model.lm_head(hidden)
    assert hidden.shape == (B, T, D) and logits.shape == (B, T, 72)  # 69 padded to 8
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 2
    # The output is the last block's, normalised (the final norm has unit weight and zero bias
    # at init; BERT is post-LN: its last block ends in a LayerNorm and it has no final norm).
    norm = model.norm_f
    if isinstance(norm, RMSNorm):
        want = last * torch.rsqrt(last.pow(2).mean(-1, keepdim=True) + norm.eps)
    else:
        want = F.layer_norm(last, (D,), eps=norm.eps if isinstance(norm, nn.LayerNorm) else 1e-12)
    torch.testing.assert_close(hidden, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(last, want, atol=1e-3) or isinstance(norm, nn.Identity)
    torch.testing.assert_close(hidden[1:], alone, atol=1e-5, rtol=1e-5)  # rows do not mix
    if model.lm_head.dense is None:  # the bare head: the (tied) embedding matrix
        torch.testing.assert_close(logits, hidden @ model.embed.tok.weight.T)


@pytest.mark.parametrize("name", MODELS)
def test_causal_model_does_not_look_ahead(name):
    model = tiny(name, bidirectional=False)
    ids, t = tokens(), 5
    with torch.no_grad():
        before, after = model(ids), model(_changed(ids, slice(t + 1, None)))
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], atol=1e-5, rtol=0)
    assert (before[:, t + 1 :] - after[:, t + 1 :]).abs().amax() > 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_bidirectional_model_sees_both_sides(name):
    model = tiny(name, bidirectional=True)
    ids, t = tokens(), 6
    with torch.no_grad():
        diff = (model(ids) - model(_changed(ids, t))).abs().amax(dim=-1)  # (B, T)
    assert (diff[:, :t] > 1e-6).all(), "positions before t do not see token t"
    assert (diff[:, t + 1 :] > 1e-6).all(), "positions after t do not see token t"


@pytest.mark.parametrize("name", MODELS)
def test_right_padding_leaves_real_positions_unchanged(name, bidirectional):
    model = tiny(name, bidirectional)
    lengths, T_pad = [9, 6], 13
    ids = tokens(2, T_pad)
    mask = torch.zeros(2, T_pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, n:] = 0  # <pad>
        mask[i, :n] = 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        for i, n in enumerate(lengths):
            alone = model(ids[i : i + 1, :n])  # the same sequence with no padding and no mask
            torch.testing.assert_close(padded[i, :n], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_a_row_of_only_padding_stays_finite(name, bidirectional):
    # Its query rows have no real key to attend to: without care that is a softmax over nothing.
    model = tiny(name, bidirectional)
    ids, mask = tokens(), torch.ones(B, T, dtype=torch.long)
    ids[1], mask[1] = 0, 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        alone = model(ids[:1])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_all_ones_mask_equals_no_mask(name, bidirectional):
    model = tiny(name, bidirectional)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, attention_mask=torch.ones_like(ids)), model(ids), atol=1e-5, rtol=1e-5
        )


# Configuration surface ------------------------------------------------------------------------


@pytest.mark.parametrize("apply", POS_EMBEDDING_APPLY)
@pytest.mark.parametrize("pos", POS_EMBEDDINGS)
def test_gpt2_position_embeddings(pos, apply, bidirectional):
    kw = dict(pos_embedding=pos, pos_embedding_apply=apply)
    if apply == "concat":
        kw.update(pos_embedding_dim=8, tie_embeddings=False)
        if pos not in ("absolute", "sincos"):
            with pytest.raises(ValueError, match="concat needs pos_embedding absolute or sincos"):
                tiny("gpt2", bidirectional, **kw)
            return
    model = tiny("gpt2", bidirectional, **kw)
    if apply == "concat":
        assert model.embed.tok.weight.shape == (72, D - 8)
    ids = tokens()
    hidden = model(ids)
    assert hidden.shape == (B, T, D) and torch.isfinite(hidden).all()
    # Positions reach the output (except "none"): reversing them changes it.
    with torch.no_grad():
        moved = model(ids, position_ids=torch.arange(T).flip(0).expand(B, T))
    assert torch.equal(moved, hidden.detach()) == (pos == "none")
    if pos == "sincos":  # the table of "Attention is all you need", computed here independently
        dim = 8 if apply == "concat" else D
        p = torch.arange(T, dtype=torch.float64)[:, None]
        i = torch.arange(dim // 2, dtype=torch.float64)
        angle = p / 10000 ** (2 * i / dim)
        table = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1).float()  # (T, dim)
        emb = model.embed(ids)
        part = emb[..., -dim:] - (model.embed.tok(ids)[..., -dim:] if apply == "add" else 0)
        torch.testing.assert_close(part, table.expand(B, T, dim), atol=1e-5, rtol=0)


def test_concat_with_tied_embeddings_is_refused():
    with pytest.raises(ValueError, match="tie_embeddings"):
        tiny("gpt2", pos_embedding="absolute", pos_embedding_apply="concat", pos_embedding_dim=8)


def test_rotary_is_relative_and_absolute_is_not():
    ids = tokens()
    shifted = torch.arange(T).expand(B, T) + 7
    for pos, invariant in (("rotary", True), ("absolute", False)):
        model = tiny("gpt2", pos_embedding=pos)
        with torch.no_grad():
            same = torch.allclose(model(ids), model(ids, position_ids=shifted), atol=1e-5)
        assert same == invariant, pos


@pytest.mark.parametrize("name", [n for n, e in MODELS.items() if e.config.attention])
def test_heads_must_divide_width(name):
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        tiny(name, num_heads=3)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name", MODELS)
def test_every_activation(name, activation):
    model = tiny(name, activation=activation)
    hidden = model(tokens())
    assert hidden.shape == (B, T, D) and torch.isfinite(hidden).all()
    # The MLP's values against torch's functions: fc_out(act(fc_in(x))).
    mlp = model.blocks[0].mlp
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    h = mlp.fc_in(x)
    if activation == "swiglu":
        a, b = h.chunk(2, dim=-1)
        h = F.silu(a) * b
    else:
        h = {"gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
             "relu": F.relu, "silu": F.silu}[activation](h)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.fc_out(h))


@pytest.mark.parametrize("name", MODELS)
def test_tied_head_shares_storage_untied_does_not(name):
    tied, untied = tiny(name, tie_embeddings=True), tiny(name, tie_embeddings=False)
    assert tied.lm_head.proj.weight is tied.embed.tok.weight
    assert untied.lm_head.proj.weight.data_ptr() != untied.embed.tok.weight.data_ptr()
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 72 * D


@pytest.mark.parametrize("name", MODELS)
def test_norms_and_biases_are_not_decayed(name):
    model = tiny(name)
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            for p in module.parameters(recurse=False):
                assert getattr(p, "_no_weight_decay", False), f"{mod_name} norm is decayed"
    for p_name, p in model.named_parameters():
        if p_name.endswith("bias"):
            assert getattr(p, "_no_weight_decay", False), f"{p_name} is decayed"
    decayed = sum(
        p.numel() for p in model.parameters() if not getattr(p, "_no_weight_decay", False)
    )
    assert decayed > 0.5 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name, bidirectional):
    model = tiny(name, bidirectional, tie_embeddings=False, pos_embedding="absolute").train()
    logits = model.lm_head(model(tokens(), attention_mask=torch.ones(B, T, dtype=torch.long)))
    (logits * torch.randn_like(logits)).sum().backward()
    for p_name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {p_name}"


@pytest.mark.parametrize("name", MODELS)
def test_embedding_dropout_feeds_the_blocks(name):
    model = tiny(name, dropout=0.5).train()
    seen = {}
    model.drop.register_forward_hook(lambda m, args, out: seen.update(drop_in=args[0], out=out))
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(block_in=args[0]))
    model(tokens())
    assert seen["block_in"] is seen["out"]
    assert (seen["out"] == 0).any() and not torch.equal(seen["out"], seen["drop_in"])


@pytest.mark.parametrize("name", MODELS)
def test_parameter_names_follow_the_skeleton(name):
    """Layer-wise decay and checkpoints read these prefixes (helm.models.common)."""
    tops = {key.split(".")[0] for key in tiny(name).state_dict()}
    assert (
        {"embed", "blocks", "lm_head"}
        <= tops
        <= {"embed", "embed_norm", "blocks", "norm_f", "lm_head"}
    )


# gpt2 / bert specifics ------------------------------------------------------------------------


def test_gpt2_bf16_autocast_on_cpu():
    ids, t = tokens(), 6
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0
    for bidirectional in (False, True):
        model = tiny("gpt2", bidirectional)
        with torch.no_grad():
            full = model(ids, attention_mask=mask)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, attention_mask=mask)
            assert model.lm_head(out).dtype == torch.bfloat16
            # bf16 keeps 8 bits of mantissa: unit-scale states agree to a few 1e-3.
            real = mask.bool()
            torch.testing.assert_close(out.float()[real], full[real], atol=3e-2, rtol=0)
            if bidirectional:
                diff = (model(ids) - model(_changed(ids, t))).abs().amax(dim=-1)  # (B, T)
                assert (diff[:, :t] > 0).all() and (diff[:, t + 1 :] > 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_mask(causal):
    assert sdpa_mask(None, 5, causal) == (None, causal)  # the flash-friendly path
    am = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    mask, is_causal = sdpa_mask(am, 5, causal)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool and not is_causal
    expected = am.bool()[:, None, None, :].expand(2, 1, 5, 5)
    if causal:
        expected = expected & torch.ones(5, 5, dtype=torch.bool).tril()
    real = am.bool()[:, None, :, None].expand(2, 1, 5, 5)  # rows of real queries
    assert torch.equal(mask[real], expected[real])  # real rows: exactly keys allowed
    assert mask.any(-1).all()  # no row is fully masked, even in a row of only padding


def test_attention_dropout_only_in_training():
    model = tiny("gpt2", attn_dropout=0.5)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids))
        model.train()
        assert not torch.allclose(model(ids), model(ids))


def test_bert_is_post_ln():
    model = tiny("bert", num_layers=1)
    assert isinstance(model.norm_f, nn.Identity)
    with torch.no_grad():
        hidden = model(tokens())
    # the last operation is a LayerNorm with unit weight and zero bias at init
    torch.testing.assert_close(hidden.mean(-1), torch.zeros(B, T), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.var(-1, unbiased=False), torch.ones(B, T), atol=1e-3, rtol=0)
    assert model_config("bert").bidirectional  # MLM by default


@pytest.mark.parametrize("name", ["gpt2", "mamba", "hyena"])
def test_residual_projections_are_depth_scaled(name):
    """GPT-2's init: the layers that write into the residual stream start at init_std divided by
    sqrt(2 * num_layers) (0.02 / 4 here), the others at init_std."""
    model = tiny(name, num_layers=8, d_model=256)
    block = model.blocks[0]
    assert abs(block.mlp.fc_out.weight.std().item() - 0.005) < 0.0005
    assert abs(block.mlp.fc_in.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("name", MODELS)
def test_padded_embedding_rows_are_zero_and_get_no_gradient(name):
    from helm.losses.tables import cross_entropy

    model = tiny(name, tie_embeddings=False).train()
    assert torch.equal(model.embed.tok.weight[V:], torch.zeros(72 - V, D))
    logits = model.lm_head(model(tokens()))
    cross_entropy(logits.flatten(0, 1), tokens().flatten(), vocab_size=V).backward()
    assert (model.embed.tok.weight.grad[V:] == 0).all()
    assert (model.lm_head.proj.weight.grad[V:] == 0).all()  # no probability, no gradient
    assert (model.lm_head.proj.weight.grad[:V] != 0).any()


def test_bert_residual_projections_are_not_depth_scaled():
    model = tiny("bert", num_layers=8, d_model=256, num_heads=4)
    std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02) < 0.002  # GPT-2 would use 0.02 / sqrt(16) = 0.005


def test_language_model_rows_all_positions_or_targets_only():
    """All positions (the CUDA way for small vocabularies: no host sync) or only the target rows
    (the CPU and large vocabularies): the loss is the one over the targets alone either way."""
    from helm.lm import LanguageModel
    from helm.losses.tables import cross_entropy

    torch.manual_seed(0)
    backbone = build_model("gpt2", vocab_size=69, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    ids = torch.randint(5, 69, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 5] = ids[0, 3], ids[1, 5]
    hidden = backbone(ids)
    want = cross_entropy(
        backbone.lm_head(hidden[labels != -100]), labels[labels != -100], vocab_size=69
    )
    for select, rows in ((False, 18), (True, 2), (None, 2)):  # None: automatic (CPU: select)
        logits, targets = LanguageModel(backbone, select=select)(ids, labels)
        assert logits.shape[0] == targets.shape[0] == rows
        torch.testing.assert_close(cross_entropy(logits, targets, vocab_size=69), want)
    big = build_model("gpt2", vocab_size=3000, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    assert big.cfg.padded_vocab_size > LanguageModel.SELECT_ABOVE


@pytest.mark.parametrize("name", MODELS)
def test_each_model_states_its_flops_per_token(name):
    # MFU's numerator: 6 per weight, and the attention products only where the model attends.
    model = tiny(name)
    params = sum(p.numel() for p in model.parameters())
    assert model.flops_per_token(0) == 6 * params
    grows = model.flops_per_token(100) - model.flops_per_token(0)
    assert grows == (12 * 2 * D * 100 if MODELS[name].config.attention else 0)


def test_gpt2_recipe_flops_match_palm_appendix_b():
    # The 50M GPT-2 recipe (10 x 640, T = 444, 49,612,800 parameters; see README).
    cfg = model_config("gpt2", vocab_size=69, d_model=640, num_layers=10, num_heads=10, d_ff=2560,
                       max_seq_len=444, tie_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        model = build_model("gpt2", cfg)
    assert model.flops_per_token(444) == 6 * 49_612_800 + 12 * 10 * 640 * 444
