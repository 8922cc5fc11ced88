"""Backbones and ops against the implementations they claim to match, on tiny random models with the
weights copied across, forward and backward, in float64 where the peer allows it.

Peers: HF transformers (``GPT2LMHeadModel``, ``BertForMaskedLM``, ``MambaModel``, ``Mamba2Model``;
the ``test`` extra, skipped when it is not installed), mamba-ssm's ``selective_scan_ref`` and safari's
``fftconv`` / ``HyenaOperator.forward`` (their formulas are written out below as those repositories
have them: mamba-ssm needs CUDA to import and safari is not a package). timm is pinned by the
fixtures in tests/golden (test_sched.py, test_optim.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import require

from helm.hf import weight_map
from helm.models import build_model
from helm.ops.fftconv import fftconv_ref
from helm.ops.selective_scan import selective_scan

V, VP, D, T = 69, 72, 32, 11  # vocabulary, padded vocabulary, width, tokens


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (norm weights and biases too), so no mapping error hides in a 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 2)
            elif name.endswith("embed.tok.weight"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
            else:
                p.copy_(p + torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def _ids(b: int = 2, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(5, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _compare(ours, theirs, mapping, out_ours, out_theirs, atol, rtol=0.0, mask=None):
    """Forward values, then the gradients of one random projection of the outputs, parameter by
    parameter through ``mapping`` (ours name -> (their name, transform of their gradient))."""
    if mask is not None:
        out_ours, out_theirs = out_ours[mask], out_theirs[mask]
    torch.testing.assert_close(out_ours, out_theirs, atol=atol, rtol=rtol)
    R = torch.randn(
        out_ours.shape, generator=torch.Generator().manual_seed(9), dtype=out_ours.dtype
    )
    (out_ours * R).sum().backward()
    (out_theirs * R).sum().backward()
    p_theirs = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        their_name, fn = mapping[name]
        g = fn(p_theirs[their_name].grad) if callable(fn) else p_theirs[their_name].grad
        torch.testing.assert_close(
            p.grad, g, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )


def _load(theirs, ours, mapping):
    """Copy our weights into the peer through ``mapping`` (ours -> (theirs, grad transform))."""
    p_theirs = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            their_name, fn = mapping[name]
            value = p.T if fn is _t else p
            if isinstance(fn, tuple):  # a slice of a fused tensor
                continue
            p_theirs[their_name].copy_(value)


def _t(g):
    return g.T


def _ours_to_theirs(name: str, ours) -> dict:
    """helm.hf.weight_map (HF name -> (ours, how)) as this file's mapping (ours -> (theirs, grad
    transform)): "t" transposes; BERT's fused qkv is tagged ("qkv", prefix, "weight" | "bias")."""
    mapping = {}
    for theirs, (mine, how) in weight_map(name, ours.cfg).items():
        if mine in mapping:  # BERT: the second HF name of a tensor (query/key/value, biases)
            continue
        if isinstance(how, tuple):
            prefix = theirs.split("attention.self.")[0]
            how = ("qkv", prefix, theirs.rsplit(".", 1)[1])
        mapping[mine] = (theirs, _t if how == "t" else how if isinstance(how, tuple) else None)
    return mapping


# GPT-2 -------------------------------------------------------------------------------------------


def test_gpt2_matches_hf_gpt2():
    transformers = require("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=VP, n_positions=64, n_embd=D, n_layer=2, n_head=4, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    hf = transformers.GPT2LMHeadModel(cfg).double().eval()
    ours = build_model("gpt2", vocab_size=V, d_model=D, num_layers=2, num_heads=4, max_seq_len=64,
                       activation="gelu_tanh", pos_embedding="absolute").double().eval()  # fmt: skip
    _randomise(ours)
    mapping = _ours_to_theirs("gpt2", ours)
    _load(hf, ours, mapping)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    logits = ours.lm_head(ours(ids, mask))
    ref = hf(input_ids=ids, attention_mask=mask).logits
    _compare(ours, hf, mapping, logits, ref, atol=1e-10, mask=mask.bool())


# BERT --------------------------------------------------------------------------------------------


def _bert_pair():
    transformers = require("transformers")
    cfg = transformers.BertConfig(
        vocab_size=VP, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=4 * D, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=64, type_vocab_size=1,
        layer_norm_eps=1e-12,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    hf = transformers.BertForMaskedLM(cfg).double().eval()
    with torch.no_grad():
        hf.bert.embeddings.token_type_embeddings.weight.zero_()  # HELM has no segment embedding
    hf.bert.embeddings.token_type_embeddings.weight.requires_grad_(False)
    ours = build_model("bert", vocab_size=V, d_model=D, num_layers=2, num_heads=4,
                       max_seq_len=64).double().eval()  # fmt: skip
    _randomise(ours)
    mapping = _ours_to_theirs("bert", ours)
    _load(hf, ours, mapping)
    with torch.no_grad():
        for i in range(2):
            h = hf.bert.encoder.layer[i].attention.self
            qkv = ours.blocks[i].attn.qkv
            for w in ("weight", "bias"):
                q, k, v = getattr(qkv, w).chunk(3, dim=0)
                (
                    getattr(h.query, w).copy_(q),
                    getattr(h.key, w).copy_(k),
                    getattr(h.value, w).copy_(v),
                )
        if hf.cls.predictions.decoder.bias is not None:
            hf.cls.predictions.decoder.bias.copy_(ours.lm_head.bias)
    return hf, ours, mapping


def _qkv_grad(hf, name, fn):
    _, h, w = fn
    s = dict(hf.named_parameters())
    return torch.cat([s[h + f"attention.self.{x}.{w}"].grad for x in ("query", "key", "value")])


def test_bert_encoder_and_mlm_head_match_hf_bert_for_masked_lm():
    hf, ours, mapping = _bert_pair()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    logits = ours.lm_head(ours(ids, mask))
    out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool()
    torch.testing.assert_close(
        ours(ids, mask)[keep], out.hidden_states[-1][keep], atol=1e-10, rtol=0
    )
    mapping = {k: ((v[0], (lambda g, n=k, f=v[1]: _qkv_grad(hf, n, f))) if isinstance(v[1], tuple)
                   else v) for k, v in mapping.items()}  # fmt: skip
    _compare(ours, hf, mapping, logits, out.logits, atol=1e-10, mask=keep)


def test_bert_uses_berts_layer_norm_eps_and_keeps_the_bare_head_as_an_option():
    bert = build_model("bert", vocab_size=V, d_model=D, num_layers=1, num_heads=4, max_seq_len=64)
    assert bert.embed_norm.eps == 1e-12 and bert.blocks[0].ln_1.eps == 1e-12
    assert bert.lm_head.dense is not None and bert.lm_head.proj.weight is bert.embed.tok.weight
    bare = build_model("bert", vocab_size=V, d_model=D, num_layers=1, num_heads=4, max_seq_len=64,
                       mlm_head="linear")  # fmt: skip
    assert bare.lm_head.dense is None
    h = torch.randn(3, D)
    torch.testing.assert_close(bare.lm_head(h), h @ bare.embed.tok.weight.T)


# Mamba -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["mamba", "mamba2"])
def test_mamba_matches_hf_pytorch_path(layer):
    transformers = require("transformers")
    common = dict(vocab_size=VP, hidden_size=D, state_size=4, num_hidden_layers=2, expand=2,
                  conv_kernel=4, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5)  # fmt: skip
    if layer == "mamba":
        cfg = transformers.MambaConfig(time_step_rank=3, **common)
        hf = transformers.MambaModel(cfg)
        kw = dict(dt_rank=3)
    else:
        cfg = transformers.Mamba2Config(num_heads=4, head_dim=16, n_groups=2, chunk_size=4,
                                        rms_norm=True, norm_before_gate=False, **common)  # fmt: skip
        hf = transformers.Mamba2Model(cfg)
        kw = dict(headdim=16, ngroups=2, chunk_size=4)
    hf = hf.double().eval()
    ours = build_model("mamba", vocab_size=V, d_model=D, num_layers=2, d_ff=0, d_state=4,
                       ssm_layer=layer, scan_impl="torch", **kw).double().eval()  # fmt: skip
    _randomise(ours)
    # helm.hf maps to MambaForCausalLM (backbone.*); the peer here is the bare MambaModel.
    mapping = {k: (v[0].removeprefix("backbone."), v[1])
               for k, v in _ours_to_theirs("mamba", ours).items()}  # fmt: skip
    _load(hf, ours, mapping)
    ids = _ids(t=13)
    hidden = ours(ids)
    ref = hf(input_ids=ids).last_hidden_state
    # HF's PyTorch paths compute parts of the scan in float32 (A = -exp(A_log.float())).
    _compare(ours, hf, mapping, hidden, ref, atol=2e-5, rtol=2e-5)


def selective_scan_ref_mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                 delta_softplus=False):  # fmt: skip
    """mamba-ssm's ``selective_scan_ref`` (mamba_ssm/ops/selective_scan_interface.py), real A and
    variable (B, N, L) B and C, in the inputs' dtype: x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t,
    y_t = <x_t, C_t> + D u_t, times silu(z_t)."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    x = A.new_zeros((batch, dim, dstate))
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    return out if z is None else out * F.silu(z)


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_selective_scan_matches_mamba_ssm_reference(chunk_size):
    g = torch.Generator().manual_seed(4)
    Bsz, Dch, N, L = 2, 5, 3, 17
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = [r(Bsz, Dch, L), r(Bsz, Dch, L) * 0.5, -torch.rand(Dch, N, generator=g, dtype=torch.float64) * 2,
            r(Bsz, N, L), r(Bsz, N, L), r(Dch), r(Bsz, Dch, L), r(Dch)]  # fmt: skip
    mine = [a.clone().requires_grad_() for a in args]
    theirs = [a.clone().requires_grad_() for a in args]
    y = selective_scan(*mine[:7], delta_bias=mine[7], delta_softplus=True, chunk_size=chunk_size,
                       impl="torch")  # fmt: skip
    ref = selective_scan_ref_mamba_ssm(*theirs[:7], delta_bias=theirs[7], delta_softplus=True)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    R = r(*y.shape)
    (y * R).sum().backward()
    (ref * R).sum().backward()
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-9)


# Hyena -------------------------------------------------------------------------------------------


def fftconv_safari(u, k, D):
    """safari's ``fftconv`` (standalone_hyena.py): causal FFT convolution plus the skip D u."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    return (y + u * D.unsqueeze(-1)).to(dtype=u.dtype)


def hyena_operator_safari(op, u):
    """safari's ``HyenaOperator.forward`` (order 2, one head) with HELM's weights and filter:
    in_proj, causal short conv (padding 2, first l outputs), split (x0, x1, v),
    v = fftconv(v * x1, k, bias), y = out_proj(v * x0)."""
    l = u.size(-2)  # noqa: E741
    u = op.in_proj(u).transpose(1, 2)  # b l d -> b d l
    s = op.short_filter.kernel_size[0]
    uc = F.conv1d(u, op.short_filter.weight, op.short_filter.bias, padding=s - 1,
                  groups=u.shape[1])[..., :l]  # fmt: skip
    x0, x1, v = uc.split(op.out_proj.in_features, dim=1)
    k = op.filter(l)  # (d, l)
    v = fftconv_safari(v * x1, k, op.D)
    return op.out_proj((v * x0).transpose(1, 2))


def test_fftconv_ref_matches_safari():
    g = torch.Generator().manual_seed(2)
    u, k, Dk = (
        torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 3, 13), (3, 13), (3,))
    )
    torch.testing.assert_close(fftconv_ref(u, k, Dk), fftconv_safari(u, k, Dk), atol=1e-12, rtol=0)


def test_hyena_operator_matches_safari():
    model = build_model("hyena", vocab_size=V, d_model=D, num_layers=1, max_seq_len=64,
                        fftconv_impl="torch").double().eval()  # fmt: skip
    _randomise(model)
    op = model.blocks[0].mixer
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, ref = op(x1), hyena_operator_safari(op, x2)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    R = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad((y * R).sum(), [x1, *op.parameters()], allow_unused=True)
    refs = torch.autograd.grad((ref * R).sum(), [x2, *op.parameters()], allow_unused=True)
    for a, b in zip(grads, refs):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, atol=1e-11, rtol=0)
