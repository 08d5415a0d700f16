"""Random probes: drawn on the target device in the target dtype, seeded, one stream per method."""

from __future__ import annotations

import pytest
import torch

from sharpness.analysis import HessianOperator, MatrixOperator, hessian_spectrum, hutchinson_trace, top_eigenpairs
from sharpness.analysis.probes import derive_seed, probe_generator, random_vector

from .conftest import ce_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probes_are_drawn_in_the_target_dtype(dtype):
    g = random_vector(50, probe_generator(3), dtype=dtype)
    assert g.dtype == dtype and g.device.type == "cpu"
    assert torch.equal(g, torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=dtype))
    r = random_vector(1000, probe_generator(3), distribution="rademacher", dtype=dtype)
    assert r.dtype == dtype and set(r.tolist()) == {-1.0, 1.0}
    bits = torch.randint(0, 2, (1000,), generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert torch.equal(r, bits * 2 - 1)
    with pytest.raises(ValueError):
        random_vector(5, probe_generator(0), distribution="uniform")


def test_float32_trace_uses_float32_probes_from_its_seed():
    a = torch.randn(40, 40, generator=torch.Generator().manual_seed(1))
    a = a + a.T
    res = hutchinson_trace(MatrixOperator(a), rtol=0.0, min_samples=2, max_samples=5, seed=7)
    gen = probe_generator(7)
    zs = [random_vector(40, gen, distribution="rademacher", dtype=torch.float32) for _ in range(5)]
    assert res.samples == [float(torch.dot(z, a @ z)) for z in zs]
    again = hutchinson_trace(MatrixOperator(a), rtol=0.0, min_samples=2, max_samples=5, seed=7)
    assert again.samples == res.samples


def test_derived_seeds_are_distinct_and_stable():
    names = ["lanczos", "power_iteration", "trace", "density"]
    seeds = [derive_seed(0, n) for n in names]
    assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [derive_seed(0, n) for n in names]
    assert derive_seed(1, "trace") != derive_seed(0, "trace")
    with pytest.raises(ValueError):
        derive_seed(-1, "trace")


def test_hessian_spectrum_gives_each_method_its_own_probes(mlp_problem):
    model, batches = mlp_problem.model, mlp_problem.batches
    res = hessian_spectrum(
        model,
        ce_loss,
        batches,
        top_k=3,
        lanczos_iters=12,
        power_check=True,
        power_iters=5,
        trace_rtol=0.0,
        trace_min_samples=4,
        trace_max_samples=4,
        slq_starts=1,
        slq_iters=6,
        dtype=torch.float64,
        seed=5,
        progress=False,
    )
    seeds = res["seeds"]
    assert res["seed"] == 5 and seeds == {n: derive_seed(5, n) for n in seeds}
    assert len(set(seeds.values())) == 4
    op = HessianOperator(model, ce_loss, batches, dtype=torch.float64)
    assert res["top_eigenvalues"] == top_eigenpairs(op, 3, num_iters=12, seed=seeds["lanczos"]).eigenvalues.tolist()
    trace = hutchinson_trace(op, rtol=0.0, min_samples=4, max_samples=4, seed=seeds["trace"])
    assert res["trace"]["estimate"] == trace.estimate

    def start(name: str, distribution: str) -> torch.Tensor:
        return random_vector(op.dim, probe_generator(seeds[name]), distribution=distribution, dtype=torch.float64)

    assert not torch.equal(start("lanczos", "gaussian"), start("power_iteration", "gaussian"))
    assert not torch.equal(start("density", "rademacher"), start("trace", "rademacher"))
