"""Loading a saved state of the schedules package: checked first, all or nothing.

Every ``load_state_dict`` of a weight schedule, a trigger, a ``CompositeLoss`` or a
``SwitchingLoss`` validates the whole state (keys with :func:`check_state`, values with
:func:`state_int` and :func:`state_real`) before it assigns anything; a loss's parts are tried
on copies first (:func:`dry_run_load`), and a loss's tree is loaded into a copy of itself
(:func:`load_all_or_nothing`), so that a failed load changes nothing.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy


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
