"""Learning-rate schedules with timm's semantics, as pure functions of the step.

``t`` counts epochs, or optimizer updates with ``--sched-on-updates`` (then every epoch-valued flag is
multiplied by the updates per epoch, as in timm's ``create_scheduler_v2``). Warmup is linear from
``--warmup-lr`` over ``warmup_t`` to the lr where the decay takes over (the base lr; for tanh without
``--warmup-prefix`` the tanh value at ``warmup_t``, as timm); with ``--warmup-prefix`` the decay starts
after it, otherwise the decay's clock includes the warmup. Noise (``--lr-noise``) multiplies the lr by
(1 + n) inside its window, n ~ N(0, noise_std) resampled until |n| < noise_pct and seeded by
(seed + t), so the value at t never depends on history; the lr set at construction has no noise, and
plateau adds none during its warmup. Each parameter group gets ``lr * group["lr_scale"]``; plateau's
``--min-lr`` floor applies to each group's lr after its scale (torch's ReduceLROnPlateau, as timm).

Epochs to train (``build_scheduler``'s second value, timm's ``create_scheduler_v2``): cosine, poly and
tanh train their cycles (plus the warmup when prefixed) plus ``--cooldown-epochs``, counted in whole
epochs rounded down; the others train ``--epochs`` (plus the warmup when prefixed). Cooldown only
exists for the cycle schedules: asking for it with another schedule is an error.

``--start-epoch N``: ``LRScheduler.start_at(N, updates_per_epoch)`` sets the lr of epoch N's start
(timm's train.py: ``step(N)``, or ``step_update(N * updates_per_epoch)`` with ``--sched-on-updates``);
the loop then counts updates from ``N * updates_per_epoch``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line reads SCHEDULES without importing torch
    import torch

SCHEDULES = ("cosine", "step", "multistep", "plateau", "poly", "tanh", "constant")


@dataclass
class Schedule:
    kind: str
    base_lr: float
    t_initial: float  # length of the first cycle (cosine/poly/tanh)
    lr_min: float = 0.0
    warmup_t: float = 0
    warmup_lr: float = 0.0
    warmup_prefix: bool = False
    cycle_mul: float = 1.0
    cycle_decay: float = 1.0
    cycle_limit: int = 1
    k_decay: float = 1.0
    decay_t: float = 1.0  # step
    milestones: list[float] = field(default_factory=list)  # multistep
    decay_rate: float = 0.1  # step/multistep/plateau factor; poly power
    noise_range: tuple[float, float] | float | None = None
    noise_pct: float = 0.67
    noise_std: float = 1.0
    noise_seed: int = 42

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"--sched must be one of {', '.join(SCHEDULES)}; got {self.kind!r}")
        if self.kind == "plateau" and not 0.0 < self.decay_rate < 1.0:
            raise ValueError(
                f"--decay-rate must be in (0, 1) for --sched plateau (it multiplies the lr at each "
                f"plateau), got {self.decay_rate}"
            )

    def __call__(self, t: float) -> float:
        """The learning rate at t, noise included (plateau: the lr before any reductions)."""
        return self._noise(self._lr(t), t)

    # timm's _get_lr of each scheduler -------------------------------------------------------
    def _lr(self, t: float) -> float:
        """The lr at t without noise (plateau: before any reductions)."""
        if t < self.warmup_t:
            return self.warmup_lr + t * (self._warmup_target() - self.warmup_lr) / self.warmup_t
        return self._decay(t)

    def _warmup_target(self) -> float:
        # timm's tanh warms up to its own value at warmup_t (unless prefixed); the others to base_lr.
        if self.kind == "tanh" and not self.warmup_prefix:
            return self._decay(self.warmup_t)
        return self.base_lr

    def initial_lr(self) -> float:
        """The lr before the first step: warmup_lr with a warmup, the base lr otherwise (timm)."""
        return self.warmup_lr if self.warmup_t else self.base_lr

    def _decay(self, t: float) -> float:
        if self.warmup_prefix:
            t = t - self.warmup_t
        if self.kind == "constant" or self.kind == "plateau":
            return self.base_lr
        if self.kind == "step":
            return self.base_lr * self.decay_rate ** (t // self.decay_t)
        if self.kind == "multistep":
            # timm counts a milestone as passed one step early: bisect_right(milestones, t + 1).
            return self.base_lr * self.decay_rate ** bisect.bisect_right(self.milestones, t + 1)
        i, t_i, t_curr = self._cycle(t)
        if i >= self.cycle_limit:
            return self.lr_min
        lr_max = self.base_lr * self.cycle_decay**i
        k = self.k_decay
        frac = t_curr**k / t_i**k
        if self.kind == "cosine":
            return self.lr_min + 0.5 * (lr_max - self.lr_min) * (1 + math.cos(math.pi * frac))
        if self.kind == "poly":
            return self.lr_min + (lr_max - self.lr_min) * (1 - frac) ** self.decay_rate
        if self.kind == "tanh":  # timm's lb=-7, ub=3; the plain fraction (no k) as in timm
            tr = t_curr / t_i
            return self.lr_min + 0.5 * (lr_max - self.lr_min) * (
                1 - math.tanh(-7 * (1 - tr) + 3 * tr)
            )
        raise ValueError(f"unknown schedule {self.kind!r}")

    def _cycle(self, t: float) -> tuple[int, float, float]:
        """(cycle index, cycle length, time within the cycle); cycles grow by cycle_mul."""
        if self.cycle_mul != 1:
            i = math.floor(math.log(1 - t / self.t_initial * (1 - self.cycle_mul), self.cycle_mul))
            t_i = self.cycle_mul**i * self.t_initial
            t_curr = t - (1 - self.cycle_mul**i) / (1 - self.cycle_mul) * self.t_initial
        else:
            i = int(t // self.t_initial)
            t_i = self.t_initial
            t_curr = t - self.t_initial * i
        return i, t_i, t_curr

    def noisy(self, t: float) -> bool:
        """Whether t lies in the noise window."""
        if self.noise_range is None:
            return False
        if isinstance(self.noise_range, tuple):
            return self.noise_range[0] <= t < self.noise_range[1]
        return t >= self.noise_range

    def _noise(self, lr: float, t: float) -> float:
        if not self.noisy(t):
            return lr
        import torch  # only noisy schedules draw from torch's generator (timm's noise)

        g = torch.Generator().manual_seed(int(self.noise_seed + t))
        while True:  # resample until inside the percent limit (rarely more than a few draws)
            n = torch.randn(1, generator=g).item() * self.noise_std
            if abs(n) < self.noise_pct:
                return lr * (1 + n)

    def cycle_length(self) -> float:
        """Steps covered by the decay cycles (timm's get_cycle_length), warmup included if prefixed."""
        if self.kind not in ("cosine", "poly", "tanh"):
            return self.t_initial
        cycles = max(1, self.cycle_limit)
        if self.cycle_mul == 1.0:
            t = self.t_initial * cycles
        else:
            t = math.floor(-self.t_initial * (self.cycle_mul**cycles - 1) / (1 - self.cycle_mul))
        return t + self.warmup_t if self.warmup_prefix else t


class LRScheduler:
    """Drives an optimizer from a ``Schedule``: ``step(epoch, metric)`` at epoch ends and
    ``step_update(num_updates)`` after each optimizer update; only the one matching ``on_updates``
    acts. Plateau reduces the lr by ``decay_rate`` after ``patience`` epochs without improvement."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        *,
        on_updates: bool,
        plateau_mode: str = "min",
        patience: int = 10,
        threshold: float = 1e-4,
    ):
        self.optimizer = optimizer
        self.schedule = schedule
        self.on_updates = on_updates
        self.plateau_mode = plateau_mode
        self.patience = patience
        self.threshold = threshold
        self.plateau_scale = 1.0  # product of plateau reductions so far
        self.best: float | None = None
        self.bad_epochs = 0
        self.lr = schedule.initial_lr()  # the lr of a group with lr_scale 1 (for logging)
        self._apply([self.lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups])

    def _apply(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr

    def _set(self, t: float) -> None:
        s = self.schedule
        scales = [g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]
        if s.kind == "plateau" and t > s.warmup_t:
            # ReduceLROnPlateau on each group's lr: lr_k = max(lr_{k-1} * decay_rate, min_lr).
            lrs = [s.base_lr * c * self.plateau_scale for c in scales]
            if self.plateau_scale != 1.0:
                lrs = [max(lr, s.lr_min) for lr in lrs]
            self.lr = s.base_lr * self.plateau_scale
            if self.plateau_scale != 1.0:
                self.lr = max(self.lr, s.lr_min)
            lrs = [s._noise(lr, t) for lr in lrs]
            self.lr = s._noise(self.lr, t)
        elif s.kind == "plateau":  # warmup: no noise
            self.lr = s._lr(t)
            lrs = [self.lr * c for c in scales]
        else:
            self.lr = s(t)
            lrs = [self.lr * c for c in scales]
        self._apply(lrs)

    def start_at(self, epoch: int, updates_per_epoch: int) -> None:
        """Set the lr at which a run resumed or started at ``epoch`` (``--start-epoch``) begins:
        ``step(epoch)``, or ``step_update(epoch * updates_per_epoch)`` on updates (timm's train.py).
        The caller then counts updates from ``epoch * updates_per_epoch``."""
        if epoch > 0:
            if self.on_updates:
                self.step_update(epoch * updates_per_epoch)
            else:
                self.step(epoch)

    def step(self, epoch: int, metric: float | None = None) -> None:
        """Call after finishing epoch ``epoch - 1`` with ``epoch`` the next one (timm's convention)."""
        if (
            self.schedule.kind == "plateau"
            and metric is not None
            and epoch > self.schedule.warmup_t
        ):
            self._plateau(metric)
        if not self.on_updates:
            self._set(epoch)

    def step_update(self, num_updates: int) -> None:
        if self.on_updates:
            self._set(num_updates)

    def _plateau(self, metric: float) -> None:
        # torch's ReduceLROnPlateau rule with a relative threshold, as timm wraps it.
        if self.best is None:
            improved = True
        elif self.plateau_mode == "min":
            improved = metric < self.best * (1 - self.threshold)
        else:
            improved = metric > self.best * (1 + self.threshold)
        if improved:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.plateau_scale *= self.schedule.decay_rate
                self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {
            "plateau_scale": self.plateau_scale,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "lr": self.lr,
            "lrs": [g["lr"] for g in self.optimizer.param_groups],
        }

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale = state["plateau_scale"]
        self.best = state["best"]
        self.bad_epochs = state["bad_epochs"]
        self.lr = state["lr"]
        lrs = state.get("lrs") or [
            self.lr * g.get("lr_scale", 1.0) for g in self.optimizer.param_groups
        ]
        self._apply(lrs)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    base_lr: float,
    updates_per_epoch: int,
    epochs: int,
    sched: str = "cosine",
    on_updates: bool = False,
    min_lr: float = 0.0,
    warmup_epochs: float = 0,
    warmup_lr: float = 0.0,
    warmup_prefix: bool = False,
    cooldown_epochs: int = 0,
    cycle_mul: float = 1.0,
    cycle_decay: float = 0.5,
    cycle_limit: int = 1,
    k_decay: float = 1.0,
    decay_epochs: float = 90,
    decay_milestones: list[int] | tuple[int, ...] = (),
    decay_rate: float = 0.1,
    noise: list[float] | None = None,
    noise_pct: float = 0.67,
    noise_std: float = 1.0,
    seed: int = 42,
    plateau_mode: str = "min",
    patience_epochs: int = 10,
) -> tuple[LRScheduler, int]:
    """timm's create_scheduler_v2: returns the scheduler and the number of epochs to train
    (``epochs``, or the decay cycles for cosine/poly/tanh, plus ``cooldown_epochs``). Every
    epoch-valued argument counts updates when ``on_updates`` (times ``updates_per_epoch``)."""
    if cooldown_epochs and sched not in ("cosine", "poly", "tanh"):
        raise ValueError(
            f"--cooldown-epochs applies to --sched cosine, poly and tanh (after their cycles, at "
            f"--min-lr), not to {sched}"
        )
    if sched == "plateau" and on_updates:
        raise ValueError(
            "--sched plateau reacts to validation metrics once per epoch: drop --sched-on-updates"
        )
    scale = updates_per_epoch if on_updates else 1
    noise_range = None
    if noise:
        ends = [n * epochs * scale for n in noise]
        noise_range = ends[0] if len(ends) == 1 else (ends[0], ends[1])
    schedule = Schedule(
        kind=sched,
        base_lr=base_lr,
        t_initial=epochs * scale,
        lr_min=min_lr,
        warmup_t=warmup_epochs * scale,
        warmup_lr=warmup_lr,
        warmup_prefix=warmup_prefix,
        cycle_mul=cycle_mul,
        cycle_decay=cycle_decay,
        cycle_limit=cycle_limit,
        k_decay=k_decay,
        decay_t=decay_epochs * scale,
        milestones=[m * scale for m in decay_milestones],
        decay_rate=decay_rate,
        noise_range=noise_range,
        noise_pct=noise_pct,
        noise_std=noise_std,
        noise_seed=seed,
    )
    scheduler = LRScheduler(
        optimizer,
        schedule,
        on_updates=on_updates,
        plateau_mode=plateau_mode,
        patience=patience_epochs,
    )
    # timm: cycle schedules train for their cycles (get_cycle_length) and the cooldown, at --min-lr,
    # rounded down to whole epochs; the others for --epochs, plus the warmup when prefixed.
    if sched in ("cosine", "poly", "tanh"):
        return scheduler, int((schedule.cycle_length() + cooldown_epochs * scale) // scale)
    return scheduler, int(math.floor(epochs + (warmup_epochs if warmup_prefix else 0)))
