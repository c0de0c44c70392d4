"""Where the Triton kernels run in this test process; import it before anything imports Triton.

With a CUDA GPU the kernels are compiled and run on it. Without one they run on the CPU in
Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before Triton is
first imported: this module sets it when nothing has imported Triton yet. When Triton was
already imported without it (e.g. by smp or MONAI in an earlier test module), :data:`DEVICE`
is None and :func:`run_file_in_interpreter` runs a test file again in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dynloss.kernels import interpreter_active, triton_available  # noqa: E402

DEVICE: str | None
if not triton_available():
    DEVICE, SKIP = None, "triton is not installed"
elif interpreter_active():
    DEVICE, SKIP = "cpu", ""
elif CUDA:
    DEVICE, SKIP = "cuda", ""
else:
    DEVICE = None
    SKIP = "triton was imported before TRITON_INTERPRET=1; covered by a fresh-process test"


def needs_subprocess(flag: str) -> bool:
    """Whether this process cannot run the kernels but a fresh interpreter process can."""
    return (DEVICE is None and triton_available() and not CUDA
            and os.environ.get(flag) != "1")


def run_file_in_interpreter(path: str, flag: str, timeout: int = 600) -> None:
    """Run the test file ``path`` in a fresh process with ``TRITON_INTERPRET=1``."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{flag: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
