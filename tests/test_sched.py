import json
import math
from pathlib import Path

import pytest
import torch

from helm.sched import LRScheduler, Schedule, build_scheduler


def cos_lr(lr_min, lr_max, t, T, k=1.0):
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t**k / T**k))


def test_cosine_with_warmup_hand_values():
    s = Schedule("cosine", base_lr=1.0, t_initial=10, lr_min=0.1, warmup_t=2, warmup_lr=0.0)
    assert s(0) == pytest.approx(0.0)
    assert s(1) == pytest.approx(0.5)
    # Without a warmup prefix the cosine clock includes the warmup steps.
    assert s(2) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.2)))
    assert s(5) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert s(10) == pytest.approx(0.1)  # past the only cycle: the floor
    assert s(37) == pytest.approx(0.1)


def test_warmup_prefix_shifts_the_clock():
    s = Schedule("cosine", base_lr=1.0, t_initial=10, lr_min=0.0, warmup_t=2, warmup_prefix=True)
    assert s(2) == pytest.approx(1.0)
    assert s(7) == pytest.approx(0.5)
    assert s.cycle_length() == 12


def test_cycles_grow_and_decay():
    s = Schedule(
        "cosine",
        base_lr=1.0,
        t_initial=4,
        lr_min=0.0,
        cycle_mul=2.0,
        cycle_decay=0.5,
        cycle_limit=3,
    )
    # t=5: second cycle (length 8, starts at 4), lr_max halved.
    assert s(5) == pytest.approx(cos_lr(0.0, 0.5, 1, 8))
    assert s(4) == pytest.approx(0.5)  # restart
    assert s(12) == pytest.approx(0.25)  # third cycle starts at 4 + 8
    assert s.cycle_length() == 4 + 8 + 16
    assert s(28) == 0.0


def test_equal_cycles_restart():
    s = Schedule("cosine", base_lr=2.0, t_initial=5, lr_min=0.0, cycle_limit=2, cycle_decay=1.0)
    assert s(5) == pytest.approx(2.0) and s(7) == pytest.approx(cos_lr(0, 2.0, 2, 5))
    assert s(10) == 0.0


def test_k_decay():
    s = Schedule("cosine", base_lr=1.0, t_initial=10, lr_min=0.0, k_decay=2.0)
    assert s(3) == pytest.approx(cos_lr(0.0, 1.0, 3, 10, k=2.0))


def test_step_multistep_poly_tanh_constant():
    assert Schedule("step", 1.0, 10, decay_t=3, decay_rate=0.5)(7) == pytest.approx(0.25)
    ms = Schedule("multistep", 1.0, 10, milestones=[3, 6], decay_rate=0.1)
    # timm counts a milestone one step early (bisect_right(milestones, t + 1)).
    assert [ms(t) for t in (0, 1, 2, 5, 6)] == pytest.approx([1.0, 1.0, 0.1, 0.01, 0.01])
    poly = Schedule("poly", 1.0, 10, lr_min=0.0, decay_rate=2.0)
    assert poly(4) == pytest.approx((1 - 0.4) ** 2)
    tanh = Schedule("tanh", 1.0, 10, lr_min=0.0)
    assert tanh(5) == pytest.approx(0.5 * (1 - math.tanh(-7 * 0.5 + 3 * 0.5)))
    assert Schedule("constant", 0.3, 10, warmup_t=2, warmup_lr=0.1)(1) == pytest.approx(0.2)
    assert Schedule("constant", 0.3, 10, warmup_t=2, warmup_lr=0.1)(9) == pytest.approx(0.3)


def test_noise_is_deterministic_bounded_and_windowed():
    s = Schedule("constant", 1.0, 100, noise_range=(10, 20), noise_pct=0.3, noise_seed=1)
    assert s(5) == 1.0 and s(20) == 1.0
    inside = [s(t) for t in range(10, 20)]
    assert all(abs(v - 1.0) < 0.3 for v in inside)
    assert len(set(inside)) > 1
    assert inside == [s(t) for t in range(10, 20)]  # a pure function of t
    wider = Schedule(
        "constant", 1.0, 100, noise_range=(10, 20), noise_pct=0.3, noise_seed=1, noise_std=0.01
    )
    assert all(abs(wider(t) - 1.0) < 0.05 for t in range(10, 20))  # --lr-noise-std is real


def _opt(scales=(1.0, 0.5)):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in scales]
    return torch.optim.SGD([{"params": [p], "lr_scale": s} for p, s in zip(params, scales)], lr=1.0)


def test_scheduler_sets_group_lrs_with_scale_and_respects_step_kind():
    opt = _opt()
    sched = LRScheduler(opt, Schedule("step", 1.0, 10, decay_t=1, decay_rate=0.5), on_updates=True)
    sched.step(epoch=3)  # epoch steps are ignored when stepping on updates
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    sched.step_update(2)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.125]


def test_plateau_reduces_after_patience():
    opt = _opt((1.0,))
    sched = LRScheduler(
        opt, Schedule("plateau", 1.0, 10, decay_rate=0.1), on_updates=False, patience=2
    )
    lrs = []
    for epoch, metric in enumerate([5.0, 4.0, 4.0, 4.0, 4.0, 3.0], start=1):
        sched.step(epoch, metric)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.1, 0.1])
    state = sched.state_dict()
    fresh = LRScheduler(
        _opt((1.0,)), Schedule("plateau", 1.0, 10, decay_rate=0.1), on_updates=False, patience=2
    )
    fresh.load_state_dict(state)
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def _sched_kw(**kw):
    base = dict(
        sched="cosine",
        on_updates=True,
        epochs=4,
        min_lr=0.0,
        warmup_epochs=1,
        warmup_lr=0.0,
        warmup_prefix=False,
        cycle_mul=1.0,
        cycle_decay=0.5,
        cycle_limit=1,
        k_decay=1.0,
        decay_epochs=2,
        decay_milestones=[2],
        decay_rate=0.1,
        noise=None,
        noise_pct=0.67,
        noise_std=1.0,
        seed=0,
        plateau_mode="min",
        patience_epochs=2,
        cooldown_epochs=0,
    )
    return base | kw


def test_build_scheduler_counts_in_updates():
    opt = _opt((1.0,))
    sched, epochs = build_scheduler(opt, **_sched_kw(), base_lr=1.0, updates_per_epoch=10)
    assert epochs == 4
    assert sched.schedule.warmup_t == 10 and sched.schedule.t_initial == 40
    sched.step_update(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    _, epochs = build_scheduler(
        _opt((1.0,)), **_sched_kw(cooldown_epochs=2), base_lr=1.0, updates_per_epoch=10
    )
    assert epochs == 6
    _, epochs = build_scheduler(
        _opt((1.0,)), **_sched_kw(cycle_limit=2, cycle_mul=2.0), base_lr=1.0, updates_per_epoch=10
    )
    assert epochs == 4 + 8
    sched, _ = build_scheduler(
        _opt((1.0,)), **_sched_kw(noise=[0.5, 0.75]), base_lr=1.0, updates_per_epoch=10
    )
    assert sched.schedule.noise_range == (20, 30)


def test_plateau_on_updates_is_refused():
    with pytest.raises(ValueError, match="plateau"):
        build_scheduler(
            _opt((1.0,)), **_sched_kw(sched="plateau"), base_lr=1.0, updates_per_epoch=10
        )


# timm fixtures (tests/golden/make_timm_golden.py) ------------------------------------------------

GOLDEN = json.loads((Path(__file__).parent / "golden" / "timm.json").read_text())


def _replay(case: dict) -> tuple[int, list[list[float]]]:
    """HELM's scheduler driven as timm's train.py drives timm's (the script's loop)."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in GOLDEN["lr_scales"]]
    opt = torch.optim.SGD(
        [{"params": [p], "lr_scale": s} for p, s in zip(params, GOLDEN["lr_scales"])], lr=1.0
    )
    kw = {k: v for k, v in case.items() if k != "name"}
    upe = GOLDEN["updates_per_epoch"]
    sched, num_epochs = build_scheduler(opt, base_lr=GOLDEN["base_lr"], updates_per_epoch=upe, **kw)
    lrs = [[g["lr"] for g in opt.param_groups]]
    metrics = GOLDEN["metrics"]
    for epoch in range(int(num_epochs) + 2):
        for u in range(upe):
            sched.step_update(epoch * upe + u + 1)
            if case["on_updates"]:
                lrs.append([g["lr"] for g in opt.param_groups])
        metric = metrics[epoch % len(metrics)] if case["sched"] == "plateau" else None
        sched.step(epoch + 1, metric)
        if not case["on_updates"]:
            lrs.append([g["lr"] for g in opt.param_groups])
    return num_epochs, lrs


@pytest.mark.parametrize("golden", GOLDEN["schedules"], ids=lambda g: g["case"]["name"])
def test_schedule_matches_timm(golden):
    num_epochs, lrs = _replay(golden["case"])
    assert num_epochs == golden["num_epochs"]
    assert len(lrs) == len(golden["lrs"])
    for i, (got, want) in enumerate(zip(lrs, golden["lrs"])):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), f"step {i}"


def test_fixtures_cover_every_schedule_and_family():
    from helm.sched import SCHEDULES

    names = [g["case"]["name"] for g in GOLDEN["schedules"]]
    assert {n.split("/")[0] for n in names} == set(SCHEDULES)
    families = {n.split("/")[1] for n in names}
    assert {"warmup", "warmup_prefix", "cooldown", "cycles", "cycles_mul", "k_decay"} <= families
    assert {"noise_window", "noise_from"} <= families
    assert GOLDEN["timm_version"]


def test_plateau_decay_rate_must_shrink_the_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for rate in (1.0, 2.0, 0.0):
        with pytest.raises(ValueError, match="--decay-rate"):
            build_scheduler(opt, base_lr=0.1, updates_per_epoch=1, epochs=5, sched="plateau",
                            decay_rate=rate)  # fmt: skip


def test_cooldown_needs_a_cycle_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="--cooldown-epochs"):
        build_scheduler(opt, base_lr=0.1, updates_per_epoch=1, epochs=5, sched="step",
                        cooldown_epochs=2)  # fmt: skip


@pytest.mark.parametrize("on_updates", [False, True])
@pytest.mark.parametrize("sched", ["cosine", "step", "tanh"])
def test_start_epoch_moves_the_schedule(sched, on_updates):
    """--start-epoch N: start_at(N) gives the lr an uninterrupted run has at epoch N's start, and
    the updates after it continue that run's lrs (warmup not restarted, no warmup-lr epoch)."""
    upe, N = 4, 3
    kw = dict(base_lr=0.1, updates_per_epoch=upe, epochs=8, sched=sched, on_updates=on_updates,
              warmup_epochs=2, warmup_lr=1e-8, decay_epochs=2)  # fmt: skip

    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, build_scheduler(opt, **kw)[0]

    opt_a, full = make()
    lrs_a = []
    for epoch in range(6):
        for u in range(upe):
            lrs_a.append(opt_a.param_groups[0]["lr"])
            full.step_update(epoch * upe + u + 1)
        full.step(epoch + 1)
    opt_b, resumed = make()
    resumed.start_at(N, upe)
    lrs_b = []
    for epoch in range(N, 6):
        for u in range(upe):
            lrs_b.append(opt_b.param_groups[0]["lr"])
            resumed.step_update(epoch * upe + u + 1)
        resumed.step(epoch + 1)
    assert lrs_b == pytest.approx(lrs_a[N * upe :], rel=1e-12)
    assert lrs_b[0] > 1e-3  # not the warmup lr
