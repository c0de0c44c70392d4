"""Fused region + pixel loss (Dice+BCE, Dice+Focal, IoU+BCE, Tversky+BCE, ...) in Triton.

:class:`TritonRegionPixel` runs the streaming kernels of :mod:`dynloss.kernels.triton_region`
with both terms switched on: one forward pass returns the region sums ``(I, P, G)`` and the
pixel-loss ``(sum, count)``; one backward pass writes
``dL/dx = region gradient + pixel gradient`` for whatever combination of the outputs the
caller formed. Saves only the inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..constants import MULTICLASS_MODE
from .triton_region import stream_backward, stream_forward, target_for_kernel


class TritonRegionPixel(torch.autograd.Function):
    """``(I, P, G, S, count)`` from one pass; ``G`` and ``count`` are not differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, from_logits: bool,
                ignore_index: int | None, gamma: float, alpha):
        x = x.contiguous()
        target_k = target_for_kernel(target)
        sums, pix = stream_forward(
            x, target_k, mode, from_logits=from_logits, ignore_index=ignore_index,
            do_region=True, do_pixel=True, gamma=gamma, alpha=alpha,
        )
        assert sums is not None and pix is not None
        intersection, prediction_sum, target_sum = sums
        total, kept = pix
        if ignore_index is None:
            numel = x.shape[0] * x.shape[2] * (1 if mode == MULTICLASS_MODE else x.shape[1])
            count = torch.full((), float(numel), dtype=torch.float32, device=x.device)
        else:
            count = kept.clamp_min(1.0)
        ctx.save_for_backward(x, target_k)
        ctx.config = (mode, from_logits, ignore_index, gamma, alpha)
        ctx.mark_non_differentiable(target_sum, count)
        return intersection, prediction_sum, target_sum, total, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_intersection, grad_prediction_sum, _grad_target_sum, grad_total,
                 _grad_count):
        x, target_k = ctx.saved_tensors
        mode, from_logits, ignore_index, gamma, alpha = ctx.config
        if grad_intersection is None and grad_prediction_sum is None and grad_total is None:
            return (None,) * 7
        grad = stream_backward(
            x, target_k, mode, from_logits=from_logits, ignore_index=ignore_index,
            grad_intersection=grad_intersection, grad_prediction_sum=grad_prediction_sum,
            grad_total=grad_total, gamma=gamma, alpha=alpha,
        )
        return (grad,) + (None,) * 6
