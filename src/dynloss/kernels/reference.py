"""The ``"reference"`` backend: every loss as plain autograd code over :mod:`dynloss._math`.

Always correct, on every device and dtype, for every option: gradients for a target that
requires one, second-order gradients, ``reduction="none"``, ``ddp_pool``, TopK without a
host synchronisation, and ``torch.compile`` (it is what the compiler traces and fuses). The
other backends are tested against it, and their backward passes recompute through
:func:`region_sums`, :func:`distribution_terms` and :func:`region_loss` when a differentiable
gradient is asked for (``create_graph=True``).

>>> import torch
>>> from dynloss._layout import prepare
>>> from dynloss._params import region_params
>>> from dynloss.kernels.reference import REFERENCE
>>> layout = prepare(torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2), "binary")
>>> round(REFERENCE.region(layout, region_params(alpha=0.5, beta=0.5), True).item(), 4)
0.3333
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _math
from .._layout import Layout, compute_dtype, invalid_elements, invalid_values
from .._params import CompositeParams, DistributionParams, RegionParams
from .._recorder import recorder
from ..constants import MULTICLASS_MODE
from ..distributed import pool_across_ranks
from .capabilities import Capabilities

__all__ = ["REFERENCE", "chosen_classes", "class_multipliers", "class_weights",
           "distribution_terms", "pos_weight_of", "region_loss", "region_sums"]


def _class_index(layout: Layout, ignore_index: int | None, checked: bool
                 ) -> tuple[Tensor, Tensor | None]:
    """Class indices as int64 (ignored -> 0; out of range clamped when not checked: the loss
    is NaN then) and the kept mask (None when nothing is ignored)."""
    index = layout.target.long()
    valid = None if ignore_index is None else index != ignore_index
    if valid is not None:
        index = index.masked_fill(~valid, 0)
    if not checked:
        index = index.clamp(0, layout.num_classes - 1)
    return index, valid


def _kept_input(x: Tensor, keep: Tensor | None) -> Tensor:
    """``x`` with its ignored elements set to 0 (``keep``: broadcastable bool mask, None keeps
    all): a NaN or infinite input there then reaches neither the loss nor the gradient (masking
    after the sigmoid or softmax would leave ``0 * NaN`` in their backward)."""
    return x if keep is None else torch.where(keep, x, 0.0)


def region_sums(layout: Layout, from_logits: bool, ignore_index: int | None,
                checked: bool = True, pooled: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(I, P, G)``, each ``(N, C)``, over the kept elements, as plain autograd code.

    ``pooled=True`` (the batch is pooled): binary and multilabel sums with one channel may
    come back already summed over the batch, ``(1, 1)``: each sum is then one reduction over
    the whole tensor, which ``torch.compile`` fuses with the sigmoid and the value checks
    into a single pass over the input and the target (per row, it stores the probabilities
    for the second of the two sums that read them: one more pass, and a buffer the input's
    size)."""
    dtype = compute_dtype(layout.x.dtype)
    x = layout.x.to(dtype)
    if pooled and layout.mode != MULTICLASS_MODE and layout.num_classes == 1:
        layout = Layout(x.reshape(1, 1, -1), layout.target.reshape(1, 1, -1), layout.mode,
                        layout.elementwise_shape)
        x = layout.x
    if layout.mode == MULTICLASS_MODE:
        index, valid = _class_index(layout, ignore_index, checked)
        classes = torch.arange(layout.num_classes, device=index.device).view(1, -1, 1)
        g = (index.unsqueeze(1) == classes).to(dtype)
        keep = None if valid is None else valid.unsqueeze(1)
        p = _math.probabilities(_kept_input(x, keep), layout.mode, from_logits)
        if keep is not None:
            g = g * keep
            p = torch.where(keep, p, 0.0)
    else:
        target = layout.target
        g = target.to(dtype)
        keep = None if ignore_index is None else target != ignore_index
        p = _math.probabilities(_kept_input(x, keep), layout.mode, from_logits)
        if keep is not None:
            g = torch.where(keep, g, 0.0)
            p = torch.where(keep, p, 0.0)
    return (p * g).sum(-1), p.sum(-1), g.sum(-1)


def class_multipliers(params: RegionParams, classes: int) -> tuple[float, ...] | None:
    """What each class's loss is multiplied by before the reduction: its ``class_weight``
    (``C`` values, see :func:`dynloss.functional._call.region_loss`), 0 for class 0 without
    the background; None where every class counts once."""
    if params.class_weight is None and params.include_background:
        return None
    weights = params.class_weight or (1.0,) * classes
    return weights if params.include_background else (0.0, *weights[1:])


def chosen_classes(loss: Tensor, params: RegionParams) -> Tensor:
    """``loss`` ``(C,)`` or ``(N, C)``, each class's times its ``class_weight``, class 0 left
    out without the background (``include_background=False``): what is reduced."""
    if params.class_weight is not None:
        loss = loss * class_weights(params.class_weight, loss)
    return loss if params.include_background else loss[..., 1:]


def class_weights(weights: tuple[float, ...], like: Tensor) -> Tensor:
    """``weights`` as a tensor of ``like``'s dtype and device: cached for eager calls on plain
    tensors (a CUDA graph captured after a warm-up step copies nothing), made anew where a
    tool records or transforms the call (a fake tensor's, a compile's, an export's: a cached
    real tensor does not mix with fake ones, nor a fake one with later eager calls)."""
    if recorder(like) is not None or torch.compiler.is_exporting():
        return like.new_tensor(weights)
    return _cached_class_weights(weights, like.device, like.dtype)


@functools.lru_cache(maxsize=64)
def _cached_class_weights(weights: tuple[float, ...], device: torch.device,
                          dtype: torch.dtype) -> Tensor:
    with torch.inference_mode(False):  # (made in inference mode, autograd could not save it)
        return torch.tensor(weights, dtype=dtype, device=device)


def score_loss(sums: Sequence[Tensor], params: RegionParams, poison: Tensor | None = None
               ) -> Tensor:
    """``1 - T`` from the ``(N, C)`` sums ``(I, P, G)``: pooled over the batch unless
    ``per_image`` (and over the ranks with ``ddp_pool``), times ``poison`` (NaN for invalid
    values: every class's score then, also one left out, so that its gradient is NaN as the
    others'), the chosen classes weighed (:func:`chosen_classes`), then reduced."""
    intersection, prediction_sum, target_sum = sums
    if not params.per_image:
        intersection, prediction_sum, target_sum = (
            intersection.sum(0), prediction_sum.sum(0), target_sum.sum(0))
        if params.ddp_pool:
            intersection, prediction_sum, target_sum = pool_across_ranks(
                intersection, prediction_sum, target_sum)
    score = _math.tversky_index(intersection, prediction_sum, target_sum, params.alpha,
                                params.beta, params.smoothing)
    loss = 1.0 - score if poison is None else (1.0 - score) * poison
    return _math.reduce(chosen_classes(loss, params), params.reduction)


def region_loss(layout: Layout, params: RegionParams, checked: bool = True,
                poison: Tensor | None = None) -> Tensor:
    """The region loss, without the NaN of invalid values unless given their ``poison`` (see
    :meth:`Reference.region`)."""
    return score_loss(region_sums(layout, params.from_logits, params.ignore_index, checked,
                                  pooled=not params.per_image), params, poison)


def pos_weight_of(params: DistributionParams, x: Tensor) -> Tensor | float | None:
    """``params.pos_weight`` as :func:`dynloss._math.elementwise_bce` takes it for ``x`` in
    layout ``(N, C, M)``: a float, or one weight per channel ``(1, C, 1)`` in ``x``'s dtype."""
    weight = params.pos_weight
    if isinstance(weight, tuple):
        return torch.tensor(weight, dtype=x.dtype, device=x.device).view(1, -1, 1)
    return weight


def distribution_terms(layout: Layout, params: DistributionParams, checked: bool = True
                       ) -> tuple[Tensor, Tensor | None]:
    """Per-element losses (autograd) and the kept mask (``None`` when nothing is ignored).

    Shapes: ``(N, C, M)`` in binary/multilabel mode, ``(N, M)`` in multiclass mode; ignored
    elements hold 0.
    """
    dtype = compute_dtype(layout.x.dtype)
    x = layout.x.to(dtype)
    weight: Tensor | None = None
    if layout.mode == MULTICLASS_MODE:
        index, valid = _class_index(layout, params.ignore_index, checked)
        x = _kept_input(x, None if valid is None else valid.unsqueeze(1))
        b = _math.pixel_cross_entropy(x, index, params.from_logits)
        if params.alpha is not None:
            table = torch.as_tensor(params.alpha, dtype=dtype, device=index.device)
            weight = table[index]
    else:
        target = layout.target
        valid = None if params.ignore_index is None else target != params.ignore_index
        g = target.to(dtype)
        if valid is not None:
            g = torch.where(valid, g, 0.0)
        b = _math.elementwise_bce(_kept_input(x, valid), g, params.from_logits,
                                  pos_weight_of(params, x))
        if params.alpha is not None:
            assert isinstance(params.alpha, float)
            weight = _math.positive_weight(g, params.alpha)
    loss = _math.focal_modulation(b, params.gamma)
    if weight is not None:
        loss = loss * weight
    if valid is not None:
        loss = torch.where(valid, loss, 0.0)
    return loss, valid


def class_weight_sum(layout: Layout, params: DistributionParams, checked: bool,
                     dtype: torch.dtype) -> Tensor:
    """The sum of the kept pixels' class weights (``params.alpha``), the normaliser of a
    weighted mean; 1 where it is 0 (a loss of 0 then, as when every pixel is ignored)."""
    index, valid = _class_index(layout, params.ignore_index, checked)
    table = torch.as_tensor(params.alpha, dtype=dtype, device=index.device)
    weights = table[index]
    if valid is not None:
        weights = torch.where(valid, weights, 0.0)
    total = weights.sum()
    return torch.where(total > 0, total, 1.0)


def distribution_sum(layout: Layout, params: DistributionParams, checked: bool = True
                     ) -> tuple[Tensor, Tensor]:
    """``(S, count)``: the sum of the per-element losses (of the TopK selection with ``k``) and
    the number of terms of their mean (at least 1); no value read on the host."""
    loss, valid = distribution_terms(layout, params, checked)
    if params.weighted_mean:  # CrossEntropyLoss(weight=...): the kept pixels' class weights
        return loss.sum(), class_weight_sum(layout, params, checked, loss.dtype)
    if params.k is not None:
        loss = topk_selected(loss, valid, params.k)[0]
        count = topk_number(loss, valid, params.k)
    elif valid is None:
        # (a size, not float() of it: that fixed a symbolic size under torch.export)
        count = torch.full((), loss.numel(), dtype=loss.dtype, device=loss.device)
    else:
        count = valid.sum().to(loss.dtype)
    return loss.sum(), count.clamp_min(1)


def _selected_count(k: float, loss: Tensor, valid: Tensor | None) -> int | Tensor:
    """How many losses TopK selects: an int in eager mode, else a 0-dim tensor.

    Inside ``torch.compile`` the size may be symbolic (after the batch size changed), and
    :func:`~dynloss._math.topk_count`'s float arithmetic on a symbolic size gave 61 for
    ``0.6 * 100`` where the selection kept 60 (dynamo treats the size as an int), so the
    count is formed by :func:`~dynloss._math.topk_count_tensor` there."""
    if valid is not None:
        return _math.topk_count_tensor(k, valid.sum())
    numel = loss.numel()  # (a 0-dim tensor under torch.jit.trace)
    if isinstance(numel, int) and not torch.compiler.is_compiling():
        return _math.topk_count(k, numel)
    return _math.topk_count_tensor(k, torch.full((), numel, dtype=torch.int64,
                                                 device=loss.device))


def distribution_elements(layout: Layout, params: DistributionParams, checked: bool = True
                          ) -> Tensor:
    """The per-element losses of ``reduction="none"`` before invalid elements are marked NaN:
    :func:`distribution_terms`, 0 outside a TopK selection."""
    loss, valid = distribution_terms(layout, params, checked)
    return loss if params.k is None else topk_selected(loss, valid, params.k)[0]


def topk_number(loss: Tensor, valid: Tensor | None, k: float) -> Tensor:
    n = _selected_count(k, loss, valid)
    if isinstance(n, int):
        return torch.tensor(float(n), dtype=loss.dtype, device=loss.device)
    return n.to(loss.dtype)


def topk_selected(loss: Tensor, valid: Tensor | None, k: float) -> tuple[Tensor, Tensor]:
    """The per-element losses with the unselected ones zeroed, and the selection mask."""
    flat = loss.reshape(-1)
    ranked = flat.detach()
    n = _selected_count(k, flat, valid)
    if valid is not None:
        ranked = ranked.masked_fill(~valid.reshape(-1), -math.inf)
    selected = _math.topk_mask(ranked, n)
    return torch.where(selected, flat, 0.0).reshape(loss.shape), selected.reshape(loss.shape)


class Reference:
    """The reference backend (see the module documentation)."""

    name = "reference"
    capabilities = Capabilities(
        devices=None, dtypes=None, ops=None, topk=True, reduction_none=True,
        topk_reduction_none=True, pos_weight=True,
        topk_pos_weight=True, weighted_mean=True, class_choice=True, target_grad=True,
        double_backward=True, ddp_pool=True, compilable=True, traceable=True,
        func_transforms=True, forward_ad=True,
    )

    def unavailable(self, x: Tensor) -> str | None:
        return None

    def region(self, layout: Layout, params: RegionParams, checked: bool) -> Tensor:
        invalid = invalid_values(layout, params.ignore_index, params.from_logits, not checked)
        return region_loss(layout, params, checked, _math.non_finite_poison(invalid))

    def distribution(self, layout: Layout, params: DistributionParams, checked: bool
                     ) -> Tensor:
        invalid = invalid_values(layout, params.ignore_index, params.from_logits, not checked)
        if params.reduction != "none":
            total, count = distribution_sum(layout, params, checked)
            loss = total / count if params.reduction == "mean" else total
            return loss * _math.non_finite_poison(invalid)
        loss = distribution_elements(layout, params, checked)
        bad = invalid_elements(layout, params.ignore_index, params.from_logits, not checked)
        return (loss * _math.non_finite_poison(bad, loss.dtype)).reshape(
            layout.elementwise_shape)

    def composite(self, layout: Layout, params: CompositeParams, checked: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
        region = self.region(layout, params.region, checked)
        distribution = self.distribution(layout, params.distribution, checked)
        total = (_math.scaled(params.region_weight, region)
                 + _math.scaled(params.distribution_weight, distribution))
        return total, region, distribution


REFERENCE = Reference()
"""The reference backend."""
