"""Shared pieces of the schedules package: argument checks, ``repr`` and state checks."""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from numbers import Integral
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .._checks import check_non_negative
from .._recorder import recorder
from .._warn import caller_stacklevel
from ..constants import MULTICLASS_MODE
from ..distributed import check_metric, metric_value
from ..losses import SegmentationLoss

__all__ = ["call_repr", "check_count", "check_state", "check_weight", "state_int", "state_real"]


def set_last_terms(module: Any, terms: dict[str, Tensor], input: Tensor) -> None:
    """Keep a call's terms as ``module.last_terms``: nothing under a :mod:`torch.func`
    transform, whose values (batched under ``vmap``) must not leave it (kept, they broke
    every later use: "tensor may have escaped from inside a function being vmapped"); left
    as it was under ``torch.export``, whose program could not update it (torch warned of a
    tensor attribute assigned during export)."""
    if torch.compiler.is_exporting():
        return
    module.last_terms = {} if recorder(input) == "torch.func" else terms


def term_value(owner: str, part: str, loss: object, value: object) -> Tensor:
    """``value``, what the term or stage ``part`` (e.g. ``"term 'dice'"``) returned, if it is
    a tensor; a TypeError naming the part otherwise (an AttributeError from inside followed,
    which named no term)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{owner}: {part} ({type(loss).__name__}) returned "
                        f"{type(value).__name__}, not a tensor: a loss must return its value as "
                        "a tensor")
    return value


def check_count(name: str, value: object, minimum: int = 0) -> int:
    """An integer counter argument (epochs or steps) >= ``minimum``, as an ``int`` (numpy's
    integers too; not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def check_weight(name: str, value: object) -> float:
    """A finite weight >= 0."""
    return check_non_negative(name, value)


def call_repr(obj: object, order: list[str] | None = None) -> str:
    """``Name(arg=value, ...)`` listing the constructor arguments that differ from their default.

    Arguments without a default are always listed. The values are read from the attributes of
    the same name, so the result is valid Python and a valid :func:`dynloss.build_loss` spec.
    A class without an ``__init__`` of its own (``object.__init__``'s ``*args, **kwargs``) has
    no arguments to list; an argument not stored under its own name is written as a mark
    (``<not stored as .name>``) that ``build_loss`` refuses: a ``repr`` that raised would break
    ``print(loss)`` and every log line.
    """
    parameters = inspect.signature(type(obj).__init__).parameters
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = order or [name for name, parameter in parameters.items()
                      if name != "self" and parameter.kind in named]
    parts = []
    for name in names:
        if not hasattr(obj, name):
            parts.append(f"{name}=<not stored as .{name}>")
            continue
        value = getattr(obj, name)
        default = parameters[name].default
        if (
            default is inspect.Parameter.empty
            or value != default
            or type(value) is not type(default)
        ):
            parts.append(f"{name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


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


def check_state(owner: str, state: object, keys: set[str]) -> Mapping[str, Any]:
    """Check that ``state`` is a mapping with exactly ``keys``; a clear ValueError otherwise.

    Loading a state is validate-then-assign: every ``load_state_dict`` of the schedules
    package checks the whole state (keys with this function, values with :func:`state_int`
    and :func:`state_real`) before it changes anything, so a failed load changes nothing.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{owner}: a state must be a dict; got {type(state).__name__}")
    if set(state) != keys:
        missing = sorted(keys - set(state))
        unexpected = sorted(set(state) - keys)
        raise ValueError(
            f"{owner}: the state does not fit (missing keys {missing}, unexpected keys "
            f"{unexpected}); was it saved from a different object?"
        )
    return state


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:47]}...({len(text)} chars)"


def state_int(owner: str, key: str, value: object, minimum: int = 0) -> int:
    """An int >= ``minimum`` read from a saved state (not a bool).

    Raises:
        ValueError: naming ``key`` (a wrong type in a state is bad data, not a programming
            error, so it is a ValueError, like every other problem with a state).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: invalid {key} in the state: {key} must be an int; got "
                         f"{type(value).__name__} {_shown(value)}")
    if value < minimum:
        raise ValueError(f"{owner}: invalid {key} in the state: {key} must be >= {minimum}; got "
                         f"{value}")
    return value


def state_real(owner: str, key: str, value: object) -> float:
    """Any real number (int or float, not bool; inf and NaN included) read from a saved state.

    Raises:
        ValueError: naming ``key``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}: invalid {key} in the state: {key} must be a number; got "
                         f"{type(value).__name__} {_shown(value)}")
    try:
        return float(value)
    except OverflowError as err:
        raise ValueError(f"{owner}: invalid {key} in the state: {key} is too large for a "
                         "float") from err


def default_name(loss: object) -> str:
    """Short name of a loss for logging: its spec name (``"dice"``) or its class name."""
    name = getattr(type(loss), "name", None)
    if isinstance(name, str) and name:
        return name
    return type(loss).__name__.lower()


def named_losses(owner: str, losses: object, minimum: int = 1
                 ) -> tuple[list[str], list[Any], bool]:
    """Names and modules from a sequence or a ``{name: module}`` mapping of at least
    ``minimum`` losses: 1 (a composite's terms) or 2 (a switching loss's stages).

    Returns ``(names, modules, explicit)``; ``explicit`` is True for a mapping. Names of a
    sequence are the losses' short names, made unique with a ``_2``, ``_3``... suffix.
    """
    from torch import nn

    if isinstance(losses, nn.Module):
        raise TypeError(f"{owner}: losses must be a sequence or a mapping of losses; got one "
                        f"{type(losses).__name__} (wrap it in a list)")
    if isinstance(losses, Mapping):
        names, modules = list(losses.keys()), list(losses.values())
        explicit = True
        for name in names:
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"{owner}: loss names must be non-empty strings without '.'; "
                                 f"got {name!r}")
    elif isinstance(losses, (list, tuple)):
        modules = list(losses)
        names = []
        seen: dict[str, int] = {}  # occurrences of each short name so far
        for module in modules:
            base = default_name(module)
            seen[base] = seen.get(base, 0) + 1
            names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
        explicit = False
    else:
        raise TypeError(f"{owner}: losses must be a list or a dict of losses; got "
                        f"{type(losses).__name__}")
    if len(modules) < minimum:
        raise ValueError(f"{owner}: needs at least one loss" if minimum == 1 else
                         f"{owner}: needs at least two stages; got {len(modules)} (use the "
                         "loss itself, or a CompositeLoss, for one)")
    for name, module in zip(names, modules, strict=True):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{owner}: loss {name!r} must be an nn.Module (e.g. DiceLoss()); "
                            f"got {type(module).__name__}")
    if len(set(names)) != len(names):
        raise ValueError(f"{owner}: loss names must be unique; got {names}")
    taken = nn.ModuleDict()  # the losses are kept in one, whose attributes no key may shadow
    for name in names:
        if hasattr(taken, name):
            raise ValueError(f"{owner}: a loss cannot be named {name!r}, the name of an "
                             "attribute of torch.nn.ModuleDict (which holds the losses); "
                             "choose another name")
    return names, modules, explicit


_REPR = threading.local()
"""``scope``: the :class:`_ReprScope` of the repr in progress in this thread (None between)."""


class _ReprScope:
    """The module paths of every module under ``owner`` (the outermost loss being written;
    for a module reached by several paths, the first in ``named_modules`` order: any of them
    finds it) and the ids of the stateful losses written so far."""

    def __init__(self, owner: nn.Module) -> None:
        self.paths: dict[int, str] = {}
        # each module once, at its first path (pre-order: a shared module's descendants are
        # reached under its first occurrence); every path through shared subtrees would be
        # exponential in the depth of the sharing
        for path, module in owner.named_modules():
            self.paths[id(module)] = path
        self.written: set[int] = set()


def holds_schedule_state(module: object) -> bool:
    """Whether ``module`` carries schedule state that a copy would not share: a SwitchingLoss
    (its stage and counters), a CompositeLoss with a scheduled weight (its count)."""
    holds = getattr(module, "_dynloss_holds_state", None)
    return bool(holds()) if callable(holds) else False


def losses_repr(owner: nn.Module, names: list[str], modules: list[Any], explicit: bool) -> str:
    """The ``losses`` argument of ``owner`` as it was given: a list, or a dict for explicit
    names.

    A loss that holds schedule state and was written before in the same repr (one object
    shared by two stages or terms, as in "stage 1 = stage 0 + a term") is written
    ``shared('<its module path>')``: a spec builds each occurrence anew, so it cannot express
    the sharing, and :func:`~dynloss.build_loss` refuses the mark (``eval`` too: ``shared`` is
    no name). Paths are taken from the outermost loss being written; a loss outside its tree
    (written by a custom module's repr, say) is written on its own."""
    outer = getattr(_REPR, "scope", None)
    fresh = outer is None or id(owner) not in outer.paths
    scope: _ReprScope = _ReprScope(owner) if fresh or outer is None else outer
    _REPR.scope = scope
    try:
        written = []
        for module in modules:
            if holds_schedule_state(module):
                if id(module) in scope.written:
                    written.append(f"shared({scope.paths[id(module)]!r})")
                    continue
                scope.written.add(id(module))
            written.append(repr(module))
    finally:
        _REPR.scope = outer
    if explicit:
        return "{" + ", ".join(f"{n!r}: {w}" for n, w in zip(names, written, strict=True)) + "}"
    return "[" + ", ".join(written) + "]"


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


def _target_kinds(module: object) -> dict[str, str]:
    """``{kind of target: mode}`` of the dynloss losses ``module`` calls with its own input and
    target: itself, or the terms and stages of a CompositeLoss / SwitchingLoss, recursively.
    Multiclass losses take class indices, binary and multilabel ones targets of the input's
    shape. A loss held by a module of the user's is not counted: what the user's module
    passes it (a one-hot encoded target, say) is the user's."""
    kinds: dict[str, str] = {}
    for part in stepped_losses(module):
        if isinstance(part, SegmentationLoss):
            kind = ("class-index targets" if part.mode == MULTICLASS_MODE
                    else "targets of the input's shape")
            kinds.setdefault(kind, part.mode)
    return kinds


def check_same_targets(part: str, names: list[str], modules: list[Any]) -> None:
    """Every ``part`` (``"stage"``, ``"term"``) is called with the same input and target, so
    multiclass losses and binary/multilabel ones cannot be mixed: refuse them when built
    rather than at the first call (or at the switch, hours into training)."""
    first: tuple[str, str, str] | None = None  # (name, kind, mode) of the first typed part
    for name, module in zip(names, modules, strict=True):
        kinds = _target_kinds(module)
        for kind, mode in kinds.items():
            if first is None:
                first = (name, kind, mode)
            elif kind != first[1]:
                raise ValueError(
                    f"losses: {part} {name!r} takes {kind} (mode={mode!r}) but {part} "
                    f"{first[0]!r} takes {first[1]} (mode={first[2]!r}); every {part} is "
                    f"called with the same input and target (binary and multilabel {part}s may "
                    "be mixed)"
                )


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


def dry_run_load(target: Any, saved: Any) -> None:
    """``target.load_state_dict(saved)`` on a deep copy of ``target`` (a weight schedule or a
    trigger), to find a bad state before anything changes. Skipped where deep-copy refuses
    ``target`` (a lock, a tensor that is not a graph leaf): the tree it is in cannot be copied
    either, so :func:`load_all_or_nothing` loads it in place and puts back what a failed load
    changed."""
    try:
        probe = copy.deepcopy(target)
    except Exception:
        return
    probe.load_state_dict(saved)


def load_parts(parts: list[tuple[str, Any, Any]]) -> None:
    """``target.load_state_dict(saved)`` for each ``(where, target, saved)`` (a loss's triggers
    or weight schedules), in order. When one fails, those before it and itself get back the
    state they had, so that a failure changes none of them; its error is re-raised as by
    :func:`state_error`. (:func:`dry_run_load` has found a bad state before wherever a part can
    be copied; a parent module's ``load_state_dict`` reaches ``set_extra_state`` without the
    rollback of :func:`load_all_or_nothing`.)"""
    loaded: list[tuple[Any, Any]] = []
    try:
        for where, target, saved in parts:
            loaded.append((target, target.state_dict()))
            with state_error(where):
                target.load_state_dict(saved)
    except BaseException:
        for target, before in reversed(loaded):
            with contextlib.suppress(Exception):  # (a part that refuses its own state: the
                target.load_state_dict(before)    # others are still put back)
        raise


@contextlib.contextmanager
def state_error(where: str) -> Iterator[None]:
    """Re-raise a ``TypeError``/``ValueError`` of loading a part's state as a ``ValueError``
    that names the part (``where``)."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def load_all_or_nothing(module: nn.Module, state_dict: Mapping[str, Any], strict: bool,
                        assign: bool) -> Any:
    """``nn.Module.load_state_dict`` of a CompositeLoss / SwitchingLoss that changes nothing
    when it fails: torch loads a module before its children, so a nested loss's bad state (or
    a key only the other loss has) was found after the parent had taken its own. The state is
    first loaded into a copy (callbacks are shared, not copied: they may hold an optimizer). A
    tree that cannot be copied (a loss holding a lock, a process group, a kept graph) is loaded
    in place instead, and what the load changed is put back on a failure (see
    :func:`_load_in_place`)."""
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for callback in getattr(sub, "_callbacks", ()):
            memo[id(callback)] = callback
    try:
        trial = copy.deepcopy(module, memo)
    except Exception:
        return _load_in_place(module, state_dict, strict, assign)
    nn.Module.load_state_dict(trial, state_dict, strict=strict, assign=assign)
    return nn.Module.load_state_dict(module, state_dict, strict=strict, assign=assign)


def _load_in_place(module: nn.Module, state_dict: Mapping[str, Any], strict: bool,
                   assign: bool) -> Any:
    """Load, and on a failure put back what a load can change: every module's parameter and
    buffer objects (``assign=True`` replaces them), the values of those written in place (and
    only those: a tensor a pending backward saved keeps its version), every extra state, and
    the plain attributes of the schedules' own modules (``set_extra_state`` resets
    ``just_switched``). A custom ``_load_from_state_dict`` that changes other attributes is
    not covered."""
    kept = [_kept_state(sub) for sub in module.modules()]
    try:
        return nn.Module.load_state_dict(module, state_dict, strict=strict, assign=assign)
    except BaseException:
        for entry in reversed(kept):
            _put_back(*entry)
        raise


_NO_EXTRA_STATE = object()
_PLAIN = (bool, int, float, str, list, tuple, type(None))


def _kept_state(module: nn.Module) -> tuple:
    tensors = {name: t for name, t in {**module._parameters, **module._buffers}.items()
               if t is not None and not is_lazy(t)}
    with torch.no_grad():
        values = {name: (t._version, t.detach().clone()) for name, t in tensors.items()}
    extra: object = _NO_EXTRA_STATE
    if type(module).get_extra_state is not nn.Module.get_extra_state:
        extra = module.get_extra_state()
        try:  # a module may return its own state and update it in place
            extra = copy.deepcopy(extra)
        except Exception:
            pass
    attributes = ({name: copy.copy(value) for name, value in vars(module).items()
                   if isinstance(value, _PLAIN)}
                  if hasattr(module, "_dynloss_step") else {})
    return module, dict(module._parameters), dict(module._buffers), values, extra, attributes


def _put_back(module: nn.Module, parameters: dict, buffers: dict, values: dict,
              extra: object, attributes: dict) -> None:
    module._parameters.clear()
    module._parameters.update(parameters)
    module._buffers.clear()
    module._buffers.update(buffers)
    with torch.no_grad():
        for name, (version, value) in values.items():
            tensor = parameters.get(name)
            tensor = tensor if tensor is not None else buffers[name]
            if tensor._version != version:  # written by the failed load
                tensor.copy_(value)
    if extra is not _NO_EXTRA_STATE and not _equal(module.get_extra_state(), extra):
        module.set_extra_state(extra)  # (only where the failed load changed it)
    module.__dict__.update(attributes)


def _equal(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors in a custom extra state: put it back
        return False
