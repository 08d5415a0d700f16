"""The `sharpness` command end to end on tiny runs of the embedded digits set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sharpness.cli.main import build_parser, main

TINY = ["--set", "epochs=2", "--set", "batch_size=64", "--set", "model_kwargs={width: 8}", "--no-progress"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "cmp"
    assert main(["compare", "demo-digits", "--seeds", "0", "1", "--out", str(out), *TINY]) == 0
    return out


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "compare", "report", "demo", "configs", "download", "hessian", "landscape", "msharpness"} <= set(
        commands
    )
    for name in commands:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert "usage: sharpness " + name in capsys.readouterr().out


def test_bad_value_is_one_clear_line(tmp_path, capsys):
    assert main(["train", "demo-digits", "--out", str(tmp_path / "r"), "--set", "epochs=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sharpness train: error: epochs must be int; got 'abc'"


def test_compare_writes_a_side_by_side_report(compared, capsys):
    table = (compared / "report.md").read_text()
    assert "SGD" in table and "SAM" in table
    assert "(n=2)" in table
    assert (compared / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(compared), "--out", str(compared / "again.md")]) == 0
    assert (compared / "again.md").read_text() == table
    # finished runs are skipped: a second compare trains nothing and reports the same
    assert main(["compare", "demo-digits", "--seeds", "0", "1", "--out", str(compared), *TINY]) == 0
    assert (compared / "report.md").read_text() == table


def test_hessian_msharpness_and_landscape_commands(compared, tmp_path, capsys):
    sam, sgd = compared / "sam-seed0", compared / "sgd-seed0"
    assert main(["hessian", str(sam), "--batches", "1", "--top-k", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "hessian.json").read_text())
    assert result["lambda_max"] > 0 and len(result["top_eigenvalues"]) == 3
    assert (tmp_path / "hessian_density.png").is_file()
    assert main(["msharpness", str(sam), "--m", "16", "--batches", "1", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "msharpness_m16.json").read_text())["m"] == 16
    assert main(["landscape", str(sgd), str(sam), "--points", "5", "--batches", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "landscape1d.png").is_file()
    assert main(["landscape", str(sam), "--dim", "2", "--points", "3", "--batches", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"landscape2d_{sam.name}.png").is_file()
    assert (
        main(
            [
                "landscape",
                str(sgd),
                str(sam),
                "--interpolate",
                "--points",
                "5",
                "--batches",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "interpolation.png").is_file()
    out = capsys.readouterr().out
    assert "lambda_max =" in out and "sharpness =" in out


def test_demo_end_to_end_on_a_tiny_config(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("dataset: digits\nmodel: cnn-small\nmodel_kwargs: {width: 8}\nepochs: 2\nbatch_size: 64\n")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--seeds", "2", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "digits-clean" in out and "digits-noise-40" in out and "lambda_max" in out
    for name in ("report.md", "report.png", "landscape1d.png", "landscape2d_sgd.png", "landscape2d_sam.png"):
        assert (tmp_path / "demo" / name).is_file(), name


def test_select_rho_on_a_validation_split(tmp_path, capsys):
    assert main(["select-rho", "demo-digits", "--grid", "0.05", "0.5", "--out", str(tmp_path), *TINY]) == 0
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert [r["rho"] for r in selection["grid"]] == [0.05, 0.5] and selection["val_fraction"] == 0.1
    best = min(selection["grid"], key=lambda r: r["val_error"])
    assert selection["best_rho"] == best["rho"]
    assert f"best rho = {best['rho']:g}" in capsys.readouterr().out


def test_configs_lists_the_bundled_configs(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "cifar10_wrn28-10_basic" in out and "demo-digits" in out


def test_select_rho_runs_beside_compares_and_reports_never_mix_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_epoch = [*TINY, "--set", "epochs=1"]
    assert main(["train", "demo-digits", *one_epoch]) == 0
    assert main(["select-rho", "demo-digits", "--grid", "0.05", "0.1", *one_epoch]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["demo-digits", "demo-digits-select-rho"]
    assert (tmp_path / "runs" / "demo-digits-select-rho" / "rho0.05" / "summary.json").is_file()
    capsys.readouterr()
    assert main(["report", "runs"]) == 0
    rows = [line.split(" | ")[0].strip("| ") for line in capsys.readouterr().out.splitlines()[2:] if line]
    assert rows == ["demo-digits", "demo-digits-select-rho-0.05", "demo-digits-select-rho-0.1"]
    summary = json.loads((tmp_path / "runs" / "demo-digits-select-rho" / "rho0.1" / "summary.json").read_text())
    assert {"val_error", "val_loss", "test_error", "test_loss"} <= set(summary["metrics"])


def test_compare_compute_matched_reports_the_better_sgd_before_sam(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "demo-digits", "--seeds", "0", "--compute-matched", "--out", str(out), *TINY]) == 0
    header, _, row = (out / "report.md").read_text().splitlines()[:3]
    assert header == "| Experiment | SGD (best of 1x/2x epochs) | SAM |"
    sgd = {
        epochs: json.loads((out / name / "summary.json").read_text())["metrics"]["test_error"]
        for epochs, name in ((2, "sgd-seed0"), (4, "sgd-2x-seed0"))
    }
    best = min(sgd, key=sgd.get)
    assert f"{sgd[best]:.2f} (n=1, {best // 2}x: {best} ep)" in row
    capsys.readouterr()
    assert main(["report", str(out), "--raw"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "| Experiment | SGD (best of 1x/2x epochs) | SAM | SGD (2 EP) | SGD (4 EP) |"
    )


def test_help_lists_every_config_key_and_prints_percent_signs_once(capsys):
    from sharpness.harness.config import CONFIG_HELP

    for command in ("train", "compare", "select-rho"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        for key, meaning in CONFIG_HELP.items():
            assert f"  {key:20s} {meaning} [" in out, (command, key)
    for argv in (
        ["--help"],
        ["report", "--help"],
        ["select-rho", "--help"],
        ["compare", "--help"],
        ["train", "--help"],
    ):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "%%" not in out, argv
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "95% CI" in capsys.readouterr().out


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    from sharpness import __version__

    done = subprocess.run(
        [sys.executable, "-m", "sharpness", "configs"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0]: line.split()[-1] for line in done.stdout.splitlines()}
    assert listed["cifar10_wrn16-8_noise40"] == "reduced" and listed["demo-digits"] == "cpu"
    version = subprocess.run([sys.executable, "-m", "sharpness", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"sharpness {__version__}"


def test_compare_reuses_finished_runs_only_of_the_same_config(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "demo-digits", "--seeds", "0", "--out", str(out), *TINY]
    assert main(args) == 0
    stamp = (out / "sam-seed0" / "model.pt").stat().st_mtime_ns
    assert main(args) == 0  # finished: reused, not retrained
    assert (out / "sam-seed0" / "model.pt").stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert main([*args, "--set", "epochs=3"]) == 2  # not silently the 2-epoch runs
    err = capsys.readouterr().err.strip()
    assert err.startswith("sharpness compare: error: ") and "differs in epochs" in err and "\n" not in err


def test_compare_runs_any_methods_side_by_side(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "demo-digits", "--seeds", "0", "--methods", "sgd", "looksam", "msam", "--out", str(out)]
    assert main([*args, *TINY]) == 0
    header = (out / "report.md").read_text().splitlines()[0]
    assert header == "| Experiment | SGD | LOOKSAM | MSAM |"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["looksam-seed0", "msam-seed0", "sgd-seed0"]
    with pytest.raises(SystemExit):
        main(["compare", "demo-digits", "--methods", "adam"])
    assert "invalid choice: 'adam'" in capsys.readouterr().err


def test_a_label_names_one_methods_runs_beside_the_default_ones(tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", "demo-digits", "--seeds", "0", "--out", str(out), *TINY]
    assert main([*base, "--methods", "sgd", "looksam"]) == 0
    assert main([*base, "--methods", "looksam", "--set", "looksam_alpha=0.2", "--set", "label=looksam-a0.2"]) == 0
    assert (out / "report.md").read_text().splitlines()[0] == "| Experiment | SGD | LOOKSAM | LOOKSAM-A0.2 |"
    assert main([*base, "--methods", "sam", "sgd", "--set", "label=x"]) == 2
    assert "names the runs of one method" in capsys.readouterr().err


def test_demo_trains_and_measures_on_one_thread_and_restores_the_count(tmp_path, monkeypatch):
    """The demo's digits depend on how reductions split between threads: it fixes one, whatever the machine."""
    import torch

    from sharpness.cli import demo
    from sharpness.harness import train as train_module

    seen = []

    def record(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt  # enough: the demo's first run started

    monkeypatch.setattr(train_module, "train", record)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            demo.run_demo(tmp_path, [0])
        assert seen == [demo.DEMO_THREADS] == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
