"""Ready-made ``on_switch`` callbacks for :class:`~dynloss.SwitchingLoss`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.optim.lr_scheduler import ReduceLROnPlateau

from .switching import SwitchEvent

__all__ = ["reset_plateau_scheduler"]


def reset_plateau_scheduler(
    scheduler: ReduceLROnPlateau, lr: float | Sequence[float] | None = None
) -> Callable[[SwitchEvent], None]:
    """A callback that resets a ``ReduceLROnPlateau`` scheduler at each switch.

    At the paper's switch the training loss drops from ~0.3-1.0 (region losses) to below 0.01
    (distribution losses). A ``ReduceLROnPlateau`` that monitors the loss keeps the best value
    and bad-epoch count of the old scale, which no longer mean anything: the callback forgets
    them (``best``, ``num_bad_epochs``, ``cooldown_counter``), so the new stage gets the full
    ``patience`` before its first reduction. The learning rate itself is kept unless ``lr`` is
    given (one float for every parameter group, or one per group), which restarts it.

    Args:
        scheduler: the ``torch.optim.lr_scheduler.ReduceLROnPlateau`` to reset.
        lr: optional learning rate(s) to restore at the switch (default None: keep).

    Examples:
        >>> import torch
        >>> from dynloss import BCELoss, DiceLoss, SwitchingLoss
        >>> from dynloss.schedules import reset_plateau_scheduler
        >>> model = torch.nn.Conv2d(3, 1, 1)
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        >>> scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=5)
        >>> loss_fn = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[50])
        >>> _ = loss_fn.on_switch(reset_plateau_scheduler(scheduler))
    """
    if not isinstance(scheduler, ReduceLROnPlateau):
        raise TypeError(
            "reset_plateau_scheduler needs a torch.optim.lr_scheduler.ReduceLROnPlateau; got "
            f"{type(scheduler).__name__}"
        )
    groups = scheduler.optimizer.param_groups
    if lr is not None:
        lrs = [float(lr)] * len(groups) if isinstance(lr, (int, float)) else [float(v) for v in lr]
        if len(lrs) != len(groups):
            raise ValueError(f"lr: got {len(lrs)} values for {len(groups)} parameter groups")
    else:
        lrs = None

    def reset(event: SwitchEvent | Any = None) -> None:
        scheduler.best = scheduler.mode_worse
        scheduler.num_bad_epochs = 0
        scheduler.cooldown_counter = 0
        if lrs is not None:
            for group, value in zip(groups, lrs, strict=True):
                group["lr"] = value
            scheduler._last_lr = list(lrs)

    return reset
