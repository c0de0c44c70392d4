"""What every loss call does with its tensors: layout, backend choice, value checks, compute.

Hyper-parameters arrive checked (:mod:`dynloss._params`); a call checks only what depends on
the tensors. Loss modules call these functions directly with the parameters they built at
construction; the public functions of this package build the parameters first.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from .._layout import (
    Layout,
    check_class_indices,
    check_values,
    ignore_index_for,
    prepare,
    readable,
    should_check_values,
)
from .._math import reduce, scaled
from .._params import CompositeParams, DistributionParams, RegionParams
from .._recorder import checked_in_graph, recorder
from ..constants import MULTICLASS_MODE
from ..kernels import reference
from ..kernels.capabilities import Backend, Need
from ..kernels.dispatch import select

__all__ = ["composite_loss", "distribution_loss", "distribution_need", "region_loss",
           "region_need", "run"]


def region_need(params: RegionParams) -> Need:
    """What a region loss with ``params`` asks of its backend."""
    return Need("region", params.mode, ddp_pool=params.ddp_pool, per_image=params.per_image)


def distribution_need(params: DistributionParams) -> Need:
    """What a distribution loss with ``params`` asks of its backend."""
    return Need("distribution", params.mode, topk=params.k is not None,
                reduction_none=params.reduction == "none",
                pos_weight=params.pos_weight is not None, weighted_mean=params.weighted_mean,
                focal=params.gamma != 0)


def _composite_need(params: CompositeParams) -> Need:
    dist = params.distribution
    return Need("composite", params.region.mode, per_image=params.region.per_image,
                pos_weight=dist.pos_weight is not None, weighted_mean=dist.weighted_mean)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (the losses then compute in float32)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # pragma: no cover - torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == "cuda" else (
            torch.is_autocast_cpu_enabled())
    except RuntimeError:  # a device without autocast (meta): nothing to switch off
        return False


Plans = dict
"""A loss module's memory of its recent calls: for each signature of the tensors (shapes,
dtypes, devices, whether the target requires a gradient, grad mode) the backend dispatch chose,
whether the value checks are due, and the layout's shapes. A call with a signature seen before
skips the shape checks and the choice (its tensors' values are still checked)."""

_MAX_PLANS = 8


def _prepare(input: Tensor, target: Tensor, mode: str, backend_name: str, need: Need,
             ignore_index: int | None, from_logits: bool, check: bool | None,
             plans: Plans | None = None) -> tuple[Layout, Backend, bool]:
    key = None
    if torch.compiler.is_compiling():
        # The plans serve eager calls: read in a graph, the dict would be guarded on, and each
        # new signature of an eager call (validation) would recompile the traced one.
        plans = None
    if isinstance(input, Tensor) and isinstance(target, Tensor):
        input, target = readable(input, target)  # float8, uint16/32/64: as int64 / float32
    if (plans is not None and isinstance(input, Tensor) and isinstance(target, Tensor)
            and recorder(input) is None):
        # (``is_cpu`` stands for the device where it can: cheaper than a device object; a
        # nested tensor has no shape: planned never, refused by prepare below)
        try:
            key = (type(input), input.shape, input.dtype, input.layout,
                   input.is_cpu or input.device, target.shape, target.dtype, target.layout,
                   target.is_cpu or target.device, target.requires_grad,
                   torch.is_grad_enabled())
        except RuntimeError:
            key = None
        plan = plans.get(key) if key is not None else None
        if plan is not None:
            backend, checked, dims, target_dims, elementwise_shape, classes = plan
            layout = Layout.of(input, target, mode, dims, target_dims, elementwise_shape)
            if classes:  # the class indices are read on the host (see check_class_indices)
                check_class_indices(layout, ignore_index)
            elif checked and not backend.capabilities.checks_values:
                check_values(layout, ignore_index, from_logits)
            return layout, backend, checked
    layout = prepare(input, target, mode)
    backend = select(backend_name, input, need, target.requires_grad, layout.num_classes)
    checked = should_check_values(check, input)
    classes = False
    if not backend.capabilities.checks_values:
        if checked:
            check_values(layout, ignore_index, from_logits)
        elif (mode == MULTICLASS_MODE and input.device.type == "cpu"
              and not checked_in_graph(input)):
            classes = True
            check_class_indices(layout, ignore_index)
    if key is not None and plans is not None:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plans[key] = (backend, checked, layout.dims, layout.target_dims,
                      layout.elementwise_shape, classes)
    return layout, backend, checked


_P = TypeVar("_P")
_F = TypeVar("_F", bound=Callable[..., Any])


def shared_doc(text: str) -> Callable[[_F], _F]:
    """A decorator that puts ``text`` (the arguments a family of losses shares) where a
    function's docstring says ``{shared}``; the function keeps its signature for type
    checkers, and under ``python -OO`` (no docstrings) nothing is done."""
    def insert(function: _F) -> _F:
        if function.__doc__ is not None:
            function.__doc__ = function.__doc__.replace("    {shared}\n", text.lstrip("\n"))
        return function
    return insert


def _matchable_ignore(params: _P, target: Tensor) -> _P:
    """``params`` without its ``ignore_index`` where ``target``'s dtype cannot hold it (a uint8
    target and 257, see :func:`dynloss._layout.target_can_equal`): nothing is ignored then,
    on every backend, instead of the values it wraps to."""
    ignore_index = getattr(params.region if isinstance(params, CompositeParams) else params,
                           "ignore_index", None)
    if ignore_index is None or not isinstance(target, Tensor):
        return params
    kept = ignore_index_for(target.dtype, ignore_index)
    if kept is not None:
        return params
    if isinstance(params, CompositeParams):
        return dataclasses.replace(
            params, region=dataclasses.replace(params.region, ignore_index=kept),
            distribution=dataclasses.replace(params.distribution, ignore_index=kept))
    return dataclasses.replace(params, ignore_index=kept)  # type: ignore[type-var]


def _check_weights_length(params: DistributionParams, layout: Layout, alpha_name: str
                          ) -> None:
    """Focal's per-class ``alpha`` and BCE's class ``weight`` (multiclass) and BCE's
    per-channel ``pos_weight``: one weight for each of the input's ``C`` channels."""
    if params.weighted_mean:
        alpha_name = "weight"
    alpha_count = len(params.alpha) if isinstance(params.alpha, tuple) else None
    for name, count, per in ((alpha_name, alpha_count, "class"),
                             ("pos_weight", params.pos_weight_count, "channel")):
        if count is not None and count != layout.num_classes and (
                per == "channel" or layout.mode == MULTICLASS_MODE):
            raise ValueError(
                f"{name} must hold one weight per {per}: {layout.num_classes} values for an "
                f"input with C={layout.num_classes}; got {count}"
            )


def region_loss(input: Tensor, target: Tensor, params: RegionParams,
                need: Need | None = None, plans: Plans | None = None) -> Tensor:
    """Dice/IoU/Tversky of ``input`` and ``target`` with checked ``params``."""
    params = _matchable_ignore(params, target)
    layout, backend, checked = _prepare(
        input, target, params.mode, params.backend, need or region_need(params),
        params.ignore_index, params.from_logits, params.check_values, plans)
    if not params.include_background or params.class_weight is not None:
        if not backend.capabilities.class_choice:
            return _chosen_classes(input, target, params, need, plans)
        params = _class_choice(params, layout.num_classes)
    if _autocast_on(input.device.type):
        with torch.autocast(device_type=input.device.type, enabled=False):
            return backend.region(layout, params, checked)
    return backend.region(layout, params, checked)


def _chosen_classes(input: Tensor, target: Tensor, params: RegionParams,
                    need: Need | None, plans: Plans | None) -> Tensor:
    """For a backend without ``class_choice``: every class's score from it
    (``reduction="none"``), each class's loss times its ``class_weight``, class 0's left out
    without the background, then ``params.reduction``."""
    scores = region_loss(input, target, _every_class(params), need, plans)  # (C,) or (N, C)
    chosen = _class_choice(params, scores.shape[-1])
    return reduce(reference.chosen_classes(scores, chosen), params.reduction)


def _class_choice(params: RegionParams, classes: int) -> RegionParams:
    """``params`` with ``C`` class weights (MONAI's ``C - 1`` of classes ``1..C-1`` get a 0
    for class 0, which is left out) for an input of ``classes`` channels, checked: the
    weights' number, and a class besides the background (cached outside a compile)."""
    if torch.compiler.is_compiling():
        return _checked_class_choice(params, classes)
    return _cached_class_choice(params, classes)


def _checked_class_choice(params: RegionParams, classes: int) -> RegionParams:
    if not params.include_background and classes < 2:
        raise ValueError(
            "include_background=False leaves no class to score in an input with C="
            f"{classes} channel; it needs C >= 2 (class 0 is the background)")
    weights = params.class_weight
    if weights is None:
        return params
    first = 0 if params.include_background else 1
    if len(weights) == classes - 1 and first == 1:  # MONAI's: classes 1..C-1 only
        return dataclasses.replace(params, class_weight=(0.0, *weights))
    if len(weights) != classes:
        also = "" if first == 0 else f" (or {classes - 1}, of classes 1..{classes - 1})"
        raise ValueError(f"weight must hold one weight per class: {classes} values for an "
                         f"input with C={classes}{also}; got {len(weights)}")
    return params


_cached_class_choice = functools.lru_cache(maxsize=256)(_checked_class_choice)


def _every_class(params: RegionParams) -> RegionParams:
    """``params`` scoring every class, unweighted and unreduced (cached outside a compile,
    whose tracer would warn of the cache: a call's parameters are built once per loss)."""
    if torch.compiler.is_compiling():
        return _scoring_every_class(params)
    return _cached_every_class(params)


def _scoring_every_class(params: RegionParams) -> RegionParams:
    return dataclasses.replace(params, reduction="none", include_background=True,
                               class_weight=None)


_cached_every_class = functools.lru_cache(maxsize=256)(_scoring_every_class)


def distribution_loss(input: Tensor, target: Tensor, params: DistributionParams,
                      need: Need | None = None, plans: Plans | None = None,
                      alpha_name: str = "alpha") -> Tensor:
    """BCE/Focal/TopK of ``input`` and ``target`` with checked ``params``."""
    params = _matchable_ignore(params, target)
    layout, backend, checked = _prepare(
        input, target, params.mode, params.backend, need or distribution_need(params),
        params.ignore_index, params.from_logits, params.check_values, plans)
    _check_weights_length(params, layout, alpha_name)
    if _autocast_on(input.device.type):
        with torch.autocast(device_type=input.device.type, enabled=False):
            return backend.distribution(layout, params, checked)
    return backend.distribution(layout, params, checked)


def composite_loss(input: Tensor, target: Tensor, params: CompositeParams,
                   plans: Plans | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(w_r * region + w_d * distribution, region, distribution)``, both terms reduced by
    their mean, in one fused pass where the backend has one.

    A TopK term has no fused pass, nor a region term that chooses or weighs its classes on
    a backend without ``class_choice``: the two terms are then computed one after the other.
    ``plans``: the caller's memory of recent calls (see :data:`Plans`), for these ``params``
    but for their weights, which a plan does not depend on.
    """
    params = _matchable_ignore(params, target)
    region, dist = params.region, params.distribution
    if dist.k is not None:
        return _one_after_the_other(input, target, params)
    layout, backend, checked = _prepare(
        input, target, region.mode, region.backend, _composite_need(params),
        region.ignore_index, region.from_logits, region.check_values, plans)
    if not region.include_background or region.class_weight is not None:
        if not backend.capabilities.class_choice:
            return _one_after_the_other(input, target, params)
        params = dataclasses.replace(params, region=_class_choice(region, layout.num_classes))
    _check_weights_length(dist, layout, "the distribution term's alpha")
    if _autocast_on(input.device.type):
        with torch.autocast(device_type=input.device.type, enabled=False):
            return backend.composite(layout, params, checked)
    return backend.composite(layout, params, checked)


def _one_after_the_other(input: Tensor, target: Tensor, params: CompositeParams
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`composite_loss` as its two terms, each computed on its own."""
    region_value = region_loss(input, target, params.region)
    dist_value = distribution_loss(input, target, params.distribution)
    total = (scaled(params.region_weight, region_value)
             + scaled(params.distribution_weight, dist_value))
    return total, region_value, dist_value


def run(op: str, input: Tensor, target: Tensor, params: Any, need: Need | None = None,
        plans: Plans | None = None) -> Tensor:
    """The loss of op ``op`` (a loss added after the six): ``backend.<op>(layout, params,
    checked)`` on the backend dispatch picks for ``Need(op, params.mode)``.

    ``params`` carries ``mode``, ``backend``, ``ignore_index``, ``from_logits`` and
    ``check_values`` like the checked parameters of :mod:`dynloss._params`. Kernel backends
    list their ops, so a new op runs on the reference until one declares it. A module's
    ``_prepare`` returns ``functools.partial(run, op)``: ``forward`` passes ``need`` and the
    module's ``plans``.
    """
    params = _matchable_ignore(params, target)
    layout, backend, checked = _prepare(
        input, target, params.mode, params.backend, need or Need(op, params.mode),
        params.ignore_index, params.from_logits, params.check_values, plans)
    compute = getattr(backend, op, None)
    if compute is None:
        raise TypeError(f"the {backend.name!r} backend has no op {op!r}: a new loss defines it "
                        "on the reference backend (docs/adding-a-loss.md, step 3)")
    if _autocast_on(input.device.type):
        with torch.autocast(device_type=input.device.type, enabled=False):
            return compute(layout, params, checked)
    return compute(layout, params, checked)
