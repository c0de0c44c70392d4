"""The native kernels as ``torch.library`` custom operators, for ``torch.compile`` on the CPU.

Inside ``torch.compile`` (and for fake tensors) the native backend calls these operators
instead of its eager autograd Functions (:mod:`~dynloss.kernels.native.autograd`), whose
ctypes calls Dynamo cannot trace. Each operator has a fake implementation, so Dynamo and
AOTAutograd trace it with ``fullgraph=True`` (dynamic sizes too) without running it, and a
registered autograd formula whose backward is the backward operator. Both run the forward and
backward bodies of the eager Functions, so values and gradients are bitwise those of eager
mode; Inductor calls them as extern kernels.

* ``dynloss::native_loss(x, target, spec, ints, floats) -> (out, probabilities, slope, state,
  args)``: a region loss, a BCE/Focal/TopK mean or sum, its per-element losses
  (``reduction="none"``) or a fused composite (``out`` is then ``(combined, region,
  distribution)``); the other outputs are what backward needs and are not differentiable:
  the saved buffers (empty where none is kept), the kernel's float64 results and its
  argument struct (pointers zeroed).
* ``dynloss::native_loss_backward(x, target, probabilities, slope, state, args, grad_out,
  spec, ints, floats) -> grad``.

``spec`` is a Python literal of the call's structure (the op; the loss's parameters with
their numbers replaced by markers; whether values are checked and a gradient is wanted), a
constant of the traced graph, with no double quote or backslash (Inductor's C++ wrapper
pastes it into C++ unescaped); the numbers are ``ints`` (``int[]``, which may be symbolic)
and ``floats`` (a float64 tensor, formed in the graph, so that a float that changes becomes
an input of the graph, not a constant that recompiles it). Nothing in them is a handle into
this process, so a graph cached on disk replays in another. Sizes are read from the tensors.
The operators are registered when :mod:`dynloss` is imported (an exported program calls
them; registering builds nothing).

Where the eager backward goes through the reference (an invalid input, an overflowed slope,
a non-finite upstream gradient), the backward operator does too, in a helper thread: an
operator runs below autograd, and a thread starts with autograd on. A backward that is itself
recorded (``create_graph=True``) is not supported by ``torch.compile`` itself.
"""

from __future__ import annotations

import ast
import ctypes
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..._layout import Layout, compute_dtype, invalid_elements, prepare
from ..._math import non_finite_poison
from ..._params import CompositeParams, DistributionParams, RegionParams
from ..._warn import constant_in_graphs
from .._recompute import recompute_backward
from .abi import Args
from .autograd import (
    composite_backward,
    composite_forward,
    distribution_backward,
    distribution_forward,
    distribution_value,
    elements_backward,
    region_backward,
    region_forward,
    region_value,
)
from .ffi import SCALARS, Forward, kernel_dims, native_target

__all__ = ["KINDS", "native_loss", "operator_arguments"]

KINDS = ("region", "distribution", "elements", "composite")
"""What one operator call computes: a region loss, a BCE/Focal/TopK mean or sum, its
per-element losses, a fused composite."""

Params = RegionParams | DistributionParams | CompositeParams


@dataclasses.dataclass(frozen=True)
class _Call:
    kind: str
    params: Any
    checked: bool
    needs_grad: bool

    @property
    def mode(self) -> str:
        return str(self.params.region.mode if self.kind == "composite" else self.params.mode)

    @property
    def want_region(self) -> bool:
        return self.kind in ("region", "composite")

    @property
    def want_pixel(self) -> bool:
        return self.kind != "region"


_REGION_FIELDS = tuple(f.name for f in dataclasses.fields(RegionParams))
_DISTRIBUTION_FIELDS = tuple(f.name for f in dataclasses.fields(DistributionParams))


def _codes(values: list[Any], ints: list[int], floats: list[float]) -> list[Any]:
    """The parameters' structure (None, bools, strings, which are constants of a graph) with
    their numbers moved to ``ints`` / ``floats`` (which ``torch.compile`` may trace as
    symbolic values: with ``dynamic=True`` a float attribute is an input of the graph)."""
    codes: list[Any] = []
    for value in values:
        if value is None or isinstance(value, bool):
            codes.append(value)
        elif isinstance(value, str):
            codes.append(["s", value])
        elif isinstance(value, int):
            codes.append("i")
            ints.append(value)
        elif isinstance(value, float):
            codes.append("f")
            floats.append(value)
        else:  # a tuple of floats (per-class weights)
            codes.append(["t", len(value)])
            floats.extend(value)
    return codes


def _flatten(kind: str, params: Params) -> tuple[list[Any], list[int], list[float]]:
    """``(codes, ints, floats)`` of the parameters (nested for a composite): attribute reads
    and constants, which Dynamo traces."""
    ints: list[int] = []
    floats: list[float] = []
    if isinstance(params, CompositeParams):
        codes = [_codes([getattr(params.region, name) for name in _REGION_FIELDS], ints,
                        floats),
                 _codes([getattr(params.distribution, name) for name in _DISTRIBUTION_FIELDS],
                        ints, floats)]
        floats.append(params.region_weight)
        floats.append(params.distribution_weight)
    else:
        names = _REGION_FIELDS if isinstance(params, RegionParams) else _DISTRIBUTION_FIELDS
        codes = _codes([getattr(params, name) for name in names], ints, floats)
    return codes, ints, floats


@constant_in_graphs
def _spec(kind: str, codes: list[Any], checked: bool, needs_grad: bool) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    # a Python literal: no double quote or backslash, which Inductor's C++ wrapper
    # (``cpp_wrapper=True``) pastes into a C++ string unescaped
    return repr([kind, codes, checked, needs_grad])


def operator_arguments(kind: str, params: Params, checked: bool, needs_grad: bool
                       ) -> tuple[str, list[int], Tensor]:
    """``(spec, ints, floats)`` of a call (see the module documentation; inside
    ``torch.compile`` the spec is formed once, as the graph is traced); ``floats`` is a
    float64 tensor, formed by adding each number to a zero: a float ``torch.compile`` reads
    this way becomes an input of the graph once it changes, where a ``float[]`` argument
    would be fixed in the graph (a new value, a new graph: the 9th failed ``fullgraph``)."""
    codes, ints, floats = _flatten(kind, params)
    zero = torch.zeros((), dtype=torch.float64, device="cpu")
    numbers = (torch.stack([zero + value for value in floats]) if floats
               else torch.zeros(0, dtype=torch.float64, device="cpu"))
    return _spec(kind, codes, checked, needs_grad), ints, numbers


def _fields(codes: list[Any], ints: Iterator[Any], floats: Iterator[Any]) -> list[Any]:
    values: list[Any] = []
    for code in codes:
        if code == "i":
            values.append(next(ints))
        elif code == "f":
            values.append(next(floats))
        elif isinstance(code, list) and code[0] == "t":
            values.append(tuple(next(floats) for _ in range(code[1])))
        elif isinstance(code, list):
            values.append(code[1])
        else:
            values.append(code)
    return values


def _float_count(spec: str) -> int:
    """How many numbers ``spec``'s structure reads from ``floats``."""
    kind, codes, _, _ = ast.literal_eval(spec)

    def count(items: list[Any]) -> int:
        return sum(1 if code == "f" else code[1] if isinstance(code, list) and code[0] == "t"
                   else 0 for code in items)

    if kind == "composite":
        return count(codes[0]) + count(codes[1]) + 2
    return count(codes)


_CALLS: dict[tuple, _Call] = {}
_MAX_CALLS = 256


def _decode(spec: str, ints: Sequence[Any] | None, floats: Tensor | None) -> _Call:
    """The call of :func:`operator_arguments`'s results; ``floats`` None in the fake
    implementations, which read only the structure (the numbers are then 0). An empty
    ``ints`` may come as None (AOTInductor's runtime passes it so)."""
    ints = () if ints is None else tuple(ints)
    numbers = [0.0] * _float_count(spec) if floats is None else floats.tolist()
    key = (spec, ints, tuple(numbers)) if floats is not None else None
    call = _CALLS.get(key) if key is not None else None
    if call is None:
        kind, codes, checked, needs_grad = ast.literal_eval(spec)
        int_values, float_values = iter(ints), iter(numbers)
        params: Params
        if kind == "composite":
            region = RegionParams(**dict(zip(
                _REGION_FIELDS, _fields(codes[0], int_values, float_values), strict=True)))
            distribution = DistributionParams(**dict(zip(
                _DISTRIBUTION_FIELDS, _fields(codes[1], int_values, float_values),
                strict=True)))
            params = CompositeParams(region, distribution, next(float_values),
                                     next(float_values))
        else:
            cls, names = ((RegionParams, _REGION_FIELDS) if kind == "region"
                          else (DistributionParams, _DISTRIBUTION_FIELDS))
            params = cls(**dict(zip(names, _fields(codes, int_values, float_values),
                                    strict=True)))
        call = _Call(kind, params, bool(checked), bool(needs_grad))
        if key is not None:
            if len(_CALLS) >= _MAX_CALLS:
                _CALLS.clear()
            _CALLS[key] = call
    return call


def _region_out_shape(params: RegionParams, dims: tuple[int, ...]) -> tuple[Any, ...]:
    n, c, _ = dims
    if params.reduction != "none":
        return ()
    shape = (n, c) if params.per_image else (c,)
    return shape if params.include_background else (*shape[:-1], c - 1)


def _state_size(call: _Call, dims: tuple[int, ...]) -> Any:
    n, c, _ = dims
    return 2 + SCALARS + (3 * n * c if call.want_region else 0)


_ARGS_BYTES = ctypes.sizeof(Args)
_POINTERS = tuple(getattr(Args, field[0]).offset for field in Args._fields_
                  if field[1] is ctypes.c_void_p)
"""Where the struct holds a pointer (zeroed in the operator's copy)."""
_POINTER_BYTES = ctypes.sizeof(ctypes.c_void_p)
_NULL = bytes(_POINTER_BYTES)


@torch.library.custom_op("dynloss::native_loss", mutates_args=(), device_types="cpu")
def _loss(x: Tensor, target: Tensor, spec: str, ints: list[int], floats: Tensor
          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    call = _decode(spec, ints, floats)
    layout = prepare(x, target, call.mode)
    dims = kernel_dims(layout, call.params)
    params = call.params
    out: Tensor
    if call.kind == "region":
        out, fwd, _, _ = region_forward(x, target, call.mode, dims, params, call.checked,
                                        call.needs_grad, index_errors=False)
    elif call.kind == "distribution":
        fwd = distribution_forward(x, target, dims, params, call.checked, call.needs_grad,
                                   index_errors=False)
        out, _ = distribution_value(fwd, params, compute_dtype(x.dtype))
    elif call.kind == "elements":
        fwd = distribution_forward(x, target, dims, params, call.checked, call.needs_grad,
                                   elements=True, index_errors=False)
        assert fwd.losses is not None
        out = fwd.losses
        if fwd.invalid:  # NaN where an element is invalid, as the eager backend marks it
            marks = _nan_marks(layout, params, call.checked, out.dtype)
            out = out.reshape(marks.shape) * marks
        out = out.reshape(layout.elementwise_shape)
    else:
        values, fwd, _, _, _ = composite_forward(x, target, dims, params, call.checked,
                                                 call.needs_grad, index_errors=False)
        out = torch.stack(values)
    real = compute_dtype(x.dtype)
    state = torch.tensor([*fwd.pixel, *fwd.out], dtype=torch.float64)
    raw = bytearray(fwd.config[8])
    for start in _POINTERS:  # (backward sets its own; the output is the same on every call)
        raw[start:start + _POINTER_BYTES] = _NULL
    args = torch.frombuffer(raw, dtype=torch.uint8)
    # (an output may alias no other: an empty tensor each where no buffer is kept)
    return (out, x.new_empty(0, dtype=real) if fwd.probabilities is None else fwd.probabilities,
            x.new_empty(0, dtype=real) if fwd.slope is None else fwd.slope, state, args)


def _nan_marks(layout: Layout, params: DistributionParams, checked: bool, dtype: torch.dtype
               ) -> Tensor:
    """NaN where an element is invalid, else 1 (the eager backend's factor of the losses)."""
    bad = invalid_elements(layout, params.ignore_index, params.from_logits, not checked)
    return non_finite_poison(bad, dtype)


@_loss.register_fake
def _loss_fake(x, target, spec, ints, floats):
    call = _decode(spec, ints, None)
    layout = prepare(x, target, call.mode)
    dims = kernel_dims(layout, call.params)
    real = compute_dtype(x.dtype)
    if call.kind == "region":
        shape: Any = _region_out_shape(call.params, dims)
    elif call.kind == "elements":
        shape = layout.elementwise_shape
    else:
        shape = (3,) if call.kind == "composite" else ()
    saved = call.needs_grad
    return (x.new_empty(shape, dtype=real),
            x.new_empty(x.shape if saved and call.want_region else (0,), dtype=real),
            x.new_empty(x.shape if saved and call.want_pixel else (0,), dtype=real),
            x.new_empty(_state_size(call, dims), dtype=torch.float64),
            x.new_empty(_ARGS_BYTES, dtype=torch.uint8))


def _forward_of(x: Tensor, target: Tensor, call: _Call, dims: tuple[int, ...],
                probabilities: Tensor, slope: Tensor, state: Tensor, args: Tensor) -> Forward:
    """The eager :class:`Forward` of the call whose operator returned these tensors; the
    gradient goes into a buffer of its own (an operator's output may not alias its inputs)."""
    params = call.params.distribution if call.kind == "composite" else call.params
    values = state.tolist()
    out = (ctypes.c_double * (len(values) - 2))(*values[2:])
    struct = Args()
    ctypes.memmove(ctypes.byref(struct), args.data_ptr(), _ARGS_BYTES)
    soft = out[5]
    config = (call.mode, params.from_logits, params.ignore_index, call.want_region,
              call.want_pixel, dims, soft == 0, x.shape, struct, True)
    real = compute_dtype(x.dtype)
    bad_target, bad_input, overflowed = out[3], out[4], out[6]
    return Forward(out, (values[0], values[1]),
                   native_target(target, call.mode, params.ignore_index, real),
                   probabilities if call.needs_grad and call.want_region else None,
                   slope if call.needs_grad and call.want_pixel else None, config,
                   bool(bad_target or bad_input), bool(overflowed))


def _recompute_detached(function: Callable[..., Any], inputs: Sequence[Tensor],
                        grad_outputs: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
    """:func:`recompute_backward` of a plain gradient for detached copies of ``inputs``, in a
    thread of its own: an operator runs below autograd, which a new thread does not."""
    result: list[Any] = []

    def run() -> None:
        try:
            with torch.no_grad():  # (a plain gradient: the recompute enables grad itself)
                leaves = tuple(t.detach().requires_grad_() for t in inputs)
                result.append(recompute_backward(function, leaves, grad_outputs))
        except BaseException as error:  # raised again in the caller's thread
            result.append(error)

    thread = threading.Thread(target=run, name="dynloss-native-recompute")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@torch.library.custom_op("dynloss::native_loss_backward", mutates_args=(), device_types="cpu")
def _loss_backward(x: Tensor, target: Tensor, probabilities: Tensor, slope: Tensor,
                   state: Tensor, args: Tensor, grad_out: Tensor, spec: str, ints: list[int],
                   floats: Tensor) -> Tensor:
    call = _decode(spec, ints, floats)
    layout = prepare(x, target, call.mode)
    dims = kernel_dims(layout, call.params)
    fwd = _forward_of(x, target, call, dims, probabilities, slope, state, args)
    params = call.params
    real = compute_dtype(x.dtype)
    if call.kind == "region":
        sums = fwd.sums()
        _, cells, coefficients = region_value(sums, params, real)
        grad = region_backward(x, fwd.target, fwd.probabilities, fwd.config, fwd.invalid, sums,
                               cells, coefficients, params, call.checked, call.mode, grad_out,
                               False, _recompute_detached)
    elif call.kind == "distribution":
        _, scale = distribution_value(fwd, params, real)
        grad = distribution_backward(x, fwd.target, fwd.slope, fwd.config, scale, params,
                                     call.checked, fwd.invalid, fwd.overflowed, grad_out,
                                     False, _recompute_detached)
    elif call.kind == "elements":
        if fwd.invalid:  # the forward's NaN marks, differentiated as the eager backend's are
            grad_out = grad_out * _nan_marks(layout, params, call.checked,
                                             grad_out.dtype).view(grad_out.shape)
        grad = elements_backward(x, fwd.target, fwd.slope, fwd.config, params, call.checked,
                                 fwd.overflowed, grad_out, False, _recompute_detached, False)
    else:
        sums = fwd.sums()
        _, cells, coefficients = region_value(sums, params.region, real)
        grads = (grad_out[0], grad_out[1], grad_out[2])
        grad = composite_backward(x, fwd.target, fwd.probabilities, fwd.slope, fwd.config,
                                  fwd.invalid, sums, cells, coefficients,
                                  1.0 / fwd.pixel[1], params, call.checked, fwd.overflowed,
                                  grads, False, _recompute_detached)
    # (the reference's gradient, where backward took it, is in x's dtype: a 16-bit one
    # must come back as the fake implementation says, in the compute dtype)
    return grad.view(x.shape).to(real)


@_loss_backward.register_fake
def _loss_backward_fake(x, target, probabilities, slope, state, args, grad_out, spec, ints,
                        floats):
    return x.new_empty(x.shape, dtype=compute_dtype(x.dtype))


def _setup(ctx, inputs, output) -> None:
    x, target, spec, ints, floats = inputs
    _, probabilities, slope, state, args = output
    # what backward reads is not differentiable, and no zero gradient is formed for it (an
    # input-sized fill each, measured as half the compiled step)
    ctx.mark_non_differentiable(probabilities, slope, state, args)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, target, probabilities, slope, state, args, floats)
    ctx.spec = (spec, ints)


def _backward(ctx, grad_out, *_state_grads):
    if grad_out is None:  # (the loss itself was not used)
        return None, None, None, None, None
    x, target, probabilities, slope, state, args, floats = ctx.saved_tensors
    spec, ints = ctx.spec
    grad = torch.ops.dynloss.native_loss_backward(x, target, probabilities, slope, state, args,
                                                  grad_out, spec, ints, floats)
    return grad.to(x.dtype), None, None, None, None


torch.library.register_autograd("dynloss::native_loss", _backward, setup_context=_setup)


def native_loss(kind: str, x: Tensor, target: Tensor, params: Params, checked: bool
                ) -> Tensor:
    """The loss (``(3,)``: combined, region, distribution for a composite) through the custom
    operator; ``x``, ``target``: the caller's tensors (the layout's ``input`` and
    ``target_input``)."""
    needs_grad = x.requires_grad and torch.is_grad_enabled()
    spec, ints, floats = operator_arguments(kind, params, checked, needs_grad)
    return torch.ops.dynloss.native_loss(x, target, spec, ints, floats)[0]
