"""Exponential moving average of the model weights (``--model-ema``), as timm's ModelEmaV3.

Created after the model is on its device and before compile/DDP wrap it, from the raw module.
``ema = decay * ema + (1 - decay) * weights`` after every optimizer step; integer buffers are copied.
``--model-ema-force-cpu`` keeps the average on the CPU (saves accelerator memory, costs a copy).

``update(model, step=n)`` with n the number of optimizer updates so far (1 after the first, as timm's
train.py passes it) uses timm ModelEmaV3's ``get_decay``: 0 at n <= 1 (the first update copies the
weights), then ``decay``, or with ``warmup=True`` (``--model-ema-warmup``)
``min(decay, 1 - (1 + (n - 1) / warmup_gamma) ** -warmup_power)``, which starts near 0 and grows
towards ``decay`` so the average forgets the random init quickly. ``update(model)`` without a step
always uses ``decay`` (timm ModelEmaV2).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEma(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9998,
        device: torch.device | str | None = None,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
    ):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--model-ema-decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()  # Backbone.__deepcopy__ keeps optimizer tags
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.device = torch.device(device) if device is not None else None
        if self.device is not None:
            self.module.to(self.device)

    def get_decay(self, step: int | None = None) -> float:
        """The decay of the update after ``step`` optimizer updates (timm ModelEmaV3.get_decay)."""
        if step is None:
            return self.decay
        step = max(0, step - 1)
        if step <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return max(min(1 - (1 + step / self.warmup_gamma) ** -self.warmup_power, self.decay), 0.0)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.get_decay(step)
        ema_state = self.module.state_dict(keep_vars=True)
        updated = set()
        for name, value in model.state_dict().items():
            if id(ema_state[name]) in updated:  # a tied weight (embedding = LM head): once
                continue
            updated.add(id(ema_state[name]))
            target = ema_state[name].detach()
            value = value.detach().to(target.device)
            if target.dtype.is_floating_point:
                target.lerp_(value.to(target.dtype), 1.0 - decay)  # ema + (1-d)(w - ema)
            else:
                target.copy_(value)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
