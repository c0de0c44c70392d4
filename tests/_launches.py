"""Count what one loss call launches: Triton kernels plus aten compute operations.

Views and empty allocations launch nothing on a GPU, so they are not counted; everything
else an operation dispatches (a fill, a reduction, an elementwise op, a copy) is one launch.
Triton launches are counted by wrapping the ``run`` method of the kernels' class (the JIT on
a GPU, ``InterpretedFunction`` under ``TRITON_INTERPRET=1``); what the interpreter does
inside a launch (copies to and from numpy) is not counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty",
                         "new_empty_strided"})
"""Allocations: no kernel (unlike ``zeros``/``ones``/``full``, which fill)."""


class LaunchCounter(TorchDispatchMode):
    """Records every aten operation that launches work, and every Triton launch."""

    active: ClassVar[list[LaunchCounter]] = []
    """The counters in use (innermost last)."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[str] = []
        self.paused = 0

    def __enter__(self):
        LaunchCounter.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        LaunchCounter.active.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not func.is_view:
            name = func.overloadpacket.__name__
            if name not in ALLOCATIONS:
                self.launches.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


@contextlib.contextmanager
def counting_triton(counter: LaunchCounter, kernel_class: type) -> Iterator[None]:
    """Count the launches of every kernel of ``kernel_class`` (and nothing inside them)."""
    original = kernel_class.run

    def run(self, *args, **kwargs):
        counter.launches.append(f"triton.{self.fn.__name__}")
        with counter.pause():
            return original(self, *args, **kwargs)

    kernel_class.run = run
    try:
        yield
    finally:
        kernel_class.run = original


def not_counted(function: Callable) -> Callable:
    """``function``, with the operations it runs left out of every active count."""

    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for counter in LaunchCounter.active:
                stack.enter_context(counter.pause())
            return function(*args, **kwargs)

    return wrapper


def count_step(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               kernel_class: type) -> tuple[list[str], list[str]]:
    """``(forward launches, backward launches)`` of ``loss_fn(x).backward()``.

    The autograd seed (``ones_like`` of the loss) is made outside the count.
    """
    x = x.detach().clone().requires_grad_(True)
    counter = LaunchCounter()
    with counting_triton(counter, kernel_class), counter:
        loss = loss_fn(x)
    forward = list(counter.launches)
    seed = torch.ones_like(loss)
    counter.launches.clear()
    with counting_triton(counter, kernel_class), counter:
        loss.backward(seed)
    assert x.grad is not None
    return forward, list(counter.launches)

