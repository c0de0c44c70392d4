"""Triggers: when a :class:`~dynloss.SwitchingLoss` leaves its current stage.

A trigger is a small object with one question to answer: *after this* ``step()``, *is it time
to switch?* :class:`~dynloss.SwitchingLoss` holds one trigger per transition and consults only
the trigger of the active stage, once per ``step()``:

``update(count, stage_count, metric) -> bool``
    ``count``: ``step()`` calls since the start of training; ``stage_count``: calls since the
    active stage began (for a nested SwitchingLoss, since its stage of the enclosing one
    began); ``metric``: the monitored value passed to ``step(metric=...)``
    (averaged over the ranks under ``torch.distributed``), or None.
``reset()``
    called when the trigger's stage begins (clears its history).
``state_dict()`` / ``load_state_dict()``
    the history, so that a resumed run decides exactly like an uninterrupted one.

Write your own by subclassing :class:`Trigger`; set ``needs_metric = True`` if it reads the
metric. Counts are in the switching loss's ``unit`` (epochs or optimizer steps); the
``min_epochs`` / ``max_epochs`` arguments below count the same unit.

Examples:
    >>> from dynloss.schedules import Plateau
    >>> trigger = Plateau(patience=2)
    >>> [trigger.update(t, t, m) for t, m in enumerate([0.9, 0.5, 0.6, 0.5], start=1)]
    [False, False, False, True]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from .._checks import check_choice, check_non_negative, check_real
from ..distributed import metric_value
from ._base import call_repr, check_count
from ._state import check_state, state_int, state_real

__all__ = ["Milestone", "Plateau", "RelativeImprovement", "Trigger"]


class Trigger(ABC):
    """Base class of the switch triggers (see the module documentation for the protocol).

    A subclass implements :meth:`update`; it sets ``needs_metric = True`` to receive the
    value passed to ``step(metric=...)``, stores each constructor argument under its own name
    (``repr`` reads them and writes valid Python, which ``build_loss(text, names={"Below":
    Below})`` rebuilds; one not stored is written as a mark ``build_loss`` refuses; a trigger
    without arguments needs no ``__init__``), and overrides :meth:`reset`
    and the private ``_state`` / ``_load`` if it keeps a history. ``_load`` receives a mapping
    with exactly the keys of ``_state()`` (and ``"type"``); it should check every value before
    it assigns any (raising ValueError), so that a failed load changes nothing.
    :class:`~dynloss.SwitchingLoss` loads its triggers atomically in any case: it first loads
    the state into a deep copy of each trigger, and only when all succeed into the triggers.

    Examples:
        A trigger that switches as soon as the monitored value falls below a threshold:

        >>> from dynloss import BCELoss, DiceLoss, SwitchingLoss, Trigger
        >>> class Below(Trigger):
        ...     needs_metric = True
        ...
        ...     def __init__(self, threshold: float) -> None:
        ...         self.threshold = threshold
        ...
        ...     def update(self, count, stage_count, metric):
        ...         if metric is None:
        ...             raise ValueError("Below monitors a value: call step(metric=...)")
        ...         return metric < self.threshold
        >>> loss_fn = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Below(0.2))
        >>> loss_fn
        SwitchingLoss([DiceLoss(), BCELoss()], trigger=Below(threshold=0.2))
        >>> [loss_fn.step(metric=m) for m in [0.5, 0.3, 0.1, 0.05]], loss_fn.active_name
        ([False, False, True, False], 'bce')
        >>> loss_fn.switches  # (old stage, new stage, epoch)
        [(0, 1, 3)]
    """

    needs_metric: ClassVar[bool] = False
    """Whether :meth:`update` needs the monitored value (``step(metric=...)``)."""

    def reset(self) -> None:  # noqa: B027  (optional hook: no history by default)
        """Forget the history; called when the stage this trigger ends begins."""

    @abstractmethod
    def update(self, count: int, stage_count: int, metric: float | None) -> bool:
        """Record one ``step()``; True means: switch to the next stage now."""

    def _state(self) -> dict[str, Any]:
        return {}

    def _load(self, state: Mapping[str, Any]) -> None:  # noqa: B027  (no state by default)
        pass

    def state_dict(self) -> dict[str, Any]:
        """The trigger's history (plain Python values; ``torch.load(weights_only=True)``-safe)."""
        return {"type": type(self).__name__, **self._state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history saved by :meth:`state_dict`.

        The whole state is checked before anything changes: on an error the trigger is as it
        was.

        Raises:
            ValueError: the state is not a dict, comes from a different kind of trigger, lacks
                or adds keys, or holds a value of the wrong type or out of range (the message
                names the key), or an inconsistent history.

        Examples:
            >>> from dynloss.schedules import Plateau
            >>> trigger = Plateau(patience=3)
            >>> trigger.load_state_dict({"type": "Plateau", "best": 0.5, "num_bad": 2})
            >>> trigger.best, trigger.num_bad
            (0.5, 2)
            >>> trigger.load_state_dict({"type": "Plateau", "best": 0.4, "num_bad": "1"})
            Traceback (most recent call last):
            ...
            ValueError: Plateau: invalid num_bad in the state: num_bad must be an int; got str '1'
            >>> trigger.best, trigger.num_bad
            (0.5, 2)
        """
        name = type(self).__name__
        if not isinstance(state, Mapping):
            raise ValueError(f"{name}: a trigger state must be a dict; got {type(state).__name__}")
        found = state.get("type", name)
        if not (isinstance(found, str) and found == name):
            raise ValueError(f"cannot load the state of a {found} trigger into a {name} trigger")
        self._load(check_state(name, state, {"type", *self._state()}))

    def __repr__(self) -> str:
        return call_repr(self)


class Milestone(Trigger):
    """Switch when the global counter reaches ``at`` (an int >= 1): a fixed switch epoch.

    ``SwitchingLoss(losses, milestones=[50])`` is ``SwitchingLoss(losses,
    trigger=Milestone(50))``: stage 0 for epochs 0..49, stage 1 from epoch 50 on.

    Examples:
        >>> from dynloss.schedules import Milestone
        >>> [Milestone(3).update(t, t, None) for t in range(1, 5)]
        [False, False, True, True]
    """

    def __init__(self, at: int) -> None:
        self.at = check_count("at", at, minimum=1)

    def update(self, count: int, stage_count: int, metric: float | None) -> bool:
        return count >= self.at

    def __repr__(self) -> str:
        if type(self) is not Milestone:  # a subclass: its own name and arguments
            return call_repr(self)
        return f"Milestone({self.at})"


def _check_bounds(min_epochs: object, max_epochs: object) -> tuple[int, int | None]:
    min_epochs = check_count("min_epochs", min_epochs)
    if max_epochs is not None:
        max_epochs = check_count("max_epochs", max_epochs, minimum=1)
        if max_epochs < min_epochs:
            raise ValueError(
                f"max_epochs must be >= min_epochs; got min_epochs={min_epochs}, "
                f"max_epochs={max_epochs}"
            )
    return min_epochs, max_epochs


class Plateau(Trigger):
    r"""Switch when the monitored value has not improved by ``min_delta`` for ``patience`` steps.

    Like ``ReduceLROnPlateau`` with an absolute threshold: with mode ``"min"`` a value ``m``
    improves on the best so far if ``m < best - min_delta`` (``"max"``: ``m > best +
    min_delta``; NaN never improves, and the first value improves unless it is the worst
    infinity, ``inf`` for ``"min"``). Each ``step()`` without improvement increments a counter,
    an improvement resets it; the trigger fires once the counter reaches ``patience`` and the
    stage has run at least ``min_epochs`` steps, or unconditionally when the stage has run
    ``max_epochs`` steps. ``ReduceLROnPlateau`` acts once its counter *exceeds* its patience:
    ``Plateau(patience=p, min_delta=d)`` (``p >= 1``) fires at the step where
    ``ReduceLROnPlateau(patience=p - 1, threshold=d, threshold_mode="abs")`` first cuts the
    learning rate.
    Monitor the training loss (``"min"``) or a validation metric such as
    Dice (``mode="max"``).

    Args:
        patience: non-improving steps before switching, int >= 0 (default 10); 0 switches
            at the first step once the stage has run ``min_epochs`` steps, whatever the
            value (a stage of fixed length).
        min_delta: least change that counts as an improvement, >= 0 (default 0.0).
        mode: ``"min"`` (default) or ``"max"``.
        min_epochs: the stage lasts at least this many steps (default 0).
        max_epochs: the stage lasts at most this many steps (default None: no bound).

    Examples:
        >>> from dynloss import DiceLoss, BCELoss, SwitchingLoss
        >>> from dynloss.schedules import Plateau
        >>> loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=2))
        >>> for val_loss in [0.5, 0.4, 0.41, 0.4]:
        ...     _ = loss.step(metric=val_loss)
        >>> loss.active_index, loss.count
        (1, 4)
    """

    needs_metric = True

    def __init__(
        self,
        patience: int = 10,
        min_delta: float = 0.0,
        mode: str = "min",
        min_epochs: int = 0,
        max_epochs: int | None = None,
    ) -> None:
        self.patience = check_count("patience", patience)
        self.min_delta = check_non_negative("min_delta", min_delta)
        self.mode = check_choice("mode", mode, ("min", "max"))
        self.min_epochs, self.max_epochs = _check_bounds(min_epochs, max_epochs)
        self.best: float | None = None
        self.num_bad = 0

    def reset(self) -> None:
        self.best = None
        self.num_bad = 0

    def _improves(self, value: float) -> bool:
        # No best yet is the worst value (as ReduceLROnPlateau starts): an infinity the wrong
        # way is no improvement on it.
        if self.mode == "min":
            best = math.inf if self.best is None else self.best
            return value < best - self.min_delta
        best = -math.inf if self.best is None else self.best
        return value > best + self.min_delta

    def update(self, count: int, stage_count: int, metric: float | None) -> bool:
        value = _metric(self, metric)
        if self._improves(value):
            self.best = value
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.max_epochs is not None and stage_count >= self.max_epochs:
            return True
        return self.num_bad >= self.patience and stage_count >= self.min_epochs

    def _state(self) -> dict[str, Any]:
        return {"best": self.best, "num_bad": self.num_bad}

    def _load(self, state: Mapping[str, Any]) -> None:
        owner, best = type(self).__name__, state["best"]
        if best is not None:
            if isinstance(best, bool) or not isinstance(best, (int, float)):
                raise ValueError(
                    f"{owner}: invalid best in the state: best must be a number or None; got "
                    f"{type(best).__name__} {best!r}"
                )
            best = state_real(owner, "best", best)
            if math.isnan(best):
                raise ValueError(f"{owner}: invalid best in the state: a best value cannot be "
                                 "NaN (a NaN never improves)")
        num_bad = state_int(owner, "num_bad", state["num_bad"])
        self.best, self.num_bad = best, num_bad


class RelativeImprovement(Trigger):
    r"""Switch when the relative improvement of the monitored value falls below ``threshold``.

    With ``m_t`` the value passed at step ``t`` and ``w = window``, the relative improvement
    is :math:`r_t = (m_{t-w} - m_t) / |m_{t-w}|` (mode ``"min"``; negated for ``"max"``). The
    trigger fires once :math:`r_t < \text{threshold}` for ``patience`` consecutive steps and the
    stage has run at least ``min_epochs`` steps, or when it has run ``max_epochs`` steps. No
    decision on the improvement is made during the first ``window`` steps of the stage (a
    ``max_epochs`` below ``window`` still ends the stage at ``max_epochs``: the improvement
    then never decides). Scale-free, so it suits a training loss whose scale is unknown in
    advance.

    Args:
        threshold: relative improvement below which the loss counts as converged (default
            0.01, i.e. 1 %).
        window: compare with the value ``window`` steps earlier, int >= 1 (default 1).
        patience: consecutive low-improvement steps needed, int >= 1 (default 1).
        mode: ``"min"`` (default) or ``"max"``.
        min_epochs: the stage lasts at least this many steps (default 0).
        max_epochs: the stage lasts at most this many steps (default None: no bound).

    Examples:
        >>> from dynloss.schedules import RelativeImprovement
        >>> trigger = RelativeImprovement(threshold=0.1)
        >>> [trigger.update(t, t, m) for t, m in enumerate([1.0, 0.5, 0.46, 0.44], start=1)]
        [False, False, True, True]
    """

    needs_metric = True

    def __init__(
        self,
        threshold: float = 0.01,
        window: int = 1,
        patience: int = 1,
        mode: str = "min",
        min_epochs: int = 0,
        max_epochs: int | None = None,
    ) -> None:
        self.threshold = check_real("threshold", threshold)
        self.window = check_count("window", window, minimum=1)
        self.patience = check_count("patience", patience, minimum=1)
        self.mode = check_choice("mode", mode, ("min", "max"))
        self.min_epochs, self.max_epochs = _check_bounds(min_epochs, max_epochs)
        self.history: list[float] = []
        self.num_low = 0

    def reset(self) -> None:
        self.history = []
        self.num_low = 0

    def relative_improvement(self, reference: float, value: float) -> float:
        """:math:`(reference - value)/|reference|` (``"max"``: the negative); +-inf from a
        reference of 0 or +-inf to another value (a change from an infinite loss to a finite one
        is an infinite improvement, not ``inf/inf = NaN``), 0 where the two are equal; NaN
        where either is NaN (no improvement, whatever the NaN's sign bit)."""
        if math.isnan(value) or math.isnan(reference):
            return math.nan
        change = reference - value if self.mode == "min" else value - reference
        if math.isinf(reference) and not math.isnan(value):
            return 0.0 if value == reference else math.copysign(math.inf, change)
        if reference == 0.0:
            return 0.0 if change == 0.0 else math.copysign(math.inf, change)
        return change / abs(reference)

    def update(self, count: int, stage_count: int, metric: float | None) -> bool:
        value = _metric(self, metric)
        self.history.append(value)
        if len(self.history) > self.window:
            reference = self.history.pop(0)
            low = not self.relative_improvement(reference, value) >= self.threshold
            self.num_low = self.num_low + 1 if low else 0
        if self.max_epochs is not None and stage_count >= self.max_epochs:
            return True
        return self.num_low >= self.patience and stage_count >= self.min_epochs

    def _state(self) -> dict[str, Any]:
        return {"history": list(self.history), "num_low": self.num_low}

    def _load(self, state: Mapping[str, Any]) -> None:
        owner, history = type(self).__name__, state["history"]
        if not isinstance(history, (list, tuple)):
            raise ValueError(f"{owner}: invalid history in the state: history must be a list of "
                             f"numbers; got {type(history).__name__}")
        if len(history) > self.window:
            raise ValueError(
                f"{owner}: the saved history {history!r} does not fit window={self.window}"
            )
        values = [state_real(owner, f"history[{i}]", v) for i, v in enumerate(history)]
        num_low = state_int(owner, "num_low", state["num_low"])
        if num_low and len(values) < self.window:
            # low steps are counted only once the history is full, and it then stays full
            raise ValueError(
                f"{owner}: inconsistent state: num_low={num_low} but the history holds "
                f"{len(values)} of window={self.window} values (no improvement was measured yet)"
            )
        self.history, self.num_low = values, num_low


def _metric(trigger: Trigger, metric: float | None) -> float:
    if metric is None:
        raise ValueError(
            f"{trigger!r} monitors a value: call step(metric=...) with the training loss or a "
            "validation metric"
        )
    return metric_value(metric)  # checked: a number or a scalar tensor, not a str
