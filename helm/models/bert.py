"""BERT: the original post-LN transformer encoder, bidirectional by default (MLM).

Block (Devlin et al. 2019, as in Vaswani et al. 2017):
    x = LN(x + Dropout(Attn(x)))
    x = LN(x + Dropout(MLP(x)))
The embeddings (token + position) go through BERT's own LayerNorm and dropout before the first
block. Every block already ends in a LayerNorm, so the final norm ``norm_f`` is the identity: a
second LayerNorm after the last block would only add parameters. There is no segment (token type)
embedding: every input is one sequence.

Attention is the same module as GPT-2's (``helm.models.gpt2.SelfAttention``, SDPA with a key-padding
mask). ``bidirectional=False`` is allowed and gives a causal post-LN encoder (a post-LN decoder-only
model), e.g. to compare the block types under the same CLM objective.

Init: N(0, init_std) weights and zero biases as in BERT; unlike GPT-2 the residual output
projections are not scaled down with depth (post-LN renormalises the residual stream after every
sub-layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from helm.models.common import (
    MLP,
    Embeddings,
    LMHead,
    ModelConfig,
    init_weights,
    positions_like,
)
from helm.models.gpt2 import SelfAttention, check_attention_config, sdpa_mask


@dataclass
class BertConfig(ModelConfig):
    """BERT options: all of ``ModelConfig``, bidirectional by default."""

    bidirectional: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_attention_config(self)


class BertBlock(nn.Module):
    """Post-LN encoder block: ``LN(x + Attn(x))`` then ``LN(x + MLP(x))`` (dropout inside both)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)  # ends in Dropout(proj(...))
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)  # ends in Dropout(fc_out(...))
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, mask, is_causal, position_ids))
        return self.ln_2(x + self.mlp(x))


class Bert(nn.Module):
    """BERT backbone: ``forward(input_ids, attention_mask, position_ids) -> hidden (B, T, D)``.

    The LM head (``self.lm_head``) is not applied here: MLM projects only the masked positions.
    """

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.embed_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(BertBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_f = nn.Identity()  # every block ends in a LayerNorm already
        self.lm_head = LMHead(cfg, self.embed.tok)
        self.init_weights(cfg)

    def init_weights(self, cfg: ModelConfig) -> None:
        """BERT init: ``common.init_weights`` without the depth scaling of residual projections."""
        for module in self.modules():
            if getattr(module, "_residual_proj", False):
                module._residual_proj = False
        init_weights(self, cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask (1 = real, 0 = pad), position_ids: (B, T) -> (B, T, D)."""
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = positions_like(input_ids)
        mask, is_causal = sdpa_mask(attention_mask, T, causal=not self.cfg.bidirectional)
        x = self.drop(self.embed_norm(self.embed(input_ids, position_ids)))  # (B, T, D)
        for block in self.blocks:
            x = block(x, mask, is_causal, position_ids)
        return self.norm_f(x)
