"""Backbones and ops against the implementations they claim to match, on tiny random models with the
weights copied across, forward and backward, in float64 where the peer allows it.

Peers: HF transformers (``GPT2LMHeadModel`` causal and, under a full attention mask,
bidirectional; ``BertForMaskedLM``; ``MambaModel``, ``Mamba2Model``, and a Mamba block with its MLP
as HF's ``MambaBlock`` followed by Llama's ``LlamaRMSNorm`` + ``LlamaMLP``; Llama's
``apply_rotary_pos_emb`` for rotary positions; the ``dev`` extra, skipped only when transformers is
not installed), mamba-ssm's ``selective_scan_ref`` (written out below: mamba-ssm needs CUDA to
import) and safari's Hyena language model, filter to final norm (``tests/safari_hyena.py``: safari
is not a package). timm is pinned by the fixtures in tests/golden (test_sched.py, test_optim.py).
"""

from __future__ import annotations

import pytest
import safari_hyena
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


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_gpt2_matches_hf_gpt2(bidirectional):
    """Causal: HF's own causal mask from the padding mask. Bidirectional: HF's GPT-2 given a full
    4-D additive mask (every query sees every real key), which HF uses as given."""
    transformers = require("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=VP, n_positions=64, n_embd=D, n_layer=2, n_head=4, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    hf = transformers.GPT2LMHeadModel(cfg).double().eval()
    ours = build_model("gpt2", vocab_size=V, d_model=D, num_layers=2, num_heads=4, max_seq_len=64,
                       activation="gelu_tanh", pos_embedding="absolute",
                       bidirectional=bidirectional).double().eval()  # fmt: skip
    _randomise(ours)
    mapping = _ours_to_theirs("gpt2", ours)
    _load(hf, ours, mapping)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    logits = ours.lm_head(ours(ids, mask))
    hf_mask = mask
    if bidirectional:
        keys = mask.bool()[:, None, None, :].expand(-1, 1, T, T)  # (B, 1, T, T)
        hf_mask = torch.zeros(keys.shape, dtype=torch.float64).masked_fill(
            ~keys, torch.finfo(torch.float64).min
        )
    ref = hf(input_ids=ids, attention_mask=hf_mask).logits
    _compare(ours, hf, mapping, logits, ref, atol=1e-10, mask=mask.bool())


def test_rotary_attention_matches_llamas_rotary_embedding():
    """A rotary attention layer at arbitrary positions against Llama's ``LlamaRotaryEmbedding`` and
    ``apply_rotary_pos_emb`` on the same q, k, v, then causal softmax attention written out."""
    transformers = require("transformers")
    llama = require("transformers.models.llama.modeling_llama")
    from helm.models.gpt2 import Attention

    H, hd = 4, D // 4
    cfg = transformers.LlamaConfig(hidden_size=D, num_attention_heads=H, head_dim=hd,
                                   max_position_embeddings=64,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e4})  # fmt: skip
    model = build_model("gpt2", vocab_size=V, d_model=D, num_layers=1, num_heads=H, max_seq_len=64,
                        pos_embedding="rotary").double().eval()  # fmt: skip
    _randomise(model)
    attn = model.blocks[0].attn
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, T, D, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 64, (2, T), generator=g)  # --position_ids may give any positions
    with torch.no_grad():
        mine = attn(x, Attention(None, True, pos))
        q, k, v = attn.qkv(x).view(2, T, 3, H, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        cos, sin = llama.LlamaRotaryEmbedding(cfg)(x, pos)
        q, k = llama.apply_rotary_pos_emb(q, k, cos, sin)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2) / hd**0.5).masked_fill(~causal, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, D)
        ref = attn.proj(y)
    # HELM rotates in float32 (as HF computes its angles): float32 agreement.
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


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


def test_mamba_block_with_mlp_matches_hf_mamba_block_then_llama_mlp():
    """d_ff > 0: each layer is HF's MambaBlock (x + mixer(RMSNorm(x))) followed by a pre-norm
    gated MLP, here Llama's ``LlamaRMSNorm`` and ``LlamaMLP`` (down(silu(gate(x)) * up(x)), with
    biases); HF's final norm closes the stack."""
    transformers = require("transformers")
    llama = require("transformers.models.llama.modeling_llama")
    d_ff = 48
    cfg = transformers.MambaConfig(vocab_size=VP, hidden_size=D, state_size=4, num_hidden_layers=2,
                                   expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
                                   layer_norm_epsilon=1e-5, time_step_rank=3,
                                   residual_in_fp32=False)  # fmt: skip
    hf = transformers.MambaModel(cfg).double().eval()
    mlp_cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=d_ff, mlp_bias=True,
                                       hidden_act="silu", rms_norm_eps=1e-5)  # fmt: skip
    norms = torch.nn.ModuleList(llama.LlamaRMSNorm(D, eps=1e-5) for _ in range(2)).double()
    mlps = torch.nn.ModuleList(llama.LlamaMLP(mlp_cfg) for _ in range(2)).double()
    ours = build_model("mamba", vocab_size=V, d_model=D, num_layers=2, d_ff=d_ff, d_state=4,
                       dt_rank=3, scan_impl="torch").double().eval()  # fmt: skip
    _randomise(ours)
    mapping = {k: v[0].removeprefix("backbone.") for k, v in _ours_to_theirs("mamba", ours).items()}
    p_hf, p_ours = dict(hf.named_parameters()), dict(ours.named_parameters())
    with torch.no_grad():
        for mine, theirs in mapping.items():
            p_hf[theirs].copy_(p_ours[mine])
        for block, norm, mlp in zip(ours.blocks, norms, mlps):
            norm.weight.copy_(block.mlp_norm.weight)
            gate_w, up_w = block.mlp.fc_in.weight.chunk(2, dim=0)  # swiglu: silu(first) * second
            gate_b, up_b = block.mlp.fc_in.bias.chunk(2, dim=0)
            for lin, w, b in ((mlp.gate_proj, gate_w, gate_b), (mlp.up_proj, up_w, up_b),
                              (mlp.down_proj, block.mlp.fc_out.weight, block.mlp.fc_out.bias)):  # fmt: skip
                lin.weight.copy_(w)
                lin.bias.copy_(b)
    ids = _ids(t=13)
    h = hf.embeddings(ids)
    for layer, norm, mlp in zip(hf.layers, norms, mlps):
        h = layer(h)
        h = h + mlp(norm(h))
    ref = hf.norm_f(h)
    mine = ours(ids)
    torch.testing.assert_close(mine, ref, atol=2e-5, rtol=2e-5)
    R = torch.randn(mine.shape, generator=torch.Generator().manual_seed(9), dtype=mine.dtype)
    (mine * R).sum().backward()
    (ref * R).sum().backward()
    for name, p in ours.named_parameters():
        if name in mapping:
            g = p_hf[mapping[name]].grad
        else:  # blocks.{i}.mlp_norm / mlp.*
            i = int(name.split(".")[1])
            norm, mlp = norms[i], mlps[i]
            g = {"mlp_norm.weight": norm.weight.grad,
                 "mlp.fc_in.weight": torch.cat([mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad]),
                 "mlp.fc_in.bias": torch.cat([mlp.gate_proj.bias.grad, mlp.up_proj.bias.grad]),
                 "mlp.fc_out.weight": mlp.down_proj.weight.grad,
                 "mlp.fc_out.bias": mlp.down_proj.bias.grad}[name.split(".", 2)[2]]  # fmt: skip
        torch.testing.assert_close(p.grad, g, atol=2e-5, rtol=2e-5, msg=name)


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


def _hyena_pair(num_layers: int = 2):
    """HELM's causal Hyena (float64, random weights) and safari's LM backbone holding the same
    weights (``tests/safari_hyena.py``), with ``ours name -> theirs name``. safari uses one Sin
    module throughout a filter MLP, so each HELM filter's Sin layers get one frequency vector."""
    filt = dict(filter_order=16, filter_emb_dim=5, filter_inner_layers=2, filter_sine_freq=1.0)
    ours = build_model("hyena", vocab_size=V, d_model=D, num_layers=num_layers, max_seq_len=64,
                       activation="gelu_tanh", fftconv_impl="torch", **filt).double().eval()  # fmt: skip
    _randomise(ours)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # safari builds its tables in the default dtype
    try:
        theirs = safari_hyena.LMBackbone(VP, D, num_layers, d_inner=4 * D, l_max=64,
                                         filter_order=16, emb_dim=5, num_inner_mlps=2, w=1.0)  # fmt: skip
    finally:
        torch.set_default_dtype(default)
    names = {"embed.tok.weight": "word_embeddings.weight", "norm_f.weight": "ln_f.weight",
             "norm_f.bias": "ln_f.bias"}  # fmt: skip
    for i, block in enumerate(ours.blocks):
        sins = [m for m in block.mixer.filter.mlp if hasattr(m, "freq")]
        with torch.no_grad():
            for s in sins[1:]:
                s.freq.copy_(sins[0].freq)
        for name, _ in block.named_parameters():
            mine = (name.replace("ln_1", "norm1").replace("ln_2", "norm2")
                    .replace("mlp.fc_in", "mlp.fc1").replace("mlp.fc_out", "mlp.fc2")
                    .replace("mixer.filter.mlp", "mixer.filter_fn.implicit_filter")
                    .replace("mixer.D", "mixer.filter_fn.bias"))  # fmt: skip
            if name.endswith("freq"):  # the one Sin module sits at index 1 of the Sequential
                mine = "mixer.filter_fn.implicit_filter.1.freq"
            names[f"blocks.{i}.{name}"] = f"layers.{i}.{mine}"
    p_theirs = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p_theirs[names[name]].copy_(p.view_as(p_theirs[names[name]]))
    return ours, theirs, names


def test_fftconv_ref_matches_safari():
    g = torch.Generator().manual_seed(2)
    u, k, Dk = (
        torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 3, 13), (3, 13), (3,))
    )
    torch.testing.assert_close(
        fftconv_ref(u, k, Dk), safari_hyena.fftconv(u, k, Dk), atol=1e-12, rtol=0
    )


def test_hyena_implicit_filter_matches_safari():
    ours, theirs, _ = _hyena_pair(num_layers=1)
    with torch.no_grad():
        for L in (1, 11, 64):  # safari slices a table built for l_max; HELM computes each length
            mine = ours.blocks[0].mixer.filter(L)  # (D, L)
            ref = theirs.layers[0].mixer.filter_fn.filter(L)[0].T
            torch.testing.assert_close(mine, ref, atol=1e-12, rtol=0)


def test_hyena_backbone_matches_safari_forward_and_backward():
    """The whole causal model: embedding, blocks (operator with its implicit filter, MLP, both
    residuals, pre-norms), final norm; every parameter's gradient."""
    ours, theirs, names = _hyena_pair()
    ids = _ids()
    mine, ref = ours(ids), theirs(ids)
    torch.testing.assert_close(mine, ref, atol=1e-10, rtol=0)
    R = torch.randn(mine.shape, generator=torch.Generator().manual_seed(9), dtype=mine.dtype)
    (mine * R).sum().backward()
    (ref * R).sum().backward()
    p_theirs = dict(theirs.named_parameters())
    shared = {}  # safari's one Sin per filter: its gradient is the sum over HELM's Sin layers
    for name, p in ours.named_parameters():
        g = p_theirs[names[name]].grad
        if name.endswith("freq"):
            shared[names[name]] = shared.get(names[name], 0) + p.grad
        else:
            torch.testing.assert_close(p.grad, g.view_as(p), atol=1e-10, rtol=0, msg=name)
    assert shared
    for their_name, total in shared.items():
        torch.testing.assert_close(total, p_theirs[their_name].grad[0], atol=1e-10, rtol=0)
