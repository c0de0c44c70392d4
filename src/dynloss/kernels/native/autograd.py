r"""The native kernels as autograd Functions: each loss is one node.

Each Function's forward and backward are plain functions here (``region_forward`` /
``region_backward``, ``distribution_*``, ``elements_backward``, ``composite_*``), which the
custom operators of :mod:`~dynloss.kernels.native.ops` run too, so a compiled loss computes
exactly what an eager one does.

* :class:`NativeRegionLoss`: Dice/IoU/Tversky. The forward kernel's sums go straight into the
  reference score (:func:`dynloss.kernels.reference.score_loss`, float32, float64 for float64
  input, with no graph recorded); backward turns the upstream gradient into ``dL/dI`` and
  ``dL/dP`` with the closed form of :func:`dynloss._math.tversky_index_grads` before one
  elementwise kernel pass.
* :class:`NativeDistributionLoss`: BCE/Focal/TopK, the mean (or sum) formed on the host from
  the kernel's float64 sum and count; backward is one pass ``grad * slope``. For TopK the sum
  and count are those of the ``n`` selected elements (mean ``= S / max(n, 1)``) and the
  selection kernel has zeroed the slopes of the others.
* :class:`NativeCompositeLoss`: a region and a distribution term from one forward pass, one
  backward pass for both.
* :class:`NativeSums`: the raw ``(I, P, G, S, count)`` for callers that combine them with
  torch operations (``ddp_pool=True`` all-reduces the sums before the score).

Each keeps at most one input-sized buffer per term for backward (from the reusing pool of
``buffer_pool.py``), and the caller's input: when the backward pass is itself recorded
(``create_graph=True``) the gradient is recomputed through the reference maths, so it is
differentiable; so it is where a slope overflowed (a probability whose ``1/p`` is beyond
float32: autograd forms ``(upstream * weight) / p``, which may be finite or 0 where
``upstream * inf`` is not). An invalid value that was not raised for (see
:mod:`dynloss._layout`) makes the loss and its gradient NaN.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ... import _math
from ..._layout import Layout, compute_dtype, prepare
from ..._params import CompositeParams, DistributionParams, RegionParams
from ...constants import MULTICLASS_MODE
from .. import reference
from .._recompute import must_recompute, recompute_backward
from .buffer_pool import CPU, POOL
from .ffi import Forward, Sums, c_real, graph_kept, native_backward, native_forward

__all__ = ["NativeCompositeLoss", "NativeDistributionElements", "NativeDistributionLoss",
           "NativeRegionLoss", "NativeSums"]


def _layout(x: Tensor, target: Tensor, mode: str) -> Layout:
    """The canonical layout of the caller's tensors (for the reference, in a recompute)."""
    return prepare(x, target, mode)


HOST_SCORES = 1024
"""Up to this many (sample, class) sums the score is formed in float64 on the host with plain
Python arithmetic (a few microseconds); beyond, with float64 tensor operations."""


def _fsum(values: list[float]) -> float:
    """``math.fsum``, or NaN where it meets both infinities (unchecked infinite probabilities
    of both signs), as float arithmetic gives (``fsum`` raises ``ValueError`` there)."""
    try:
        return math.fsum(values)
    except ValueError:
        return math.nan


def _cells(sums: Sums, params: RegionParams) -> list[tuple[float, float, float]] | None:
    """The ``(I, P, G)`` the scores are formed from, in float64: one per (sample, class) with
    ``per_image``, else one per class pooled over the batch; None when there are too many."""
    n, c, _ = sums.dims
    if n * c > HOST_SCORES:
        return None
    values = sums.as_list()
    if params.per_image:
        return list(zip(values[0::3], values[1::3], values[2::3], strict=True))
    step = 3 * c
    return [(_fsum(values[3 * k::step]), _fsum(values[3 * k + 1::step]),
             _fsum(values[3 * k + 2::step])) for k in range(c)]


def region_value(sums: Sums, params: RegionParams, real: torch.dtype
                  ) -> tuple[Tensor, list[tuple[float, float, float]] | None,
                             tuple[ctypes.Array, ctypes.Array] | None]:
    """``(loss, cells, coefficients)``: the reduced ``1 - T`` as ``real`` (the dtype the
    kernels computed in), the sums it was formed from (None: formed with tensor operations
    from the sums), and, where the scores are summed or averaged from ``cells``,
    ``-(dT/dI, dT/dP)`` of every score as arrays of ``real``'s C type divided by the number
    of scores for ``"mean"``: the gradients of ``I, P`` per unit of the upstream gradient,
    formed here so that backward only scales them."""
    a, b, s = params.alpha, params.beta, params.smoothing
    n, c, _ = sums.dims
    multipliers = reference.class_multipliers(params, c)
    if (c == 1 and not params.per_image and params.reduction != "none"
            and multipliers is None):
        # one score from the batch-pooled sums (binary, the default): the same values as the
        # general path below, without building the lists (measured ~7 us less per call at
        # (8, 1, 64, 64) in the interleaved benchmark, where a call is ~160 us)
        values = sums.as_list()
        cell = (_fsum(values[0::3]), _fsum(values[1::3]), _fsum(values[2::3]))
        loss, slope_i, slope_p = _math.tversky_loss_terms(*cell, a, b, s)
        one = c_real(real) * 1
        return (torch.scalar_tensor(loss, dtype=real, device=CPU), [cell],
                (one(-slope_i), one(-slope_p)))
    cells = _cells(sums, params)
    if cells is None:  # many scores: float64 tensor operations
        with torch.no_grad():
            return (reference.score_loss(sums.as_tensor().unbind(-1), params).to(real), None,
                    None)
    terms = [_math.tversky_loss_terms(i, p, g, a, b, s) for i, p, g in cells]
    # each score's factor (its class's weight, 0 for a class left out) and how many count
    factors = [1.0] * len(terms) if multipliers is None else multipliers * (len(terms) // c)
    counted = len(terms) if params.include_background else len(terms) // c * (c - 1)
    if params.reduction == "none":
        shape = (n, c) if params.per_image else (c,)
        scores = torch.tensor([f * t[0] for f, t in zip(factors, terms, strict=True)],
                              dtype=real, device=CPU).view(shape)
        return (scores if params.include_background else scores[..., 1:].clone()), cells, None
    mean = params.reduction == "mean" and counted
    total = _fsum([f * t[0] for f, t in zip(factors, terms, strict=True) if f])
    if mean:
        total /= counted
    scale = -1.0 / counted if mean else -1.0
    array = c_real(real) * len(terms)
    coefficients = (array(*(scale * f * t[1] for f, t in zip(factors, terms, strict=True))),
                    array(*(scale * f * t[2] for f, t in zip(factors, terms, strict=True))))
    return torch.scalar_tensor(total, dtype=real, device=CPU), cells, coefficients


def _region_grads(sums_out: Sums, cells: list[tuple[float, float, float]] | None,
                  grad_loss: Tensor, params: RegionParams, n: int, c: int
                  ) -> tuple[list[float] | Tensor, list[float] | Tensor]:
    """``(dL/dI, dL/dP)`` per (sample, class), row-major ``(N, C)``, from the gradient of the
    reduced ``1 - T``: float lists (host arithmetic) or float64 tensors."""
    a, b, s = params.alpha, params.beta, params.smoothing
    if cells is None:  # the tensor path of region_value
        sums = sums_out.as_tensor()
        sums = sums if params.per_image else sums.sum(0)
        intersection, prediction_sum, target_sum = sums.unbind(-1)
        grad_score = -_every_score_grad(grad_loss.double(), params, intersection)
        di, dp = _math.tversky_index_grads(intersection, prediction_sum, target_sum, a, b, s)
        gi, gp = grad_score * di, grad_score * dp
        if not params.per_image:
            gi, gp = gi.expand(n, c), gp.expand(n, c)
        return gi, gp
    shape = (n, c) if params.per_image else (c,)
    upstream = _every_score_grad(grad_loss, params, torch.empty(shape)).reshape(-1).tolist()
    grad_i: list[float] = []
    grad_p: list[float] = []
    for (i, p, g), up in zip(cells, upstream, strict=True):
        slope_i, slope_p = _math.tversky_index_grads(i, p, g, a, b, s)
        grad_i.append(-up * slope_i)
        grad_p.append(-up * slope_p)
    if not params.per_image:  # the pooled class gradient for every sample
        grad_i, grad_p = grad_i * n, grad_p * n
    return grad_i, grad_p


def _every_score_grad(grad_loss: Tensor, params: RegionParams, scores: Tensor) -> Tensor:
    """The gradient of the reduced loss for every score ``(C,)`` or ``(N, C)`` (the shape of
    ``scores``), from ``grad_loss``, the loss's: the adjoint of
    :func:`dynloss.kernels.reference.chosen_classes` and of the reduction (0 for class 0
    left out, each class's times its weight)."""
    grad = grad_loss
    if params.reduction == "none":
        if not params.include_background:  # (N, C - 1) -> (N, C), 0 for class 0
            grad = torch.nn.functional.pad(grad, (1, 0))
    else:
        counted = scores.numel() // max(scores.shape[-1], 1) * (
            scores.shape[-1] - (0 if params.include_background else 1))
        if params.reduction == "mean" and counted:
            grad = grad / counted
        grad = grad.expand(scores.shape)
        if not params.include_background:
            grad = torch.nn.functional.pad(grad[..., 1:], (1, 0))
    if params.class_weight is not None:
        grad = grad * reference.class_weights(params.class_weight, grad)
    return grad


def _scaled(grad: Tensor, invalid: bool) -> Tensor:
    return grad * math.nan if invalid else grad


def _non_finite(*grads: Tensor | None) -> bool:
    """Whether an upstream gradient (small, on the CPU: free to read) holds a NaN or inf.
    Backward then goes through the reference, which leaves 0 where the loss does not read an
    element (ignored, unselected), where the kernels would multiply the NaN into every one."""
    for grad in grads:
        if grad is None:
            continue
        if grad.numel() == 1:
            if not math.isfinite(grad.item()):
                return True
        elif not bool(torch.isfinite(grad).all()):
            return True
    return False


Recompute = Callable[[Callable[..., Any], Sequence[Tensor], Sequence[Tensor | None]],
                     tuple[Tensor | None, ...]]
"""How a backward pass forms the reference's gradient where the kernels' is not exact:
:func:`~dynloss.kernels._recompute.recompute_backward` in the autograd Functions (the saved
input is still attached to the graph), a detached copy in the custom operators
(:mod:`~dynloss.kernels.native.ops`, which run below autograd)."""


def region_forward(x: Tensor, target: Tensor, mode: str, dims: tuple[int, ...],
                   params: RegionParams, checked: bool, needs_grad: bool,
                   index_errors: bool = True
                   ) -> tuple[Tensor, Forward, list[tuple[float, float, float]] | None,
                              tuple[ctypes.Array, ctypes.Array] | None]:
    """``(loss, forward, cells, coefficients)`` of a region loss (see :func:`region_value`);
    the loss is NaN where an invalid value was found and not raised for
    (``index_errors``: see :func:`native_forward`)."""
    fwd = native_forward(x, target, mode, params.from_logits, params.ignore_index, 0.0,
                         None, True, False, checked, needs_grad, dims=dims,
                         index_errors=index_errors)
    value, cells, coefficients = region_value(fwd.sums(), params, compute_dtype(x.dtype))
    return _scaled(value, fwd.invalid), fwd, cells, coefficients


def region_backward(x: Tensor, target: Tensor, probabilities: Tensor | None, config: tuple,
                    invalid: bool, sums: Sums, cells: list[tuple[float, float, float]] | None,
                    coefficients: tuple[ctypes.Array, ctypes.Array] | None,
                    params: RegionParams, checked: bool, mode: str, grad_loss: Tensor,
                    recorded: bool, recompute: Recompute) -> Tensor:
    """``dL/dx`` of :func:`region_forward`'s loss for its upstream gradient ``grad_loss``;
    ``recorded``: the backward pass is recorded or batched (:func:`must_recompute`)."""
    # a recorded backward (a differentiable gradient), or a non-finite input: the reference's
    # NaN exactly where the loss depends on an element (0 on ignored ones)
    if recorded or invalid or _non_finite(grad_loss):
        (grad,) = recompute(
            lambda xs: reference.REFERENCE.region(_layout(xs, target, mode), params, checked),
            (x,), (_scaled(grad_loss, invalid),))
        assert grad is not None
        return grad
    saved = (target, probabilities, None)
    if coefficients is not None:  # the scores' mean or sum: scale what forward formed
        scale = math.nan if invalid else float(grad_loss)
        return native_backward(saved, config, *coefficients, None, scale,
                               pooled=not params.per_image)
    n, c, _ = config[5]
    gi, gp = _region_grads(sums, cells, _scaled(grad_loss, invalid), params, n, c)
    return native_backward(saved, config, gi, gp, None)


class NativeRegionLoss(torch.autograd.Function):
    """``1 - T`` reduced, from the caller's ``x`` (float32 or float64) and target read as ``dims``
    ``(N, C, M)``."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, dims: tuple[int, ...],
                params: RegionParams, checked: bool):
        value, fwd, cells, coefficients = region_forward(x, target, mode, dims, params,
                                                         checked, ctx.needs_input_grad[0])
        ctx.save_for_backward(x, fwd.target, fwd.probabilities)
        # no tensor here (the saved buffer becomes the gradient, which autograd then takes
        # over only if nothing else refers to it)
        ctx.native = (fwd.config, fwd.invalid, fwd.sums(), cells, coefficients, params,
                      checked, mode)
        return value

    @staticmethod
    def backward(ctx, grad_loss):
        x, target, probabilities = ctx.saved_tensors
        grad = region_backward(x, target, probabilities, *ctx.native, grad_loss,
                               must_recompute(grad_loss), recompute_backward)
        return grad, None, None, None, None, None


def distribution_forward(x: Tensor, target: Tensor, dims: tuple[int, ...],
                         params: DistributionParams, checked: bool, needs_grad: bool,
                         want_region: bool = False, elements: bool = False,
                         index_errors: bool = True) -> Forward:
    """One forward pass of a BCE/Focal/TopK term (with the region sums: ``want_region``;
    every element's loss: ``elements``; ``index_errors``: see :func:`native_forward`)."""
    return native_forward(x, target, params.mode, params.from_logits, params.ignore_index,
                          params.gamma, params.alpha, want_region, True, checked, needs_grad,
                          params.k, dims, params.pos_weight,
                          params.weighted_mean and not elements, elements, index_errors)


def distribution_value(fwd: Forward, params: DistributionParams, real: torch.dtype
                       ) -> tuple[Tensor, float]:
    """``(loss, scale)``: the mean (or sum) of :func:`distribution_forward`'s pass as a 0-dim
    ``real`` tensor, NaN where an invalid value was not raised for, and the factor of the
    upstream gradient that backward multiplies the slopes by (``1 / count`` for the mean)."""
    total, count = fwd.pixel
    mean = params.reduction == "mean"
    loss = torch.scalar_tensor(total / count if mean else total, dtype=real, device=CPU)
    return _scaled(loss, fwd.invalid), 1.0 / count if mean else 1.0


def distribution_backward(x: Tensor, target: Tensor, slope: Tensor | None, config: tuple,
                          scale: float, params: DistributionParams, checked: bool,
                          invalid: bool, overflowed: bool, grad_loss: Tensor, recorded: bool,
                          recompute: Recompute) -> Tensor:
    """``dL/dx`` of :func:`distribution_value`'s loss for its upstream gradient."""
    if recorded or overflowed or invalid or _non_finite(grad_loss):  # (invalid: see region)
        def value(xs: Tensor) -> Tensor:
            total, count = reference.distribution_sum(_layout(xs, target, params.mode),
                                                      params, checked)
            return total / count if params.reduction == "mean" else total
        (grad,) = recompute(value, (x,), (_scaled(grad_loss, invalid),))
        assert grad is not None
        return grad
    upstream = float(grad_loss) * scale
    return native_backward((target, None, slope), config, None, None,
                           math.nan if invalid else upstream)


class NativeDistributionLoss(torch.autograd.Function):
    """BCE/Focal/TopK with ``reduction`` ``"mean"`` or ``"sum"``: a 0-dim float32 loss (float64
    for float64 input).

    TopK (``params.k``): the sum of the ``n = topk_count(k, kept)`` largest per-element losses
    over the whole batch, divided by ``max(n, 1)`` for ``"mean"`` (0 when all are ignored).
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, dims: tuple[int, ...],
                params: DistributionParams, checked: bool):
        fwd = distribution_forward(x, target, dims, params, checked, ctx.needs_input_grad[0])
        loss, scale = distribution_value(fwd, params, compute_dtype(x.dtype))
        ctx.save_for_backward(x, fwd.target, fwd.slope)
        ctx.native = (fwd.config, scale, params, checked, fwd.invalid, fwd.overflowed)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, target, slope = ctx.saved_tensors
        grad = distribution_backward(x, target, slope, *ctx.native, grad_loss,
                                     must_recompute(grad_loss), recompute_backward)
        return grad, None, None, None, None


def elements_backward(x: Tensor, target: Tensor, slope: Tensor | None, config: tuple,
                      params: DistributionParams, checked: bool, overflowed: bool, grad: Tensor,
                      recorded: bool, recompute: Recompute, in_place: bool) -> Tensor:
    """``dL/dx`` of every element's loss (:func:`distribution_forward` with ``elements``) for
    the upstream gradient ``grad`` (the losses' shape); ``in_place``: the product may go into
    the saved slopes' buffer (not when the graph is kept or a saved-tensor hook saw it)."""
    if recorded or overflowed or slope is None or not math.isfinite(grad.sum()):
        (grad_x,) = recompute(
            lambda xs: reference.distribution_elements(_layout(xs, target, params.mode),
                                                       params, checked).reshape(grad.shape),
            (x,), (grad,))
        assert grad_x is not None
        return grad_x
    n, c, m = config[5]
    multiclass = params.mode == MULTICLASS_MODE
    upstream = grad.reshape(n, 1, m) if multiclass else grad.reshape(n, c, m)
    rows = slope.view(n, c, m)
    if in_place:
        return rows.mul_(upstream).view(x.shape)
    return torch.mul(rows, upstream, out=POOL.empty(rows.shape, rows.dtype)).view(x.shape)


class NativeDistributionElements(torch.autograd.Function):
    """BCE/Focal/TopK with ``reduction="none"``: ``(losses, invalid)``, every element's loss
    (float32, float64 for float64 input; ``dims``, multiclass ``(N, M)``; 0 where ignored,
    and outside TopK's selection, whose slopes the selection zeroed too) and whether an
    invalid value was found and not raised for (the caller marks those elements NaN).

    The forward pass writes the losses and their slopes ``d loss / d x`` in one pass; backward
    multiplies the slopes by the upstream gradient (into the slopes' buffer unless the graph
    is kept). An upstream gradient that is not finite everywhere (the caller's weights, a NaN
    loss: its sum, read on the host, is not finite) goes through the reference, whose
    gradient is 0 wherever the loss does not read an element whatever the upstream; so does
    a recorded backward (``create_graph=True``) and one after an overflowed slope.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, dims: tuple[int, ...],
                params: DistributionParams, checked: bool):
        fwd = distribution_forward(x, target, dims, params, checked, ctx.needs_input_grad[0],
                                   elements=True)
        ctx.save_for_backward(x, fwd.target, fwd.slope)
        ctx.native = (fwd.config, params, checked, fwd.overflowed)
        return fwd.losses, fwd.invalid

    @staticmethod
    def backward(ctx, grad: Tensor, _invalid: None):
        x, target, slope = ctx.saved_tensors
        config, params, checked, overflowed = ctx.native
        hooked = config[-1]
        grad_x = elements_backward(x, target, slope, config, params, checked, overflowed, grad,
                                   must_recompute(grad), recompute_backward,
                                   not (hooked or graph_kept()))
        return grad_x, None, None, None, None


def composite_forward(x: Tensor, target: Tensor, dims: tuple[int, ...],
                      params: CompositeParams, checked: bool, needs_grad: bool,
                      index_errors: bool = True
                      ) -> tuple[tuple[Tensor, Tensor, Tensor], Forward,
                                 list[tuple[float, float, float]] | None,
                                 tuple[ctypes.Array, ctypes.Array] | None, float]:
    """``((combined, region, distribution), forward, cells, coefficients, 1 / count)`` of a
    fused composite: both terms from one pass."""
    fwd = distribution_forward(x, target, dims, params.distribution, checked, needs_grad,
                               want_region=True, index_errors=index_errors)
    real = compute_dtype(x.dtype)
    region, cells, coefficients = region_value(fwd.sums(), params.region, real)
    total, count = fwd.pixel
    distribution = torch.scalar_tensor(total / count, dtype=real, device=CPU)
    combined = params.region_weight * region + params.distribution_weight * distribution
    values = (_scaled(combined, fwd.invalid), _scaled(region, fwd.invalid),
              _scaled(distribution, fwd.invalid))
    return values, fwd, cells, coefficients, 1.0 / count


def composite_backward(x: Tensor, target: Tensor, probabilities: Tensor | None,
                       slope: Tensor | None, config: tuple, invalid: bool, sums: Sums,
                       cells: list[tuple[float, float, float]] | None,
                       coefficients: tuple[ctypes.Array, ctypes.Array] | None,
                       inverse_count: float, params: CompositeParams, checked: bool,
                       overflowed: bool, grads: tuple[Tensor, Tensor, Tensor], recorded: bool,
                       recompute: Recompute) -> Tensor:
    """``dL/dx`` of :func:`composite_forward`'s three values for their upstream gradients."""
    grads = (_scaled(grads[0], invalid), _scaled(grads[1], invalid),
             _scaled(grads[2], invalid))
    # the three upstream gradients are 0-dim CPU tensors, read once (free); a recorded or
    # non-finite one, or an invalid input (see the region loss), goes through the reference
    upstreams = (None if recorded or overflowed or invalid else [float(g) for g in grads])
    if upstreams is None or not all(map(math.isfinite, upstreams)):
        def value(xs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            layout = _layout(xs, target, params.region.mode)
            total, count = reference.distribution_sum(layout, params.distribution, checked)
            region = reference.REFERENCE.region(layout, params.region, checked)
            distribution = total / count
            return (params.region_weight * region
                    + params.distribution_weight * distribution, region, distribution)
        (grad,) = recompute(value, (x,), grads)
        assert grad is not None
        return grad
    # each term's upstream gradient: its own and its weight's share of the combined one's
    upstream, own_region, own_distribution = upstreams
    region_upstream = upstream * params.region_weight + own_region
    pixel = (upstream * params.distribution_weight + own_distribution) * inverse_count
    saved = (target, probabilities, slope)
    if coefficients is not None:
        return native_backward(saved, config, *coefficients, pixel, region_upstream,
                               pooled=not params.region.per_image)
    n, c, _ = config[5]
    gi, gp = _region_grads(sums, cells, torch.scalar_tensor(region_upstream), params.region,
                           n, c)
    return native_backward(saved, config, gi, gp, pixel)


class NativeCompositeLoss(torch.autograd.Function):
    """``(w_r * region + w_d * distribution, region, distribution)`` from one forward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, dims: tuple[int, ...], params: CompositeParams,
                checked: bool):
        values, fwd, cells, coefficients, inverse_count = composite_forward(
            x, target, dims, params, checked, ctx.needs_input_grad[0])
        ctx.save_for_backward(x, fwd.target, fwd.probabilities, fwd.slope)
        ctx.native = (fwd.config, fwd.invalid, fwd.sums(), cells, coefficients, inverse_count,
                      params, checked, fwd.overflowed)
        return values

    @staticmethod
    def backward(ctx, grad_combined, grad_region, grad_distribution):
        x, target, probabilities, slope = ctx.saved_tensors
        grads = (grad_combined, grad_region, grad_distribution)
        grad = composite_backward(x, target, probabilities, slope, *ctx.native, grads,
                                  must_recompute(*grads), recompute_backward)
        return grad, None, None, None, None


class NativeSums(torch.autograd.Function):
    """``(I, P, G, poison)``: the sums ``(N, C)`` from ``x`` ``(N, C, M)`` (float32, or float64
    for float64 input, as ``x``) and
    a 0-dim NaN factor (NaN where a kept value is invalid, else 1) for the loss formed from
    them; ``G`` and the factor are not differentiable. For callers that combine the sums with
    torch ops (``ddp_pool=True``: the factor stays on this rank, as the reference's, where
    NaN sums would reach every rank's loss through the all-reduce)."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, dims: tuple[int, ...],
                params: RegionParams, checked: bool):
        fwd = native_forward(x, target, mode, params.from_logits, params.ignore_index, 0.0,
                             None, True, False, checked, ctx.needs_input_grad[0], dims=dims)
        real = compute_dtype(x.dtype)
        if fwd.invalid:  # the reference's sums, pooled as they are (a NaN input's are NaN,
            with torch.no_grad():  # a -inf logit's finite: every rank's loss, or this one's)
                intersection, prediction_sum, target_sum = (s.to(real) for s in (
                    reference.region_sums(_layout(x, target, mode), params.from_logits,
                                          params.ignore_index, checked)))
        else:
            intersection, prediction_sum, target_sum = (
                fwd.sums().as_tensor().to(real).unbind(-1))
        ctx.save_for_backward(x, fwd.target, fwd.probabilities)
        ctx.native = (fwd.config, params, checked, mode, fwd.invalid)
        poison = torch.scalar_tensor(math.nan if fwd.invalid else 1.0, dtype=real, device=CPU)
        ctx.mark_non_differentiable(target_sum, poison)
        return intersection, prediction_sum, target_sum, poison

    @staticmethod
    def backward(ctx, grad_intersection, grad_prediction_sum, _grad_target_sum, _grad_poison):
        x, target, probabilities = ctx.saved_tensors
        config, params, checked, mode, invalid = ctx.native
        if (must_recompute(grad_intersection, grad_prediction_sum) or invalid  # (invalid: above)
                or _non_finite(grad_intersection, grad_prediction_sum)):
            grads = recompute_backward(
                lambda xs: reference.region_sums(_layout(xs, target, mode), params.from_logits,
                                                 params.ignore_index, checked)[:2],
                (x,), (grad_intersection, grad_prediction_sum))
            return grads[0], None, None, None, None, None
        grad = native_backward((target, probabilities, None), config, grad_intersection,
                               grad_prediction_sum, None)
        return grad, None, None, None, None, None
