"""Write tests/golden/timm.json: learning rates, optimizer steps and EMA decays computed by timm.

Run from the repository root with timm installed (``pip install timm``):
``python tests/golden/make_timm_golden.py``. ``tests/test_sched.py``, ``tests/test_optim.py`` and the
EMA tests replay every case with HELM's ``build_scheduler`` / ``build_optimizer`` / ``ModelEma`` and
compare. The cases are defined here and stored with the results, so the tests need nothing else.

timm's schedulers and optimizers do not use torchvision; where torchvision cannot be installed
next to the torch in use, the script stubs it out so that ``import timm`` succeeds.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import math
import sys
import types
import warnings
from pathlib import Path

import torch

OUT = Path(__file__).with_name("timm.json")
BASE_LR, SCALES = 0.1, (1.0, 0.5)  # two parameter groups: lr_scale 1 and 0.5
EPOCHS, UPDATES = 6, 3
METRICS = [1.0, 0.9, 0.9, 0.95, 0.9, 0.85, 0.85, 0.86, 0.9, 0.9, 0.9, 0.9, 0.9]  # plateau input


def _import_timm():
    try:
        import torchvision  # noqa: F401
    except ImportError:

        class _Meta(type):
            def __getattr__(cls, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return _Meta(name, (), {})

        class _Stub(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return _Meta(name, (), {})

        class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                if name == "torchvision" or name.startswith("torchvision."):
                    return importlib.machinery.ModuleSpec(name, self, is_package=True)
                return None

            def create_module(self, spec):
                module = _Stub(spec.name)
                module.__path__ = []
                return module

            def exec_module(self, module):
                pass

        sys.meta_path.insert(0, _Finder())
    import timm

    return timm


def sched_cases() -> list[dict]:
    """Keyword sets of helm.sched.build_scheduler (less optimizer, base_lr, updates_per_epoch)."""
    common = dict(epochs=EPOCHS, min_lr=0.01, warmup_lr=0.001, decay_rate=0.5)
    per_sched = {
        "cosine": {},
        "tanh": {},
        "poly": {},
        "step": dict(decay_epochs=2),
        "multistep": dict(decay_milestones=[2, 4]),
        "constant": {},
        "plateau": dict(patience_epochs=1),
    }
    families = {
        "base": {},
        "warmup": dict(warmup_epochs=2),
        "warmup_prefix": dict(warmup_epochs=2, warmup_prefix=True),
        "warmup_frac": dict(warmup_epochs=1.5),
        "cooldown": dict(cooldown_epochs=2),
        "cycles": dict(cycle_limit=3, cycle_decay=0.5),
        "cycles_mul": dict(cycle_limit=3, cycle_mul=1.5, cycle_decay=0.7),
        "k_decay": dict(k_decay=2.0),
        "noise_window": dict(noise=[0.0, 0.7], noise_pct=0.5, noise_std=0.8, seed=3),
        "noise_from": dict(noise=[0.3], warmup_epochs=2),
        "noise_warmup_prefix": dict(noise=[0.0, 1.0], warmup_epochs=2, warmup_prefix=True),
    }
    cycle = ("cosine", "tanh", "poly")
    cases = []
    for sched, extra in per_sched.items():
        for family, kw in families.items():
            if family in ("cooldown", "cycles", "cycles_mul", "k_decay") and sched not in cycle:
                continue
            if family == "k_decay" and sched == "tanh":
                continue  # timm's tanh has no k-decay
            for on_updates in (False, True):
                if on_updates and sched == "plateau":
                    continue
                if family == "warmup_frac" and not on_updates:
                    continue
                case = dict(sched=sched, on_updates=on_updates, **common, **extra, **kw)
                if sched == "plateau":
                    for mode in ("min", "max"):
                        cases.append(dict(case, plateau_mode=mode, name=f"{sched}/{family}/{mode}"))
                else:
                    cases.append(
                        dict(case, name=f"{sched}/{family}/{'updates' if on_updates else 'epochs'}")
                    )
    return cases


def run_timm_sched(case: dict) -> dict:
    from timm.scheduler import create_scheduler_v2

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in SCALES]
    groups = [{"params": [p], "lr_scale": s} for p, s in zip(params, SCALES)]
    opt = torch.optim.SGD(groups, lr=BASE_LR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched, num_epochs = create_scheduler_v2(
            opt,
            sched=case["sched"],
            num_epochs=case["epochs"],
            decay_epochs=case.get("decay_epochs", 90),
            decay_milestones=case.get("decay_milestones", (90, 180, 270)),
            cooldown_epochs=case.get("cooldown_epochs", 0),
            patience_epochs=case.get("patience_epochs", 10),
            decay_rate=case["decay_rate"],
            min_lr=case["min_lr"],
            warmup_lr=case["warmup_lr"],
            warmup_epochs=case.get("warmup_epochs", 0),
            warmup_prefix=case.get("warmup_prefix", False),
            noise=case.get("noise"),
            noise_pct=case.get("noise_pct", 0.67),
            noise_std=case.get("noise_std", 1.0),
            noise_seed=case.get("seed", 42),
            cycle_mul=case.get("cycle_mul", 1.0),
            cycle_decay=case.get("cycle_decay", 0.5),
            cycle_limit=case.get("cycle_limit", 1),
            k_decay=case.get("k_decay", 1.0),
            plateau_mode=case.get("plateau_mode", "min"),
            step_on_epochs=not case["on_updates"],
            updates_per_epoch=UPDATES,
        )
    lrs = [[g["lr"] for g in opt.param_groups]]  # at construction
    for epoch in range(int(num_epochs) + 2):  # timm's train.py: updates, then step(epoch + 1)
        for u in range(UPDATES):
            sched.step_update(epoch * UPDATES + u + 1)
            if case["on_updates"]:
                lrs.append([g["lr"] for g in opt.param_groups])
        metric = METRICS[epoch % len(METRICS)] if case["sched"] == "plateau" else None
        sched.step(epoch + 1, metric)
        if not case["on_updates"]:
            lrs.append([g["lr"] for g in opt.param_groups])
    return dict(num_epochs=num_epochs, lrs=lrs)


OPTS = ("adamw", "adam", "sgd", "momentum", "nesterov", "rmsprop", "adagrad", "radam", "radamw",
        "nadam", "adafactor", "lamb")  # fmt: skip


def problem() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A tiny fixed least-squares problem: W (20, 18) is large enough for Adafactor to factor it."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 18, generator=g, dtype=torch.float64) * 0.1
    b = torch.randn(18, generator=g, dtype=torch.float64) * 0.1
    x = torch.randn(8, 20, generator=g, dtype=torch.float64)
    y = torch.randn(8, 18, generator=g, dtype=torch.float64)
    return [W, b], x, y


def run_timm_opt(name: str, weight_decay: float, steps: int = 5) -> list[float]:
    from timm.optim import create_optimizer_v2

    (W, b), x, y = problem()
    W, b = torch.nn.Parameter(W), torch.nn.Parameter(b)
    groups = [{"params": [W], "weight_decay": weight_decay}, {"params": [b], "weight_decay": 0.0}]
    opt = create_optimizer_v2(groups, opt=name, lr=0.01, weight_decay=weight_decay, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        ((x @ W + b - y) ** 2).mean().backward()
        opt.step()
    return summary(W.detach(), b.detach())


def summary(W: torch.Tensor, b: torch.Tensor) -> list[float]:
    """What the fixtures keep of the final parameters: a 5 x 5 sample of W, its sum of squares, b."""
    return W[::4, ::4].flatten().tolist() + [W.square().sum().item()] + b.tolist()


def run_timm_ema() -> dict:
    from timm.utils.model_ema import ModelEmaV3

    out = {}
    for warmup in (False, True):
        ema = ModelEmaV3(torch.nn.Linear(2, 2), decay=0.999, use_warmup=warmup)
        out[str(warmup)] = [ema.get_decay(step) for step in range(0, 3000, 7)]
    return out


def main() -> None:
    timm = _import_timm()
    cases = sched_cases()
    sched = [dict(case=c, **run_timm_sched(c)) for c in cases]
    opts = {f"{n}/wd{wd}": run_timm_opt(n, wd) for n in OPTS for wd in (0.0, 0.1)}
    data = dict(
        timm_version=timm.__version__,
        torch_version=torch.__version__,
        base_lr=BASE_LR,
        lr_scales=list(SCALES),
        updates_per_epoch=UPDATES,
        metrics=METRICS,
        schedules=sched,
        optimizers=opts,
        ema_decay=run_timm_ema(),
        ema_steps=list(range(0, 3000, 7)),
    )
    OUT.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(
        f"wrote {OUT} ({len(sched)} schedules, {len(opts)} optimizer runs, timm {timm.__version__})"
    )
    assert not math.isnan(sched[0]["lrs"][0][0])


if __name__ == "__main__":
    main()
