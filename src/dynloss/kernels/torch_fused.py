"""Fused autograd Functions in eager PyTorch: the fast path on CPU (and any device).

Each Function computes in one forward what the reference computes with a chain of autograd
ops, and writes the gradient analytically, so autograd records no intermediate tensors:

* :class:`RegionSums` returns the per-(sample, class) sums ``I = sum(p*g)``, ``P = sum(p)``,
  ``G = sum(g)`` that every region loss needs. Its backward is one elementwise expression,
  ``dL/dx = (dL/dP + dL/dI * g) * dp/dx``, whatever region formula consumed the sums. It saves
  the probabilities (for float32/float64 input; half-precision input is saved as is and the
  probabilities recomputed, which costs less memory).
* :class:`PixelLossSum` returns the sum of the per-element BCE / cross-entropy losses after
  the focal modulation, class weights, ignore mask and TopK selection, and the normaliser of
  their mean. Its forward also computes the derivative of that sum with respect to the input,
  in the input's dtype, and saves only that: backward is one multiplication by the upstream
  gradient, and nothing transcendental is computed twice.

Either way one tensor the size of the input is kept for backward (the target is the caller's).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._layout import compute_dtype
from ..constants import MULTICLASS_MODE
from ..functional.distribution import (
    LOG_CLAMP,
    elementwise_bce,
    focal_modulation_and_slope,
    pixel_cross_entropy,
    positive_weight,
    topk_count,
    topk_mask,
)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for 2-D tensors ``(rows, M)``; one row is a BLAS dot, no temporary."""
    if a.shape[0] == 1:
        return torch.dot(a[0], b[0]).view(1)
    return torch.linalg.vecdot(a, b)


def _clamped_log_slope(p: Tensor) -> Tensor:
    """d/dp of ``max(log p, LOG_CLAMP)``: ``1/p``, and 0 where the log is clamped."""
    return torch.where(torch.log(p) > LOG_CLAMP, p.reciprocal(), 0.0)


def _binary_target(target: Tensor, dtype: torch.dtype, ignore_index: int | None):
    """The target as ``dtype`` (ignored entries zeroed) and the kept mask (or None)."""
    g = _as(target, dtype)
    if ignore_index is None:
        return g, None
    valid = target != ignore_index
    return g.masked_fill(~valid, 0), valid


def _class_index(target: Tensor, ignore_index: int | None) -> tuple[Tensor, Tensor | None]:
    index = target.long()
    if ignore_index is None:
        return index, None
    valid = index != ignore_index
    return index.masked_fill(~valid, 0), valid


def _probabilities(x: Tensor, mode: str, from_logits: bool) -> Tensor:
    xc = _as(x, compute_dtype(x.dtype))
    if not from_logits:
        return xc
    return torch.softmax(xc, dim=1) if mode == MULTICLASS_MODE else torch.sigmoid(xc)


# ----------------------------------------------------------------------------- region sums
def _binary_region_sums(p: Tensor, target: Tensor, ignore_index: int | None, pooled: bool):
    # batch-pooled binary sums need no split by sample: one row, whole-tensor reductions
    rows = 1 if pooled and p.shape[1] == 1 else p.shape[0] * p.shape[1]
    p2 = p.reshape(rows, -1)
    g, valid = _binary_target(target.reshape(rows, -1), p.dtype, ignore_index)
    intersection = _row_dot(p2, g)
    prediction_sum = p2.sum(-1) if valid is None else _row_dot(p2, valid.to(p.dtype))
    sums = (intersection, prediction_sum, g.sum(-1))
    return tuple(s.view(-1, p.shape[1]) for s in sums)


def _binary_region_backward(p, target, gi, gp, from_logits, ignore_index):
    g, valid = _binary_target(target, p.dtype, ignore_index)
    # dL/dp; expanding `self` keeps addcmul on its vectorised path (a (N, C, 1) self is 3x slower)
    grad = torch.addcmul(gp.unsqueeze(-1).expand_as(g), gi.unsqueeze(-1), g)
    if from_logits:
        torch.ops.aten.sigmoid_backward.grad_input(grad, p, grad_input=grad)
    if valid is not None:
        grad.masked_fill_(~valid, 0)
    return grad


def _multiclass_region_sums(p: Tensor, target: Tensor, ignore_index: int | None, pooled: bool):
    n, c, _ = p.shape
    index, valid = _class_index(target, ignore_index)
    picked = p.gather(1, index.unsqueeze(1)).squeeze(1)
    if valid is None:
        prediction_sum = p.sum(-1)
        flat = index + torch.arange(n, device=p.device).unsqueeze(1) * c
        target_sum = torch.bincount(flat.reshape(-1), minlength=n * c).view(n, c).to(p.dtype)
    else:
        weight = valid.to(p.dtype)
        picked = picked * weight
        prediction_sum = torch.einsum("ncm,nm->nc", p, weight)
        target_sum = p.new_zeros(n, c).scatter_add_(1, index, weight)
    intersection = p.new_zeros(n, c).scatter_add_(1, index, picked)
    return intersection, prediction_sum, target_sum


def _multiclass_region_backward(p, target, gi, gp, from_logits, ignore_index):
    index, valid = _class_index(target, ignore_index)
    gi_picked = gi.gather(1, index)  # (N, M): dL/dI of each pixel's own class
    if from_logits:
        own = p.gather(1, index.unsqueeze(1)).squeeze(1) * gi_picked
        # softmax backward of u = gp + gi * onehot: p * (u - sum_k p_k u_k)
        mixed = torch.einsum("ncm,nc->nm", p, gp) + own
        grad = p * (gp.unsqueeze(-1) - mixed.unsqueeze(1))
        grad.scatter_add_(1, index.unsqueeze(1), own.unsqueeze(1))
    else:
        grad = gp.unsqueeze(-1).expand_as(p).clone()
        grad.scatter_add_(1, index.unsqueeze(1), gi_picked.unsqueeze(1))
    if valid is not None:
        grad.mul_(valid.unsqueeze(1))
    return grad


class RegionSums(torch.autograd.Function):
    """``(I, P, G)``, each ``(N, C)``, from ``x`` ``(N, C, M)`` and the target layout.

    With ``pooled=True`` the sums may come back already summed over the batch, ``(1, C)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, from_logits: bool,
                ignore_index: int | None, pooled: bool = False):
        p = _probabilities(x, mode, from_logits)
        sums = _multiclass_region_sums if mode == MULTICLASS_MODE else _binary_region_sums
        intersection, prediction_sum, target_sum = sums(p, target, ignore_index, pooled)
        keep_probabilities = p.dtype == x.dtype  # else p is a float32 copy of half input
        ctx.save_for_backward(p if keep_probabilities else x, target)
        ctx.config = (mode, from_logits, ignore_index, keep_probabilities)
        ctx.mark_non_differentiable(target_sum)
        return intersection, prediction_sum, target_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_intersection, grad_prediction_sum, _grad_target_sum):
        saved, target = ctx.saved_tensors
        mode, from_logits, ignore_index, keep_probabilities = ctx.config
        p = saved if keep_probabilities else _probabilities(saved, mode, from_logits)
        shape = (grad_intersection if grad_intersection is not None else grad_prediction_sum).shape
        gi = grad_intersection if grad_intersection is not None else p.new_zeros(shape)
        gp = grad_prediction_sum if grad_prediction_sum is not None else p.new_zeros(shape)
        backward = (_multiclass_region_backward if mode == MULTICLASS_MODE
                    else _binary_region_backward)
        grad = backward(p, target, gi, gp, from_logits, ignore_index)
        return _as(grad, saved.dtype), None, None, None, None, None


# ----------------------------------------------------------------------------- pixel losses
def _binary_pixel_terms(x, target, dtype, from_logits, ignore_index, gamma, alpha):
    """Per-element losses, their derivatives in ``x``, and the kept mask (or None)."""
    xc = _as(x, dtype)
    g, valid = _binary_target(target, dtype, ignore_index)
    loss = _bce_with_logits(xc, g) if from_logits else elementwise_bce(xc, g, from_logits)
    if from_logits:
        slope = torch.sigmoid(xc).sub_(g)  # d bce / dx
    else:
        # d/dp of -(g clamp(log p) + (1-g) clamp(log(1-p))), zero where a log is clamped
        slope = (1 - g).mul_(_clamped_log_slope(1 - xc)).sub_(g * _clamped_log_slope(xc))
    if gamma != 0:
        loss, focal_slope = focal_modulation_and_slope(loss, gamma)
        slope.mul_(focal_slope)
    if alpha is not None:
        weight = positive_weight(g, alpha)
        loss.mul_(weight)
        slope.mul_(weight)
    if valid is not None:
        loss.masked_fill_(~valid, 0)
        slope.masked_fill_(~valid, 0)
    return loss, slope, valid


def _bce_with_logits(x: Tensor, g: Tensor) -> Tensor:
    """The reference's BCE, ``(1-g) softplus(x) + g softplus(-x)``, rearranged for speed as
    ``(max(x, 0) - g x) + softplus(-|x|)``: one softplus instead of two, two temporaries.

    The bracket is formed first: for hard labels it is exactly 0, ``x`` or ``-x``, so adding the
    small ``softplus(-|x|)`` last keeps every digit of a tiny loss, as the reference does.
    """
    loss = x.clamp_min(0).addcmul_(x, g, value=-1)
    tail = x.abs()
    # beta=-1: -softplus(-|x|); the stubs of torch._C._nn.softplus lack its out= argument
    torch._C._nn.softplus(tail, -1, 20, out=tail)  # type: ignore[call-arg]
    return loss.sub_(tail)


def _multiclass_pixel_terms(x, target, dtype, from_logits, ignore_index, gamma, alpha):
    xc = _as(x, dtype)
    index, valid = _class_index(target, ignore_index)
    loss = pixel_cross_entropy(xc, index, from_logits)  # (N, M)
    if from_logits:  # d ce / dx_c = softmax_c - [c == t]
        slope = torch.softmax(xc, dim=1)
        slope.scatter_add_(1, index.unsqueeze(1), slope.new_full((1, 1, 1), -1.0).expand(
            index.shape[0], 1, index.shape[1]))
    else:  # d ce / dp_c = -[c == t] / p_t, zero where the log is clamped
        picked = xc.gather(1, index.unsqueeze(1))
        slope = torch.zeros_like(xc).scatter_(1, index.unsqueeze(1),
                                              -_clamped_log_slope(picked))
    coefficient = None
    if gamma != 0:
        loss, coefficient = focal_modulation_and_slope(loss, gamma)
    if alpha is not None:
        weight = torch.as_tensor(alpha, dtype=dtype, device=x.device)[index]
        loss.mul_(weight)
        coefficient = weight if coefficient is None else coefficient.mul_(weight)
    if valid is not None:
        loss.masked_fill_(~valid, 0)
        coefficient = valid.to(dtype) if coefficient is None else coefficient.mul_(valid)
    if coefficient is not None:
        slope.mul_(coefficient.unsqueeze(1))
    return loss, slope, valid


class PixelLossSum(torch.autograd.Function):
    """``(S, count)``: the sum of per-element losses and the normaliser of their mean."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, from_logits: bool,
                ignore_index: int | None, gamma: float, alpha, k: float | None):
        dtype = compute_dtype(x.dtype)
        terms = _multiclass_pixel_terms if mode == MULTICLASS_MODE else _binary_pixel_terms
        loss, slope, valid = terms(x, target, dtype, from_logits, ignore_index, gamma, alpha)
        if k is not None:
            flat = loss.reshape(-1)
            n = topk_count(k, flat.numel() if valid is None else int(valid.sum()))
            ranked = flat if valid is None else flat.masked_fill(~valid.reshape(-1), float("-inf"))
            selected = topk_mask(ranked, n).view(loss.shape)
            total = torch.where(selected, loss, 0.0).sum()
            if mode == MULTICLASS_MODE:
                selected = selected.unsqueeze(1)
            slope.masked_fill_(~selected, 0)
            count = torch.tensor(float(max(n, 1)), dtype=dtype, device=x.device)
        else:
            total = loss.sum()
            if valid is None:
                count = torch.tensor(float(loss.numel()), dtype=dtype, device=x.device)
            else:
                count = valid.sum().to(dtype).clamp_min(1)
        ctx.save_for_backward(_as(slope, x.dtype))
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_count):
        (slope,) = ctx.saved_tensors
        # scale in the upstream gradient's precision (1/N underflows float16), then cast back
        grad = _as(_as(slope, grad_total.dtype) * grad_total, slope.dtype)
        return grad, None, None, None, None, None, None, None
