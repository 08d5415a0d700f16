"""The speed benchmarks run end to end in a tiny CPU configuration (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_bench_train_runs(tmp_path):
    out = tmp_path / "train.json"
    sets = [
        "model=cnn-small",
        "model_kwargs={width: 4}",
        "train_subset=256",
        "precision=fp32",
        "channels_last=false",
    ]
    done = _run(
        "bench_train.py",
        "--synthetic",
        "--synthetic-test",
        "64",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--epochs",
        "2",
        *[x for s in sets for x in ("--set", s)],
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "first epoch s" in done.stdout and "median later s" in done.stdout and "images/s" in done.stdout
    result = json.loads(out.read_text())
    assert [row["method"] for row in result["rows"]] == ["sgd", "sam"]
    for row in result["rows"]:
        assert len(row["first_epoch_s"]) == 1 and len(row["later_epochs_s"]) == 1
        assert row["images_per_epoch"] == 256


def test_bench_sam_step_runs(tmp_path):
    out = tmp_path / "step.json"
    done = _run(
        "bench_sam_step.py",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--models",
        "cnn-small",
        "many-small",
        "--batch",
        "8",
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "median ms" in done.stdout and "over 2pass %" in done.stdout and "extra state MiB" in done.stdout
    result = json.loads(out.read_text())
    assert [r["model"] for r in result["results"]] == ["cnn-small", "many-small"]
    variants = [row["variant"] for row in result["results"][0]["rows"]]
    assert variants == ["sgd", "2pass", "sam", "sam-nomodel", "sam-noskip", "davda54", "davda54+bn"]
    sam = next(row for row in result["results"][0]["rows"] if row["variant"] == "sam")
    assert "overhead_pct" in sam and sam["extra_state_MiB"] > 0
