r"""Weight schedules: a loss weight :math:`w(t)` as a function of a step counter :math:`t`.

A schedule counts the calls of its ``step()`` (``t = 0`` before the first one), like a
``torch.optim.lr_scheduler``. Use it as a :class:`~dynloss.CompositeLoss` weight; the composite
(or a :class:`~dynloss.SwitchingLoss` holding it) advances it with its own ``step()``, so the
counter is the training epoch (or optimizer step, whatever ``step()`` is called per).

All values are finite and >= 0; every schedule is a pure function of ``t`` (:meth:`value_at`),
and its only state is the counter, so it resumes exactly from :meth:`state_dict`.

Prior art: Taubert et al. (2020) "loss scheduling" moves weight from one loss to another,
linearly (:class:`LinearRamp`, their *naive* schedule) or with a linear ramp followed by a
sinusoidal decay (:class:`RampCosine`, their *alternating* schedule). A hard switch at epoch
``m`` is the zero-width ramp ``LinearRamp(m, m)``.

Examples:
    >>> from dynloss.schedules import LinearRamp
    >>> ramp = LinearRamp(start=2, end=4)
    >>> [ramp.value_at(t) for t in range(6)]
    [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    >>> ramp.step(), ramp.step(), ramp.step()
    (0.0, 0.0, 0.5)
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from ._base import call_repr, check_count, check_weight
from ._state import check_state, state_int
from ._steps import count_step, per_object

__all__ = ["Constant", "Cosine", "LinearRamp", "RampCosine", "Step", "WeightSchedule"]

_HOLDERS: dict[int, dict[int, weakref.ref[Any]]] = {}
"""By ``id`` of a schedule: the live losses (by ``id``, weakly) that keep its value in a
buffer — a :class:`~dynloss.CompositeLoss`, whose compiled forward reads the buffer — told
through ``_dynloss_weights_changed()`` of each change of the schedule: after its ``step()`` or
``load_state_dict()`` returns (a subclass's own too: its state is whole then), and when an
attribute is set outside them (by hand). The entry goes with the schedule."""

_BUSY: set[int] = set()
"""The ``id`` of each schedule inside its own ``step()`` or ``load_state_dict()``."""


def hold(schedule: WeightSchedule, holder: Any) -> None:
    """Tell ``holder`` of every change of ``schedule`` from now on (see :data:`_HOLDERS`); a
    schedule that takes no weak reference is not followed."""
    holders: dict[int, weakref.ref[Any]] | None = per_object(_HOLDERS, schedule, dict)
    if holders is None:
        return
    key = id(holder)
    known = holders.get(key)
    if known is None or known() is not holder:  # (a dead holder's at this address: replaced)
        holders[key] = weakref.ref(holder, functools.partial(_forget, holders, key))


def _forget(holders: dict[int, weakref.ref[Any]], key: int, _: object = None) -> None:
    """A holder died: its entry goes (unless a new holder at its address took it already)."""
    known = holders.get(key)
    if known is not None and known() is None:
        holders.pop(key, None)


def _notify(schedule: WeightSchedule) -> None:
    holders = _HOLDERS.get(id(schedule))
    if not holders:
        return
    for key, ref in list(holders.items()):
        holder = ref()
        if holder is None:
            holders.pop(key, None)
        else:
            holder._dynloss_weights_changed()


def _notifying(method: Any) -> Any:
    """``method`` (a schedule's ``step`` or ``load_state_dict``), then its holders told, once,
    when the outermost such call returns or raises."""
    @functools.wraps(method)
    def call(self: WeightSchedule, *args: Any, **kwargs: Any) -> Any:
        key = id(self)
        if key in _BUSY:  # (super().step() inside a subclass's step)
            return method(self, *args, **kwargs)
        _BUSY.add(key)
        try:
            return method(self, *args, **kwargs)
        finally:
            _BUSY.discard(key)
            _notify(self)

    call._dynloss_notifying = True  # type: ignore[attr-defined]
    return call


class WeightSchedule(ABC):
    """Base class: a weight ``value_at(t)`` and a counter ``t`` advanced by :meth:`step`.

    Subclasses implement :meth:`value_at` (finite, >= 0, a pure function of ``t``) and store
    each constructor argument under its own name (used by ``repr``). The counter starts at 0;
    :class:`~dynloss.CompositeLoss` calls :meth:`step` on every scheduled weight once per
    ``step()`` of its own.

    Examples:
        A weight that halves every epoch:

        >>> from dynloss import BCELoss, CompositeLoss, DiceLoss, WeightSchedule
        >>> class Halving(WeightSchedule):
        ...     def __init__(self, start: float = 1.0) -> None:
        ...         super().__init__()
        ...         self.start = start
        ...
        ...     def value_at(self, t: int) -> float:
        ...         return self.start / 2**t
        >>> weight = Halving(4.0)
        >>> weight.value, weight.step(), weight.step(), weight.count
        (4.0, 2.0, 1.0, 2)
        >>> weight, weight.state_dict()
        (Halving(start=4.0), {'count': 2})
        >>> CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, Halving(2.0)])
        CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, Halving(start=2.0)])
    """

    def __init__(self) -> None:
        self.count = 0
        """Number of :meth:`step` calls so far (the current epoch or step)."""

    @abstractmethod
    def value_at(self, t: int) -> float:
        """The weight at counter value ``t >= 0``."""

    @property
    def value(self) -> float:
        """The current weight, ``value_at(count)``."""
        return self.value_at(self.count)

    def __call__(self) -> float:
        return self.value

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("step", "load_state_dict"):  # a subclass's own: its holders told after
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "_dynloss_notifying", False):
                setattr(cls, name, _notifying(method))

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if id(self) not in _BUSY:  # set by hand: a loss that holds it reads the new value
            _notify(self)

    @_notifying
    def step(self) -> float:
        """Advance the counter by one; returns the new current weight."""
        count_step(self)  # (a composite holding it finds a step it did not take)
        self.count += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """The counter: ``{"count": t}``."""
        return {"count": self.count}

    @_notifying
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counter saved by :meth:`state_dict`; on an error nothing changes.

        Raises:
            ValueError: the state is not ``{"count": t}`` with an int ``t >= 0`` (the message
                names the key).

        Examples:
            >>> from dynloss.schedules import LinearRamp
            >>> ramp = LinearRamp(0, 4)
            >>> ramp.load_state_dict({"count": 3})
            >>> ramp.count, ramp.value
            (3, 0.75)
            >>> ramp.load_state_dict({"count": 2.0})
            Traceback (most recent call last):
            ...
            ValueError: LinearRamp: invalid count in the state: count must be an int; got float 2.0
        """
        owner = type(self).__name__
        state = check_state(owner, state, {"count"})
        self.count = state_int(owner, "count", state["count"])

    def __repr__(self) -> str:
        return call_repr(self)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, min(low, high)), max(low, high))


class Constant(WeightSchedule):
    """The constant weight ``value`` (default 1.0).

    Examples:
        >>> from dynloss.schedules import Constant
        >>> Constant(0.5).value_at(100)
        0.5
    """

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.value_ = check_weight("value", value)

    def value_at(self, t: int) -> float:
        return self.value_

    def __repr__(self) -> str:
        if type(self).__init__ is not Constant.__init__:  # a subclass with its own arguments
            return call_repr(self)
        name = type(self).__name__
        return f"{name}()" if self.value_ == 1.0 else f"{name}(value={self.value_!r})"


class Step(WeightSchedule):
    """Piecewise constant: ``values[i]`` where ``i`` = number of ``milestones <= t``.

    ``values`` has one entry more than ``milestones`` (strictly increasing ints >= 0).

    Examples:
        >>> from dynloss.schedules import Step
        >>> s = Step(milestones=[2, 4], values=[1.0, 0.5, 0.0])
        >>> [s.value_at(t) for t in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    """

    def __init__(self, milestones: Sequence[int], values: Sequence[float]) -> None:
        super().__init__()
        for name, given in (("milestones", milestones), ("values", values)):
            if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
                raise TypeError(f"{name} must be a list; got {type(given).__name__} {given!r}")
        milestones = [check_count(f"milestones[{i}]", m) for i, m in enumerate(milestones)]
        if any(b <= a for a, b in itertools.pairwise(milestones)):
            raise ValueError(f"milestones must be strictly increasing; got {milestones}")
        values = [check_weight(f"values[{i}]", v) for i, v in enumerate(values)]
        if len(values) != len(milestones) + 1:
            raise ValueError(
                f"values needs one entry more than milestones (the weight before the first "
                f"milestone); got {len(values)} values for {len(milestones)} milestones"
            )
        self.milestones = milestones
        self.values = values

    def value_at(self, t: int) -> float:
        return self.values[bisect.bisect_right(self.milestones, t)]


class _Transition(WeightSchedule):
    """``initial`` up to ``start``, ``final`` from ``end`` on, and ``_between(fraction)`` in
    between, where ``fraction = (t - start) / (end - start)`` runs over (0, 1)."""

    def __init__(self, start: int, end: int, initial: float, final: float) -> None:
        super().__init__()
        self.start = check_count("start", start)
        self.end = check_count("end", end)
        if self.end < self.start:
            raise ValueError(f"end must be >= start; got start={start}, end={end}")
        self.initial = check_weight("initial", initial)
        self.final = check_weight("final", final)

    def value_at(self, t: int) -> float:
        if t >= self.end:
            return self.final
        if t <= self.start:
            return self.initial
        fraction = (t - self.start) / (self.end - self.start)
        return _clamp(self._between(fraction), self.initial, self.final)

    @abstractmethod
    def _between(self, fraction: float) -> float:
        """The weight at ``fraction`` of the way from ``start`` to ``end``."""


class LinearRamp(_Transition):
    r"""Linear ramp from ``initial`` to ``final`` between ``start`` and ``end`` (Taubert's naive).

    .. math:: w(t) = \begin{cases} \text{initial} & t \le \text{start} \\
              \text{initial} + (\text{final}-\text{initial})
              \frac{t-\text{start}}{\text{end}-\text{start}} & \text{start} < t < \text{end} \\
              \text{final} & t \ge \text{end} \end{cases}

    ``start == end`` is a hard switch: ``initial`` before ``end``, ``final`` from ``end`` on.
    Defaults ``initial=0.0``, ``final=1.0`` (the weight of the loss switched *to*; use
    ``initial=1.0, final=0.0`` for the loss switched *from*).

    Examples:
        >>> from dynloss.schedules import LinearRamp
        >>> [LinearRamp(1, 3, initial=1.0, final=0.0).value_at(t) for t in range(5)]
        [1.0, 1.0, 0.5, 0.0, 0.0]
        >>> [LinearRamp(2, 2).value_at(t) for t in range(4)]
        [0.0, 0.0, 1.0, 1.0]
    """

    def __init__(self, start: int, end: int, initial: float = 0.0, final: float = 1.0) -> None:
        super().__init__(start, end, initial, final)

    def _between(self, fraction: float) -> float:
        return self.initial + (self.final - self.initial) * fraction


class Cosine(_Transition):
    r"""Half-cosine from ``initial`` to ``final`` between ``start`` and ``end``.

    .. math:: w(t) = \text{final} + (\text{initial} - \text{final})
              \tfrac12\bigl(1 + \cos(\pi \tfrac{t - \text{start}}{\text{end} - \text{start}})\bigr)

    for ``start < t < end``; ``initial`` before, ``final`` after (defaults 1.0 -> 0.0, like
    ``CosineAnnealingLR``). ``start == end`` is a hard switch.

    Examples:
        >>> from dynloss.schedules import Cosine
        >>> [round(Cosine(0, 4).value_at(t), 4) for t in range(5)]
        [1.0, 0.8536, 0.5, 0.1464, 0.0]
    """

    def __init__(self, start: int, end: int, initial: float = 1.0, final: float = 0.0) -> None:
        super().__init__(start, end, initial, final)

    def _between(self, fraction: float) -> float:
        cosine = 0.5 * (1.0 + math.cos(math.pi * fraction))
        return self.final + (self.initial - self.final) * cosine


class RampCosine(WeightSchedule):
    r"""Linear ramp up, then cosine decay (Taubert's *alternating* schedule).

    ``low`` before ``start``, linear up to ``high`` at ``peak``, then a half-cosine back down to
    ``low`` at ``end``, and ``low`` from ``end`` on (defaults ``low=0.0``, ``high=1.0``).
    Requires ``start <= peak <= end``. With ``start == peak`` it jumps to ``high`` at
    ``start``; with ``peak == end`` it ramps up and drops to ``low`` at ``end`` without
    taking ``high`` (``low`` from ``end`` on wins; a ramp that stays up is
    :class:`LinearRamp`).

    .. math:: w(t) = \text{low} + (\text{high}-\text{low})
              \tfrac12\bigl(1+\cos(\pi\tfrac{t-\text{peak}}{\text{end}-\text{peak}})\bigr),
              \quad \text{peak} \le t < \text{end}

    Examples:
        >>> from dynloss.schedules import RampCosine
        >>> [round(RampCosine(0, 2, 6).value_at(t), 4) for t in range(8)]
        [0.0, 0.5, 1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
        >>> [RampCosine(0, 4, 4).value_at(t) for t in range(6)]
        [0.0, 0.25, 0.5, 0.75, 0.0, 0.0]
    """

    def __init__(
        self, start: int, peak: int, end: int, low: float = 0.0, high: float = 1.0
    ) -> None:
        super().__init__()
        self.start = check_count("start", start)
        self.peak = check_count("peak", peak)
        self.end = check_count("end", end)
        if not self.start <= self.peak <= self.end:
            raise ValueError(
                f"need start <= peak <= end; got start={start}, peak={peak}, end={end}"
            )
        self.low = check_weight("low", low)
        self.high = check_weight("high", high)

    def value_at(self, t: int) -> float:
        if t < self.start or t >= self.end:
            return self.low
        if t < self.peak:
            fraction = (t - self.start) / (self.peak - self.start)
            return _clamp(self.low + (self.high - self.low) * fraction, self.low, self.high)
        fraction = (t - self.peak) / (self.end - self.peak)
        value = self.low + (self.high - self.low) * 0.5 * (1.0 + math.cos(math.pi * fraction))
        return _clamp(value, self.low, self.high)
