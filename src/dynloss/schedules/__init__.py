"""Losses that change during training: composites, switching, weight schedules, triggers.

- :class:`CompositeLoss`: :math:`\\sum_k w_k L_k`, weights constant or scheduled.
- :class:`SwitchingLoss`: one loss per stage, switching at fixed epochs (milestones) or when a
  :class:`Trigger` fires (:class:`Plateau`, :class:`RelativeImprovement`).
- Weight schedules (:class:`Constant`, :class:`Step`, :class:`LinearRamp`, :class:`RampCosine`,
  :class:`Cosine`) for Taubert-style gradual loss scheduling.
- :func:`build_loss`: all of the above from a spec string such as ``"iou->bce@50"``.
- :func:`reset_plateau_scheduler`: the ``on_switch`` recipe for ``ReduceLROnPlateau``.

Everything is driven by one ``step()`` per epoch (or per optimizer step) and checkpointed by
``state_dict()``. See ``docs/schedules.md``.

>>> from dynloss.schedules import build_loss
>>> loss_fn = build_loss("iou->bce@2")
>>> loss_fn
SwitchingLoss([IoULoss(), BCELoss()], milestones=[2])
>>> [(loss_fn.active_name, loss_fn.step()) for epoch in range(3)]
[('iou', False), ('iou', True), ('bce', False)]
>>> build_loss("0.5*dice+bce")
CompositeLoss([DiceLoss(), BCELoss()], weights=[0.5, 1.0])
"""

from .callbacks import reset_plateau_scheduler
from .composite import CompositeLoss
from .spec import SpecError, build_loss
from .switching import SwitchEvent, SwitchingLoss
from .triggers import Milestone, Plateau, RelativeImprovement, Trigger
from .weights import Constant, Cosine, LinearRamp, RampCosine, Step, WeightSchedule

__all__ = [
    "CompositeLoss",
    "Constant",
    "Cosine",
    "LinearRamp",
    "Milestone",
    "Plateau",
    "RampCosine",
    "RelativeImprovement",
    "SpecError",
    "Step",
    "SwitchEvent",
    "SwitchingLoss",
    "Trigger",
    "WeightSchedule",
    "build_loss",
    "reset_plateau_scheduler",
]
