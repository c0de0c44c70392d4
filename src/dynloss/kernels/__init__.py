"""Backends and dispatch.

``backend="auto"`` picks the fastest correct path for the tensor's device; ``"torch"`` forces
the fused eager autograd Functions of :mod:`dynloss.kernels.torch_fused`; ``"reference"``
(handled in :mod:`dynloss.functional`) runs the formulas as plain autograd code.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .._layout import Layout
from .torch_fused import PixelLossSum, RegionSums

__all__ = ["pixel_loss_sum", "region_sums"]


def region_sums(
    layout: Layout, *, from_logits: bool, ignore_index: int | None, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(I, P, G)`` of shape ``(N, C)`` with a fused backward."""
    return RegionSums.apply(layout.x, layout.target, layout.mode, from_logits, ignore_index)


def pixel_loss_sum(
    layout: Layout,
    *,
    gamma: float,
    alpha: float | Sequence[float] | None,
    k: float | None,
    from_logits: bool,
    ignore_index: int | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Sum of the per-element losses and the normaliser of their mean."""
    return PixelLossSum.apply(
        layout.x, layout.target, layout.mode, from_logits, ignore_index, gamma, alpha, k
    )
