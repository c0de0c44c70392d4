"""The one place that knows the backends: each declares what it can do, dispatch picks one.

Four backends compute every loss (see :mod:`dynloss.kernels`): ``"reference"`` (plain
autograd over :mod:`dynloss._math`), ``"torch"`` (eager autograd Functions with an analytic
backward), ``"native"`` (C++ kernels compiled at first use, CPU) and ``"triton"`` (Triton
kernels, CUDA; CPU under ``TRITON_INTERPRET=1``). Each declares its
:class:`Capabilities`; :func:`select` looks at what a call needs (:class:`Need`: the op, TopK,
``reduction="none"``, DDP pooling, a gradient for the target, whether ``torch.compile``,
``torch.jit.trace``, a :mod:`torch.func` transform or forward-mode AD records the call) and at
the tensor (device, dtype, number of classes), and returns the first backend in the device's
order of speed that can do all of it:

* ``backend="auto"``: CUDA: triton, torch, reference; CPU: native, torch, reference (native
  passed over for rows of fewer than 16 pixels whose sums are kept per row: its
  ``min_row_length``, and inside ``torch.compile`` where the compiler fuses the reference
  as fast or faster: binary and multilabel Dice/IoU/Tversky at any size, multiclass ones
  below 2**16 input elements, binary and multilabel BCE below 2**18 and Focal below 2**16,
  its ``in_graphs_from``); any other device: torch, reference.
* ``backend="native"`` / ``"triton"`` / ``"torch"``: that backend when it covers the call;
  when it can run here but not this call (float64 input on Triton, a target that needs a
  gradient, ...) the next capable one of the ``"auto"`` order, with a warning,
  once, naming what is missing; when it cannot run on this tensor at all (no compiler, no
  GPU, Triton not installed) a ``ValueError`` saying why.
* ``backend="reference"``: always the reference.

A backend that cannot do something simply does not claim it: a new loss written only in
:mod:`dynloss._math` and :mod:`dynloss.functional` runs on the reference everywhere, with no
kernel change. Every backend's backward is itself differentiable (``create_graph=True``):
the kernels' backward recomputes the gradient through the reference maths then.

>>> import torch
>>> from dynloss.kernels.dispatch import Need, select
>>> x = torch.zeros(2, 1, 4, 4, device="meta")  # a device without kernels
>>> select("auto", x, Need("region")).name
'torch'
>>> select("auto", x, Need("region"), target_grad=True).name
'reference'
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._recorder import recorder
from .._warn import constant_in_graphs, warn_at_caller
from .capabilities import Backend, Capabilities, Need, row_length
from .native import NATIVE
from .reference import REFERENCE
from .torch_backend import TORCH
from .triton import TRITON

__all__ = ["REGISTRY", "Backend", "Capabilities", "Need", "clear_cache", "select", "warn_once"]

REGISTRY: dict[str, Backend] = {
    "reference": REFERENCE,
    "torch": TORCH,
    "native": NATIVE,
    "triton": TRITON,
}
"""Every backend by the name that ``backend=`` takes."""

_AUTO_ORDER: dict[str, tuple[Backend, ...]] = {
    "cuda": (TRITON, TORCH, REFERENCE),
    "cpu": (NATIVE, TORCH, REFERENCE),
}
_OTHER_DEVICES: tuple[Backend, ...] = (TORCH, REFERENCE)

for _backend in REGISTRY.values():
    assert _backend.capabilities.double_backward, _backend.name  # every backward differentiable

_ROW_LIMITS = tuple(sorted({b.capabilities.max_rows for b in REGISTRY.values()
                            if b.capabilities.max_rows is not None}))
"""The backends' ``max_rows``: which of them a call passes is part of the cache key."""


_ROW_LENGTHS = tuple(sorted({b.capabilities.min_row_length for b in REGISTRY.values()
                              if b.capabilities.min_row_length is not None}))
"""The backends' ``min_row_length``: which of them a call's rows reach is part of the key."""


_CACHE: dict[tuple, Backend] = {}
_WARNED: set[str] = set()


@constant_in_graphs
def warn_once(key: str, message: str) -> bool:
    """``warnings.warn(message, RuntimeWarning)`` the first time ``key`` is seen in this
    process, pointing at the user's line that made the call; True if it was said now.

    Inside ``torch.compile`` it runs once, while the graph is traced (a constant to the graph:
    ``warnings.warn`` itself would break it)."""
    if key in _WARNED:
        return False
    _WARNED.add(key)
    return warn_at_caller(message)


def _covers(backend: Backend, x: Tensor, need: Need, target_grad: bool, tracing: str | None,
            classes: int) -> str | None:
    missing = backend.capabilities.missing(x, need, target_grad, tracing, classes)
    if missing is not None:
        return missing
    return backend.unavailable(x)


def _auto(x: Tensor, need: Need, target_grad: bool, tracing: str | None, classes: int) -> Backend:
    order = _AUTO_ORDER.get(x.device.type, _OTHER_DEVICES)
    for backend in order:
        if backend.capabilities.missing(x, need, target_grad, tracing, classes) is not None:
            continue
        if (backend.capabilities.short_rows(x, need, classes)
                or backend.capabilities.passed_over_in_graphs(x, need, tracing, classes)):
            continue  # a faster one follows (the reference covers every call)
        reason = backend.unavailable(x)
        if reason is None:
            return backend
        # the device's fastest kernels exist but cannot run: say so once (not when the user
        # turned them off)
        if backend is order[0] and not reason.startswith("disabled"):
            warn_once(f"auto:{backend.name}",
                      f"dynloss: backend='auto' cannot use the {backend.name} kernels "
                      f"({reason}); falling back to a slower backend")
    return REFERENCE


def _explicit(name: str, x: Tensor, need: Need, target_grad: bool, tracing: str | None,
              classes: int) -> Backend:
    backend = REGISTRY[name]
    reason = backend.unavailable(x)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run: {reason}; use backend='auto' or "
                         "'torch'")
    missing = backend.capabilities.missing(x, need, target_grad, tracing, classes)
    if missing is None:
        return backend
    order = _AUTO_ORDER.get(x.device.type, _OTHER_DEVICES)
    later = order[order.index(backend) + 1:] if backend in order else _OTHER_DEVICES
    passed_over = []  # why a faster backend after the named one was not taken, if not that
    for fallback in later:
        reason = _covers(fallback, x, need, target_grad, tracing, classes)
        if reason is None:
            break
        if reason != missing:
            passed_over.append(f"the {fallback.name!r} backend cannot compute {reason}")
    else:  # pragma: no cover - the reference covers every call
        fallback = REFERENCE
    why = f" ({'; '.join(passed_over)})" if passed_over else ""
    warn_once(f"{name}:{missing}:{fallback.name}:{why}",
              f"dynloss: backend={name!r} cannot compute {missing}; using the "
              f"{fallback.name!r} backend for such calls{why}")
    return fallback


def select(name: str, x: Tensor, need: Need, target_grad: bool = False,
           classes: int | None = None) -> Backend:
    """The backend that computes this call: ``name`` is the ``backend=`` argument.

    ``x`` is the input (its device and dtype count), ``target_grad``: the target requires a
    gradient, ``classes``: the number of channels ``C`` (default ``x.shape[1]``). Cached per
    (name, device, dtype, classes, need, target gradient, rows above a backend's
    ``max_rows``, rows shorter than its ``min_row_length``), so a call costs one dictionary
    look-up; inside ``torch.compile`` and for
    fake tensors only compilable backends are considered, under ``torch.jit.trace``, a
    :mod:`torch.func` transform or forward-mode AD only those that declare it (the
    reference).

    Raises:
        ValueError: ``name`` is ``"native"`` or ``"triton"`` and those kernels cannot run on
            ``x`` at all (why is in the message).
    """
    if classes is None:
        classes = x.shape[1] if x.dim() > 1 else 1
    tracing = recorder(x)
    target_grad = target_grad and torch.is_grad_enabled()
    if tracing is not None:
        if name == "auto":
            return _auto(x, need, target_grad, tracing, classes)
        return _explicit(name, x, need, target_grad, tracing, classes)
    rows = x.shape[0] * classes if x.dim() else 0
    length = row_length(x, classes)  # (as Capabilities.short_rows reads it)
    key = (name, x.device, x.dtype, classes, need, target_grad,
           tuple(rows > limit for limit in _ROW_LIMITS),
           tuple(length is not None and length < limit for limit in _ROW_LENGTHS))
    backend = _CACHE.get(key)
    if backend is None:
        if name == "auto":
            backend = _auto(x, need, target_grad, None, classes)
        else:
            backend = _explicit(name, x, need, target_grad, None, classes)
        _CACHE[key] = backend
    return backend


def clear_cache() -> None:
    """Forget the cached choices and the warnings said (tests). Not a way to take up a new
    ``DYNLOSS_NATIVE``: whether the native kernels load is decided once per process."""
    _CACHE.clear()
    _WARNED.clear()
