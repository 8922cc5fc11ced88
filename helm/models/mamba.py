"""Mamba backbone: Mamba-1 (selective SSM) or Mamba-2 (SSD) mixers, each with a gated MLP.

Block (pre-norm): ``x = x + Mixer(RMSNorm(x)); x = x + MLP(RMSNorm(x))``. The MLP is ``common.MLP``
with ``cfg.activation``; MambaConfig defaults to ``swiglu`` (a gated MLP of width ``d_ff``, default
4 * d_model), unlike the ModelConfig default ``gelu``: pass ``activation="gelu"`` (``--activation``)
for a plain MLP, and ``d_ff=0`` for the original Mamba block without an MLP.

Bidirectional (``cfg.bidirectional``, MLM): each layer reads the sequence forwards and every row's
real tokens reversed (right padding stays in place), flips the reverse result back the same way and
combines the two directions ("add": sum, "ew_multiply": product, as in Caduceus). What each
direction holds is ``bidirectional_mlp`` (see MambaConfig): a whole block (mixer and MLP,
"per_direction", the default) or a mixer only, the two sharing one MLP ("shared").
``bidirectional_weight_tie=True`` shares the reverse mixer's in_proj and out_proj with the forward
mixer (Caduceus's tying), keeping conv, dt, A and D per direction. Padding never reaches a real
position: pads trail the real tokens in both scan directions, every mixer is causal and everything
else acts per token. Causal (CLM) models ignore ``attention_mask`` for the same reason.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from helm.models.common import MLP, Backbone, RMSNorm, Step, Tokens, init_weights, tag
from helm.models.config import MambaConfig, ModelConfig
from helm.ops.selective_scan import (
    causal_conv1d,
    causal_conv1d_update,
    check_scan_impl,
    resolve_scan_impl,
    selective_scan,
    selective_state_update,
    ssd_chunk_scan,
)


def _inverse_softplus_dt(n: int, cfg: MambaConfig) -> torch.Tensor:
    """(n,) biases b with softplus(b) = dt ~ log-uniform in [dt_min, dt_max] (floored)."""
    log_dt = torch.rand(n) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
    dt = log_dt.exp().clamp(min=cfg.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt) = log(exp(dt) - 1)


class _Mixer(nn.Module):
    """What both mixers share: the choice of kernels for an input (``resolve_scan_impl``)."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.scan_impl, self.ssm_layer = cfg.scan_impl, cfg.ssm_layer

    def _impl(self, x: torch.Tensor) -> str:
        return resolve_scan_impl(self.scan_impl, x, self.ssm_layer)


class MambaMixer(_Mixer):
    """Mamba-1 mixer (B, T, D) -> (B, T, D): in_proj to (x, z), causal conv + SiLU on x, selective
    scan with input-dependent (dt, B, C), gate silu(z), out_proj."""

    def __init__(self, cfg: MambaConfig):
        super().__init__(cfg)
        self.cfg = cfg
        d_inner, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner)
        tag(self.conv1d.bias, no_weight_decay=True)
        self.x_proj = nn.Linear(d_inner, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, d_inner)
        self.A_log = tag(nn.Parameter(torch.empty(d_inner, N)), no_weight_decay=True)
        self.D = tag(nn.Parameter(torch.empty(d_inner)), no_weight_decay=True)
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)
        self.out_proj._residual_proj = True
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's init, re-applied after the generic ``init_weights``: dt_proj weight uniform with
        std dt_rank^-0.5, dt bias = softplus^-1 of a log-uniform dt, S4D-real A = -(1, 2, ..., N)."""
        cfg = self.cfg
        bound = cfg.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        self.dt_proj.bias.copy_(_inverse_softplus_dt(cfg.d_inner, cfg))
        A = torch.arange(1, cfg.d_state + 1, dtype=torch.float32).repeat(cfg.d_inner, 1)
        self.A_log.copy_(A.log())  # (d_inner, N)
        self.D.fill_(1.0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        impl = self._impl(hidden)
        R, N = self.cfg.dt_rank, self.cfg.d_state
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, T) each
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, impl)
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([R, N, N], dim=-1)  # (B, T, R | N | N)
        dt = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # (B, d_inner, T); bias added in scan
        A = -torch.exp(self.A_log.float())  # (d_inner, N), negative: a decaying state
        y = selective_scan(
            x, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            chunk_size=self.cfg.chunk_size, impl=impl,
        )  # fmt: skip
        return self.out_proj(y.transpose(1, 2))  # (B, T, D)

    def allocate(self, batch_size: int, device: torch.device) -> RecurrentState:
        E, K, N = self.cfg.d_inner, self.cfg.d_conv, self.cfg.d_state
        conv = torch.zeros(batch_size, E, K, device=device, dtype=self.conv1d.weight.dtype)
        return RecurrentState(conv, torch.zeros(batch_size, E, N, device=device))

    def step(self, hidden: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, tuple]:
        """One token (B, D) -> ((B, D), the new (conv, ssm) state): the recurrence the scan solves."""
        R, N = self.cfg.dt_rank, self.cfg.d_state
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, d_inner) each
        w = self.conv1d.weight.squeeze(1)
        x, conv = causal_conv1d_update(x, state.tensors[0], w, self.conv1d.bias)
        dt, B, C = self.x_proj(x).split([R, N, N], dim=-1)  # (B, R | N | N)
        y, ssm = selective_state_update(
            state.tensors[1], x, dt @ self.dt_proj.weight.T, -torch.exp(self.A_log.float()), B, C,
            self.D.float(), z, dt_bias=self.dt_proj.bias.float(), dt_softplus=True,
        )  # fmt: skip
        return self.out_proj(y), (conv, ssm)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm(y * silu(z)) over groups of d_inner / ngroups channels."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = tag(nn.Parameter(torch.ones(dim)), no_weight_decay=True)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))  # (..., G, gs)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return g.flatten(-2).type_as(y) * self.weight


class Mamba2Mixer(_Mixer):
    """Mamba-2 (SSD) mixer (B, T, D) -> (B, T, D): one in_proj to (z, x, B, C, dt), causal conv +
    SiLU over (x, B, C), SSD scan with a scalar A per head, gated RMSNorm, out_proj."""

    def __init__(self, cfg: MambaConfig):
        super().__init__(cfg)
        self.cfg = cfg
        d_inner, G, N = cfg.d_inner, cfg.ngroups, cfg.d_state
        self.nheads = d_inner // cfg.headdim
        self.conv_dim = d_inner + 2 * G * N
        self.in_proj = nn.Linear(cfg.d_model, d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim)
        tag(self.conv1d.bias, no_weight_decay=True)
        self.dt_bias = tag(nn.Parameter(torch.empty(self.nheads)), no_weight_decay=True)
        self.A_log = tag(nn.Parameter(torch.empty(self.nheads)), no_weight_decay=True)
        self.D = tag(nn.Parameter(torch.empty(self.nheads)), no_weight_decay=True)
        self.norm = GatedRMSNorm(d_inner, d_inner // G, cfg.norm_eps)
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)
        self.out_proj._residual_proj = True
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba-2's init: dt bias as Mamba-1, A ~ U[1, 16] per head (A_log = log A), D = 1."""
        self.dt_bias.copy_(_inverse_softplus_dt(self.nheads, self.cfg))
        self.A_log.copy_(torch.empty(self.nheads).uniform_(1.0, 16.0).log())
        self.D.fill_(1.0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        impl = self._impl(hidden)
        Bsz, T, _ = hidden.shape
        G, N, P = self.cfg.ngroups, self.cfg.d_state, self.cfg.headdim
        d_inner = self.cfg.d_inner
        z, xBC, dt = self.in_proj(hidden).split([d_inner, self.conv_dim, self.nheads], dim=-1)
        w = self.conv1d.weight.squeeze(1)
        xBC = causal_conv1d(xBC.transpose(1, 2), w, self.conv1d.bias, impl).transpose(1, 2)
        x, B, C = xBC.split([d_inner, G * N, G * N], dim=-1)  # (B, T, d_inner | G N | G N)
        y = ssd_chunk_scan(
            x.reshape(Bsz, T, self.nheads, P), dt, -torch.exp(self.A_log.float()),
            B.reshape(Bsz, T, G, N), C.reshape(Bsz, T, G, N), self.cfg.chunk_size,
            D=self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True, impl=impl,
        )  # fmt: skip
        y = self.norm(y.reshape(Bsz, T, d_inner), z)  # (B, T, d_inner)
        return self.out_proj(y)  # (B, T, D)

    def allocate(self, batch_size: int, device: torch.device) -> RecurrentState:
        K, N, P = self.cfg.d_conv, self.cfg.d_state, self.cfg.headdim
        conv = torch.zeros(
            batch_size, self.conv_dim, K, device=device, dtype=self.conv1d.weight.dtype
        )
        return RecurrentState(conv, torch.zeros(batch_size, self.nheads, P, N, device=device))

    def step(self, hidden: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, tuple]:
        """One token (B, D) -> ((B, D), the new (conv, ssm) state): the recurrence SSD solves."""
        Bsz = hidden.shape[0]
        G, N, P, d_inner = self.cfg.ngroups, self.cfg.d_state, self.cfg.headdim, self.cfg.d_inner
        z, xBC, dt = self.in_proj(hidden).split([d_inner, self.conv_dim, self.nheads], dim=-1)
        w = self.conv1d.weight.squeeze(1)
        xBC, conv = causal_conv1d_update(xBC, state.tensors[0], w, self.conv1d.bias)
        x, B, C = xBC.split([d_inner, G * N, G * N], dim=-1)
        y, ssm = selective_state_update(
            state.tensors[1], x.reshape(Bsz, self.nheads, P), dt, -torch.exp(self.A_log.float()),
            B.reshape(Bsz, G, N), C.reshape(Bsz, G, N), self.D.float(), dt_bias=self.dt_bias.float(),
            dt_softplus=True,
        )  # fmt: skip
        return self.out_proj(self.norm(y.reshape(Bsz, d_inner), z)), (conv, ssm)


class RecurrentState:
    """A layer's state between decoding steps (Mamba: the conv window and the SSM state)."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def advance(self, new: tuple[torch.Tensor, ...], keep: torch.Tensor | None) -> None:
        """Take the new state, except in the rows where ``keep`` (B,) is False (padding)."""
        if keep is not None:
            new = tuple(
                torch.where(keep.view(-1, *[1] * (n.dim() - 1)), n, old)
                for n, old in zip(new, self.tensors)
            )
        self.tensors = new


def reversal_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) index reversing each row's real tokens, leaving its right padding in place:
    t -> len_b - 1 - t for t < len_b, t otherwise. It is its own inverse."""
    B, T = input_ids.shape
    t = torch.arange(T, device=input_ids.device).expand(B, T)
    if attention_mask is None:
        return T - 1 - t
    lengths = attention_mask.long().sum(dim=1, keepdim=True)  # (B, 1)
    return torch.where(t < lengths, lengths - 1 - t, t)


def reverse_real_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, T, D) gathered along T by a ``reversal_index``; applying it twice is the identity."""
    return x.gather(1, index[..., None].expand_as(x))


class MambaBlock(nn.Module):
    """One layer (B, T, D) -> (B, T, D): causal, or bidirectional of either kind (MambaConfig).

    The forward direction's modules are ``mixer_norm``, ``mixer``, ``mlp_norm``, ``mlp`` (the MLP
    pair is None when d_ff = 0); bidirectional layers add ``mixer_rev`` and, per_direction, the
    reverse block's ``mixer_norm_rev``, ``mlp_norm_rev``, ``mlp_rev``.
    """

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        mixer_cls = MambaMixer if cfg.ssm_layer == "mamba" else Mamba2Mixer
        self.strategy = cfg.bidirectional_strategy
        self.per_direction = cfg.bidirectional and cfg.bidirectional_mlp == "per_direction"
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer_cls(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.d_ff else None
        self.mlp = MLP(cfg) if cfg.d_ff else None
        self.mixer_rev = mixer_cls(cfg) if cfg.bidirectional else None
        if self.mixer_rev is not None and cfg.bidirectional_weight_tie:
            self.mixer_rev.in_proj.weight = self.mixer.in_proj.weight
            self.mixer_rev.out_proj.weight = self.mixer.out_proj.weight
        if self.per_direction:
            self.mixer_norm_rev = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp_norm_rev = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.d_ff else None
            self.mlp_rev = MLP(cfg) if cfg.d_ff else None
        self.drop = nn.Dropout(cfg.dropout)

    def _combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b if self.strategy == "add" else a * b

    def _update(
        self,
        x: torch.Tensor,
        mixer_norm: RMSNorm,
        mixer: nn.Module,
        mlp_norm: RMSNorm | None,
        mlp: MLP | None,
    ) -> torch.Tensor:
        """What the pre-norm block (mixer_norm, mixer, mlp_norm, mlp) adds to x: block(x) - x."""
        delta = self.drop(mixer(mixer_norm(x)))  # (B, T, D)
        if mlp is not None:
            delta = delta + mlp(mlp_norm(x + delta))
        return delta

    def forward(self, x: torch.Tensor, rev_index: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D); rev_index: (B, T) from ``reversal_index`` (bidirectional only)."""
        if self.per_direction:
            delta_f = self._update(x, self.mixer_norm, self.mixer, self.mlp_norm, self.mlp)
            x_rev = reverse_real_tokens(x, rev_index)  # reversed real tokens, padding in place
            delta_r = self._update(
                x_rev, self.mixer_norm_rev, self.mixer_rev, self.mlp_norm_rev, self.mlp_rev
            )
            return x + self._combine(delta_f, reverse_real_tokens(delta_r, rev_index))
        if self.mixer_rev is None:
            return x + self._update(x, self.mixer_norm, self.mixer, self.mlp_norm, self.mlp)
        # Shared MLP: the two mixers read one normalised input and make one residual update.
        h = self.mixer_norm(x)
        y_rev = reverse_real_tokens(self.mixer_rev(reverse_real_tokens(h, rev_index)), rev_index)
        x = x + self.drop(self._combine(self.mixer(h), y_rev))
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x

    def allocate(self, batch_size: int, max_len: int, device: torch.device) -> RecurrentState:
        return self.mixer.allocate(batch_size, device)

    def decode(self, x: torch.Tensor, state: RecurrentState, step: Step) -> torch.Tensor:
        """x: (B, T, D) after the cached tokens, one token at a time (a causal block)."""
        out = []
        for t in range(x.shape[1]):
            xt = x[:, t]  # (B, D)
            delta, new = self.mixer.step(self.mixer_norm(xt), state)
            delta = self.drop(delta)
            if self.mlp is not None:
                delta = delta + self.mlp(self.mlp_norm(xt + delta))
            state.advance(new, None if step.valid is None else step.valid[:, t])
            out.append(xt + delta)
        return torch.stack(out, dim=1)  # (B, T, D)


class Mamba(Backbone):
    """Mamba backbone: ``forward(input_ids, attention_mask, position_ids) -> hidden (B, T, D)``
    (``common.Backbone``): MambaBlocks and a final RMSNorm. The LM head (``lm_head``) is applied by
    the caller."""

    def __init__(self, cfg: MambaConfig):
        check_scan_impl(cfg.scan_impl, cfg.ssm_layer)  # refuses a missing mamba-ssm; logs the path
        super().__init__(cfg, MambaBlock, norm_f=RMSNorm(cfg.d_model, cfg.norm_eps))

    def init_weights(self, cfg: ModelConfig) -> None:
        """``common.init_weights``, then Mamba's own init of the SSM parameters in every mixer."""
        init_weights(self, cfg)
        for module in self.modules():
            if isinstance(module, (MambaMixer, Mamba2Mixer)):
                module.reset_ssm_parameters()

    def block_inputs(self, x: torch.Tensor, tokens: Tokens) -> tuple[torch.Tensor | None]:
        """The ``reversal_index`` (B, T) of bidirectional layers (right padding stays), or None."""
        if not self.cfg.bidirectional:
            return (None,)
        return (reversal_index(tokens.input_ids, tokens.attention_mask),)
