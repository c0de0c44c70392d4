"""The ``"torch"`` backend: fused autograd Functions in eager PyTorch, on any device.

Each Function computes in one forward what the reference computes with a chain of autograd
ops, and writes the gradient analytically, so autograd records no intermediate tensors:

* :class:`RegionSums` returns the per-(sample, class) sums ``I = sum(p*g)``, ``P = sum(p)``,
  ``G = sum(g)`` that every region loss needs. Its backward is one elementwise expression,
  ``dL/dx = (dL/dP + dL/dI * g) * dp/dx``, whatever region formula consumed the sums. It saves
  the probabilities (for float32/float64 input; half-precision input is saved as is and the
  probabilities recomputed, which costs less memory).
* :class:`DistributionSum` returns the sum of the per-element BCE / cross-entropy losses after
  the focal modulation, class weights, ignore mask and TopK selection, and the normaliser of
  their mean. Its forward also computes the derivative of that sum with respect to the input,
  in the input's dtype, and saves only that: backward is one multiplication by the upstream
  gradient, and nothing transcendental is computed twice.
* :class:`DistributionElements` returns the same per-element losses unreduced
  (``reduction="none"``, on the CPU), its backward the saved slopes times the upstream one.

Either way one tensor the size of the input is kept for backward (besides the caller's input,
which a differentiable backward, ``create_graph=True``, recomputes from through the reference).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _math
from .._layout import Layout, compute_dtype, invalid_elements, invalid_values
from .._params import CompositeParams, DistributionParams, RegionParams
from ..constants import MULTICLASS_MODE
from . import reference
from ._recompute import must_recompute, recompute_backward
from .capabilities import Capabilities

__all__ = ["TORCH", "DistributionElements", "DistributionSum", "RegionSums"]


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)




def _binary_target(target: Tensor, dtype: torch.dtype, ignore_index: int | None):
    """The target as ``dtype`` (ignored entries zeroed) and the kept mask (or None)."""
    g = _as(target, dtype)
    if ignore_index is None:
        return g, None
    valid = target != ignore_index
    return g.masked_fill(~valid, 0), valid


def _class_index(target: Tensor, ignore_index: int | None, classes: int, checked: bool
                 ) -> tuple[Tensor, Tensor | None]:
    index = target.long()
    valid = None if ignore_index is None else index != ignore_index
    if valid is not None:
        index = index.masked_fill(~valid, 0)
    if not checked:  # out-of-range labels: any valid index (the loss is NaN then)
        index = index.clamp(0, classes - 1)
    return index, valid


def _probabilities(x: Tensor, mode: str, from_logits: bool) -> Tensor:
    return _math.probabilities(_as(x, compute_dtype(x.dtype)), mode, from_logits)


# ----------------------------------------------------------------------------- region sums
def _binary_region_sums(p: Tensor, target: Tensor, ignore_index: int | None, pooled: bool):
    # batch-pooled binary sums need no split by sample: one row, whole-tensor reductions
    rows = 1 if pooled and p.shape[1] == 1 else p.shape[0] * p.shape[1]
    p2 = p.reshape(rows, -1) if rows else p.reshape(0, p.shape[-1])
    g, valid = _binary_target(target.reshape(p2.shape), p.dtype, ignore_index)
    if valid is not None:
        p2 = p2.masked_fill(~valid, 0)
    # (vecdot sums pairwise, as torch.sum: a BLAS dot added 4 Mi float32 products in a few
    # running sums, 3 % off; scatter_add_ and einsum below alike)
    intersection = torch.linalg.vecdot(p2, g)
    sums = (intersection, p2.sum(-1), g.sum(-1))
    return tuple(s.view(-1, p.shape[1]) for s in sums)


def _binary_region_backward(x, dtype, target, gi, gp, from_logits, ignore_index):
    # reads x and the target only: dp/dx comes from x, so forward keeps no probabilities
    g, valid = _binary_target(target, dtype, ignore_index)
    # dL/dp; expanding `self` keeps addcmul on its vectorised path (a (N, C, 1) self is 3x slower)
    grad = torch.addcmul(gp.unsqueeze(-1).expand_as(g), gi.unsqueeze(-1), g)
    if from_logits:  # dp/dx with all its digits where the sigmoid saturates
        _math.sigmoid_backward(grad, _as(x, dtype), out=grad)
    if valid is not None:
        grad.masked_fill_(~valid, 0)
    return grad


def _multiclass_region_sums(p: Tensor, index: Tensor, valid: Tensor | None):
    # each pixel's probability of its class, added into its class in float64: scatter_add_
    # adds one value after another, and in float32 a confident model's intersection of
    # (4, 3, 2**18) came out 60 % low (counts stop at 2**24 in float32)
    n, c, _ = p.shape
    picked = p.gather(1, index.unsqueeze(1)).squeeze(1)
    wide = torch.float64 if p.device.type != "mps" else torch.float32  # (mps has no float64)
    if valid is None and not p.is_meta:  # (bincount has no meta kernel)
        prediction_sum = p.sum(-1)
        flat = index + torch.arange(n, device=p.device).unsqueeze(1) * c
        target_sum = torch.bincount(flat.reshape(-1), minlength=n * c).view(n, c).to(p.dtype)
    else:
        if valid is None:
            valid = torch.ones_like(index, dtype=torch.bool)
        picked = torch.where(valid, picked, 0.0)  # not * weight: an ignored NaN stays out
        prediction_sum = torch.where(valid.unsqueeze(1), p, 0.0).sum(-1)
        target_sum = p.new_zeros(n, c, dtype=wide).scatter_add_(
            1, index, valid.to(wide)).to(p.dtype)
    intersection = p.new_zeros(n, c, dtype=wide).scatter_add_(
        1, index, picked.to(wide)).to(p.dtype)
    return intersection, prediction_sum, target_sum


def _multiclass_region_backward(p, index, valid, gi, gp, from_logits):
    # dL/dp = u = gp + gi * onehot(target), then the softmax's backward (which keeps its
    # digits where the softmax saturates); gp + 0 * gi off the target: NaN where gi is
    # infinite, as the reference's sum(p * onehot) gives
    grad = (gp + gi * 0).unsqueeze(-1).expand_as(p).clone()
    grad.scatter_(1, index.unsqueeze(1), (gp + gi).gather(1, index).unsqueeze(1))
    if from_logits:
        grad = _math.softmax_backward(p, grad)
    if valid is not None:
        grad.masked_fill_(~valid.unsqueeze(1), 0)
    return grad


def _reference_sums(x: Tensor, target: Tensor, mode: str, from_logits: bool,
                    ignore_index: int | None, pooled: bool, checked: bool):
    layout = Layout(x, target, mode, x.shape)
    sums = reference.region_sums(layout, from_logits, ignore_index, checked)
    if pooled and x.shape[1] == 1:
        return tuple(s.sum(0, keepdim=True) for s in sums)
    return sums


class RegionSums(torch.autograd.Function):
    """``(I, P, G)``, each ``(N, C)``, from ``x`` ``(N, C, M)`` and the target layout.

    With ``pooled=True`` the sums may come back already summed over the batch, ``(1, C)``.
    ``G`` is not differentiable (the target gets no gradient here: dispatch sends a target
    that needs one to the reference).
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, from_logits: bool,
                ignore_index: int | None, pooled: bool, checked: bool):
        p = _probabilities(x, mode, from_logits)
        if mode == MULTICLASS_MODE:
            index, valid = _class_index(target, ignore_index, x.shape[1], checked)
            sums = _multiclass_region_sums(p, index, valid)
        else:
            sums = _binary_region_sums(p, target, ignore_index, pooled)
        # the softmax's backward reads p (kept unless it is a float32 copy of half input);
        # the binary backward needs x alone
        keep_probabilities = mode == MULTICLASS_MODE and p.dtype == x.dtype
        ctx.save_for_backward(x, target, p if keep_probabilities else None)
        ctx.config = (mode, from_logits, ignore_index, pooled, checked)
        ctx.mark_non_differentiable(sums[2])
        return sums

    @staticmethod
    def backward(ctx, grad_intersection, grad_prediction_sum, grad_target_sum):
        x, target, saved_p = ctx.saved_tensors
        mode, from_logits, ignore_index, pooled, checked = ctx.config
        if must_recompute(grad_intersection, grad_prediction_sum):  # (create_graph=True)
            grads = recompute_backward(
                lambda xs: _reference_sums(xs, target, mode, from_logits, ignore_index, pooled,
                                           checked)[:2],
                (x,), (grad_intersection, grad_prediction_sum))
            return grads[0], None, None, None, None, None, None
        dtype = compute_dtype(x.dtype)
        shape = (grad_intersection if grad_intersection is not None else grad_prediction_sum).shape
        zeros = torch.zeros(shape, dtype=dtype, device=x.device)
        gi = grad_intersection if grad_intersection is not None else zeros
        gp = grad_prediction_sum if grad_prediction_sum is not None else zeros
        if mode == MULTICLASS_MODE:
            p = saved_p if saved_p is not None else _probabilities(x, mode, from_logits)
            index, valid = _class_index(target, ignore_index, x.shape[1], checked)
            grad = _multiclass_region_backward(p, index, valid, gi, gp, from_logits)
        else:
            grad = _binary_region_backward(x, dtype, target, gi, gp, from_logits, ignore_index)
        return _as(grad, x.dtype), None, None, None, None, None, None


# ----------------------------------------------------------------------------- distribution
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


def _binary_distribution_terms(x, target, dtype, params: DistributionParams):
    """Per-element losses, their derivatives in ``x``, and the kept mask (or None)."""
    xc = _as(x, dtype)
    g, valid = _binary_target(target, dtype, params.ignore_index)
    # d loss / dx = coefficient * d bce / dx, coefficient = (focal slope) * (alpha weight)
    coefficient = None
    pos_weight = reference.pos_weight_of(params, xc)
    if params.from_logits and pos_weight is None:
        loss = _bce_with_logits(xc, g)
    else:
        loss = _math.elementwise_bce(xc, g, params.from_logits, pos_weight)
    if params.gamma != 0:
        loss, coefficient = _math.focal_modulation_and_slope(loss, params.gamma)
    if params.alpha is not None:
        assert isinstance(params.alpha, float)
        weight = _math.positive_weight(g, params.alpha)
        loss.mul_(weight)
        coefficient = weight if coefficient is None else coefficient.mul_(weight)
    # exact where the sigmoid saturates; probabilities: the coefficient goes into the
    # quotients' numerators (_math.clamped_log_ratio)
    slope = _math.bce_slope(xc, g, params.from_logits, coefficient, pos_weight)
    if valid is not None:
        loss.masked_fill_(~valid, 0)
        slope.masked_fill_(~valid, 0)
    return loss, slope, valid


def _multiclass_distribution_terms(x, target, dtype, params: DistributionParams, checked):
    xc = _as(x, dtype)
    index, valid = _class_index(target, params.ignore_index, x.shape[1], checked)
    if params.from_logits:  # d ce / dx_c = softmax_c - [c == t]
        # ce = (max - x_t) + log1p(rest) (_math.cross_entropy_from_rest), whose parts give the
        # softmax e / (1 + rest) and p_t - 1 = -(sum of the other classes' e) / (1 + rest)
        # = -((1 - e_t) + rest) / (1 + rest): all its digits as p_t nears 1 (e_t is then 1)
        at = index.unsqueeze(1)
        mx, e, rest = _math.softmax_rest(xc)
        loss = _math.cross_entropy_from_rest(mx, rest, xc.gather(1, at)).squeeze(1)  # (N, M)
        total = rest + 1
        others = (1 - e.gather(1, at)).add_(rest)
        slope = e.div_(total).scatter_(1, at, others.div_(total).neg_())
    else:  # ce = -max(log p_t, -100); d ce / dp_c = -[c == t] / p_t, 0 where clamped
        at = index.unsqueeze(1)
        picked = xc.gather(1, at)
        loss = -_math.clamped_log(picked.squeeze(1))  # (N, M)
    coefficient = None
    if params.gamma != 0:
        loss, coefficient = _math.focal_modulation_and_slope(loss, params.gamma)
    if params.alpha is not None:
        weight = torch.as_tensor(params.alpha, dtype=dtype, device=x.device)[index]
        loss.mul_(weight)
        coefficient = weight if coefficient is None else coefficient.mul_(weight)
    if params.from_logits:
        if coefficient is not None:
            slope.mul_(coefficient.unsqueeze(1))
    else:  # the coefficient goes into the quotient's numerator (_math.clamped_log_ratio)
        numerator = 1.0 if coefficient is None else coefficient.unsqueeze(1)
        slope = torch.zeros_like(xc).scatter_(
            1, at, _math.clamped_log_ratio(numerator, picked).neg_())
    if valid is not None:  # filled, not multiplied by 0: an ignored NaN or inf stays out
        loss.masked_fill_(~valid, 0)
        slope.masked_fill_(~valid.unsqueeze(1), 0)
    weight_sum = None  # CrossEntropyLoss(weight=...)'s normaliser: the kept pixels' weights
    if params.weighted_mean:
        weight_sum = (weight if valid is None else weight.masked_fill(~valid, 0)).sum()
    return loss, slope, valid, weight_sum


def _reference_distribution_sum(x: Tensor, target: Tensor, params: DistributionParams,
                                checked: bool) -> Tensor:
    layout = Layout(x, target, params.mode, x.shape)
    return reference.distribution_sum(layout, params, checked)[0]


def _host_readable(t: Tensor) -> bool:
    """Whether reading ``t``'s value on the host is free: a CPU tensor outside a compile."""
    return t.is_cpu and not torch.compiler.is_compiling()


class DistributionSum(torch.autograd.Function):
    """``(S, count)``: the sum of per-element losses and the normaliser of their mean."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, params: DistributionParams, checked: bool):
        dtype = compute_dtype(x.dtype)
        if params.mode == MULTICLASS_MODE:
            loss, slope, valid, weight_sum = _multiclass_distribution_terms(
                x, target, dtype, params, checked)
        else:
            loss, slope, valid = _binary_distribution_terms(x, target, dtype, params)
            weight_sum = None
        # the elements the loss does not depend on: their gradient is 0 even where the
        # upstream gradient is NaN (a NaN input), as the reference's (not slope * NaN). Kept
        # for backward only where it cannot read the upstream gradient on the host (CUDA):
        # elsewhere backward recomputes for a NaN upstream
        keep_dropped = not _host_readable(x)
        dropped = ~valid if keep_dropped and valid is not None else None
        if params.k is not None:
            loss, selected = reference.topk_selected(loss, valid, params.k)
            total = loss.sum()
            unselected = ~selected
            slope.masked_fill_(unselected.unsqueeze(1) if params.mode == MULTICLASS_MODE
                               else unselected, 0)
            dropped = unselected if keep_dropped else None
            count = reference.topk_number(loss, valid, params.k)
        else:
            total = loss.sum()
            if weight_sum is not None:  # the kept pixels' class weights (1 where 0, below)
                count = weight_sum
            elif valid is None:
                count = torch.tensor(float(loss.numel()), dtype=dtype, device=x.device)
            else:
                count = valid.sum().to(dtype)
        # kept in the compute dtype: rounded to a half-precision input's dtype before the
        # upstream gradient and 1/M are applied, small slopes became subnormals or 0
        saved = slope
        if dropped is not None and params.mode == MULTICLASS_MODE:
            dropped = dropped.unsqueeze(1)
        ctx.save_for_backward(x, target, saved, dropped)
        # probabilities: where 1/p overflows the slope is +-inf (float32 p below ~2.9e-39;
        # float16 ~1.5e-5), and upstream * inf is not what autograd forms, (upstream * w) / p:
        # backward then recomputes through the reference maths. Tested on the CPU only, where
        # reading the answer costs no device synchronisation (and not inside a compiled
        # graph); on the CPU "auto" sends float32 to the native kernels (but for short rows
        # kept per row), which count such slopes in their own pass
        ctx.config = (params, checked,
                      not params.from_logits and _host_readable(saved)
                      and bool(torch.isinf(saved).any()))
        ctx.mark_non_differentiable(count)
        return total, torch.where(count > 0, count, 1.0)  # (a class weights' sum may be < 1)

    @staticmethod
    def backward(ctx, grad_total, _grad_count):
        x, target, slope, dropped = ctx.saved_tensors
        params, checked, overflowed = ctx.config
        # create_graph=True (a differentiable gradient), slopes that overflowed, or (on the
        # CPU, where reading it is free) a NaN upstream gradient, i.e. a NaN input: the
        # reference's gradient is then 0, not slope * NaN, wherever the loss does not read the
        # element (beyond the ignored and unselected ones masked below, a multiclass pixel's
        # other classes and a clamped log of a probability)
        if must_recompute(grad_total) or overflowed or (
                _host_readable(grad_total) and not bool(torch.isfinite(grad_total))):
            (grad,) = recompute_backward(
                lambda xs: _reference_distribution_sum(xs, target, params, checked),
                (x,), (grad_total,))
            return grad, None, None, None
        # scaled in the compute dtype (the upstream's: 1/N underflows float16), rounded to the
        # input's dtype once
        grad = _as(_as(slope, grad_total.dtype) * grad_total, x.dtype)
        if dropped is not None:
            grad = grad.masked_fill_(dropped, 0)
        return grad, None, None, None


def _reference_elements(x: Tensor, target: Tensor, params: DistributionParams,
                        checked: bool) -> Tensor:
    return reference.distribution_elements(Layout(x, target, params.mode, x.shape), params,
                                           checked)


class DistributionElements(torch.autograd.Function):
    """The per-element losses of ``reduction="none"`` (``(N, C, M)``, multiclass ``(N, M)``),
    after the focal modulation, class weights, ignore mask and TopK selection (0 outside it).
    Its forward also computes their derivatives in the input, and saves only those: backward
    multiplies them by the upstream gradient. On the CPU only (see the backend's
    capabilities): an upstream gradient that is not finite everywhere (the caller's weights,
    a NaN loss) goes through the reference, whose gradient is 0 wherever the loss does not
    read an element whatever the upstream; reading that elsewhere would cost a device
    synchronisation."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, params: DistributionParams, checked: bool):
        dtype = compute_dtype(x.dtype)
        multiclass = params.mode == MULTICLASS_MODE
        if multiclass:
            loss, slope, valid, _ = _multiclass_distribution_terms(x, target, dtype, params,
                                                                   checked)
        else:
            loss, slope, valid = _binary_distribution_terms(x, target, dtype, params)
        if params.k is not None:
            loss, selected = reference.topk_selected(loss, valid, params.k)
            slope.masked_fill_(~selected.unsqueeze(1) if multiclass else ~selected, 0)
        ctx.save_for_backward(x, target, slope)
        # probabilities whose slope overflowed: formed as autograd forms it (DistributionSum)
        ctx.config = (params, checked,
                      not params.from_logits and bool(torch.isinf(slope).any()))
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, target, slope = ctx.saved_tensors
        params, checked, overflowed = ctx.config
        # (a finite sum: every element finite, read in one pass; one that overflowed only
        # takes the exact path for nothing)
        if (must_recompute(grad) or overflowed or not _host_readable(grad)
                or not math.isfinite(grad.sum())):
            (grad_x,) = recompute_backward(
                lambda xs: _reference_elements(xs, target, params, checked), (x,), (grad,))
            return grad_x, None, None, None
        upstream = grad.unsqueeze(1) if params.mode == MULTICLASS_MODE else grad
        return _as(_as(slope, grad.dtype) * upstream, x.dtype), None, None, None


# ----------------------------------------------------------------------------- the backend
def _poison(layout: Layout, ignore_index: int | None, from_logits: bool, checked: bool
            ) -> Tensor:
    return _math.non_finite_poison(invalid_values(layout, ignore_index, from_logits,
                                                  not checked))


class TorchBackend:
    """The torch backend (see the module documentation)."""

    name = "torch"
    capabilities = Capabilities(
        devices=None,
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        topk=True, pos_weight=True, topk_pos_weight=True, weighted_mean=True, ddp_pool=True,
        class_choice=True, double_backward=True,
        # per-element losses on the CPU, where backward reads its upstream gradient for free
        reduction_none=True, reduction_none_devices=frozenset({"cpu"}),
        topk_reduction_none=True,
    )

    def unavailable(self, x: Tensor) -> str | None:
        return None

    def region_sums(self, layout: Layout, params: RegionParams, checked: bool):
        return RegionSums.apply(layout.x, layout.target, layout.mode, params.from_logits,
                                params.ignore_index, not params.per_image, checked)

    def region(self, layout: Layout, params: RegionParams, checked: bool) -> Tensor:
        poison = _poison(layout, params.ignore_index, params.from_logits, checked)
        return reference.score_loss(self.region_sums(layout, params, checked), params, poison)

    def distribution(self, layout: Layout, params: DistributionParams, checked: bool
                     ) -> Tensor:
        if params.reduction == "none":
            loss = DistributionElements.apply(layout.x, layout.target, params, checked)
            # NaN where an element is invalid, its gradient too (multiplied, not selected);
            # which ones is asked only where one is (a CPU tensor: read for free)
            if bool(invalid_values(layout, params.ignore_index, params.from_logits,
                                   not checked)):
                bad = invalid_elements(layout, params.ignore_index, params.from_logits,
                                       not checked)
                loss = loss * _math.non_finite_poison(bad, loss.dtype)
            return loss.reshape(layout.elementwise_shape)
        total, count = DistributionSum.apply(layout.x, layout.target, params, checked)
        loss = total / count if params.reduction == "mean" else total
        return loss * _poison(layout, params.ignore_index, params.from_logits, checked)

    def composite(self, layout: Layout, params: CompositeParams, checked: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
        poison = _poison(layout, params.region.ignore_index, params.region.from_logits, checked)
        region = reference.score_loss(self.region_sums(layout, params.region, checked),
                                      params.region, poison)
        total, count = DistributionSum.apply(layout.x, layout.target, params.distribution,
                                             checked)
        distribution = total / count * poison
        combined = params.region_weight * region + params.distribution_weight * distribution
        return combined, region, distribution


TORCH = TorchBackend()
"""The torch backend."""
