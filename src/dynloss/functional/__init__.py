"""Functional forms of every dynloss loss: one function per loss.

Each function checks its arguments, brings input and target to the canonical layout and
computes the loss with the requested backend. The formulas are written once, here; the fused
kernels in :mod:`dynloss.kernels` are tested against them. Each :class:`~dynloss.SegmentationLoss`
module calls its function here, with the same arguments and defaults.

>>> import torch
>>> from dynloss.functional import bce_loss, dice_loss, iou_loss, tversky_loss
>>> logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
>>> target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
>>> round(dice_loss(logits, target).item(), 4)
0.2129
>>> round(iou_loss(logits, target).item(), 4)
0.351
>>> dice = dice_loss(logits, target)
>>> bool(tversky_loss(logits, target, alpha=0.5, beta=0.5) == dice)
True
>>> round(bce_loss(logits, target).item(), 4)
0.2407
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
