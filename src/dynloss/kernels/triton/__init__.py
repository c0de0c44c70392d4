"""The ``"triton"`` backend: Triton kernels for CUDA tensors (CPU under Triton's interpreter).

Files: ``math.py`` (element-wise helpers in Triton), ``stream.py`` (Dice/IoU/Tversky,
BCE/Focal and fused composites: a streaming pass and a one-program epilogue forward, one pass
backward), ``topk.py`` (TopK by radix select: a zero fill and four passes forward, one pass
backward), ``ops.py`` (the same kernels as ``torch.library`` custom operators, which
``torch.compile`` traces). No launch reads anything on the host and no torch operation runs
between the launches (TopK's zero fill aside), so a step can be captured in a CUDA graph; NaN
or infinite kept inputs and invalid targets are counted in the kernels and make the loss NaN.

Importing this package does not import Triton: :func:`triton_available` tries it once, and
the kernel modules are imported on the first call that runs them. On the CPU the kernels run
only in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before Triton is first
imported (tests use it; it is slow).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ... import _math
from ..._layout import Layout, invalid_values, kernel_target
from ..._params import CompositeParams, DistributionParams, RegionParams
from ..._recorder import traced
from .. import reference
from ..capabilities import Capabilities

__all__ = ["MAX_CLASSES", "MAX_ROWS", "TRITON", "interpreter_active", "triton_available"]

MAX_CLASSES = 1024
"""The multiclass kernels hold a tile of every class's logits: up to this many classes."""

MAX_ROWS = 2**28
"""The kernels address their partial sums (a few per row of ``N x C``) with int32 offsets,
which would wrap from about 3.6e8 rows on: up to this many rows (more go to another
backend)."""


_AVAILABLE: list[bool] = []
_IMPORT_ERROR: list[BaseException] = []


def triton_available() -> bool:
    """Whether ``import triton`` works (cached; never raises).

    Examples:
        >>> from dynloss.kernels import triton_available
        >>> import importlib.util
        >>> triton_available() == (importlib.util.find_spec("triton") is not None)
        True
    """
    if not _AVAILABLE:  # a plain cache: torch.compile traces it without a warning
        try:
            import triton
            import triton.language  # noqa: F401
        except Exception as error:
            _AVAILABLE.append(False)
            _IMPORT_ERROR.append(error)
        else:
            _AVAILABLE.append(True)
    return _AVAILABLE[0]


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreter_active() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter in this process.

    True when ``TRITON_INTERPRET=1`` was set *before* Triton was first imported (Triton's own
    library functions are decorated at import time, so setting it later does not work).

    Examples:
        >>> import os
        >>> from dynloss.kernels import interpreter_active, triton_available
        >>> interpreter_active() <= (os.environ.get("TRITON_INTERPRET") == "1"
        ...                          and triton_available())
        True
    """
    if not (_interpret_env() and triton_available()):
        return False
    import triton.language as tl

    return type(tl.cumsum).__name__ == "InterpretedFunction"


_CUDA_SUPPORTED: dict[int, bool] = {}


def _cuda_supported(index: int) -> bool:
    supported = _CUDA_SUPPORTED.get(index)
    if supported is None:
        supported = _CUDA_SUPPORTED[index] = torch.cuda.get_device_capability(index)[0] >= 7
    return supported


def _poison(layout: Layout, ignore_index: int | None, from_logits: bool, checked: bool
            ) -> Tensor:
    return _math.non_finite_poison(invalid_values(layout, ignore_index, from_logits,
                                                  not checked))


_KERNELS: dict[str, Any] = {}


def _kernels() -> dict[str, Any]:
    """The kernel modules, imported on first use (this imports Triton)."""
    if not _KERNELS:
        from . import stream, topk

        _KERNELS.update(fused=stream.TritonFusedLoss.apply, sums=stream.TritonRegionSums.apply,
                        topk=topk.TritonTopK.apply)
    return _KERNELS


class TritonBackend:
    """The Triton backend (see the package documentation).

    Every op is a few kernel launches and no host synchronisation: Dice/IoU/Tversky,
    BCE/Focal and the fused composites are one streaming pass plus a one-program epilogue
    forward and one pass backward (:mod:`~dynloss.kernels.triton.stream`; BCE/Focal with
    ``reduction="none"`` one pass each way, no epilogue); TopK is a radix
    select (:mod:`~dynloss.kernels.triton.topk`). NaN or infinite kept inputs and invalid
    targets are counted in the kernels and make the loss NaN. Inside ``torch.compile`` the
    same kernels run as ``torch.library`` custom operators
    (:mod:`~dynloss.kernels.triton.ops`). Empty inputs go to the reference.
    """

    name = "triton"
    capabilities = Capabilities(
        devices=frozenset({"cuda", "cpu"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        topk=True, pos_weight=True, weighted_mean=True, ddp_pool=True, class_choice=True,
        double_backward=True, compilable=True, max_classes=MAX_CLASSES, max_rows=MAX_ROWS,
        # BCE/Focal per element (one pass each way); TopK's go to another backend
        reduction_none=True,
    )

    def unavailable(self, x: Tensor) -> str | None:
        if not triton_available():
            error = _IMPORT_ERROR[0] if _IMPORT_ERROR else None
            if error is None or (isinstance(error, ModuleNotFoundError)
                                 and error.name == "triton"):
                return "Triton is not installed (pip install triton)"
            # installed, but its import failed (the interpreter needs numpy, for one)
            return (f"Triton is installed but could not be imported "
                    f"({type(error).__name__}: {error})")
        if x.device.type == "cuda":
            index = x.device.index if x.device.index is not None else torch.cuda.current_device()
            if not _cuda_supported(index):
                return "the GPU's compute capability is below 7.0, which Triton does not support"
            return None
        if x.device.type == "cpu" and interpreter_active():
            return None
        if x.device.type == "cpu" and _interpret_env():
            return ("TRITON_INTERPRET=1 was set after Triton had been imported; set it before "
                    "the first 'import triton' (or anything that imports it)")
        return (f"it needs a CUDA tensor; got a tensor on {x.device.type} (to run the kernels "
                "on the CPU in Triton's interpreter, e.g. in tests, set TRITON_INTERPRET=1 "
                "before Triton is imported)")

    def region(self, layout: Layout, params: RegionParams, checked: bool) -> Tensor:
        if layout.x.numel() == 0:
            return reference.REFERENCE.region(layout, params, checked)
        target = kernel_target(layout.target, layout.mode, params.ignore_index)
        if params.ddp_pool:
            if traced(layout.x):  # (the sums' eager kernels; the reference traces)
                return reference.REFERENCE.region(layout, params, checked)
            sums = _kernels()["sums"](layout.x, target, params, checked)
            return reference.score_loss(sums, params, _poison(layout, params.ignore_index,
                                                              params.from_logits, checked))
        if traced(layout.x):
            from . import ops, stream

            scores = ops.fused(layout.x, target, stream.build_spec(params))
        else:
            scores = _kernels()["fused"](layout.x, target, layout.mode, params, checked)
        assert isinstance(scores, Tensor)  # (a region op: one output)
        if params.reduction == "none" and not params.include_background:
            return scores[..., 1:]  # (the kernels score class 0 as 0)
        return scores

    def distribution(self, layout: Layout, params: DistributionParams, checked: bool
                     ) -> Tensor:
        if layout.x.numel() == 0:
            return reference.REFERENCE.distribution(layout, params, checked)
        target = kernel_target(layout.target, layout.mode, params.ignore_index)
        if traced(layout.x):
            from . import ops, stream, topk

            if params.k is not None:
                return ops.topk_loss(layout.x, target, topk.build_topk_spec(params))
            value = ops.fused(layout.x, target, stream.build_spec(params))
            assert isinstance(value, Tensor)  # (a distribution op: one output)
            return (value.reshape(layout.elementwise_shape) if params.reduction == "none"
                    else value)
        if params.k is not None:
            return _kernels()["topk"](layout.x, target, params, checked)
        loss = _kernels()["fused"](layout.x, target, layout.mode, params, checked)
        # reduction="none": the kernels' (N, C, M) / (N, M) losses in the caller's shape
        return loss.reshape(layout.elementwise_shape) if params.reduction == "none" else loss

    def composite(self, layout: Layout, params: CompositeParams, checked: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
        if layout.x.numel() == 0:
            return reference.REFERENCE.composite(layout, params, checked)
        target = kernel_target(layout.target, layout.mode,
                               params.region.ignore_index)
        if traced(layout.x):
            from . import ops, stream

            return ops.fused(layout.x, target, stream.build_spec(params))  # type: ignore[return-value]
        return _kernels()["fused"](layout.x, target, layout.mode, params, checked)


TRITON = TritonBackend()
"""The Triton backend."""
