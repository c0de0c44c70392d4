"""Calls into the native kernels: one forward pass, one backward pass (ctypes).

One streaming forward pass computes everything a loss needs from the input (the region sums
``I, P, G`` per sample and class, and the sum of the per-element cross-entropy after the focal
modulation and class weights, with its normaliser) and writes what the gradient needs: for
region losses the sigmoid's slope ``dp/dx`` signed by the target (binary, multilabel) or the
softmax probabilities (multiclass; at a pixel's one most probable class ``p - 1``, formed
with all its digits from the other classes), and each element's slope ``d loss / d x``
(distribution losses). The backward pass is then one elementwise pass of plain arithmetic.
The forward pass also finds invalid values (kept targets out of range, kept inputs that are
not finite or, for probabilities, outside [0, 1]) at no extra cost: :func:`native_forward`
raises for them when the value checks are due, else the caller makes the loss NaN.

TopK (``topk=k``): the forward pass also writes each element's loss to a pooled scratch
buffer, and a second call selects the ``n = topk_count(k, kept)`` largest by a radix select
on their bit patterns (no sort), returns their sum, and zeroes the saved slopes of the
elements it did not select, so the backward pass is the same one pass as BCE's.

Work is cut into fixed chunks whose partial sums are added in a fixed order, so results are
bitwise identical for any number of threads (``torch.get_num_threads()`` threads are used,
one in a process forked from another: OpenMP's threads do not survive ``fork``, and a team
started in the child would wait for them forever; said once).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..._layout import Layout, check_values, compute_dtype, kernel_target
from ..._math import topk_count
from ..._params import CompositeParams, DistributionParams, RegionParams
from ..._warn import caller_stacklevel
from ...constants import MULTICLASS_MODE
from ..capabilities import sums_per_row
from .abi import (
    PIXEL_BCE,
    PIXEL_FOCAL,
    PIXEL_FOCAL2,
    PIXEL_NONE,
    REAL_DTYPES,
    REAL_TYPES,
    TARGET_TYPES,
    Args,
)
from .buffer_pool import CPU, POOL
from .build import library, status

__all__ = ["SCALARS", "Forward", "Sums", "c_real", "graph_kept", "kernel_dims",
           "native_backward", "native_forward", "native_target", "recorded_calls"]


_forked = False  # this process was forked from another (which may have run OpenMP teams)
_forked_warned = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _threads() -> int:
    """The kernels' thread count: torch's, but one in a forked process (said once)."""
    global _forked_warned
    wanted = max(1, torch.get_num_threads())
    if not _forked or wanted == 1:
        return wanted
    if not _forked_warned:
        _forked_warned = True
        warnings.warn(
            "dynloss: this process was forked from another, where OpenMP's threads do not "
            f"survive: the native CPU kernels run on one thread here, not {wanted} (the "
            "'spawn' start method keeps them, as does 'forkserver' unless dynloss is in its "
            "preload list)", RuntimeWarning, stacklevel=caller_stacklevel())
    return 1


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def c_real(real: torch.dtype) -> type[ctypes.c_float] | type[ctypes.c_double]:
    """The C type of ``real`` (the dtype the kernels compute in, :func:`compute_dtype`: float64
    for float64 input, else float32), for arrays the kernels read."""
    return ctypes.c_double if real is torch.float64 else ctypes.c_float


def native_target(target: Tensor, mode: str, ignore_index: int | None,
                  real: torch.dtype = torch.float32) -> Tensor:
    """The target in a dtype the kernels read (bool is read as uint8), contiguous and in memory
    as it reads (not negated). With float32 input (``real``) a floating-point target as
    float32, a float64 one with its own answers to "ignored?" and "in [0, 1]?"; with float64
    input as float64 (binary/multilabel) or int64 (multiclass), whatever its dtype."""
    target = target.resolve_neg()
    if target.dtype is real and target.is_contiguous():  # the common case, as it is
        return target
    target = kernel_target(target, mode, ignore_index, real)
    if real is torch.float64:  # float64 targets (binary/multilabel) or int64 class indices
        # (contiguous: .to() returns a tensor of that dtype as it is, strides and all)
        return target.to(torch.int64 if mode == MULTICLASS_MODE else torch.float64).contiguous()
    if target.dtype not in TARGET_TYPES or target.dtype is torch.float64:
        integral = mode == MULTICLASS_MODE or not target.is_floating_point()
        target = target.to(torch.int64 if integral else torch.float32)
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    return target.contiguous()


def _pixel_kind(want_pixel: bool, gamma: float) -> int:
    if not want_pixel:
        return PIXEL_NONE
    if gamma == 0:
        return PIXEL_BCE
    return PIXEL_FOCAL2 if gamma == 2 else PIXEL_FOCAL


_FUNCTIONS: dict[str, Any] = {}


def _call(name: str, args: Args) -> None:
    function = _FUNCTIONS.get(name)
    if function is None:
        lib = library()
        if lib is None:  # pragma: no cover - dispatch checks availability first
            raise RuntimeError(f"native kernels unavailable: {status()}")
        function = _FUNCTIONS[name] = getattr(lib, name)
    code = function(args)  # argtypes POINTER(Args): ctypes passes the struct by reference
    if code == 1:
        raise MemoryError("the native loss kernel ran out of memory")
    if code != 0:  # pragma: no cover - arguments are validated in Python
        raise RuntimeError(f"{name} rejected its arguments (code {code})")


@contextlib.contextmanager
def recorded_calls() -> Iterator[list[str]]:
    """The names of the kernels' entry points called inside the ``with`` block, in order (for
    tests and benchmarks: which calls the kernels computed). Not thread-safe: it swaps this
    module's caller while the block runs, so a call costs nothing extra outside one.

    Examples:
        >>> import torch, dynloss
        >>> from dynloss.kernels import native_available
        >>> from dynloss.kernels.native.ffi import recorded_calls
        >>> with recorded_calls() as calls:
        ...     _ = dynloss.BCELoss()(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4))
        >>> calls == (["dynloss_binary_forward"] if native_available() else [])
        True
    """
    global _call
    calls: list[str] = []
    original = _call

    def recording(name: str, args: Args) -> None:
        calls.append(name)
        original(name, args)

    _call = recording
    try:
        yield calls
    finally:
        _call = original


_PORTABLE_LOOPS = 0
"""1: the kernels run their portable loops only, never a hand-vectorised one (the tests set it
to compare the two; see :func:`avx512_loops`)."""


def avx512_loops() -> bool:
    """Whether the compiled kernels have their AVX-512 loop (the binary region forward pass
    from logits with float32 targets; built where the compiler targets AVX-512 F and DQ)."""
    lib = library()
    return lib is not None and bool(lib.dynloss_avx512_loops())


_KEEP_GRAPH = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
_SAVED_TENSOR_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_for_hooks() -> bool:
    """Whether a ``saved_tensors_hooks`` pack hook sees what this forward saves (it may keep
    it: the backward must then not write the gradient into it); True if unknown."""
    if _SAVED_TENSOR_HOOKS is None:  # pragma: no cover - a torch without this query
        return True
    return _SAVED_TENSOR_HOOKS(False) is not None


def graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True if unknown."""
    getter = _KEEP_GRAPH
    if getter is None:  # pragma: no cover - older or newer torch without this hook
        return True
    try:
        return bool(getter())
    except RuntimeError:  # pragma: no cover - called outside a graph task
        return True


def _raise_for_values(bad_target: float, bad_input: float, x: Tensor, target: Tensor,
                      mode: str, ignore_index: int | None, from_logits: bool,
                      dims: tuple[int, ...]) -> None:
    """Turn the kernel's counts of bad values into the errors the other backends raise: their
    value checks, over the kept elements only (an ignored pixel's values are never read)."""
    if not (bad_target or (bad_input and not from_logits)):
        return  # (a non-finite logit: the loss is NaN, not an error)
    n, _, m = dims
    target_dims = (n, m) if mode == MULTICLASS_MODE else dims
    check_values(Layout.of(x, target, mode, dims, target_dims, x.shape), ignore_index,
                 from_logits)


def kernel_dims(layout: Layout, params: RegionParams | DistributionParams | CompositeParams
                ) -> tuple[int, ...]:
    """The ``(N, C, M)`` the kernels read the caller's tensors as for a loss with ``params``:
    all rows as one, ``(1, 1, N*C*M)``, where nothing is wanted per row (:func:`sums_per_row`;
    nor a region term per image, nor a weight per channel): the same sums, in one pass cut
    into chunks, where a row each took a task of its own (a batch of single-pixel rows,
    ``(1e6, 1)``, ran 100x slower than the torch backend)."""
    if isinstance(params, RegionParams):
        op, per_row = "region", params.per_image
    elif isinstance(params, CompositeParams):
        op, per_row = "composite", params.region.per_image
    else:  # (the kernels read a row's channel weight as row % C)
        op, per_row = "distribution", isinstance(params.pos_weight, tuple)
    n, c, m = layout.dims
    if per_row or sums_per_row(layout.mode, op, per_row, c):
        return layout.dims
    return (1, 1, n * c * m)


class Forward:
    """What one forward kernel call returns, and what its backward call needs."""

    __slots__ = ("config", "invalid", "losses", "out", "overflowed", "pixel", "probabilities",
                 "slope", "target")

    def __init__(self, out: ctypes.Array, pixel: tuple[float, float], target: Tensor,
                 probabilities: Tensor | None, slope: Tensor | None, config: tuple,
                 invalid: bool, overflowed: bool = False, losses: Tensor | None = None
                 ) -> None:
        self.out = out  # float64: 7 scalars, then the region sums (N, C, 3) if wanted
        self.pixel = pixel  # S, max(count, 1); TopK: of the selected elements
        self.target = target
        self.probabilities = probabilities
        self.slope = slope
        self.config = config
        self.invalid = invalid
        """An invalid value was found and not raised for: the loss must be NaN."""
        self.overflowed = overflowed
        """A kept slope is +-inf (a probability whose 1/p is beyond float32): the gradient
        must be formed as autograd forms it, ``(upstream * weight) / p``, not from it."""
        self.losses = losses
        """Every element's loss (``elements=True``), else None."""

    def sums(self) -> Sums:
        """The region sums (no tensor: safe to keep on an autograd node)."""
        return Sums(self.out, self.config[5])


class Sums:
    """The region sums ``I, P, G`` per (sample, class) of one forward call, in float64."""

    __slots__ = ("dims", "out")

    def __init__(self, out: ctypes.Array, dims: tuple[int, int, int]) -> None:
        self.out = out
        self.dims = dims

    def as_list(self) -> list[float]:
        """Row-major ``(N, C, 3)`` as floats."""
        return self.out[SCALARS:]

    def as_tensor(self) -> Tensor:
        """An ``(N, C, 3)`` float64 tensor (a view of the kernel's output)."""
        n, c, _ = self.dims
        return torch.frombuffer(self.out, dtype=torch.float64)[SCALARS:].view(n, c, 3)


SCALARS = 7
"""The kernel's scalar outputs: S, max(count, 1), count; then bad targets, bad inputs, soft
labels, overflowed slopes, each nonzero when there is any (not always a count)."""

_DOUBLE = ctypes.sizeof(ctypes.c_double)

_TEMPLATES: dict[tuple, Args] = {}
_MAX_TEMPLATES = 64


def _arguments(real: torch.dtype, target_dtype: torch.dtype, from_logits: bool,
               ignore_index: int | None, want_region: bool, want_pixel: bool, gamma: float,
               alpha: float | None) -> Args:
    """A fresh :class:`Args` holding what one loss configuration passes on every call (the
    tensors' pointers and sizes are the caller's to set): a copy of a template made once per
    configuration, cheaper than filling every field anew."""
    key = (real, target_dtype, from_logits, ignore_index, want_region, want_pixel, gamma, alpha)
    template = _TEMPLATES.get(key)
    if template is None:
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.clear()
        template = _TEMPLATES[key] = Args(
            real=REAL_TYPES[real], target_type=TARGET_TYPES[target_dtype],
            logits=int(from_logits),
            has_ignore=int(ignore_index is not None),
            ignore_index=0 if ignore_index is None else ignore_index,
            want_region=int(want_region), pixel=_pixel_kind(want_pixel, gamma),
            has_alpha=int(alpha is not None), gamma=float(gamma),
            alpha=0.0 if alpha is None else float(alpha))
    return Args.from_buffer_copy(template)


def native_forward(x: Tensor, target: Tensor, mode: str, from_logits: bool,
                   ignore_index: int | None, gamma: float, alpha, want_region: bool,
                   want_pixel: bool, checked: bool, needs_grad: bool,
                   topk: float | None = None, dims: tuple[int, ...] | None = None,
                   pos_weight: float | tuple[float, ...] | None = None,
                   weighted_mean: bool = False, elements: bool = False,
                   index_errors: bool = True) -> Forward:
    """One forward pass of the kernels over ``x`` (float32 or float64, computed in its own
    dtype; float16 and bfloat16 read as a float32 copy), read as ``dims = (N, C, M)``
    (default: ``x``'s own shape; the caller's input in any shape whose contiguous data is
    that layout, so that no view is made and the gradient keeps the input's shape).

    ``checked``: raise a ``ValueError`` for an invalid kept target (or probability); else it
    only sets :attr:`Forward.invalid`, as a non-finite kept input always does. A class index
    out of range raises either way (see :func:`dynloss._layout.check_class_indices`).
    ``topk``: TopK's fraction ``k`` (with ``want_pixel``): :attr:`Forward.pixel` is then the
    sum of the ``n = topk_count(k, kept)`` largest per-element losses (per ``(N, C, M)``
    element, multiclass per ``(N, M)`` pixel; ties by lowest flat index, NaN above all) and
    ``max(n, 1)``, and the saved slopes are 0 outside the selection. ``pos_weight``
    (binary/multilabel pixel losses): BCE's weight of the positives' term, one, or one per
    channel ``C`` of ``dims`` (whose rows the kernels read as ``(sample, channel)``).
    ``weighted_mean`` (multiclass, per-class ``alpha``): the count (:attr:`Forward.pixel`'s
    second value) is the sum of the kept pixels' class weights, as
    ``CrossEntropyLoss(weight=...)`` divides by (1 where it is 0).
    ``elements`` (``reduction="none"``, with ``want_pixel``): :attr:`Forward.losses`
    is a new tensor (float32; float64 for float64 input) of every element's loss (``dims``,
    multiclass ``(N, M)``; 0 where ignored, and with ``topk`` outside the selection; an
    invalid element's value is whatever the formula gives: the caller marks it).
    ``index_errors``: a multiclass class index out of range raises even when ``checked`` is
    False (the eager rule on the CPU); else it only sets :attr:`Forward.invalid` (inside a
    graph, as the other values).
    """
    if weighted_mean and (topk is not None or alpha is None or mode != MULTICLASS_MODE):
        raise ValueError("weighted_mean needs per-class weights in multiclass mode, not TopK")
    if elements and not want_pixel:
        raise ValueError("elements needs a pixel loss")
    if not (x.is_cpu and target.is_cpu):  # a pointer must be host memory
        raise ValueError(f"the native kernels need CPU tensors; got input on {x.device} and "
                         f"target on {target.device}")
    x = x.resolve_neg()  # (a negative bit: memory holding -x; no copy without)
    # float16/bfloat16: a float32 copy, freed after this pass (the caller keeps its input for
    # backward, whose float32 gradient autograd casts to the input's dtype)
    real = compute_dtype(x.dtype)
    x = (x.contiguous() if x.dtype is real
         else x.to(real, memory_format=torch.contiguous_format))
    given = target  # an error names the caller's values, not those of a converted copy
    target = native_target(target, mode, ignore_index, real)
    n, c, m = x.shape if dims is None else dims
    multiclass = mode == MULTICLASS_MODE
    # What backward needs, only when a gradient is wanted (not in validation). Saving it
    # measured faster than recomputing the probabilities in backward: the gradient then goes
    # into this buffer, and nothing transcendental runs twice. The buffers come from the pool
    # (buffer_pool.py): last step's, once its gradient was dropped, with its pages resident.
    probabilities = POOL.empty(x.shape, real) if want_region and needs_grad else None
    slope = POOL.empty(x.shape, real) if want_pixel and needs_grad else None
    # reduction="none": the caller's result; TopK: every element's loss, for the selection (a
    # scratch buffer, not kept, unless it is the result)
    loss_shape = (n, m) if multiclass else (n, c, m)
    losses = (torch.empty(loss_shape, dtype=real, device=CPU) if elements
              else POOL.empty(loss_shape, real) if topk is not None
              else None)
    # one float64 array for every result: the scalars, then (when wanted) the region sums,
    # whose every (sample, class) row the kernel writes
    out = (ctypes.c_double * (SCALARS + (3 * n * c if want_region else 0)))()
    base = ctypes.addressof(out)
    args = _arguments(real, target.dtype, from_logits, ignore_index, want_region, want_pixel,
                      gamma, None if multiclass else alpha)
    args.x = x.data_ptr()
    args.target = target.data_ptr()
    args.n, args.c, args.m = n, c, m
    class_alpha = None
    if alpha is not None and multiclass:
        class_alpha = torch.tensor(alpha, dtype=real, device=CPU)
        args.has_alpha = 1
        args.class_alpha = class_alpha.data_ptr()
        args.weighted_count = int(weighted_mean)
    weights = None
    if pos_weight is not None and want_pixel and not multiclass:
        per_channel = pos_weight if isinstance(pos_weight, tuple) else (pos_weight,) * c
        if len(per_channel) != c:
            raise ValueError(f"pos_weight holds {len(per_channel)} weights for C={c} rows per "
                             "sample")
        weights = (c_real(real) * c)(*per_channel)
        args.pos_weight = ctypes.addressof(weights)
    args.threads = _threads()
    args.portable_loops = _PORTABLE_LOOPS
    if probabilities is not None:
        args.probabilities = probabilities.data_ptr()
    if slope is not None:
        args.slope = slope.data_ptr()
    if want_region:
        args.region = base + SCALARS * _DOUBLE
    args.pixel_out = base
    args.check = base + 3 * _DOUBLE
    if losses is not None:
        args.loss = losses.data_ptr()
        args.ignored_loss = -math.inf if topk is not None else 0.0
    _call("dynloss_multiclass_forward" if multiclass else "dynloss_binary_forward", args)
    total, count, kept, bad_target, bad_input, soft, overflowed = out[:SCALARS]
    if checked and (bad_target or bad_input):
        _raise_for_values(bad_target, bad_input, x, given, mode, ignore_index, from_logits,
                          (n, c, m))
    elif multiclass and bad_target and index_errors:  # an index out of range
        _raise_for_values(bad_target, 0.0, x, given, mode, ignore_index, from_logits,
                          (n, c, m))
    if topk is not None:
        selected = topk_count(topk, int(kept))
        args.topk = selected
        args.zero_unselected = int(elements)
        _call("dynloss_multiclass_topk" if multiclass else "dynloss_binary_topk", args)
        total, count = out[0], float(max(selected, 1))
    # The struct is kept for backward (sizes and configuration): clear what points at memory
    # that this function frees (the input's copy, the weights, the scratch losses) or that
    # lives only while the caller keeps the results (the results array); backward reads the
    # saved slopes and sets its own buffers.
    args.x = args.class_alpha = args.pos_weight = args.loss = None
    args.region = args.pixel_out = args.check = None
    config = (mode, from_logits, ignore_index, want_region, want_pixel, (n, c, m), soft == 0,
              x.shape, args, needs_grad and _saved_for_hooks())
    return Forward(out, (total, count), target, probabilities, slope, config,
                   bool(bad_target or bad_input), bool(overflowed),
                   losses if elements else None)


def _float_array(values: Tensor | list[float] | ctypes.Array | None, rows: int,
                 real: torch.dtype) -> Tensor | ctypes.Array:
    """``rows`` values of dtype ``real`` the kernels can read: a contiguous tensor, or a ctypes
    array (given, of :func:`c_real`'s type, or of a list of floats); zeros for None."""
    if values is None:
        values = [0.0] * rows
    if isinstance(values, Tensor):
        return values.to(real).contiguous()
    if isinstance(values, ctypes.Array):
        if values._type_ is not c_real(real):  # pragma: no cover - a caller's mistake
            raise TypeError(f"a {values._type_.__name__} array for {real} kernels")
        return values
    return (c_real(real) * rows)(*values)


def _address(values: Tensor | ctypes.Array) -> int:
    return values.data_ptr() if isinstance(values, Tensor) else ctypes.addressof(values)


def native_backward(saved: tuple[Tensor, Tensor | None, Tensor | None], config: tuple,
                    grad_intersection: Tensor | list[float] | ctypes.Array | None,
                    grad_prediction_sum: Tensor | list[float] | ctypes.Array | None,
                    grad_total: float | Tensor | None, region_scale: float = 1.0,
                    pooled: bool = False) -> Tensor:
    """``dL/dx`` ``(N, C, M)`` from the upstream gradients of ``I, P`` and of ``S``.

    The gradients of ``I, P`` are ``region_scale`` times the given values: ``N * C`` of them
    (row-major ``(N, C)``: a tensor, a list of floats or a ctypes array of :func:`c_real`'s
    type for the input's dtype), or ``C`` (one
    per class, the same for every sample) with ``pooled``.

    ``saved`` is ``(target, probabilities, slope)`` of :func:`native_forward`, whose buffer
    receives the gradient unless the running backward keeps the graph.
    """
    target, probabilities, slope = saved
    mode, _, _, want_region, want_pixel, (n, c, _), hard, shape, forward_args, hooked = config
    multiclass = mode == MULTICLASS_MODE
    want_region = want_region and (grad_intersection is not None
                                   or grad_prediction_sum is not None)
    want_pixel = want_pixel and grad_total is not None
    real = REAL_DTYPES[forward_args.real]
    if not (want_region or want_pixel):
        return torch.zeros(shape, dtype=real, device=CPU)
    # the forward call's arguments (the loss's configuration and sizes; its x and output
    # pointers are not read by the backward kernels), then backward's own
    args = Args.from_buffer_copy(forward_args)
    args.want_region = int(want_region)
    args.pixel = PIXEL_BCE if want_pixel else PIXEL_NONE
    args.threads = _threads()
    gi = gp = None  # kept alive until the kernel has read them
    if want_region:  # a missing one of the two is zero (at most one is missing here)
        rows = c if pooled else n * c
        gi = _float_array(grad_intersection, rows, real)
        gp = _float_array(grad_prediction_sum, rows, real)
        args.probabilities = _ptr(probabilities)
        args.grad_intersection = _address(gi)
        args.grad_prediction = _address(gp)
    else:
        args.probabilities = None
    if want_pixel:
        assert grad_total is not None
        args.slope = _ptr(slope)
        args.grad_pixel = float(grad_total)
    else:
        args.slope = None
    # The saved buffer becomes the gradient (each element is read, then overwritten): one
    # input-sized buffer per forward+backward. Not when the graph is kept for another
    # backward, which must find the buffer intact, nor where a saved-tensor hook saw it.
    buffer = probabilities if probabilities is not None else slope
    grad = (POOL.empty(shape, real) if buffer is None or hooked or graph_kept() else buffer)
    args.target = target.data_ptr()
    args.grad = grad.data_ptr()
    args.hard_targets = int(hard)
    args.region_scale = region_scale
    args.pooled = int(pooled)
    _call("dynloss_multiclass_backward" if multiclass else "dynloss_binary_backward", args)
    return grad
