"""Shape, dtype and value checks, and the canonical ``(N, C, M)`` layout.

Every loss flattens the spatial dimensions: the input becomes ``x`` of shape ``(N, C, M)``
(``C == 1`` in binary mode) and the target either ``(N, C, M)`` (binary, multilabel) or
``(N, M)`` class indices (multiclass). Shape and dtype checks read only metadata, so they
never synchronise with a device.

Value checks (target range, probabilities in [0, 1]) need the data. They take one of two
forms:

* **eager** (:func:`check_values`): read the extremes on the host and raise a ``ValueError``
  naming the bad values. This runs when ``check_values`` is True, and by default (``None``)
  for CPU tensors, where reading a value costs no device synchronisation;
* **in the graph** (:func:`invalid_values`): a 0-dim bool tensor, True when a kept target is
  out of range (or a probability outside [0, 1]); the loss is then multiplied by NaN. This
  runs whenever the eager check does not (``check_values=False``, CUDA tensors by default,
  inside ``torch.compile`` and the :mod:`torch.func` transforms), so an invalid target never
  gives a finite, wrong loss and nothing waits for the device.

Multiclass class indices outside ``[0, C)`` are an error on the CPU even with
``check_values=False`` (:func:`check_class_indices`; reading them costs no synchronisation
there, and an index must never address memory out of its range); on other devices, inside
``torch.compile`` and the :mod:`torch.func` transforms they follow the rule above.

The same tensor also flags a non-finite kept input (NaN or ±inf logits): the loss is then NaN
on every backend, so a diverging run never looks like it is improving.

>>> import torch
>>> from dynloss._layout import prepare
>>> layout = prepare(torch.zeros(2, 1, 4, 4), torch.ones(2, 4, 4), "binary")
>>> tuple(layout.x.shape), tuple(layout.target.shape), layout.num_classes
((2, 1, 16), (2, 1, 16), 1)
"""

from __future__ import annotations

import math
import struct

import torch
from torch import Tensor

from ._recorder import checked_in_graph
from .constants import BINARY_MODE, MULTICLASS_MODE, MULTILABEL_MODE

__all__ = ["Layout", "check_class_indices", "check_values", "compute_dtype", "ignore_index_for",
           "invalid_elements", "invalid_values", "prepare", "should_check_values",
           "target_can_equal"]


class Layout:
    """Input and target in the canonical layout, plus what is needed to undo it.

    ``x`` and ``target`` are views of the caller's ``input`` and target, reshaped when first
    read: a backend that only needs the data pointers and ``dims`` (the native kernels) never
    pays for the views, and its gradient keeps the input's shape.
    """

    __slots__ = ("_target", "_x", "dims", "elementwise_shape", "input", "mode", "target_dims",
                 "target_input")
    _x: Tensor | None
    _target: Tensor | None

    def __init__(self, x: Tensor, target: Tensor, mode: str, elementwise_shape: torch.Size
                 ) -> None:
        self.input = self._x = x
        self.target_input = self._target = target
        self.dims: tuple[int, ...] = tuple(x.shape)
        self.target_dims: tuple[int, ...] = tuple(target.shape)
        self.mode = mode
        self.elementwise_shape = elementwise_shape
        """Shape of the per-element loss that ``reduction="none"`` returns for BCE/Focal/TopK."""

    @classmethod
    def of(cls, input: Tensor, target: Tensor, mode: str, dims: tuple[int, ...],
           target_dims: tuple[int, ...], elementwise_shape: torch.Size) -> Layout:
        """The layout of the caller's tensors, reshaped to ``dims`` / ``target_dims`` when
        :attr:`x` / :attr:`target` are first read."""
        layout = cls.__new__(cls)
        layout.input, layout.target_input = input, target
        layout._x = layout._target = None
        layout.dims, layout.target_dims = dims, target_dims
        layout.mode, layout.elementwise_shape = mode, elementwise_shape
        return layout

    @property
    def x(self) -> Tensor:
        """``(N, C, M)`` logits or probabilities, in the caller's dtype."""
        x = self._x
        if x is None:
            x = self._x = self.input.reshape(self.dims)
        return x

    @property
    def target(self) -> Tensor:
        """``(N, C, M)`` for binary/multilabel, ``(N, M)`` integer class indices (multiclass)."""
        target = self._target
        if target is None:
            target = self._target = self.target_input.reshape(self.target_dims)
        return target

    @property
    def num_classes(self) -> int:
        return self.dims[1]


def _shape(t: Tensor) -> str:
    # f"{size}", not str(size): torch.compile traces the formatting of a symbolic size only
    # in an f-string (str() of one ends the trace with an error that loses this message)
    return "(" + ", ".join(f"{s}" for s in t.shape) + ")"


def _check_dense(name: str, tensor: Tensor) -> None:
    if tensor.is_nested or tensor.layout is not torch.strided:
        what = "nested tensor" if tensor.is_nested else f"{tensor.layout} tensor"
        raise TypeError(f"{name} must be a dense tensor (torch.strided); got a {what} "
                        "(convert it with .to_dense(), or pad a nested batch to one shape)")


def _check_tensors(input: object, target: object) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor; got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor; got {type(target).__name__}")
    _check_dense("input", input)
    _check_dense("target", target)
    if not input.is_floating_point():
        raise TypeError(
            f"input must be a floating-point tensor of logits or probabilities; got {input.dtype}"
        )
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"input dtype {input.dtype} is not supported: use float16, bfloat16, "
                        "float32, float64 or a float8 type")
    if target.is_complex():
        raise TypeError(
            f"target must be a real (float, integer or bool) tensor; got {target.dtype}"
        )
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"target dtype {target.dtype} is not supported (torch computes little "
                        "with quantized, packed or sub-byte types): convert it to an integer, "
                        "bool or float type (a quantized tensor: .int_repr() or .dequantize())")
    if input.device != target.device:
        raise ValueError(
            f"input and target must be on the same device; got {input.device} and {target.device}"
        )


def _binary_layout(input: Tensor, target: Tensor) -> Layout:
    if input.dim() < 1:  # (N,) is (N, *spatial) without spatial dims: N one-pixel samples
        raise ValueError(
            f"input must have shape (N, 1, *spatial) or (N, *spatial) in mode='binary'; "
            f"got {_shape(input)}"
        )
    n = input.shape[0]
    if target.shape != input.shape:
        without_channel = input.shape[:1] + input.shape[2:]
        no_channel = input.dim() > 1 and input.shape[1] == 1 and target.shape == without_channel
        if not no_channel:
            hint = ""
            if input.dim() > 1 and input.shape[1] > 1 and target.shape == without_channel:
                hint = (
                    f"; the input has {input.shape[1]} channels but mode='binary' needs 1 "
                    "channel: use mode='multiclass' for class-index targets or "
                    "mode='multilabel'"
                )
            raise ValueError(
                f"target shape {_shape(target)} does not match input shape {_shape(input)}: in "
                "mode='binary' the target must have the input's shape, or the input's shape "
                f"without its channel dimension of size 1{hint}"
            )
    m = _spatial_size(input, 1)
    return Layout.of(input, target, BINARY_MODE, (n, 1, m), (n, 1, m), input.shape)


def _spatial_size(input: Tensor, start: int) -> int:
    size = 1
    for s in input.shape[start:]:
        size *= s
    return size


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
    if c < 1:
        raise ValueError(
            f"mode='multilabel' needs an input with C >= 1 channels; got C={c} in input shape "
            f"{_shape(input)}"
        )
    m = _spatial_size(input, 2)
    return Layout.of(input, target, MULTILABEL_MODE, (n, c, m), (n, c, m), input.shape)


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
    expected = input.shape[:1] + input.shape[2:]
    with_channel = (*input.shape[:1], 1, *input.shape[2:])
    if target.is_floating_point() or target.dtype == torch.bool:
        stored = "bool" if target.dtype == torch.bool else "floats"
        if target.shape == input.shape:
            hint = ("a one-hot target: pass target.long().argmax(1)" if stored == "bool" else
                    "a one-hot or probability target: pass target.argmax(1)")
        elif target.shape == with_channel:
            hint = f"class indices stored as {stored}: pass target[:, 0].long()"
        elif target.shape == expected:
            hint = f"class indices stored as {stored}: pass target.long()"
        else:
            hint = ("class indices as an integer tensor; a one-hot or probability target: "
                    "pass target.argmax(1)")
        raise TypeError(
            "target must be an integer tensor of class indices in mode='multiclass'; got "
            f"{target.dtype} ({hint})"
        )
    if target.shape != expected:
        hint = ""
        if target.shape == input.shape:
            hint = "; it has the input's shape, which looks one-hot: pass target.argmax(1)"
        elif target.shape == with_channel:
            hint = "; it has a channel dimension of size 1: pass target[:, 0]"
        raise ValueError(
            f"target shape {_shape(target)} does not fit input shape {_shape(input)}: in "
            f"mode='multiclass' the target must hold class indices of shape (N, *spatial) = "
            f"({', '.join(f'{s}' for s in expected)}){hint}"
        )
    m = _spatial_size(input, 2)
    return Layout.of(input, target, MULTICLASS_MODE, (n, c, m), (n, m), expected)


_LAYOUTS = {
    BINARY_MODE: _binary_layout,
    MULTILABEL_MODE: _multilabel_layout,
    MULTICLASS_MODE: _multiclass_layout,
}


_FLOAT8 = frozenset(getattr(torch, name) for name in (
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name))
_WIDE_UNSIGNED = frozenset(getattr(torch, name) for name in ("uint16", "uint32", "uint64")
                           if hasattr(torch, name))
_INPUT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}) | _FLOAT8
_TARGET_DTYPES = _INPUT_DTYPES | _WIDE_UNSIGNED | frozenset(
    {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def readable(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Tensors of dtypes torch has little arithmetic for, as the same values in one it has:
    float8 as float32 (input and target; the input's gradient returns in float8), uint16/32/64
    targets (label maps as NIfTI files often hold them) as int64, a uint64 above int64's range
    as ``2**63 - 1`` (too large for a label in every mode, and so named by the value checks,
    where wrapping would read it as a negative number; ``ignore_index=2**63 - 1`` ignores it);
    and a tensor made under ``torch.inference_mode``, where a gradient is to be taken, as a
    copy that autograd may save."""
    if input.dtype in _FLOAT8:
        input = input.float()
    if target.dtype in _FLOAT8:
        target = target.float()
    elif target.dtype == getattr(torch, "uint64", None):
        signed = target.view(torch.int64)  # the same bits: above 2**63 - 1 they read negative
        target = signed.masked_fill(signed < 0, torch.iinfo(torch.int64).max)
    elif target.dtype in _WIDE_UNSIGNED:
        target = target.long()
    if (not torch.compiler.is_compiling()  # (a graph cannot ask: Dynamo refuses)
            and (target.is_inference() or input.is_inference())
            and torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)):
        # A tensor made under torch.inference_mode (pseudo-labels of a teacher) cannot be
        # saved for backward, which the kernels do with the caller's tensors: a copy is an
        # ordinary tensor (the reference, which converts the target first, never saved it).
        if target.is_inference():
            target = target.clone()
        if input.is_inference():
            input = input.clone()
    return input, target


def prepare(input: Tensor, target: Tensor, mode: str) -> Layout:
    """Check ``input``/``target`` (types, device, shapes; no values) and return the layout."""
    _check_tensors(input, target)
    input, target = readable(input, target)
    return _LAYOUTS[mode](input, target)


def target_can_equal(dtype: torch.dtype, value: int) -> bool:
    """Whether a target of ``dtype`` can hold the integer ``value`` exactly.

    torch compares a tensor with a Python int in the tensor's dtype: a uint8 target compared
    with 257 matches its 1s (257 wraps to 1), a float16 one compared with 2049 matches 2048.
    An ``ignore_index`` that no element can equal ignores nothing; the losses then drop it
    (:func:`ignore_index_for`).

    >>> import torch
    >>> from dynloss._layout import target_can_equal
    >>> [target_can_equal(torch.uint8, v) for v in (255, 256, -1)]
    [True, False, False]
    >>> [target_can_equal(torch.float16, v) for v in (2048, 2049, -100, 70000)]
    [True, False, True, False]
    """
    if dtype == torch.bool:
        return value in (0, 1)
    if not dtype.is_floating_point:
        integers = torch.iinfo(dtype)
        return integers.min <= value <= integers.max
    floats = torch.finfo(dtype)
    if value == 0:
        return True
    digits = 2 - math.frexp(floats.eps)[1]  # bits of the significand: 24 for float32
    magnitude = abs(value)
    odd = magnitude // (magnitude & -magnitude)  # the value without its trailing zero bits
    return magnitude <= floats.max and odd.bit_length() <= digits


def ignore_index_for(dtype: torch.dtype, ignore_index: int | None) -> int | None:
    """``ignore_index`` if a target of ``dtype`` can equal it, else None (nothing is ignored),
    so that every backend compares the values, not the values wrapped into the dtype."""
    if ignore_index is None or target_can_equal(dtype, ignore_index):
        return ignore_index
    return None


def float32_value(value: float) -> float:
    """``value`` rounded to the nearest float32 (as a Python float)."""
    return struct.unpack("f", struct.pack("f", value))[0]


_EXACT = {torch.float32: 2**24, torch.float64: 2**53}
"""Every integer of at most this magnitude is a float32 (float64); above it some round onto
this one or others (2**24 + 1 onto 2**24, 2**53 + 1 onto 2**53)."""


def kernel_target(target: Tensor, mode: str, ignore_index: int | None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """``target`` for kernels that compare binary/multilabel targets in ``dtype`` (float32:
    native with float32 input, Triton; float64: native with float64 input): with float32 a
    float64 one through :func:`float32_target`; an int32/int64 one, with an ``ignore_index``
    beyond ``dtype``'s exact integers, as ``dtype`` with the labels that round onto it moved
    one step back toward themselves (kept: invalid labels, which the kernels then see); any
    other as it is."""
    if mode == MULTICLASS_MODE:
        return target
    if target.dtype is torch.float64 and dtype is torch.float32:
        return float32_target(target, ignore_index)
    if (ignore_index is not None and abs(ignore_index) >= _EXACT[dtype]
            and target.dtype in (torch.int32, torch.int64)):
        narrow = target.to(dtype)
        value = float(ignore_index)
        onto = (narrow == (value if dtype is torch.float64 else float32_value(value))) & (
            target != ignore_index)
        toward = torch.where(target > ignore_index, math.inf, -math.inf).to(dtype)
        return torch.where(onto, torch.nextafter(narrow, toward), narrow)
    return target


def float32_target(target: Tensor, ignore_index: int | None) -> Tensor:
    """A float64 binary/multilabel ``target`` as float32, for kernels that read float32, with
    the float64 values' answers to "is it ``ignore_index``?" and "is it in [0, 1]?".

    A kept value that float32 rounds onto 0, 1 or ``ignore_index`` (as a float32, which is how
    the kernels compare) moves one float32 step back toward itself: ``1 + 1e-9`` stays above 1
    (invalid), ``-1e-50`` below 0, and ``1 - 1e-12`` with ``ignore_index=1`` stays kept. Every
    other value is float32's rounding of it.

    >>> import torch
    >>> from dynloss._layout import float32_target
    >>> wide = torch.tensor([1 + 1e-9, -1e-50, 1 - 1e-12, 0.5], dtype=torch.float64)
    >>> float32_target(wide, 1).tolist()
    [1.0000001192092896, -1.401298464324817e-45, 0.9999999403953552, 0.5]
    """
    narrow = target.float()
    wide = narrow.double()
    critical = (wide != target) & ((narrow == 0) | (narrow == 1))
    if ignore_index is not None:
        critical |= (narrow == ignore_index) & (target != ignore_index)
    toward = torch.where(target > wide, math.inf, -math.inf).float()
    return torch.where(critical, torch.nextafter(narrow, toward), narrow)


def should_check_values(check_values: bool | None, input: Tensor) -> bool:
    """Whether the eager value checks run: ``None`` means where it is free (CPU tensors);
    never inside ``torch.compile`` or a :mod:`torch.func` transform
    (:func:`~dynloss._recorder.checked_in_graph`), nor on meta or fake tensors, which hold no
    values."""
    if checked_in_graph(input):
        return False
    if check_values is None:
        return input.device.type == "cpu"
    return check_values and not input.is_meta


def _kept_target(layout: Layout, ignore_index: int | None) -> Tensor:
    target = layout.target
    return target if ignore_index is None else target[target != ignore_index]


def _kept_input(layout: Layout, ignore_index: int | None) -> Tensor:
    """The input's kept elements (all of ``x`` without ``ignore_index``), flattened."""
    x = layout.x
    if ignore_index is None:
        return x
    keep = layout.target != ignore_index
    if layout.mode == MULTICLASS_MODE:  # (N, M) pixels -> (K, C) kept logits
        return x.transpose(1, 2)[keep]
    return x[keep]


def check_values(layout: Layout, ignore_index: int | None, from_logits: bool) -> None:
    """The eager value checks: raise a ``ValueError`` naming the range of bad values.

    Like :func:`invalid_elements`, they look only at kept elements: an ignored pixel's target
    and input (a NaN, a probability outside [0, 1]) are never read."""
    target = layout.target
    if target.numel() and target.dtype != torch.bool:
        kept = _kept_target(layout, ignore_index)
        if kept.numel():
            lo, hi = torch.aminmax(kept)
            raise_for_target_range(layout, ignore_index, lo.item(), hi.item())
    if not from_logits and layout.x.numel():
        x = _kept_input(layout, ignore_index)
        if x.numel():
            lo, hi = torch.aminmax(x)
            raise_for_probability_range(lo.item(), hi.item())


def check_class_indices(layout: Layout, ignore_index: int | None) -> None:
    """Raise for kept multiclass labels outside ``[0, C)`` (an index is never used out of its
    range on the CPU, whatever ``check_values`` says: reading it there costs no sync)."""
    if layout.target.numel():
        kept = _kept_target(layout, ignore_index)
        if kept.numel():
            lo, hi = torch.aminmax(kept)
            raise_for_target_range(layout, ignore_index, lo.item(), hi.item())


def raise_for_target_range(layout: Layout, ignore_index: int | None, lo: float, hi: float
                           ) -> None:
    """The error for kept targets whose values span ``[lo, hi]`` (nothing if that is valid)."""
    if layout.mode == MULTICLASS_MODE:
        c = layout.num_classes
        if lo < 0 or hi >= c:
            also = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
            raise ValueError(
                f"target class indices must lie in [0, {c}) for an input with C={c} "
                f"channels{also}; got values from {lo} to {hi}"
            )
    elif not (0 <= lo and hi <= 1):  # also catches NaN
        also = (
            "" if ignore_index is None else f" (pixels equal to ignore_index={ignore_index} aside)"
        )
        raise ValueError(
            f"target values must lie in [0, 1] in mode={layout.mode!r}{also}; got "
            f"{_value_range(lo, hi)}"
        )


def raise_for_probability_range(lo: float, hi: float) -> None:
    """The error for probabilities spanning ``[lo, hi]`` (nothing if inside [0, 1])."""
    if not (0 <= lo and hi <= 1):
        raise ValueError(
            "input must hold probabilities in [0, 1] when from_logits=False; got "
            f"{_value_range(lo, hi)} (pass from_logits=True for logits)"
        )


def _value_range(lo: float, hi: float) -> str:
    """``values from lo to hi`` for an error message; ``NaN`` where a NaN made both ends NaN
    (``torch.aminmax`` of values holding one)."""
    if math.isnan(lo) or math.isnan(hi):
        return "NaN"
    return f"values from {lo} to {hi}"


def invalid_elements(layout: Layout, ignore_index: int | None, from_logits: bool,
                     targets: bool) -> Tensor:
    """Bool tensor of the per-element loss's shape (``(N, C, M)``, multiclass ``(N, M)``):
    the kept input is not finite (for probabilities: outside [0, 1]) or, with ``targets``,
    the kept target is out of range."""
    x, target = layout.x, layout.target
    multiclass = layout.mode == MULTICLASS_MODE
    bad = ~torch.isfinite(x) if from_logits else ~((x >= 0) & (x <= 1))
    if multiclass:
        bad = bad.any(1)
    if targets and target.dtype != torch.bool:
        if multiclass:
            bad = bad | (target < 0) | (target >= layout.num_classes)
        else:
            bad = bad | ~((target >= 0) & (target <= 1))
    if ignore_index is not None:
        bad = bad & (target != ignore_index)
    return bad


def _outside_unit_interval(v: Tensor) -> Tensor:
    """0-dim bool: an element of ``v`` lies outside [0, 1] or is NaN. Floating ``v``: the
    negative part of ``v (1 - v)`` sums to nonzero (the product is negative exactly outside
    [0, 1], also at +-inf and for the smallest subnormals, and NaN for a NaN); three
    operations per element that the compiler fuses into the loss's own pass. Integers
    (whose product could wrap): compared."""
    v = v.detach()
    if not v.is_floating_point():
        return ~((v >= 0) & (v <= 1)).all()
    return (v * (1 - v)).clamp(max=0).sum() != 0


def invalid_values(layout: Layout, ignore_index: int | None, from_logits: bool,
                   targets: bool) -> Tensor:
    """0-dim bool tensor: :func:`invalid_elements` has a True. Nothing is read on the host.

    Without ``ignore_index`` every element is kept, and the answer comes from the extremes
    (``torch.aminmax``: one pass, no temporary the size of the input, NaN propagated): a
    non-finite logit makes the min or the max non-finite, a probability or target outside
    its range (or NaN) puts the min or the max outside it. (Per element, as with an
    ``ignore_index``, the same test costs ~10x more on the CPU.) Inside ``torch.compile``:
    sums that the compiler fuses into the loss's own pass over the input (``x * 0`` is NaN
    where ``x`` is not finite; see :func:`_outside_unit_interval` for [0, 1]).

    >>> import torch
    >>> from dynloss._layout import invalid_values, prepare
    >>> layout = prepare(torch.tensor([[0.5, float("inf")]]), torch.ones(1, 2), "binary")
    >>> bool(invalid_values(layout, None, True, targets=True))
    True
    """
    if ignore_index is not None:
        return invalid_elements(layout, ignore_index, from_logits, targets).any()
    x, target = layout.x, layout.target
    if torch.compiler.is_compiling():
        # in a graph, reductions that are defined on empty tensors (a branch on the size is
        # baked in by torch.export, and aminmax of an empty batch then raised in the exported
        # program), each in as few operations per element as it can be, since the compiler
        # fuses them into the loss's own pass (the masks, casts and logical reductions of
        # `isfinite(x).all()` cost about as much as the sigmoid): x * 0 is NaN exactly where
        # x is not finite
        bad = (x.detach() * 0).sum() != 0 if from_logits else _outside_unit_interval(x)
        if targets and target.dtype != torch.bool:
            if layout.mode == MULTICLASS_MODE:
                bad = bad | ~((target >= 0) & (target < layout.num_classes)).all()
            else:
                bad = bad | _outside_unit_interval(target)
        return bad
    bad = torch.zeros((), dtype=torch.bool, device=x.device)
    if x.numel():
        lo, hi = torch.aminmax(x)
        bad = ~(lo.isfinite() & hi.isfinite()) if from_logits else ~((lo >= 0) & (hi <= 1))
    if targets and target.dtype != torch.bool and target.numel():
        lo, hi = torch.aminmax(target)
        if layout.mode == MULTICLASS_MODE:
            bad = bad | (lo < 0) | (hi >= layout.num_classes)
        else:
            bad = bad | ~((lo >= 0) & (hi <= 1))
    return bad


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums and per-element losses are computed in float32 at least (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
