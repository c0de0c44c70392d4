"""Stepping a tree of losses: each part stepped once per step, by the loss that holds it.

A ``step()`` of the outermost ``CompositeLoss`` / ``SwitchingLoss`` checks everything it would
refuse (:func:`top_level_step`), advances every nested loss, schedule and active trigger once
(:func:`step_child`, :func:`stepped_losses`, :func:`in_use`), and records how many times each
part has been stepped, so that a part stepped elsewhere (by a second live loss, or by hand) is
found (:func:`record_tree`, :func:`check_parts`).
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._warn import caller_stacklevel
from ..distributed import check_metric, metric_value

_TOKENS = itertools.count(1)

_STEPS: dict[int, list[int]] = {}
"""``[token, steps]`` by ``id`` of each part a loss steps (a weight schedule, a trigger, a nested
loss): how many times it was stepped while it lives; the entry goes when the part is
collected (the token tells a later object at the same address, or a copy's part, from it; a
part that takes no weak reference is not tracked). Only the losses' steps count: loading a
part's state is not a step."""


def per_object(registry: dict[int, Any], part: object, new: Callable[[], Any]) -> Any:
    """``registry``'s entry for ``part`` (by ``id``): made by ``new()`` the first time, and
    removed when ``part`` is collected (so a later object at its address gets its own); None
    for an object that takes no weak reference (it is not tracked)."""
    key = id(part)
    entry = registry.get(key)
    if entry is None:
        try:
            weakref.finalize(part, registry.pop, key, None)
        except TypeError:  # no weak reference
            return None
        entry = registry[key] = new()
    return entry


def _entry(part: object) -> list[int] | None:
    """:data:`_STEPS` of ``part``, tracked from now on (None: it cannot be)."""
    entry: list[int] | None = per_object(_STEPS, part, lambda: [next(_TOKENS), 0])
    return entry


def count_step(part: object) -> None:
    """``part`` is stepped: a schedule's ``step`` (counted by the schedule itself, so also by
    hand), a trigger's ``update`` or a nested loss's step (counted by the loss)."""
    entry = _entry(part)
    if entry is not None:
        entry[1] += 1


def warn_if_started(owner: str, parts: list[tuple[str, object]]) -> None:
    """Say so (``RuntimeWarning``) for each part (a weight schedule, a nested loss) that is
    not at count 0 when built into a new loss: it goes on from there (a sweep loop reusing one
    object for every run began each run where the last had left it)."""
    for label, part in parts:
        count = getattr(part, "count", 0)
        if count:
            advice = ("build a new one, or load a state, to begin at 0"
                      if hasattr(part, "_dynloss_children") else "a schedule is shared state: "
                      "pass a new one, or load_state_dict({'count': 0}), to begin at 0")
            warnings.warn(f"{owner}: {label} ({type(part).__name__}) is at count {count}, where "
                          f"another loss left it; this loss goes on from there ({advice})",
                          RuntimeWarning, stacklevel=caller_stacklevel())


def record(module: nn.Module, parts: list[tuple[str, object]]) -> None:
    """Record on ``module`` how many times a loss had stepped each part it steps (``(label,
    part)``), as :func:`record_tree` finds them (see :func:`check_parts`)."""
    module._recorded = []  # type: ignore[assignment]
    record_added(module, parts)


def record_added(module: nn.Module, parts: list[tuple[str, object]]) -> None:
    """:func:`record` for the parts ``module`` had not recorded (a schedule assigned by hand),
    keeping what it recorded of the others: a new record would excuse the steps they were
    given elsewhere since."""
    before = {id(part): (token, then)
              for _, part, token, then in getattr(module, "_recorded", ())}
    recorded = []
    for label, part in parts:
        if id(part) in before:
            recorded.append((label, part, *before[id(part)]))
            continue
        entry = _entry(part)
        if entry is not None:
            recorded.append((label, part, entry[0], entry[1]))
    module._recorded = recorded  # type: ignore[assignment]


def record_tree(root: object) -> None:
    """After ``root`` (a CompositeLoss / SwitchingLoss) was built or stepped, also by a step
    that raised half-way: every loss its steps reach records its parts as they are now, a
    switch its active trigger only while it is in use."""
    used = in_use(root)
    for loss in stepped_losses(root):
        if hasattr(loss, "_dynloss_record"):
            loss._dynloss_record(used)


def check_parts(owner: str, module: nn.Module, parts: list[tuple[str, object]]) -> None:
    """Raise if a part ``module`` steps (``parts``) was stepped elsewhere since
    :func:`record_tree` last recorded it: one object given to two live losses (one per output
    head) is stepped by each, and a schedule or nested loss stepped by hand runs ahead. Parts
    shared inside one loss are stepped once per step and recorded by every holder, so they
    agree; a copied loss's parts are new objects, checked once it has stepped."""
    held = {id(part) for _, part in parts}
    for label, part, token, then in getattr(module, "_recorded", ()):  # (pickled before 0.2)
        entry = _STEPS.get(id(part))
        if id(part) in held and entry is not None and entry[0] == token and entry[1] != then:
            raise ValueError(
                f"{owner}: {label} ({type(part).__name__}) was stepped elsewhere since this "
                f"loss was built or last stepped it ({entry[1] - then} more step(s)): by another "
                "live loss that holds it too, or by hand; give each loss its own and step only "
                "the outermost loss. The step was not taken"
            )


def step_child(module: object, metric: object, synced: bool, seen: set[int],
               used: Mapping[int, Any]) -> None:
    """Advance a nested CompositeLoss / SwitchingLoss (anything with ``_dynloss_step``) once
    per top-level step: ``seen`` holds the ids of the modules this step has advanced, so a
    loss shared by two stages or terms (stage 1 = stage 0 + a term) is not stepped twice.
    ``used``: the ids of the modules in use at this step (:func:`in_use` of the top-level
    loss); a SwitchingLoss that is not consults no trigger."""
    step = getattr(module, "_dynloss_step", None)
    if step is not None and id(module) not in seen:
        step(metric, synced, seen, used)


def stepped_losses(module: object) -> Iterator[Any]:
    """``module`` and every loss its step reaches through stages and terms (a loss held by a
    module of the user's is stepped by the user, not by the losses around it), each once."""
    seen: set[int] = set()
    stack = [module]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        children = getattr(current, "_dynloss_children", None)
        if children is not None:
            stack.extend(reversed(children()))


def in_use(module: object, found: dict[int, Any] | None = None) -> dict[int, Any]:
    """``{id: loss}`` of ``module`` and of the CompositeLoss / SwitchingLoss losses in use
    under it: every term of a composite and the active stage of a switching loss (not its
    other stages), recursively. Only the top-level loss's tree decides: a loss held in a stage
    that is not active but also a term of a composite above is in use."""
    found = {} if found is None else found
    walk = getattr(module, "_dynloss_in_use", None)
    if walk is not None and id(module) not in found:
        found[id(module)] = module
        walk(found)
    return found


def begin_unused(module: object, used: Mapping[int, Any]) -> None:
    """Tell each SwitchingLoss in use under ``module`` (the stage an enclosing SwitchingLoss
    has just switched to) that was not in use at this step (not in ``used``) that its stage
    has begun: it then starts its active trigger and its stage's length afresh. One in use
    before (in the stage left, or elsewhere in the tree) goes on as it was."""
    for loss_id, loss in in_use(module).items():
        begin = getattr(loss, "_dynloss_begin", None)
        if begin is not None and loss_id not in used:
            begin()


def top_level_step(module: Any, metric: object) -> Any:
    """``module.step(metric)`` (a CompositeLoss / SwitchingLoss): check everything the step
    would refuse before anything changes, take it, and record what it stepped, also when it
    raised half-way (a callback, a custom schedule: what moved, moved).

    Host bookkeeping (counters, records, a metric read as a number): inside a compiled
    function it runs eagerly, a graph break (tracing it crashed in dynamo, or recompiled the
    function at every step on the guards of its counters)."""
    if torch.compiler.is_compiling():
        return _eager(_take_step)(module, metric)
    return _take_step(module, metric)


_EAGER: dict[Any, Any] = {}


def _eager(function: Any) -> Any:
    """``torch.compiler.disable(function)``, made at the first use inside a compile: made at
    import it imported ``torch._dynamo`` (a second) for every user, compiling or not."""
    disabled = _EAGER.get(function)
    if disabled is None:
        disabled = _EAGER[function] = torch.compiler.disable(function)
    return disabled


def _take_step(module: Any, metric: object) -> Any:
    used = in_use(module)
    require_metric(module, metric)
    check_next_weights(module, used)
    try:
        return module._dynloss_step(metric, False, set(), used)
    finally:
        record_tree(module)


def check_next_weights(module: object, used: Mapping[int, Any]) -> None:
    """Raise the ``ValueError`` that the next step of ``module`` (a CompositeLoss /
    SwitchingLoss) would raise for a weight schedule's value (not finite, or negative: a
    custom ``value_at`` may break the contract), before the step changes anything, so that a
    failed step leaves every counter as it was. Visits what the step would advance: every
    nested loss and every schedule once; also what :func:`check_parts` finds (``used``: as in
    :func:`step_child`)."""
    active: dict[int, Any] = {}  # the triggers this step consults: each once
    for loss in stepped_losses(module):
        trigger = getattr(loss, "_dynloss_active_trigger", lambda used: None)(used)
        if trigger is not None and active.setdefault(id(trigger), loss) is not loss:
            raise ValueError(
                f"SwitchingLoss: one {type(trigger).__name__} object is the active trigger of "
                "two switches in use in this loss: each step would consult it twice; give "
                "each switch its own trigger. The step was not taken")
    check_next_weights_child(module, set(), used)


def check_next_weights_child(module: object, seen: set[int], used: Mapping[int, Any]) -> None:
    """:func:`check_next_weights` of a nested loss not visited yet (``seen``: ids of the
    losses and schedules visited, as in :func:`step_child`)."""
    check = getattr(module, "_dynloss_check_next_weights", None)
    if check is not None and id(module) not in seen:
        check(seen, used)


def metric_triggers(module: object) -> list:
    """The triggers that the next step of ``module`` (a CompositeLoss / SwitchingLoss, nested
    ones included) would ask for a monitored value: each SwitchingLoss's active one where it
    monitors a value."""
    triggers = getattr(module, "_metric_triggers", None)
    return list(triggers()) if triggers is not None else []


def reads_metric_later(module: object) -> bool:
    """Whether a trigger of ``module`` (a CompositeLoss / SwitchingLoss, nested ones
    included) reads a monitored value now or at a later step: one of a SwitchingLoss's active
    stage or of a stage after it."""
    later = getattr(module, "_dynloss_reads_metric_later", None)
    return bool(later()) if later is not None else False


def require_metric(module: object, metric: object) -> None:
    """Raise the ``ValueError`` a trigger raises without its metric, or for a metric that is
    not a real scalar, before a step changes anything (counters, weight schedules, nested
    losses), so that a caller that catches it and steps again gets one step, not two."""
    if metric is None:
        for trigger in metric_triggers(module):
            raise ValueError(
                f"{trigger!r} monitors a value: call step(metric=...) with the training loss or "
                "a validation metric"
            )
    else:  # checked before any change, also where no trigger reads it now (a name passed
        # for its value would show only once an adaptive stage starts)
        if isinstance(metric, Tensor):
            check_metric(metric)  # (no host read of a device tensor here)
        else:
            metric_value(metric)  # a Python number: also within the float range
