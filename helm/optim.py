"""Optimizers (``--opt``) with parameter groups for weight decay, layer decay and per-parameter hints.

Weight decay skips parameters tagged ``_no_weight_decay`` (norms, biases, position tables, SSM A/D,
Hyena filters; see helm.models.common.tag) and every 1-D tensor. The padded rows of the token
embedding are initialised to zero and never receive gradient, so decoupled decay leaves them at zero.
``--layer-decay d`` scales the lr of layer i (embeddings 0, blocks 1..L, head L+1) by d^(L+1-i).
``p._optim`` hints (``lr_scale``, ``weight_decay``) override a parameter's group settings.

``--opt`` names mean what they mean in timm (``create_optimizer_v2``; pinned by the fixtures of
tests/golden/make_timm_golden.py). Weight decay is coupled (added to the gradient, L2) for adam, sgd,
momentum, nesterov, rmsprop, adagrad, radam, nadam and lamb, and decoupled (``w -= lr * wd * w``)
for adamw, radamw and adafactor. Defaults as timm: adagrad eps 1e-8, rmsprop alpha 0.9,
sgd/nesterov Nesterov momentum, adafactor timm's (factored second moments for dims > 16, update
clipping at RMS 1, no first moment unless ``--opt-betas``), lamb with the global gradient norm
clipped to 1 and the trust ratio applied to groups with weight decay only.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings (``embed.*`` and BERT's ``embed_norm.*``), i + 1 for ``blocks.i``,
    num_layers + 1 for the final norm and head."""
    if re.search(r"(?:^|\.)embed(?:_norm)?\.", name):
        return 0
    m = _BLOCK.search(name)
    return int(m.group(1)) + 1 if m else num_layers + 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    lr_scale: float = 1.0,
) -> list[dict]:
    """Group parameters by (weight decay, lr scale); each group carries ``lr_scale`` for the
    scheduler (``lr_scale`` here multiplies every group's, e.g. a backbone under a fresh head)."""
    if layer_decay is not None and num_layers is None:
        num_layers = len(getattr(model, "blocks", []))
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hints = getattr(p, "_optim", {})
        # A no-weight-decay tag wins over a hint's weight decay (a filter bias stays undecayed).
        no_decay = getattr(p, "_no_weight_decay", False) or p.ndim <= 1
        wd = 0.0 if no_decay else hints.get("weight_decay", weight_decay)
        scale = lr_scale * hints.get("lr_scale", 1.0)
        if layer_decay is not None:
            scale *= layer_decay ** (num_layers + 1 - layer_id(name, num_layers))
        group = groups.setdefault(
            (wd, scale), {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale}
        )
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(
    params: nn.Module | list[dict],
    *,
    lr: float,
    opt: str = "adamw",
    weight_decay: float = 0.0,
    layer_decay: float | None = None,
    momentum: float = 0.9,
    eps: float | None = None,
    betas: tuple[float, float] | list[float] | None = None,
) -> torch.optim.Optimizer:
    """timm-style optimizer factory; fused AdamW/Adam on CUDA.

    ``params`` is a model (grouped by ``param_groups`` with ``weight_decay`` and ``layer_decay``) or
    groups made with ``param_groups`` already. Each group starts at ``lr * lr_scale``; a scheduler
    sets the lr from then on.
    """
    name = opt.lower()
    if isinstance(params, nn.Module):
        params = param_groups(params, weight_decay, layer_decay)
    groups = []
    for g in params:
        g = {k: v for k, v in g.items() if k != "names"}
        g["lr"] = lr * g.get("lr_scale", 1.0)
        groups.append(g)
    kw: dict = {"lr": lr}
    if eps is not None:
        kw["eps"] = eps
    betas = tuple(betas) if betas else None
    if betas is not None and name not in (
        "adamw", "adam", "radam", "radamw", "nadam", "adafactor", "lamb"
    ):  # fmt: skip
        raise ValueError(f"--opt-betas does not apply to --opt {name}")
    if betas is not None and len(betas) != 2:
        raise ValueError(f"--opt-betas needs two values, got {list(betas)}")
    if betas is not None:
        kw["betas"] = betas
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(groups, fused=on_cuda or None, **kw)
    if name in ("sgd", "nesterov", "momentum"):
        kw.pop("eps", None)
        # timm: sgd and nesterov are Nesterov momentum SGD; momentum is plain momentum SGD.
        return torch.optim.SGD(groups, momentum=momentum, nesterov=name != "momentum", **kw)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, alpha=0.9, momentum=momentum, **kw)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, **({"eps": 1e-8} | kw))
    if name in ("radam", "radamw"):
        return torch.optim.RAdam(groups, decoupled_weight_decay=name == "radamw", **kw)
    if name == "nadam":
        return torch.optim.NAdam(groups, **kw)
    if name == "adafactor":
        return Adafactor(groups, **kw)
    if name == "lamb":
        return Lamb(groups, **kw)
    raise ValueError(f"unknown optimizer --opt {opt!r} (the choices are helm.config.OPTIMIZERS)")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020) as timm's: gradients divided by max(1, global grad norm /
    ``max_grad_norm``), Adam moments, L2 decay added to the update, and in groups with weight decay
    the update rescaled per tensor by the trust ratio ||w|| / ||update|| (1 where either is zero)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
    ):
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        clip = None
        if self.max_grad_norm is not None and grads:
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            clip = (norm / self.max_grad_norm).clamp(min=1.0)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                m, v, t = state["m"], state["v"], state["step"]
                grad = p.grad if clip is None else p.grad / clip
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                update = (m / (1 - b1**t)) / (v.sqrt() / math.sqrt(1 - b2**t) + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm)
                    )
                    update.mul_(trust)
                p.add_(update, alpha=-group["lr"])
        return loss


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) as timm's with a given lr: second moments factored into
    row and column means for tensors whose last two dims exceed ``min_dim_size_to_factor``,
    ``beta2_t = 1 - t ** decay_rate``, the update divided by max(1, RMS(update) / clip_threshold),
    an optional first moment (``betas[0]``), and decay ``w -= lr * weight_decay * w``."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        eps: float = 1e-30,
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        betas: tuple[float, float] | None = None,
        weight_decay: float = 0.0,
        min_dim_size_to_factor: int = 16,
    ):
        beta1 = None if betas is None else betas[0]
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay)  # fmt: skip
        super().__init__(params, defaults)
        self.min_dim = min_dim_size_to_factor

    @staticmethod
    def _rms(t: torch.Tensor) -> torch.Tensor:
        return t.norm(2) / (t.numel() ** 0.5)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float() if p.grad.dtype in (torch.float16, torch.bfloat16) else p.grad
                state = self.state[p]
                factored = grad.ndim >= 2 and min(grad.shape[-2:]) > self.min_dim
                if not state:
                    state["step"] = 0
                    if group["beta1"] is not None:
                        state["exp_avg"] = torch.zeros_like(grad)
                    if factored:
                        state["row"] = grad.new_zeros(grad.shape[:-1])  # mean over columns
                        state["col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                lr = group["lr"]
                beta2t = 1.0 - state["step"] ** group["decay_rate"]
                sq = grad**2 + group["eps"]
                if factored:
                    row, col = state["row"], state["col"]
                    row.lerp_(sq.mean(dim=-1), 1.0 - beta2t)
                    col.lerp_(sq.mean(dim=-2), 1.0 - beta2t)
                    r = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
                    update = r * col.unsqueeze(-2).rsqrt() * grad
                else:
                    state["exp_avg_sq"].lerp_(sq, 1.0 - beta2t)
                    update = state["exp_avg_sq"].rsqrt() * grad
                update.div_((self._rms(update) / group["clip_threshold"]).clamp(min=1.0))
                update.mul_(lr)
                if group["beta1"] is not None:
                    state["exp_avg"].lerp_(update, 1 - group["beta1"])
                    update = state["exp_avg"]
                if group["weight_decay"]:
                    p.add_(p, alpha=-group["weight_decay"] * lr)
                p.add_(-update.to(p.dtype))
        return loss


def scaled_lr(
    *,
    global_batch: int,
    lr: float | None = None,
    lr_base: float = 1e-3,
    lr_base_size: int = 256,
    lr_base_scale: str = "",
    opt: str = "adamw",
) -> float:
    """``lr`` as given, or ``lr_base`` scaled by global batch / ``lr_base_size`` (timm): sqrt
    scaling for adaptive optimizers, linear otherwise, unless ``lr_base_scale`` says."""
    if lr is not None:
        return lr
    mode = lr_base_scale or ("sqrt" if any(k in opt.lower() for k in ("ada", "lamb")) else "linear")
    ratio = global_batch / lr_base_size
    return lr_base * (math.sqrt(ratio) if mode == "sqrt" else ratio)


_HEAD = re.compile(r"(?:^|\.)lm_head\.")


def clip_gradients(params, mode: str, value: float, eps: float = 1e-3) -> torch.Tensor | None:
    """``--clip-mode norm|value|agc``; returns the total grad norm before clipping for norm mode.

    ``params``: a model or an iterable of parameters. Given a model, ``agc`` leaves the LM head's own
    parameters (``lm_head.*``) unclipped, as timm leaves the classifier out; a head tied to the
    token embedding is the embedding's parameter and is clipped as such."""
    if isinstance(params, nn.Module):
        named = params.named_parameters()
        params = [p for n, p in named if not (mode == "agc" and _HEAD.search(n))]
    params = [p for p in params if p.grad is not None]
    if mode == "norm":
        return torch.nn.utils.clip_grad_norm_(params, value)
    if mode == "value":
        torch.nn.utils.clip_grad_value_(params, value)
        return None
    if mode == "agc":
        # Adaptive gradient clipping (Brock et al. 2021): per unit, ||g|| <= value * max(||w||, eps).
        for p in params:
            dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
            w_norm = (
                p.detach().norm(dim=dims, keepdim=True).clamp_min(eps)
                if dims
                else p.detach().norm().clamp_min(eps)
            )
            g_norm = p.grad.norm(dim=dims, keepdim=True) if dims else p.grad.norm()
            max_norm = w_norm * value
            factor = torch.where(
                g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm)
            )
            p.grad.mul_(factor)
        return None
    raise ValueError(f"--clip-mode must be norm, value or agc; got {mode!r}")
