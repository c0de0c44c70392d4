"""Where a warning points: at the user's line that called into dynloss."""

from __future__ import annotations

import os
import sys
from types import FrameType

import torch

__all__ = ["caller_stacklevel"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` in the function that calls this one: that of
    the first frame outside dynloss and torch (the user's call)."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE, _TORCH)):
        frame, level = frame.f_back, level + 1
    return level
