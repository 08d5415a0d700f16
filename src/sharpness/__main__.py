"""``python -m sharpness``: the ``sharpness`` command where the package is importable but not installed."""

import sys

from sharpness.cli.main import main

sys.exit(main())
