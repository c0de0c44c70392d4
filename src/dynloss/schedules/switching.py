"""SwitchingLoss: train with one loss, then switch to the next (the paper's dynamic alteration)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_choice
from .._warn import warn_at_caller
from ..distributed import is_distributed, metric_value, reduce_mean_comparing
from ._base import (
    check_count,
    check_same_targets,
    losses_repr,
    named_losses,
    set_last_terms,
    term_value,
)
from ._state import dry_run_load, load_all_or_nothing, load_parts, state_error, state_int
from ._steps import (
    begin_unused,
    check_next_weights_child,
    check_parts,
    count_step,
    in_use,
    metric_triggers,
    reads_metric_later,
    record,
    record_tree,
    step_child,
    stepped_losses,
    top_level_step,
    warn_if_started,
)
from .triggers import Milestone, Trigger
from .weights import WeightSchedule

__all__ = ["SwitchEvent", "SwitchingLoss"]

UNITS = ("epoch", "step")


@dataclass(frozen=True)
class SwitchEvent:
    """What an ``on_switch`` callback receives (a frozen record of one switch).

    Examples:
        >>> from dynloss import BCELoss, IoULoss, SwitchEvent, SwitchingLoss
        >>> loss_fn = SwitchingLoss([IoULoss(), BCELoss()], milestones=[2])
        >>> events: list[SwitchEvent] = []
        >>> _ = loss_fn.on_switch(events.append)
        >>> [loss_fn.step() for epoch in range(3)]
        [False, True, False]
        >>> event = events[0]
        >>> event.old_index, event.new_index, event.old_name, event.new_name
        (0, 1, 'iou', 'bce')
        >>> event.count, event.unit, event.trigger, event.new is loss_fn.active
        (2, 'epoch', Milestone(2), True)
    """

    old_index: int
    """Index of the stage that ended."""
    new_index: int
    """Index of the stage that begins (``old_index + 1``)."""
    old_name: str
    new_name: str
    old: nn.Module
    """The loss of the stage that ended."""
    new: nn.Module
    """The loss used from now on."""
    count: int
    """The counter at the switch: the first epoch (or step) of the new stage."""
    unit: str
    """``"epoch"`` or ``"step"``."""
    trigger: Trigger
    """The trigger that fired."""


SwitchCallback = Callable[[SwitchEvent], Any]


class SwitchingLoss(nn.Module):
    """A sequence of losses used one after the other: stage ``i`` uses ``losses[i]``.

    The paper trains with a region loss (Dice, IoU, Tversky) for 50 epochs and then with a
    distribution loss (BCE, Focal, TopK): ``SwitchingLoss([IoULoss(), BCELoss()],
    milestones=[50])``. Call :meth:`step` once per epoch (``unit="epoch"``) or once per optimizer
    step (``unit="step"``), like an LR scheduler; stage ``i`` ends when the trigger of stage
    ``i`` fires, by default when the counter reaches ``milestones[i]``.

    Args:
        losses: two or more loss modules (a stage may be a :class:`~dynloss.CompositeLoss`), or
            a ``{name: module}`` mapping. Every stage is called with the same input and
            target, so dynloss losses of ``mode="multiclass"`` (class-index targets) and of
            ``"binary"``/``"multilabel"`` (targets of the input's shape) cannot be stages of
            one switch: a ``ValueError`` at construction, not at the switch.
        milestones: strictly increasing counter values (ints >= 1) at which the next stage
            begins, one per switch. Default ``[50]`` (the paper's) for two stages when no
            ``trigger`` is given.
        trigger: instead of ``milestones``: a :class:`~dynloss.schedules.Trigger` (copied for
            each switch when there are more than two stages) or a list of one trigger per
            switch (an int in the list means :class:`~dynloss.schedules.Milestone`). Adaptive
            triggers (:class:`~dynloss.schedules.Plateau`,
            :class:`~dynloss.schedules.RelativeImprovement`) read ``step(metric=...)``.
        unit: ``"epoch"`` (default) or ``"step"``: documents what ``step()`` counts and is
            checked when a state is loaded.
        sync_metric: under ``torch.distributed``, average the metric over the ranks before a
            trigger sees it (default True), so all ranks switch at the same step. Every rank
            must then call ``step(metric=...)``; ranks whose step counts or stages differ
            (one alone loaded the loss's state) raise a ``RuntimeError`` there. A metric
            passed while an adaptive trigger is still to come (after a milestone stage) is
            reduced too, so the ranks are compared from the first step.
        on_switch: a callback, or a list of them, called with a :class:`SwitchEvent` at every
            switch (see :meth:`on_switch` and :func:`~dynloss.schedules.reset_plateau_scheduler`).

    Behaviour:
        - :attr:`count` is the number of ``step()`` calls (0 before the first), the current
          epoch; with ``milestones=[m]`` stage 0 runs for counts ``0..m-1`` and stage 1 from
          ``m`` on. At most one switch happens per ``step()``.
        - Only the active stage's trigger is consulted; it is reset when its stage begins, and
          its ``min_epochs`` / ``max_epochs`` count from there. Milestones count from the start
          of training.
        - ``step()`` also advances every stage that has schedules (a CompositeLoss with
          :mod:`~dynloss.schedules.weights`, a nested SwitchingLoss), active or not, so
          schedules always see the global counter. A SwitchingLoss nested in a stage that is
          not active holds still: its counter advances, but none of its triggers is consulted
          (nor needs a metric, nor calls back) until its stage begins; then its active trigger
          starts afresh and its ``stage_count`` counts from there, as a top-level stage's do
          (milestones it passed meanwhile switch from its first step in use, one per step).
          A loss also used elsewhere in the tree (a term of a composite above, or part of
          both the stage left and the stage entered) is in use and goes on undisturbed.
        - :attr:`last_terms`: ``{stage_name: value}`` (detached) after each call, plus the
          stage's own ``last_terms`` as ``"stage.term"`` entries (the module's: with calls
          from several threads at once, those of the call that ended last).
        - ``state_dict()`` holds the counters, the active stage, the switch history and the
          triggers' history (``torch.load(weights_only=True)``-safe); loading it resumes the
          exact sequence. A state that does not fit this loss, holds a wrong type or is
          inconsistent is a ValueError, and a failed load changes nothing (see
          :meth:`set_extra_state`). Callbacks are not saved: register them again.
        - ``repr()`` is a :func:`~dynloss.build_loss` spec of an equal loss; with callbacks
          registered it names them instead, and ``build_loss`` refuses it (see
          :meth:`__repr__`).

    Examples:
        >>> import torch
        >>> from dynloss import BCELoss, IoULoss, SwitchingLoss
        >>> loss = SwitchingLoss([IoULoss(), BCELoss()], milestones=[2])
        >>> stages = []
        >>> for epoch in range(4):
        ...     stages.append(loss.active_name)  # ... train one epoch with loss(logits, target)
        ...     _ = loss.step()
        >>> stages
        ['iou', 'iou', 'bce', 'bce']
        >>> loss.switches
        [(0, 1, 2)]
    """

    def __init__(
        self,
        losses: Sequence[nn.Module] | Mapping[str, nn.Module],
        milestones: Sequence[int] | None = None,
        *,
        trigger: Trigger | Sequence[Trigger | int] | None = None,
        unit: str = "epoch",
        sync_metric: bool = True,
        on_switch: SwitchCallback | Iterable[SwitchCallback] | None = None,
    ) -> None:
        super().__init__()
        names, modules, explicit = named_losses("SwitchingLoss", losses, minimum=2)
        check_same_targets("stage", names, modules)
        self.stages = nn.ModuleDict(dict(zip(names, modules, strict=True)))
        self._explicit_names = explicit
        self.triggers: list[Trigger] = _make_triggers(len(modules), milestones, trigger)
        self.triggers[0].reset()  # stage 0 begins: no history from another loss's run
        self.unit = check_choice("unit", unit, UNITS)
        for name, stage in self.stages.items():
            for nested in stepped_losses(stage):
                if isinstance(nested, SwitchingLoss) and nested.unit != self.unit:
                    raise ValueError(
                        f"SwitchingLoss: stage {name!r} holds a SwitchingLoss with "
                        f"unit={nested.unit!r}; this loss counts unit={self.unit!r} and steps "
                        "the losses it holds, so they count the same (give them one unit)"
                    )
        self.sync_metric = check_bool("sync_metric", sync_metric)
        self.count = 0
        """Number of :meth:`step` calls so far (the current epoch or optimizer step)."""
        self.stage_count = 0
        """Number of :meth:`step` calls since the active stage began in which this loss was in
        use (a loss nested in a stage of another SwitchingLoss is not while that stage is not
        active)."""
        self.idle_count = 0
        """Number of :meth:`step` calls since the active stage began (or the last switch) in
        which this loss was not in use: ``stage_count + idle_count`` steps since then."""
        self.active_index = 0
        """Index of the stage in use."""
        self.switches: list[tuple[int, int, int]] = []
        """``(old_index, new_index, count)`` of every switch so far."""
        self.just_switched = False
        """Whether the last :meth:`step` switched."""
        self.last_terms: dict[str, Tensor] = {}
        self._callbacks: list[SwitchCallback] = []
        if on_switch is None:
            callbacks: list[Any] = []
        elif callable(on_switch) or isinstance(on_switch, (str, bytes)):
            callbacks = [on_switch]
        elif isinstance(on_switch, Iterable):
            callbacks = list(on_switch)
        else:
            raise TypeError(
                "on_switch must be a callable or a list of callables; got "
                f"{type(on_switch).__name__}"
            )
        for callback in callbacks:
            self.on_switch(callback)
        warn_if_started("SwitchingLoss", self._parts({}))  # (its stages: no trigger in use)
        record_tree(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "idle_count" not in state:  # pickled by dynloss 0.1.0, which did not count it
            state = {**state, "idle_count": 0}
        super().__setstate__(state)

    # ----------------------------------------------------------------------------------- info
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def names(self) -> list[str]:
        """The stages' names, in order."""
        return list(self.stages.keys())

    @property
    def active(self) -> nn.Module:
        """The loss of the active stage."""
        return self.stages[self.active_name]

    @property
    def active_name(self) -> str:
        return self.names[self.active_index]

    @property
    def milestones(self) -> list[int] | None:
        """The switch counts when every trigger is a :class:`Milestone` (not a subclass), else
        None."""
        milestones = [t for t in self.triggers if type(t) is Milestone]  # (not a subclass)
        if len(milestones) == len(self.triggers):
            return [t.at for t in milestones]
        return None

    # ------------------------------------------------------------------------------ training
    if TYPE_CHECKING:  # nn.Module types its call as returning Any; a loss returns a Tensor
        def __call__(self, input: Tensor, target: Tensor) -> Tensor: ...

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The active stage's loss; fills :attr:`last_terms`."""
        name, loss = self.active_name, self.active
        tracer = ("torch.jit.trace" if torch.jit.is_tracing() else
                  "torch.export" if torch.compiler.is_exporting() else None)
        if tracer is not None:
            warn_at_caller(f"SwitchingLoss: {tracer} records the active stage ({name!r}) "
                           "only: the traced module keeps computing it after a switch "
                           "(torch.compile follows the switch)")
        value = term_value("SwitchingLoss", f"stage {name!r}", loss, loss(input, target))
        terms = {name: value.detach()}
        nested = getattr(loss, "last_terms", None)
        if isinstance(nested, dict):
            terms.update({f"{name}.{key}": term for key, term in nested.items()})
        set_last_terms(self, terms, input)
        return value

    def on_switch(self, callback: SwitchCallback) -> SwitchCallback:
        """Register ``callback(event)`` to run at every switch; returns it (usable as decorator).

        Callbacks run in the order they were registered, inside the :meth:`step` that switches.
        They are code, not state: ``state_dict()`` does not hold them, and ``repr()`` lists
        their names (see :meth:`__repr__`).

        Raises:
            TypeError: ``callback`` is not callable, or is a loss module or a weight schedule
                (callable, but not with a :class:`SwitchEvent`; a further stage belongs in
                ``losses``).

        Examples:
            >>> from dynloss import BCELoss, DiceLoss, SwitchingLoss
            >>> loss = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[1])
            >>> @loss.on_switch
            ... def report(event):
            ...     print(f"epoch {event.count}: {event.old_name} -> {event.new_name}")
            >>> _ = loss.step()
            epoch 1: dice -> bce
        """
        if isinstance(callback, (nn.Module, WeightSchedule)):
            kind = "loss" if isinstance(callback, nn.Module) else "weight schedule"
            raise TypeError(
                f"on_switch needs a callback that takes a SwitchEvent; got the {kind} "
                f"{callback!r} (a further stage belongs in losses)"
            )
        if not callable(callback):
            raise TypeError(
                f"on_switch needs a callable; got {type(callback).__name__} {callback!r}"
            )
        self._callbacks.append(callback)
        return callback

    def step(self, metric: float | Tensor | None = None) -> bool:
        """Advance the counter by one (call after each epoch, or each optimizer step).

        Args:
            metric: the monitored value for adaptive triggers (e.g. the epoch's mean training
                loss or a validation Dice); averaged over ``torch.distributed`` ranks when
                ``sync_metric``. Required while the active trigger monitors a value; checked
                whenever given (a number, or a one-element tensor or array).

        Returns:
            True if this call switched to the next stage.

        Raises:
            ValueError: the active trigger needs a metric and none was given, the metric
                given is not a number or a one-element tensor or array, a weight
                schedule of a nested CompositeLoss has no valid value (finite, >= 0) at the
                next step, or something this loss steps (its active trigger, a nested loss)
                was stepped elsewhere since it was built or last stepped (by another live loss
                that holds it too, or by hand); the step is then not taken: no counter
                changes.
            RuntimeError: under ``torch.distributed`` with ``sync_metric``, the ranks' step
                counts or stages differ at a step that reduces the metric (raised on every
                rank).
        """
        return bool(top_level_step(self, metric))

    def _dynloss_active_trigger(self, used: Mapping[int, Any]) -> Trigger | None:
        """The trigger the next step consults: the active one while this loss is in use (a
        trigger serving two nested switches one after the other is consulted by one at a
        time); None for one without state (a :class:`Milestone` answers alike however often
        it is asked)."""
        if id(self) in used and self.active_index < len(self.triggers):
            trigger = self.triggers[self.active_index]
            if trigger._state():
                return trigger
        return None

    def _parts(self, used: Mapping[int, Any]) -> list[tuple[str, object]]:
        """What this loss steps and another must not (see :func:`check_parts`): its nested
        losses and the trigger its next step consults."""
        parts: list[tuple[str, object]] = [
            (f"stage {name!r}", stage) for name, stage in self.stages.items()
            if hasattr(stage, "_dynloss_children")]
        trigger = self._dynloss_active_trigger(used)
        if trigger is not None:
            parts.append((f"the trigger of stage {self.active_name!r}", trigger))
        return parts

    def _dynloss_children(self) -> list[nn.Module]:
        """The losses a step of this one steps in turn (see :func:`stepped_losses`)."""
        return list(self.stages.values())

    def _dynloss_record(self, used: Mapping[int, Any]) -> None:
        record(self, self._parts(used))

    def _dynloss_check_next_weights(self, seen: set[int], used: Mapping[int, Any]) -> None:
        seen.add(id(self))
        check_parts("SwitchingLoss", self, self._parts(used))
        for stage in self.stages.values():
            check_next_weights_child(stage, seen, used)

    def _metric_triggers(self) -> list[Trigger]:
        """The triggers the next step consults that read the metric: the active stage's, and
        those of the losses nested in the active stage (not those of a later stage)."""
        active = self.triggers[self.active_index:self.active_index + 1]
        return [t for t in active if t.needs_metric] + metric_triggers(self.active)

    def _dynloss_reads_metric_later(self) -> bool:
        """Whether a trigger of the active stage or a later one (here or nested) reads the
        metric: until the last of them has fired, the ranks compare their states at every
        ``step(metric=...)`` (see :meth:`_dynloss_step`)."""
        if any(t.needs_metric for t in self.triggers[self.active_index:]):
            return True
        later = list(self.stages.values())[self.active_index:]
        return any(reads_metric_later(stage) for stage in later)

    def _dynloss_in_use(self, found: dict[int, Any]) -> None:
        in_use(self.active, found)

    def _dynloss_step(self, metric: Any, synced: bool, seen: set[int],
                      used: Mapping[int, Any]) -> bool:
        """One step. ``used``: the losses in use at this step (:func:`in_use` of the top-level
        loss). One not in use (held in a stage of a SwitchingLoss that is not active, and not
        used elsewhere) counts the step (its milestones and weight schedules see the global
        counter) but consults no trigger."""
        active = id(self) in used
        seen.add(id(self))
        # reduced while an active trigger (here or nested) reads it, and, under
        # torch.distributed, at every step before a later one does: the ranks' states are
        # compared in that all-reduce, so a rank that alone resumed is told at its first
        # step, not when the ranks meet in different collectives (a milestone stage first).
        # Never after the last adaptive switch: a finished trigger must not make this rank
        # wait in a collective that the others, asked for nothing, skip.
        if active and metric is not None:
            if self.sync_metric and not synced and (
                    self._metric_triggers()
                    or (is_distributed() and self._dynloss_reads_metric_later())):
                metric, synced = self._reduce_metric(metric), True
            elif self._metric_triggers():
                metric = metric_value(metric)
        count_step(self)
        self.count += 1
        if active:
            self.stage_count += 1
        else:
            self.idle_count += 1
        for stage in self.stages.values():
            step_child(stage, metric, synced, seen, used)
        self.just_switched = False
        if active and self.active_index < len(self.triggers):
            trigger = self.triggers[self.active_index]
            value = metric if trigger.needs_metric else None
            count_step(trigger)
            if trigger.update(self.count, self.stage_count, value):
                self._switch(trigger, used)
        return self.just_switched

    def _reduce_metric(self, metric: Any) -> float:
        """The mean of ``metric`` over the ranks; raises, on every rank alike, where the ranks'
        counters differ (they travel in the same all-reduce): one rank that alone loaded the
        loss's state would take other switch decisions than the others, in silence."""
        here = (self.count, self.active_index, self.stage_count)
        mean, agree = reduce_mean_comparing(metric, here)
        if not all(agree):
            differ = ", ".join(name for name, same in zip(
                ("the step count", "the stage", "the steps into the stage"), agree,
                strict=True) if not same)
            raise RuntimeError(
                f"SwitchingLoss.step: the ranks' switch states differ ({differ}; count "
                f"{self.count} here, stage {self.active_name!r} here, {self.stage_count} "
                f"step(s) into it): load the loss's state on every rank when resuming "
                f"(DDP broadcasts the model's parameters, not the loss's state). Every rank "
                f"raised this at this step")
        return mean

    def _dynloss_begin(self) -> None:
        """This loss was not in use and is from the next step on (the stage of an enclosing
        SwitchingLoss that holds it has begun): its active trigger and its stage's length
        start afresh, as a top-level stage's do when it begins."""
        if self.active_index < len(self.triggers):
            self.triggers[self.active_index].reset()
        self.idle_count += self.stage_count
        self.stage_count = 0

    def _switch(self, trigger: Trigger, used: Mapping[int, Any]) -> None:
        old = self.active_index
        new = old + 1
        self.active_index = new
        self.stage_count = 0
        self.idle_count = 0
        if new < len(self.triggers):
            self.triggers[new].reset()
        begin_unused(self.active, used)
        self.switches.append((old, new, self.count))
        self.just_switched = True
        names = self.names
        event = SwitchEvent(
            old_index=old, new_index=new, old_name=names[old], new_name=names[new],
            old=self.stages[names[old]], new=self.stages[names[new]], count=self.count,
            unit=self.unit, trigger=trigger,
        )
        for callback in self._callbacks:
            callback(event)

    # --------------------------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "num_stages": self.num_stages,
            "unit": self.unit,
            "count": self.count,
            "stage_count": self.stage_count,
            "idle_count": self.idle_count,
            "active_index": self.active_index,
            "switches": [list(s) for s in self.switches],
            "triggers": [t.state_dict() for t in self.triggers],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, all or nothing: a state that fails anywhere in the
        tree (a nested loss's state, a missing or unexpected key) leaves this loss as it was."""
        return load_all_or_nothing(self, state_dict, strict, assign)

    def set_extra_state(self, state: Any) -> None:
        """Load the state of :meth:`get_extra_state` (``load_state_dict`` calls this).

        Everything is checked before anything changes, so a failed load leaves the loss and
        its triggers exactly as they were (each trigger's state is first loaded into a deep
        copy of it; a custom trigger's ``_load`` must be deterministic). Checked:

        - the keys, and the type of every value (a wrong type is a ValueError naming the key);
        - the saved loss matches this one: ``num_stages``, ``unit``, the number and kind of
          triggers;
        - consistency: ``active_index < num_stages``; ``active_index`` equals the number of
          switches recorded; switch ``i`` is ``(i, i + 1, count_i)`` with
          ``0 < count_0 < count_1 < ... <= count`` (at most one switch per step);
          ``stage_count + idle_count == count - count_last`` (``count`` before any switch;
          ``idle_count`` may be missing, 0, in a state saved by dynloss 0.1); every trigger's
          history is valid for it;
        - this loss's ``Milestone`` triggers: no switch recorded before its stage's milestone,
          and the active stage not at or past the count where its milestone switches (a
          milestone moved but still ahead resumes with the new milestone).

        Not checked: the stages' names, which are labels (a stage renamed between runs
        resumes; a stage's own state, e.g. a CompositeLoss's, is under its name, so torch's
        strict loading refuses it there).

        Raises:
            ValueError: any of the above; the message names the key or the mismatch.

        Examples:
            >>> from dynloss import BCELoss, DiceLoss, SwitchingLoss
            >>> loss = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[2])
            >>> state = loss.state_dict()
            >>> state["_extra_state"]["active_index"] = 1  # but no switch recorded
            >>> loss.load_state_dict(state)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: SwitchingLoss: inconsistent state: active_index is 1 but 0 switches are ...
            >>> loss.active_index, loss.count
            (0, 0)
        """
        owner = "SwitchingLoss"
        keys = {"num_stages", "unit", "count", "stage_count", "active_index", "switches",
                "triggers"}
        optional = {"idle_count"}  # (0 in states saved before it was counted)
        if not isinstance(state, Mapping) or not keys <= set(state) <= keys | optional:
            detail = (
                f"missing keys {sorted(keys - set(state))}, unexpected keys "
                f"{sorted(map(str, set(state) - keys - optional))}"
                if isinstance(state, Mapping)
                else f"a state must be a dict; got {type(state).__name__}"
            )
            raise ValueError(f"{owner}: this state was not saved from a SwitchingLoss ({detail})")
        num_stages = state_int(owner, "num_stages", state["num_stages"])
        if num_stages != self.num_stages:
            raise ValueError(
                f"{owner}: the state was saved from a loss with {num_stages} "
                f"stages; this one has {self.num_stages} ({', '.join(self.names)})"
            )
        unit = state["unit"]
        if not (isinstance(unit, str) and unit == self.unit):
            raise ValueError(
                f"{owner}: the state counts unit={unit!r}, this loss unit={self.unit!r}"
            )
        count = state_int(owner, "count", state["count"])
        stage_count = state_int(owner, "stage_count", state["stage_count"])
        idle_count = state_int(owner, "idle_count", state.get("idle_count", 0))
        active_index = state_int(owner, "active_index", state["active_index"])
        if active_index >= self.num_stages:
            raise ValueError(f"{owner}: active_index {active_index} in the state is out of range "
                             f"for {self.num_stages} stages")
        switches = _checked_switches(state["switches"], count)
        if len(switches) != active_index:
            recorded = f"{len(switches)} switch{' is' if len(switches) == 1 else 'es are'}"
            raise ValueError(
                f"{owner}: inconsistent state: active_index is {active_index} but {recorded} "
                "recorded (each switch advances the active stage by one)"
            )
        last = switches[-1][2] if switches else 0
        if stage_count + idle_count != count - last:
            raise ValueError(
                f"{owner}: inconsistent state: stage_count is {stage_count} and idle_count "
                f"{idle_count}, but count - the last switch's count = {count} - {last} = "
                f"{count - last} (their sum)"
            )
        triggers = state["triggers"]
        if not isinstance(triggers, (list, tuple)):
            raise ValueError(f"{owner}: invalid triggers in the state: triggers must be a list of "
                             f"trigger states; got {type(triggers).__name__}")
        if len(triggers) != len(self.triggers):
            raise ValueError(
                f"{owner}: the state has {len(triggers)} triggers, this loss "
                f"{len(self.triggers)}"
            )
        for index, (trigger, saved) in enumerate(zip(self.triggers, triggers, strict=True)):
            with state_error(f"{owner}: triggers[{index}]"):
                dry_run_load(trigger, saved)
        _check_milestones(self, switches, count, idle_count)
        # -- all checked: assign
        load_parts([(f"{owner}: triggers[{index}]", trigger, saved)
                    for index, (trigger, saved) in enumerate(zip(self.triggers, triggers,
                                                                 strict=True))])
        self.count = count
        self.stage_count = stage_count
        self.idle_count = idle_count
        self.active_index = active_index
        self.switches = switches
        self.just_switched = False

    def _dynloss_holds_state(self) -> bool:
        """A switching loss holds its stage and counters (see ``losses_repr``)."""
        return True

    def __repr__(self) -> str:
        """A :func:`~dynloss.build_loss` spec of this loss, unless callbacks are registered.

        Without callbacks, ``build_loss(repr(loss))`` builds an equal loss (same stages,
        triggers, ``unit`` and ``sync_metric``; the counters start at 0). Callbacks are Python
        code that a spec cannot hold, so the repr does not drop them silently: it lists their
        qualified names as ``on_switch=['name', ...]``, and :func:`~dynloss.build_loss` refuses
        that spec with a :class:`~dynloss.SpecError` naming the callback (``eval`` refuses it
        too: a name is not a callable). Build the loss from the repr of a copy without
        callbacks, or from the original spec, and register them again with :meth:`on_switch`.
        A loss with schedule state that two stages or terms share is written once, then
        ``shared('<its module path>')``, which :func:`~dynloss.build_loss` refuses alike.

        Examples:
            >>> from dynloss import BCELoss, DiceLoss, SpecError, SwitchingLoss, build_loss
            >>> def report(event):
            ...     print(event.new_name)
            >>> loss = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[3], on_switch=report)
            >>> loss
            SwitchingLoss([DiceLoss(), BCELoss()], milestones=[3], on_switch=['report'])
            >>> try:
            ...     build_loss(repr(loss))
            ... except SpecError as err:
            ...     print(err.message)  # doctest: +ELLIPSIS
            on_switch: the callback 'report' is Python code, which a spec cannot build; ...
        """
        parts = [losses_repr(self, self.names, list(self.stages.values()), self._explicit_names)]
        milestones = self.milestones
        if milestones is not None:
            parts.append(f"milestones={milestones!r}")
        elif len(self.triggers) == 1:
            parts.append(f"trigger={self.triggers[0]!r}")
        else:
            parts.append(f"trigger=[{', '.join(repr(t) for t in self.triggers)}]")
        if self.unit != "epoch":
            parts.append(f"unit={self.unit!r}")
        if not self.sync_metric:
            parts.append("sync_metric=False")
        if self._callbacks:
            names = ", ".join(repr(_callback_name(c)) for c in self._callbacks)
            parts.append(f"on_switch=[{names}]")
        return f"SwitchingLoss({', '.join(parts)})"


def _callback_name(callback: object) -> str:
    """The qualified name of a function or method, else of the callable's class."""
    name = getattr(callback, "__qualname__", None)
    return name if isinstance(name, str) else type(callback).__qualname__


def _check_milestones(loss: SwitchingLoss, switches: list[tuple[int, int, int]], count: int,
                      idle_count: int) -> None:
    """Refuse a state that ``loss``'s own :class:`Milestone` triggers contradict (one saved
    from a loss with other milestones): a switch recorded before its stage's milestone, or the
    active stage at or past the count where its milestone switches. A milestone moved that is
    still ahead is not a contradiction: the loss resumes with it. A switch after its milestone
    is not refused, nor an active stage past it with steps not in use (``idle_count``): a
    nested loss consults its trigger only while in use."""
    owner = "SwitchingLoss"
    for index, trigger in enumerate(loss.triggers[:len(switches) + 1]):
        if type(trigger) is not Milestone:  # (a subclass may fire otherwise)
            continue
        stage = f"stage {index} ({loss.names[index]!r})"
        if index < len(switches):
            at = switches[index][2]
            if at < trigger.at:
                raise ValueError(
                    f"{owner}: the state switched from {stage} at count {at}, but this loss's "
                    f"trigger {trigger!r} cannot fire before count {trigger.at}: the state was "
                    "saved from a loss with other milestones")
            continue
        entered = switches[-1][2] if switches else 0
        due = max(trigger.at, entered + 1)  # (at most one switch per step)
        if idle_count == 0 and count >= due:
            raise ValueError(
                f"{owner}: the state is in {stage} at count {count}, but this loss's trigger "
                f"{trigger!r} would have switched at count {due}: the state was saved from a "
                "loss with other milestones")


def _checked_switches(saved: object, count: int) -> list[tuple[int, int, int]]:
    """The switch history of a state as tuples, checked (see ``set_extra_state``)."""
    owner = "SwitchingLoss"
    if not isinstance(saved, (list, tuple)):
        raise ValueError(f"{owner}: invalid switches in the state: switches must be a list of "
                         f"[old_index, new_index, count]; got {type(saved).__name__}")
    switches: list[tuple[int, int, int]] = []
    for index, entry in enumerate(saved):
        if not (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
        ):
            raise ValueError(f"{owner}: invalid switches[{index}] in the state: must be "
                             f"[old_index, new_index, count] (three ints); got {entry!r}")
        old, new, at = entry
        if (old, new) != (index, index + 1):
            raise ValueError(
                f"{owner}: inconsistent state: switches[{index}] goes from stage {old} to {new}; "
                f"expected {index} -> {index + 1} (stages are visited in order)"
            )
        previous = switches[-1][2] if switches else 0
        if not previous < at <= count:
            raise ValueError(
                f"{owner}: inconsistent state: switches[{index}] happened at count {at}; expected "
                f"a count after {previous} (the previous switch, or the start) and not above "
                f"count={count}"
            )
        switches.append((old, new, at))
    return switches


def unordered_milestone(switches: Sequence[Trigger | int]) -> int | None:
    """The index in ``switches`` (triggers, or ints for milestones) of the first milestone that
    is not after the milestone before it; None when they increase strictly."""
    previous = None
    for index, switch in enumerate(switches):
        at = switch.at if isinstance(switch, Milestone) else switch
        if isinstance(at, int):
            if previous is not None and at <= previous:
                return index
            previous = at
    return None


def milestone_order_error(switches: Sequence[Trigger | int]) -> str:
    ats = [s.at if isinstance(s, Milestone) else s for s in switches
           if isinstance(s, (Milestone, int))]
    return f"SwitchingLoss: milestones must be strictly increasing; got {ats}"


def _check_milestone_order(triggers: list[Trigger]) -> None:
    if unordered_milestone(triggers) is not None:
        raise ValueError(milestone_order_error(triggers))


def _make_triggers(num_stages: int, milestones: object, trigger: object) -> list[Trigger]:
    switches = num_stages - 1
    if milestones is not None and trigger is not None:
        raise ValueError("SwitchingLoss: pass either milestones or trigger, not both")
    if milestones is None and trigger is None:
        if num_stages != 2:
            raise ValueError(
                f"SwitchingLoss with {num_stages} stages needs milestones=[...] ({switches} "
                "switch points) or trigger=...; the default [50] is for two stages"
            )
        milestones = [50]
    if milestones is not None:
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise TypeError(
                f"SwitchingLoss: milestones must be a list of ints; got {type(milestones).__name__}"
            )
        if len(milestones) != switches:
            raise ValueError(
                f"SwitchingLoss: {num_stages} stages need {switches} milestone"
                f"{'s' if switches != 1 else ''} (one per switch); got {list(milestones)}"
            )
        triggers: list[Trigger] = [
            Milestone(check_count(f"milestones[{i}]", m, minimum=1))
            for i, m in enumerate(milestones)
        ]
    elif isinstance(trigger, Trigger):
        triggers = [trigger] + [copy.deepcopy(trigger) for _ in range(switches - 1)]
    elif isinstance(trigger, Sequence) and not isinstance(trigger, (str, bytes)):
        if len(trigger) != switches:
            raise ValueError(
                f"SwitchingLoss: {num_stages} stages need {switches} trigger"
                f"{'s' if switches != 1 else ''} (one per switch); got {len(trigger)}"
            )
        triggers = []
        for item in trigger:
            if isinstance(item, Trigger):
                if any(item is t for t in triggers):
                    raise ValueError("SwitchingLoss: the same trigger object is used twice; "
                                     "pass one trigger object per switch")
                triggers.append(item)
            elif isinstance(item, Integral) and not isinstance(item, bool):
                if item < 1:
                    raise ValueError(f"SwitchingLoss: trigger[{len(triggers)}] must be >= 1 (an "
                                     f"int is a milestone); got {item}")
                triggers.append(Milestone(int(item)))
            else:
                raise TypeError(
                    f"SwitchingLoss: a trigger must be a Trigger or an int milestone; got "
                    f"{type(item).__name__} {item!r}"
                )
    else:
        raise TypeError(
            f"SwitchingLoss: trigger must be a Trigger or a list of them; got "
            f"{type(trigger).__name__}"
        )
    _check_milestone_order(triggers)
    return triggers
