"""Hyena specifics: the implicit filter (two-sided layout, decay, no dependence on the batch
length), the short conv, who sees whom, padding with garbage under the mask, optimizer hints and
config checks."""

from __future__ import annotations

import pytest
import torch

from helm.models import build_model
from helm.models.hyena import HyenaConfig, HyenaOperator, ImplicitFilter

D = 16


def cfg(bidirectional: bool, **kw) -> HyenaConfig:
    base = dict(d_model=D, num_layers=2, max_seq_len=64, bidirectional=bidirectional)
    base.update(kw)
    return HyenaConfig(**base)


def model(bidirectional: bool, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model("hyena", cfg(bidirectional, **kw)).eval()


def filter_of(bidirectional: bool, seed: int = 0) -> ImplicitFilter:
    torch.manual_seed(seed)
    return ImplicitFilter(cfg(bidirectional))


def test_two_sided_filter_shape_and_decay():
    L = 64
    with torch.no_grad():
        k = filter_of(True)(L)
    assert k.shape == (D, 2 * L - 1)
    mag = k.abs().mean(0)  # (2L - 1,) mean over channels; index j is lag j - (L - 1)
    centre, far_left, far_right = mag[L - 4 : L + 3].mean(), mag[:4].mean(), mag[-4:].mean()
    assert far_left < 0.2 * centre and far_right < 0.2 * centre
    assert not torch.allclose(k[:, : L - 1], k[:, L:].flip(-1))  # the two sides are distinct


def test_two_sided_filter_extends_the_causal_one():
    # Same parameters: the non-negative lags of the two-sided filter are the causal filter.
    L = 20
    with torch.no_grad():
        causal, two_sided = filter_of(False)(L), filter_of(True)(L)
    assert causal.shape == (D, L)
    torch.testing.assert_close(two_sided[:, L - 1 :], causal)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_filter_depends_on_lag_not_on_batch_length(bidirectional):
    filt = filter_of(bidirectional)
    with torch.no_grad():
        short, long = filt(5), filt(17)
    if bidirectional:
        torch.testing.assert_close(short, long[:, 16 - 4 : 16 + 5])  # lags -4..4
    else:
        torch.testing.assert_close(short, long[:, :5])


def _jacobian_rows(bidirectional: bool, t: int, T: int = 10) -> torch.Tensor:
    """|d hidden[t] / d embedding[s]| summed over channels, for every s (float64)."""
    m = model(bidirectional).double()
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["emb"] = out

    m.embed.register_forward_hook(keep)
    ids = torch.randint(5, 69, (1, T), generator=torch.Generator().manual_seed(3))
    out = m(ids)[0, t]  # (D,) after the final LayerNorm, whose outputs always sum to 0
    (
        out * torch.randn(D, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    ).sum().backward()
    return captured["emb"].grad[0].abs().sum(-1)  # (T,)


def test_bidirectional_gradient_reaches_both_sides():
    g = _jacobian_rows(True, t=4)
    assert (g[:4] > 1e-8).all() and (g[5:] > 1e-8).all()


def test_causal_gradient_is_zero_from_the_future():
    g = _jacobian_rows(False, t=4)
    assert (g[:5] > 1e-8).all()
    assert (g[5:] < 1e-12).all()


def test_short_conv_causal_vs_centred():
    T, p = 9, 4
    for bidirectional, expected in ((False, {p, p + 1, p + 2}), (True, {p - 1, p, p + 1})):
        torch.manual_seed(0)
        op = HyenaOperator(cfg(bidirectional))
        torch.nn.init.zeros_(op.short_filter.bias)
        u = torch.zeros(1, 3 * D, T)
        u[..., p] = 1.0  # an impulse at position p
        with torch.no_grad():
            out = op.short_conv(u)
        assert out.shape == (1, 3 * D, T)
        reached = {int(i) for i in torch.nonzero(out.abs().sum((0, 1))).flatten()}
        assert reached == expected


@pytest.mark.parametrize("bidirectional", [False, True], ids=["clm", "mlm"])
def test_garbage_under_the_mask_does_not_leak(bidirectional):
    m = model(bidirectional)
    n, T = 7, 12
    ids = torch.randint(5, 69, (1, T), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, T, dtype=torch.long)
    mask[:, :n] = 1
    with torch.no_grad():
        padded = m(ids, attention_mask=mask)  # real codons, not <pad>, beyond n
        alone = m(ids[:, :n])
    torch.testing.assert_close(padded[:, :n], alone, atol=1e-5, rtol=1e-5)


def test_filter_optimizer_hints():
    op = HyenaOperator(cfg(False, filter_lr_scale=0.1))
    filter_params = list(op.filter.mlp.named_parameters())
    assert any(name.endswith("freq") for name, _ in filter_params)  # Sin frequencies included
    for name, p in filter_params:
        assert p._optim == {"lr_scale": 0.1, "weight_decay": 0.0}, name
        assert p._no_weight_decay, name
    assert op.D._no_weight_decay and op.short_filter.bias._no_weight_decay
    assert not hasattr(op.in_proj.weight, "_optim")
    assert not getattr(op.in_proj.weight, "_no_weight_decay", False)
    decayed = HyenaOperator(cfg(False, filter_wd=0.01))
    w = decayed.filter.mlp[0].weight
    assert w._optim["weight_decay"] == 0.01 and not getattr(w, "_no_weight_decay", False)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_varying_length_batches(bidirectional):
    m = model(bidirectional)
    ids = torch.randint(5, 69, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        outs = {T: m(ids[:, :T]) for T in (40, 5, 17, 64 // 2)}
    for T, out in outs.items():
        assert out.shape == (2, T, D) and torch.isfinite(out).all()
    if not bidirectional:  # a causal prefix does not depend on what follows or on the batch length
        torch.testing.assert_close(outs[5], outs[40][:, :5], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.randint(5, 69, (1, 65)))


def test_fftconv_impl_torch_matches_auto_on_cpu(monkeypatch):
    """On CPU tensors "auto" is the PyTorch reference (spied on), and equals "torch"."""
    import helm.ops.fftconv as ops_fftconv

    calls = []
    reference = ops_fftconv.fftconv_ref

    def spy(*args, **kwargs):
        calls.append(args[0].device.type)
        return reference(*args, **kwargs)

    def no_kernel(*args, **kwargs):
        raise AssertionError("impl='auto' ran the Triton kernel on CPU tensors")

    monkeypatch.setattr(ops_fftconv, "fftconv_ref", spy)
    monkeypatch.setitem(
        __import__("sys").modules,
        "helm.kernels.fftconv",
        type("M", (), {"fftconv_triton": no_kernel}),
    )
    ids = torch.randint(5, 69, (2, 11), generator=torch.Generator().manual_seed(6))
    m = model(True, fftconv_impl="auto")
    with torch.no_grad():
        a = m(ids)
        assert calls == ["cpu"] * len(m.blocks)
        b = model(True, fftconv_impl="torch")(ids)
    assert len(calls) == 2 * len(m.blocks)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(pos_embedding="rotary"), "rotary"),
        (dict(filter_emb_dim=4), "filter_emb_dim"),
        (dict(bidirectional=True, short_filter_size=4), "odd short_filter_size"),
        (dict(fftconv_impl="cuda"), "fftconv_impl"),
        (dict(filter_fast_decay_pct=2.0), "decay_pct"),
    ],
)
def test_config_errors(kw, message):
    base = dict(d_model=D, num_layers=1)
    base.update(kw)
    with pytest.raises(ValueError, match=message):
        HyenaConfig(**base)


def test_default_has_no_position_embedding():
    assert HyenaConfig().pos_embedding == "none"
    assert model(False).embed.pos is None
