"""SAM under torch.amp: GradScaler (unscaling, skipping on inf, clipping) and bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sharpness import SAM

from .conftest import batch, bn_net


def _sam(model, **kwargs):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9, **kwargs)


def _scaled_step(model, opt, scaler, x, y, clip=None, poison=None):
    """The documented GradScaler recipe; ``poison`` makes pass 1 or 2 produce a NaN gradient."""
    loss = F.cross_entropy(model(x), y)
    scaler.scale(loss * (float("nan") if poison == 1 else 1.0)).backward()
    opt.first_step(zero_grad=True)  # eps is invariant to the loss scale: no unscale_ here
    loss2 = F.cross_entropy(model(x), y)
    scaler.scale(loss2 * (float("nan") if poison == 2 else 1.0)).backward()
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)  # calls opt.step(): unscales, skips on inf, restores w
    scaler.update()
    opt.zero_grad()
    return loss


def _plain_step(model, opt, x, y, clip=None):
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_grad_scaler_step_equals_the_unscaled_step(clip):
    m1, m2 = bn_net(), bn_net()
    o1, o2 = _sam(m1), _sam(m2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        x, y = batch(8, torch.float32, seed=step, image=True)
        _scaled_step(m1, o1, scaler, x, y, clip=clip)
        _plain_step(m2, o2, x, y, clip=clip)
        assert not o1.last_step_skipped
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_max_grad_norm_under_grad_scaler_clips_the_unscaled_gradient():
    m1, m2 = bn_net(), bn_net()
    o1, o2 = _sam(m1, max_grad_norm=0.05), _sam(m2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch(8, torch.float32, image=True)
    _scaled_step(m1, o1, scaler, x, y)
    _plain_step(m2, o2, x, y, clip=0.05)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("poison", [1, 2])
def test_inf_in_either_pass_skips_the_step_and_backs_off_the_scale(poison):
    model = bn_net()
    opt = _sam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch(8, torch.float32, image=True)
    _scaled_step(model, opt, scaler, x, y)
    params_before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    _scaled_step(model, opt, scaler, x, y, poison=poison)
    assert bool(opt.last_step_skipped) and int(opt.skipped_steps) == 1
    assert scaler.get_scale() == 2.0**9
    # parameters untouched; buffers as the clean pass left them (the clean pass itself ran)
    for name, value in model.named_parameters():
        assert torch.equal(value, params_before[name])
    for k, v in state_before["base_optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], opt.state_dict()["base_optimizer"]["state"][k]["momentum_buffer"])
    _scaled_step(model, opt, scaler, x, y)  # and training goes on
    assert not opt.last_step_skipped


def test_bf16_autocast_trains_with_float32_master_weights():
    model = bn_net()
    opt = _sam(model)
    x, y = batch(16, torch.float32, image=True)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_first_pass_overflow_with_p_inf_backs_off_the_scale():
    """sign(inf) is finite, so eps alone would hide the overflow from GradScaler; eps is poisoned instead."""
    model = bn_net()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, p=float("inf"), model=model, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch(8, torch.float32, image=True)
    before = {k: v.clone() for k, v in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    scaler.scale(loss * float("inf")).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert bool(opt.last_step_skipped) and scaler.get_scale() == 2.0**9
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_grad_scaler_with_a_closure_is_refused():
    model = bn_net()
    opt = _sam(model)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch(8, torch.float32, image=True)
    _scaled_step(model, opt, scaler, x, y)

    def closure():
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    with pytest.raises(RuntimeError, match="two-pass form"):
        scaler.step(opt, closure)
