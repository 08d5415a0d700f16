"""`sharpness hessian`, `landscape` and `msharpness` on tiny digits runs: the content of what they write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sharpness.analysis import (
    HessianOperator,
    derive_seed,
    evaluate,
    load_result,
    m_sharpness,
    top_eigenpairs,
)
from sharpness.cli.main import build_parser, main
from sharpness.harness.runs import cross_entropy_loss, load_run

TINY = ["--set", "epochs=2", "--set", "batch_size=64", "--set", "model_kwargs={width: 8}", "--no-progress"]
DATA = ["--batches", "1", "--batch-size", "64"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An SGD and a SAM run, both in folders named `run` (so their folder names collide)."""
    base = tmp_path_factory.mktemp("analysis_runs")
    out = {}
    for method in ("sgd", "sam"):
        out[method] = base / method / "run"
        assert main(["train", "demo-digits", "--out", str(out[method]), "--set", f"method={method}", *TINY]) == 0
    return out


def strict_json(path: Path) -> dict:
    def refuse(name: str):
        raise AssertionError(f"{path.name}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def first_batch(run: Path, model_state: dict | None = None):
    loaded = load_run(run, device="cpu")
    if model_state is not None:
        loaded.model.load_state_dict(model_state)
    return loaded, loaded.batches("train", 64, 1)


def test_hessian_json_records_its_settings_and_its_bounds_hold(runs, tmp_path, capsys):
    out = tmp_path / "h"
    args = ["--top-k", "3", "--lanczos-iters", "12", "--slq-iters", "8", "--slq-starts", "2"]
    args += ["--trace-max-probes", "6", "--trace-rtol", "0"]
    assert main(["hessian", str(runs["sgd"]), *DATA, *args, "--out", str(out)]) == 0
    res = strict_json(out / "hessian.json")
    assert res["source"] == {
        "run": str(runs["sgd"]),
        "weights": str(runs["sgd"] / "model.pt"),
        "split": "train",
        "batch_size": 64,
        "num_batches": 1,
        "num_examples": 64,
        "shuffled": False,
        "shuffle_seed": None,
        "seed": 0,
        "device": "cpu",
    }
    assert res["seed"] == 0 and res["seeds"]["lanczos"] == derive_seed(0, "lanczos")
    assert res["lanczos_iters"] == 12 and res["ritz_residuals_kind"] == "explicit"
    top = res["top_eigenvalues"]
    assert len(top) == 3 and top == sorted(top, reverse=True) and res["lambda_max"] == top[0]
    assert res["trace"]["num_samples"] == 6 and not res["trace"]["converged"]
    assert res["density"]["num_starts"] == 2 and res["density"]["num_iters"] == 8
    assert len(res["density"]["nodes"]) == 2
    assert res["num_hvps"] == 12 + 3 + 6 + 2 * 8
    # Each reported Ritz value lies within its residual of an eigenvalue of the exact Hessian.
    loaded, batches = first_batch(runs["sgd"])
    ref = top_eigenpairs(
        HessianOperator(loaded.model, cross_entropy_loss, batches, dtype=torch.float64), 8, num_iters=80
    )
    assert float(ref.residuals.max()) < 1e-9
    for value, bound in zip(top, res["ritz_residuals"], strict=True):
        assert float((ref.eigenvalues - value).abs().min()) <= bound
    assert (out / "hessian_density.png").read_bytes()[:8] == PNG
    assert f"lambda_max = {top[0]:.4g}" in capsys.readouterr().out


def test_hessian_of_a_checkpoint_file_uses_that_file(runs, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(runs["sam"], run)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    state = {k: v * 1.1 if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    torch.save({**checkpoint, "model": state}, run / "checkpoint.pt")
    fast = [*DATA, "--top-k", "1", "--lanczos-iters", "10", "--no-density", "--no-trace"]
    values = {}
    for target in (run, run / "model.pt", run / "checkpoint.pt"):
        out = tmp_path / target.name
        assert main(["hessian", str(target), *fast, "--out", str(out)]) == 0
        res = strict_json(out / "hessian.json")
        assert res["source"]["run"] == str(run)
        values[target.name] = res["top_eigenvalues"]
    assert res["source"]["weights"] == str(run / "checkpoint.pt")
    assert values["copy"] == values["model.pt"] != values["checkpoint.pt"]
    loaded, batches = first_batch(run, state)
    op = HessianOperator(loaded.model, cross_entropy_loss, batches)
    expected = top_eigenpairs(op, 1, num_iters=10, seed=derive_seed(0, "lanczos")).eigenvalues.tolist()
    assert values["checkpoint.pt"] == expected
    (run / "junk.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["hessian", str(run / "junk.pt"), *fast, "--out", str(tmp_path / "j")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sharpness hessian: error: {run / 'junk.pt'}: not a readable model.pt or checkpoint.pt file"
    )


def test_landscape_labels_same_named_runs_apart_and_writes_npz(runs, tmp_path, capsys):
    out = tmp_path / "l"
    assert main(["landscape", str(runs["sgd"]), str(runs["sam"]), "--points", "3", *DATA, "--out", str(out)]) == 0
    for method in ("sgd", "sam"):
        res = strict_json(out / f"landscape1d_{method}_run.json")
        assert load_result(out / f"landscape1d_{method}_run.npz") == res
        assert res["label"] == f"{method}_run" and res["source"]["run"] == str(runs[method])
        assert res["alphas"] == [-1.0, 0.0, 1.0] and res["seed"] == 0 and not res["batched"]
        loaded, batches = first_batch(runs[method])
        assert res["loss"][1] == evaluate(loaded.model, cross_entropy_loss, batches)["loss"]
        assert res["loss"][0] > res["loss"][1] and res["loss"][2] > res["loss"][1]
    assert (out / "landscape1d.png").read_bytes()[:8] == PNG
    capsys.readouterr()
    assert main(["landscape", str(runs["sgd"]), str(runs["sgd"]), "--points", "3", *DATA, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sharpness landscape: error: the same run is given twice: {runs['sgd']} and {runs['sgd']}"
    )


def test_landscape_2d_batched_and_interpolation_content(runs, tmp_path):
    out = tmp_path / "l2"
    sgd, sam = str(runs["sgd"]), str(runs["sam"])
    assert main(["landscape", sam, "--dim", "2", "--points", "3", *DATA, "--out", str(out)]) == 0
    seq = strict_json(out / "landscape2d_run.json")
    assert np.asarray(seq["loss"]).shape == (3, 3) and seq["betas"] == [-1.0, 0.0, 1.0]
    assert load_result(out / "landscape2d_run.npz") == seq
    assert (out / "landscape2d_run.png").read_bytes()[:8] == PNG
    batched = tmp_path / "l2b"
    assert (
        main(["landscape", sam, "--dim", "2", "--points", "3", *DATA, "--points-per-batch", "4", "--out", str(batched)])
        == 0
    )
    par = strict_json(batched / "landscape2d_run.json")
    assert par["batched"] and par["points_per_batch"] == 4
    assert np.allclose(par["loss"], seq["loss"], rtol=1e-5, atol=0)  # float32 model: batched kernels round apart

    assert main(["landscape", sgd, sam, "--interpolate", "--points", "5", *DATA, "--out", str(out)]) == 0
    res = strict_json(out / "interpolation.json")
    assert load_result(out / "interpolation.npz") == res
    assert res["alphas"] == [-0.5, 0.0, 0.5, 1.0, 1.5] and not res["recalibrated"]
    assert res["source"]["runs"] == [sgd, sam] and res["labels"] == ["sgd_run", "sam_run"]
    for alpha_index, method in ((1, "sgd"), (3, "sam")):
        loaded, _ = first_batch(runs[method])
        _, batches = first_batch(runs["sgd"])  # the data of the first run
        assert res["loss"][alpha_index] == evaluate(loaded.model, cross_entropy_loss, batches)["loss"]
    assert all(np.isfinite(res["loss"]))

    assert (
        main(
            [
                "landscape",
                sgd,
                sam,
                "--interpolate",
                "--points",
                "3",
                "--range",
                "0.5",
                "--recalibrate-bn",
                *DATA,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    recal = strict_json(out / "interpolation.json")
    assert recal["alphas"] == [0.0, 0.5, 1.0] and recal["recalibrated"] and recal["clamped_variances"] is None
    assert recal["loss"][0] != res["loss"][1]  # recalibrated statistics differ from the stored ones


def test_msharpness_shuffles_by_seed_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "m"
    sam = str(runs["sam"])
    assert main(["msharpness", sam, "--m", "8", "16", "--max-subsets", "3", *DATA, "--out", str(out)]) == 0
    loaded = load_run(runs["sam"], device="cpu")
    everything = loaded.batches("train", 2000, None)[0]
    order = torch.randperm(len(everything[1]), generator=torch.Generator().manual_seed(0))[:64]
    shuffled = [(everything[0][order], everything[1][order])]
    for m in (8, 16):
        res = strict_json(out / f"msharpness_m{m}.json")
        assert res["m"] == m and res["num_subsets"] == 3 and len(res["per_subset"]) == 3
        assert res["source"]["shuffled"] and res["source"]["shuffle_seed"] == 0
        assert res["source"]["num_examples"] == 64
        ref = m_sharpness(loaded.model, cross_entropy_loss, shuffled, m=m, rho=0.05, max_subsets=3, progress=False)
        assert res["per_subset"] == pytest.approx(ref["per_subset"], rel=1e-6)
    assert (out / "msharpness.png").read_bytes()[:8] == PNG

    plain = tmp_path / "plain"
    flags = ["--m", "8", "--no-shuffle", "--ascent-steps", "2", "--step-size", "0.02", "--p", "inf"]
    assert main(["msharpness", sam, *flags, *DATA, "--out", str(plain)]) == 0
    res = strict_json(plain / "msharpness_m8.json")
    assert not res["source"]["shuffled"] and res["source"]["shuffle_seed"] is None
    assert res["ascent_steps"] == 2 and res["step_size"] == 0.02 and res["p"] == "inf"
    ref = m_sharpness(
        loaded.model,
        cross_entropy_loss,
        loaded.batches("train", 64, 1),
        m=8,
        rho=0.05,
        p=float("inf"),
        ascent_steps=2,
        step_size=0.02,
        progress=False,
    )
    assert res["num_subsets"] == 8 and res["per_subset"] == pytest.approx(ref["per_subset"], rel=1e-6)
    assert (plain / "msharpness.png").read_bytes()[:8] == PNG
    assert "m = 8, rho = 0.05: sharpness = " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["landscape", "{run}", "--points", "1"], "--points must be >= 2, got 1"),
        (["landscape", "{run}", "--interpolate"], "--interpolate needs exactly two runs, got 1"),
        (["landscape", "{run}", "--range", "0"], "--range must be > 0, got 0.0"),
        (["hessian", "{run}", "--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["hessian", "{run}", "--trace-max-probes", "1"], "--trace-max-probes must be >= 2, got 1"),
        (["msharpness", "{run}", "--p", "1"], "--p must be a number > 1 or inf, got '1'"),
        (
            ["msharpness", "{run}", "--step-size", "0.1"],
            "--step-size sets the length of the steps after the first; it needs --ascent-steps > 1",
        ),
        (["msharpness", "{run}", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ],
)
def test_invalid_options_end_with_one_clear_line(runs, capsys, argv, message):
    argv = [a.format(run=runs["sgd"]) for a in argv]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"sharpness {argv[0]}: error: {message}"


def test_help_texts_print_percent_signs_once(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    demo = commands["demo"].format_help()
    assert "40% noisy" in demo and "95% CI" in demo and "%%" not in demo
    hessian = commands["hessian"].format_help()
    assert "95% interval" in hessian and "%%" not in hessian
    steps = " ".join(commands["msharpness"].format_help().split())
    assert "conditional" in steps and "projected back onto the ball" in steps
