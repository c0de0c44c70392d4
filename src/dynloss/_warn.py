"""Where a warning points: at the user's line that called into dynloss."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

import torch

__all__ = ["caller_stacklevel", "constant_in_graphs", "warn_at_caller"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_SKIPPED = (_PACKAGE, _TORCH, "<frozen importlib", os.path.dirname(importlib.__file__))
"""dynloss, torch, and the import machinery (a warning at import points at the import, also
through ``importlib.import_module``)."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` in the function that calls this one: that of
    the first frame outside dynloss, torch and the import machinery (the user's call, or the
    user's ``import`` for a warning while dynloss is imported)."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
        if frame is not None and not _import_machinery(frame.f_code.co_filename):
            level += 1  # (warnings.warn does not count the import machinery's frames)
    return level


def _import_machinery(filename: str) -> bool:
    return "importlib" in filename and "_bootstrap" in filename


_F = TypeVar("_F", bound=Callable[..., Any])


def constant_in_graphs(fn: _F) -> _F:
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (which
    imports Triton: about a second at ``import dynloss``): the same mark on ``fn``, which
    torch.compile reads when it traces a call of ``fn`` (it then runs ``fn`` once, for real,
    and takes its result as a constant). tests/test_compile.py checks that torch's decorator
    sets exactly this mark."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@constant_in_graphs
def warn_at_caller(message: str) -> bool:
    """``warnings.warn(message, RuntimeWarning)`` at the user's line (:func:`caller_stacklevel`),
    also while ``torch.compile`` or a strict ``torch.export`` traces the caller: there it runs
    once, as the graph is traced, a constant to the graph (a plain ``warnings.warn`` breaks a
    ``fullgraph`` compile and is dropped by strict export). Returns True."""
    warnings.warn(message, RuntimeWarning, stacklevel=caller_stacklevel())
    return True
