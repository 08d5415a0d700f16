"""benchmarks/bench_decode.py runs end to end on a few tiny generated JPEGs (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"


def _run(out: Path, decoder: str, workers: str) -> subprocess.CompletedProcess:
    args = ["--images", "8", "--size", "64", "48", "--workers", "0", workers, "--batch", "4", "--repeats", "1"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--decoders", decoder, "--json", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_bench_decode_runs(tmp_path):
    out = tmp_path / "decode.json"
    done = _run(out, "pillow", "1")
    assert "images/s" in done.stdout and "CPU ms/image" in done.stdout
    result = json.loads(out.read_text())
    assert result["benchmark"] == "bench_decode" and result["setup"]["images"] == 8
    names = [(row["variant"], row["workers"]) for row in result["rows"]]
    assert names == [
        (v, w) for v in ("train pillow", "train pillow dct", "eval  pillow", "eval  pillow dct") for w in (0, 1)
    ]
    assert all(len(row["images_per_s"]) == 1 for row in result["rows"])
    assert all("cpu_ms_per_image" in row for row in result["rows"] if row["workers"] == 0)


def test_bench_decode_times_dali_threads(tmp_path):
    out = tmp_path / "decode.json"
    _run(out, "dali", "2")
    rows = json.loads(out.read_text())["rows"]
    assert [(row["variant"], row["workers"]) for row in rows] == [("train dali", 2), ("eval  dali", 2)]
    assert all(row["images_per_s"][0] > 0 and row["cpu_ms_per_image"][0] > 0 for row in rows)
