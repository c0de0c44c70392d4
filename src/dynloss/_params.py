"""Checked hyper-parameters of a loss, built once and passed down to the backends.

A loss module builds its parameters at construction; a functional call builds them from its
arguments. Either way every scalar check runs here, once, and a call then only checks what
depends on the tensors (shapes, dtypes, devices, values).

>>> from dynloss._params import region_params
>>> params = region_params(alpha=0.5, beta=0.5, smooth=0.0, eps=1e-7)
>>> params.smoothing, params.mode, params.reduction
(1e-07, 'binary', 'mean')
>>> region_params(alpha=-1.0, beta=0.5)
Traceback (most recent call last):
...
ValueError: alpha must be >= 0; got -1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._checks import (
    check_backend,
    check_bool,
    check_class_weight,
    check_ddp_pool,
    check_float32_range,
    check_focal_alpha,
    check_fraction,
    check_ignore_index,
    check_include_background,
    check_mode,
    check_non_negative,
    check_optional_bool,
    check_pos_weight,
    check_real,
    check_reduction,
    check_region_weight,
    check_smoothing,
)

__all__ = [
    "CallParams",
    "CompositeParams",
    "DistributionParams",
    "RegionParams",
    "composite_params",
    "distribution_params",
    "region_params",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class CallParams:
    """What every loss call states about its input, output and backend."""

    mode: str
    from_logits: bool
    ignore_index: int | None
    reduction: str
    backend: str
    check_values: bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RegionParams(CallParams):
    """Dice, IoU and Tversky: the Tversky weights and everything else a call needs."""

    alpha: float
    beta: float
    smoothing: float
    """``smooth + eps``."""
    per_image: bool
    ddp_pool: bool
    include_background: bool = True
    """False: the score of class 0 is left out of the reduction (computed, then dropped)."""
    class_weight: tuple[float, ...] | None = None
    """One weight per class multiplying its loss before the reduction (MONAI's ``weight``);
    ``C`` values, or ``C - 1`` (classes 1..C-1) without the background; None: unweighted."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributionParams(CallParams):
    """BCE, Focal and TopK: focal ``gamma`` (0 for BCE/TopK), ``alpha``, TopK's ``k``."""

    gamma: float
    alpha: float | tuple[float, ...] | None
    k: float | None
    """The TopK fraction, or None (BCE, Focal)."""
    pos_weight: float | tuple[float, ...] | None = None
    """BCE's weight of the positives' term (one, or one per channel); None: 1 (unweighted)."""
    pos_weight_count: int | None = None
    """How many per-channel ``pos_weight`` values were given (checked against ``C`` per
    call), also where they were all 1 and ``pos_weight`` is None; None: not per channel."""
    weighted_mean: bool = False
    """The mean divides by the kept elements' ``alpha`` (the multiclass cross-entropy's class
    ``weight``), not their number: ``CrossEntropyLoss(weight=...)``."""


@dataclass(frozen=True, slots=True)
class CompositeParams:
    """``region_weight * region + distribution_weight * distribution`` over one input."""

    region: RegionParams
    distribution: DistributionParams
    region_weight: float
    distribution_weight: float


def _common(mode: object, from_logits: object, ignore_index: object, reduction: object,
            backend: object, check_values: object) -> dict[str, Any]:
    """The checked fields of :class:`CallParams`, by name."""
    return {"mode": check_mode(mode), "from_logits": check_bool("from_logits", from_logits),
            "ignore_index": check_ignore_index(ignore_index),
            "reduction": check_reduction(reduction), "backend": check_backend(backend),
            "check_values": check_optional_bool("check_values", check_values)}


def region_params(
    *, alpha: object, beta: object, mode: object = "binary", from_logits: object = True,
    smooth: object = 0.0, eps: object = 1e-7, per_image: object = False,
    ignore_index: object = None, reduction: object = "mean", backend: object = "auto",
    check_values: object = None, ddp_pool: object = False, include_background: object = True,
    weight: object = None,
) -> RegionParams:
    """Check the arguments of a region loss; a clear ValueError/TypeError names a bad one."""
    alpha = check_float32_range("alpha", check_non_negative("alpha", alpha))
    beta = check_float32_range("beta", check_non_negative("beta", beta))
    common = _common(mode, from_logits, ignore_index, reduction, backend, check_values)
    per_image = check_bool("per_image", per_image)
    ddp_pool = check_ddp_pool(ddp_pool, per_image)
    smooth, eps = check_smoothing(smooth, eps)
    check_float32_range("smooth + eps", smooth + eps)
    include_background = check_include_background(include_background, common["mode"])
    class_weight = check_region_weight(weight, common["mode"])
    return RegionParams(alpha=alpha, beta=beta, smoothing=smooth + eps, per_image=per_image,
                        ddp_pool=ddp_pool, include_background=include_background,
                        class_weight=class_weight, **common)


def distribution_params(
    *, gamma: object = 0.0, alpha: object = None, k: object = None, mode: object = "binary",
    from_logits: object = True, ignore_index: object = None, reduction: object = "mean",
    backend: object = "auto", check_values: object = None, alpha_name: str = "alpha",
    pos_weight: object = None, weight: object = None,
) -> DistributionParams:
    """Check the arguments of a distribution loss (BCE: ``gamma=0``; TopK: ``k`` given; BCE's
    multiclass ``weight`` becomes ``alpha`` with a weighted mean)."""
    common = _common(mode, from_logits, ignore_index, reduction, backend, check_values)
    gamma = check_float32_range("gamma", check_non_negative("gamma", gamma))
    checked_alpha = check_focal_alpha(alpha, common["mode"], alpha_name)
    class_weight = check_class_weight(weight, common["mode"])
    weighted_mean = False
    if class_weight is not None:  # (all ones too: their number is checked against C)
        if checked_alpha is not None or k is not None:
            raise ValueError("weight (the cross-entropy's class weights) is for BCELoss alone")
        checked_alpha, weighted_mean = class_weight, True
    checked_k = None if k is None else check_fraction("k", k)
    if checked_k == 1.0:  # every element is selected: TopK is BCE, formed as BCE, bit for bit
        checked_k = None
    checked_weight = check_pos_weight(pos_weight, common["mode"])
    count = len(checked_weight) if isinstance(checked_weight, tuple) else None
    if checked_weight == 1.0 or (isinstance(checked_weight, tuple)
                                 and all(w == 1.0 for w in checked_weight)):
        checked_weight = None  # the unweighted loss, bit for bit (and on every backend)
    return DistributionParams(gamma=gamma, alpha=checked_alpha, k=checked_k,
                              pos_weight=checked_weight, pos_weight_count=count,
                              weighted_mean=weighted_mean, **common)


def composite_params(region: RegionParams, distribution: DistributionParams,
                     region_weight: object = 1.0, distribution_weight: object = 1.0
                     ) -> CompositeParams:
    """Two terms over the same input: they must agree on what the input and target are."""
    for name in ("mode", "from_logits", "ignore_index", "backend", "check_values"):
        if getattr(region, name) != getattr(distribution, name):
            raise ValueError(
                f"the two terms of a fused composite must share {name}; got "
                f"{getattr(region, name)!r} and {getattr(distribution, name)!r}"
            )
    return CompositeParams(region, distribution, check_real("region_weight", region_weight),
                           check_real("distribution_weight", distribution_weight))
