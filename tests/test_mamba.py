import math

import pytest
import torch
import torch.nn.functional as F

from helm.models import MODELS, model_config
from helm.models.config import ModelConfig
from helm.models.mamba import (
    Mamba,
    Mamba2Mixer,
    MambaConfig,
    MambaMixer,
    reversal_index,
    reverse_real_tokens,
)
from helm.ops import selective_scan as scan_ops
from helm.ops.selective_scan import (
    mamba_ssm_available,
    resolve_scan_impl,
    selective_scan_lean,
    selective_scan_ref,
    ssd_chunk_scan_ref,
)

VOCAB = 69


def tiny(ssm_layer: str = "mamba", **kw) -> Mamba:
    torch.manual_seed(0)
    extra = {"headdim": 8, "chunk_size": 4} if ssm_layer == "mamba2" else {"chunk_size": 3}
    base = dict(vocab_size=VOCAB, d_model=16, num_layers=2, d_state=4, d_ff=32, ssm_layer=ssm_layer)
    return Mamba(MambaConfig(**{**base, **extra, **kw})).eval()


# Scans against naive per-token recurrences ------------------------------------------------------


def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t; y_t = C_t . h_t + D u_t; y_t *= silu(z_t)."""
    Bsz, Dch, T = u.shape
    out = torch.zeros_like(u)
    for b in range(Bsz):
        for d in range(Dch):
            h = torch.zeros(A.shape[1], dtype=u.dtype)
            for t in range(T):
                dt = delta[b, d, t] + (delta_bias[d] if delta_bias is not None else 0.0)
                if softplus:
                    dt = torch.log1p(torch.exp(dt))
                h = torch.exp(dt * A[d]) * h + dt * B[b, :, t] * u[b, d, t]
                y = (C[b, :, t] * h).sum()
                if D is not None:
                    y = y + D[d] * u[b, d, t]
                if z is not None:
                    y = y * z[b, d, t] * torch.sigmoid(z[b, d, t])
                out[b, d, t] = y
    return out


def scan_inputs(Bsz=2, Dch=3, N=4, T=13, dtype=torch.float64, dt_scale=1.0):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(Bsz, Dch, T, generator=g, dtype=dtype)
    delta = torch.rand(Bsz, Dch, T, generator=g, dtype=dtype) * dt_scale
    A = -torch.rand(Dch, N, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(Bsz, N, T, generator=g, dtype=dtype)
    C = torch.randn(Bsz, N, T, generator=g, dtype=dtype)
    D = torch.randn(Dch, generator=g, dtype=dtype)
    z = torch.randn(Bsz, Dch, T, generator=g, dtype=dtype)
    bias = torch.randn(Dch, generator=g, dtype=dtype) * 0.5
    return u, delta, A, B, C, D, z, bias


@pytest.mark.parametrize("extras", [False, True])
def test_selective_scan_ref_matches_naive(extras):
    u, delta, A, B, C, D, z, bias = scan_inputs()
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True) if extras else {}
    got = selective_scan_ref(u, delta, A, B, C, **kw)
    want = naive_selective_scan(
        u, delta, A, B, C, *((D, z, bias, True) if extras else (None, None, None, False))
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


SCAN_EXTRAS = [False, True]  # without, then with D, z, delta_bias and softplus


def _scan_args(inputs, extras):
    """(u, delta, A, B, C[, D, z, bias]) -> selective_scan arguments, the extras used or not."""
    u, delta, A, B, C, *rest = inputs
    return (u, delta, A, B, C, *((*rest, True) if extras else (None, None, None, False)))


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 13, 64])  # 13 = T; 3 and 4 leave a short chunk
@pytest.mark.parametrize("extras", SCAN_EXTRAS)
def test_lean_scan_matches_naive(chunk_size, extras):
    args = _scan_args(scan_inputs(T=13), extras)
    got = selective_scan_lean(*args, chunk_size=chunk_size)
    torch.testing.assert_close(got, naive_selective_scan(*args), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, selective_scan_ref(*args), rtol=1e-10, atol=1e-10)


def _grads(fn, inputs, extras):
    leaves = [t.clone().requires_grad_() for t in inputs]
    gy = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5)).to(inputs[0])
    out = fn(*_scan_args(leaves, extras))
    (out * gy).sum().backward()
    used = leaves if extras else leaves[:5]  # u, delta, A, B, C
    return out.detach(), [t.grad for t in used]


@pytest.mark.parametrize("chunk_size", [4, 5, 64])
@pytest.mark.parametrize("extras", SCAN_EXTRAS)
def test_lean_scan_gradients_match_ref(chunk_size, extras):
    inputs = scan_inputs(T=10)
    _, want = _grads(selective_scan_ref, inputs, extras)
    _, got = _grads(lambda *a: selective_scan_lean(*a, chunk_size=chunk_size), inputs, extras)
    for g_lean, g_ref in zip(got, want):
        torch.testing.assert_close(g_lean, g_ref, rtol=1e-9, atol=1e-9)


def realistic_scan_inputs(Bsz=2, Dch=16, N=16, T=444):
    """Mamba-like fp32 inputs: dt = softplus(N(0, 1) - 2), A = -exp(U(0, log 16)), the rest N(0, 1)."""
    g = torch.Generator().manual_seed(7)
    u = torch.randn(Bsz, Dch, T, generator=g)
    delta = F.softplus(torch.randn(Bsz, Dch, T, generator=g) - 2)
    A = -torch.exp(torch.rand(Dch, N, generator=g) * math.log(16))
    B, C = torch.randn(2, Bsz, N, T, generator=g)
    return u, delta, A, B, C


def _rel_err(got, want):
    return ((got.double() - want).abs().amax() / want.abs().amax()).item()


def test_lean_scan_fp32_error_on_realistic_inputs():
    # Rounding grows with the log-decay a chunk accumulates; at the default chunk of 64 it stays a
    # few 1e-6 of the output scale (a whole 444-token chunk: ~3e-5).
    inputs = realistic_scan_inputs()
    want, want_grads = _grads(selective_scan_ref, [t.double() for t in inputs], False)
    got, got_grads = _grads(selective_scan_lean, inputs, False)
    assert got.dtype == torch.float32
    assert _rel_err(got, want) < 2e-5
    for g_lean, g_ref in zip(got_grads, want_grads):
        assert _rel_err(g_lean, g_ref) < 2e-5


def test_lean_scan_is_stable_under_strong_decay():
    # dt A down to -1e3 per step: a chunk decays by ~3e4 nats, where exp(-cumsum) overflows fp32 at
    # 88. The log-space sums stay finite; their rounding (~eps times that decay) sets the tolerance.
    u, delta, A, B, C, *_ = scan_inputs(T=150, dtype=torch.float32, dt_scale=500.0)
    assert (delta[:, :, :, None] * A[:, None]).amin() < -900
    inputs = (u, delta, A, B, C)
    want, want_grads = _grads(selective_scan_ref, [t.double() for t in inputs], False)
    got, got_grads = _grads(selective_scan_lean, inputs, False)
    assert _rel_err(got, want) < 5e-3
    for g_lean, g_ref in zip(got_grads, want_grads):
        assert torch.isfinite(g_lean).all()
        assert _rel_err(g_lean, g_ref) < 5e-3


def test_lean_scan_zero_inputs():
    # Zeros in the input dt u B (log 0 = -inf in the sums) and a channel with no input at all.
    u, delta, A, B, C, D, z, bias = scan_inputs(T=12)
    u, B = u.clone(), B.clone()
    u[:, :, 3:6] = 0
    u[0, 1] = 0
    B[:, 2] = 0
    inputs = (u, delta, A, B, C, D, z, bias)
    want, want_grads = _grads(selective_scan_ref, inputs, True)
    got, got_grads = _grads(lambda *a: selective_scan_lean(*a, chunk_size=5), inputs, True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g_lean, g_ref in zip(got_grads, want_grads):
        assert torch.isfinite(g_lean).all()
        torch.testing.assert_close(g_lean, g_ref, rtol=1e-9, atol=1e-9)


def test_lean_scan_saves_less_than_one_state_sequence():
    # Backward keeps the inputs and one (B, Dch, N) state per chunk, not the (B, Dch, N, T) states.
    Bsz, Dch, N, T = 2, 8, 16, 256
    u, delta, A, B, C = (t.requires_grad_() for t in realistic_scan_inputs(Bsz, Dch, N, T))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = selective_scan_lean(u, delta, A, B, C)
    assert sum(saved.values()) < Bsz * Dch * N * T * 4 / 2
    y.sum().backward()
    assert u.grad is not None and A.grad is not None


def naive_ssd(x, dt, A, B, C, D):
    """Per head: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T (P, N); y_t = h_t C_t + D x_t."""
    Bsz, T, H, P = x.shape
    per_group = H // B.shape[2]
    y = torch.zeros_like(x)
    for b in range(Bsz):
        for hd in range(H):
            g = hd // per_group
            h = torch.zeros(P, B.shape[3], dtype=x.dtype)
            for t in range(T):
                h = torch.exp(dt[b, t, hd] * A[hd]) * h + dt[b, t, hd] * torch.outer(
                    x[b, t, hd], B[b, t, g]
                )
                y[b, t, hd] = h @ C[b, t, g] + D[hd] * x[b, t, hd]
    return y


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 16])
def test_ssd_chunked_matches_naive(chunk_size):
    g = torch.Generator().manual_seed(2)
    Bsz, T, H, P, G, N = 2, 11, 4, 3, 2, 5
    x = torch.randn(Bsz, T, H, P, generator=g, dtype=torch.float64)
    dt_raw = torch.randn(Bsz, T, H, generator=g, dtype=torch.float64)
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 4 - 0.5
    B = torch.randn(Bsz, T, G, N, generator=g, dtype=torch.float64)
    C = torch.randn(Bsz, T, G, N, generator=g, dtype=torch.float64)
    D = torch.randn(H, generator=g, dtype=torch.float64)
    dt_bias = torch.randn(H, generator=g, dtype=torch.float64)
    got = ssd_chunk_scan_ref(x, dt_raw, A, B, C, chunk_size, D, dt_bias, dt_softplus=True)
    want = naive_ssd(x, F.softplus(dt_raw + dt_bias), A, B, C, D)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# Backbone behaviour -----------------------------------------------------------------------------

LAYERS = ["mamba", "mamba2"]
BI_MLPS = ["per_direction", "shared"]
# (bidirectional, bidirectional_mlp): the causal layer and both kinds of bidirectional layer
VARIANTS = [(False, "per_direction"), (True, "per_direction"), (True, "shared")]


@pytest.mark.parametrize("ssm_layer", LAYERS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_output_shape(ssm_layer, bidirectional):
    model = tiny(ssm_layer, bidirectional=bidirectional)
    hidden = model(torch.randint(5, VOCAB, (3, 10)))
    assert hidden.shape == (3, 10, 16)
    assert model.lm_head(hidden).shape == (3, 10, 72)  # vocabulary padded to a multiple of 8


@pytest.mark.parametrize("ssm_layer", LAYERS)
def test_causal(ssm_layer):
    model = tiny(ssm_layer)
    ids = torch.randint(5, VOCAB, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(5, VOCAB, (2, 5))
    changed[:, 7] = (ids[:, 7] - 5 + 1) % (VOCAB - 5) + 5  # certainly different at t = 7
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().amax() > 1e-4


@pytest.mark.parametrize("ssm_layer", LAYERS)
@pytest.mark.parametrize("bi_mlp", BI_MLPS)
@pytest.mark.parametrize("strategy", ["add", "ew_multiply"])
def test_bidirectional_sees_both_sides(ssm_layer, bi_mlp, strategy):
    # A product of two small updates hides under fp32 rounding at the default init: scale up.
    init_std = 0.5 if strategy == "ew_multiply" else 0.02
    model = tiny(
        ssm_layer,
        bidirectional=True,
        bidirectional_mlp=bi_mlp,
        bidirectional_strategy=strategy,
        init_std=init_std,
    )
    ids = torch.randint(5, VOCAB, (1, 12))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] - 5 + 1) % (VOCAB - 5) + 5
    with torch.no_grad():
        diff = (model(ids) - model(changed)).abs().amax(-1)[0]  # (T,)
    assert diff[:6].min() > 1e-6 and diff[7:].min() > 1e-6


@pytest.mark.parametrize("ssm_layer", LAYERS)
@pytest.mark.parametrize("bidirectional, bi_mlp", VARIANTS)
def test_right_padding_is_invisible(ssm_layer, bidirectional, bi_mlp):
    model = tiny(ssm_layer, bidirectional=bidirectional, bidirectional_mlp=bi_mlp)
    lengths, T = [9, 5, 1], 9
    torch.manual_seed(3)
    rows = [torch.randint(5, VOCAB, (n,)) for n in lengths]
    ids = torch.randint(5, VOCAB, (len(rows), T))  # arbitrary tokens under the padding
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    with torch.no_grad():
        batch = model(ids, mask)
        for i, row in enumerate(rows):
            alone = model(row[None])[0]
            torch.testing.assert_close(batch[i, : len(row)], alone, rtol=1e-5, atol=1e-5)


def test_reversal_reverses_only_real_tokens():
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    index = reversal_index(ids, mask)
    assert index.tolist() == [[2, 1, 0, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]]
    assert reversal_index(ids, None).tolist() == [[4, 3, 2, 1, 0]] * 3
    x = torch.arange(15.0).reshape(3, 5, 1)
    rev = reverse_real_tokens(x, index)
    assert rev[0, :, 0].tolist() == [2.0, 1.0, 0.0, 3.0, 4.0]
    torch.testing.assert_close(reverse_real_tokens(rev, index), x)


def _ids(module) -> set[int]:
    return {id(p) for p in module.parameters()}


@pytest.mark.parametrize("ssm_layer", LAYERS)
@pytest.mark.parametrize("bi_mlp", BI_MLPS)
def test_bidirectional_weight_tie(ssm_layer, bi_mlp):
    untied = tiny(ssm_layer, bidirectional=True, bidirectional_mlp=bi_mlp)
    tied = tiny(
        ssm_layer, bidirectional=True, bidirectional_mlp=bi_mlp, bidirectional_weight_tie=True
    )
    for block in untied.blocks:
        assert not _ids(block.mixer) & _ids(block.mixer_rev)
    for block in tied.blocks:
        assert block.mixer_rev.in_proj.weight is block.mixer.in_proj.weight
        assert block.mixer_rev.out_proj.weight is block.mixer.out_proj.weight
        assert block.mixer_rev.A_log is not block.mixer.A_log
        assert block.mixer_rev.conv1d.weight is not block.mixer.conv1d.weight
    for block in (*untied.blocks, *tied.blocks):  # the tie never reaches norms or MLPs
        if bi_mlp == "per_direction":
            assert not _ids(block.mlp) & _ids(block.mlp_rev)
            assert not _ids(block.mixer_norm) & _ids(block.mixer_norm_rev)
            assert not _ids(block.mlp_norm) & _ids(block.mlp_norm_rev)
        else:
            assert not hasattr(block, "mlp_rev") and not hasattr(block, "mixer_norm_rev")
    n_untied = sum(p.numel() for p in untied.parameters())
    n_tied = sum(p.numel() for p in tied.parameters())
    in_out = sum(
        b.mixer.in_proj.weight.numel() + b.mixer.out_proj.weight.numel() for b in tied.blocks
    )
    assert n_untied - n_tied == in_out


@pytest.mark.parametrize("ssm_layer", LAYERS)
def test_scan_impl_mamba_ssm_raises_without_kernels(ssm_layer):
    if mamba_ssm_available(ssm_layer):
        pytest.skip("mamba-ssm kernels are importable here")
    with pytest.raises(RuntimeError, match="scan_impl='mamba_ssm'.*mamba-ssm"):
        tiny(ssm_layer, scan_impl="mamba_ssm")
    assert resolve_scan_impl("auto", torch.zeros(1, 4, 3), ssm_layer) == "torch"


@pytest.mark.parametrize("ssm_layer", LAYERS)
def test_scan_impl_choices(ssm_layer, monkeypatch):
    ids = torch.randint(5, VOCAB, (2, 7))
    torch.testing.assert_close(tiny(ssm_layer, scan_impl="torch")(ids), tiny(ssm_layer)(ids))
    with pytest.raises(ValueError, match="scan_impl"):
        tiny(ssm_layer, scan_impl="always")
    # Importable kernels still refuse CPU tensors when asked for explicitly: no silent fallback.
    monkeypatch.setattr(scan_ops, "_IMPORT_ERRORS", {})
    model = tiny(ssm_layer, scan_impl="mamba_ssm")
    with pytest.raises(RuntimeError, match="impl='mamba_ssm'.*CUDA"):
        model(ids)
    assert resolve_scan_impl("auto", torch.zeros(1, 4, 3), ssm_layer) == "torch"


@pytest.mark.parametrize("ssm_layer", LAYERS)
def test_no_weight_decay_tags(ssm_layer):
    model = tiny(ssm_layer, bidirectional=True)  # per_direction: norms and MLP biases per direction
    nwd = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    for name, _ in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        expected = (
            leaf in ("A_log", "D", "dt_bias", "bias") or "norm" in name or name == "norm_f.weight"
        )
        assert (name in nwd) == expected, name
    assert "blocks.0.mixer.A_log" in nwd and "blocks.1.mixer_rev.D" in nwd
    assert "blocks.1.mlp_norm_rev.weight" in nwd and "blocks.0.mlp_rev.fc_in.bias" in nwd
    assert "blocks.0.mlp_rev.fc_in.weight" not in nwd


@pytest.mark.parametrize("ssm_layer", LAYERS)
@pytest.mark.parametrize("bi_mlp", BI_MLPS)
def test_gradients_reach_every_parameter(ssm_layer, bi_mlp):
    model = tiny(ssm_layer, bidirectional=True, bidirectional_mlp=bi_mlp).train()
    ids = torch.randint(5, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    model.lm_head(model(ids, mask)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ssm_init():
    model = tiny("mamba")
    mixer = model.blocks[0].mixer
    assert isinstance(mixer, MambaMixer)
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001
    torch.testing.assert_close(mixer.A_log[0].exp(), torch.arange(1.0, 5.0))
    assert torch.all(mixer.D == 1)
    mixer2 = tiny("mamba2").blocks[0].mixer
    assert isinstance(mixer2, Mamba2Mixer)
    assert mixer2.A_log.exp().min() >= 1 and mixer2.A_log.exp().max() <= 16


def test_config_choices():
    cfg = MambaConfig(d_model=256)
    assert cfg.dt_rank == 16 and cfg.pos_embedding == "none" and cfg.activation == "swiglu"
    assert cfg.d_ff == 1024 and cfg.chunk_size == 64
    with pytest.raises(ValueError, match="headdim"):
        MambaConfig(d_model=16, ssm_layer="mamba2", headdim=12)
    with pytest.raises(ValueError, match="rotary"):
        MambaConfig(pos_embedding="rotary")
    with pytest.raises(ValueError, match="ssm_layer"):
        MambaConfig(ssm_layer="s4")
    with pytest.raises(ValueError, match="bidirectional_mlp"):
        MambaConfig(bidirectional_mlp="both")
    assert MambaConfig().bidirectional_mlp == "per_direction"


@pytest.mark.parametrize("bidirectional, bi_mlp", VARIANTS)
def test_no_mlp(bidirectional, bi_mlp):
    # d_ff = 0: Mamba's original mixer-only block; no MLP module is built in either direction.
    model = tiny("mamba", d_ff=0, bidirectional=bidirectional, bidirectional_mlp=bi_mlp)
    assert model.cfg.d_ff == 0
    assert not any(".mlp" in name for name, _ in model.named_parameters())
    assert all(b.mlp is None and b.mlp_norm is None for b in model.blocks)
    with_mlp = tiny("mamba", bidirectional=bidirectional, bidirectional_mlp=bi_mlp)
    n_dirs = 2 if bidirectional and bi_mlp == "per_direction" else 1
    per_layer = n_dirs * (swiglu_mlp_params(16, 32) + 16)  # MLP + its norm, per direction
    n, n_with = (sum(p.numel() for p in m.parameters()) for m in (model, with_mlp))
    assert n_with - n == 2 * per_layer
    assert model(torch.randint(5, VOCAB, (2, 5))).shape == (2, 5, 16)


def test_d_ff_zero_only_where_allowed():
    with pytest.raises(ValueError, match="d_ff must be >= 0"):
        MambaConfig(d_ff=-1)
    with pytest.raises(ValueError, match="d_ff=0 .*not supported by ModelConfig"):
        ModelConfig(d_ff=0)
    for name in [n for n, e in MODELS.items() if not e.config.allows_no_mlp]:
        with pytest.raises(ValueError, match="d_ff=0"):
            model_config(name, d_ff=0)
    assert ModelConfig(d_model=8).d_ff == 32  # None still means 4 * d_model


# The per_direction layer is two whole blocks whose residual updates are added ---------------------


def _pre_norm_block(x, mixer_norm, mixer, mlp_norm, mlp):
    """The causal block written out: x + Mixer(norm(x)), then + MLP(norm(.))."""
    h = x + mixer(mixer_norm(x))
    return h + mlp(mlp_norm(h))


@pytest.mark.parametrize("ssm_layer", LAYERS)
@pytest.mark.parametrize("strategy", ["add", "ew_multiply"])
def test_per_direction_layer_is_two_blocks(ssm_layer, strategy):
    init_std = 0.5 if strategy == "ew_multiply" else 0.02  # a product of tiny updates is ~0
    model = tiny(ssm_layer, bidirectional=True, bidirectional_strategy=strategy, init_std=init_std)
    layer = model.blocks[0]

    def fwd(x):
        return _pre_norm_block(x, layer.mixer_norm, layer.mixer, layer.mlp_norm, layer.mlp)

    def rev(x):
        mods = (layer.mixer_norm_rev, layer.mixer_rev, layer.mlp_norm_rev, layer.mlp_rev)
        return _pre_norm_block(x, *mods)

    torch.manual_seed(4)
    x = torch.randn(2, 7, 16)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    index = reversal_index(mask, mask)
    with torch.no_grad():
        got = layer(x, index)
        delta_f = fwd(x) - x
        x_rev = reverse_real_tokens(x, index)
        delta_r = reverse_real_tokens(rev(x_rev) - x_rev, index)
        streams = fwd(x) + reverse_real_tokens(rev(x_rev), index)
    combined = delta_f + delta_r if strategy == "add" else delta_f * delta_r
    torch.testing.assert_close(got, x + combined, rtol=1e-5, atol=1e-5)
    # Both updates matter: neither direction alone, nor the sum of the two streams, is the layer.
    for wrong in (x + delta_f, x + delta_r, streams):
        assert (got - wrong).abs().amax() > 1e-4


# Parameter counts of the recipes (vocabulary 69, padded to 72) -----------------------------------


def mamba1_mixer_params(d=256, N=16, expand=2, K=4) -> int:
    e, R = expand * d, math.ceil(d / 16)
    # in_proj + conv (w, b) + x_proj + dt_proj (w, b) + A_log + D + out_proj
    return d * 2 * e + e * (K + 1) + e * (R + 2 * N) + (R * e + e) + e * N + e + e * d


def swiglu_mlp_params(d=256, d_ff=1024) -> int:
    return (d * 2 * d_ff + 2 * d_ff) + (d_ff * d + d)


def recipe_params(**kw) -> int:
    with torch.device("meta"):
        model = Mamba(MambaConfig(vocab_size=VOCAB, d_model=256, d_ff=1024, **kw))
    return sum(p.numel() for p in model.parameters())


def test_param_count_mamba_clm_40x256():
    n = recipe_params(num_layers=40)
    block = mamba1_mixer_params() + swiglu_mlp_params() + 2 * 256
    assert n == 40 * block + 72 * 256 + 256 == 49_099_008
    assert abs(n - 50e6) / 50e6 < 0.10


def test_param_count_bimamba_mlm_20x256():
    # Default per_direction: each layer is two causal blocks, so 20 layers cost what 40 causal
    # layers cost and land on the recipe's 50M.
    n = recipe_params(num_layers=20, bidirectional=True)
    block = mamba1_mixer_params() + swiglu_mlp_params() + 2 * 256
    assert n == 20 * 2 * block + 72 * 256 + 256 == recipe_params(num_layers=40) == 49_099_008
    assert abs(n - 50e6) / 50e6 < 0.10
    tied = recipe_params(num_layers=20, bidirectional=True, bidirectional_weight_tie=True)
    assert n - tied == 20 * (256 * 1024 + 512 * 256)  # in_proj + out_proj of each reverse mixer


def test_param_count_bimamba_shared_mlp_20x256():
    # Two mixers and one gated MLP per layer: a third short of the recipe's 50M.
    n = recipe_params(num_layers=20, bidirectional=True, bidirectional_mlp="shared")
    block = 2 * mamba1_mixer_params() + swiglu_mlp_params() + 2 * 256
    assert n == 20 * block + 72 * 256 + 256 == 33_314_048
    tied = recipe_params(
        num_layers=20, bidirectional=True, bidirectional_mlp="shared", bidirectional_weight_tie=True
    )
    assert n - tied == 20 * (256 * 1024 + 512 * 256)


# The mamba-ssm fast path against the PyTorch scans (needs CUDA and mamba-ssm's kernels) ----------


def _fast_path_or_skip(ssm_layer: str) -> None:
    from helm.ops.selective_scan import mamba_ssm_available

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not mamba_ssm_available(ssm_layer):
        pytest.skip(
            f"mamba-ssm's kernels for {ssm_layer} are not installed (pip install -e '.[cuda]')"
        )


@pytest.mark.gpu
def test_mamba_ssm_selective_scan_matches_the_pytorch_scan():
    from helm.ops.selective_scan import selective_scan

    _fast_path_or_skip("mamba")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, D, N, T = 2, 64, 16, 300
    u = torch.randn(B, D, T, device="cuda", generator=g, requires_grad=True)
    delta = torch.randn(B, D, T, device="cuda", generator=g, requires_grad=True)
    A = -torch.rand(D, N, device="cuda", generator=g).add(0.5).requires_grad_()
    Bm = torch.randn(B, N, T, device="cuda", generator=g, requires_grad=True)
    Cm = torch.randn(B, N, T, device="cuda", generator=g, requires_grad=True)
    Dv = torch.randn(D, device="cuda", generator=g, requires_grad=True)
    z = torch.randn(B, D, T, device="cuda", generator=g, requires_grad=True)
    inputs = (u, delta, A, Bm, Cm, Dv, z)
    outs, grads = [], []
    for impl in ("mamba_ssm", "torch"):
        y = selective_scan(*inputs, delta_softplus=True, impl=impl)
        dy = torch.ones_like(y)
        grads.append(torch.autograd.grad(y, inputs, dy))
        outs.append(y.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3)


@pytest.mark.gpu
def test_mamba_ssm_ssd_matches_the_pytorch_ssd():
    from helm.ops.selective_scan import ssd_chunk_scan

    _fast_path_or_skip("mamba2")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, P, G, N = 2, 256, 4, 16, 1, 32
    x = torch.randn(B, T, H, P, device="cuda", generator=g, requires_grad=True)
    dt = torch.randn(B, T, H, device="cuda", generator=g, requires_grad=True)
    A = -torch.rand(H, device="cuda", generator=g).add(0.5).requires_grad_()
    Bm = torch.randn(B, T, G, N, device="cuda", generator=g, requires_grad=True)
    Cm = torch.randn(B, T, G, N, device="cuda", generator=g, requires_grad=True)
    inputs = (x, dt, A, Bm, Cm)
    outs, grads = [], []
    for impl in ("mamba_ssm", "torch"):
        y = ssd_chunk_scan(*inputs, chunk_size=64, dt_softplus=True, impl=impl)
        grads.append(torch.autograd.grad(y, inputs, torch.ones_like(y)))
        outs.append(y.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3)
