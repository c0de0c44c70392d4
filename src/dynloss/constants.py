"""Names shared by every loss: modes, reductions and backends.

Modes follow segmentation-models-pytorch's constants so code written for smp reads the same:

>>> from dynloss.constants import BINARY_MODE, MULTICLASS_MODE
>>> BINARY_MODE, MULTICLASS_MODE
('binary', 'multiclass')
"""

from __future__ import annotations

from typing import Final, Literal

BINARY_MODE: Final = "binary"
"""One foreground channel, sigmoid. Input ``(N, 1, *spatial)`` or ``(N, *spatial)``."""

MULTILABEL_MODE: Final = "multilabel"
"""``C`` independent foreground channels, a sigmoid per channel. Target has the input's shape."""

MULTICLASS_MODE: Final = "multiclass"
"""``C >= 2`` mutually exclusive classes, softmax over dim 1. Target holds class indices."""

MODES: Final = (BINARY_MODE, MULTILABEL_MODE, MULTICLASS_MODE)
REDUCTIONS: Final = ("mean", "sum", "none")
BACKENDS: Final = ("auto", "torch", "native", "triton", "reference")
"""``"reference"``: the formulas as plain autograd code; ``"torch"``: fused autograd Functions
with analytic backward (any device); ``"native"``: C++ kernels compiled at first use (float32
CPU tensors); ``"triton"``: fused Triton kernels (CUDA tensors, or CPU under
``TRITON_INTERPRET=1``); ``"auto"``: the fastest correct path for the device (Triton on CUDA
when it imports, native on CPU when it builds, else ``"torch"``)."""

Mode = Literal["binary", "multilabel", "multiclass"]
Reduction = Literal["mean", "sum", "none"]
Backend = Literal["auto", "torch", "native", "triton", "reference"]
