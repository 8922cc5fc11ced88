"""The models' options: one config dataclass per backbone, with the facts each states about itself.

Pure Python (no torch), so that the command line reads the defaults and choices without importing
the models: ``python train.py --help`` and flag errors answer at once. Each model module
(``helm.models.gpt2`` ...) builds its ``nn.Module`` from its config here and re-exports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from helm.ops import IMPLS, SCAN_IMPLS

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu")
POS_EMBEDDINGS = ("none", "absolute", "sincos", "rotary")
POS_EMBEDDING_APPLY = ("add", "concat")


@dataclass
class ModelConfig:
    vocab_size: int = 69
    pad_vocab_size_multiple: int = 8
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.0
    attn_dropout: float = 0.0
    activation: str = "gelu"
    tie_embeddings: bool = True
    pos_embedding: str = "absolute"
    pos_embedding_apply: str = "add"
    pos_embedding_dim: int | None = None  # width of the position part under "concat"
    max_seq_len: int = 1024
    bidirectional: bool = False  # False: causal (CLM); True: every position sees every other (MLM)
    norm_eps: float = 1e-5
    init_std: float = 0.02

    # Facts each model states about itself; the trainer, the command line, eval.py and the tests
    # ask them instead of naming models. ``pos_embedding`` above is the model's default positions.
    # Whether the blocks can be built without an MLP (d_ff == 0).
    allows_no_mlp: ClassVar[bool] = False
    # Whether the blocks mix tokens by attention: rotary positions apply, and the score and value
    # products count towards the FLOPs (``Backbone.flops_per_token``).
    attention: ClassVar[bool] = False
    # The directions the model runs in: causal (CLM) and/or bidirectional (MLM).
    directions: ClassVar[tuple[str, ...]] = ("causal", "bidirectional")
    # Whether a causal model decodes token by token from a cache (``helm.generate``).
    cached_decoding: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("pos_embedding", self.pos_embedding, POS_EMBEDDINGS)
        _check_choice("pos_embedding_apply", self.pos_embedding_apply, POS_EMBEDDING_APPLY)
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_ff < 0:
            raise ValueError(f"d_ff must be >= 0, got {self.d_ff}")
        if self.d_ff == 0 and not self.allows_no_mlp:
            raise ValueError(
                f"d_ff=0 (no MLP) is not supported by {type(self).__name__}; use d_ff >= 1"
            )
        if self.pad_vocab_size_multiple < 1:
            raise ValueError("pad_vocab_size_multiple must be >= 1")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.pos_embedding_apply == "concat":
            if self.pos_embedding not in ("absolute", "sincos"):
                raise ValueError(
                    "pos_embedding_apply=concat needs pos_embedding absolute or sincos, "
                    f"got {self.pos_embedding!r}"
                )
            if not self.pos_embedding_dim or not 0 < self.pos_embedding_dim < self.d_model:
                raise ValueError(
                    "pos_embedding_apply=concat needs 0 < pos_embedding_dim < hidden_size, "
                    f"got pos_embedding_dim={self.pos_embedding_dim}, hidden_size={self.d_model}"
                )

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# GPT-2 and BERT ----------------------------------------------------------------------------------


def check_attention_config(cfg: ModelConfig) -> None:
    """Errors for head counts that cannot split the width (shared by the attention models)."""
    if cfg.d_model % cfg.num_heads:
        raise ValueError(
            f"num_heads={cfg.num_heads} must divide hidden_size={cfg.d_model} "
            f"(each head gets hidden_size / num_heads channels)"
        )
    if cfg.pos_embedding == "rotary" and (cfg.d_model // cfg.num_heads) % 2:
        raise ValueError(
            f"pos_embedding=rotary needs an even head dimension; hidden_size / num_heads = "
            f"{cfg.d_model // cfg.num_heads}"
        )


@dataclass
class GPT2Config(ModelConfig):
    """GPT-2 options: all of ``ModelConfig`` (``bidirectional=False`` is the causal CLM model)."""

    attention = True
    cached_decoding = True  # a key/value cache per layer

    def __post_init__(self) -> None:
        super().__post_init__()
        check_attention_config(self)


MLM_HEADS = ("transform", "linear")


@dataclass
class BertConfig(ModelConfig):
    """BERT options: all of ``ModelConfig``, bidirectional by default, BERT's LayerNorm eps and
    MLM head (``mlm_head``: "transform" | "linear", see ``helm.models.bert``)."""

    attention = True
    bidirectional: bool = True
    norm_eps: float = 1e-12
    mlm_head: str = "transform"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_attention_config(self)
        if self.mlm_head not in MLM_HEADS:
            raise ValueError(
                f"mlm_head must be one of {', '.join(MLM_HEADS)}; got {self.mlm_head!r}"
            )


# Mamba -------------------------------------------------------------------------------------------


SSM_LAYERS = ("mamba", "mamba2")
BIDIRECTIONAL_STRATEGIES = ("add", "ew_multiply")
BIDIRECTIONAL_MLPS = ("per_direction", "shared")


@dataclass
class MambaConfig(ModelConfig):
    """Mamba backbone options on top of ModelConfig; ``d_ff = 0`` builds blocks without an MLP.

    Bidirectional layers (``bidirectional=True``) come in two kinds, ``bidirectional_mlp``:

    - "per_direction" (default): two whole blocks per layer, f (forward) and r (reverse), each
      ``Delta(x) = a + MLP(RMSNorm(x + a))`` with ``a = Mixer(RMSNorm(x))``: the residual update
      that block would add to x. With rev reversing each row's real tokens (its own inverse), the
      layer is the residual map ``y = x + Delta_f(x) + rev(Delta_r(rev(x)))`` ("add"; "ew_multiply"
      multiplies the two updates instead). Equivalently, each direction runs its block on the
      residual stream and the two updates are summed, not the two streams (which would count x
      twice).
    - "shared": one block per layer whose mixer sub-block runs two mixers,
      ``x = x + Mixer_f(h) + rev(Mixer_r(rev(h)))`` with ``h = RMSNorm(x)`` (one norm), followed by
      one MLP sub-block as in a causal layer.

    Parameters per layer (Mamba-1, d = d_model, e = expand * d, R = dt_rank, N = d_state,
    K = d_conv, swiglu MLP of width f; norms have d weights):
    mixer M = 2de + e(K + 1) + e(R + 2N) + (Re + e) + eN + e + ed, MLP F = 2df + 2f + fd + d;
    causal layer = M + F + 2d; per_direction = 2 (M + F + 2d), exactly two causal layers;
    shared = 2M + F + 2d (with d_ff = 0, F and one norm drop from each block). Tying
    (``bidirectional_weight_tie``) removes 3de, the reverse in_proj and out_proj, from either.
    So 20 per_direction layers of width 256 (f = 1024) cost what 40 causal layers cost: 49,099,008
    parameters with the 72-row tied embedding, against 33,314,048 for "shared".
    """

    allows_no_mlp = True  # d_ff = 0: Mamba's original block, a mixer only
    cached_decoding = True  # the recurrence: a conv window and an SSM state per layer

    pos_embedding: str = "none"
    activation: str = "swiglu"  # the block's gated MLP; d_ff = 0: no MLP
    ssm_layer: str = "mamba"  # "mamba" (Mamba-1) | "mamba2" (SSD)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int | str = "auto"  # Mamba-1: "auto" = ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    headdim: int = 64  # Mamba-2: channels per head; must divide d_inner
    ngroups: int = 1  # Mamba-2: groups of heads sharing B and C
    # Tokens per chunk: Mamba-1's PyTorch log-space scan (working memory and fp32 rounding grow
    # linearly with it; the Triton and mamba-ssm kernels ignore it) and Mamba-2's SSD chunk (used by
    # the PyTorch scan and mamba_chunk_scan_combined; the Triton SSD clamps it to 16..64).
    chunk_size: int = 64
    bidirectional_strategy: str = "add"
    bidirectional_weight_tie: bool = False
    bidirectional_mlp: str = "per_direction"  # "per_direction" | "shared": see the docstring
    scan_impl: str = "auto"  # auto | torch | triton | mamba_ssm: see helm.ops.selective_scan

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, choices in (
            ("ssm_layer", self.ssm_layer, SSM_LAYERS),
            ("bidirectional_strategy", self.bidirectional_strategy, BIDIRECTIONAL_STRATEGIES),
            ("bidirectional_mlp", self.bidirectional_mlp, BIDIRECTIONAL_MLPS),
            ("scan_impl", self.scan_impl, SCAN_IMPLS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if self.pos_embedding == "rotary":
            raise ValueError("pos_embedding=rotary applies to attention only; mamba has none")
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        for name in ("d_state", "d_conv", "expand", "dt_rank", "headdim", "ngroups", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.scan_impl in ("auto", "mamba_ssm") and not 2 <= self.d_conv <= 4:
            raise ValueError(
                f"d_conv={self.d_conv}: causal-conv1d's kernel takes 2..4; use scan_impl='torch' or "
                "'triton'"
            )
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.ssm_layer == "mamba2":
            if self.d_inner % self.headdim:
                raise ValueError(f"headdim={self.headdim} must divide d_inner={self.d_inner}")
            nheads = self.d_inner // self.headdim
            if nheads % self.ngroups:
                raise ValueError(f"ngroups={self.ngroups} must divide nheads={nheads}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


# Hyena -------------------------------------------------------------------------------------------


@dataclass
class HyenaConfig(ModelConfig):
    """Hyena options on top of ``ModelConfig``; ``num_heads`` is unused (one operator head)."""

    pos_embedding: str = "none"
    filter_order: int = 64  # width of the implicit filter MLP
    filter_inner_layers: int = 2  # hidden Linear + Sin layers after the first
    filter_emb_dim: int = 33  # positional features: 1 time + (filter_emb_dim - 1) / 2 sin/cos pairs
    filter_sine_freq: float = 1.0  # initial frequency w of the Sin activations (learnable)
    filter_lr_scale: float = 1.0  # filter learning rate as a multiple of the base learning rate
    filter_wd: float = 0.0  # weight decay of the filter MLP
    # The fastest / slowest channel's filter decays to filter_decay_target at this fraction of
    # max_seq_len (safari's ExponentialModulation); the other channels lie in between.
    filter_fast_decay_pct: float = 0.3
    filter_slow_decay_pct: float = 1.5
    filter_decay_target: float = 1e-2
    short_filter_size: int = 3
    fftconv_impl: str = "auto"  # auto | torch | triton (see helm.ops.fftconv)

    # The filter at every lag and the history of the long convolution's inputs (O(t) a step).
    cached_decoding: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pos_embedding == "rotary":
            raise ValueError(
                "pos_embedding=rotary is for attention models; Hyena takes none, absolute or sincos"
            )
        if self.filter_emb_dim < 3 or self.filter_emb_dim % 2 == 0:
            raise ValueError(
                "filter_emb_dim must be odd and >= 3 (time + sin/cos pairs), "
                f"got {self.filter_emb_dim}"
            )
        if self.filter_order < 1 or self.filter_inner_layers < 0:
            raise ValueError("filter_order must be >= 1 and filter_inner_layers >= 0")
        if self.short_filter_size < 1:
            raise ValueError(f"short_filter_size must be >= 1, got {self.short_filter_size}")
        if self.bidirectional and self.short_filter_size % 2 == 0:
            raise ValueError(
                f"a bidirectional (centred) short conv needs an odd short_filter_size, "
                f"got {self.short_filter_size}"
            )
        if not 0 < self.filter_fast_decay_pct <= self.filter_slow_decay_pct:
            raise ValueError("need 0 < filter_fast_decay_pct <= filter_slow_decay_pct")
        if not 0 < self.filter_decay_target < 1:
            raise ValueError("filter_decay_target must be in (0, 1)")
        if self.filter_lr_scale < 0 or self.filter_wd < 0:
            raise ValueError("filter_lr_scale and filter_wd must be >= 0")
        if self.fftconv_impl not in IMPLS:
            raise ValueError(
                f"fftconv_impl must be one of {', '.join(IMPLS)}; got {self.fftconv_impl!r}"
            )
