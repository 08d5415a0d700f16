"""Every recipe in ``examples/`` runs as a user would run it, ``python examples/NAME.py``, and succeeds.

Each script asserts the property it demonstrates (bit-identical forms, skipped inf steps, identical DDP replicas,
...) and ends by printing a line starting with ``OK:``; a broken recipe exits non-zero.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "examples").glob("*.py"))


def test_every_recipe_has_an_example():
    names = {script.stem for script in SCRIPTS}
    expected = {
        "quickstart",
        "two_pass_loop",
        "amp_grad_scaler",
        "trainer_style_step",
        "ddp",
        "fsdp",
        "grad_accumulation",
        "batchnorm",
        "asam_and_options",
        "m_sharpness",
        "variants",
    }
    assert len(SCRIPTS) >= 11
    assert expected <= names, f"missing: {sorted(expected - names)}"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[script.stem for script in SCRIPTS])
def test_example_runs(script: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, f"{script.name} exited with {result.returncode}\n{output}"
    lines = result.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("OK:"), f"{script.name} did not report success\n{output}"
