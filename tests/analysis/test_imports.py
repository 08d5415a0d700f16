"""sharpness.analysis is core library: it must not pull in the harness or the CLI."""

from __future__ import annotations

import subprocess
import sys


def test_analysis_does_not_import_harness_or_cli():
    code = (
        "import sys, sharpness.analysis\n"
        "bad = [m for m in sys.modules if m.startswith(('sharpness.harness', 'sharpness.cli'))]\n"
        "assert not bad, bad\n"
        "assert 'matplotlib' not in sys.modules  # plots import it only when drawing\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
