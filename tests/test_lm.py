"""One optimizer update (helm.lm): a GradScaler-scaled backward, unscaled before clipping, gives the
update and the gradient norm of the unscaled run; fp16 autocast with the scaler tracks fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from helm.lm import LanguageModel, forward_backward, optimizer_step
from helm.losses.tables import HelmLoss, loss_tables


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 69, (4, 10), generator=g)
    labels = torch.where(torch.rand(4, 10, generator=g) < 0.4, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    return {"input_ids": ids, "labels": labels}


def _update(model, scaler, amp, clip):
    """One update of ``model`` (SGD, lr 1): the returned gradient norm and the new weights."""
    loss_fn = HelmLoss("XE", loss_tables("XE", None, vocab_size=69), impl="torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    forward_backward(model, [_batch()], loss_fn, scaler, amp, world_size=1)
    norm = optimizer_step(model, optimizer, scaler, clip_grad=clip, clip_mode="norm")
    return norm, _weights(model)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}  # tied ones once


@pytest.fixture
def model() -> LanguageModel:
    from helm.models import build_model

    torch.manual_seed(0)
    backbone = build_model("gpt2", vocab_size=69, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    return LanguageModel(backbone).train()


@pytest.mark.parametrize("amp", [None, torch.float16], ids=["fp32", "fp16"])
def test_scaled_update_with_clipping_equals_the_unscaled_one(model, amp):
    """The clip (0.05, below the gradient norm, so it acts) must see the true gradients: the
    scaler (2^12) is undone first. fp32 with the scaler is exact (a power-of-two scale)."""
    start, state = _weights(model), copy.deepcopy(model.state_dict())
    plain = torch.amp.GradScaler("cpu", enabled=False)
    norm_ref, ref = _update(model, plain, None, clip=0.05)
    assert norm_ref > 0.1  # clipping is active
    model.load_state_dict(state)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    norm, got = _update(model, scaler, amp, clip=0.05)
    assert scaler.get_scale() == 2.0**12  # no overflow: the step was taken
    tol = dict(rtol=1e-6, atol=1e-7) if amp is None else dict(rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(norm, norm_ref, **tol)
    for key in ref:
        torch.testing.assert_close(got[key] - start[key], ref[key] - start[key], **tol, msg=key)
    moved = sum((ref[k] - start[k]).pow(2).sum() for k in ref).sqrt()
    assert moved == pytest.approx(0.05, rel=1e-3)  # lr 1: the update is the clipped gradient
