"""The Triton kernels as ``torch.library`` custom operators, for ``torch.compile``.

Inside ``torch.compile`` the Triton backend calls these operators instead of its eager
autograd Functions. Each has a fake (meta) implementation, so Dynamo and AOTAutograd trace
it with ``fullgraph=True`` without running it, and a registered autograd formula whose
backward is the matching backward operator. The operators launch exactly the kernels of the
eager path (:mod:`~dynloss.kernels.triton.stream`, :mod:`~dynloss.kernels.triton.topk`), so
values and gradients are bitwise those of eager mode; nothing is read on the host, so
``mode="reduce-overhead"`` captures them in a CUDA graph.

* ``dynloss::triton_fused(x, target, ints, floats) -> (out, state)``: a region,
  distribution (BCE/Focal) or composite loss; ``out`` is the loss (``(3,)`` =
  ``(combined, region, distribution)`` for a composite), ``state`` the backward state.
* ``dynloss::triton_fused_backward(x, target, state, grad_out, ints, floats)``.
* ``dynloss::triton_topk(x, target, ints, floats) -> (out, fstate, workspace)`` and
  ``dynloss::triton_topk_backward(...)``.

``ints`` / ``floats`` are the flattened :class:`~dynloss.kernels.triton.stream.FusedSpec` /
:class:`~dynloss.kernels.triton.topk.TopKSpec` (constants of the traced graph; a per-class
focal ``alpha`` or class ``weight`` and BCE's ``pos_weight`` among them, whose device tables
are cached as on the eager path). The operators
are opaque to Inductor (they run as extern calls) and are registered when this module is
first imported.
"""

import torch
from torch import Tensor

from . import stream, topk
from .stream import FusedSpec
from .topk import TopKSpec

__all__ = ["fused", "topk_loss"]


def _as_ncm(x: Tensor) -> tuple[int, int, int]:
    n, c, m = x.shape
    return n, c, m


# ------------------------------------------------------- region / distribution / composite


@torch.library.custom_op("dynloss::triton_fused", mutates_args=())
def _fused(x: Tensor, target: Tensor, ints: list[int], floats: list[float]
           ) -> tuple[Tensor, Tensor]:
    spec = FusedSpec.from_lists(ints, floats)
    alpha = stream.alpha_table(spec, x.device)
    xk, target_k = stream.prepare_inputs(x, target)
    n, c, _ = _as_ncm(xk)
    if spec.output == stream.COMPOSITE:
        out = torch.empty(3, dtype=torch.float32, device=x.device)
        state = stream.fused_forward(xk, target_k, spec, alpha, out[0], out[1], out[2])
    else:
        out = torch.empty(stream.output_shape(spec, n, c, xk.shape[2]), dtype=torch.float32,
                          device=x.device)
        state = stream.fused_forward(xk, target_k, spec, alpha, out)
    return out, state


@_fused.register_fake
def _fused_fake(x, target, ints, floats):
    spec = FusedSpec.from_lists(ints, floats)
    n, c, m = _as_ncm(x)
    shape = (3,) if spec.output == stream.COMPOSITE else stream.output_shape(spec, n, c, m)
    return (x.new_empty(shape, dtype=torch.float32),
            x.new_empty(stream.state_size(spec, n, c), dtype=torch.float32))


@torch.library.custom_op("dynloss::triton_fused_backward", mutates_args=())
def _fused_backward(x: Tensor, target: Tensor, state: Tensor, grad_out: Tensor,
                    ints: list[int], floats: list[float]) -> Tensor:
    spec = FusedSpec.from_lists(ints, floats)
    alpha = stream.alpha_table(spec, x.device)
    xk, target_k = stream.prepare_inputs(x, target)
    grad_out = grad_out.contiguous()
    grads: tuple[Tensor | None, Tensor | None, Tensor | None]
    if spec.output == stream.COMPOSITE:
        grads = (grad_out[0], grad_out[1], grad_out[2])
    elif spec.output == stream.REGION:
        grads = (None, grad_out, None)
    else:
        grads = (None, None, grad_out)
    grad = stream.fused_backward(xk, target_k, spec, alpha, state, *grads)
    return grad.view(x.shape)


@_fused_backward.register_fake
def _fused_backward_fake(x, target, state, grad_out, ints, floats):
    return x.new_empty(x.shape)


def _fused_setup(ctx, inputs, output) -> None:
    x, target, ints, floats = inputs
    ctx.save_for_backward(x, target, output[1])
    ctx.spec = (ints, floats)


def _fused_autograd(ctx, grad_out, _grad_state):
    x, target, state = ctx.saved_tensors
    ints, floats = ctx.spec
    grad = torch.ops.dynloss.triton_fused_backward(x, target, state, grad_out, ints, floats)
    return grad, None, None, None


torch.library.register_autograd("dynloss::triton_fused", _fused_autograd,
                                setup_context=_fused_setup)


def fused(x: Tensor, target: Tensor, spec: FusedSpec) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The loss (or ``(combined, region, distribution)``) through the custom operator."""
    out, _state = torch.ops.dynloss.triton_fused(x, target, spec.ints(), spec.floats())
    if spec.output == stream.COMPOSITE:
        return out[0], out[1], out[2]
    return out


# ---------------------------------------------------------------------------------------- TopK


@torch.library.custom_op("dynloss::triton_topk", mutates_args=())
def _topk(x: Tensor, target: Tensor, ints: list[int], floats: list[float]
          ) -> tuple[Tensor, Tensor, Tensor]:
    spec = TopKSpec.from_lists(ints, floats)
    alpha = topk.topk_alpha(spec, x.device)
    xk, target_k = stream.prepare_inputs(x, target)
    out = torch.empty((), dtype=torch.float32, device=x.device)
    fstate, ws = topk.topk_forward(xk, target_k, spec, alpha, out)
    return out, fstate, ws


@_topk.register_fake
def _topk_fake(x, target, ints, floats):
    return (x.new_empty((), dtype=torch.float32),
            x.new_empty(2 + topk.TOPK_PROGRAMS, dtype=torch.float32),
            x.new_empty(topk.TIES + topk.TOPK_PROGRAMS, dtype=torch.int64))


@torch.library.custom_op("dynloss::triton_topk_backward", mutates_args=())
def _topk_backward(x: Tensor, target: Tensor, fstate: Tensor, ws: Tensor, grad_out: Tensor,
                   ints: list[int], floats: list[float]) -> Tensor:
    spec = TopKSpec.from_lists(ints, floats)
    alpha = topk.topk_alpha(spec, x.device)
    xk, target_k = stream.prepare_inputs(x, target)
    grad = topk.topk_backward(xk, target_k, spec, alpha, fstate, ws, grad_out.contiguous())
    return grad.view(x.shape)


@_topk_backward.register_fake
def _topk_backward_fake(x, target, fstate, ws, grad_out, ints, floats):
    return x.new_empty(x.shape)


def _topk_setup(ctx, inputs, output) -> None:
    x, target, ints, floats = inputs
    ctx.save_for_backward(x, target, output[1], output[2])
    ctx.spec = (ints, floats)


def _topk_autograd(ctx, grad_out, _grad_fstate, _grad_ws):
    x, target, fstate, ws = ctx.saved_tensors
    ints, floats = ctx.spec
    grad = torch.ops.dynloss.triton_topk_backward(x, target, fstate, ws, grad_out, ints, floats)
    return grad, None, None, None


torch.library.register_autograd("dynloss::triton_topk", _topk_autograd,
                                setup_context=_topk_setup)


def topk_loss(x: Tensor, target: Tensor, spec: TopKSpec) -> Tensor:
    """TopK through the custom operator."""
    return torch.ops.dynloss.triton_topk(x, target, spec.ints(), spec.floats())[0]
