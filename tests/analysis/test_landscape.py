"""Filter normalisation, interpolation endpoints, slices, BatchNorm recalibration."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sharpness.analysis import (
    evaluate,
    filter_normalize,
    interpolation_1d,
    landscape_1d,
    landscape_2d,
    random_direction,
    recalibrate_bn,
)

from .conftest import accuracy, assert_state_equal, ce_loss, make_bn_cnn, set_mode, state_copy


def batch_loss(model, batches, bn_mode="eval") -> float:
    """The example-weighted mean loss, written out independently of the library."""
    set_mode(model, bn_mode)
    total = sum(x.shape[0] for x, _ in batches)
    with torch.no_grad():
        return sum(x.shape[0] / total * float(ce_loss(model, (x, y))) for x, y in batches)


@pytest.mark.parametrize("ignore_bias_bn", [True, False])
def test_filter_normalisation(bn_problem, ignore_bias_bn):
    model = bn_problem.model
    before = state_copy(model)
    d = random_direction(model, seed=3, ignore_bias_bn=ignore_bias_bn)
    assert_state_equal(model, before)
    assert list(d) == [n for n, _ in model.named_parameters()]
    for name, w in model.named_parameters():
        w = w.detach()
        if w.dim() > 1:  # each filter (output channel / row) has the norm of the weight's filter
            for j in range(w.shape[0]):
                assert torch.linalg.vector_norm(d[name][j]) == pytest.approx(float(w[j].norm()), rel=1e-6)
            assert not torch.allclose(d[name] / w.norm(), w / w.norm(), atol=0.1)  # random, not w
        elif ignore_bias_bn:
            assert torch.equal(d[name], torch.zeros_like(w))
        else:
            assert torch.linalg.vector_norm(d[name]) == pytest.approx(float(w.norm()), rel=1e-6)
    again = random_direction(model, seed=3, ignore_bias_bn=ignore_bias_bn)
    assert all(torch.equal(d[k], again[k]) for k in d)


def test_filter_normalize_zero_filters_and_shapes():
    w = {"k": torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])}
    d = {"k": torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 0.0]])}
    out = filter_normalize(d, w)["k"]
    assert torch.equal(out, torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError):
        filter_normalize({"k": torch.ones(2, 2)}, w)


def test_interpolation_endpoints_reproduce_both_models(bn_problem):
    batches = bn_problem.batches
    model_a = bn_problem.model
    model_b = make_bn_cnn()
    with torch.no_grad():
        for p in model_b.parameters():
            p.mul_(1.3).add_(0.05)
        model_b[1].running_mean.add_(0.2)
        model_b[1].num_batches_tracked.fill_(11)
    state_a = copy.deepcopy(model_a.state_dict())
    state_b = copy.deepcopy(model_b.state_dict())
    host = make_bn_cnn()
    before = state_copy(host)
    res = interpolation_1d(
        host, ce_loss, batches, state_a, state_b, alphas=[0.0, 0.5, 1.0], metrics={"accuracy": accuracy}
    )
    assert_state_equal(host, before)
    assert res["kind"] == "interpolation" and res["alphas"] == [0.0, 0.5, 1.0]
    assert res["loss"][0] == batch_loss(model_a, batches)
    assert res["loss"][2] == batch_loss(model_b, batches)
    assert res["loss"][0] == evaluate(model_a, ce_loss, batches)["loss"]
    mid = copy.deepcopy(model_a)
    mid.load_state_dict(
        {k: (state_a[k] + state_b[k]) / 2 if state_a[k].is_floating_point() else state_b[k] for k in state_a}
    )
    assert res["loss"][1] == pytest.approx(batch_loss(mid, batches), rel=1e-6)
    assert res["metrics"]["accuracy"][2] == evaluate(model_b, ce_loss, batches, metrics={"a": accuracy})["a"]


def test_random_1d_slice(bn_problem):
    model, batches = bn_problem.model, bn_problem.batches
    base = batch_loss(copy.deepcopy(model), batches)
    before = state_copy(model)
    res = landscape_1d(model, ce_loss, batches, alphas=[-0.5, 0.0, 0.5], seed=5)
    assert_state_equal(model, before)
    assert res["kind"] == "random_1d" and res["seed"] == 5
    assert res["loss"][1] == base
    d = random_direction(model, seed=5)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(d[n], alpha=0.5)
    assert res["loss"][2] == pytest.approx(batch_loss(moved, batches), rel=1e-6)
    given = landscape_1d(model, ce_loss, batches, alphas=[-0.5, 0.0, 0.5], direction=d)
    assert given["loss"] == res["loss"] and given["seed"] is None


def test_random_2d_slice_layout(mlp_problem):
    model, batches = mlp_problem.model, mlp_problem.batches
    before = state_copy(model)
    res = landscape_2d(
        model,
        ce_loss,
        batches,
        alphas=[-1.0, 0.0, 1.0],
        betas=[0.0, 0.5],
        seed=1,
        metrics={"accuracy": accuracy},
    )
    assert_state_equal(model, before)
    assert len(res["loss"]) == 3 and all(len(row) == 2 for row in res["loss"])
    assert res["loss"][1][0] == batch_loss(copy.deepcopy(model), batches)
    gen = torch.Generator().manual_seed(1)
    d1, d2 = random_direction(model, generator=gen), random_direction(model, generator=gen)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(d1[n], alpha=-1.0).add_(d2[n], alpha=0.5)
    assert res["loss"][0][1] == pytest.approx(batch_loss(moved, batches), rel=1e-6)
    assert 0.0 <= min(min(r) for r in res["metrics"]["accuracy"]) <= 1.0


def test_recalibration_gives_the_average_batch_statistics(bn_problem):
    model, batches = copy.deepcopy(bn_problem.model), bn_problem.batches
    model.train()
    momentum = model[1].momentum
    recalibrate_bn(model, ce_loss, batches)
    assert model.training and model[1].momentum == momentum
    with torch.no_grad():
        feats = [model[0](x) for x, _ in batches]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(model[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(model[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == len(batches)


def test_landscape_with_recalibration(bn_problem):
    model, batches = bn_problem.model, bn_problem.batches
    before = state_copy(model)
    res = landscape_1d(model, ce_loss, batches, alphas=[0.0, 0.3], recalibration_batches=batches)
    assert_state_equal(model, before)
    assert res["recalibrated"]
    recal = copy.deepcopy(model)
    recalibrate_bn(recal, ce_loss, batches)
    assert res["loss"][0] == batch_loss(recal, batches)
    assert res["loss"][0] != batch_loss(copy.deepcopy(model), batches)
    train = landscape_1d(model, ce_loss, batches, alphas=[0.0], bn_mode="train")
    assert train["loss"][0] == batch_loss(copy.deepcopy(model), batches, "train")
    assert_state_equal(model, before)


def test_a_model_without_batchnorm_ignores_recalibration(mlp_problem):
    model, batches = mlp_problem.model, mlp_problem.batches
    plain = landscape_1d(model, ce_loss, batches, alphas=[0.2], seed=0)
    recal = landscape_1d(model, ce_loss, batches, alphas=[0.2], seed=0, recalibration_batches=batches)
    assert plain["loss"] == recal["loss"]
    assert isinstance(model[0], nn.Linear)


def perturbed_bn_cnn() -> nn.Module:
    model = make_bn_cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3).add_(0.05)
        model[1].running_mean.add_(0.2)
    return model


@pytest.mark.parametrize("make_host", ["mlp", "bn"])
def test_interpolation_from_the_hosts_live_state_dict(mlp_problem, bn_problem, make_host):
    """Both ends may be live tensors of the host: extrapolating must not overwrite them."""
    prob = mlp_problem if make_host == "mlp" else bn_problem
    host, batches = prob.model, prob.batches
    other = copy.deepcopy(host)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.3)
    alphas = [-0.5, 0.0, 0.5, 1.0, 1.5]
    reference = interpolation_1d(
        copy.deepcopy(host),
        ce_loss,
        batches,
        copy.deepcopy(host.state_dict()),
        copy.deepcopy(other.state_dict()),
        alphas=alphas,
        progress=False,
    )
    before, before_other = state_copy(host), state_copy(other)
    live = interpolation_1d(
        host, ce_loss, batches, host.state_dict(), other.state_dict(), alphas=alphas, progress=False
    )
    assert live["loss"] == reference["loss"]
    assert live["loss"][1] == batch_loss(copy.deepcopy(host), batches)
    assert live["loss"][3] == batch_loss(copy.deepcopy(other), batches)
    assert_state_equal(host, before)
    assert_state_equal(other, before_other)


def mixed_state(state_a: dict, state_b: dict, alpha: float, clamp: bool) -> dict:
    out = {}
    for k, a in state_a.items():
        if not a.is_floating_point():
            out[k] = state_a[k] if alpha < 0.5 else state_b[k]
            continue
        v = a * (1.0 - alpha) + state_b[k] * alpha
        out[k] = v.clamp_min(0.0) if clamp and k.endswith("running_var") else v
    return out


def test_extrapolated_batchnorm_variances_are_clamped_at_zero(bn_problem):
    batches = bn_problem.batches
    model_a, model_b = bn_problem.model, perturbed_bn_cnn()
    with torch.no_grad():  # channel 0's variance shrinks 10x from a to b: negative at alpha = 1.5
        model_b[1].running_var[0] = 0.1 * model_a[1].running_var[0]
    state_a, state_b = copy.deepcopy(model_a.state_dict()), copy.deepcopy(model_b.state_dict())
    res = interpolation_1d(make_bn_cnn(), ce_loss, batches, state_a, state_b, alphas=[-0.5, 1.0, 1.5], progress=False)
    assert res["clamped_variances"] == 1
    for alpha, loss in zip(res["alphas"], res["loss"], strict=True):
        ref = make_bn_cnn()
        ref.load_state_dict(mixed_state(state_a, state_b, alpha, clamp=True))
        assert loss == pytest.approx(batch_loss(ref, batches), rel=1e-6)
        assert torch.isfinite(torch.tensor(loss))
    unclamped = make_bn_cnn()  # guards the test: without the clamp the loss is NaN there
    unclamped.load_state_dict(mixed_state(state_a, state_b, 1.5, clamp=False))
    assert torch.isnan(torch.tensor(batch_loss(unclamped, batches)))
    recal = interpolation_1d(
        make_bn_cnn(), ce_loss, batches, state_a, state_b, alphas=[1.5], recalibration_batches=batches, progress=False
    )
    assert recal["recalibrated"] and recal["clamped_variances"] is None
    ref = make_bn_cnn()
    ref.load_state_dict(mixed_state(state_a, state_b, 1.5, clamp=True))
    recalibrate_bn(ref, ce_loss, batches)
    assert recal["loss"][0] == pytest.approx(batch_loss(ref, batches), rel=1e-6)


def float64_problem(prob):
    return prob.model.double(), [(x.double(), y) for x, y in prob.batches]


@pytest.mark.parametrize("problem", ["mlp_problem", "bn_problem"])
def test_batched_grid_points_equal_the_sequential_ones(problem, request):
    model, batches = float64_problem(request.getfixturevalue(problem))
    before = state_copy(model)
    kw = {"metrics": {"accuracy": accuracy}, "progress": False, "seed": 2}
    axes = {"alphas": [-1.0, -0.3, 0.0, 0.4, 1.0], "betas": [-0.5, 0.0, 0.7]}
    seq = landscape_2d(model, ce_loss, batches, **axes, **kw)
    par = landscape_2d(model, ce_loss, batches, **axes, points_per_batch=4, **kw)  # 15 points: chunks 4,4,4,3
    assert_state_equal(model, before)
    assert not seq["batched"] and par["batched"] and par["points_per_batch"] == 4
    assert torch.allclose(torch.tensor(par["loss"]), torch.tensor(seq["loss"]), rtol=1e-12, atol=0)
    assert par["metrics"]["accuracy"] == seq["metrics"]["accuracy"]
    one = landscape_1d(model, ce_loss, batches, alphas=axes["alphas"], points_per_batch=16, **kw)
    assert one["batched"]
    ref_1d = landscape_1d(model, ce_loss, batches, alphas=axes["alphas"], **kw)
    assert torch.allclose(torch.tensor(one["loss"]), torch.tensor(ref_1d["loss"]), rtol=1e-12, atol=0)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.2)
        for name, b in other.named_buffers():
            if name.endswith("running_var"):
                b.mul_(0.2)  # negative (clamped) variances beyond alpha = 1
    ends = (copy.deepcopy(model.state_dict()), copy.deepcopy(other.state_dict()))
    alphas = [-0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    seq_i = interpolation_1d(model, ce_loss, batches, *ends, alphas=alphas, progress=False)
    par_i = interpolation_1d(model, ce_loss, batches, *ends, alphas=alphas, points_per_batch=4, progress=False)
    assert par_i["batched"] and par_i["clamped_variances"] == seq_i["clamped_variances"]
    assert seq_i["clamped_variances"] == (2 if problem == "bn_problem" else 0)
    assert torch.allclose(torch.tensor(par_i["loss"]), torch.tensor(seq_i["loss"]), rtol=1e-12, atol=0)
    assert_state_equal(model, before)


def test_batched_path_falls_back_where_it_does_not_apply(bn_problem):
    model, batches = float64_problem(bn_problem)
    alphas = [-0.5, 0.0, 0.5]
    seq = landscape_1d(model, ce_loss, batches, alphas=alphas, bn_mode="train", progress=False)
    par = landscape_1d(model, ce_loss, batches, alphas=alphas, bn_mode="train", points_per_batch=3, progress=False)
    assert not par["batched"] and par["loss"] == seq["loss"]
    recal = landscape_1d(model, ce_loss, batches, alphas=alphas, recalibration_batches=batches, points_per_batch=3)
    assert not recal["batched"]

    def item_loss(m, batch):  # .item() cannot run under vmap
        return torch.tensor(ce_loss(m, batch).item(), dtype=torch.float64)

    with pytest.warns(RuntimeWarning, match="one by one"):
        fallback = landscape_1d(model, item_loss, batches, alphas=alphas, points_per_batch=3, progress=False)
    assert not fallback["batched"]
    assert fallback["loss"] == landscape_1d(model, ce_loss, batches, alphas=alphas, progress=False)["loss"]
    with pytest.raises(ValueError):
        landscape_1d(model, ce_loss, batches, alphas=alphas, points_per_batch=0)
