"""Fused autograd Functions in eager PyTorch: the fast path on CPU (and any device).

Each Function computes in one forward what the reference computes with a chain of autograd
ops, and writes the gradient analytically, so autograd stores no intermediate tensors:

* :class:`RegionSums` returns the per-(sample, class) sums ``I = sum(p*g)``, ``P = sum(p)``,
  ``G = sum(g)`` that every region loss needs. Its backward is one elementwise expression,
  ``dL/dx = (dL/dP + dL/dI * g) * dp/dx``, whatever region formula consumed the sums.
* :class:`PixelLossSum` returns the sum of per-element BCE / cross-entropy losses after the
  focal modulation, class weights, ignore mask and TopK selection, and the normaliser.

Saved for backward: only the input and the target as given (TopK also saves its boolean
selection mask); probabilities are recomputed in backward.

Binary and multilabel inputs are processed in blocks of about :data:`BLOCK_ELEMENTS`
elements: every temporary of a block stays in the CPU's cache, so each element is read from
memory once per pass instead of once per elementwise op, and no temporary is input-sized.
"""

from __future__ import annotations

from collections.abc import Iterator

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

BLOCK_ELEMENTS = 1 << 17
"""Elements per block (512 KiB of float32): a block's few temporaries fit in L2/L3 cache."""


def _blocks(rows: int, length: int) -> Iterator[tuple[slice, slice]]:
    """Contiguous blocks of a ``(rows, length)`` matrix: whole rows grouped, or long rows cut."""
    block = BLOCK_ELEMENTS
    if length >= block:
        for r in range(rows):
            for j in range(0, length, block):
                yield slice(r, r + 1), slice(j, j + block)
    else:
        per_block = max(1, block // max(length, 1))
        for r in range(0, rows, per_block):
            yield slice(r, r + per_block), slice(0, length)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for 2-D tensors without materialising the product."""
    return torch.einsum("rm,rm->r", a, b)


def _clamped_log_slope(p: Tensor) -> Tensor:
    """d/dp of ``max(log p, LOG_CLAMP)``: ``1/p``, and 0 where the log is clamped."""
    return torch.where(torch.log(p) > LOG_CLAMP, p.reciprocal(), 0.0)


def _focal_derivative(b: Tensor, gamma: float) -> Tensor:
    r"""d/db of :math:`(1-e^{-b})^\gamma b` = :math:`q^\gamma (1 + \gamma e^{-b} b / q)`."""
    q = torch.expm1(-b).neg_()
    ratio = torch.where(q > 0, b / q, 1.0)
    ratio.mul_(torch.exp(-b)).mul_(gamma).add_(1)
    return ratio.mul_(q if gamma == 1 else q.square_() if gamma == 2 else q.pow_(gamma))


def _positive_weight(g: Tensor, alpha: float) -> Tensor:
    """``alpha * g + (1 - alpha) * (1 - g)`` in one pass."""
    return g.mul(2 * alpha - 1).add_(1 - alpha)


def _binary_target(target: Tensor, dtype: torch.dtype, ignore_index: int | None):
    """Target block as ``dtype`` (ignored entries zeroed) and the kept mask (or None)."""
    g = _as(target, dtype)
    if ignore_index is None:
        return g, None
    valid = target != ignore_index
    return g.masked_fill(~valid, 0), valid


def _binary_layout(x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    rows = x.shape[0] * x.shape[1]
    return x.reshape(rows, -1), target.reshape(rows, -1)


def _class_index(target: Tensor, ignore_index: int | None) -> tuple[Tensor, Tensor | None]:
    index = target.long()
    if ignore_index is None:
        return index, None
    valid = index != ignore_index
    return index.masked_fill(~valid, 0), valid


# ----------------------------------------------------------------------------- region sums
def _binary_region_sums(x, target, from_logits, ignore_index):
    dtype = compute_dtype(x.dtype)
    x2, t2 = _binary_layout(x, target)
    sums = torch.zeros(3, x2.shape[0], dtype=dtype, device=x.device)
    intersection, prediction_sum, target_sum = sums
    for rows, cols in _blocks(*x2.shape):
        xb = _as(x2[rows, cols], dtype)
        p = torch.sigmoid(xb) if from_logits else xb
        g, valid = _binary_target(t2[rows, cols], dtype, ignore_index)
        intersection[rows] += _row_dot(p, g)
        target_sum[rows] += g.sum(-1)
        if valid is None:
            prediction_sum[rows] += p.sum(-1)
        else:
            prediction_sum[rows] += _row_dot(p, valid.to(dtype))
    return tuple(s.view(x.shape[:2]) for s in sums)


def _binary_region_backward(x, target, gi, gp, from_logits, ignore_index):
    dtype = compute_dtype(x.dtype)
    x2, t2 = _binary_layout(x, target)
    gi, gp = gi.reshape(-1, 1), gp.reshape(-1, 1)
    grad = torch.empty_like(x2)
    for rows, cols in _blocks(*x2.shape):
        g, valid = _binary_target(t2[rows, cols], dtype, ignore_index)
        block = torch.addcmul(gp[rows], gi[rows], g)  # dL/dp
        if from_logits:
            p = torch.sigmoid(_as(x2[rows, cols], dtype))
            block = torch.ops.aten.sigmoid_backward(block, p)
        if valid is not None:
            block.masked_fill_(~valid, 0)
        grad[rows, cols] = block
    return grad.view(x.shape)


def _multiclass_region_sums(x, target, from_logits, ignore_index):
    dtype = compute_dtype(x.dtype)
    n, c, _ = x.shape
    xc = _as(x, dtype)
    p = torch.softmax(xc, dim=1) if from_logits else xc
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
        target_sum = torch.zeros(n, c, dtype=dtype, device=x.device).scatter_add_(1, index, weight)
    intersection = torch.zeros(n, c, dtype=dtype, device=x.device).scatter_add_(1, index, picked)
    return intersection, prediction_sum, target_sum


def _multiclass_region_backward(x, target, gi, gp, from_logits, ignore_index):
    dtype = compute_dtype(x.dtype)
    xc = _as(x, dtype)
    index, valid = _class_index(target, ignore_index)
    gi_picked = gi.gather(1, index)  # (N, M): dL/dI of each pixel's own class
    if from_logits:
        p = torch.softmax(xc, dim=1)
        own = p.gather(1, index.unsqueeze(1)).squeeze(1) * gi_picked
        # softmax backward of u = gp + gi * onehot: p * (u - sum_k p_k u_k)
        mixed = torch.einsum("ncm,nc->nm", p, gp) + own
        grad = p.mul_(gp.unsqueeze(-1) - mixed.unsqueeze(1))
        grad.scatter_add_(1, index.unsqueeze(1), own.unsqueeze(1))
    else:
        grad = gp.unsqueeze(-1).expand_as(xc).clone()
        grad.scatter_add_(1, index.unsqueeze(1), gi_picked.unsqueeze(1))
    if valid is not None:
        grad.mul_(valid.unsqueeze(1))
    return grad


class RegionSums(torch.autograd.Function):
    """``(I, P, G)``, each ``(N, C)``, from ``x`` ``(N, C, M)`` and the target layout."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, from_logits: bool,
                ignore_index: int | None):
        sums = _multiclass_region_sums if mode == MULTICLASS_MODE else _binary_region_sums
        intersection, prediction_sum, target_sum = sums(x, target, from_logits, ignore_index)
        ctx.save_for_backward(x, target)
        ctx.config = (mode, from_logits, ignore_index)
        ctx.mark_non_differentiable(target_sum)
        return intersection, prediction_sum, target_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_intersection, grad_prediction_sum, _grad_target_sum):
        x, target = ctx.saved_tensors
        mode, from_logits, ignore_index = ctx.config
        shape, dtype = x.shape[:2], compute_dtype(x.dtype)
        gi = grad_intersection if grad_intersection is not None else x.new_zeros(shape, dtype=dtype)
        gp = (grad_prediction_sum if grad_prediction_sum is not None
              else x.new_zeros(shape, dtype=dtype))
        backward = (_multiclass_region_backward if mode == MULTICLASS_MODE
                    else _binary_region_backward)
        grad = backward(x, target, gi, gp, from_logits, ignore_index)
        return _as(grad, x.dtype), None, None, None, None


# ----------------------------------------------------------------------------- pixel losses
def _binary_pixel_losses(xb, tb, dtype, from_logits, ignore_index, gamma, alpha):
    """Per-element losses of one block (ignored ones 0) and the block's kept mask."""
    xb = _as(xb, dtype)
    g, valid = _binary_target(tb, dtype, ignore_index)
    loss = focal_modulation(elementwise_bce(xb, g, from_logits), gamma)
    if alpha is not None:
        loss.mul_(_positive_weight(g, alpha))
    if valid is not None:
        loss.masked_fill_(~valid, 0)
    return loss, valid


def _binary_pixel_backward(xb, tb, dtype, from_logits, ignore_index, gamma, alpha):
    """d(per-element loss)/dx of one block."""
    xb = _as(xb, dtype)
    g, valid = _binary_target(tb, dtype, ignore_index)
    if from_logits:
        grad = torch.sigmoid(xb).sub_(g)  # db/dx
    else:
        # d/dp of -(g clamp(log p) + (1-g) clamp(log(1-p))), zero where a log is clamped
        grad = (1 - g).mul_(_clamped_log_slope(1 - xb)).sub_(g * _clamped_log_slope(xb))
    if gamma != 0:
        grad.mul_(_focal_derivative(elementwise_bce(xb, g, from_logits), gamma))
    if alpha is not None:
        grad.mul_(_positive_weight(g, alpha))
    if valid is not None:
        grad.masked_fill_(~valid, 0)
    return grad


def _multiclass_pixel_losses(x, target, dtype, from_logits, ignore_index, gamma, alpha):
    index, valid = _class_index(target, ignore_index)
    loss = focal_modulation(pixel_cross_entropy(_as(x, dtype), index, from_logits), gamma)
    if alpha is not None:
        loss.mul_(torch.as_tensor(alpha, dtype=dtype, device=x.device)[index])
    if valid is not None:
        loss.masked_fill_(~valid, 0)
    return loss, valid


def _multiclass_pixel_backward(x, target, dtype, from_logits, ignore_index, gamma, alpha,
                               coefficient):
    """``coefficient`` (N, M): upstream gradient per pixel (TopK mask and scale applied)."""
    xc = _as(x, dtype)
    index, valid = _class_index(target, ignore_index)
    if gamma != 0:
        coefficient = coefficient * _focal_derivative(
            pixel_cross_entropy(xc, index, from_logits), gamma)
    if alpha is not None:
        coefficient = coefficient * torch.as_tensor(alpha, dtype=dtype, device=x.device)[index]
    if valid is not None:
        coefficient = coefficient * valid
    if from_logits:
        grad = torch.softmax(xc, dim=1).mul_(coefficient.unsqueeze(1))
        grad.scatter_add_(1, index.unsqueeze(1), -coefficient.unsqueeze(1))
        return grad
    picked = xc.gather(1, index.unsqueeze(1))
    slope = -coefficient.unsqueeze(1) * _clamped_log_slope(picked)
    return torch.zeros_like(xc).scatter_(1, index.unsqueeze(1), slope)


class PixelLossSum(torch.autograd.Function):
    """``(S, count)``: the sum of per-element losses and the normaliser of their mean."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, from_logits: bool,
                ignore_index: int | None, gamma: float, alpha, k: float | None):
        dtype = compute_dtype(x.dtype)
        config = (dtype, from_logits, ignore_index, gamma, alpha)
        selected = None
        if mode == MULTICLASS_MODE:
            loss, valid = _multiclass_pixel_losses(x, target, *config)
            kept = None if valid is None else valid.sum()
        elif k is None:  # stream blocks, keep nothing
            x2, t2 = _binary_layout(x, target)
            total = torch.zeros((), dtype=dtype, device=x.device)
            kept = None if ignore_index is None else torch.zeros_like(total)
            for rows, cols in _blocks(*x2.shape):
                block, valid = _binary_pixel_losses(x2[rows, cols], t2[rows, cols], *config)
                total += block.sum()
                if valid is not None:
                    kept += valid.sum()
            loss = None
        else:  # TopK needs every loss before it can select
            x2, t2 = _binary_layout(x, target)
            loss = torch.empty(x2.shape, dtype=dtype, device=x.device)
            kept = None if ignore_index is None else torch.zeros((), dtype=torch.long,
                                                                  device=x.device)
            valid_all = None if ignore_index is None else torch.empty(x2.shape, dtype=torch.bool,
                                                                      device=x.device)
            for rows, cols in _blocks(*x2.shape):
                loss[rows, cols], valid = _binary_pixel_losses(x2[rows, cols], t2[rows, cols],
                                                               *config)
                if valid is not None:
                    valid_all[rows, cols] = valid
            valid = valid_all
            if valid is not None:
                kept = valid.sum()
        if k is not None:
            flat = loss.reshape(-1)
            n = topk_count(k, flat.numel() if kept is None else int(kept))
            ranked = flat if valid is None else flat.masked_fill(~valid.reshape(-1), float("-inf"))
            selected = topk_mask(ranked, n).view(loss.shape)
            total = torch.where(selected, loss, 0.0).sum()
            count = torch.tensor(float(max(n, 1)), dtype=dtype, device=x.device)
        else:
            if loss is not None:
                total = loss.sum()
            if kept is None:
                count = torch.tensor(float(target.numel()), dtype=dtype, device=x.device)
            else:
                count = kept.to(dtype).clamp_min(1)
        ctx.save_for_backward(x, target, selected)
        ctx.config = (mode, *config)
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_count):
        x, target, selected = ctx.saved_tensors
        mode, dtype, *config = ctx.config
        if mode == MULTICLASS_MODE:
            coefficient = grad_total.expand(target.shape)
            if selected is not None:
                coefficient = coefficient * selected
            grad = _multiclass_pixel_backward(x, target, dtype, *config, coefficient)
            return _as(grad, x.dtype), None, None, None, None, None, None, None
        x2, t2 = _binary_layout(x, target)
        grad = torch.empty_like(x2)
        for rows, cols in _blocks(*x2.shape):
            block = _binary_pixel_backward(x2[rows, cols], t2[rows, cols], dtype, *config)
            if selected is not None:
                block.masked_fill_(~selected[rows, cols], 0)
            grad[rows, cols] = block.mul_(grad_total)
        return grad.view(x.shape), None, None, None, None, None, None, None
