"""The typed user code of tests/typecheck/public_api.py runs as written (CI also runs
``mypy --strict`` on it, .ci/run): the calls whose hints it pins are valid at runtime."""

from __future__ import annotations

import runpy
from pathlib import Path


def test_the_typed_user_code_runs() -> None:
    path = Path(__file__).parent / "typecheck" / "public_api.py"
    namespace = runpy.run_path(str(path))
    namespace["main"]()
