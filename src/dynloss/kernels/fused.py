"""Composite losses ``w_r * region + w_p * pixel`` in one fused pass (the paper's pairs).

:func:`region_pixel_loss` computes, for example, Dice+BCE or Dice+Focal. On CUDA (Triton) the
region sums and the pixel-loss sum come from one streaming forward pass and the gradient from
one elementwise backward pass; on the ``"torch"`` backend the two fused eager Functions run
one after the other; ``"reference"`` adds the two plain-autograd losses. TopK as the pixel
term is not fused (it needs its own selection passes): it runs as region sums + TopK.

The weights are plain floats applied to two scalars after the kernels, so a schedule can change
them every step at no cost (and without recompiling anything):

>>> import torch
>>> from dynloss.kernels import region_pixel_loss
>>> logits, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
>>> round(region_pixel_loss(logits, target, region="dice", pixel="bce").item(), 4)
1.0265
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import (
    check_backend,
    check_bool,
    check_choice,
    check_fraction,
    check_ignore_index,
    check_mode,
    check_non_negative,
    check_optional_bool,
    check_real,
    check_smoothing,
)
from .._layout import prepare

REGION_TERMS = ("dice", "iou", "jaccard", "tversky")
PIXEL_TERMS = ("bce", "focal", "topk")

__all__ = ["PIXEL_TERMS", "REGION_TERMS", "RegionPixelLoss", "region_pixel_loss"]


def _region_weights(region: str, tversky_alpha: float, tversky_beta: float) -> tuple[float, float]:
    if region == "dice":
        return 0.5, 0.5
    if region in ("iou", "jaccard"):
        return 1.0, 1.0
    return tversky_alpha, tversky_beta


def region_pixel_loss(
    input: Tensor,
    target: Tensor,
    *,
    region: str = "dice",
    pixel: str = "bce",
    region_weight: float = 1.0,
    pixel_weight: float = 1.0,
    mode: str = "binary",
    from_logits: bool = True,
    tversky_alpha: float = 0.3,
    tversky_beta: float = 0.7,
    smooth: float = 0.0,
    eps: float = 1e-7,
    per_image: bool = False,
    gamma: float = 2.0,
    focal_alpha: float | Sequence[float] | None = None,
    k: float = 0.6,
    ignore_index: int | None = None,
    backend: str = "auto",
    check_values: bool | None = None,
    return_terms: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    r"""``region_weight * region_loss + pixel_weight * pixel_loss``, fused where possible.

    Each term equals the corresponding :mod:`dynloss.functional` loss with
    ``reduction="mean"``: ``region`` is ``"dice"``, ``"iou"`` (``"jaccard"``) or
    ``"tversky"`` (with ``tversky_alpha``/``tversky_beta``, ``smooth``, ``eps``,
    ``per_image``); ``pixel`` is ``"bce"``, ``"focal"`` (``gamma``, ``focal_alpha``) or
    ``"topk"`` (``k``; not fused). ``mode``, ``from_logits``, ``ignore_index``, ``backend``
    and ``check_values`` mean what they mean for the single losses.

    Returns:
        The weighted sum, a float32 scalar; with ``return_terms=True`` the tuple
        ``(total, region_term, pixel_term)`` (unweighted terms, for logging).

    Examples:
        >>> import torch
        >>> from dynloss.kernels import region_pixel_loss
        >>> logits, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
        >>> total, dice, bce = region_pixel_loss(logits, target, return_terms=True)
        >>> round(dice.item(), 4), round(bce.item(), 4)
        (0.3333, 0.6931)
    """
    region = check_choice("region", region, REGION_TERMS)
    pixel = check_choice("pixel", pixel, PIXEL_TERMS)
    region_weight = check_real("region_weight", region_weight)
    pixel_weight = check_real("pixel_weight", pixel_weight)
    mode = check_mode(mode)
    check_bool("from_logits", from_logits)
    check_bool("per_image", per_image)
    check_bool("return_terms", return_terms)
    tversky_alpha = check_non_negative("tversky_alpha", tversky_alpha)
    tversky_beta = check_non_negative("tversky_beta", tversky_beta)
    smooth, eps = check_smoothing(smooth, eps)
    ignore_index = check_ignore_index(ignore_index)
    backend = check_backend(backend)
    check_values = check_optional_bool("check_values", check_values)
    a, b = _region_weights(region, tversky_alpha, tversky_beta)

    from ..functional import distribution
    from ..functional import region as region_fn

    if pixel != "focal":
        gamma = 0.0
        focal_alpha = None
    else:
        gamma = check_non_negative("gamma", gamma)
        focal_alpha = distribution._check_alpha(focal_alpha, mode)
    k = check_fraction("k", k)

    if backend == "reference" or pixel == "topk":
        region_term = region_fn.tversky_loss(
            input, target, a, b, mode=mode, from_logits=from_logits, smooth=smooth, eps=eps,
            per_image=per_image, ignore_index=ignore_index, backend=backend,
            check_values=check_values,
        )
        if pixel == "topk":
            pixel_term = distribution.topk_loss(
                input, target, k, mode=mode, from_logits=from_logits,
                ignore_index=ignore_index, backend=backend, check_values=False,
            )
        else:
            pixel_term = distribution.focal_loss(
                input, target, gamma, focal_alpha, mode=mode, from_logits=from_logits,
                ignore_index=ignore_index, backend=backend, check_values=False,
            )
    else:
        from . import native_runs, region_pixel_sums

        native = isinstance(input, Tensor) and native_runs(input, backend)
        layout = prepare(input, target, mode, from_logits=from_logits,
                         ignore_index=ignore_index, check_values=check_values,
                         defer_value_checks=native)
        # _check_alpha gives a tuple of per-class weights in multiclass mode, else a float
        if (isinstance(focal_alpha, tuple) and mode == "multiclass"
                and len(focal_alpha) != layout.num_classes):
            raise ValueError(
                f"focal_alpha must hold one weight per class: {layout.num_classes} values; "
                f"got {len(focal_alpha)}"
            )
        with torch.autocast(device_type=input.device.type, enabled=False):
            intersection, prediction_sum, target_sum, total, count = region_pixel_sums(
                layout, gamma=gamma, alpha=focal_alpha, from_logits=from_logits,
                ignore_index=ignore_index, backend=backend,
            )
            if not per_image:
                intersection, prediction_sum, target_sum = (
                    intersection.sum(0), prediction_sum.sum(0), target_sum.sum(0)
                )
            score = region_fn.tversky_index(
                intersection, prediction_sum, target_sum, a, b, smooth + eps
            )
            region_term = (1.0 - score).mean()
            pixel_term = total / count
    combined = region_weight * region_term + pixel_weight * pixel_term
    if return_terms:
        return combined, region_term, pixel_term
    return combined


class RegionPixelLoss(torch.nn.Module):
    """Module form of :func:`region_pixel_loss`; keyword arguments are stored and forwarded.

    ``region_weight`` and ``pixel_weight`` are plain attributes: a schedule may set them
    between steps.

    >>> import torch
    >>> from dynloss.kernels import RegionPixelLoss
    >>> loss = RegionPixelLoss(region="iou", pixel="bce")
    >>> loss.pixel_weight = 0.5
    >>> float(loss(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))) > 0
    True
    """

    def __init__(self, *, region: str = "dice", pixel: str = "bce", region_weight: float = 1.0,
                 pixel_weight: float = 1.0, **kwargs) -> None:
        super().__init__()
        self.region = check_choice("region", region, REGION_TERMS)
        self.pixel = check_choice("pixel", pixel, PIXEL_TERMS)
        self.region_weight = region_weight
        self.pixel_weight = pixel_weight
        self.kwargs = kwargs

    def forward(self, input: Tensor, target: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        # a tuple only if return_terms=True was passed to the constructor
        return region_pixel_loss(
            input, target, region=self.region, pixel=self.pixel,
            region_weight=self.region_weight, pixel_weight=self.pixel_weight, **self.kwargs,
        )

    def extra_repr(self) -> str:
        return (f"region={self.region!r}, pixel={self.pixel!r}, "
                f"region_weight={self.region_weight}, pixel_weight={self.pixel_weight}")
