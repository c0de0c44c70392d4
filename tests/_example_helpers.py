"""Shared helpers of the tests of examples/msd_colon.py (makes ``msd_colon_lib`` importable)."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

TINY_DATA = ["--image-size", "32", "--batch-size", "8", "--device", "cpu", "--quiet",
             "--threads", "1"]
"""Options of the smallest end-to-end runs on given data (``--data-dir``: no phantom options,
which only the generated phantom reads)."""
TINY = [*TINY_DATA, "--phantom-patients", "4", "--phantom-size", "48", "--phantom-slices", "10",
        "12"]
"""Options of the smallest end-to-end runs of the example (on the generated phantom)."""
