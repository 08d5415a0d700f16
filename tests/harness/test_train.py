"""The training loop: exact resume after kill -9 and SIGTERM, run-dir safety, divergence, bootstrapping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sharpness.harness.config import load_config
from sharpness.harness.train import Interrupted, RunDirExists, Trainer, TrainingDiverged, train

FAST = ["epochs=4", "batch_size=64", "model_kwargs={width: 8}"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sharpness.cli.main", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _metric_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def _assert_same_run(a: Path, b: Path) -> None:
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert _metric_lines(a) == _metric_lines(b)


def _train_cli(out: Path, *extra: str, method: str = "sam") -> subprocess.CompletedProcess:
    sets = [x for s in [*FAST, f"method={method}"] for x in ("--set", s)]
    return subprocess.run(
        _cli("train", "demo-digits", "--out", str(out), *sets, *extra),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    done = _train_cli(out)
    assert done.returncode == 0, done.stderr
    return out


def _start(out: Path) -> subprocess.Popen:
    sets = [x for s in [*FAST, "method=sam"] for x in ("--set", s)]
    return subprocess.Popen(
        _cli("train", "demo-digits", "--out", str(out), *sets),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, lines: int = 1, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before {path} had {lines} lines: {proc.stderr.read()}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {path}")


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path, reference_run):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for(out / "metrics.jsonl", proc, lines=2)
    time.sleep(0.05)  # land somewhere inside the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    resumed = _train_cli(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference_run, out)


def test_sigterm_saves_mid_epoch_and_resume_gives_the_uninterrupted_result(tmp_path, reference_run):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for(out / "metrics.jsonl", proc, lines=1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "checkpoint saved" in stderr and "Traceback" not in stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step_in_epoch"] > 0, "SIGTERM during an epoch saves a mid-epoch checkpoint"
    resumed = _train_cli(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference_run, out)


def test_run_directory_is_never_silently_overwritten(tmp_path, reference_run):
    done = _train_cli(reference_run)
    assert done.returncode == 2
    assert "not empty" in done.stderr and "--resume" in done.stderr
    with pytest.raises(RunDirExists):
        train(load_config("demo-digits", FAST), reference_run)


def test_resume_refuses_a_changed_config(tmp_path, reference_run):
    done = _train_cli(reference_run, "--resume", "--set", "rho=0.2")
    assert done.returncode == 2 and "rho" in done.stderr


def test_sgd_run_and_summary_contents(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "method=sgd", "label_noise=0.4"])
    (summary,) = train(cfg, tmp_path / "run", progress=False)
    assert summary["method"] == "sgd" and summary["experiment"] == "demo-digits"
    for key in ("test_error", "test_loss", "train_error", "noisy_labels_fitted"):
        assert 0 <= summary["metrics"][key] < 100 or key == "test_loss"
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json", "model.pt", "curves.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert [line["epoch"] for line in _metric_lines(tmp_path / "run")] == [1, 2, 3, 4]


def test_diverging_loss_stops_with_a_clear_message(tmp_path):
    cfg = load_config("demo-digits", ["epochs=3", "method=sgd", "model=mlp", "lr=1.0e+12", "weight_decay=0"])
    with pytest.raises(TrainingDiverged, match="training loss is"):
        train(cfg, tmp_path / "run", progress=False)


def test_bootstrap_retrains_on_predicted_labels(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "label_noise=0.4", "bootstrap=true"])
    first, second = train(cfg, tmp_path / "run", progress=False)
    assert first["method"] == "sam" and second["method"] == "sam+bootstrap"
    assert (tmp_path / "run" / "bootstrap" / "summary.json").is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_train_and_resume_exactly(tmp_path, precision):
    """bf16 autocast, and fp16 autocast with GradScaler (SAM's step driven by scaler.step)."""
    cfg = load_config("demo-digits", [*FAST, f"precision={precision}", "epochs=2"])
    whole = Trainer(cfg, tmp_path / "whole", progress=False).run()
    assert whole["metrics"]["test_error"] < 90 and whole["metrics"]["skipped_steps"] < 5
    cfg1 = load_config("demo-digits", [*FAST, f"precision={precision}", "epochs=2"])

    class StopsAfterOneEpoch(Trainer):  # as if SIGTERM arrived at the end of epoch 1
        def _end_epoch(self, *args, **kwargs):
            self._stop = True
            return super()._end_epoch(*args, **kwargs)

    with pytest.raises(Interrupted):
        StopsAfterOneEpoch(cfg1, tmp_path / "split", progress=False).run()
    Trainer(cfg1, tmp_path / "split", progress=False).run(resume=True)
    _assert_same_run(tmp_path / "whole", tmp_path / "split")


def test_second_order_trains_through_the_closure_form(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "epochs=1", "second_order=true"])
    (summary,) = train(cfg, tmp_path / "run", progress=False)
    assert summary["metrics"]["test_error"] < 95


def test_a_run_killed_before_its_first_checkpoint_resumes_from_scratch(tmp_path, reference_run):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text((reference_run / "config.yaml").read_text())
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')  # a line whose checkpoint never landed
    resumed = _train_cli(out, "--resume", "--device", "cpu")  # the device may change on resume
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference_run, out)


def test_resuming_a_finished_bootstrap_run_trains_nothing(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "epochs=1", "label_noise=0.4", "bootstrap=true"])
    first, second = train(cfg, tmp_path / "run", progress=False)
    stamp = (tmp_path / "run" / "bootstrap" / "model.pt").stat().st_mtime_ns
    again = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert again[0] == first and again[1]["metrics"] == second["metrics"]
    assert (tmp_path / "run" / "bootstrap" / "model.pt").stat().st_mtime_ns == stamp
