"""Backends and dispatch.

Every loss is computed by one of four backends, chosen per call by
:mod:`dynloss.kernels.dispatch` from what each declares it can do:

* ``"reference"`` (:mod:`~dynloss.kernels.reference`): the formulas of :mod:`dynloss._math`
  as plain autograd code. Any device and dtype, every option (a gradient for the target,
  ``reduction="none"``, ``torch.compile``).
* ``"torch"`` (:mod:`~dynloss.kernels.torch_backend`): fused eager autograd Functions with an
  analytic backward, any device.
* ``"native"`` (:mod:`dynloss.kernels.native`): C++ kernels compiled at first use, float32
  and float64 CPU tensors (float64 computed in double; float16/bfloat16 read as a float32
  copy).
* ``"triton"`` (:mod:`dynloss.kernels.triton`): Triton kernels, CUDA tensors (CPU tensors
  only under Triton's interpreter, ``TRITON_INTERPRET=1`` set before Triton is first imported).

``backend="auto"`` takes, per call, the fastest that covers it: Triton on CUDA, native on the
CPU (but for rows of fewer than 16 pixels whose sums are kept per row; both also
``reduction="none"`` of BCE and Focal, native of TopK too), else ``"torch"``, else the
reference (for example for a target that requires a gradient,
TopK's ``reduction="none"`` off the CPU, or inside ``torch.compile``
on the CPU, which traces and fuses the reference; on CUDA a compiled call runs the Triton
kernels as custom operators). Naming a backend uses it where it can and says once
(a ``RuntimeWarning``) when a call needs something it lacks; ``"native"``/``"triton"`` where
they cannot run at all is a ``ValueError``. Importing :mod:`dynloss` never imports Triton.

The backends compute the same loss; only the speed and the memory kept for backward differ:

>>> import torch
>>> from dynloss import DiceLoss
>>> logits = torch.linspace(-3, 3, 32, dtype=torch.float64).reshape(2, 1, 4, 4)
>>> target = (logits > 0.5).double()
>>> fused = DiceLoss(backend="torch")(logits, target)
>>> reference = DiceLoss(backend="reference")(logits, target)
>>> round(fused.item(), 6), torch.allclose(fused, reference, rtol=1e-12, atol=0.0)
(0.245938, True)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .capabilities import Need
from .dispatch import select
from .native import native_available, native_status
from .triton import interpreter_active, triton_available

__all__ = [
    "interpreter_active",
    "native_available",
    "native_runs",
    "native_status",
    "resolve_backend",
    "triton_available",
]


def resolve_backend(x: Tensor, backend: str) -> str:
    """The name of the backend that computes a region loss of ``x`` under ``backend``, in
    binary mode pooled over the batch (``DiceLoss()``'s defaults: ``x`` is ``(N, 1,
    *spatial)`` or ``(N, *spatial)``).

    Raises:
        ValueError: ``backend="triton"`` or ``"native"`` where those kernels cannot run.

    Examples:
        >>> import torch
        >>> from dynloss.kernels import native_available, resolve_backend
        >>> x = torch.zeros(2, 1, 4, 4)  # a float32 CPU tensor
        >>> resolve_backend(x, "auto") == ("native" if native_available() else "torch")
        True
        >>> resolve_backend(x.double(), "auto") == resolve_backend(x, "auto")  # in double
        True
        >>> resolve_backend(x, "torch")
        'torch'
        >>> resolve_backend(x.half(), "auto") == resolve_backend(x, "auto")  # a float32 copy
        True
    """
    from .._checks import check_backend

    check_backend(backend)
    return select(backend, x, Need("region"), classes=1).name


def native_runs(x: Tensor, backend: str) -> bool:
    """Whether the native kernels compute a region loss of ``x`` under ``backend``.

    Examples:
        >>> import torch
        >>> from dynloss.kernels import native_runs
        >>> native_runs(torch.zeros(1, 1, 2, 2), "torch")
        False
    """
    return resolve_backend(x, backend) == "native"


def __getattr__(name: str) -> Any:
    """The deprecated names (``region_pixel_loss``, ``RegionPixelLoss``, ``region_sums``,
    ``pixel_loss_sum``, ``region_pixel_sums``): see :mod:`dynloss._deprecated`."""
    if name in ("region_pixel_loss", "RegionPixelLoss", "REGION_TERMS", "PIXEL_TERMS",
                "region_sums", "pixel_loss_sum", "region_pixel_sums"):
        from .. import _deprecated

        return getattr(_deprecated, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
