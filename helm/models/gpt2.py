"""GPT-2: a pre-LN transformer over codon tokens, causal (CLM) or bidirectional (MLM).

Block: ``x = x + Attn(LN(x)); x = x + MLP(LN(x))``, then a final LayerNorm. Attention goes
through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA, a fused kernel
on CPU).
``SelfAttention`` and ``sdpa_mask`` are shared with BERT (``helm.models.bert``).

Masks handed to SDPA (built once per forward by ``sdpa_mask``):
- no ``attention_mask``, causal: ``is_causal=True`` and no mask tensor, the only form the flash
  kernel accepts; the caller passes ``attention_mask=None`` for batches without padding to get it;
- no ``attention_mask``, bidirectional: no mask at all;
- with ``attention_mask``: a boolean (B, 1, T, T) mask, True = may attend, combining key padding
  with the causal triangle. Every query row also sees itself, so rows of padding are never fully
  masked (a fully-masked row is a softmax over nothing: NaN on some kernels). Those rows are padding
  and their outputs are discarded; no real row ever attends to a pad key, so pads cannot leak into
  real positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from helm.models.common import MLP, Backbone, Rotary, Step, Tokens, positions_like
from helm.models.config import GPT2Config, ModelConfig, check_attention_config


def sdpa_mask(
    attention_mask: torch.Tensor | None, T: int, causal: bool
) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for ``F.scaled_dot_product_attention`` (see the module docstring).

    attention_mask: (B, T), 1 = real token, 0 = padding, or None. Returns a boolean (B, 1, T, T)
    mask (True = may attend) or None, and whether to pass ``is_causal=True``.
    """
    if attention_mask is None:
        return None, causal
    device = attention_mask.device
    allowed = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): key padding
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (B, 1, T, T)
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)  # (B, 1, T, T)
    return allowed, False


class Attention(NamedTuple):
    """What every attention block receives, computed once per forward (``attention_inputs``):
    the SDPA mask or None, whether SDPA applies its causal triangle, and the positions (B, T)."""

    mask: torch.Tensor | None
    is_causal: bool
    position_ids: torch.Tensor


def attention_inputs(cfg: ModelConfig, tokens: Tokens) -> Attention:
    """The ``Attention`` of a batch (GPT-2 and BERT)."""
    position_ids = tokens.position_ids
    if position_ids is None:
        position_ids = positions_like(tokens.input_ids)
    T = tokens.input_ids.shape[1]
    mask, is_causal = sdpa_mask(tokens.attention_mask, T, causal=not cfg.bidirectional)
    return Attention(mask, is_causal, position_ids)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional rotary positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_attention_config(cfg)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_model // cfg.num_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj._residual_proj = True
        self.rotary = (
            Rotary(self.head_dim, cfg.max_seq_len) if cfg.pos_embedding == "rotary" else None
        )
        self.attn_dropout = cfg.attn_dropout
        self.drop = nn.Dropout(cfg.dropout)

    def _qkv(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v: 3 x (B, H, T, hd) of x (B, T, D), rotated by position when rotary."""
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, hd)
        if self.rotary is not None:
            q, k = self.rotary(q, k, position_ids)
        return q, k, v

    def forward(self, x: torch.Tensor, att: Attention) -> torch.Tensor:
        """x: (B, T, D); ``att`` from ``attention_inputs``."""
        B, T, D = x.shape
        q, k, v = self._qkv(x, att.position_ids)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=att.mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=att.is_causal,
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.drop(self.proj(y))

    def decode(self, x: torch.Tensor, cache: KVCache, step: Step) -> torch.Tensor:
        """x: (B, T, D) of the tokens after the cached ones; each query attends to its row's keys
        up to its own position (the cache's rows may hold different numbers of tokens)."""
        B, T, D = x.shape
        q, k, v = self._qkv(x, step.positions)
        keys, values = cache.append(k, v, step)  # (B, H, end, hd) each
        mask = None
        if T > 1 or not step.uniform:  # a key is seen by the queries at or after its position
            seen = torch.arange(step.end, device=x.device)  # (end,)
            mask = (seen <= step.positions[:, :, None])[:, None]  # (B, 1, T, end)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, T, hd)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))


class KVCache:
    """One attention layer's keys and values, (B, H, max_len, hd) each, allocated on the first
    ``append`` in the dtype the layer computes in (bf16 under autocast)."""

    def __init__(self, batch_size: int, max_len: int):
        self.batch_size, self.max_len = batch_size, max_len
        self.k = self.v = None

    def append(self, k: torch.Tensor, v: torch.Tensor, step: Step) -> tuple[torch.Tensor, ...]:
        """Store k, v (B, H, T, hd) at ``step.positions``; the keys and values so far."""
        if self.k is None:
            B, H, _, hd = k.shape
            self.k = k.new_zeros(B, H, self.max_len, hd)
            self.v = v.new_zeros(B, H, self.max_len, hd)
        T = k.shape[2]
        if step.uniform:  # every row writes at the same place
            self.k[:, :, step.end - T : step.end] = k
            self.v[:, :, step.end - T : step.end] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            self.k[rows, :, step.positions] = k.transpose(1, 2)  # (B, T, H, hd) by advanced index
            self.v[rows, :, step.positions] = v.transpose(1, 2)
        return self.k[:, :, : step.end], self.v[:, :, : step.end]


class Block(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, att: Attention) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), att)
        return x + self.mlp(self.ln_2(x))

    def allocate(self, batch_size: int, max_len: int, device: torch.device) -> KVCache:
        return KVCache(batch_size, max_len)

    def decode(self, x: torch.Tensor, cache: KVCache, step: Step) -> torch.Tensor:
        x = x + self.attn.decode(self.ln_1(x), cache, step)
        return x + self.mlp(self.ln_2(x))


class AttentionBackbone(Backbone):
    """A backbone of attention blocks: each receives the batch's ``Attention`` (GPT-2, BERT)."""

    def block_inputs(self, x: torch.Tensor, tokens: Tokens) -> tuple[Attention]:
        return (attention_inputs(self.cfg, tokens),)


class GPT2(AttentionBackbone):
    """GPT-2 backbone: ``forward(input_ids, attention_mask, position_ids) -> hidden (B, T, D)``
    (``common.Backbone``): pre-LN blocks, a final LayerNorm and GPT-2's init.

    The LM head (``self.lm_head``) is not applied here: the trainer projects only the positions that
    carry a target.
    """

    def __init__(self, cfg: GPT2Config):
        super().__init__(cfg, Block, norm_f=nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps))
