import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helm.config import OPTIMIZERS
from helm.ema import ModelEma
from helm.models import build_model
from helm.models.common import tag
from helm.optim import (
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
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(layers)
        )
        self.filter = tag(
            nn.Parameter(torch.randn(4, 4)), no_weight_decay=True, lr_scale=0.1, weight_decay=0.0
        )
        self.head = nn.Linear(4, 10, bias=False)

    def forward(self, x):
        h = self.embed.tok(x) @ self.filter
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _opt_kw(**kw):
    return (
        dict(opt="adamw", weight_decay=0.1, layer_decay=None, momentum=0.9, eps=None, betas=None)
        | kw
    )


def test_weight_decay_groups():
    m = Tiny()
    groups = param_groups(m, weight_decay=0.1)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["blocks.0.0.weight"]["weight_decay"] == 0.1
    assert by_name["blocks.0.0.bias"]["weight_decay"] == 0.0  # bias
    assert by_name["blocks.0.1.weight"]["weight_decay"] == 0.0  # norm
    assert (
        by_name["filter"]["weight_decay"] == 0.0 and by_name["filter"]["lr_scale"] == 0.1
    )  # hints
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_tagged_tables_and_filters_are_not_decayed():
    """Position tables and Hyena filters are matrices, tagged where they are created."""
    from helm.models import build_model

    gpt2 = build_model("gpt2", d_model=16, num_layers=1, num_heads=2, pos_embedding="absolute")
    hyena = build_model("hyena", d_model=16, num_layers=1, filter_order=8)
    for model, tagged, decayed in ((gpt2, "embed.pos.weight", "blocks.0.attn.qkv.weight"),
                                   (hyena, "blocks.0.mixer.filter.mlp.0.weight",
                                    "blocks.0.mixer.in_proj.weight")):  # fmt: skip
        by_name = {n: g for g in param_groups(model, weight_decay=0.1) for n in g["names"]}
        assert model.get_parameter(tagged).ndim == 2
        assert by_name[tagged]["weight_decay"] == 0.0 and by_name[decayed]["weight_decay"] == 0.1


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
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    p = nn.Parameter(torch.full((4,), 2.0))
    opt = Lamb([p], lr=0.1, weight_decay=0.0)
    p.grad = sign.clone()
    opt.step()
    # First Adam step: update = g / (|g| + eps) ~ sign(g); without weight decay timm's LAMB does
    # not adapt (trust ratio 1).
    assert torch.allclose(p.detach(), 2.0 - 0.1 * sign, atol=1e-4)
    p = nn.Parameter(torch.full((4,), 2.0))
    opt = Lamb([p], lr=0.1, weight_decay=0.01)
    p.grad = sign.clone()
    opt.step()
    # update = sign + 0.01 w; trust = ||w|| / ||update|| = 4 / ||sign + 0.02||.
    u = sign + 0.02
    assert torch.allclose(p.detach(), 2.0 - 0.1 * 4 / u.norm() * u, atol=1e-4)


def test_scaled_lr():
    assert scaled_lr(lr=0.5, global_batch=1024) == 0.5
    assert scaled_lr(opt="sgd", lr_base=0.1, global_batch=512) == pytest.approx(0.2)  # linear
    assert scaled_lr(opt="adamw", lr_base=1e-3, global_batch=1024) == pytest.approx(2e-3)  # sqrt
    assert scaled_lr(
        opt="adamw", lr_base=1e-3, lr_base_scale="linear", global_batch=1024
    ) == pytest.approx(4e-3)


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


def test_agc_leaves_the_lm_head_out():
    m = nn.Module()
    m.body = nn.Linear(3, 3)
    m.lm_head = nn.Module()
    m.lm_head.proj = nn.Linear(3, 5)
    for p in m.parameters():
        p.grad = torch.full_like(p, 10.0)
    clip_gradients(m, "agc", 0.01)
    assert torch.all(m.lm_head.proj.weight.grad == 10.0) and torch.all(
        m.lm_head.proj.bias.grad == 10.0
    )
    assert torch.all(m.body.weight.grad < 10.0)
    clip_gradients(m, "value", 1.0)  # the other modes clip every parameter
    assert m.lm_head.proj.weight.grad.max() == 1.0


# timm fixtures (tests/golden/make_timm_golden.py) ------------------------------------------------

GOLDEN = json.loads((Path(__file__).parent / "golden" / "timm.json").read_text())


def _problem():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 18, generator=g, dtype=torch.float64) * 0.1
    b = torch.randn(18, generator=g, dtype=torch.float64) * 0.1
    x = torch.randn(8, 20, generator=g, dtype=torch.float64)
    y = torch.randn(8, 18, generator=g, dtype=torch.float64)
    return W, b, x, y


@pytest.mark.parametrize("key", sorted(GOLDEN["optimizers"]))
def test_optimizer_matches_timm(key):
    name, wd = key.split("/wd")
    W, b, x, y = _problem()
    W, b = nn.Parameter(W), nn.Parameter(b)
    groups = [{"params": [W], "weight_decay": float(wd)}, {"params": [b], "weight_decay": 0.0}]
    opt = build_optimizer(groups, lr=0.01, opt=name, weight_decay=float(wd), momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        ((x @ W + b - y) ** 2).mean().backward()
        opt.step()
    got = W.detach()[::4, ::4].flatten().tolist() + [W.detach().square().sum().item()] + b.tolist()
    assert got == pytest.approx(GOLDEN["optimizers"][key], rel=1e-9, abs=1e-12)


def test_optimizer_fixtures_cover_every_opt():
    assert {k.split("/wd")[0] for k in GOLDEN["optimizers"]} == set(OPTIMIZERS)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_decay_matches_timm_model_ema_v3(warmup):
    ema = ModelEma(nn.Linear(2, 2), decay=0.999, warmup=warmup)
    got = [ema.get_decay(step) for step in GOLDEN["ema_steps"]]
    assert got == pytest.approx(GOLDEN["ema_decay"][str(warmup)], rel=1e-12, abs=0)
    assert ema.get_decay(None) == 0.999


def test_ema_warmup_update():
    m = nn.Linear(2, 2, bias=False)
    ema = ModelEma(m, decay=0.99, warmup=True)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m, step=1)  # first update copies the weights
    assert torch.equal(ema.module.weight, m.weight)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m, step=2)  # decay 1 - 2 ** (-2/3)
    d = 1 - 2 ** (-2 / 3)
    assert torch.allclose(ema.module.weight, torch.full((2, 2), d * 1.0 + (1 - d) * 3.0))


def test_deepcopy_keeps_optimizer_tags():
    from helm.models import build_model

    model = build_model("hyena", d_model=16, num_layers=1, max_seq_len=32, filter_lr_scale=0.5)
    clone = copy.deepcopy(model)
    for (name, p), (_, q) in zip(model.named_parameters(), clone.named_parameters()):
        assert getattr(q, "_no_weight_decay", False) == getattr(p, "_no_weight_decay", False), name
        assert getattr(q, "_optim", None) == getattr(p, "_optim", None), name
        assert q is not p
    assert clone.lm_head.proj.weight is clone.embed.tok.weight  # tying survives
    ema = ModelEma(model, decay=0.9)
    assert ema.module.blocks[0].mixer.filter.mlp[0].weight._optim == {
        "lr_scale": 0.5,
        "weight_decay": 0.0,
    }


def test_bert_embedding_norm_gets_the_embedding_layer_decay():
    from helm.models import build_model

    model = build_model("bert", d_model=16, num_layers=2, num_heads=2, max_seq_len=32)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["embed_norm.weight"] == scale["embed.tok.weight"] == 0.5**3
    assert scale["lm_head.dense.weight"] == 1.0


def test_ema_updates_a_tied_weight_once():
    """The embedding and the LM head share one tensor: the EMA moves it by (1 - d) per update,
    not by 1 - d^2 (it would if each name updated the shared tensor)."""
    torch.manual_seed(0)
    model = build_model("gpt2", vocab_size=69, d_model=16, num_layers=1, num_heads=2,
                        max_seq_len=16, tie_embeddings=True)  # fmt: skip
    ema = ModelEma(model, decay=0.9)
    tied = ema.module.embed.tok.weight
    assert ema.module.lm_head.proj.weight is tied
    start = tied.detach().clone()
    with torch.no_grad():
        model.embed.tok.weight.add_(1.0)
    ema.update(model)
    want = start + 0.1 * (model.embed.tok.weight.detach() - start)
    torch.testing.assert_close(tied.detach(), want)
