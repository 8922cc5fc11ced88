"""safari's Hyena language model, written out as the peer of HELM's Hyena (tests/test_equivalence.py).

safari is not a package (and its LM needs flash-attn), so its code is transcribed here in its own
structure, for order 2 and one head, without dropout (the tests run at dropout 0):
- ``Sin``, ``PositionalEmbedding``, ``ExponentialModulation``, ``HyenaFilter``, ``fftconv`` and
  ``HyenaOperator``: ``standalone_hyena.py`` of HazyResearch/safari at
  02220c69d247e5473616cd053a443ad99fd2559b (Apache-2.0). As there, ONE ``Sin`` module (one set of
  frequencies) serves every layer of the filter MLP, the lag features are a table built for
  ``l_max`` positions and sliced, and the causal short conv pads 2 on both sides and keeps the
  first ``l`` outputs.
- ``Mlp``, ``Block`` and ``LMBackbone``: ``src/models/sequence/long_conv_lm.py`` (``LMBackbone``,
  ``create_block``, ``create_mlp_cls``), whose blocks are flash-attn's pre-norm ``Block`` and ``Mlp``
  (fc1, tanh-GELU, fc2). Their bookkeeping differs from HELM's on purpose: the residual stream is
  carried beside the branch output and added in the *next* block (dropout -> add -> norm), and the
  last branch output is added before ``ln_f``.

Build it under ``torch.set_default_dtype(torch.float64)`` for a float64 peer: its tables come from
``torch.linspace`` in the default dtype, as in safari.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def fftconv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Causal convolution of u (B, d, L) with k (d, L) through a zero-padded FFT, plus D u."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    return (y + u * D.unsqueeze(-1)).to(dtype=u.dtype)


class Sin(nn.Module):
    def __init__(self, dim: int, w: float = 10):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    """``z`` (1, seq_len, emb_dim) = [t, Re exp(-i f w), Im exp(-i f w)] and ``t`` (1, seq_len, 1).

    safari registers ``z`` as a parameter at lr 1e-5; HELM keeps it fixed (HyenaDNA's
    ``lr_pos_emb=0``), so here it is a buffer."""

    def __init__(self, emb_dim: int, seq_len: int):
        super().__init__()
        t = torch.linspace(0, 1, seq_len)[None, :, None]  # (1, L, 1)
        bands = (emb_dim - 1) // 2
        t_rescaled = torch.linspace(0, seq_len - 1, seq_len)[None, :, None]
        w = 2 * math.pi * t_rescaled / seq_len  # (1, L, 1)
        f = torch.linspace(1e-4, bands - 1, bands)[None, None]
        z = torch.exp(-1j * f * w)
        self.register_buffer("z", torch.cat([t, z.real, z.imag], dim=-1))
        self.register_buffer("t", t)

    def forward(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z[:, :L], self.t[:, :L]


class ExponentialModulation(nn.Module):
    def __init__(self, d_model: int, fast_decay_pct=0.3, slow_decay_pct=1.5, target=1e-2):
        super().__init__()
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, d_model)[None, None])

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * torch.exp(-t * self.deltas.abs())


class HyenaFilter(nn.Module):
    """The implicit long filter; ``bias`` is the skip weight D of the long convolution."""

    def __init__(self, d_model, emb_dim=3, order=16, seq_len=1024, w=1, num_inner_mlps=2,
                 **modulation_args):  # fmt: skip
        super().__init__()
        self.bias = nn.Parameter(torch.randn(d_model))
        act = Sin(dim=order, w=w)  # one module, used after every hidden Linear
        self.pos_emb = PositionalEmbedding(emb_dim, seq_len)
        self.implicit_filter = nn.Sequential(nn.Linear(emb_dim, order), act)
        for _ in range(num_inner_mlps):
            self.implicit_filter.append(nn.Linear(order, order))
            self.implicit_filter.append(act)
        self.implicit_filter.append(nn.Linear(order, d_model, bias=False))
        self.modulation = ExponentialModulation(d_model, **modulation_args)

    def filter(self, L: int) -> torch.Tensor:
        z, t = self.pos_emb(L)
        return self.modulation(t, self.implicit_filter(z))  # (1, L, d)


class HyenaOperator(nn.Module):
    def __init__(self, d_model: int, l_max: int, filter_order: int = 64, **filter_args):
        super().__init__()
        self.d_model, self.l_max = d_model, l_max
        inner_width = 3 * d_model
        self.in_proj = nn.Linear(d_model, inner_width)
        self.out_proj = nn.Linear(d_model, d_model)
        self.short_filter = nn.Conv1d(inner_width, inner_width, 3, padding=2, groups=inner_width)
        self.filter_fn = HyenaFilter(d_model, order=filter_order, seq_len=l_max, **filter_args)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        l = min(u.size(-2), self.l_max)  # noqa: E741
        u = self.in_proj(u).transpose(1, 2)  # b l d -> b d l
        uc = self.short_filter(u)[..., :l]
        x0, x1, v = uc.split(self.d_model, dim=1)
        k = self.filter_fn.filter(l)[0].transpose(0, 1)  # l d -> d l
        v = fftconv(v * x1, k, self.filter_fn.bias)
        return self.out_proj((v * x0).transpose(1, 2))


class Mlp(nn.Module):
    def __init__(self, d_model: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden_features)
        self.fc2 = nn.Linear(hidden_features, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """flash-attn's pre-norm block: (hidden, residual) -> (mlp branch output, residual stream)."""

    def __init__(self, d_model: int, mixer: nn.Module, d_inner: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = Mlp(d_model, d_inner)

    def forward(self, hidden, residual=None):
        residual = hidden + residual if residual is not None else hidden
        hidden = self.mixer(self.norm1(residual))
        residual = hidden + residual
        hidden = self.mlp(self.norm2(residual))
        return hidden, residual


class LMBackbone(nn.Module):
    """Token embedding (no positions), ``n_layer`` Hyena blocks, ``ln_f``: ids (B, L) -> (B, L, d)."""

    def __init__(self, vocab_size: int, d_model: int, n_layer: int, d_inner: int, l_max: int,
                 eps: float = 1e-5, **hyena_args):  # fmt: skip
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            Block(d_model, HyenaOperator(d_model, l_max, **hyena_args), d_inner, eps)
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.word_embeddings(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self.ln_f(hidden + residual)
