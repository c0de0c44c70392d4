"""Functional forms of every dynloss loss: one function per loss.

Each function checks its arguments, brings input and target to the canonical layout and
computes the loss with the requested backend. The formulas are written once, here; the fused
kernels in :mod:`dynloss.kernels` are tested against them.
"""

from .distribution import bce_loss, focal_loss, topk_loss
from .region import dice_loss, iou_loss, jaccard_loss, tversky_index, tversky_loss

__all__ = [
    "bce_loss",
    "dice_loss",
    "focal_loss",
    "iou_loss",
    "jaccard_loss",
    "topk_loss",
    "tversky_index",
    "tversky_loss",
]
