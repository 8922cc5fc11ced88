"""Pieces every backbone shares: the config, the skeleton (``Backbone``), embeddings, position
encodings, MLP, norms, LM head, init.

Conventions the optimizer and trainer rely on:
- parameter names: ``embed.*`` (layer 0), ``blocks.{i}.*`` (layer i + 1), ``norm_f.*`` / ``lm_head.*``
  (layer num_layers + 1), used by ``--layer-decay``;
- ``p._no_weight_decay = True`` marks parameters excluded from weight decay (norms, biases, position
  tables, SSM A/D, Hyena filters); ``p._optim = {"lr_scale": s, "weight_decay": wd}`` carries per-parameter
  hints (Hyena filter learning rates). Both are set where the parameter is created: see ``tag``.
  ``copy.deepcopy`` of a Parameter drops such attributes, so ``Backbone.__deepcopy__`` copies them
  onto the clone (``copy_tags``): a deep-copied backbone (fine-tuning, EMA) keeps its tags.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from helm.models.config import ModelConfig


def tag(param: nn.Parameter, *, no_weight_decay: bool = False, **optim: float) -> nn.Parameter:
    """Mark a parameter for the optimizer (see module docstring); returns it for inline use."""
    if no_weight_decay:
        param._no_weight_decay = True
    if optim:
        param._optim = dict(optim)
    return param


TAGS = ("_no_weight_decay", "_optim")


def copy_tags(src: nn.Module, dst: nn.Module) -> None:
    """Copy the optimizer tags of ``src``'s parameters onto the same-named parameters of ``dst``
    (a copy of ``src``): ``copy.deepcopy`` builds new Parameters without them."""
    dst_params = dict(dst.named_parameters(remove_duplicate=False))
    for name, p in src.named_parameters(remove_duplicate=False):
        for attr in TAGS:
            if hasattr(p, attr):
                setattr(dst_params[name], attr, copy.deepcopy(getattr(p, attr)))


# Position encodings ---------------------------------------------------------------------------


def sincos_table(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim) fixed sinusoidal table of "Attention is all you need"."""
    pos = torch.arange(num_positions, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table


class Rotary(nn.Module):
    """Rotary position embedding (RoPE) for attention heads: ``apply(q, k, position_ids)``."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: (B, H, T, hd); position_ids: (B, T). Rotates pairs (x_i, x_{i + hd/2})."""
        angles = position_ids[:, None, :, None].float() * self.inv_freq  # (B, 1, T, hd/2)
        cos, sin = angles.cos(), angles.sin()

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.float().chunk(2, dim=-1)
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)

        return rotate(q), rotate(k)


class Embeddings(nn.Module):
    """Token embedding plus the configured position embedding (add or concat). Returns (B, T, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        concat = cfg.pos_embedding_apply == "concat"
        pos_dim = cfg.pos_embedding_dim if concat else cfg.d_model
        tok_dim = cfg.d_model - pos_dim if concat else cfg.d_model
        self.tok = nn.Embedding(cfg.padded_vocab_size, tok_dim)
        self.pos = None
        if cfg.pos_embedding == "absolute":
            self.pos = nn.Embedding(cfg.max_seq_len, pos_dim)
            tag(self.pos.weight, no_weight_decay=True)
        elif cfg.pos_embedding == "sincos":
            self.register_buffer("sincos", sincos_table(cfg.max_seq_len, pos_dim), persistent=False)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.tok(input_ids)  # (B, T, D or D - pos_dim)
        if self.cfg.pos_embedding in ("none", "rotary"):
            return x
        # Positions are checked without a host sync: the length on the host, given positions on the
        # device (an asynchronous assert: a CUDA error at the next sync, a RuntimeError on CPU).
        if position_ids is None:
            if input_ids.shape[1] > self.cfg.max_seq_len:
                raise ValueError(
                    f"{input_ids.shape[1]} positions are beyond max_seq_len={self.cfg.max_seq_len}"
                )
            position_ids = positions_like(input_ids)
        else:
            torch._assert_async(
                (position_ids < self.cfg.max_seq_len).all(), "a position is beyond max_seq_len"
            )
        if self.pos is not None:
            p = self.pos(position_ids)
        else:
            p = self.sincos[position_ids].to(x.dtype)
        return torch.cat([x, p], dim=-1) if self.cfg.pos_embedding_apply == "concat" else x + p


def positions_like(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions 0..T-1 (sequences are left-aligned, padding on the right)."""
    B, T = input_ids.shape
    return torch.arange(T, device=input_ids.device).expand(B, T)


# Feed-forward and norms -----------------------------------------------------------------------


def activate(h: torch.Tensor, name: str) -> torch.Tensor:
    """``name`` of ACTIVATIONS applied to h; ``swiglu`` halves the last dimension: silu(a) * b."""
    if name == "swiglu":
        a, b = h.chunk(2, dim=-1)
        return F.silu(a) * b
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[name](h)


class MLP(nn.Module):
    """d -> d_ff -> d with the chosen activation; ``swiglu`` is the gated SiLU variant (two inputs)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = cfg.activation
        d_in = 2 * cfg.d_ff if self.act == "swiglu" else cfg.d_ff
        self.fc_in = nn.Linear(cfg.d_model, d_in)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.fc_out._residual_proj = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = activate(self.fc_in(x), self.act)  # (B, T, d_ff)
        return self.drop(self.fc_out(h))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = tag(nn.Parameter(torch.ones(dim)), no_weight_decay=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class LMHead(nn.Module):
    """Hidden states -> logits over the padded vocabulary (B, T, V_pad) or (N, V_pad).

    Columns at and beyond ``vocab_size`` are embedding padding: losses and metrics give them no
    probability. Tied heads share the token embedding matrix (when its width is d_model).

    ``transform=True`` is BERT's MLM head (HF ``BertLMPredictionHead``): ``dense`` (d -> d), GELU,
    LayerNorm ``norm``, then the projection plus an output ``bias`` (V_pad,). Otherwise the head is
    the bare projection.
    """

    def __init__(
        self, cfg: ModelConfig, tok_embedding: nn.Embedding | None = None, transform: bool = False
    ):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.dense = self.norm = self.bias = None
        if transform:
            self.dense = nn.Linear(cfg.d_model, cfg.d_model)
            self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
            self.bias = tag(nn.Parameter(torch.zeros(cfg.padded_vocab_size)), no_weight_decay=True)
        self.proj = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            if tok_embedding is None or tok_embedding.weight.shape != self.proj.weight.shape:
                raise ValueError(
                    "tie_embeddings needs a token embedding of width hidden_size; with "
                    "pos_embedding_apply=concat the token part is narrower: use tie_embeddings=false"
                )
            self.proj.weight = tok_embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.dense is None:
            return self.proj(hidden)
        h = self.norm(F.gelu(self.dense(hidden)))  # (..., D)
        return self.proj(h) + self.bias


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """GPT-2 style init: N(0, init_std) weights, zero biases, residual projections (modules flagged
    ``_residual_proj``) scaled by 1/sqrt(2 * num_layers) so the residual stream does not grow with depth.
    Also tags every norm weight and every bias as no-weight-decay, and zeroes padded embedding rows."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            std = cfg.init_std
            if getattr(module, "_residual_proj", False):
                std /= math.sqrt(2 * cfg.num_layers)
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
                tag(module.bias, no_weight_decay=True)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, cfg.init_std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            for p in module.parameters(recurse=False):
                tag(p, no_weight_decay=True)
    # Rows past the vocabulary are padding: zero, never indexed and never given probability, so
    # they receive no gradient and decoupled weight decay keeps them exactly zero.
    for module in model.modules():
        if isinstance(module, Embeddings):
            with torch.no_grad():
                module.tok.weight[cfg.vocab_size :].zero_()


# The skeleton ------------------------------------------------------------------------------------


class Tokens(NamedTuple):
    """A batch's inputs, (B, T) each: ids, padding mask (1 = real, 0 = pad) and positions (None
    when absent)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None


class DecodeCache:
    """What a causal model keeps between decoding steps: one state per block (a key/value cache,
    Mamba's conv and SSM states, Hyena's short-conv window and long-conv history) and how many
    tokens each row holds. Made by ``Backbone.allocate_cache``, advanced by ``Backbone.decode``.

    ``end`` (a Python int, kept on the host so that no step waits for the device) is the longest
    row; rows are appended to in lockstep, so ``lengths`` differ only by their prompts'.
    """

    def __init__(self, layers: list[Any], batch_size: int, max_len: int, device: torch.device):
        self.layers, self.max_len = layers, max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.end = 0
        self.uniform = True  # every row holds ``end`` tokens


class Step(NamedTuple):
    """What every block's ``decode`` receives: the new tokens' positions (B, T), which of them are
    real (B, T) or None for all, the tokens the longest row holds after them, and whether every row
    holds as many (their keys are then a plain slice of the cache)."""

    positions: torch.Tensor
    valid: torch.Tensor | None
    end: int
    uniform: bool


class Backbone(nn.Module):
    """Embeddings -> dropout -> blocks -> final norm, with the LM head beside (not applied).

    ``forward(input_ids, attention_mask=None, position_ids=None) -> hidden (B, T, D)``; the trainer
    applies ``lm_head`` to the positions that carry a target. A model passes its block class (built
    ``num_layers`` times from the config, after the embeddings: that order fixes the seeded init),
    its final norm and, for BERT, a norm of the embeddings; it overrides ``block_inputs`` (what each
    block receives besides the hidden states, computed once per forward) and, when its init differs
    from ``init_weights``, the method ``init_weights``. Parameter names: ``embed.*``, ``blocks.{i}.*``,
    ``norm_f.*``, ``lm_head.*`` (see the module docstring).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        block: Callable[[ModelConfig], nn.Module],
        norm_f: nn.Module,
        embed_norm: nn.Module | None = None,
        head_transform: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.embed_norm = embed_norm
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.num_layers))
        self.norm_f = norm_f
        self.lm_head = LMHead(cfg, self.embed.tok, transform=head_transform)
        self.init_weights(cfg)

    def __deepcopy__(self, memo: dict) -> Backbone:
        """A deep copy that keeps the parameters' optimizer tags (see ``copy_tags``)."""
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        copy_tags(self, clone)
        return clone

    def init_weights(self, cfg: ModelConfig) -> None:
        """GPT-2 init from ``init_weights`` (scaled residual projections, no-decay tags)."""
        init_weights(self, cfg)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token of a ``seq_len``-token sequence, for MFU:
        6 per parameter for the weight matmuls, plus, for attention models (``cfg.attention``),
        12 * layers * d_model * seq_len for the score and value products (PaLM, appendix B).
        Element-wise work (Mamba's scan, Hyena's long convolution, norms) is not counted."""
        weights = 6 * sum(p.numel() for p in self.parameters())
        if not self.cfg.attention:
            return float(weights)
        return float(weights + 12 * self.cfg.num_layers * self.cfg.d_model * seq_len)

    def block_inputs(self, x: torch.Tensor, tokens: Tokens) -> tuple[Any, ...]:
        """The arguments after x of every block call, from the embedded x (B, T, D) and the inputs."""
        return ()

    # Cached decoding (causal models whose config states ``cached_decoding``) -----------------

    def allocate_cache(self, batch_size: int, max_len: int) -> DecodeCache:
        """An empty cache for ``batch_size`` rows of at most ``max_len`` tokens each."""
        if not self.cfg.cached_decoding:
            raise ValueError(
                f"{type(self).__name__} has no cached decoding (it is an encoder model); "
                "generate with --no-cache, which recomputes the sequence for every token"
            )
        if self.cfg.bidirectional:
            raise ValueError("cached decoding is for causal (CLM) models")
        if self.cfg.pos_embedding in ("absolute", "sincos") and max_len > self.cfg.max_seq_len:
            raise ValueError(
                f"{max_len} tokens exceed the model's {self.cfg.max_seq_len} positions"
            )
        device = next(self.parameters()).device
        layers = [block.allocate(batch_size, max_len, device) for block in self.blocks]
        return DecodeCache(layers, batch_size, max_len, device)

    def decode(
        self,
        input_ids: torch.Tensor,
        cache: DecodeCache,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, D) of ``input_ids`` (B, T), the tokens that follow each row's
        cached ones; the cache takes them. Equal to ``forward`` over each whole row at these
        positions. ``attention_mask`` (1 = real) is for a first, right-padded call on an empty
        cache (prompts of different lengths); each row then holds its real tokens only."""
        B, T = input_ids.shape
        if cache.end + T > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} tokens a row; {cache.end + T} asked")
        if attention_mask is not None and cache.end:
            raise ValueError("a padded call (attention_mask) must be the first on a cache")
        positions = cache.lengths[:, None] + torch.arange(T, device=input_ids.device)  # (B, T)
        x = self.embed(input_ids, positions)  # (B, T, D)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        valid = None if attention_mask is None else attention_mask.bool()
        step = Step(positions, valid, cache.end + T, cache.uniform)
        for block, state in zip(self.blocks, cache.layers):
            x = block.decode(x, state, step)
        if valid is None:
            cache.lengths += T
            cache.end += T
        else:  # one sync, on the first call
            counts = valid.sum(1)
            cache.lengths += counts
            cache.end, cache.uniform = int(counts.max()), bool((counts == counts[0]).all())
        return self.norm_f(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask (1 = real, 0 = pad), position_ids: (B, T) -> (B, T, D)."""
        x = self.embed(input_ids, position_ids)  # (B, T, D)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        args = self.block_inputs(x, Tokens(input_ids, attention_mask, position_ids))
        for block in self.blocks:
            x = block(x, *args)
        return self.norm_f(x)
