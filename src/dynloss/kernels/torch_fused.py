"""Fused autograd Functions in eager PyTorch: the fast path on CPU (and any device).

Each Function computes in one forward what the reference computes with a chain of autograd
ops, and writes the gradient analytically, so autograd stores no intermediate tensors:

* :class:`RegionSums` returns the per-(sample, class) sums ``I = sum(p*g)``, ``P = sum(p)``,
  ``G = sum(g)`` that every region loss needs. Its backward is one elementwise expression,
  ``dL/dx = (dL/dP + dL/dI * g) * dp/dx``, whatever region formula consumed the sums.
* :class:`PixelLossSum` returns the sum of per-element BCE / cross-entropy losses after the
  focal modulation, class weights, ignore mask and TopK selection, and the normaliser.

Saved for backward: the input (or its probabilities, when they have the input's dtype and
size) and the target as given; TopK also saves its boolean selection mask.
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
    focal_modulation,
    pixel_cross_entropy,
    topk_count,
    topk_mask,
)


def _batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for ``(N, C, M)`` tensors without materialising the product."""
    return torch.einsum("ncm,ncm->nc", a, b)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _activate(x: Tensor, mode: str) -> Tensor:
    """Probabilities from logits, in place when ``x`` is a private copy."""
    if mode == MULTICLASS_MODE:
        return torch.softmax(x, dim=1)
    return torch.sigmoid(x)


def _class_index(target: Tensor, ignore_index: int | None) -> tuple[Tensor, Tensor | None]:
    index = target.long()
    if ignore_index is None:
        return index, None
    valid = index != ignore_index
    return index.masked_fill(~valid, 0), valid


class RegionSums(torch.autograd.Function):
    """``(I, P, G)``, each ``(N, C)``, from ``x`` ``(N, C, M)`` and the target layout."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, from_logits: bool,
                ignore_index: int | None):
        dtype = compute_dtype(x.dtype)
        xc = _as(x, dtype)
        p = _activate(xc, mode) if from_logits else xc
        n, c, _ = x.shape
        if mode == MULTICLASS_MODE:
            index, valid = _class_index(target, ignore_index)
            picked = p.gather(1, index.unsqueeze(1)).squeeze(1)
            if valid is None:
                prediction_sum = p.sum(-1)
                flat = index + torch.arange(n, device=x.device).unsqueeze(1) * c
                target_sum = torch.bincount(flat.reshape(-1), minlength=n * c).view(n, c).to(dtype)
            else:
                weight = valid.to(dtype)
                picked = picked * weight
                prediction_sum = torch.einsum("ncm,nm->nc", p, weight)
                target_sum = torch.zeros(n, c, dtype=dtype, device=x.device).scatter_add_(
                    1, index, weight
                )
            intersection = torch.zeros(n, c, dtype=dtype, device=x.device).scatter_add_(
                1, index, picked
            )
        else:
            g = _as(target, dtype)
            if ignore_index is None:
                prediction_sum = p.sum(-1)
            else:
                weight = (target != ignore_index).to(dtype)
                g = g * weight
                prediction_sum = _batched_dot(p, weight)
            intersection = _batched_dot(p, g)
            target_sum = g.sum(-1)
        saved_probabilities = from_logits and p.dtype == x.dtype
        ctx.save_for_backward(p if saved_probabilities else x, target)
        ctx.saved_probabilities = saved_probabilities
        ctx.mode, ctx.from_logits, ctx.ignore_index = mode, from_logits, ignore_index
        ctx.mark_non_differentiable(target_sum)
        return intersection, prediction_sum, target_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_intersection, grad_prediction_sum, _grad_target_sum):
        saved, target = ctx.saved_tensors
        mode, from_logits, ignore_index = ctx.mode, ctx.from_logits, ctx.ignore_index
        dtype = compute_dtype(saved.dtype)
        if ctx.saved_probabilities:
            p = saved
        else:
            p = _as(saved, dtype)
            if from_logits:
                p = _activate(p, mode)
        shape = p.shape[:2]
        gi = grad_intersection if grad_intersection is not None else p.new_zeros(shape)
        gp = grad_prediction_sum if grad_prediction_sum is not None else p.new_zeros(shape)
        if mode == MULTICLASS_MODE:
            index, valid = _class_index(target, ignore_index)
            gi_picked = gi.gather(1, index)  # (N, M): dL/dI of each pixel's own class
            if from_logits:
                picked = p.gather(1, index.unsqueeze(1)).squeeze(1)
                own = picked * gi_picked
                # softmax backward of u = gp + gi * onehot: p * (u - sum_k p_k u_k)
                mixed = torch.einsum("ncm,nc->nm", p, gp) + own
                grad = p * (gp.unsqueeze(-1) - mixed.unsqueeze(1))
                grad.scatter_add_(1, index.unsqueeze(1), own.unsqueeze(1))
            else:
                grad = gp.unsqueeze(-1).expand_as(p).clone()
                grad.scatter_add_(1, index.unsqueeze(1), gi_picked.unsqueeze(1))
            if valid is not None:
                grad.mul_(valid.unsqueeze(1))
        else:
            g = _as(target, dtype)
            grad = torch.addcmul(gp.unsqueeze(-1), gi.unsqueeze(-1), g)
            if from_logits:
                grad = torch.ops.aten.sigmoid_backward(grad, p)
            if ignore_index is not None:
                grad.masked_fill_(target == ignore_index, 0)
        return _as(grad, saved.dtype), None, None, None, None


def _clamped_log_slope(p: Tensor) -> Tensor:
    """d/dp of ``max(log p, LOG_CLAMP)``: ``1/p``, and 0 where the log is clamped."""
    return torch.where(torch.log(p) > LOG_CLAMP, p.reciprocal(), 0.0)


def _focal_derivative(b: Tensor, gamma: float) -> Tensor:
    r"""d/db of :math:`(1-e^{-b})^\gamma b` = :math:`q^\gamma (1 + \gamma e^{-b} b / q)`."""
    q = torch.expm1(-b).neg_()
    ratio = torch.where(q > 0, b / q, 1.0)
    ratio.mul_(torch.exp(-b)).mul_(gamma).add_(1)
    return ratio.mul_(q.pow_(gamma))


class PixelLossSum(torch.autograd.Function):
    """``(S, count)``: the sum of per-element losses and the normaliser of their mean."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, from_logits: bool,
                ignore_index: int | None, gamma: float, alpha, k: float | None):
        dtype = compute_dtype(x.dtype)
        xc = _as(x, dtype)
        valid = None
        if mode == MULTICLASS_MODE:
            index, valid = _class_index(target, ignore_index)
            b = pixel_cross_entropy(xc, index, from_logits)
            weight = None
            if alpha is not None:
                weight = torch.as_tensor(alpha, dtype=dtype, device=x.device)[index]
        else:
            g = _as(target, dtype)
            if ignore_index is not None:
                valid = target != ignore_index
                g = g.masked_fill(~valid, 0)
            b = elementwise_bce(xc, g, from_logits)
            weight = None if alpha is None else alpha * g + (1 - alpha) * (1 - g)
        loss = focal_modulation(b, gamma)
        if weight is not None:
            loss = loss * weight
        if valid is not None:
            loss = loss.masked_fill(~valid, 0)
        selected = None
        if k is not None:
            flat = loss.reshape(-1)
            kept = flat.numel() if valid is None else int(valid.sum())
            n = topk_count(k, kept)
            ranked = flat if valid is None else flat.masked_fill(~valid.reshape(-1), float("-inf"))
            selected = topk_mask(ranked, n).view(loss.shape)
            total = torch.where(selected, loss, 0.0).sum()
            count = torch.tensor(float(max(n, 1)), dtype=dtype, device=x.device)
        else:
            total = loss.sum()
            if valid is None:
                count = torch.tensor(float(loss.numel()), dtype=dtype, device=x.device)
            else:
                count = valid.sum().to(dtype).clamp_min(1)
        ctx.save_for_backward(x, target, selected)
        ctx.config = (mode, from_logits, ignore_index, gamma, alpha)
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_count):
        x, target, selected = ctx.saved_tensors
        mode, from_logits, ignore_index, gamma, alpha = ctx.config
        dtype = compute_dtype(x.dtype)
        xc = _as(x, dtype)
        if mode == MULTICLASS_MODE:
            index, valid = _class_index(target, ignore_index)
            coefficient = None
            if gamma != 0:
                coefficient = _focal_derivative(pixel_cross_entropy(xc, index, from_logits), gamma)
            if alpha is not None:
                weight = torch.as_tensor(alpha, dtype=dtype, device=x.device)[index]
                coefficient = weight if coefficient is None else coefficient.mul_(weight)
            if valid is not None:
                coefficient = valid.to(dtype) if coefficient is None else coefficient.mul_(valid)
            if selected is not None:
                coefficient = (selected.to(dtype) if coefficient is None
                               else coefficient.mul_(selected))
            coefficient = (grad_total.expand(index.shape) if coefficient is None
                           else coefficient.mul_(grad_total))
            if from_logits:
                grad = torch.softmax(xc, dim=1).mul_(coefficient.unsqueeze(1))
                grad.scatter_add_(1, index.unsqueeze(1), -coefficient.unsqueeze(1))
            else:
                picked = xc.gather(1, index.unsqueeze(1))
                grad = torch.zeros_like(xc).scatter_(
                    1, index.unsqueeze(1), -coefficient.unsqueeze(1) * _clamped_log_slope(picked)
                )
            return _as(grad, x.dtype), None, None, None, None, None, None, None
        g = _as(target, dtype)
        valid = None
        if ignore_index is not None:
            valid = target != ignore_index
            g = g.masked_fill(~valid, 0)
        if from_logits:
            grad = torch.sigmoid(xc).sub_(g)  # db/dx
        else:
            # d/dp of -(g clamp(log p) + (1-g) clamp(log(1-p))), zero where a log is clamped
            grad = (1 - g).mul_(_clamped_log_slope(1 - xc)).sub_(g * _clamped_log_slope(xc))
        if gamma != 0:
            grad.mul_(_focal_derivative(elementwise_bce(xc, g, from_logits), gamma))
        if alpha is not None:
            grad.mul_(alpha * g + (1 - alpha) * (1 - g))
        if valid is not None:
            grad.masked_fill_(~valid, 0)
        if selected is not None:
            grad.masked_fill_(~selected, 0)
        grad.mul_(grad_total)
        return _as(grad, x.dtype), None, None, None, None, None, None, None
