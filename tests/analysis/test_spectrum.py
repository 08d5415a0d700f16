"""The high-level hessian_spectrum entry point, result files and plots."""

from __future__ import annotations

import json

import pytest
import torch

from sharpness.analysis import (
    hessian_spectrum,
    landscape_1d,
    landscape_2d,
    load_result,
    m_sharpness,
    plot_density,
    plot_landscape_1d,
    plot_landscape_2d,
    plot_m_sharpness,
    save_result,
)

from .conftest import accuracy, assert_state_equal, ce_loss, dense_hessian, state_copy


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_hessian_spectrum_against_dense(bn_problem, bn_mode):
    model, batches = bn_problem.model, bn_problem.batches
    before = state_copy(model)
    h = dense_hessian(model, batches, bn_mode)
    exact = torch.linalg.eigvalsh(h).flip(0)
    res = hessian_spectrum(
        model,
        ce_loss,
        batches,
        top_k=5,
        lanczos_iters=60,
        power_check=bn_mode == "eval",
        power_iters=300,
        trace_rtol=0.2,
        slq_starts=2,
        slq_iters=20,
        dtype=torch.float64,
        bn_mode=bn_mode,
        cache_graphs=True,
    )
    assert_state_equal(model, before)
    json.dumps(res, allow_nan=False)
    assert res["num_params"] == 210 and res["dtype"] == "float64"
    assert res["top_eigenvalues"] == pytest.approx(exact[:5].tolist(), rel=1e-9)
    assert res["lambda_max"] == pytest.approx(float(exact[0]), rel=1e-9)
    assert res["lambda_max_over_lambda_5"] == pytest.approx(float(exact[0] / exact[4]), rel=1e-8)
    # In train mode the most negative eigenvalue is within 2% of lambda_max in magnitude, where
    # power iteration stalls; the cross-check is run in eval mode.
    pw = res.get("power_iteration", {"num_iters": 0})
    if bn_mode == "eval":
        assert exact[0] > exact.abs().max() * (1 - 1e-12)
        assert pw["converged"] and pw["eigenvalue"] == pytest.approx(float(exact[0]), rel=1e-6)
    tr = res["trace"]
    assert tr["ci_low"] <= float(torch.trace(h)) <= tr["ci_high"]
    assert tr["num_samples"] >= 10
    dens = res["density"]
    assert len(dens["grid"]) == len(dens["density"]) and len(dens["nodes"]) == 2
    n_trace = res["trace"]["num_samples"]
    assert res["num_hvps"] == 60 + pw["num_iters"] + n_trace + 2 * 20


def test_result_files_round_trip(tmp_path, mlp_problem):
    model, batches = mlp_problem.model, mlp_problem.batches
    spec = hessian_spectrum(
        model,
        ce_loss,
        batches,
        top_k=3,
        lanczos_iters=12,
        trace_max_samples=12,
        slq_starts=2,
        slq_iters=8,
        progress=False,
    )
    land = landscape_2d(
        model,
        ce_loss,
        batches,
        alphas=[-1.0, 0.0, 1.0],
        betas=[0.0, 1.0],
        metrics={"accuracy": accuracy},
        progress=False,
    )
    sharp = m_sharpness(model, ce_loss, batches, m=4, rho=0.05, p=float("inf"), progress=False)
    for result in (spec, land, sharp):
        for suffix in (".json", ".npz"):
            path = save_result(result, tmp_path / f"r{suffix}")
            assert load_result(path) == result
    assert spec["lambda_max_over_lambda_5"] is None
    with pytest.raises(ValueError):
        save_result(spec, tmp_path / "r.txt")


def test_plots_write_pngs(tmp_path, bn_problem):
    model, batches = bn_problem.model, bn_problem.batches
    spec = hessian_spectrum(
        model,
        ce_loss,
        batches,
        top_k=1,
        lanczos_iters=10,
        trace=False,
        slq_starts=1,
        slq_iters=10,
        progress=False,
    )
    one = landscape_1d(model, ce_loss, batches, alphas=[-1.0, 0.0, 1.0], progress=False)
    sharp = [m_sharpness(model, ce_loss, batches, m=m, rho=0.05, progress=False) for m in (2, 4)]
    two = landscape_2d(model, ce_loss, batches, alphas=[-1.0, 0.0, 1.0], betas=[-1.0, 0.0, 1.0], progress=False)
    paths = [
        plot_density(spec, tmp_path / "density.png"),
        plot_density(spec["density"], tmp_path / "density_only.png"),
        plot_landscape_1d({"SGD": one, "SAM": one}, tmp_path / "sub" / "one.png", log=True),
        plot_landscape_2d(two, tmp_path / "two.png", log=True),
        plot_m_sharpness(sharp, tmp_path / "m_several.png"),
        plot_m_sharpness(sharp[:1], tmp_path / "m_one.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_non_finite_values_are_written_as_null(tmp_path):
    nan, inf = float("nan"), float("inf")
    result = {"loss": [0.5, nan, 2.0], "grid": [[1.0, inf], [0.0, 1.0]], "ratio": nan, "info": {"x": -inf, "n": 3}}

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    text = save_result(result, tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=refuse) == {
        "loss": [0.5, None, 2.0],
        "grid": [[1.0, None], [0.0, 1.0]],
        "ratio": None,
        "info": {"x": None, "n": 3},
    }
    back = load_result(save_result(result, tmp_path / "r.npz"))
    assert back["loss"][0] == 0.5 and back["loss"][1] != back["loss"][1]  # NaN stays NaN in arrays
    assert back["grid"][0][1] == inf
    assert back["ratio"] is None and back["info"] == {"x": None, "n": 3}
