"""Hyena: blocks of pre-LN [order-2 Hyena operator] + pre-LN [MLP] (Poli et al. 2023).

The operator (as safari's ``HyenaOperator`` with order 2, one head):
    x0, x1, v = split(ShortConv(in_proj(u)))   in_proj: d -> 3d, depthwise conv of width 3
    y = x0 * (k * (v * x1) + D * (v * x1))     k: implicit long filter, * a long convolution
    out = out_proj(y)
The long convolution runs through ``helm.ops.fftconv.fftconv`` (FFT reference, or its Triton
kernel on CUDA).

The implicit filter evaluates a small MLP at every lag: positional features of the lag (its
normalised time and sin/cos pairs of the complex exponential ``exp(-i f w)``) -> Linear -> Sin ->
(Linear -> Sin) x ``filter_inner_layers`` -> Linear to d channels, then multiplies by an
exponential decay in |lag| whose rate is spread over the channels (safari's ExponentialModulation).
The filter is computed for each batch's length L, so nothing is cached; lags are normalised by
``max_seq_len``, so the filter at a given lag does not depend on L.

Causal (CLM): lags 0..L-1 and a causal short conv (left padding). Bidirectional (MLM): the MLP is
evaluated at the 2L-1 signed lags -(L-1)..(L-1) (``t`` and ``sin`` are odd in the lag, ``cos`` is
even, so the two sides differ) with decay in |lag|, and the short conv is centred: every position
sees every other. Padding: the inputs of the short conv and of the long conv are zeroed at padded
positions, so padding never reaches a real position in either direction.

Position embedding: ``none`` by default. The causal filter and short conv see position through the
sequence start; the two-sided operator is shift-equivariant apart from the sequence ends, and
``pos_embedding=absolute`` (what the original HELM Hyena recipes used) adds absolute positions.
``rotary`` is an attention-only encoding and is refused.

Optimizer hints: the filter MLP's weights, biases and Sin frequencies carry
``p._optim = {"lr_scale": filter_lr_scale, "weight_decay": filter_wd}`` (and ``_no_weight_decay``
when ``filter_wd == 0``), following safari's per-parameter ``_optim`` on the implicit filter. The
trainer gives them the learning rate ``lr_scale * lr`` at every step (the schedule scales both) and
the weight decay ``weight_decay``. The skip weight ``D`` and the conv biases are tagged
no-weight-decay. The positional features and the decay rates are fixed (safari's ``modulation_lr=0``
and HyenaDNA's ``lr_pos_emb=0``), not parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from helm.models.common import MLP, Backbone, Step, Tokens, init_weights, tag
from helm.models.config import HyenaConfig, ModelConfig
from helm.ops.fftconv import fftconv


def filter_lags(
    L: int,
    bidirectional: bool,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The lags a length-L filter covers, in fftconv's layout: 0..L-1, or -(L-1)..L-1 two-sided."""
    start = -(L - 1) if bidirectional else 0
    return torch.arange(start, L, device=device, dtype=dtype or torch.float32)


def lag_features(lags: torch.Tensor, max_seq_len: int, emb_dim: int) -> torch.Tensor:
    """(n,) lags -> (n, emb_dim) features ``[t, Re z, Im z]`` with ``z = exp(-i f w)``.

    t = lag / (max_seq_len - 1) in [-1, 1], w = 2 pi lag / max_seq_len, and ``(emb_dim - 1) / 2``
    frequencies f spread over [1e-4, bands - 1] (safari's PositionalEmbedding, extended to negative
    lags).
    """
    bands = (emb_dim - 1) // 2
    t = lags / max(max_seq_len - 1, 1)  # (n,)
    w = 2 * math.pi * lags / max_seq_len  # (n,)
    f = torch.linspace(1e-4, bands - 1, bands, device=lags.device, dtype=lags.dtype)  # (bands,)
    angle = w[:, None] * f  # (n, bands)
    return torch.cat([t[:, None], torch.cos(angle), -torch.sin(angle)], dim=-1)  # (n, emb_dim)


class Sin(nn.Module):
    """``sin(freq * x)`` with a learnable frequency per channel."""

    def __init__(self, dim: int, w: float):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), float(w)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """The long filter k as a function of the lag: MLP(lag features) * exp(-|t| |delta_c|).

    ``forward(L)`` returns k (d, L) causal or (d, 2L - 1) two-sided (index j = lag j - (L - 1)).
    """

    def __init__(self, cfg: HyenaConfig):
        super().__init__()
        self.max_seq_len = cfg.max_seq_len
        self.emb_dim = cfg.filter_emb_dim
        self.bidirectional = cfg.bidirectional
        order = cfg.filter_order
        layers: list[nn.Module] = [
            nn.Linear(cfg.filter_emb_dim, order),
            Sin(order, cfg.filter_sine_freq),
        ]
        for _ in range(cfg.filter_inner_layers):
            layers += [nn.Linear(order, order), Sin(order, cfg.filter_sine_freq)]
        layers.append(nn.Linear(order, cfg.d_model, bias=False))
        self.mlp = nn.Sequential(*layers)
        for p in self.mlp.parameters():
            tag(
                p,
                no_weight_decay=cfg.filter_wd == 0.0,
                lr_scale=cfg.filter_lr_scale,
                weight_decay=cfg.filter_wd,
            )
        # Decay rates |delta_c|, spread evenly over the channels from slow to fast: the envelope
        # exp(-t |delta_c|) reaches ``target`` at t = pct_c, pct_c running from slow_decay_pct to
        # fast_decay_pct. Fixed (safari's modulation_lr=0) and recomputed per call: nothing stale.
        log_target = abs(math.log(cfg.filter_decay_target))
        self.decay_range = (
            log_target / cfg.filter_slow_decay_pct,
            log_target / cfg.filter_fast_decay_pct,
        )

    def forward(self, L: int) -> torch.Tensor:
        w = self.mlp[0].weight
        acc = torch.promote_types(w.dtype, torch.float32)  # lags up to 2L stay exact integers
        lags = filter_lags(L, self.bidirectional, w.device, acc)  # (n,)
        h = self.mlp(lag_features(lags, self.max_seq_len, self.emb_dim).to(w.dtype))  # (n, d)
        t = lags.abs() / max(self.max_seq_len - 1, 1)  # (n,)
        deltas = torch.linspace(*self.decay_range, h.shape[-1], device=w.device, dtype=acc)  # (d,)
        decay = torch.exp(-t[:, None] * deltas)  # (n, d)
        return (h * decay).transpose(0, 1)  # (d, n)


class HyenaOperator(nn.Module):
    """Order-2 Hyena operator: (B, T, D) -> (B, T, D); see the module docstring."""

    def __init__(self, cfg: HyenaConfig):
        super().__init__()
        d = cfg.d_model
        self.bidirectional = cfg.bidirectional
        self.fftconv_impl = cfg.fftconv_impl
        self.in_proj = nn.Linear(d, 3 * d)
        s = cfg.short_filter_size
        self.short_filter = nn.Conv1d(3 * d, 3 * d, kernel_size=s, groups=3 * d)
        tag(self.short_filter.bias, no_weight_decay=True)
        # Causal: s - 1 zeros on the left, output t sees t-s+1..t. Centred: (s-1)/2 on each side.
        self.short_pad = ((s - 1) // 2, (s - 1) // 2) if cfg.bidirectional else (s - 1, 0)
        self.filter = ImplicitFilter(cfg)
        self.D = tag(nn.Parameter(torch.empty(d)), no_weight_decay=True)  # skip weight per channel
        self.out_proj = nn.Linear(d, d)
        self.out_proj._residual_proj = True
        self.drop = nn.Dropout(cfg.dropout)

    def short_conv(self, u: torch.Tensor) -> torch.Tensor:
        """Depthwise short convolution over (B, 3D, T), causal or centred; keeps the length."""
        return self.short_filter(F.pad(u, self.short_pad))  # (B, 3D, T)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D); mask: (B, T, 1) with 1 = real, 0 = pad, in x's dtype, or None."""
        T = x.shape[1]
        u = self.in_proj(x)  # (B, T, 3D)
        if mask is not None:
            u = u * mask  # pads must not enter the (centred) short conv
        u = self.short_conv(u.transpose(1, 2))  # (B, 3D, T)
        x0, x1, v = u.chunk(3, dim=1)  # 3 x (B, D, T)
        if mask is not None:
            v = v * mask.transpose(1, 2)  # the short conv spread real values onto pads: zero again
        k = self.filter(T)  # (D, T) or (D, 2T - 1)
        y = fftconv(
            v,
            k,
            self.D,
            pregate=x1,
            postgate=x0,
            bidirectional=self.bidirectional,
            impl=self.fftconv_impl,
        )  # (B, D, T)
        return self.drop(self.out_proj(y.transpose(1, 2)))  # (B, T, D)

    def allocate(self, batch_size: int, max_len: int, device: torch.device) -> HyenaState:
        d, s = self.D.shape[0], self.short_filter.kernel_size[0]
        window = torch.zeros(batch_size, 3 * d, s, device=device, dtype=self.D.dtype)
        history = torch.zeros(batch_size, d, max_len, device=device)
        with torch.no_grad():
            k = self.filter(max_len).float()  # (D, max_len): a lag's value does not depend on L
        return HyenaState(window, history, k)

    def step(
        self,
        x: torch.Tensor,
        state: HyenaState,
        position: torch.Tensor,
        end: int,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token x (B, D) at ``position`` (B,) of its row (``end``: the longest row's length
        with it) -> (B, D): the short conv from the window, then ``y_t = sum_{s <= t} k[t - s] v_s
        + D v_t`` over the row's history, O(t) per channel (Hyena has no fixed-size recurrent
        state). Rows where ``keep`` (B,) is False (padding) leave the state as it was."""
        u = self.in_proj(x)  # (B, 3D)
        window = torch.cat([state.window[..., 1:], u[..., None]], dim=-1)  # (B, 3D, s)
        u = (window * self.short_filter.weight.squeeze(1)).sum(-1) + self.short_filter.bias
        x0, x1, v = u.chunk(3, dim=-1)  # 3 x (B, D)
        gated = v.float() * x1.float()  # the long convolution's input at this step (fp32)
        history = state.history if keep is None else state.history.clone()
        history[torch.arange(x.shape[0], device=x.device), :, position] = gated
        lags = position[:, None] - torch.arange(end, device=x.device)  # (B, end): t - s
        k = (
            state.filter[:, lags.clamp(min=0)].permute(1, 0, 2) * (lags >= 0)[:, None]
        )  # (B, D, end)
        y = (history[..., :end] * k).sum(-1) + gated * self.D.float()
        if keep is not None:
            window = torch.where(keep[:, None, None], window, state.window)
            history = torch.where(keep[:, None, None], history, state.history)
        state.window, state.history = window, history
        return self.drop(self.out_proj((y * x0.float()).to(x.dtype)))


class HyenaState:
    """An operator's state between decoding steps: the short conv's window of projected inputs
    (B, 3D, s), the long convolution's history of gated inputs (B, D, max_len, fp32), and the
    implicit filter computed once for max_len lags (D, max_len)."""

    def __init__(self, window: torch.Tensor, history: torch.Tensor, filter: torch.Tensor):
        self.window, self.history, self.filter = window, history, filter


class HyenaBlock(nn.Module):
    """Pre-LN block: ``x + Hyena(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, cfg: HyenaConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = HyenaOperator(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.mixer(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))

    def allocate(self, batch_size: int, max_len: int, device: torch.device) -> HyenaState:
        return self.mixer.allocate(batch_size, max_len, device)

    def decode(self, x: torch.Tensor, state: HyenaState, step: Step) -> torch.Tensor:
        """x: (B, T, D) after the cached tokens, one token at a time (a causal block)."""
        out = []
        for t in range(x.shape[1]):
            keep = None if step.valid is None else step.valid[:, t]
            end = step.end - x.shape[1] + t + 1  # the longest row, with this token
            xt = x[:, t] + self.mixer.step(
                self.ln_1(x[:, t]), state, step.positions[:, t], end, keep
            )
            out.append(xt + self.mlp(self.ln_2(xt)))
        return torch.stack(out, dim=1)  # (B, T, D)


class Hyena(Backbone):
    """Hyena backbone: ``forward(input_ids, attention_mask, position_ids) -> hidden (B, T, D)``
    (``common.Backbone``): pre-LN Hyena blocks and a final LayerNorm.

    ``position_ids`` only feed a position embedding (absolute / sincos); the filters use relative
    lags. The LM head (``self.lm_head``) is not applied here.
    """

    def __init__(self, cfg: HyenaConfig):
        super().__init__(cfg, HyenaBlock, norm_f=nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps))

    def init_weights(self, cfg: ModelConfig) -> None:
        """``common.init_weights`` for every Linear (the filter MLP included, as in HyenaDNA), the
        skip weights D ~ N(0, 1) as in safari; short convs keep PyTorch's default init."""
        init_weights(self, cfg)
        for block in self.blocks:
            nn.init.normal_(block.mixer.D)

    def block_inputs(self, x: torch.Tensor, tokens: Tokens) -> tuple[torch.Tensor | None]:
        """The padding mask (B, T, 1) in x's dtype (1 = real, 0 = pad), or None."""
        T = tokens.input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} is beyond max_seq_len={self.cfg.max_seq_len}")
        mask = tokens.attention_mask
        return (None if mask is None else mask[..., None].to(x.dtype),)
