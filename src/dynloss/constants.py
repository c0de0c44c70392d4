"""Names shared by every loss: modes, reductions and backends.

Modes follow segmentation-models-pytorch's constants so code written for smp reads the same:

>>> from dynloss.constants import BINARY_MODE, MULTICLASS_MODE, MULTILABEL_MODE
>>> BINARY_MODE, MULTILABEL_MODE, MULTICLASS_MODE
('binary', 'multilabel', 'multiclass')

Every ``mode``, ``reduction`` and ``backend`` argument takes one of these tuples' values
(the first is the default of ``reduction`` and ``backend``); ``Mode``, ``Reduction`` and
``Backend`` are the matching ``Literal`` types for annotations:

>>> import typing
>>> from dynloss.constants import BACKENDS, MODES, REDUCTIONS, Backend, Mode, Reduction
>>> MODES
('binary', 'multilabel', 'multiclass')
>>> REDUCTIONS, BACKENDS
(('mean', 'sum', 'none'), ('auto', 'torch', 'native', 'triton', 'reference'))
>>> [typing.get_args(t) for t in (Mode, Reduction, Backend)] == [MODES, REDUCTIONS, BACKENDS]
True
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "BACKENDS",
    "BINARY_MODE",
    "MODES",
    "MULTICLASS_MODE",
    "MULTILABEL_MODE",
    "REDUCTIONS",
    "Backend",
    "Mode",
    "Reduction",
]

BINARY_MODE: Final = "binary"
"""One foreground channel, sigmoid. Input ``(N, 1, *spatial)`` or ``(N, *spatial)``."""

MULTILABEL_MODE: Final = "multilabel"
"""``C`` independent foreground channels, a sigmoid per channel. Target has the input's shape."""

MULTICLASS_MODE: Final = "multiclass"
"""``C >= 2`` mutually exclusive classes, softmax over dim 1. Target holds class indices."""

MODES: Final = (BINARY_MODE, MULTILABEL_MODE, MULTICLASS_MODE)
"""The values of ``mode``. The losses default to ``"binary"``."""

REDUCTIONS: Final = ("mean", "sum", "none")
"""The values of ``reduction`` (default ``"mean"``). ``"none"`` returns the per-element loss
(BCE, Focal, TopK) or the loss per class, ``(C,)``, or per sample and class, ``(N, C)`` with
``per_image=True`` (region losses)."""

BACKENDS: Final = ("auto", "torch", "native", "triton", "reference")
"""``"reference"``: the formulas as plain autograd code; ``"torch"``: fused autograd Functions
with analytic backward (any device); ``"native"``: C++ kernels compiled at first use (float32
CPU tensors); ``"triton"``: fused Triton kernels (CUDA tensors, or CPU under
``TRITON_INTERPRET=1``); ``"auto"``: the fastest correct path for the device (Triton on CUDA
when it imports, native on CPU when it builds, else ``"torch"``)."""

Mode = Literal["binary", "multilabel", "multiclass"]
"""``Literal`` type of :data:`MODES`."""
Reduction = Literal["mean", "sum", "none"]
"""``Literal`` type of :data:`REDUCTIONS`."""
Backend = Literal["auto", "torch", "native", "triton", "reference"]
"""``Literal`` type of :data:`BACKENDS`."""
