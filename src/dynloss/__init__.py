"""dynloss: exact, fast segmentation losses for PyTorch, and losses that change during training.

>>> import torch
>>> from dynloss import DiceLoss
>>> logits, target = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
>>> round(DiceLoss()(logits, target).item(), 4)
0.3333
"""

from . import distributed, functional, schedules
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
from .schedules import (
    CompositeLoss,
    Constant,
    Cosine,
    LinearRamp,
    Milestone,
    Plateau,
    RampCosine,
    RelativeImprovement,
    SpecError,
    Step,
    SwitchEvent,
    SwitchingLoss,
    Trigger,
    WeightSchedule,
    build_loss,
    reset_plateau_scheduler,
)

__version__ = "0.2.0.dev0"

__all__ = [
    "BINARY_MODE",
    "LOSSES",
    "MULTICLASS_MODE",
    "MULTILABEL_MODE",
    "BCELoss",
    "CompositeLoss",
    "Constant",
    "Cosine",
    "DiceLoss",
    "FocalLoss",
    "IoULoss",
    "JaccardLoss",
    "LinearRamp",
    "Milestone",
    "Plateau",
    "RampCosine",
    "RelativeImprovement",
    "SegmentationLoss",
    "SpecError",
    "Step",
    "SwitchEvent",
    "SwitchingLoss",
    "TopKLoss",
    "Trigger",
    "TverskyLoss",
    "WeightSchedule",
    "__version__",
    "build_loss",
    "distributed",
    "functional",
    "reset_plateau_scheduler",
    "schedules",
]
