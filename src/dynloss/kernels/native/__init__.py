"""The ``"native"`` backend: C++ kernels for float32 and float64 CPU tensors (float64 computed
in double; float16 and bfloat16 read as a float32 copy), compiled at first use.

Files: ``abi.py`` (the C struct and its version), ``build.py`` (compile, lock, cache, verify,
load), ``ffi.py`` (the ctypes calls), ``autograd.py`` (one autograd node per loss),
``ops.py`` (the same as ``torch.library`` custom operators, which ``torch.compile`` traces),
``buffer_pool.py`` (the saved buffers, reused step to step) and ``native_cpu.cpp``.

What it computes: float32 and float64 input on the CPU, every mode, logits or probabilities,
``ignore_index``, soft labels: Dice/IoU/Tversky (also ``ddp_pool``, ``reduction="none"``),
BCE and Focal (``"mean"``/``"sum"``/``"none"``), TopK (``"mean"``/``"sum"``/``"none"``;
selected by a radix select in the kernels, no sort) and the fused composites of a region and
BCE/Focal term; inside ``torch.compile`` (and for fake tensors) the same through the custom
operators of ``ops.py``. A target that needs a gradient and other devices go to the next
backend (see :mod:`dynloss.kernels.dispatch`). With float32
input, targets of dtype float32, bool, uint8 and int64 are read as they are; with float64
input, float64 targets (binary/multilabel) and int64 class indices; others are converted
first.

Importing this package builds nothing: the first call that needs the kernels does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _math
from ..._layout import Layout, invalid_elements
from ..._params import CompositeParams, DistributionParams, RegionParams
from ..._recorder import traced
from ..._warn import constant_in_graphs
from ...distributed import is_distributed
from .. import reference
from ..capabilities import Capabilities
from . import ops  # (registers the custom operators: an exported program needs them)
from .autograd import (
    NativeCompositeLoss,
    NativeDistributionElements,
    NativeDistributionLoss,
    NativeRegionLoss,
    NativeSums,
)
from .build import library, status
from .ffi import kernel_dims

__all__ = ["NATIVE", "native_available", "native_status"]


def native_status() -> str:
    """``""`` when the native CPU kernels are loaded, else why not (builds them on first call).

    Examples:
        >>> from dynloss.kernels import native_available, native_status
        >>> (native_status() == "") == native_available()
        True
    """
    return status()


def native_available() -> bool:
    """Whether the native CPU kernels are built and loaded (builds them on first call).

    Examples:
        >>> import torch
        >>> from dynloss.kernels import native_available, resolve_backend
        >>> resolve_backend(torch.zeros(1, 1, 4), "auto") == (
        ...     "native" if native_available() else "torch")
        True
    """
    return library() is not None


class NativeBackend:
    """The native backend (see the package documentation)."""

    name = "native"
    capabilities = Capabilities(
        # 16-bit inputs are read as a float32 copy made for the forward pass (ffi.py's
        # native_forward; backward's float32 gradient autograd casts to the input's dtype)
        devices=frozenset({"cpu"}),
        # float64 is computed in double
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64}),
        topk=True,
        pos_weight=True, topk_pos_weight=True, weighted_mean=True, ddp_pool=True,
        class_choice=True, double_backward=True, checks_values=True,
        # inside torch.compile: the same kernels as custom operators (ops.py); "auto" takes
        # them there for TopK, multiclass BCE/Focal and the fused composite at any size; for
        # binary and multilabel BCE from 2**18 input elements and Focal from 2**16 (below,
        # their fixed ~0.3 ms a call loses to the compiled reference); for binary and
        # multilabel Dice/IoU/Tversky never (Inductor fuses the reference as fast or faster:
        # one pass each way pooled over a binary batch; per image or with several channels
        # the compiled reference was faster in the benchmark, 1.9-2.0 ms against 2.2-2.4 at
        # (8, 3, 256, 256)); multiclass from 2**16 (the compiled reference is a graph 4-5x
        # slower than the operators at (8, 4, 256, 256)): docs/performance.md
        compilable=True,
        in_graphs_from=(("region, one row", None), ("region, per row", None),
                        ("region, multiclass", 2**16), ("distribution", 2**18),
                        ("distribution, focal", 2**16)),
        # BCE/Focal/TopK per element (TopK: 0 outside the selection)
        reduction_none=True, topk_reduction_none=True,
        # per-row work of the kernels: below 16 pixels per row the torch backend is faster
        # where the sums are kept per row (docs/kernels.md, "Short rows")
        min_row_length=16,
    )

    def unavailable(self, x: Tensor) -> str | None:
        if x.device.type != "cpu":
            return f"it needs a CPU tensor; got a tensor on {x.device.type}"
        return _load_status() or None

    def region(self, layout: Layout, params: RegionParams, checked: bool) -> Tensor:
        in_graph = traced(layout.input)
        if params.ddp_pool and is_distributed():  # sums all-reduced before the score
            if in_graph:  # (the sums' eager kernels; the reference traces)
                return reference.REFERENCE.region(layout, params, checked)
            *sums, poison = NativeSums.apply(_input(layout), layout.target_input, layout.mode,
                                             layout.dims, params, checked)
            return reference.score_loss(sums, params, poison)
        # (one process: pooling over the ranks is the identity, the one-node loss is exact)
        if in_graph:
            return ops.native_loss("region", layout.input, layout.target_input, params,
                                   checked)
        return NativeRegionLoss.apply(_input(layout), layout.target_input, layout.mode,
                                      kernel_dims(layout, params), params, checked)

    def distribution(self, layout: Layout, params: DistributionParams, checked: bool
                     ) -> Tensor:
        if traced(layout.input):
            kind = "elements" if params.reduction == "none" else "distribution"
            return ops.native_loss(kind, layout.input, layout.target_input, params, checked)
        dims = kernel_dims(layout, params)
        if params.reduction == "none":
            loss, invalid = NativeDistributionElements.apply(
                _input(layout), layout.target_input, dims, params, checked)
            if invalid:  # NaN where an element is invalid, its gradient too (multiplied)
                bad = invalid_elements(layout, params.ignore_index, params.from_logits,
                                       not checked)
                loss = loss.reshape(bad.shape) * _math.non_finite_poison(bad, loss.dtype)
            return loss.reshape(layout.elementwise_shape)
        return NativeDistributionLoss.apply(_input(layout), layout.target_input, dims, params,
                                            checked)

    def composite(self, layout: Layout, params: CompositeParams, checked: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
        if traced(layout.input):
            values = ops.native_loss("composite", layout.input, layout.target_input, params,
                                     checked)
            return values[0], values[1], values[2]
        dims = kernel_dims(layout, params)
        return NativeCompositeLoss.apply(_input(layout), layout.target_input, dims, params,
                                         checked)


@constant_in_graphs
def _load_status() -> str:
    """:func:`status`: ``""`` once the kernels are loaded (inside ``torch.compile`` run once, for
    real, as the graph is traced: loading takes a lock, which Dynamo cannot trace)."""
    return status()


def _input(layout: Layout) -> Tensor:
    """The caller's input, detached where no gradient will be formed (``torch.no_grad``,
    ``inference_mode``: an autograd Function's ``needs_input_grad`` follows ``requires_grad``
    alone), so that the forward pass writes no slopes into an input-sized buffer for it."""
    x = layout.input
    return x.detach() if x.requires_grad and not torch.is_grad_enabled() else x


NATIVE = NativeBackend()
"""The native backend."""
