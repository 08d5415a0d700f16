"""What a run records: validation beside the clean test set, the learning rate, the noisy labels fitted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sharpness.harness.config import load_config
from sharpness.harness.prepare import prepare_data
from sharpness.harness.runs import load_run
from sharpness.harness.train import train

FAST = ["epochs=2", "batch_size=64", "model_kwargs={width: 8}", "device=cpu"]


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def _error(run, images: np.ndarray, labels: np.ndarray) -> float:
    """Test error of the saved model, as the trainer computes it (one batch of up to 1000, eval mode)."""
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    predicted = torch.cat([run.model(run.augment.normalize(b)).argmax(1) for b in x.split(1000)])
    return 100.0 * (1 - int((predicted == torch.from_numpy(labels)).sum()) / len(labels))


def test_eval_on_val_records_the_validation_split_and_the_clean_test_set(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "val_fraction=0.2", "eval_on=val", "label_noise=0.4"])
    (summary,) = train(cfg, tmp_path / "run", progress=False)
    lines = _lines(tmp_path / "run")
    for line in lines:
        assert {"val_loss", "val_error", "test_loss", "test_error"} <= set(line)
        assert line["val_loss"] != line["test_loss"]
    run = load_run(tmp_path / "run", device="cpu")
    data = run.data
    assert (
        summary["metrics"]["test_error"] == lines[-1]["test_error"] == _error(run, data.test_images, data.test_labels)
    )
    assert summary["metrics"]["val_error"] == lines[-1]["val_error"] == _error(run, data.val_images, data.val_labels)
    assert len(data.val_labels) == 259 and len(data.test_labels) == 500


def test_lr_is_the_learning_rate_of_each_epochs_last_step(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "epochs=4", "method=sgd"])
    train(cfg, tmp_path / "run", progress=False)
    steps, total = 1297 // 64, 4 * (1297 // 64)
    expected = [0.05 * 0.5 * (1 + math.cos(math.pi * (e * steps - 1) / total)) for e in (1, 2, 3, 4)]
    recorded = [line["lr"] for line in _lines(tmp_path / "run")]
    assert recorded == pytest.approx(expected, rel=1e-12)
    assert recorded[-1] > 0  # the last step still had a learning rate; 0 is the schedule's value after it


def test_noisy_labels_fitted_of_a_bootstrap_run_is_measured_against_the_original_noisy_labels(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "epochs=1", "label_noise=0.4", "bootstrap=true"])
    first, second = train(cfg, tmp_path / "run", progress=False)
    original = prepare_data(cfg)
    mislabelled = original.noisy_train_labels != original.clean_train_labels
    for summary, folder in ((first, tmp_path / "run"), (second, tmp_path / "run" / "bootstrap")):
        run = load_run(folder, device="cpu")
        with torch.no_grad():
            x = torch.from_numpy(run.data.train_images.transpose(0, 3, 1, 2).copy())
            predicted = torch.cat([run.model(run.augment.normalize(b)).argmax(1) for b in x.split(1000)]).numpy()
        expected = 100.0 * float(np.mean(predicted[mislabelled] == original.noisy_train_labels[mislabelled]))
        assert summary["metrics"]["noisy_labels_fitted"] == expected
    bootstrap_labels = np.load(tmp_path / "run" / "bootstrap" / "train_labels.npy")
    assert (bootstrap_labels != original.noisy_train_labels)[mislabelled].mean() > 0.5  # the two measures differ


def test_eval_every_evaluates_every_kth_epoch_and_the_last_and_counts_time_and_passes(tmp_path):
    cfg = load_config(
        "demo-digits", ["epochs=5", "batch_size=64", "model_kwargs={width: 4}", "device=cpu", "eval_every=2"]
    )
    (summary,) = train(cfg, tmp_path / "run", progress=False)
    lines = _lines(tmp_path / "run")
    assert ["test_error" in line for line in lines] == [False, True, False, True, True]
    assert (
        summary["metrics"]["test_error"]
        == lines[-1]["test_error"]
        == _error(load_run(tmp_path / "run", device="cpu"), *prepare_data(cfg).splits["test"])
    )
    assert all(line["passes_per_step"] == 2.0 and line["cpu_seconds"] > 0 for line in lines)
    assert summary["metrics"]["train_cpu_seconds"] == pytest.approx(sum(line["cpu_seconds"] for line in lines))
