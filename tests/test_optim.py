import pytest
import torch
import torch.nn as nn

from helm.ema import ModelEma
from helm.models.common import tag
from helm.optim import (
    OPTIMIZERS,
    Lamb,
    build_optimizer,
    clip_gradients,
    layer_id,
    param_groups,
    scaled_lr,
)


class Tiny(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.embed = nn.Module()
        self.embed.tok = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(layers))
        self.filter = tag(nn.Parameter(torch.randn(4, 4)), no_weight_decay=True, lr_scale=0.1, weight_decay=0.0)
        self.head = nn.Linear(4, 10, bias=False)

    def forward(self, x):
        h = self.embed.tok(x) @ self.filter
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _opt_kw(**kw):
    return dict(opt="adamw", weight_decay=0.1, layer_decay=None, momentum=0.9, eps=None, betas=None) | kw


def test_weight_decay_groups():
    m = Tiny()
    groups = param_groups(m, weight_decay=0.1)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["blocks.0.0.weight"]["weight_decay"] == 0.1
    assert by_name["blocks.0.0.bias"]["weight_decay"] == 0.0  # bias
    assert by_name["blocks.0.1.weight"]["weight_decay"] == 0.0  # norm
    assert by_name["filter"]["weight_decay"] == 0.0 and by_name["filter"]["lr_scale"] == 0.1  # hints
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_layer_decay_scales():
    m = Tiny(layers=3)
    assert layer_id("embed.tok.weight", 3) == 0 and layer_id("blocks.2.0.weight", 3) == 3
    assert layer_id("head.weight", 3) == 4
    groups = param_groups(m, 0.1, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["lr_scale"] == 1.0
    assert by_name["blocks.2.0.weight"]["lr_scale"] == 0.5
    assert by_name["blocks.0.0.weight"]["lr_scale"] == 0.5**3
    assert by_name["embed.tok.weight"]["lr_scale"] == 0.5**4


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_a_loss(name):
    torch.manual_seed(0)
    m = Tiny()
    opt = build_optimizer(m, **_opt_kw(opt=name), lr=1e-2 if name != "sgd" else 1e-1)
    x = torch.randint(0, 10, (8, 5))
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], name


def test_optimizer_flag_errors():
    with pytest.raises(ValueError, match="--opt-betas does not apply"):
        build_optimizer(Tiny(), **_opt_kw(opt="sgd", betas=[0.9, 0.99]), lr=0.1)
    with pytest.raises(ValueError, match="two values"):
        build_optimizer(Tiny(), **_opt_kw(betas=[0.9]), lr=0.1)
    opt = build_optimizer(Tiny(), **_opt_kw(betas=[0.8, 0.95], eps=1e-7), lr=0.1)
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-7


def test_lamb_trust_ratio():
    p = nn.Parameter(torch.full((4,), 2.0))
    opt = Lamb([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.tensor([1.0, -1.0, 1.0, -1.0])
    opt.step()
    # First Adam step: update = g / (|g| + eps) ~ sign(g); trust = ||w|| / ||update|| = 4 / 2 = 2.
    assert torch.allclose(p.detach(), 2.0 - 0.1 * 2 * torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-4)


def test_scaled_lr():
    assert scaled_lr(lr=0.5, global_batch=1024) == 0.5
    assert scaled_lr(opt="sgd", lr_base=0.1, global_batch=512) == pytest.approx(0.2)  # linear
    assert scaled_lr(opt="adamw", lr_base=1e-3, global_batch=1024) == pytest.approx(2e-3)  # sqrt
    assert scaled_lr(opt="adamw", lr_base=1e-3, lr_base_scale="linear", global_batch=1024) == pytest.approx(4e-3)


def test_clip_modes():
    p = nn.Parameter(torch.ones(3, 4))
    p.grad = torch.full((3, 4), 10.0)
    total = clip_gradients([p], "norm", 1.0)
    assert total == pytest.approx(10.0 * 12**0.5) and p.grad.norm() == pytest.approx(1.0, rel=1e-4)
    p.grad = torch.full((3, 4), 10.0)
    clip_gradients([p], "value", 0.5)
    assert p.grad.max() == 0.5
    p.grad = torch.full((3, 4), 10.0)
    clip_gradients([p], "agc", 0.01)
    # Each row: ||g|| <= 0.01 * ||w_row|| = 0.01 * 2.
    assert torch.all(p.grad.norm(dim=1) <= 0.02 + 1e-6)
    with pytest.raises(ValueError):
        clip_gradients([p], "bogus", 1.0)


def test_ema_update_rule_and_buffers():
    m = nn.BatchNorm1d(3)
    ema = ModelEma(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(2.0)
        m.running_mean.fill_(5.0)
        m.num_batches_tracked.fill_(7)
    ema.update(m)
    assert torch.allclose(ema.module.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    assert torch.allclose(ema.module.running_mean, torch.full((3,), 0.9 * 0.0 + 0.1 * 5.0))
    assert ema.module.num_batches_tracked.item() == 7  # integers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    cpu = ModelEma(m, decay=0.5, device="cpu")
    assert next(cpu.module.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="model-ema-decay"):
        ModelEma(m, decay=1.0)
