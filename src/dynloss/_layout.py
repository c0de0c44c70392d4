"""Shape, dtype and (optionally) value checks, and the canonical ``(N, C, M)`` layout.

Every loss flattens the spatial dimensions: the input becomes ``x`` of shape ``(N, C, M)``
(``C == 1`` in binary mode) and the target either ``(N, C, M)`` (binary, multilabel) or
``(N, M)`` class indices (multiclass). Shape and dtype checks read only metadata, so they
never synchronise with a device. Value checks (target range, probabilities in [0, 1]) need the
data; they run when ``check_values`` is True, and by default (``None``) only for CPU tensors,
where reading a value costs no device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .constants import BINARY_MODE, MULTICLASS_MODE, MULTILABEL_MODE


@dataclass(frozen=True)
class Layout:
    """Input and target in the canonical layout, plus what is needed to undo it."""

    x: Tensor
    """``(N, C, M)`` logits or probabilities, in the caller's dtype."""
    target: Tensor
    """``(N, C, M)`` for binary/multilabel, ``(N, M)`` integer class indices for multiclass."""
    mode: str
    elementwise_shape: torch.Size
    """Shape of the per-element loss that ``reduction="none"`` returns for BCE/Focal/TopK."""
    deferred_value_check: bool = False
    """Value checks are due but were left to the kernel's forward pass (the native backend)."""

    @property
    def num_classes(self) -> int:
        return self.x.shape[1]


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensors(input: object, target: object) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor; got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor; got {type(target).__name__}")
    if not input.is_floating_point():
        raise TypeError(
            f"input must be a floating-point tensor of logits or probabilities; got {input.dtype}"
        )
    if target.is_complex():
        raise TypeError(
            f"target must be a real (float, integer or bool) tensor; got {target.dtype}"
        )
    if input.device != target.device:
        raise ValueError(
            f"input and target must be on the same device; got {input.device} and {target.device}"
        )


def _binary_layout(input: Tensor, target: Tensor) -> Layout:
    if input.dim() < 2:
        raise ValueError(
            f"input must have shape (N, 1, *spatial) or (N, *spatial) in mode='binary'; "
            f"got {_shape(input)}"
        )
    n = input.shape[0]
    same = target.shape == input.shape
    without_channel = input.shape[:1] + input.shape[2:]
    no_channel = input.dim() >= 3 and input.shape[1] == 1 and target.shape == without_channel
    if not (same or no_channel):
        hint = ""
        if input.dim() >= 3 and input.shape[1] > 1 and target.shape == without_channel:
            hint = (
                f"; the input has {input.shape[1]} channels but mode='binary' needs 1 channel: "
                "use mode='multiclass' for class-index targets or mode='multilabel'"
            )
        raise ValueError(
            f"target shape {_shape(target)} does not match input shape {_shape(input)}: in "
            "mode='binary' the target must have the input's shape, or the input's shape without "
            f"its channel dimension of size 1{hint}"
        )
    return Layout(
        x=input.reshape(n, 1, -1),
        target=target.reshape(n, 1, -1),
        mode=BINARY_MODE,
        elementwise_shape=input.shape,
    )


def _multilabel_layout(input: Tensor, target: Tensor) -> Layout:
    if input.dim() < 2:
        raise ValueError(
            f"input must have shape (N, C, *spatial) in mode='multilabel'; got {_shape(input)}"
        )
    if target.shape != input.shape:
        raise ValueError(
            f"target shape {_shape(target)} does not match input shape {_shape(input)}: in "
            "mode='multilabel' the target must have the input's shape (N, C, *spatial)"
        )
    n, c = input.shape[:2]
    return Layout(
        x=input.reshape(n, c, -1),
        target=target.reshape(n, c, -1),
        mode=MULTILABEL_MODE,
        elementwise_shape=input.shape,
    )


def _multiclass_layout(input: Tensor, target: Tensor) -> Layout:
    if input.dim() < 2:
        raise ValueError(
            f"input must have shape (N, C, *spatial) in mode='multiclass'; got {_shape(input)}"
        )
    n, c = input.shape[:2]
    if c < 2:
        raise ValueError(
            f"mode='multiclass' needs an input with C >= 2 channels; got C={c} in input shape "
            f"{_shape(input)} (use mode='binary' for one foreground channel)"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(
            "target must be an integer tensor of class indices in mode='multiclass'; got "
            f"{target.dtype} (convert a one-hot or probability target with .argmax(1))"
        )
    expected = input.shape[:1] + input.shape[2:]
    if target.shape != expected:
        hint = ""
        if target.shape == input.shape:
            hint = "; it has the input's shape, which looks one-hot: pass target.argmax(1)"
        raise ValueError(
            f"target shape {_shape(target)} does not fit input shape {_shape(input)}: in "
            f"mode='multiclass' the target must hold class indices of shape (N, *spatial) = "
            f"({', '.join(str(s) for s in expected)}){hint}"
        )
    return Layout(
        x=input.reshape(n, c, -1),
        target=target.reshape(n, -1),
        mode=MULTICLASS_MODE,
        elementwise_shape=expected,
    )


_LAYOUTS = {
    BINARY_MODE: _binary_layout,
    MULTILABEL_MODE: _multilabel_layout,
    MULTICLASS_MODE: _multiclass_layout,
}


def should_check_values(check_values: bool | None, input: Tensor) -> bool:
    """``None`` means: check where it is free (CPU tensors), skip on accelerators."""
    if check_values is None:
        return input.device.type == "cpu"
    return check_values


def _check_target_values(layout: Layout, ignore_index: int | None) -> None:
    target = layout.target
    if target.numel() == 0 or target.dtype == torch.bool:
        return
    kept = target if ignore_index is None else target[target != ignore_index]
    if kept.numel() == 0:
        return
    lo, hi = torch.aminmax(kept)
    lo_v, hi_v = lo.item(), hi.item()
    if layout.mode == MULTICLASS_MODE:
        c = layout.num_classes
        if lo_v < 0 or hi_v >= c:
            also = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
            raise ValueError(
                f"target class indices must lie in [0, {c}) for an input with C={c} "
                f"channels{also}; got values from {lo_v} to {hi_v}"
            )
    elif not (0 <= lo_v and hi_v <= 1):  # also catches NaN
        also = (
            "" if ignore_index is None else f" (pixels equal to ignore_index={ignore_index} aside)"
        )
        raise ValueError(
            f"target values must lie in [0, 1] in mode={layout.mode!r}{also}; got values from "
            f"{lo_v} to {hi_v}"
        )


def _check_probabilities(layout: Layout) -> None:
    x = layout.x
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    lo_v, hi_v = lo.item(), hi.item()
    if not (0 <= lo_v and hi_v <= 1):
        raise ValueError(
            "input must hold probabilities in [0, 1] when from_logits=False; got values from "
            f"{lo_v} to {hi_v} (pass from_logits=True for logits)"
        )


def prepare(
    input: Tensor,
    target: Tensor,
    mode: str,
    *,
    from_logits: bool,
    ignore_index: int | None,
    check_values: bool | None,
    defer_value_checks: bool = False,
) -> Layout:
    """Check ``input``/``target`` and return them in the canonical layout.

    With ``defer_value_checks`` (for kernels that check values in their own forward pass) due
    value checks are not run here but flagged in :attr:`Layout.deferred_value_check`.
    """
    _check_tensors(input, target)
    layout = _LAYOUTS[mode](input, target)
    if should_check_values(check_values, input):
        if defer_value_checks:
            return replace(layout, deferred_value_check=True)
        _check_target_values(layout, ignore_index)
        if not from_logits:
            _check_probabilities(layout)
    return layout


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums and per-element losses are computed in float32 at least (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
