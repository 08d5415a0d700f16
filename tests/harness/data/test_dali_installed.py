"""The test extra installs NVIDIA DALI on Linux x86_64 (CI's platform), so test_dali_decode.py, which skips where
DALI is absent, never skips there: this module fails instead."""

from __future__ import annotations

import platform
import sys

from sharpness.harness.data.dali_decode import require_dali


def test_dali_is_installed_where_the_test_extra_installs_it() -> None:
    if sys.platform == "linux" and platform.machine() == "x86_64":
        require_dali()
