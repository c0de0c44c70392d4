"""Triton streaming kernels: a whole region / distribution / composite loss in three launches.

Forward is two launches, backward one; nothing is read on the host and no torch operation
runs between them, so a training step can be captured in a CUDA graph.

1. **Streaming forward** (``_binary_fwd_kernel`` / ``_multiclass_fwd_kernel``): grid
   ``(rows, S)``; each program reads its chunk of the logits and the target once and writes
   float32 partial sums to a work buffer: per (sample, split, class) ``I = sum(p*g)``,
   ``P = sum(p)``, ``G = sum(g)`` (flag ``DO_REGION``), and per program the sum of the
   per-element BCE/focal losses, the kept count (flag ``DO_PIXEL``) and the number of *bad*
   kept elements (a NaN or infinite logit, a probability outside [0, 1], a binary target
   outside [0, 1], a class index outside ``[0, C)``). Counts are int32 stored bit for bit in
   the float32 buffer.
2. **Epilogue** (``_epilogue_kernel``, one program): reduces the partials in a fixed order
   (deterministic), forms the Tversky index of every class (pooled over the batch, or per
   image), the reduction, the mean of the pixel term, the weighted composite, and writes the
   loss(es) -- NaN when a bad element was counted -- plus a small ``state`` for backward: the
   NaN factor, the pixel term's divisor and ``d loss / dI``, ``d loss / dP`` of every score
   entry for a unit upstream gradient.
3. **Backward** (``_binary_bwd_kernel`` / ``_multiclass_bwd_kernel``): reads the upstream
   gradient(s) and ``state`` on the device and writes ``dL/dx`` elementwise; region and pixel
   terms of a composite in the same pass.

Binary/multilabel inputs are ``(N, C, M)`` with a target of the same shape (any dtype);
multiclass inputs are ``(N, C, M)`` with ``(N, M)`` integer class indices: the softmax over
``C`` is computed in-kernel and no one-hot tensor is ever materialised. Kept multiclass labels
outside ``[0, C)`` are counted as bad and left out of every sum and every load (no index is
read past its table). Offsets are int64 when a tensor can pass 2^31 elements (``INDEX_64``).

:class:`TritonFusedLoss` is the autograd Function of the eager path; the same launchers serve
the ``torch.library`` custom ops of :mod:`dynloss.kernels.triton.ops` (``torch.compile``).
:class:`TritonRegionSums` returns the raw ``(N, C)`` sums (``ddp_pool=True`` all-reduces them
before the score).

This module imports Triton at import time; :mod:`dynloss.kernels.triton` imports it lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._layout import Layout
from ..._params import CompositeParams, DistributionParams, RegionParams
from ...constants import MULTICLASS_MODE
from .. import reference
from .._recompute import must_recompute, recompute_backward
from . import math as tm

__all__ = ["FusedSpec", "TritonFusedLoss", "TritonRegionSums", "fused_backward",
           "fused_forward"]

BLOCK_BINARY = 1024
"""Elements per tile in the binary/multilabel kernels."""
TILE_MULTICLASS = 4096
"""Classes x pixels per tile in the multiclass kernels (pixels = TILE / next_pow2(C))."""
TARGET_PROGRAMS = 1024
"""Aim for about this many programs in a streaming pass (a few waves on an H100's 132 SMs)."""
MAX_PARTIALS = 1 << 16
"""At most this many multiclass region partials per statistic (the epilogue reads them all)."""
EPILOGUE_TILE = 2048
"""Values per tile of the one-program epilogue."""
INDEX_64_FROM = 2**31 - 2**24
"""Use int64 offsets for tensors of at least this many elements (tests lower it)."""

REGION, DISTRIBUTION, COMPOSITE = 0, 1, 2
"""What a fused call returns: the region loss, the distribution loss, or both weighted."""
MEAN, SUM, NONE = 0, 1, 2
"""Reduction codes (``"none"``: the region loss's scores, or the distribution loss's
per-element losses)."""
_REDUCTIONS = {"mean": MEAN, "sum": SUM, "none": NONE}


_Launcher = TypeVar("_Launcher", bound=Callable[..., Any])


def launch_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The context in which a launch runs on ``device``: Triton launches on the current CUDA
    device and its stream, not on the tensors' (a batch on ``cuda:1`` while device 0 is
    current would be refused, or race device 1's stream). Nothing to switch for the
    interpreter's CPU tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_input_device(launcher: _Launcher) -> _Launcher:
    """``launcher(xk, ...)`` run with ``xk``'s device current (:func:`launch_device`)."""
    @functools.wraps(launcher)
    def launch(xk: Tensor, *args: Any, **kwargs: Any) -> Any:
        with launch_device(xk.device):
            return launcher(xk, *args, **kwargs)
    return launch  # type: ignore[return-value]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_rows(rows: int, length: int, block: int, programs: int | None = None
               ) -> tuple[int, int]:
    """``(splits, chunk)``: each of ``rows`` rows of ``length`` is cut in ``splits`` chunks.

    ``chunk`` is a multiple of ``block``; the grid is ``(rows, splits)``.
    """
    target = TARGET_PROGRAMS if programs is None else programs
    tiles = max(1, _cdiv(length, block))
    splits = max(1, min(tiles, _cdiv(target, max(rows, 1))))
    chunk = _cdiv(tiles, splits) * block
    return _cdiv(max(length, 1), chunk), chunk


def multiclass_block(num_classes: int) -> tuple[int, int]:
    """``(CP, BLOCK_M)``: padded class count and pixels per tile for the multiclass kernels
    (dispatch sends at most :data:`dynloss.kernels.triton.MAX_CLASSES` classes here)."""
    cp = triton.next_power_of_2(num_classes)
    return cp, max(16, TILE_MULTICLASS // cp)


def target_for_kernel(target: Tensor) -> Tensor:
    """A contiguous target that Triton can load, in memory as it reads (not negated; bool is
    viewed as uint8)."""
    target = target.resolve_neg().contiguous()
    return target.view(torch.uint8) if target.dtype == torch.bool else target


@lru_cache(maxsize=64)
def _cached_table(values: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def alpha_table(spec: FusedSpec, device: torch.device) -> Tensor | None:
    """The per-class ``alpha`` table of a multiclass spec (focal ``alpha`` or the
    cross-entropy's class ``weight``), else None. Cached per device: only the first call
    copies it to the device (so a CUDA graph captured after a warm-up step, or by
    ``torch.compile(mode="reduce-overhead")``, copies nothing)."""
    if not (spec.multiclass and isinstance(spec.alpha, tuple)):
        return None
    return _cached_table(spec.alpha, device)


def class_weight_table(spec: FusedSpec, device: torch.device) -> Tensor | None:
    """A region term's class weights as a table (None without), cached per device as
    :func:`alpha_table`."""
    if spec.class_weight is None:
        return None
    return _cached_table(spec.class_weight, device)


def pos_weight_table(spec: FusedSpec, device: torch.device, channels: int) -> Tensor | None:
    """BCE's ``pos_weight`` as a table of one weight per channel (one weight repeated), else
    None; cached per device as :func:`alpha_table`."""
    weight = spec.pos_weight
    if weight is None:
        return None
    return _cached_table(weight if isinstance(weight, tuple) else (weight,) * channels, device)


# --------------------------------------------------------------------------------------------
# what a call computes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedSpec:
    """Everything the fused kernels need to know about a call besides the tensors.

    Built once per parameter object (:func:`spec_for`); :meth:`ints` / :meth:`floats` /
    :meth:`from_lists` flatten it for the ``torch.library`` custom ops.
    """

    output: int
    """:data:`REGION`, :data:`DISTRIBUTION` or :data:`COMPOSITE`."""
    multiclass: bool
    from_logits: bool
    ignore_index: int | None
    do_region: bool
    do_pixel: bool
    per_image: bool
    reduction: int
    """The reduction of the returned loss (:data:`MEAN`, :data:`SUM`, :data:`NONE`); a
    composite's region term; a composite's pixel term is always the mean."""
    c1: float
    """``1 - alpha - beta`` of the Tversky index."""
    tversky_alpha: float
    tversky_beta: float
    smoothing: float
    gamma: float
    alpha: float | tuple[float, ...] | None
    """Focal ``alpha``: a float (binary/multilabel), a per-class tuple (multiclass) or None."""
    region_weight: float
    distribution_weight: float
    pos_weight: float | tuple[float, ...] | None = None
    """BCE's ``pos_weight``: one weight, one per channel, or None (binary/multilabel)."""
    weighted_mean: bool = False
    """The pixel mean divides by the kept pixels' ``alpha`` (multiclass class ``weight``)."""
    class_weight: tuple[float, ...] | None = None
    """A region term's class weights (``C`` values, each class's ``1 - T`` multiplied by its
    own), or None."""
    first_class: int = 0
    """1 where a region term leaves class 0 out (``include_background=False``): its score
    is multiplied by 0 and not counted in the mean (the caller cuts it from
    ``reduction="none"``'s scores)."""

    @property
    def focal(self) -> bool:
        return self.gamma != 0.0

    @property
    def mode_code(self) -> int:
        return 1 if self.multiclass else 0

    def ints(self) -> list[int]:
        return [self.output, int(self.multiclass), int(self.from_logits),
                int(self.ignore_index is not None),
                0 if self.ignore_index is None else int(self.ignore_index),
                int(self.do_region), int(self.do_pixel), int(self.per_image), self.reduction,
                _table_length(self.alpha), _table_length(self.pos_weight),
                int(self.weighted_mean), _table_length(self.class_weight), self.first_class]

    def floats(self) -> list[float]:
        return [self.c1, self.tversky_alpha, self.tversky_beta, self.smoothing, self.gamma,
                self.region_weight, self.distribution_weight, *_table_values(self.alpha),
                *_table_values(self.pos_weight), *_table_values(self.class_weight)]

    @staticmethod
    def from_lists(ints: list[int], floats: list[float]) -> FusedSpec:
        (output, multiclass, from_logits, has_ignore, ignore, do_region, do_pixel, per_image,
         reduction, alpha_len, pos_weight_len, weighted_mean, class_weight_len,
         first_class) = ints
        c1, ta, tb, smoothing, gamma, w_region, w_dist = floats[:7]
        alpha, rest = _table_from(alpha_len, floats[7:])
        pos_weight, rest = _table_from(pos_weight_len, rest)
        class_weight, _ = _table_from(class_weight_len, rest)
        return FusedSpec(output, bool(multiclass), bool(from_logits),
                         ignore if has_ignore else None, bool(do_region), bool(do_pixel),
                         bool(per_image), reduction, c1, ta, tb, smoothing, gamma, alpha,
                         w_region, w_dist, pos_weight, bool(weighted_mean),
                         class_weight, first_class)  # type: ignore[arg-type]


def _table_length(value: float | tuple[float, ...] | None) -> int:
    """How :meth:`FusedSpec.ints` encodes a weight: -1 None, 0 one float, else the length."""
    return -1 if value is None else (len(value) if isinstance(value, tuple) else 0)


def _table_values(value: float | tuple[float, ...] | None) -> list[float]:
    return list(value) if isinstance(value, tuple) else ([] if value is None else [value])


def _table_from(length: int, floats: list[float]
                ) -> tuple[float | tuple[float, ...] | None, list[float]]:
    """The weight :func:`_table_length` encoded, read off the front of ``floats``, and the
    rest."""
    if length < 0:
        return None, floats
    if length == 0:
        return floats[0], floats[1:]
    return tuple(floats[:length]), floats[length:]


def _region_fields(params: RegionParams) -> dict[str, Any]:
    """A region term's fields of the spec; ``params`` with its class weights checked against
    ``C`` (:func:`dynloss.functional._call.region_loss` gives ``C`` of them)."""
    return dict(c1=1.0 - params.alpha - params.beta, tversky_alpha=params.alpha,
                tversky_beta=params.beta, smoothing=params.smoothing,
                per_image=params.per_image, class_weight=params.class_weight,
                first_class=0 if params.include_background else 1)


_NO_REGION: dict[str, Any] = dict(c1=0.0, tversky_alpha=0.0, tversky_beta=0.0, smoothing=0.0,
                                  per_image=False)


def build_spec(params: RegionParams | DistributionParams | CompositeParams) -> FusedSpec:
    """The :class:`FusedSpec` of a region, distribution (no TopK) or composite call."""
    if isinstance(params, RegionParams):
        return FusedSpec(REGION, params.mode == MULTICLASS_MODE, params.from_logits,
                         params.ignore_index, True, False, reduction=_REDUCTIONS[
                             params.reduction], gamma=0.0, alpha=None, region_weight=1.0,
                         distribution_weight=0.0, **_region_fields(params))
    if isinstance(params, DistributionParams):
        return FusedSpec(DISTRIBUTION, params.mode == MULTICLASS_MODE, params.from_logits,
                         params.ignore_index, False, True, reduction=_REDUCTIONS[
                             params.reduction], gamma=params.gamma, alpha=params.alpha,
                         region_weight=0.0, distribution_weight=1.0,
                         pos_weight=params.pos_weight, weighted_mean=params.weighted_mean,
                         **_NO_REGION)
    region, dist = params.region, params.distribution
    return FusedSpec(COMPOSITE, region.mode == MULTICLASS_MODE, region.from_logits,
                     region.ignore_index, True, True, reduction=_REDUCTIONS[region.reduction],
                     gamma=dist.gamma, alpha=dist.alpha, region_weight=params.region_weight,
                     distribution_weight=params.distribution_weight,
                     pos_weight=dist.pos_weight, weighted_mean=dist.weighted_mean,
                     **_region_fields(region))


spec_for = lru_cache(maxsize=256)(build_spec)
""":func:`build_spec`, cached per parameter object (the eager path)."""


@dataclass(frozen=True)
class Geometry:
    """Launch geometry of one ``(N, C, M)`` shape (cached per shape, see :func:`geometry`)."""

    rows: int
    """Grid dimension 0: ``N * C`` (binary/multilabel) or ``N`` (multiclass)."""
    splits: int
    chunk: int
    block: int
    cp: int
    programs: int
    region_size: int
    """Floats of region partials: ``N * splits * 3 * C``."""
    block_r: int
    """Partial rows per epilogue tile."""
    index_64: bool
    """Offsets need int64 (the tensor has at least :data:`INDEX_64_FROM` elements)."""


@lru_cache(maxsize=512)
def geometry(n: int, c: int, m: int, multiclass: bool) -> Geometry:
    """The streaming kernels' grid for an ``(N, C, M)`` input."""
    if multiclass:
        cp, block = multiclass_block(c)
        rows = n
        # bound the partials the one-program epilogue reads: N * splits * C values per sum
        cap = max(1, MAX_PARTIALS // max(n * c, 1))
        splits, chunk = split_rows(n, m, block, min(TARGET_PROGRAMS, n * cap))
    else:
        cp, block = triton.next_power_of_2(c), BLOCK_BINARY
        rows = n * c
        splits, chunk = split_rows(rows, m, block)
    block_r = max(1, EPILOGUE_TILE // cp)
    numel = n * c * m
    return Geometry(rows, splits, chunk, block, cp, rows * splits, n * splits * 3 * c, block_r,
                    numel >= INDEX_64_FROM)


# --------------------------------------------------------------------------------------------
# binary / multilabel
# --------------------------------------------------------------------------------------------


@triton.jit
def binary_tile(x_ptr, t_ptr, base, first, M, ignore_value, HAS_IGNORE: tl.constexpr,
                BLOCK: tl.constexpr):
    """One tile of a binary/multilabel row: ``(x, t, keep, m, inside)``, logits and targets as
    float32 at offsets ``m = first + arange(BLOCK)`` of the row starting at ``base`` (0 past
    its end), and the kept mask (inside the row and, with ``HAS_IGNORE``, not ignored)."""
    m = first + tl.arange(0, BLOCK)
    inside = m < M
    x = tl.load(x_ptr + base + m, mask=inside, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + base + m, mask=inside, other=0).to(tl.float32)
    keep = inside
    if HAS_IGNORE:
        keep = keep & (t != ignore_value)
    return x, t, keep, m, inside


@triton.jit
def chunk_start(split, chunk, INDEX_64: tl.constexpr):
    """First element of chunk ``split``: int64 when offsets may pass 2^31."""
    if INDEX_64:
        start = split.to(tl.int64) * chunk
    else:
        start = split * chunk
    return start


@triton.jit
def bad_input(x, FROM_LOGITS: tl.constexpr):
    """True where a logit is NaN or infinite, or a probability is outside [0, 1] (or NaN)."""
    if FROM_LOGITS:
        bad = ~(tl.abs(x) < float("inf"))
    else:
        bad = ~((x >= 0.0) & (x <= 1.0))
    return bad


@triton.jit
def store_misc(misc, acc_l, acc_n, acc_bad, DO_PIXEL: tl.constexpr, HAS_IGNORE: tl.constexpr):
    """One program's pixel-loss sum, kept-pixel count and bad-input count (counts stored as int32
    bits) at ``misc[0..2]``."""
    if DO_PIXEL:
        tl.store(misc, tl.sum(acc_l, axis=0))
        if HAS_IGNORE:
            tl.store(misc + 1, tl.sum(acc_n, axis=0).to(tl.float32, bitcast=True))
    tl.store(misc + 2, tl.sum(acc_bad, axis=0).to(tl.float32, bitcast=True))


@triton.jit
def _binary_fwd_kernel(
    x_ptr, t_ptr, work_ptr, pw_ptr,
    M, C, chunk, S, misc_offset, ignore_value, gamma, alpha,
    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, DO_REGION: tl.constexpr,
    DO_PIXEL: tl.constexpr, FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr,
    HAS_POS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
    ELEMENTS: tl.constexpr = False,
):
    """Partials of one chunk of row ``n * C + c``: region sums ``(I, P, G)`` at
    ``work[((n * S + split) * 3 + k) * C + c]``; pixel-loss sum, kept count and bad count at
    ``work[misc_offset + 3 * (row * S + split) + {0, 1, 2}]`` (counts as int32 bits). With
    ``HAS_POS_WEIGHT`` the positives' BCE term is weighed by ``pw_ptr[c]``. ``ELEMENTS``
    (``reduction="none"`` of the pixel loss alone): every element's loss goes to
    ``work[row * M + m]`` instead (0 where ignored, NaN where a kept value is bad)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = row.to(tl.int64) * M
    start = chunk_start(split, chunk, INDEX_64)
    if HAS_POS_WEIGHT:
        pos_weight = tl.load(pw_ptr + row % C)
    acc_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK], dtype=tl.int32)
    acc_bad = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(0, chunk, BLOCK):
        x, t, keep, m, inside = binary_tile(x_ptr, t_ptr, base, start + off, M,
                                            ignore_value, HAS_IGNORE, BLOCK)
        bad = bad_input(x, FROM_LOGITS) | ~((t >= 0.0) & (t <= 1.0))
        acc_bad += (keep & bad).to(tl.int32)
        g = tl.where(keep, t, 0.0)
        if DO_REGION:
            if FROM_LOGITS:
                p = tm.sigmoid(x)
            else:
                p = x
            p = tl.where(keep, p, 0.0)
            acc_i += p * g
            acc_p += p
            acc_g += g
        if DO_PIXEL:
            gw = g
            if HAS_POS_WEIGHT:
                gw = g * pos_weight
            loss = tm.focal(tm.binary_bce(x, g, gw, FROM_LOGITS), gamma, FOCAL)
            if HAS_ALPHA:
                loss = loss * (alpha * g + (1.0 - alpha) * (1.0 - g))
            if ELEMENTS:
                value = tl.where(keep & bad, float("nan"), tl.where(keep, loss, 0.0))
                tl.store(work_ptr + base + m, value, mask=inside)
            else:
                acc_l += tl.where(keep, loss, 0.0)
                if HAS_IGNORE:
                    acc_n += keep.to(tl.int32)
    if DO_REGION:
        n = row // C
        c = row - n * C
        rbase = ((n * S + split) * 3) * C + c
        tl.store(work_ptr + rbase, tl.sum(acc_i, axis=0))
        tl.store(work_ptr + rbase + C, tl.sum(acc_p, axis=0))
        tl.store(work_ptr + rbase + 2 * C, tl.sum(acc_g, axis=0))
    if not ELEMENTS:
        misc = work_ptr + misc_offset + (row * S + split) * 3
        store_misc(misc, acc_l, acc_n, acc_bad, DO_PIXEL, HAS_IGNORE)


@triton.jit
def upstream(gc_ptr, gx_ptr, index, weight, HAS_GC: tl.constexpr, HAS_GX: tl.constexpr,
             GX_VECTOR: tl.constexpr):
    """The gradient reaching one term: ``weight * d/d combined + d/d term`` (entry ``index``
    of a per-entry gradient when ``GX_VECTOR``); 0 when neither was given."""
    g = 0.0
    if HAS_GC:
        g = tl.load(gc_ptr) * weight
    if HAS_GX:
        if GX_VECTOR:
            g = g + tl.load(gx_ptr + index)
        else:
            g = g + tl.load(gx_ptr)
    return g


@triton.jit
def _binary_bwd_kernel(
    x_ptr, t_ptr, grad_ptr, state_ptr, gc_ptr, gr_ptr, gd_ptr, pw_ptr,
    M, C, chunk, E, ignore_value, gamma, alpha, w_region, w_dist,
    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, DO_REGION: tl.constexpr,
    DO_PIXEL: tl.constexpr, FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr,
    HAS_POS_WEIGHT: tl.constexpr,
    PER_IMAGE: tl.constexpr, HAS_GC: tl.constexpr, HAS_GR: tl.constexpr,
    HAS_GD: tl.constexpr, GR_VECTOR: tl.constexpr, BLOCK: tl.constexpr,
    INDEX_64: tl.constexpr, ELEMENTS: tl.constexpr = False,
):
    """``dL/dx`` of one chunk of row ``n * C + c``: ``(gP + gI * g) * dp/dx`` for the region
    term (``gI``, ``gP`` from ``state`` and the upstream gradient), plus the pixel term's
    ``upstream / divisor * d loss/dx``. The NaN factor of ``state[0]`` multiplies the
    upstream gradient, so what the loss depends on gets NaN and ignored elements 0 (as the
    reference's autograd gives). ``ELEMENTS`` (per-element losses): each element's own
    upstream gradient ``gd[row * M + m]``, no state; NaN instead where a value is bad (the
    reference multiplies a NaN into that element's loss)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = row.to(tl.int64) * M
    start = chunk_start(split, chunk, INDEX_64)
    if not ELEMENTS:
        poison = tl.load(state_ptr)
    if DO_REGION:
        if PER_IMAGE:
            e = row
        else:
            e = row % C
        g_region = upstream(gc_ptr, gr_ptr, e, w_region, HAS_GC, HAS_GR, GR_VECTOR) * poison
        gi = g_region * tl.load(state_ptr + 2 + e)
        gp = g_region * tl.load(state_ptr + 2 + E + e)
    if DO_PIXEL:
        if not ELEMENTS:
            gt = upstream(gc_ptr, gd_ptr, 0, w_dist, HAS_GC, HAS_GD, False) * poison / tl.load(
                state_ptr + 1)
        if HAS_POS_WEIGHT:
            pos_weight = tl.load(pw_ptr + row % C)
    for off in range(0, chunk, BLOCK):
        x, t, keep, m, inside = binary_tile(x_ptr, t_ptr, base, start + off, M, ignore_value,
                                            HAS_IGNORE, BLOCK)
        if ELEMENTS:  # the reference's NaN mark of a bad element multiplies its upstream
            bad = bad_input(x, FROM_LOGITS) | ~((t >= 0.0) & (t <= 1.0))
            gt = tl.where(bad, float("nan"), tl.load(gd_ptr + base + m, mask=inside, other=0.0))
        g = tl.where(keep, t, 0.0)
        grad = tl.zeros([BLOCK], dtype=tl.float32)
        if DO_REGION:
            region = gp + gi * g
            if FROM_LOGITS:
                # p (1 - p) with 1 - p as sigmoid(-x): a difference loses its digits where
                # the sigmoid saturates
                region = region * (tm.sigmoid(x) * tm.sigmoid(-x))
            grad += region
        if DO_PIXEL:
            gw = g
            if HAS_POS_WEIGHT:
                gw = g * pos_weight
            coef = gt + tl.zeros([BLOCK], dtype=tl.float32)
            if FOCAL:
                coef = tm.focal_coef(coef, tm.binary_bce(x, g, gw, FROM_LOGITS), gamma)
            if HAS_ALPHA:
                coef = coef * (alpha * g + (1.0 - alpha) * (1.0 - g))
            grad += tm.binary_bce_grad(x, g, gw, coef, FROM_LOGITS)
        grad = tl.where(keep, grad, 0.0)
        tl.store(grad_ptr + base + m, grad.to(grad_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------
# multiclass (softmax over C, class-index target)
# --------------------------------------------------------------------------------------------


@triton.jit
def multiclass_tile(x_ptr, t_ptr, n, m, inside, C, M, ignore_index,
                    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, CP: tl.constexpr,
                    CLAMP: tl.constexpr = False):
    """Load one ``[CP, BLOCK]`` tile of sample ``n`` (a scalar, or one per pixel) at pixels
    ``m``.

    Returns ``(x, p, b, t, keep, onehot, cmask, bad, is_top, complement)``: logits (padded
    classes hold -inf when ``FROM_LOGITS``), probabilities (0 in padded classes), per-pixel
    cross-entropy ``b``, class index ``t`` (0 where not kept), kept-pixel mask, the one-hot
    mask of ``t``, the class mask and the bad pixels (not ignored, and a non-finite logit /
    probability outside [0, 1] or a label outside ``[0, C)``); with logits also the one-hot
    mask of the first most probable class and ``1 - p`` there, summed from the other classes
    (all its digits where the softmax saturates; ``b = (max - x_t) + log1p(rest)`` likewise),
    else an empty mask and 0. A label is compared in its own dtype (no truncation); one
    outside ``[0, C)`` is not kept, or with ``CLAMP`` (per-pixel losses, as the reference
    forms them unchecked) kept as the nearest class (and still bad).
    """
    cls = tl.arange(0, CP)
    cmask = cls < C
    n64 = n.to(tl.int64)
    ptrs = x_ptr + n64 * C * M + cls[:, None].to(tl.int64) * M + m[None, :]
    x = tl.load(ptrs, mask=cmask[:, None] & inside[None, :], other=0.0).to(tl.float32)
    label = tl.load(t_ptr + n64 * M + m, mask=inside, other=0)
    counted = inside
    if HAS_IGNORE:
        counted = counted & (label != ignore_index)
    in_range = (label >= 0) & (label < C)
    x_bad = tl.max((bad_input(x, FROM_LOGITS) & cmask[:, None]).to(tl.int32), axis=0) > 0
    bad = counted & (x_bad | ~in_range)
    if CLAMP:
        keep = counted
        t = tl.where(keep, tl.minimum(tl.maximum(label, 0), C - 1), 0).to(tl.int32)
    else:
        keep = counted & in_range
        t = tl.where(keep, label, 0).to(tl.int32)
    onehot = (cls[:, None] == t[None, :]) & keep[None, :]
    if FROM_LOGITS:
        x = tl.where(cmask[:, None], x, float("-inf"))
        mx, top = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        is_top = cls[:, None] == top[None, :]
        e = tl.exp(x - mx[None, :])
        rest = tl.sum(tl.where(is_top, 0.0, e), axis=0)  # the top class's e is exactly 1
        s = 1.0 + rest
        p = e / s[None, :]
        complement = rest / s
        x_t = tl.sum(tl.where(onehot, x, 0.0), axis=0)
        b = (mx - x_t) + tm.log1p(rest)
    else:
        x = tl.where(cmask[:, None], x, 0.0)
        p = x
        x_t = tl.sum(tl.where(onehot, x, 0.0), axis=0)
        b = -tm.clamped_log(x_t)
        is_top = onehot & (cls[:, None] < 0)  # empty (unused without logits)
        complement = b * 0.0
    return x, p, b, t, keep, onehot, cmask, bad, is_top, complement


@triton.jit
def region_slope(gi, gp, onehot):
    """``[CP, BLOCK]`` ``dL/dp = gP + gI * onehot`` of a multiclass region term: ``gP + gI`` at
    the target class, ``gP + 0 * gI`` elsewhere (NaN there where ``gI`` is infinite, as the
    reference's ``sum(p * onehot)`` gives, not ``gP``)."""
    return tl.where(onehot, (gp + gi)[:, None], (gp + gi * 0.0)[:, None])


@triton.jit
def multiclass_pixel_grad(x, p, b, t, onehot, is_top, complement, coef, alpha_ptr, gamma,
                          FROM_LOGITS: tl.constexpr, FOCAL: tl.constexpr,
                          HAS_ALPHA: tl.constexpr):
    """``[CP, BLOCK]`` gradient of ``coef * a_t * focal(b)`` w.r.t. the logits/probabilities
    (``p_t - 1 = -complement`` where the target is the most probable class)."""
    if FOCAL:
        coef = tm.focal_coef(coef, b, gamma)
    if HAS_ALPHA:
        coef = coef * tl.load(alpha_ptr + t)  # t is a kept class in [0, C), or 0
    if FROM_LOGITS:
        slope = tl.where(onehot & is_top, -complement[None, :], p - onehot.to(tl.float32))
        grad = coef[None, :] * slope
        # the reference's target class sums two products of the coefficient (inf - inf when
        # it is infinite), not one
        grad = tl.where(onehot & (tl.abs(coef) == float("inf"))[None, :], float("nan"), grad)
    else:
        x_t = tl.sum(tl.where(onehot, x, 0.0), axis=0)
        d = -tm.clamped_log_ratio(coef, x_t)
        grad = tl.where(onehot, d[None, :], 0.0)
    return grad


@triton.jit
def _multiclass_fwd_kernel(
    x_ptr, t_ptr, work_ptr, alpha_ptr,
    C, M, chunk, S, misc_offset, ignore_index, gamma,
    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, DO_REGION: tl.constexpr,
    DO_PIXEL: tl.constexpr, FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr,
    WEIGHTED_MEAN: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr,
    INDEX_64: tl.constexpr, ELEMENTS: tl.constexpr = False,
):
    """Partials of one chunk of sample ``n``: region sums of every class at
    ``work[((n * S + split) * 3 + k) * C + c]``; pixel-loss sum, kept and bad counts at
    ``work[misc_offset + 3 * (n * S + split) + {0, 1, 2}]`` (``WEIGHTED_MEAN``: the kept
    pixels' ``alpha`` summed, a float, in place of the kept count). ``ELEMENTS``
    (``reduction="none"`` of the pixel loss alone): every pixel's loss goes to
    ``work[n * M + m]`` instead (0 where ignored, NaN where a counted value is bad)."""
    n = tl.program_id(0)
    split = tl.program_id(1)
    start = chunk_start(split, chunk, INDEX_64)
    acc_i = tl.zeros([CP, BLOCK], dtype=tl.float32)
    acc_p = tl.zeros([CP, BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([CP, BLOCK], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK], dtype=tl.int32)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    acc_bad = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(0, chunk, BLOCK):
        m = start + off + tl.arange(0, BLOCK)
        inside = m < M
        _x, p, b, t, keep, onehot, cmask, bad, _top, _complement = multiclass_tile(
            x_ptr, t_ptr, n, m, inside, C, M, ignore_index, FROM_LOGITS, HAS_IGNORE, CP,
            ELEMENTS
        )
        acc_bad += bad.to(tl.int32)
        if DO_REGION:
            kept = keep[None, :] & cmask[:, None]
            acc_i += tl.where(onehot, p, 0.0)
            acc_p += tl.where(kept, p, 0.0)
            acc_g += onehot.to(tl.float32)
        if DO_PIXEL:
            loss = tm.focal(b, gamma, FOCAL)
            if HAS_ALPHA:
                weight = tl.load(alpha_ptr + t)
                loss = loss * weight
                if WEIGHTED_MEAN:
                    acc_w += tl.where(keep, weight, 0.0)
            if ELEMENTS:
                value = tl.where(bad, float("nan"), tl.where(keep, loss, 0.0))
                tl.store(work_ptr + n.to(tl.int64) * M + m, value, mask=inside)
            else:
                acc_l += tl.where(keep, loss, 0.0)
                if HAS_IGNORE:
                    acc_n += keep.to(tl.int32)
    slot = n * S + split
    if DO_REGION:
        cls = tl.arange(0, CP)
        cmask = cls < C
        tl.store(work_ptr + (slot * 3) * C + cls, tl.sum(acc_i, axis=1), mask=cmask)
        tl.store(work_ptr + (slot * 3 + 1) * C + cls, tl.sum(acc_p, axis=1), mask=cmask)
        tl.store(work_ptr + (slot * 3 + 2) * C + cls, tl.sum(acc_g, axis=1), mask=cmask)
    misc = work_ptr + misc_offset + slot * 3
    if ELEMENTS:
        pass
    elif WEIGHTED_MEAN:
        store_misc(misc, acc_l, acc_n, acc_bad, DO_PIXEL, False)
        tl.store(misc + 1, tl.sum(acc_w, axis=0))
    else:
        store_misc(misc, acc_l, acc_n, acc_bad, DO_PIXEL, HAS_IGNORE)


@triton.jit
def _multiclass_bwd_kernel(
    x_ptr, t_ptr, grad_ptr, state_ptr, gc_ptr, gr_ptr, gd_ptr, alpha_ptr,
    C, M, chunk, E, ignore_index, gamma, w_region, w_dist,
    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, DO_REGION: tl.constexpr,
    DO_PIXEL: tl.constexpr, FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr,
    PER_IMAGE: tl.constexpr, HAS_GC: tl.constexpr, HAS_GR: tl.constexpr,
    HAS_GD: tl.constexpr, GR_VECTOR: tl.constexpr,
    CP: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
    ELEMENTS: tl.constexpr = False,
):
    """``dL/dx`` of one chunk of sample ``n``: the softmax backward of ``u = gP + gI * onehot``
    for the region term plus the pixel term's gradient; the NaN factor of ``state`` multiplies
    the upstream gradient (ignored pixels get 0, as in the reference). ``ELEMENTS``
    (per-pixel losses): each pixel's own upstream gradient ``gd[n * M + m]``, no state; NaN
    instead where a value is bad (the reference multiplies a NaN into that pixel's loss)."""
    n = tl.program_id(0)
    split = tl.program_id(1)
    start = chunk_start(split, chunk, INDEX_64)
    cls = tl.arange(0, CP)
    cmask = cls < C
    if not ELEMENTS:
        poison = tl.load(state_ptr)
    if DO_REGION:
        if PER_IMAGE:
            e = n * C + cls
        else:
            e = cls
        g_region = tl.zeros([CP], dtype=tl.float32)
        if HAS_GC:
            g_region += tl.load(gc_ptr) * w_region
        if HAS_GR:
            if GR_VECTOR:
                g_region += tl.load(gr_ptr + e, mask=cmask, other=0.0)
            else:
                g_region += tl.load(gr_ptr)
        g_region = g_region * poison
        gi = g_region * tl.load(state_ptr + 2 + e, mask=cmask, other=0.0)
        gp = g_region * tl.load(state_ptr + 2 + E + e, mask=cmask, other=0.0)
    if DO_PIXEL and not ELEMENTS:
        gt = upstream(gc_ptr, gd_ptr, 0, w_dist, HAS_GC, HAS_GD, False) * poison / tl.load(
            state_ptr + 1)
    n64 = n.to(tl.int64)
    for off in range(0, chunk, BLOCK):
        m = start + off + tl.arange(0, BLOCK)
        inside = m < M
        x, p, b, t, keep, onehot, cmask, bad, is_top, complement = multiclass_tile(
            x_ptr, t_ptr, n, m, inside, C, M, ignore_index, FROM_LOGITS, HAS_IGNORE, CP,
            ELEMENTS
        )
        if ELEMENTS:  # the reference's NaN mark of a bad pixel multiplies its upstream
            gt = tl.where(bad, float("nan"), tl.load(gd_ptr + n64 * M + m, mask=inside,
                                                     other=0.0))
        grad = tl.zeros([CP, BLOCK], dtype=tl.float32)
        if DO_REGION:
            if FROM_LOGITS:
                # p_c (u_c - sum_k p_k u_k) of u = gp + gi * onehot; at the most probable class
                # u_top (1 - p_top) - sum_{k != top} p_k u_k, from the others' small p_k (as a
                # difference of nearly equal numbers it loses its digits where p_top nears 1)
                u = region_slope(gi, gp, onehot)
                pu = p * u
                mixed = tl.sum(pu, axis=0)
                u_top = tl.sum(tl.where(is_top, u, 0.0), axis=0)
                p_top = tl.sum(tl.where(is_top, p, 0.0), axis=0)
                at_top = p_top * (u_top * complement - tl.sum(tl.where(is_top, 0.0, pu), axis=0))
                grad += tl.where(is_top, at_top[None, :], p * (u - mixed[None, :]))
            else:
                grad += region_slope(gi, gp, onehot)
        if DO_PIXEL:
            coef = tl.zeros([BLOCK], dtype=tl.float32) + gt
            grad += multiclass_pixel_grad(
                x, p, b, t, onehot, is_top, complement, coef, alpha_ptr, gamma, FROM_LOGITS,
                FOCAL, HAS_ALPHA
            )
        grad = tl.where(keep[None, :], grad, 0.0)
        ptrs = grad_ptr + n64 * C * M + cls[:, None].to(tl.int64) * M + m[None, :]
        tl.store(ptrs, grad.to(grad_ptr.dtype.element_ty), mask=cmask[:, None] & inside[None, :])


# --------------------------------------------------------------------------------------------
# epilogue: partials -> loss(es) and the backward state, in one program
# --------------------------------------------------------------------------------------------


@triton.jit
def tversky_terms(i, p, g, c1, t_alpha, t_beta, smoothing):
    """``(1 - T, dT/dI, dT/dP)`` of the Tversky index ``T = (I + s) / (I + a (P - I) +
    b (G - I) + s)``, in the shared maths' operation order (a perfect prediction, ``P = G =
    I``, scores exactly 1 for any weights); ``c1 = 1 - a - b`` is the denominator's slope in
    ``I``. The slopes divide twice by the denominator ``D`` (``(1 - c1 N/D) / D`` and ``-a
    (N/D) / D``): ``1 / D^2`` would overflow for a ``D`` near the smallest smoothing allowed
    (a class absent and predicted absent), and the gradient turn NaN."""
    num = i + smoothing
    den = i + t_alpha * (p - i) + t_beta * (g - i) + smoothing
    ratio = num / den
    return 1.0 - ratio, (1.0 - c1 * ratio) / den, -t_alpha * ratio / den


@triton.jit
def region_block_sums(work_ptr, first, count, C, cls, cmask, BLOCK_R: tl.constexpr,
                      CP: tl.constexpr):
    """``(I, P, G)`` over partial rows ``first .. first + count - 1`` (each ``3 * C`` floats),
    summed tile by tile in a fixed order."""
    acc_i = tl.zeros([BLOCK_R, CP], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_R, CP], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_R, CP], dtype=tl.float32)
    for r0 in range(0, count, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        msk = (r < count)[:, None] & cmask[None, :]
        offs = (first + r)[:, None] * (3 * C) + cls[None, :]
        acc_i += tl.load(work_ptr + offs, mask=msk, other=0.0)
        acc_p += tl.load(work_ptr + offs + C, mask=msk, other=0.0)
        acc_g += tl.load(work_ptr + offs + 2 * C, mask=msk, other=0.0)
    return tl.sum(acc_i, axis=0), tl.sum(acc_p, axis=0), tl.sum(acc_g, axis=0)


@triton.jit
def _epilogue_kernel(
    work_ptr, out_ptr, out_r_ptr, out_d_ptr, state_ptr, cw_ptr,
    N, C, S, P, misc_offset, count_host, counted, c1, t_alpha, t_beta, smoothing, w_region,
    w_dist,
    DO_REGION: tl.constexpr, DO_PIXEL: tl.constexpr, HAS_IGNORE: tl.constexpr,
    WEIGHTED_MEAN: tl.constexpr, PER_IMAGE: tl.constexpr, REDUCTION: tl.constexpr,
    OUTPUT: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr, FIRST_CLASS: tl.constexpr,
    CP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The loss from the partials (one program; fixed summation order).

    Writes ``out`` (region: the reduced ``1 - T``, or every entry with ``REDUCTION == NONE``;
    distribution: the mean or sum; composite: ``w_r * region + w_d * distribution`` with the
    terms in ``out_r`` and ``out_d``), each times NaN when a bad element was counted, and
    ``state = [NaN factor, pixel divisor, d loss/dI of each entry, d loss/dP of each entry]``
    (entries: the ``C`` classes pooled over the batch, or the ``N * C`` (sample, class) pairs
    with ``PER_IMAGE``). A class's entries are multiplied by its weight (``cw_ptr``, with
    ``HAS_CLASS_WEIGHT``) and by 0 below ``FIRST_CLASS``; ``counted``: the entries the mean
    divides by (those from ``FIRST_CLASS`` on).
    """
    # pixel sums and bad counts of every program
    lsum = tl.zeros([BLOCK_P], dtype=tl.float32)
    kept = tl.zeros([BLOCK_P], dtype=tl.int64)
    wsum = tl.zeros([BLOCK_P], dtype=tl.float32)
    bad = tl.zeros([BLOCK_P], dtype=tl.int64)
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        pm = pp < P
        misc = work_ptr + misc_offset + pp * 3
        if DO_PIXEL:
            lsum += tl.load(misc, mask=pm, other=0.0)
            if WEIGHTED_MEAN:
                wsum += tl.load(misc + 1, mask=pm, other=0.0)
            elif HAS_IGNORE:
                kept += tl.load(misc + 1, mask=pm, other=0.0).to(tl.int32, bitcast=True).to(
                    tl.int64)
        bad += tl.load(misc + 2, mask=pm, other=0.0).to(tl.int32, bitcast=True).to(tl.int64)
    poison = tl.where(tl.sum(bad, axis=0) > 0, float("nan"), 1.0)
    tl.store(state_ptr, poison)
    if DO_PIXEL:
        if WEIGHTED_MEAN:  # the kept pixels' class weights; 1 where they sum to 0 (a loss of 0)
            total_weight = tl.sum(wsum, axis=0)
            divisor = tl.where(total_weight > 0.0, total_weight, 1.0)
        elif HAS_IGNORE:
            divisor = tl.maximum(tl.sum(kept, axis=0), 1).to(tl.float32)
        else:
            divisor = count_host
        if OUTPUT == 1:
            if REDUCTION == 1:
                divisor = 1.0
        tl.store(state_ptr + 1, divisor)
        dist = tl.sum(lsum, axis=0) / divisor
    else:
        tl.store(state_ptr + 1, 1.0)
    if DO_REGION:
        cls = tl.arange(0, CP)
        cmask = cls < C
        if HAS_CLASS_WEIGHT:
            mult = tl.load(cw_ptr + cls, mask=cmask, other=0.0)
        else:
            mult = tl.where(cmask, 1.0, 0.0)
        if FIRST_CLASS > 0:
            mult = tl.where(cls >= FIRST_CLASS, mult, 0.0)
        if PER_IMAGE:
            E = N * C
        else:
            E = C
        if REDUCTION == 0:
            scale = 1.0 / counted
        else:
            scale = 1.0
        if PER_IMAGE:
            total = tl.zeros([CP], dtype=tl.float32)
            for n in range(0, N):
                i, p, g = region_block_sums(work_ptr, n * S, S, C, cls, cmask, BLOCK_R, CP)
                loss, d_i, d_p = tversky_terms(i, p, g, c1, t_alpha, t_beta, smoothing)
                e = n * C + cls
                tl.store(state_ptr + 2 + e, -scale * mult * d_i, mask=cmask)
                tl.store(state_ptr + 2 + E + e, -scale * mult * d_p, mask=cmask)
                if REDUCTION == 2:
                    tl.store(out_ptr + e, loss * mult * poison, mask=cmask)
                total += tl.where(cmask, loss * mult, 0.0)
        else:
            i, p, g = region_block_sums(work_ptr, 0, N * S, C, cls, cmask, BLOCK_R, CP)
            loss, d_i, d_p = tversky_terms(i, p, g, c1, t_alpha, t_beta, smoothing)
            tl.store(state_ptr + 2 + cls, -scale * mult * d_i, mask=cmask)
            tl.store(state_ptr + 2 + E + cls, -scale * mult * d_p, mask=cmask)
            if REDUCTION == 2:
                tl.store(out_ptr + cls, loss * mult * poison, mask=cmask)
            total = tl.where(cmask, loss * mult, 0.0)
        region = tl.sum(total, axis=0) * 1.0
        if REDUCTION == 0:
            region = region / counted
    if OUTPUT == 0:
        if REDUCTION != 2:
            tl.store(out_ptr, region * poison)
    elif OUTPUT == 1:
        tl.store(out_ptr, dist * poison)
    else:
        region = region * poison
        dist = dist * poison
        tl.store(out_ptr, w_region * region + w_dist * dist)
        tl.store(out_r_ptr, region)
        tl.store(out_d_ptr, dist)


# --------------------------------------------------------------------------------------------
# launchers (shared by the eager autograd Functions and the torch.library custom ops)
# --------------------------------------------------------------------------------------------


def _ignore(spec: FusedSpec) -> tuple[bool, int]:
    return spec.ignore_index is not None, (0 if spec.ignore_index is None else
                                            int(spec.ignore_index))


def elementwise(spec: FusedSpec) -> bool:
    """A distribution loss with ``reduction="none"``: per-element losses, no epilogue."""
    return spec.output == DISTRIBUTION and spec.reduction == NONE


def output_shape(spec: FusedSpec, n: int, c: int, m: int = 1) -> tuple[int, ...]:
    """Shape of the fused call's ``out``: ``(C,)`` / ``(N, C)`` for a region loss with
    ``reduction="none"``, ``(N, C, M)`` (multiclass ``(N, M)``) for a distribution loss with
    it, else 0-dim."""
    if spec.output == REGION and spec.reduction == NONE:
        return (n, c) if spec.per_image else (c,)
    if elementwise(spec):
        return (n, m) if spec.multiclass else (n, c, m)
    return ()


def state_size(spec: FusedSpec, n: int, c: int) -> int:
    """Floats of the backward state: NaN factor, divisor, 2 per score entry; none for
    per-element losses (their backward reads only the inputs and the upstream gradient)."""
    if elementwise(spec):
        return 0
    if not spec.do_region:
        return 2
    return 2 + 2 * (n * c if spec.per_image else c)


@on_input_device
def fused_forward(xk: Tensor, target: Tensor, spec: FusedSpec, alpha: Tensor | None,
                  out: Tensor, out_r: Tensor | None = None, out_d: Tensor | None = None
                  ) -> Tensor:
    """Launch the streaming forward and the epilogue; returns the backward ``state``.

    ``xk``: ``(N, C, M)`` contiguous; ``target``: from :func:`target_for_kernel`; ``out``
    (and for a composite ``out_r``, ``out_d``): float32 outputs of :func:`output_shape`.
    """
    n, c, m = xk.shape
    geo = geometry(n, c, m, spec.multiclass)
    has_ignore, ignore_value = _ignore(spec)
    misc_offset = geo.region_size if spec.do_region else 0
    state = torch.empty(state_size(spec, n, c), dtype=torch.float32, device=xk.device)
    elements = elementwise(spec)
    # per-element losses: written into out (no partials, no epilogue, an empty state)
    work = out if elements else torch.empty(misc_offset + 3 * geo.programs,
                                            dtype=torch.float32, device=xk.device)
    if spec.multiclass:
        _multiclass_fwd_kernel[(geo.rows, geo.splits)](
            xk, target, work, state if alpha is None else alpha, c, m, geo.chunk, geo.splits,
            misc_offset, ignore_value, spec.gamma, FROM_LOGITS=spec.from_logits,
            HAS_IGNORE=has_ignore, DO_REGION=spec.do_region, DO_PIXEL=spec.do_pixel,
            FOCAL=spec.focal, HAS_ALPHA=alpha is not None, WEIGHTED_MEAN=spec.weighted_mean,
            CP=geo.cp, BLOCK=geo.block, INDEX_64=geo.index_64, ELEMENTS=elements, num_warps=8,
        )
    else:
        has_alpha = spec.alpha is not None
        pos_weight = pos_weight_table(spec, xk.device, c)
        _binary_fwd_kernel[(geo.rows, geo.splits)](
            xk, target, work, state if pos_weight is None else pos_weight, m, c, geo.chunk,
            geo.splits, misc_offset, float(ignore_value), spec.gamma,
            float(spec.alpha) if has_alpha else 0.0,  # type: ignore[arg-type]
            FROM_LOGITS=spec.from_logits, HAS_IGNORE=has_ignore, DO_REGION=spec.do_region,
            DO_PIXEL=spec.do_pixel, FOCAL=spec.focal, HAS_ALPHA=has_alpha,
            HAS_POS_WEIGHT=pos_weight is not None, BLOCK=geo.block, INDEX_64=geo.index_64,
            ELEMENTS=elements, num_warps=4,
        )
    if elements:
        return state
    count = n * m if spec.multiclass else n * c * m
    class_weight = class_weight_table(spec, xk.device)
    counted = (n if spec.per_image else 1) * (c - spec.first_class)  # the region mean's
    _epilogue_kernel[(1,)](
        work, out, out if out_r is None else out_r, out if out_d is None else out_d, state,
        state if class_weight is None else class_weight,
        n, c, geo.splits, geo.programs, misc_offset, float(max(count, 1)),
        float(max(counted, 1)), spec.c1,
        spec.tversky_alpha, spec.tversky_beta, spec.smoothing, spec.region_weight,
        spec.distribution_weight, DO_REGION=spec.do_region, DO_PIXEL=spec.do_pixel,
        HAS_IGNORE=has_ignore, WEIGHTED_MEAN=spec.weighted_mean, PER_IMAGE=spec.per_image,
        REDUCTION=spec.reduction, OUTPUT=spec.output,
        HAS_CLASS_WEIGHT=class_weight is not None, FIRST_CLASS=spec.first_class,
        CP=geo.cp, BLOCK_R=geo.block_r, BLOCK_P=1024, num_warps=4,
    )
    return state


@on_input_device
def fused_backward(xk: Tensor, target: Tensor, spec: FusedSpec, alpha: Tensor | None,
                   state: Tensor, grad_combined: Tensor | None, grad_region: Tensor | None,
                   grad_distribution: Tensor | None) -> Tensor:
    """Launch the backward pass: ``dL/dx`` (``xk``'s shape and dtype) from the upstream
    gradients (None: zero) of the combined loss, the region term and the pixel term."""
    n, c, m = xk.shape
    geo = geometry(n, c, m, spec.multiclass)
    has_ignore, ignore_value = _ignore(spec)
    grad = torch.empty_like(xk)
    gr_vector = grad_region is not None and grad_region.dim() > 0
    if gr_vector and not grad_region.is_contiguous():  # type: ignore[union-attr]
        grad_region = grad_region.contiguous()  # type: ignore[union-attr]
    elements = elementwise(spec)
    if elements and grad_distribution is not None:  # one upstream value per element
        grad_distribution = grad_distribution.to(torch.float32).contiguous()
    entries = n * c if spec.per_image else c
    flags = dict(
        FROM_LOGITS=spec.from_logits, HAS_IGNORE=has_ignore, DO_REGION=spec.do_region,
        DO_PIXEL=spec.do_pixel, FOCAL=spec.focal, PER_IMAGE=spec.per_image,
        HAS_GC=grad_combined is not None, HAS_GR=grad_region is not None,
        HAS_GD=grad_distribution is not None, GR_VECTOR=gr_vector, BLOCK=geo.block,
        INDEX_64=geo.index_64, ELEMENTS=elements,
    )
    gc = state if grad_combined is None else grad_combined
    gr = state if grad_region is None else grad_region
    gd = state if grad_distribution is None else grad_distribution
    if spec.multiclass:
        _multiclass_bwd_kernel[(geo.rows, geo.splits)](
            xk, target, grad, state, gc, gr, gd, state if alpha is None else alpha, c, m,
            geo.chunk, entries, ignore_value, spec.gamma, spec.region_weight,
            spec.distribution_weight, HAS_ALPHA=alpha is not None, CP=geo.cp, num_warps=8,
            **flags,
        )
    else:
        has_alpha = spec.alpha is not None
        pos_weight = pos_weight_table(spec, xk.device, c)
        _binary_bwd_kernel[(geo.rows, geo.splits)](
            xk, target, grad, state, gc, gr, gd, state if pos_weight is None else pos_weight,
            m, c, geo.chunk, entries, float(ignore_value), spec.gamma,
            float(spec.alpha) if has_alpha else 0.0,  # type: ignore[arg-type]
            spec.region_weight, spec.distribution_weight, HAS_ALPHA=has_alpha,
            HAS_POS_WEIGHT=pos_weight is not None, num_warps=4, **flags,
        )
    return grad


def prepare_inputs(x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` contiguous and in memory as it reads (a tensor with the negative bit set holds
    ``-x``), and the target as the kernels load it (no copy when already so)."""
    x = x.resolve_neg()
    return (x if x.is_contiguous() else x.contiguous()), target_for_kernel(target)


def new_outputs(spec: FusedSpec, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Fresh float32 outputs of a fused call (three 0-dim tensors for a composite)."""
    n, c, m = x.shape
    out = torch.empty(output_shape(spec, n, c, m), dtype=torch.float32, device=x.device)
    if spec.output != COMPOSITE:
        return out, None, None
    return (out, torch.empty((), dtype=torch.float32, device=x.device),
            torch.empty((), dtype=torch.float32, device=x.device))


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _layout(x: Tensor, target: Tensor, mode: str) -> Layout:
    return Layout(x, target, mode, x.shape)


def reference_outputs(x: Tensor, target: Tensor, mode: str,
                      params: RegionParams | DistributionParams | CompositeParams,
                      checked: bool) -> tuple[Tensor, ...]:
    """The same outputs as a fused call, through the reference backend (a differentiable
    recomputation for ``create_graph=True``)."""
    layout = _layout(x, target, mode)
    if isinstance(params, RegionParams):
        if params.reduction == "none" and not params.include_background:
            # the kernels' every-class scores: class 0's times 0 (the caller cuts it)
            multipliers = reference.class_multipliers(params, layout.num_classes)
            params = dataclasses.replace(params, include_background=True,
                                         class_weight=multipliers)
        return (reference.REFERENCE.region(layout, params, checked),)
    if isinstance(params, DistributionParams):
        if params.reduction == "none":  # the kernels' shape: (N, C, M), multiclass (N, M)
            layout = Layout(x, target, mode, target.shape if mode == MULTICLASS_MODE
                            else x.shape)
        return (reference.REFERENCE.distribution(layout, params, checked),)
    return reference.REFERENCE.composite(layout, params, checked)


class TritonFusedLoss(torch.autograd.Function):
    """A region, distribution (BCE/Focal) or composite loss in three launches (two for
    per-element losses).

    ``forward(x, target, mode, params, checked)`` returns the loss (0-dim; ``(C,)`` /
    ``(N, C)`` for a region loss with ``reduction="none"``, ``(N, C, M)`` (multiclass
    ``(N, M)``) for a distribution loss with it); a composite returns ``(combined, region,
    distribution)``. Saves the inputs and a state of ``2 + 2 E`` floats (none for
    per-element losses).
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str,
                params: RegionParams | DistributionParams | CompositeParams, checked: bool):
        spec = spec_for(params)
        xk, target_k = prepare_inputs(x, target)
        alpha = alpha_table(spec, x.device)
        out, out_r, out_d = new_outputs(spec, xk)
        state = fused_forward(xk, target_k, spec, alpha, out, out_r, out_d)
        ctx.save_for_backward(x, target, xk, target_k, state)
        ctx.config = (spec, alpha, mode, params, checked)
        ctx.set_materialize_grads(False)
        if out_r is None:
            return out
        return out, out_r, out_d

    @staticmethod
    def backward(ctx, *grads):
        x, target, xk, target_k, state = ctx.saved_tensors
        spec, alpha, mode, params, checked = ctx.config
        nones = (None,) * 4
        if all(g is None for g in grads):
            return (None, *nones)
        if must_recompute(*grads):  # create_graph=True, or batched: through the reference
            grads_x = recompute_backward(
                lambda xs: reference_outputs(xs, target, mode, params, checked), (x,), grads)
            return (grads_x[0], *nones)
        if spec.output == COMPOSITE:
            g_c, g_r, g_d = grads
        elif spec.output == REGION:
            g_c, g_r, g_d = None, grads[0], None
        else:
            g_c, g_r, g_d = None, None, grads[0]
        grad = fused_backward(xk, target_k, spec, alpha, state, g_c, g_r, g_d)
        return (grad, *nones)


@on_input_device
def sums_forward(xk: Tensor, target: Tensor, spec: FusedSpec) -> Tensor:
    """``(N, 3, C)`` float32 region sums (the streaming pass plus one torch sum)."""
    n, c, m = xk.shape
    geo = geometry(n, c, m, spec.multiclass)
    has_ignore, ignore_value = _ignore(spec)
    work = torch.empty(geo.region_size + 3 * geo.programs, dtype=torch.float32,
                       device=xk.device)
    if spec.multiclass:
        _multiclass_fwd_kernel[(geo.rows, geo.splits)](
            xk, target, work, work, c, m, geo.chunk, geo.splits, geo.region_size,
            ignore_value, 0.0, FROM_LOGITS=spec.from_logits, HAS_IGNORE=has_ignore,
            DO_REGION=True, DO_PIXEL=False, FOCAL=False, HAS_ALPHA=False, WEIGHTED_MEAN=False,
            CP=geo.cp, BLOCK=geo.block, INDEX_64=geo.index_64, num_warps=8,
        )
    else:
        _binary_fwd_kernel[(geo.rows, geo.splits)](
            xk, target, work, work, m, c, geo.chunk, geo.splits, geo.region_size,
            float(ignore_value), 0.0, 0.0, FROM_LOGITS=spec.from_logits,
            HAS_IGNORE=has_ignore, DO_REGION=True, DO_PIXEL=False, FOCAL=False,
            HAS_ALPHA=False, HAS_POS_WEIGHT=False, BLOCK=geo.block, INDEX_64=geo.index_64,
            num_warps=4,
        )
    return work[:geo.region_size].view(n, geo.splits, 3, c).sum(1)


class TritonRegionSums(torch.autograd.Function):
    """``(I, P, G)``, each ``(N, C)`` float32, by one Triton pass; same contract as
    :class:`dynloss.kernels.torch_backend.RegionSums` (``G`` is not differentiable). Used
    where the sums are combined by torch operations (``ddp_pool=True``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, params: RegionParams, checked: bool):
        spec = spec_for(params)
        xk, target_k = prepare_inputs(x, target)
        sums = sums_forward(xk, target_k, spec)
        ctx.save_for_backward(x, target, xk, target_k)
        ctx.config = (spec, params, checked)
        intersection, prediction_sum, target_sum = sums.unbind(1)
        ctx.mark_non_differentiable(target_sum)
        return intersection, prediction_sum, target_sum

    @staticmethod
    def backward(ctx, grad_intersection, grad_prediction_sum, _grad_target_sum):
        x, target, xk, target_k = ctx.saved_tensors
        spec, params, checked = ctx.config
        nones = (None,) * 3
        if grad_intersection is None and grad_prediction_sum is None:
            return (None, *nones)
        if must_recompute(grad_intersection, grad_prediction_sum):  # (create_graph=True)
            grads = recompute_backward(
                lambda xs: reference.region_sums(_layout(xs, target, params.mode),
                                                 params.from_logits, params.ignore_index,
                                                 checked)[:2],
                (x,), (grad_intersection, grad_prediction_sum))
            return (grads[0], *nones)
        n, c, _ = xk.shape
        zeros = xk.new_zeros((n, c), dtype=torch.float32)
        gi = zeros if grad_intersection is None else grad_intersection.float()
        gp = zeros if grad_prediction_sum is None else grad_prediction_sum.float()
        # the state layout of a per-image region loss, with a unit upstream gradient
        state = torch.cat([xk.new_tensor([1.0, 1.0], dtype=torch.float32),
                           gi.expand(n, c).reshape(-1), gp.expand(n, c).reshape(-1)])
        per_image = FusedSpec(REGION, spec.multiclass, spec.from_logits, spec.ignore_index,
                              True, False, True, SUM, 0.0, 0.0, 0.0, 0.0, 0.0, None, 1.0, 0.0)
        one = xk.new_ones((), dtype=torch.float32)
        grad = fused_backward(xk, target_k, per_image, None, state, None, one, None)
        return (grad, *nones)
