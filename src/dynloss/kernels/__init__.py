"""Backends and dispatch.

``backend="auto"`` picks the fastest correct path for the tensor's device: the Triton kernels
(:mod:`dynloss.kernels.triton_region`, :mod:`~dynloss.kernels.triton_pixel`) for CUDA tensors
when Triton imports; the compiled C++ kernels of :mod:`dynloss.kernels.native_cpu` for float32
CPU tensors when they build (a C++ compiler is needed once); else the fused eager autograd
Functions of :mod:`dynloss.kernels.torch_fused`. ``"torch"`` forces the fused eager path,
``"native"`` the C++ kernels (float32 CPU tensors), ``"triton"`` the Triton kernels (CUDA
tensors; CPU tensors only under Triton's interpreter, ``TRITON_INTERPRET=1`` set before Triton
is first imported), and ``"reference"`` (handled in :mod:`dynloss.functional`) runs the
formulas as plain autograd code.

float64 inputs always take the ``"torch"`` path (the kernels accumulate in float32), and so do
float16/bfloat16 CPU inputs under ``"native"``. TopK always runs on ``"torch"`` or
``"triton"``: its selection has no native kernel. Inside ``torch.compile`` ``"auto"`` takes
the ``"torch"`` path on CPU, which the compiler traces and fuses (it cannot trace the native
kernels' ctypes call).

Importing :mod:`dynloss` never imports Triton; the Triton modules are imported on the first
call that dispatches to them.

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

import os
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from .._layout import Layout
from .fused import RegionPixelLoss, region_pixel_loss
from .native_cpu import NativeLoss, native_available, native_status, native_supports
from .torch_fused import PixelLossSum, RegionSums

__all__ = [
    "RegionPixelLoss",
    "interpreter_active",
    "native_available",
    "native_runs",
    "native_status",
    "pixel_loss_sum",
    "region_pixel_loss",
    "region_pixel_sums",
    "region_sums",
    "resolve_backend",
    "triton_available",
]


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works (cached; never raises).

    Examples:
        >>> from dynloss.kernels import triton_available
        >>> isinstance(triton_available(), bool)
        True
    """
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreter_active() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter in this process.

    True when ``TRITON_INTERPRET=1`` was set *before* Triton was first imported (Triton's own
    library functions are decorated at import time, so setting it later does not work).

    Examples:
        >>> from dynloss.kernels import interpreter_active
        >>> isinstance(interpreter_active(), bool)
        True
    """
    if not (_interpret_env() and triton_available()):
        return False
    import triton.language as tl

    return type(tl.cumsum).__name__ == "InterpretedFunction"


@lru_cache(maxsize=16)
def _cuda_supported(index: int) -> bool:
    major, _ = torch.cuda.get_device_capability(index)
    return major >= 7


def _triton_refusal(x: Tensor) -> str | None:
    """Why ``backend="triton"`` cannot run on ``x`` (``None`` if it can)."""
    if not triton_available():
        return "Triton is not installed (pip install triton)"
    if x.device.type == "cuda":
        if not _cuda_supported(x.device.index if x.device.index is not None
                               else torch.cuda.current_device()):
            return "the GPU's compute capability is below 7.0, which Triton does not support"
        return None
    if interpreter_active():
        return None
    if _interpret_env():
        return (
            "TRITON_INTERPRET=1 was set after Triton had been imported; set it before the "
            "first 'import triton' (or anything that imports it)"
        )
    return (
        f"it needs a CUDA tensor; got a tensor on {x.device.type} (to run the kernels on the "
        "CPU in Triton's interpreter, e.g. in tests, set TRITON_INTERPRET=1 before Triton is "
        "imported)"
    )


def _native_refusal(x: Tensor) -> str | None:
    """Why ``backend="native"`` cannot run on ``x`` (``None`` if it can)."""
    if x.device.type != "cpu":
        return f"it needs a CPU tensor; got a tensor on {x.device.type}"
    if not native_available():
        return native_status()
    return None


def resolve_backend(x: Tensor, backend: str) -> str:
    """``"triton"``, ``"native"`` or ``"torch"``: what runs for ``x`` and ``backend``.

    Raises:
        ValueError: ``backend="triton"`` or ``"native"`` where those kernels cannot run.

    Examples:
        >>> import torch
        >>> from dynloss.kernels import native_available, resolve_backend
        >>> x = torch.zeros(2, 1, 4, 4)  # a float32 CPU tensor
        >>> resolve_backend(x, "auto") == ("native" if native_available() else "torch")
        True
        >>> resolve_backend(x.double(), "triton")  # float64 always takes the torch path
        'torch'
        >>> resolve_backend(x.half(), "auto")
        'torch'
    """
    if backend == "torch" or x.dtype == torch.float64:
        return "torch"
    if backend == "native":
        reason = _native_refusal(x)
        if reason is not None:
            raise ValueError(f"backend='native' cannot run: {reason}; use backend='auto' or "
                             "'torch'")
        return "native" if native_supports(x) else "torch"
    if backend == "triton":
        reason = _triton_refusal(x)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run: {reason}; use backend='auto' or "
                             "'torch'")
        return "triton"
    if backend == "auto" and x.device.type == "cuda" and _triton_refusal(x) is None:
        return "triton"
    if backend == "auto" and native_supports(x) and not _compiling() and native_available():
        return "native"
    return "torch"


def _compiling() -> bool:
    """Whether ``torch.compile`` is tracing: it fuses the torch path, but cannot trace ctypes."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def native_runs(x: Tensor, backend: str) -> bool:
    """Whether the native kernels compute a (non-TopK) loss of ``x`` under ``backend``.

    The losses then leave the value checks to the kernels' forward pass.

    Examples:
        >>> import torch
        >>> from dynloss.kernels import native_runs
        >>> native_runs(torch.zeros(1, 1, 2, 2, dtype=torch.float64), "auto")
        False
    """
    return backend in ("auto", "native") and resolve_backend(x, backend) == "native"


def region_sums(
    layout: Layout, *, from_logits: bool, ignore_index: int | None, backend: str,
    pooled: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(I, P, G)`` of shape ``(N, C)`` with a fused backward.

    Per sample and class, over the kept elements (``ignore_index`` left out):
    :math:`I = \sum_i p_i g_i`, :math:`P = \sum_i p_i`, :math:`G = \sum_i g_i`, where ``p`` is
    the sigmoid (binary, multilabel) or softmax over classes (multiclass) of ``layout.x`` when
    ``from_logits``, and ``g`` the target (one-hot of the class indices in multiclass mode).
    Sums are float32 (float64 for float64 input). The backward is one elementwise pass and
    keeps at most one input-sized tensor. ``backend`` is resolved by :func:`resolve_backend`.

    ``pooled=True`` allows (not requires) sums already pooled over the batch, shape ``(1, C)``,
    for callers that only need their sum over dim 0.

    Examples:
        >>> import torch
        >>> from dynloss._layout import prepare
        >>> from dynloss.kernels import region_sums
        >>> logits = torch.zeros(2, 1, 2, 2)  # p = 0.5 everywhere
        >>> target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
        >>> layout = prepare(logits, target, "binary", from_logits=True, ignore_index=None,
        ...                  check_values=True)
        >>> i, p, g = region_sums(layout, from_logits=True, ignore_index=None, backend="torch")
        >>> i.flatten().tolist(), p.flatten().tolist(), g.flatten().tolist()
        ([0.5, 2.0], [2.0, 2.0], [1.0, 4.0])
    """
    resolved = resolve_backend(layout.x, backend)
    if resolved == "native":
        intersection, prediction_sum, target_sum, _, _ = NativeLoss.apply(
            layout.x, layout.target, layout.mode, from_logits, ignore_index, 0.0, None, True,
            False, layout.deferred_value_check,
        )
        return intersection, prediction_sum, target_sum
    if resolved == "triton":
        from .triton_region import TritonRegionSums

        return TritonRegionSums.apply(
            layout.x, layout.target, layout.mode, from_logits, ignore_index
        )
    return RegionSums.apply(layout.x, layout.target, layout.mode, from_logits, ignore_index,
                            pooled)


def pixel_loss_sum(
    layout: Layout,
    *,
    gamma: float,
    alpha: float | Sequence[float] | None,
    k: float | None,
    from_logits: bool,
    ignore_index: int | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    r"""Sum of the per-element losses and the normaliser of their mean: ``(S, count)``.

    The per-element loss is the focal loss :math:`a\,(1 - e^{-b})^\gamma\, b` of the binary
    (softmax in multiclass mode) cross-entropy :math:`b`, where :math:`a` is ``alpha`` for
    positives and ``1 - alpha`` for negatives (binary, multilabel), the true class's weight
    ``alpha[c]`` (multiclass), or 1 (``alpha=None``); ``gamma=0`` and ``alpha=None`` give BCE.
    ``count`` is the number of kept (not ignored) elements. With ``k`` (a fraction in
    (0, 1]) only the :math:`\lceil k \cdot count \rceil` largest losses are summed and
    ``count`` is that number (TopK). Both are 0-dim float32 tensors (float64 for float64
    input); the loss is ``S / count``.

    Examples:
        >>> import torch
        >>> from dynloss._layout import prepare
        >>> from dynloss.kernels import pixel_loss_sum
        >>> logits = torch.tensor([[[[-2.0, 0.0], [1.0, 3.0]]]])
        >>> target = torch.tensor([[[[1.0, 255.0], [0.0, 1.0]]]])  # one pixel ignored
        >>> layout = prepare(logits, target, "binary", from_logits=True, ignore_index=255,
        ...                  check_values=True)
        >>> args = dict(gamma=0.0, alpha=None, from_logits=True, ignore_index=255,
        ...             backend="torch")
        >>> total, count = pixel_loss_sum(layout, k=None, **args)  # BCE 2.1269 + 1.3133 + 0.0486
        >>> round(total.item(), 4), count.item()
        (3.4888, 3.0)
        >>> total, count = pixel_loss_sum(layout, k=0.5, **args)  # the ceil(1.5) = 2 largest
        >>> round(total.item(), 4), count.item()
        (3.4402, 2.0)
    """
    resolved = resolve_backend(layout.x, backend)
    if resolved == "native" and k is None:
        _, _, _, total, count = NativeLoss.apply(
            layout.x, layout.target, layout.mode, from_logits, ignore_index, gamma, alpha,
            False, True, layout.deferred_value_check,
        )
        return total, count
    if resolved == "triton":
        from .triton_pixel import TritonPixelLossSum

        return TritonPixelLossSum.apply(
            layout.x, layout.target, layout.mode, from_logits, ignore_index, gamma, alpha, k
        )
    return PixelLossSum.apply(
        layout.x, layout.target, layout.mode, from_logits, ignore_index, gamma, alpha, k
    )


def region_pixel_sums(
    layout: Layout,
    *,
    gamma: float,
    alpha: float | Sequence[float] | None,
    from_logits: bool,
    ignore_index: int | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(I, P, G, S, count)``: region sums and pixel-loss sum in one pass where possible.

    ``(I, P, G)`` are those of :func:`region_sums` (shape ``(N, C)``), ``(S, count)`` those of
    :func:`pixel_loss_sum` without TopK (0-dim). The Triton and native paths run one fused forward
    and one fused backward pass; the torch path runs :class:`RegionSums` and
    :class:`PixelLossSum` one after the other.

    Examples:
        >>> import torch
        >>> from dynloss._layout import prepare
        >>> from dynloss.kernels import region_pixel_sums
        >>> logits = torch.zeros(2, 1, 2, 2)  # p = 0.5, BCE = log 2 everywhere
        >>> target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
        >>> layout = prepare(logits, target, "binary", from_logits=True, ignore_index=None,
        ...                  check_values=True)
        >>> i, p, g, total, count = region_pixel_sums(
        ...     layout, gamma=0.0, alpha=None, from_logits=True, ignore_index=None,
        ...     backend="torch")
        >>> i.flatten().tolist(), round(total.item(), 4), count.item()  # total = 8 log 2
        ([0.5, 2.0], 5.5452, 8.0)
    """
    resolved = resolve_backend(layout.x, backend)
    if resolved == "native":
        return NativeLoss.apply(
            layout.x, layout.target, layout.mode, from_logits, ignore_index, gamma, alpha,
            True, True, layout.deferred_value_check,
        )
    if resolved == "triton":
        from .triton_fused import TritonRegionPixel

        return TritonRegionPixel.apply(
            layout.x, layout.target, layout.mode, from_logits, ignore_index, gamma, alpha
        )
    intersection, prediction_sum, target_sum = RegionSums.apply(
        layout.x, layout.target, layout.mode, from_logits, ignore_index
    )
    total, count = PixelLossSum.apply(
        layout.x, layout.target, layout.mode, from_logits, ignore_index, gamma, alpha, None
    )
    return intersection, prediction_sum, target_sum, total, count
