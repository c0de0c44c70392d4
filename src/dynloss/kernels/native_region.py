r"""Dice, IoU and Tversky losses on the native CPU kernels, as one autograd node.

The generic path computes the region sums ``I, P, G`` with one kernel node and then the score
with about ten small torch operations, each recorded by autograd and replayed in backward.
Here the forward kernel's sums go straight into :func:`dynloss.functional.tversky_index` (the
reference formula, in float32 as on the generic path, so the value is bitwise the same, with no
graph recorded), and the backward pass turns the upstream gradient into ``dL/dI`` and
``dL/dP`` in closed form before one elementwise kernel pass:

.. math:: T = \frac{I + s}{D + s},\quad D = (1 - \alpha - \beta) I + \alpha P + \beta G,\qquad
          \frac{\partial T}{\partial I} = \frac{(D + s) - (1 - \alpha - \beta)(I + s)}{(D + s)^2},
          \quad \frac{\partial T}{\partial P} = -\frac{\alpha (I + s)}{(D + s)^2}.

``tests/test_kernels_native.py`` checks values and gradients against the reference for every
mode, pooling, reduction and smoothing.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..functional.region import _reduce, tversky_index
from .native_cpu import native_backward, native_forward

__all__ = ["NativeRegionLoss"]


class NativeRegionLoss(torch.autograd.Function):
    """``1 - T`` reduced, from ``x`` ``(N, C, M)`` float32 and the target layout.

    ``per_image=False`` pools the sums over the batch (scores ``(C,)``), ``True`` keeps one
    score per sample and class (``(N, C)``); ``reduction`` is ``"mean"``, ``"sum"`` or
    ``"none"`` over the scores. Returns float32. Keeps one input-sized tensor for backward
    (see :class:`dynloss.kernels.native_cpu.NativeLoss`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, from_logits: bool,
                ignore_index: int | None, alpha: float, beta: float, smoothing: float,
                per_image: bool, reduction: str, check_values: bool):
        result = native_forward(x, target, mode, from_logits, ignore_index, 0.0, None, True,
                                False, check_values, ctx.needs_input_grad[0])
        # float32 from here on, as on the generic path (bitwise the same value)
        sums = result.sums.float()
        if not per_image:
            sums = sums.sum(0)
        intersection, prediction_sum, target_sum = sums.unbind(-1)
        loss = 1.0 - tversky_index(intersection, prediction_sum, target_sum, alpha, beta,
                                   smoothing)
        ctx.save_for_backward(result.target, result.probabilities, result.slope)
        ctx.native_config = result.config
        ctx.region = (sums, alpha, beta, smoothing, x.shape[:2], per_image, reduction)
        return _reduce(loss, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        sums, alpha, beta, smoothing, (n, c), per_image, reduction = ctx.region
        intersection, prediction_sum, target_sum = sums.unbind(-1)
        grad_score = -grad_loss  # d(1 - T)/dT = -1
        if reduction == "mean":
            grad_score = grad_score / intersection.numel()
        numerator = intersection + smoothing
        denominator = ((1.0 - alpha - beta) * intersection + alpha * prediction_sum
                       + beta * target_sum + smoothing)
        scale = grad_score / (denominator * denominator)
        grad_intersection = scale * (denominator - (1.0 - alpha - beta) * numerator)
        grad_prediction_sum = scale * (-alpha * numerator)
        if not per_image:
            grad_intersection = grad_intersection.expand(n, c)
            grad_prediction_sum = grad_prediction_sum.expand(n, c)
        grad = native_backward(ctx.saved_tensors, ctx.native_config, grad_intersection,
                               grad_prediction_sum, None)
        return (grad,) + (None,) * 10
