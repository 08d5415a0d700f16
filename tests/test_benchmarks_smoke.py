"""The speed benchmarks run end to end in a tiny CPU configuration (no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_gpu_checks_script_dry_run(tmp_path):
    """The one-command GPU script, in its tiny CPU mode: every step runs and leaves well-formed JSON."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "QUICK": "1",
        "DEVICE": "cpu",
        "OUT": str(out),
        "WHEELS": str(tmp_path / "no-wheels"),
        "PYTHON": sys.executable,
        "SHARPNESS_SOURCE_COMMIT": "0000000",
    }
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_checks.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all steps passed" in done.stdout
    names = ["bench_train", "bench_hessian_cnn_4x64", "bench_hessian_cnn_1x256", "bench_hessian_resnet20"]
    others = ["bench_sam_step", "bench_landscape"]
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in [*names, *others]}
    for name, result in results.items():
        assert result["benchmark"] == name.split("_cnn")[0].split("_resnet")[0], name
        assert result["date"] and result["torch"] == torch.__version__ and "commit" in result["source"]
    for name in names[1:]:
        tasks = {row["task"] for row in results[name]["rows"]}
        libraries = {row["library"].split(" ")[0].rstrip(",") for row in results[name]["rows"]}
        assert tasks == {"top-1", "top-5", "density"} and libraries == {"PyHessian", "sharpness"}, name
    assert results["bench_hessian_resnet20"]["args"]["model"] == "resnet20"
    landscape = results["bench_landscape"]["rows"]
    assert [(r["points_per_batch"], r["batched"]) for r in landscape] == [(1, False), (3, True)]
    assert landscape[1]["max_rel_diff"] < 1e-5  # the batched grid computes the same losses
    assert "=== bench_landscape: exit 0" in (out / "gpu_checks.log").read_text()


def test_gpu_checks_script_stops_at_its_budget(tmp_path):
    env = {
        **os.environ,
        "BUDGET": "0",
        "OUT": str(tmp_path),
        "WHEELS": str(tmp_path / "none"),
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_checks.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "bench_train: not run" in done.stdout and "FAILED: bench_train" in done.stdout


def _provenance():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import provenance
    finally:
        sys.path.remove(str(BENCHMARKS))
    return provenance


def test_provenance_in_a_checkout_outside_one_and_inside_another(tmp_path, monkeypatch):
    provenance = _provenance()
    root = tmp_path / "tree"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(provenance, "ROOT", root)
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, "abc1234")
    no_git = provenance.source_state()  # as on the GPU machine: no .git
    assert no_git["commit"] == "abc1234" and no_git["modified_src_files"] is None and no_git["src_sha256"]

    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    clean = provenance.source_state()
    assert clean == {"commit": head, "modified_src_files": [], "src_sha256": no_git["src_sha256"]}
    (root / "src" / "pkg" / "a.py").write_text("x = 2\n")
    dirty = provenance.source_state()
    assert dirty["modified_src_files"] == ["src/pkg/a.py"] and dirty["src_sha256"] != clean["src_sha256"]

    inner = root / "inner"  # a tree inside another repository takes neither its commit nor its status
    (inner / "src").mkdir(parents=True)
    (inner / "src" / "b.py").write_text("y = 1\n")
    monkeypatch.setattr(provenance, "ROOT", inner)
    monkeypatch.delenv(provenance.COMMIT_VARIABLE)
    assert provenance.source_state()["commit"] is None
    assert provenance.run_info("x")["benchmark"] == "x"


def test_gpu_reduced_run_script_copies_the_results_back_flat(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {**os.environ, "OUT": str(out), "RUNS": str(runs), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "x")}
    args = [
        "demo-digits",
        "--seeds",
        "0",
        "--set",
        "epochs=2",
        "--set",
        "batch_size=64",
        "--set=model_kwargs={width: 8}",
    ]
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_reduced_run.sh"), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    runs_back = {f"{m}-seed0.{kind}" for m in ("sam", "sgd") for kind in ("summary.json", "metrics.jsonl")}
    assert names == {"compare.log", "report.md", "report.png", *runs_back}
    assert len(names) <= 8  # what a device command can return
    assert json.loads((out / "sam-seed0.summary.json").read_text())["method"] == "sam"


def test_bench_variants_runs_and_counts_passes(tmp_path):
    out = tmp_path / "variants.json"
    done = _run(
        "bench_variants.py",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--models",
        "cnn-small",
        "--batch",
        "8",
        "--rounds",
        "1",
        "--steps",
        "10",
        "--methods",
        "sam",
        "looksam",
        "interval",
        "esam",
        "msam",
        "--variant",
        "interval-k5:interval_k=5",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    rows = {row["method"]: row for row in json.loads(out.read_text())["results"][0]["rows"]}
    assert list(rows) == ["sgd", "sam", "looksam", "interval", "esam", "msam", "interval-k5"]
    backwards = {m: row["backwards_per_step"] for m, row in rows.items()}
    assert backwards == {
        "sgd": 1.0,
        "sam": 2.0,
        "looksam": 1.2,
        "interval": 1.5,
        "esam": 2.0,
        "msam": 1.0,
        "interval-k5": 1.2,
    }
    assert rows["esam"]["forwards_per_step"] == 3.0 and rows["sgd"]["time_vs_sgd"] == 1.0


def test_variants_report_computes_the_gain_kept_and_the_cost(tmp_path):
    def summary(folder, method, seed, error, cpu):
        run = tmp_path / folder / f"{method}-seed{seed}"
        run.mkdir(parents=True)
        metrics = {
            "test_error": error,
            "train_cpu_seconds": cpu,
            "train_seconds": 2 * cpu,
            "passes_per_step": cpu / 10,
            "noisy_labels_fitted": 1.0,
        }
        (run / "summary.json").write_text(
            json.dumps({"experiment": folder, "method": method, "seed": seed, "metrics": metrics})
        )

    for seed in (0, 1):
        summary("noise", "sgd", seed, 30.0 + seed / 10, 10.0)
        summary("noise", "sam", seed, 20.0 + seed / 10, 20.0)
        summary("noise", "looksam", seed, 23.0 + seed / 10, 12.0)
        summary("noise", "looksam-a0.2", seed, 25.0 + seed / 10, 12.0)
        summary("noise", "interval-k4", seed, 25.0 + seed / 10, 12.5)
        summary("clean", "sgd", seed, 10.0 + seed, 10.0)  # SAM better on one seed, worse on the other: no gain
        summary("clean", "sam", seed, 9.5 + 2 * seed, 20.0)
    out = tmp_path / "r.json"
    done = _run("variants_report.py", str(tmp_path / "noise"), "--png", str(tmp_path / "r.png"), "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())[0]["rows"]
    assert rows["looksam"]["gain_kept"] == pytest.approx(0.7) and rows["looksam"]["cost_cpu"] == 1.2
    assert rows["sam"]["cost_wall"] == 2.0 and rows["sgd"]["gain_kept"] == 0.0
    assert "| looksam | 1.20 | 1.20 | 23.05 ± " in done.stdout and "| +70% |" in done.stdout
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    bench = tmp_path / "bench.json"
    bench_rows = (("sgd", 1.0), ("sam", 1.9), ("looksam", 1.25), ("interval", 1.45), ("interval-k4", 1.2))
    rows = [{"method": m, "time_vs_sgd": t} for m, t in bench_rows]
    bench.write_text(json.dumps({"results": [{"model": "cnn-small-1x28", "rows": rows}]}))
    done = _run("variants_report.py", str(tmp_path / "noise"), "--bench", str(bench))
    assert done.returncode == 0, done.stderr
    assert "| looksam | 1.20 | 1.25 | 23.05 ± " in done.stdout and "| sam | 2.00 | 1.90 |" in done.stdout
    # A labelled run costs what the bench measured under its label, else what its method's defaults cost.
    assert "| interval-k4 | 1.25 | 1.20 |" in done.stdout and "| looksam-a0.2 | 1.20 | 1.25 |" in done.stdout
    done = _run("variants_report.py", str(tmp_path / "noise"), str(tmp_path / "clean"), "--json", str(out))
    assert done.returncode == 0, done.stderr
    noise, clean = json.loads(out.read_text())
    assert noise["rows"]["sam"]["gain_kept"] == 1.0 and math.isnan(clean["rows"]["sam"]["gain_kept"])
    assert "| noise: test error % | gain kept |" in done.stdout and "| clean: test error % |" in done.stdout
