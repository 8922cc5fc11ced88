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

from helm.models.common import MLP, Backbone, Rotary, Tokens, positions_like
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

    def forward(self, x: torch.Tensor, att: Attention) -> torch.Tensor:
        """x: (B, T, D); ``att`` from ``attention_inputs``."""
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, hd)
        if self.rotary is not None:
            q, k = self.rotary(q, k, att.position_ids)
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
