"""Hessian-vector products against dense autograd Hessians; state left bit-identical."""

from __future__ import annotations

import pytest
import torch

from sharpness.analysis import HessianOperator

from .conftest import assert_state_equal, ce_loss, dense_hessian, state_copy


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("cache_graphs", [False, True])
def test_hvp_matches_dense_hessian_float64(bn_problem, bn_mode, cache_graphs):
    model, batches = bn_problem.model, bn_problem.batches
    before = state_copy(model)
    h = dense_hessian(model, batches, bn_mode)
    op = HessianOperator(model, ce_loss, batches, dtype=torch.float64, bn_mode=bn_mode, cache_graphs=cache_graphs)
    assert op.dim == h.shape[0] == 210
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(op.dim, generator=gen, dtype=torch.float64)
        ref = h @ v
        assert torch.linalg.vector_norm(op.matvec(v) - ref) <= 1e-12 * torch.linalg.vector_norm(ref)
    assert op.num_matvecs == 3
    assert_state_equal(model, before)


def test_bn_modes_give_different_hessians(bn_problem):
    """Guards the test above: batch and running statistics must actually differ here."""
    h_eval = dense_hessian(bn_problem.model, bn_problem.batches, "eval")
    h_train = dense_hessian(bn_problem.model, bn_problem.batches, "train")
    assert torch.linalg.matrix_norm(h_eval - h_train) > 0.1 * torch.linalg.matrix_norm(h_eval)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_hvp_float32_on_the_model_itself(bn_problem, bn_mode):
    model, batches = bn_problem.model, bn_problem.batches
    before = state_copy(model)
    h = dense_hessian(model, batches, bn_mode)
    op = HessianOperator(model, ce_loss, batches, bn_mode=bn_mode)
    assert op.dtype == torch.float32 and op.model is model
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    ref = h @ v.double()
    err = torch.linalg.vector_norm(op.matvec(v).double() - ref) / torch.linalg.vector_norm(ref)
    assert err < 1e-5
    assert_state_equal(model, before)


def test_uneven_batches_are_weighted_by_size(mlp_problem):
    """Batches of 8, 8 and 5 examples: the operator is the Hessian of the per-example mean."""
    model, batches = mlp_problem.model, mlp_problem.batches
    h = dense_hessian(model, batches)
    op = HessianOperator(model, ce_loss, batches, dtype=torch.float64)
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(op.matvec(v), h @ v, rtol=0, atol=1e-13)
    equal = HessianOperator(model, ce_loss, batches, dtype=torch.float64, weights=[1, 1, 1])
    assert not torch.allclose(equal.matvec(v), h @ v, rtol=0, atol=1e-6)


def test_parameter_selection_gives_the_sub_block(bn_problem):
    model, batches = bn_problem.model, bn_problem.batches
    names = ["0.weight", "4.bias"]
    full = dense_hessian(model, batches)
    sub = dense_hessian(model, batches, names=names)
    op = HessianOperator(model, ce_loss, batches, params=names, dtype=torch.float64)
    by_object = HessianOperator(model, ce_loss, batches, params=[model[4].bias, model[0].weight], dtype=torch.float64)
    assert op.names == by_object.names == names and op.dim == 54 + 3
    # 0.weight is the first block of the full Hessian, 4.bias the last.
    idx = torch.cat([torch.arange(54), torch.arange(full.shape[0] - 3, full.shape[0])])
    assert torch.allclose(sub, full[idx][:, idx], atol=1e-14)
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(op.matvec(v), sub @ v, rtol=0, atol=1e-13)
    assert torch.equal(by_object.matvec(v), op.matvec(v))


def test_unflatten_round_trip_and_errors(mlp_problem):
    op = HessianOperator(mlp_problem.model, ce_loss, mlp_problem.batches)
    v = torch.arange(op.dim, dtype=torch.float32)
    parts = op.unflatten(v)
    assert [p.shape for p in parts] == [p.shape for p in mlp_problem.model.parameters()]
    assert torch.equal(op.flatten(parts), v)
    with pytest.raises(ValueError):
        op.unflatten(v[:-1])
    with pytest.raises(ValueError):
        HessianOperator(mlp_problem.model, ce_loss, mlp_problem.batches, dtype=torch.float16)
    with pytest.raises(KeyError):
        HessianOperator(mlp_problem.model, ce_loss, mlp_problem.batches, params=["nope"])
    with pytest.raises(ValueError):
        HessianOperator(mlp_problem.model, ce_loss, mlp_problem.batches, bn_mode="batch")
