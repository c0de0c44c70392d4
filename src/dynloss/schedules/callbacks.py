"""Ready-made ``on_switch`` callbacks for :class:`~dynloss.SwitchingLoss`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from .._checks import check_non_negative
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

    The callback acts on the parameter groups the optimizer has *at the switch*, so it keeps
    working after ``optimizer.load_state_dict`` (which replaces the groups by new dicts) when a
    run is resumed from a checkpoint before its switch.

    Args:
        scheduler: the ``torch.optim.lr_scheduler.ReduceLROnPlateau`` to reset.
        lr: optional learning rate(s) to restore at the switch (default None: keep).

    Examples:
        >>> import torch
        >>> from dynloss import BCELoss, DiceLoss, SwitchingLoss
        >>> from dynloss.schedules import reset_plateau_scheduler
        >>> model = torch.nn.Conv2d(3, 1, 1)
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        >>> scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
        >>> loss_fn = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[2])
        >>> _ = loss_fn.on_switch(reset_plateau_scheduler(scheduler, lr=1e-4))
        >>> for validation_loss in [0.5, 0.6]:  # 0.6: the scheduler divides the lr by 10
        ...     scheduler.step(validation_loss)
        ...     switched = loss_fn.step()
        >>> switched, loss_fn.active_name, optimizer.param_groups[0]["lr"], scheduler.best
        (True, 'bce', 0.0001, inf)
    """
    if not isinstance(scheduler, ReduceLROnPlateau):
        raise TypeError(
            "reset_plateau_scheduler needs a torch.optim.lr_scheduler.ReduceLROnPlateau; got "
            f"{type(scheduler).__name__}"
        )
    one_value = isinstance(lr, Real) and not isinstance(lr, bool)
    if lr is None:
        lrs: list[float] | None = None
    elif one_value:
        lrs = [check_non_negative("lr", lr)] * len(scheduler.optimizer.param_groups)
    elif isinstance(lr, (str, bytes)) or not isinstance(lr, Sequence):
        raise TypeError(
            f"lr must be a learning rate or one per parameter group; got {type(lr).__name__} "
            f"{lr!r}"
        )
    else:
        lrs = [check_non_negative(f"lr[{i}]", v) for i, v in enumerate(lr)]
    if lrs is not None:
        _check_groups(lrs, len(scheduler.optimizer.param_groups))
    return _PlateauReset(scheduler, lrs, one_value)


class _PlateauReset:
    """The callback :func:`reset_plateau_scheduler` returns: a class, not a closure, so that a
    loss holding it pickles (``torch.save`` of the whole loss, ``copy.deepcopy``)."""

    def __init__(self, scheduler: ReduceLROnPlateau, lrs: list[float] | None,
                 one_value: bool) -> None:
        self.scheduler = scheduler
        self.lrs = lrs
        self.one_value = one_value
        self.__qualname__ = "reset_plateau_scheduler"  # how SwitchingLoss's repr names it

    def __call__(self, event: SwitchEvent | Any = None) -> None:
        scheduler = self.scheduler
        # The optimizer's parameter groups are looked up now, not when the callback was made:
        # ``optimizer.load_state_dict`` (resuming from a checkpoint) replaces them by new dicts.
        groups = scheduler.optimizer.param_groups
        values = None
        if self.lrs is not None:
            values = [self.lrs[0]] * len(groups) if self.one_value else self.lrs
            _check_groups(values, len(groups))
        scheduler.best = scheduler.mode_worse
        scheduler.num_bad_epochs = 0
        scheduler.cooldown_counter = 0
        if values is not None:
            for group, value in zip(groups, values, strict=True):
                if isinstance(group["lr"], torch.Tensor):  # kept, as torch's schedulers do
                    group["lr"].fill_(value)
                else:
                    group["lr"] = value
            # as torch's schedulers keep it: each group's lr, a tensor one copied
            scheduler._last_lr = [group["lr"].clone() if isinstance(group["lr"], torch.Tensor)
                                  else group["lr"] for group in groups]

    def __repr__(self) -> str:
        lr = "" if self.lrs is None else f", lr={self.lrs[0] if self.one_value else self.lrs}"
        return f"reset_plateau_scheduler({type(self.scheduler).__name__}{lr})"


def _check_groups(lrs: Sequence[float], n_groups: int) -> None:
    if len(lrs) != n_groups:
        values = "value" if len(lrs) == 1 else "values"
        raise ValueError(f"lr: got {len(lrs)} {values} for {n_groups} parameter groups")
