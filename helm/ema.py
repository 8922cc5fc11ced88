"""Exponential moving average of the model weights (``--model-ema``), as timm's ModelEmaV2.

Created after the model is on its device and before compile/DDP wrap it, from the raw module.
``ema = decay * ema + (1 - decay) * weights`` after every optimizer step; buffers are copied.
``--model-ema-force-cpu`` keeps the average on the CPU (saves accelerator memory, costs a copy).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEma(nn.Module):
    def __init__(
        self, model: nn.Module, decay: float = 0.9998, device: torch.device | str | None = None
    ):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--model-ema-decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.device = torch.device(device) if device is not None else None
        if self.device is not None:
            self.module.to(self.device)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            value = value.detach().to(target.device)
            if target.dtype.is_floating_point:
                target.lerp_(value.to(target.dtype), 1.0 - self.decay)  # ema + (1-d)(w - ema)
            else:
                target.copy_(value)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
