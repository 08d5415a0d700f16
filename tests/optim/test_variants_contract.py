"""What every variant keeps of SAM's contract: rho = 0 is the base optimizer bit for bit, state_dict round-trips
mid-training, GradScaler skips a step with inf/NaN, a base optimizer instance works, a bare step() is an error."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from sharpness import (
    AESAM,
    ESAM,
    GSAM,
    MSAM,
    SAM,
    FriendlySAM,
    IntervalSAM,
    LookSAM,
    RandomDirectionSAM,
    StochasticSAM,
    VaSSO,
)

from ._reference import LR, MOMENTUM, WD, batches, closure_for, models

VARIANTS = {
    "sam": (SAM, {}),
    "gsam": (GSAM, {"alpha": 0.3, "rho_min": 0.01}),
    "looksam": (LookSAM, {"k": 3}),
    "msam": (MSAM, {}),
    "esam": (ESAM, {"beta": 0.5, "gamma": 0.5, "seed": 1}),
    "friendly": (FriendlySAM, {"lmbda": 0.6}),
    "vasso": (VaSSO, {"theta": 0.4}),
    "interval": (IntervalSAM, {"k": 2}),
    "stochastic": (StochasticSAM, {"probability": 0.5, "seed": 2}),
    "aesam": (AESAM, {"c_start": 0.0}),
    "random": (RandomDirectionSAM, {"seed": 3}),
}
TWO_PASS = [name for name, (cls, _) in VARIANTS.items() if not cls.perturbs_before_pass]


def _build(name, module, rho=0.1, base=torch.optim.SGD, **extra):
    cls, options = VARIANTS[name]
    kwargs = {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD} if base is torch.optim.SGD else {"lr": 1e-3}
    return cls(module.parameters(), base, rho=rho, model=module, **{**options, **extra}, **kwargs)


def step(opt, module, x, y, scaler=None, poison=None):
    """One step of any variant in its manual form; ``poison`` (1 or 2) makes that pass's loss NaN."""
    scale = scaler.scale if scaler is not None else (lambda t: t)

    def loss_at(pass_no, xs=x, ys=y, reduction="mean"):
        loss = F.cross_entropy(module(xs), ys, reduction=reduction)
        return loss * float("nan") if poison == pass_no else loss

    opt.zero_grad()
    if opt.perturbs_before_pass:
        opt.first_step()
        scale(loss_at(1)).backward()
    elif isinstance(opt, ESAM):
        losses = loss_at(1, reduction="none")
        scale(losses.mean()).backward()
        opt.first_step()
        with torch.no_grad():
            sharper = F.cross_entropy(module(x), y, reduction="none")
        keep = opt.select(losses.detach(), sharper)
        scale(loss_at(2, x[keep], y[keep])).backward()
    else:
        scale(loss_at(1)).backward()
        if opt.first_step():
            scale(loss_at(2)).backward()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def _state(module, opt):
    buffer = io.BytesIO()
    torch.save({"model": module.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", VARIANTS)
def test_rho_zero_is_the_base_optimizer_bit_for_bit(name):
    a, b = models("bn"), models("bn")
    opt = _build(name, a, rho=0.0, **({"rho_min": 0.0} if name == "gsam" else {}))
    base = torch.optim.SGD(b.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in batches("bn", 5):
        step(opt, a, x, y)
        base.zero_grad()
        F.cross_entropy(b(x), y).backward()
        base.step()
    assert _same(a.state_dict(), b.state_dict())
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], base.state[q]["momentum_buffer"])


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_state_dict_round_trip_mid_training_continues_bit_exactly(name, base):
    data = batches("bn", 8)
    whole = models("bn")
    opt = _build(name, whole, base=base)
    for x, y in data:
        step(opt, whole, x, y)

    first = models("bn")
    opt1 = _build(name, first, base=base)
    for x, y in data[:4]:
        step(opt1, first, x, y)
    saved = _state(first, opt1)
    resumed = models(
        "bn",
    )
    opt2 = _build(name, resumed, base=base, **({"seed": 99} if "seed" in VARIANTS[name][1] else {}))
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for x, y in data[4:]:
        step(opt2, resumed, x, y)
    assert _same(whole.state_dict(), resumed.state_dict())
    assert [p.requires_grad for p in whole.parameters()] == [p.requires_grad for p in resumed.parameters()]


@pytest.mark.parametrize("name", TWO_PASS)
@pytest.mark.parametrize("poison", [1, 2])
def test_grad_scaler_skips_a_step_with_nan_in_either_pass(name, poison):
    module = models("bn").float()
    cls, options = VARIANTS[name]
    if name == "aesam" and poison == 2:
        options = {"c_start": -1e9}  # ascend on every step, so that the poisoned step has a second pass
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = cls(
        module.parameters(),
        torch.optim.SGD,
        rho=0.1,
        model=module,
        grad_scaler=scaler,
        lr=LR,
        momentum=MOMENTUM,
        **options,
    )
    data = batches("bn", 6)
    for x, y in data[:3]:
        step(opt, module, x.float(), y, scaler)
    x, y = data[3]
    if poison == 2 and opt.next_step_ascends is False:
        step(opt, module, x.float(), y, scaler)  # land the poisoned second pass on a step that has one
    before = _state(module, opt)
    assert poison == 1 or opt.next_step_ascends is not False
    step(opt, module, x.float(), y, scaler, poison=poison)
    assert bool(opt.last_step_skipped) and scaler.get_scale() == 2.0**9
    after = _state(module, opt)
    assert _same(
        {k: v for k, v in before["model"].items() if "running" not in k and "num_batches" not in k},
        {k: v for k, v in after["model"].items() if "running" not in k and "num_batches" not in k},
    )
    base_before, base_after = before["opt"]["base_optimizer"]["state"], after["opt"]["base_optimizer"]["state"]
    assert all(_same(base_before[i], base_after[i]) for i in base_before)
    variant_before = before["opt"]["sam"].get("variant", {})
    variant_after = after["opt"]["sam"].get("variant", {})
    for key in ("average", "gv"):
        if key in variant_before:
            assert _same(variant_before[key], variant_after[key])
    for x, y in data[4:]:  # and training goes on
        step(opt, module, x.float(), y, scaler)
    assert not opt.last_step_skipped


@pytest.mark.parametrize("name", ["friendly", "vasso", "aesam"])
def test_variants_that_read_the_gradients_size_need_the_scaler_under_fp16(name):
    scaled, plain = models("bn").float(), models("bn").float()
    cls, options = VARIANTS[name]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    o1 = cls(scaled.parameters(), torch.optim.SGD, rho=0.1, model=scaled, grad_scaler=scaler, lr=LR, **options)
    o2 = cls(plain.parameters(), torch.optim.SGD, rho=0.1, model=plain, lr=LR, **options)
    for x, y in batches("bn", 4):
        step(o1, scaled, x.float(), y, scaler)
        step(o2, plain, x.float(), y)
    for p, q in zip(scaled.state_dict().values(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q)
    forgetful = models("bn").float()
    o3 = cls(forgetful.parameters(), torch.optim.SGD, rho=0.1, model=forgetful, lr=LR, **options)
    x, y = batches("bn", 1)[0]
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        step(o3, forgetful, x.float(), y, torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize(("name", "steps", "passes"), [("looksam", 10, 12), ("msam", 10, 10), ("interval", 10, 15)])
def test_pass_counts(name, steps, passes):
    module = models("mlp")
    cls = VARIANTS[name][0]
    opt = cls(
        module.parameters(),
        torch.optim.SGD,
        rho=0.05,
        lr=LR,
        momentum=MOMENTUM,
        **({"k": 5} if name == "looksam" else {"k": 2} if name == "interval" else {}),
    )
    count = [0]
    for x, y in batches("mlp", steps):
        opt.zero_grad()
        opt.step(closure_for(module, x, y, count))
    assert count[0] == passes


@pytest.mark.parametrize("name", VARIANTS)
def test_a_base_optimizer_instance_gives_the_same_steps_as_its_class(name):
    a, b = models("bn"), models("bn")
    by_class = _build(name, a)
    cls, options = VARIANTS[name]
    base = torch.optim.SGD(b.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    by_instance = cls(b.parameters(), base, rho=0.1, model=b, **options)
    for x, y in batches("bn", 4):
        step(by_class, a, x, y)
        step(by_instance, b, x, y)
    assert _same(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("name", VARIANTS)
def test_a_bare_step_is_an_error_and_deepcopy_works(name):
    module = models("mlp")
    opt = _build(name, module)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    x, y = batches("mlp", 1)[0]
    step(opt, module, x, y)
    clone = copy.deepcopy(opt)
    assert type(clone) is type(opt)
