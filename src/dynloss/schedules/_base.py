"""Shared pieces of the schedules package: argument checks, the losses' names, ``repr``."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from numbers import Integral
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_non_negative
from .._recorder import recorder
from ..constants import MULTICLASS_MODE
from ..losses import SegmentationLoss
from ._steps import stepped_losses

__all__ = ["call_repr", "check_count", "check_weight"]


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
