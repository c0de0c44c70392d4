"""Names kept for their old import paths, to be removed in a later release.

``dynloss.kernels.region_pixel_loss`` and ``dynloss.kernels.RegionPixelLoss`` were a second
API for composites. :class:`~dynloss.CompositeLoss` now runs the same fused pass itself
whenever its two terms allow it (a region loss and BCE or Focal over the same input), so
``CompositeLoss([DiceLoss(), BCELoss()])`` is the way to write Dice+BCE.
``dynloss.kernels.region_sums``, ``pixel_loss_sum`` and ``region_pixel_sums`` exposed the
backends' primitives on the internal layout; the backends now compute whole losses, chosen by
:mod:`dynloss.kernels.dispatch`. The old names still work (on the torch backend's autograd
Functions, whatever ``backend`` says) and warn once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ._checks import check_backend, check_bool, check_choice
from ._layout import Layout
from ._params import composite_params, distribution_params, region_params
from .functional._call import composite_loss
from .kernels.torch_backend import DistributionSum, RegionSums

__all__ = ["PIXEL_TERMS", "REGION_TERMS", "RegionPixelLoss", "pixel_loss_sum",
           "region_pixel_loss", "region_pixel_sums", "region_sums"]

REGION_TERMS = ("dice", "iou", "jaccard", "tversky")
PIXEL_TERMS = ("bce", "focal", "topk")

_WARNED: set[str] = set()


def _warn(name: str, instead: str = "dynloss.CompositeLoss([DiceLoss(), BCELoss()]) (it "
          "runs the same fused pass)") -> None:
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"dynloss.kernels.{name} is deprecated and will be removed: use {instead}",
                      DeprecationWarning, stacklevel=3)


def region_sums(layout: Layout, *, from_logits: bool, ignore_index: int | None, backend: str,
                pooled: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Deprecated: ``(I, P, G)``, each ``(N, C)``, of the canonical ``layout`` (``(1, C)``
    may come back with ``pooled=True``); the losses of :mod:`dynloss.functional` instead.

    Examples:
        >>> import torch, warnings
        >>> from dynloss._deprecated import region_sums
        >>> from dynloss._layout import prepare
        >>> layout = prepare(torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2), "binary")
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     i, p, g = region_sums(layout, from_logits=True, ignore_index=None,
        ...                           backend="torch")
        >>> i.tolist(), g.tolist()
        ([[2.0], [2.0]], [[4.0], [4.0]])
    """
    _warn("region_sums", "the losses (e.g. dynloss.functional.dice_loss)")
    check_backend(backend)  # the sums are the reference's, with the torch backend's backward
    return RegionSums.apply(layout.x, layout.target, layout.mode, from_logits, ignore_index,
                            pooled, True)


def pixel_loss_sum(layout: Layout, *, gamma: float, alpha: float | Sequence[float] | None,
                   k: float | None, from_logits: bool, ignore_index: int | None, backend: str
                   ) -> tuple[Tensor, Tensor]:
    """Deprecated: ``(S, count)``, the sum of the per-element (focal) losses (of the TopK
    selection with ``k``) and the normaliser of their mean; the losses instead.

    Examples:
        >>> import torch, warnings
        >>> from dynloss._deprecated import pixel_loss_sum
        >>> from dynloss._layout import prepare
        >>> layout = prepare(torch.zeros(1, 1, 4), torch.ones(1, 1, 4), "binary")
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     total, count = pixel_loss_sum(layout, gamma=0.0, alpha=None, k=None,
        ...                                   from_logits=True, ignore_index=None,
        ...                                   backend="torch")
        >>> round(total.item(), 4), count.item()  # 4 log 2
        (2.7726, 4.0)
    """
    _warn("pixel_loss_sum", "the losses (e.g. dynloss.functional.bce_loss)")
    params = distribution_params(gamma=gamma, alpha=alpha, k=k, mode=layout.mode,
                                 from_logits=from_logits, ignore_index=ignore_index,
                                 backend=backend)
    return DistributionSum.apply(layout.x, layout.target, params, True)


def region_pixel_sums(layout: Layout, *, gamma: float, alpha: float | Sequence[float] | None,
                      from_logits: bool, ignore_index: int | None, backend: str
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Deprecated: ``(I, P, G, S, count)`` of :func:`region_sums` and :func:`pixel_loss_sum`
    (no TopK); :class:`dynloss.CompositeLoss` instead.

    Examples:
        >>> import torch, warnings
        >>> from dynloss._deprecated import region_pixel_sums
        >>> from dynloss._layout import prepare
        >>> layout = prepare(torch.zeros(1, 1, 4), torch.ones(1, 1, 4), "binary")
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     sums = region_pixel_sums(layout, gamma=0.0, alpha=None, from_logits=True,
        ...                              ignore_index=None, backend="torch")
        >>> [round(s.item(), 4) for s in sums]
        [2.0, 2.0, 4.0, 2.7726, 4.0]
    """
    _warn("region_pixel_sums")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        i, p, g = region_sums(layout, from_logits=from_logits, ignore_index=ignore_index,
                              backend=backend)
        total, count = pixel_loss_sum(layout, gamma=gamma, alpha=alpha, k=None,
                                      from_logits=from_logits, ignore_index=ignore_index,
                                      backend=backend)
    return i, p, g, total, count


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
    r"""Deprecated: ``region_weight * region_loss + pixel_weight * pixel_loss``.

    ``region`` is ``"dice"``, ``"iou"`` (``"jaccard"``) or ``"tversky"`` (``tversky_alpha``,
    ``tversky_beta``, ``smooth``, ``eps``, ``per_image``); ``pixel`` is ``"bce"``, ``"focal"``
    (``gamma``, ``focal_alpha``) or ``"topk"`` (``k``); the other arguments mean what they
    mean for the single losses, both terms with ``reduction="mean"``. Returns the weighted
    sum, or ``(total, region_term, pixel_term)`` with ``return_terms=True``.

    Examples:
        >>> import torch, warnings
        >>> from dynloss._deprecated import region_pixel_loss
        >>> logits, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     total, dice, bce = region_pixel_loss(logits, target, return_terms=True)
        >>> round(dice.item(), 4), round(bce.item(), 4), round(total.item(), 4)
        (0.3333, 0.6931, 1.0265)
    """
    _warn("region_pixel_loss")
    region = check_choice("region", region, REGION_TERMS)
    pixel = check_choice("pixel", pixel, PIXEL_TERMS)
    check_bool("return_terms", return_terms)
    alpha, beta = {"dice": (0.5, 0.5), "iou": (1.0, 1.0), "jaccard": (1.0, 1.0)}.get(
        region, (tversky_alpha, tversky_beta))
    common: dict[str, Any] = dict(mode=mode, from_logits=from_logits, ignore_index=ignore_index,
                                  backend=backend, check_values=check_values)
    region_part = region_params(alpha=alpha, beta=beta, smooth=smooth, eps=eps,
                                per_image=per_image, **common)
    distribution_part = distribution_params(
        gamma=gamma if pixel == "focal" else 0.0,
        alpha=focal_alpha if pixel == "focal" else None,
        k=k if pixel == "topk" else None, alpha_name="focal_alpha", **common)
    params = composite_params(region_part, distribution_part, region_weight, pixel_weight)
    total, region_term, pixel_term = composite_loss(input, target, params)
    if return_terms:
        return total, region_term, pixel_term
    return total


class RegionPixelLoss(nn.Module):
    """Deprecated module form of :func:`region_pixel_loss` (use :class:`dynloss.CompositeLoss`).

    ``region_weight`` and ``pixel_weight`` are plain attributes: a schedule may set them
    between steps.
    """

    def __init__(self, *, region: str = "dice", pixel: str = "bce", region_weight: float = 1.0,
                 pixel_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__()
        _warn("RegionPixelLoss")
        self.region = check_choice("region", region, REGION_TERMS)
        self.pixel = check_choice("pixel", pixel, PIXEL_TERMS)
        self.region_weight = region_weight
        self.pixel_weight = pixel_weight
        self.kwargs = kwargs

    def forward(self, input: Tensor, target: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        return region_pixel_loss(
            input, target, region=self.region, pixel=self.pixel,
            region_weight=self.region_weight, pixel_weight=self.pixel_weight, **self.kwargs,
        )

    def extra_repr(self) -> str:
        return (f"region={self.region!r}, pixel={self.pixel!r}, "
                f"region_weight={self.region_weight}, pixel_weight={self.pixel_weight}")
