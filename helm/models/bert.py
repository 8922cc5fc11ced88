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

MLM head (``mlm_head``): "transform" (default) is BERT's (HF ``BertForMaskedLM``): dense + GELU +
LayerNorm, then the (tied) projection plus an output bias; "linear" is the bare (tied) projection,
as GPT-2's head. LayerNorms use BERT's eps 1e-12 (``norm_eps``). Checkpoints written before the
head transform existed hold no ``lm_head.dense/norm/bias``: they load with ``mlm_head="linear"``
and ``norm_eps=1e-5`` in their model config.

Init: N(0, init_std) weights and zero biases as in BERT; unlike GPT-2 the residual output
projections are not scaled down with depth (post-LN renormalises the residual stream after every
sub-layer).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from helm.models.common import MLP, init_weights
from helm.models.config import BertConfig, ModelConfig
from helm.models.gpt2 import Attention, AttentionBackbone, SelfAttention


class BertBlock(nn.Module):
    """Post-LN encoder block: ``LN(x + Attn(x))`` then ``LN(x + MLP(x))`` (dropout inside both)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)  # ends in Dropout(proj(...))
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)  # ends in Dropout(fc_out(...))
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, att: Attention) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, att))
        return self.ln_2(x + self.mlp(x))


class Bert(AttentionBackbone):
    """BERT backbone: ``forward(input_ids, attention_mask, position_ids) -> hidden (B, T, D)``
    (``common.Backbone``): LayerNorm on the embeddings, post-LN blocks, no final norm.

    The LM head (``self.lm_head``) is not applied here: MLM projects only the masked positions.
    """

    def __init__(self, cfg: BertConfig):
        super().__init__(
            cfg,
            BertBlock,
            norm_f=nn.Identity(),  # every block ends in a LayerNorm already
            embed_norm=nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
            head_transform=cfg.mlm_head == "transform",
        )

    def init_weights(self, cfg: ModelConfig) -> None:
        """BERT init: ``common.init_weights`` without the depth scaling of residual projections."""
        for module in self.modules():
            if getattr(module, "_residual_proj", False):
                module._residual_proj = False
        init_weights(self, cfg)
