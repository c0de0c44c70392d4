"""dynloss: exact, fast segmentation losses for PyTorch, and losses that change during training.

>>> import torch
>>> from dynloss import DiceLoss
>>> logits, target = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
>>> round(DiceLoss()(logits, target).item(), 4)
0.3333
"""

from . import functional
from .constants import BINARY_MODE, MULTICLASS_MODE, MULTILABEL_MODE
from .losses import (
    LOSSES,
    BCELoss,
    DiceLoss,
    FocalLoss,
    IoULoss,
    JaccardLoss,
    SegmentationLoss,
    TopKLoss,
    TverskyLoss,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "BINARY_MODE",
    "LOSSES",
    "MULTICLASS_MODE",
    "MULTILABEL_MODE",
    "BCELoss",
    "DiceLoss",
    "FocalLoss",
    "IoULoss",
    "JaccardLoss",
    "SegmentationLoss",
    "TopKLoss",
    "TverskyLoss",
    "__version__",
    "functional",
]
