"""The native CPU backend: C++ kernels compiled at first use, called through ctypes.

One streaming pass computes everything a loss needs from the input (the region sums
``I, P, G`` per sample and class, and the sum of the per-element cross-entropy after the focal
modulation and class weights, with its normaliser) and writes what the gradient needs: for
region losses the sigmoid's slope ``dp/dx`` signed by the target (binary, multilabel) or the
softmax probabilities (multiclass), and each element's slope ``d loss / d x`` (pixel losses). The
backward pass is then one elementwise pass of plain arithmetic, with nothing transcendental
computed twice. A region or pixel loss keeps one input-sized tensor for backward, a fused
region+pixel composite two, and the backward pass writes the gradient into one of them (unless
the graph is retained), so a forward+backward needs a single input-sized tensor (from the
reusing pool of ``buffer_pool.py``), and a forward without gradient (validation) none. Target (and
probability) value checks run inside the forward pass, at no extra cost.

The source, ``native_cpu.cpp``, ships with the package. On first use it is compiled with the
system C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) with
``-O3 -march=native -fopenmp`` into a cache directory (``$DYNLOSS_CACHE_DIR``, else
``$XDG_CACHE_HOME/dynloss``, else ``~/.cache/dynloss``); the file name hashes the source, the
flags, the compiler and the CPU, so a new version or another machine gets its own build. The
build takes about 20-40 seconds, once per machine. Where that fails (e.g. a compiler without an
OpenMP runtime, such as Apple clang) it is retried single-threaded with ``-fopenmp-simd``,
then also without ``-march=native``. Set ``DYNLOSS_NATIVE=0`` to never build or
load it.

What runs here (``backend="auto"`` on CPU, or ``backend="native"``): float32 input on the CPU,
every mode, logits or probabilities, ``ignore_index``, soft labels, Dice/IoU/Tversky, BCE and
Focal (and the fused region+pixel composites). Targets of dtype float32, bool, uint8 and int64
are read as they are; other dtypes are converted first. TopK, ``reduction="none"`` of the
pixel losses, float64 and half-precision input take the ``"torch"`` path. When no compiler is
found or the build fails, ``"auto"`` falls back to ``"torch"`` and :func:`native_status`
says why.

Work is cut into fixed chunks whose partial sums are added in a fixed order, so results are
bitwise identical for any number of threads (``torch.get_num_threads()`` threads are used).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..constants import MULTICLASS_MODE
from .buffer_pool import POOL

__all__ = ["NativeLoss", "native_available", "native_backward", "native_forward", "native_status",
           "native_supports"]

SOURCE = Path(__file__).with_name("native_cpu.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno",
         "-std=c++17", "-shared", "-fPIC")
FALLBACK_FLAGS = (
    # no OpenMP runtime (e.g. Apple clang): one thread, the simd loops still vectorised
    tuple("-fopenmp-simd" if f == "-fopenmp" else f for f in FLAGS),
    # nor -march=native: the compiler's baseline instruction set
    tuple("-fopenmp-simd" if f == "-fopenmp" else f for f in FLAGS if f != "-march=native"),
)
"""Tried in order after ``FLAGS`` fails; the first that builds is used (and cached)."""
ABI_VERSION = 4

_PIXEL_NONE, _PIXEL_BCE, _PIXEL_FOCAL2, _PIXEL_FOCAL = 0, 1, 2, 3
_TARGET_TYPES = {torch.float32: 0, torch.uint8: 1, torch.bool: 1, torch.int64: 2}


class _Args(ctypes.Structure):
    """Mirror of ``struct Args`` in ``native_cpu.cpp`` (same order, same types)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("target", ctypes.c_void_p),
        ("target_type", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("c", ctypes.c_int64),
        ("m", ctypes.c_int64),
        ("logits", ctypes.c_int64),
        ("has_ignore", ctypes.c_int64),
        ("ignore_index", ctypes.c_int64),
        ("want_region", ctypes.c_int64),
        ("pixel", ctypes.c_int64),
        ("has_alpha", ctypes.c_int64),
        ("gamma", ctypes.c_double),
        ("alpha", ctypes.c_double),
        ("class_alpha", ctypes.c_void_p),
        ("threads", ctypes.c_int64),
        ("probabilities", ctypes.c_void_p),
        ("slope", ctypes.c_void_p),
        ("grad_intersection", ctypes.c_void_p),
        ("grad_prediction", ctypes.c_void_p),
        ("grad_pixel", ctypes.c_double),
        ("grad", ctypes.c_void_p),
        ("region", ctypes.c_void_p),
        ("pixel_out", ctypes.c_void_p),
        ("check", ctypes.c_void_p),
        ("hard_targets", ctypes.c_int64),
    ]


# ------------------------------------------------------------------------------ build & load
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_status: str | None = None  # None: not tried yet; "" loaded; else why not


def _cache_dir() -> Path:
    if os.environ.get("DYNLOSS_CACHE_DIR"):
        return Path(os.environ["DYNLOSS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dynloss"


def _compiler() -> str | None:
    candidates = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    for name in candidates:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _build(compiler: str) -> Path:
    """The compiled library: from the cache, else built with the first flag set that works."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    errors = []
    for flags in (FLAGS, *FALLBACK_FLAGS):
        try:
            return _build_with(compiler, version, flags)
        except RuntimeError as error:
            errors.append(str(error))
    raise RuntimeError(errors[0])  # the full-speed build's message says most


def _build_with(compiler: str, version: str, flags: tuple[str, ...]) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, " ".join(flags).encode(), version.encode(), _cpu_signature().encode(),
        sys.platform.encode(),
    ])).hexdigest()[:20]
    directory = _cache_dir()
    library = directory / f"native_cpu-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=library.name + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, library)  # atomic: concurrent builders (DDP ranks) never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


def _load() -> ctypes.CDLL | None:
    global _library, _status
    if _status is not None:
        return _library
    with _lock:
        if _status is not None:
            return _library
        if os.environ.get("DYNLOSS_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
            _status = "disabled by DYNLOSS_NATIVE=0"
            return None
        compiler = _compiler()
        if compiler is None:
            _status = "no C++ compiler found (set $CXX, or install g++ or clang++)"
            return None
        try:
            lib = ctypes.CDLL(str(_build(compiler)))
            if lib.dynloss_abi_version() != ABI_VERSION:
                raise RuntimeError("the compiled library has another ABI version")
            for name in ("dynloss_binary_forward", "dynloss_binary_backward",
                         "dynloss_multiclass_forward", "dynloss_multiclass_backward"):
                fn = getattr(lib, name)
                fn.argtypes = [ctypes.POINTER(_Args)]
                fn.restype = ctypes.c_int
        except Exception as error:  # a missing or failing compiler must not break the library
            _status = f"the native kernels could not be built or loaded: {error}"
            return None
        _library, _status = lib, ""
        return lib


def native_status() -> str:
    """``""`` when the native CPU kernels are loaded, else why not (builds them on first call).

    Examples:
        >>> from dynloss.kernels import native_status
        >>> isinstance(native_status(), str)
        True
    """
    _load()
    return _status or ""


def native_available() -> bool:
    """Whether the native CPU kernels are built and loaded (builds them on first call).

    Examples:
        >>> from dynloss.kernels import native_available
        >>> isinstance(native_available(), bool)
        True
    """
    return _load() is not None


def native_supports(x: Tensor) -> bool:
    """Whether ``x``'s device and dtype suit the native kernels (CPU, float32)."""
    return x.device.type == "cpu" and x.dtype == torch.float32


# ------------------------------------------------------------------------------ the Function
def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _native_target(target: Tensor, mode: str) -> Tensor:
    """The target in a dtype the kernels read (bool is read as uint8), contiguous."""
    if target.dtype not in _TARGET_TYPES:
        integral = mode == MULTICLASS_MODE or not target.is_floating_point()
        target = target.to(torch.int64 if integral else torch.float32)
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    return target.contiguous()


def _pixel_kind(want_pixel: bool, gamma: float) -> int:
    if not want_pixel:
        return _PIXEL_NONE
    if gamma == 0:
        return _PIXEL_BCE
    return _PIXEL_FOCAL2 if gamma == 2 else _PIXEL_FOCAL


def _call(name: str, args: _Args) -> None:
    lib = _load()
    if lib is None:  # pragma: no cover - the dispatcher checks availability first
        raise RuntimeError(f"native kernels unavailable: {_status}")
    code = getattr(lib, name)(ctypes.byref(args))
    if code == 1:
        raise MemoryError("the native loss kernel ran out of memory")
    if code != 0:  # pragma: no cover - arguments are validated in Python
        raise RuntimeError(f"{name} rejected its arguments (code {code})")


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True if unknown."""
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if getter is None:  # pragma: no cover - older or newer torch without this hook
        return True
    try:
        return bool(getter())
    except RuntimeError:  # pragma: no cover - called outside a graph task
        return True


def _raise_for_values(check: list[float], x: Tensor, target: Tensor, mode: str,
                      ignore_index: int | None, check_values: bool, from_logits: bool) -> None:
    """Turn the kernel's counts of bad values into the errors the other paths raise."""
    bad_target, bad_input = check
    if not (bad_target or bad_input):
        return
    kept = target if ignore_index is None else target[target != ignore_index]
    if mode == MULTICLASS_MODE and bad_target:  # out-of-range indices: always an error
        c = x.shape[1]
        lo, hi = torch.aminmax(kept)
        also = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
        raise ValueError(
            f"target class indices must lie in [0, {c}) for an input with C={c} channels"
            f"{also}; got values from {int(lo)} to {int(hi)}"
        )
    if not check_values:
        return
    if bad_target:
        lo, hi = torch.aminmax(kept)
        also = ("" if ignore_index is None
                else f" (pixels equal to ignore_index={ignore_index} aside)")
        raise ValueError(f"target values must lie in [0, 1] in mode={mode!r}{also}; got "
                         f"values from {lo.item()} to {hi.item()}")
    if bad_input and not from_logits:
        lo, hi = torch.aminmax(x)
        raise ValueError(
            "input must hold probabilities in [0, 1] when from_logits=False; got values from "
            f"{lo.item()} to {hi.item()} (pass from_logits=True for logits)"
        )


class _Forward:
    """What one forward kernel call returns, and what its backward call needs."""

    __slots__ = ("config", "pixel", "probabilities", "slope", "sums", "target")

    def __init__(self, sums: Tensor, pixel: tuple[float, float], target: Tensor,
                 probabilities: Tensor | None, slope: Tensor | None, config: tuple) -> None:
        self.sums = sums  # (N, C, 3) float64: I, P, G
        self.pixel = pixel  # S, max(count, 1)
        self.target = target
        self.probabilities = probabilities
        self.slope = slope
        self.config = config


def native_forward(x: Tensor, target: Tensor, mode: str, from_logits: bool,
                   ignore_index: int | None, gamma: float, alpha, want_region: bool,
                   want_pixel: bool, check_values: bool, needs_grad: bool) -> _Forward:
    """One forward pass of the kernels over ``x`` ``(N, C, M)`` float32 (see NativeLoss)."""
    x = x.contiguous()
    target = _native_target(target, mode)
    n, c, m = x.shape
    multiclass = mode == MULTICLASS_MODE
    class_alpha = None
    if alpha is not None and multiclass:
        class_alpha = torch.tensor(alpha, dtype=torch.float32)
    # What backward needs, only when a gradient is wanted (not in validation). Saving it
    # measured faster than recomputing the probabilities in backward: the gradient then goes
    # into this buffer, and nothing transcendental runs twice. The buffers come from the pool
    # (buffer_pool.py): last step's, once its gradient was dropped, with its pages resident.
    probabilities = POOL.empty(x.shape) if want_region and needs_grad else None
    slope = POOL.empty(x.shape) if want_pixel and needs_grad else None
    sums = torch.zeros(n, c, 3, dtype=torch.float64)
    scalars = (ctypes.c_double * 5)()  # S, max(count, 1); bad targets, bad inputs, soft labels
    base = ctypes.addressof(scalars)
    args = _Args(
        x=_ptr(x), target=_ptr(target), target_type=_TARGET_TYPES[target.dtype],
        n=n, c=c, m=m, logits=int(from_logits), has_ignore=int(ignore_index is not None),
        ignore_index=0 if ignore_index is None else ignore_index,
        want_region=int(want_region), pixel=_pixel_kind(want_pixel, gamma),
        has_alpha=int(alpha is not None), gamma=float(gamma),
        alpha=0.0 if alpha is None or multiclass else float(alpha),
        class_alpha=_ptr(class_alpha), threads=max(1, torch.get_num_threads()),
        probabilities=_ptr(probabilities), slope=_ptr(slope),
        region=_ptr(sums), pixel_out=base, check=base + 2 * ctypes.sizeof(ctypes.c_double),
    )
    _call("dynloss_multiclass_forward" if multiclass else "dynloss_binary_forward", args)
    total, count, bad_target, bad_input, soft = scalars
    _raise_for_values([bad_target, bad_input], x, target, mode, ignore_index, check_values,
                      from_logits)
    config = (mode, from_logits, ignore_index, want_region, want_pixel, (n, c, m), soft == 0)
    return _Forward(sums, (total, count), target, probabilities, slope, config)


def native_backward(saved: tuple[Tensor, Tensor | None, Tensor | None], config: tuple,
                    grad_intersection: Tensor | None, grad_prediction_sum: Tensor | None,
                    grad_total: float | Tensor | None) -> Tensor:
    """``dL/dx`` ``(N, C, M)`` from the upstream gradients of ``I, P`` ``(N, C)`` and ``S``.

    ``saved`` is ``(target, probabilities, slope)`` of :func:`native_forward`, whose buffer
    receives the gradient unless the running backward keeps the graph.
    """
    target, probabilities, slope = saved
    mode, from_logits, ignore_index, want_region, want_pixel, (n, c, m), hard = config
    multiclass = mode == MULTICLASS_MODE
    want_region = want_region and (grad_intersection is not None
                                   or grad_prediction_sum is not None)
    want_pixel = want_pixel and grad_total is not None
    if not (want_region or want_pixel):
        return torch.zeros(n, c, m)
    gi = gp = None
    if want_region:  # a missing one of the two is zero (at most one is missing here)
        gi = (torch.zeros(n, c) if grad_intersection is None
              else grad_intersection).float().contiguous()
        gp = (torch.zeros(n, c) if grad_prediction_sum is None
              else grad_prediction_sum).float().contiguous()
    # The saved buffer becomes the gradient (each element is read, then overwritten): one
    # input-sized buffer per forward+backward. Not when the graph is kept for another
    # backward, which must find the buffer intact.
    buffer = probabilities if probabilities is not None else slope
    grad = torch.empty(n, c, m) if buffer is None or _graph_kept() else buffer
    args = _Args(
        target=_ptr(target), target_type=_TARGET_TYPES[target.dtype],
        n=n, c=c, m=m, logits=int(from_logits), has_ignore=int(ignore_index is not None),
        ignore_index=0 if ignore_index is None else ignore_index,
        want_region=int(want_region), pixel=_PIXEL_BCE if want_pixel else _PIXEL_NONE,
        threads=max(1, torch.get_num_threads()),
        probabilities=_ptr(probabilities) if want_region else None,
        slope=_ptr(slope) if want_pixel else None,
        grad_intersection=_ptr(gi), grad_prediction=_ptr(gp),
        grad_pixel=0.0 if grad_total is None or not want_pixel else float(grad_total),
        grad=_ptr(grad),
        hard_targets=int(hard),
    )
    _call("dynloss_multiclass_backward" if multiclass else "dynloss_binary_backward", args)
    return grad


class NativeLoss(torch.autograd.Function):
    """``(I, P, G, S, count)`` from ``x`` ``(N, C, M)`` float32 and the target layout.

    ``I, P, G``: ``(N, C)`` region sums (zeros unless ``want_region``); ``S``: the sum of the
    per-element losses (focal with ``gamma``, class weights ``alpha``; zero unless
    ``want_pixel``); ``count``: the number of kept elements (at least 1). All float32. ``G``
    and ``count`` are not differentiable. Saved for backward, when ``x`` needs a gradient:
    for region terms the probabilities (multiclass) or, binary and multilabel, ``dp/dx``
    with the target in its sign bit (backward then reads the target only where the forward
    counted soft labels); for pixel terms the per-element slopes. One input-sized float32
    tensor each.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, from_logits: bool,
                ignore_index: int | None, gamma: float, alpha, want_region: bool,
                want_pixel: bool, check_values: bool):
        result = native_forward(x, target, mode, from_logits, ignore_index, gamma, alpha,
                                want_region, want_pixel, check_values, ctx.needs_input_grad[0])
        intersection, prediction_sum, target_sum = result.sums.float().unbind(-1)
        total, count = torch.tensor(result.pixel, dtype=torch.float32).unbind(0)
        ctx.save_for_backward(result.target, result.probabilities, result.slope)
        ctx.config = result.config
        ctx.mark_non_differentiable(target_sum, count)
        return intersection, prediction_sum, target_sum, total, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_intersection, grad_prediction_sum, _grad_target_sum, grad_total,
                 _grad_count):
        grad = native_backward(ctx.saved_tensors, ctx.config, grad_intersection,
                               grad_prediction_sum, grad_total)
        return (grad,) + (None,) * 9
