"""Triton streaming kernels: region sums and per-element losses in one pass, and backward.

One streaming kernel reads the logits and the target once and produces, per program, float32
partial sums of ``I = sum(p*g)``, ``P = sum(p)``, ``G = sum(g)`` (flag ``DO_REGION``) and/or
of the per-element BCE/focal loss and the kept count (flag ``DO_PIXEL``). The partials are
reduced by a deterministic ``torch.sum`` over a few thousand values. One elementwise backward
kernel writes ``dL/dx`` from the saved inputs and the ``(N, C)`` gradients of the sums (and
the scalar gradient of the pixel-loss sum). The same two kernels serve:

* :class:`TritonRegionSums` (``DO_REGION`` only): what Dice, IoU and Tversky need;
* :class:`dynloss.kernels.triton.topk.TritonDistributionSum` (``DO_PIXEL`` only): BCE, Focal;
* :class:`TritonRegionDistribution` (both): Dice+BCE and friends in one forward and one
  backward pass.

Binary/multilabel inputs are ``(N, C, M)`` with a target of the same shape (any dtype);
multiclass inputs are ``(N, C, M)`` with ``(N, M)`` integer class indices, the softmax over
``C`` is computed in-kernel and no one-hot tensor is ever materialised.

Kept multiclass labels outside ``[0, C)`` are left out of every sum and every load (the
caller makes the loss NaN for them), so no index is ever read past its table. Offsets are
int64 when a row or the whole tensor can pass 2^31 elements (``INDEX_64``).

This module imports Triton at import time; :mod:`dynloss.kernels.triton` imports it lazily.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._layout import Layout
from ..._params import CompositeParams
from ...constants import MULTICLASS_MODE
from .. import reference
from .._recompute import recompute_backward
from . import math as tm

BLOCK_BINARY = 1024
"""Elements per tile in the binary/multilabel kernels."""
TILE_MULTICLASS = 4096
"""Classes x pixels per tile in the multiclass kernels (pixels = TILE / next_pow2(C))."""
TARGET_PROGRAMS = 1024
"""Aim for about this many programs in a streaming pass (a few waves on an H100's 132 SMs)."""
INDEX_64_FROM = 2**31 - 2**24
"""Use int64 offsets for tensors of at least this many elements (tests lower it)."""


def index_64(x: Tensor) -> bool:
    """Whether offsets into ``x`` need int64 (an index may pass 2^31)."""
    return x.numel() >= INDEX_64_FROM


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_rows(rows: int, length: int, block: int) -> tuple[int, int]:
    """``(splits, chunk)``: each of ``rows`` rows of ``length`` is cut in ``splits`` chunks.

    ``chunk`` is a multiple of ``block``; the grid is ``(rows, splits)``.
    """
    tiles = max(1, _cdiv(length, block))
    splits = max(1, min(tiles, _cdiv(TARGET_PROGRAMS, max(rows, 1))))
    chunk = _cdiv(tiles, splits) * block
    return _cdiv(max(length, 1), chunk), chunk


def multiclass_block(num_classes: int) -> tuple[int, int]:
    """``(CP, BLOCK_M)``: padded class count and pixels per tile for the multiclass kernels
    (dispatch sends at most :data:`dynloss.kernels.triton.MAX_CLASSES` classes here)."""
    cp = triton.next_power_of_2(num_classes)
    return cp, max(16, TILE_MULTICLASS // cp)


def target_for_kernel(target: Tensor) -> Tensor:
    """A contiguous target that Triton can load (bool is viewed as uint8)."""
    target = target.contiguous()
    return target.view(torch.uint8) if target.dtype == torch.bool else target


@lru_cache(maxsize=64)
def _alpha_table(alpha: tuple[float, ...], device: torch.device) -> Tensor:
    return torch.tensor(alpha, dtype=torch.float32, device=device)


def alpha_args(alpha, mode: str, device: torch.device, dummy: Tensor) -> tuple[bool, float, Tensor]:
    """``(HAS_ALPHA, scalar alpha, per-class table)`` for the kernels.

    The per-class table (multiclass) is cached per device, so repeated calls copy nothing.
    """
    if alpha is None:
        return False, 0.0, dummy
    if mode == MULTICLASS_MODE:
        return True, 0.0, _alpha_table(tuple(float(a) for a in alpha), device)
    return True, float(alpha), dummy


def ignore_args(ignore_index: int | None) -> tuple[bool, int]:
    return (ignore_index is not None), (0 if ignore_index is None else int(ignore_index))


# --------------------------------------------------------------------------------------------
# binary / multilabel
# --------------------------------------------------------------------------------------------


@triton.jit
def chunk_start(split, chunk, INDEX_64: tl.constexpr):
    """First element of chunk ``split``: int64 when offsets may pass 2^31."""
    if INDEX_64:
        start = split.to(tl.int64) * chunk
    else:
        start = split * chunk
    return start


@triton.jit
def _binary_fwd_kernel(
    x_ptr, t_ptr, region_ptr, pixel_ptr,
    M, chunk, splits, ignore_value, gamma, alpha,
    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, DO_REGION: tl.constexpr,
    DO_PIXEL: tl.constexpr, FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, BLOCK: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = row.to(tl.int64) * M
    start = chunk_start(split, chunk, INDEX_64)
    acc_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, chunk, BLOCK):
        m = start + off + tl.arange(0, BLOCK)
        inside = m < M
        x = tl.load(x_ptr + base + m, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + base + m, mask=inside, other=0).to(tl.float32)
        keep = inside
        if HAS_IGNORE:
            keep = keep & (t != ignore_value)
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
            loss = tm.focal(tm.binary_bce(x, g, FROM_LOGITS), gamma, FOCAL)
            if HAS_ALPHA:
                loss = loss * (alpha * g + (1.0 - alpha) * (1.0 - g))
            acc_l += tl.where(keep, loss, 0.0)
            acc_n += keep.to(tl.float32)
    slot = row * splits + split
    if DO_REGION:
        tl.store(region_ptr + slot * 3, tl.sum(acc_i, axis=0))
        tl.store(region_ptr + slot * 3 + 1, tl.sum(acc_p, axis=0))
        tl.store(region_ptr + slot * 3 + 2, tl.sum(acc_g, axis=0))
    if DO_PIXEL:
        tl.store(pixel_ptr + slot * 2, tl.sum(acc_l, axis=0))
        tl.store(pixel_ptr + slot * 2 + 1, tl.sum(acc_n, axis=0))


@triton.jit
def _binary_bwd_kernel(
    x_ptr, t_ptr, grad_ptr, gi_ptr, gp_ptr, gt_ptr,
    M, chunk, ignore_value, gamma, alpha,
    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, DO_REGION: tl.constexpr,
    DO_PIXEL: tl.constexpr, FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, BLOCK: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = row.to(tl.int64) * M
    start = chunk_start(split, chunk, INDEX_64)
    if DO_REGION:
        gi = tl.load(gi_ptr + row)
        gp = tl.load(gp_ptr + row)
    if DO_PIXEL:
        gt = tl.load(gt_ptr)
    for off in range(0, chunk, BLOCK):
        m = start + off + tl.arange(0, BLOCK)
        inside = m < M
        x = tl.load(x_ptr + base + m, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + base + m, mask=inside, other=0).to(tl.float32)
        keep = inside
        if HAS_IGNORE:
            keep = keep & (t != ignore_value)
        g = tl.where(keep, t, 0.0)
        grad = tl.zeros([BLOCK], dtype=tl.float32)
        if DO_REGION:
            region = gp + gi * g
            if FROM_LOGITS:
                p = tm.sigmoid(x)
                region = region * (p * (1.0 - p))
            grad += region
        if DO_PIXEL:
            d = tm.binary_bce_grad(x, g, FROM_LOGITS)
            if FOCAL:
                d = d * tm.focal_grad(tm.binary_bce(x, g, FROM_LOGITS), gamma)
            if HAS_ALPHA:
                d = d * (alpha * g + (1.0 - alpha) * (1.0 - g))
            grad += gt * d
        grad = tl.where(keep, grad, 0.0)
        tl.store(grad_ptr + base + m, grad.to(grad_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------
# multiclass (softmax over C, class-index target)
# --------------------------------------------------------------------------------------------


@triton.jit
def multiclass_tile(x_ptr, t_ptr, n, m, inside, C, M, ignore_index,
                    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, CP: tl.constexpr):
    """Load one ``[CP, BLOCK]`` tile of sample ``n`` at pixels ``m``.

    Returns ``(x, p, b, t, keep, onehot, cmask)``: logits (padded classes hold -inf when
    ``FROM_LOGITS``), probabilities (0 in padded classes), per-pixel cross-entropy ``b``,
    class index ``t`` (0 where not kept), kept-pixel mask and the one-hot mask of ``t``. A
    label outside ``[0, C)`` is compared in its own dtype (no truncation) and not kept.
    """
    cls = tl.arange(0, CP)
    cmask = cls < C
    n64 = n.to(tl.int64)
    ptrs = x_ptr + n64 * C * M + cls[:, None].to(tl.int64) * M + m[None, :]
    x = tl.load(ptrs, mask=cmask[:, None] & inside[None, :], other=0.0).to(tl.float32)
    label = tl.load(t_ptr + n64 * M + m, mask=inside, other=0)
    keep = inside & (label >= 0) & (label < C)
    if HAS_IGNORE:
        keep = keep & (label != ignore_index)
    t = tl.where(keep, label, 0).to(tl.int32)
    onehot = (cls[:, None] == t[None, :]) & keep[None, :]
    if FROM_LOGITS:
        x = tl.where(cmask[:, None], x, float("-inf"))
        mx = tl.max(x, axis=0)
        e = tl.exp(x - mx[None, :])
        s = tl.sum(e, axis=0)
        p = e / s[None, :]
        x_t = tl.sum(tl.where(onehot, x, 0.0), axis=0)
        b = mx + tl.log(s) - x_t
    else:
        x = tl.where(cmask[:, None], x, 0.0)
        p = x
        x_t = tl.sum(tl.where(onehot, x, 0.0), axis=0)
        b = -tm.clamped_log(x_t)
    return x, p, b, t, keep, onehot, cmask


@triton.jit
def multiclass_pixel_grad(x, p, b, t, onehot, coef, alpha_ptr, gamma,
                          FROM_LOGITS: tl.constexpr, FOCAL: tl.constexpr,
                          HAS_ALPHA: tl.constexpr):
    """``[CP, BLOCK]`` gradient of ``coef * a_t * focal(b)`` w.r.t. the logits/probabilities."""
    if FOCAL:
        coef = coef * tm.focal_grad(b, gamma)
    if HAS_ALPHA:
        coef = coef * tl.load(alpha_ptr + t)  # t is a kept class in [0, C), or 0
    if FROM_LOGITS:
        grad = coef[None, :] * (p - onehot.to(tl.float32))
    else:
        x_t = tl.sum(tl.where(onehot, x, 0.0), axis=0)
        d = -coef * tm.clamped_log_slope(x_t)
        grad = tl.where(onehot, d[None, :], 0.0)
    return grad


@triton.jit
def _multiclass_fwd_kernel(
    x_ptr, t_ptr, region_ptr, pixel_ptr, alpha_ptr,
    C, M, chunk, splits, ignore_index, gamma,
    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, DO_REGION: tl.constexpr,
    DO_PIXEL: tl.constexpr, FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr,
    CP: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
):
    n = tl.program_id(0)
    split = tl.program_id(1)
    start = chunk_start(split, chunk, INDEX_64)
    acc_i = tl.zeros([CP, BLOCK], dtype=tl.float32)
    acc_p = tl.zeros([CP, BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([CP, BLOCK], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, chunk, BLOCK):
        m = start + off + tl.arange(0, BLOCK)
        inside = m < M
        _x, p, b, t, keep, onehot, cmask = multiclass_tile(
            x_ptr, t_ptr, n, m, inside, C, M, ignore_index, FROM_LOGITS, HAS_IGNORE, CP
        )
        if DO_REGION:
            kept = keep[None, :] & cmask[:, None]
            acc_i += tl.where(onehot, p, 0.0)
            acc_p += tl.where(kept, p, 0.0)
            acc_g += onehot.to(tl.float32)
        if DO_PIXEL:
            loss = tm.focal(b, gamma, FOCAL)
            if HAS_ALPHA:
                loss = loss * tl.load(alpha_ptr + t)
            acc_l += tl.where(keep, loss, 0.0)
            acc_n += keep.to(tl.float32)
    slot = n * splits + split
    if DO_REGION:
        cls = tl.arange(0, CP)
        cmask = cls < C
        tl.store(region_ptr + (slot * 3) * C + cls, tl.sum(acc_i, axis=1), mask=cmask)
        tl.store(region_ptr + (slot * 3 + 1) * C + cls, tl.sum(acc_p, axis=1), mask=cmask)
        tl.store(region_ptr + (slot * 3 + 2) * C + cls, tl.sum(acc_g, axis=1), mask=cmask)
    if DO_PIXEL:
        tl.store(pixel_ptr + slot * 2, tl.sum(acc_l, axis=0))
        tl.store(pixel_ptr + slot * 2 + 1, tl.sum(acc_n, axis=0))


@triton.jit
def _multiclass_bwd_kernel(
    x_ptr, t_ptr, grad_ptr, gi_ptr, gp_ptr, gt_ptr, alpha_ptr,
    C, M, chunk, ignore_index, gamma,
    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, DO_REGION: tl.constexpr,
    DO_PIXEL: tl.constexpr, FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr,
    CP: tl.constexpr, BLOCK: tl.constexpr, INDEX_64: tl.constexpr,
):
    n = tl.program_id(0)
    split = tl.program_id(1)
    start = chunk_start(split, chunk, INDEX_64)
    cls = tl.arange(0, CP)
    cmask = cls < C
    if DO_REGION:
        gi = tl.load(gi_ptr + n * C + cls, mask=cmask, other=0.0)
        gp = tl.load(gp_ptr + n * C + cls, mask=cmask, other=0.0)
    if DO_PIXEL:
        gt = tl.load(gt_ptr)
    n64 = n.to(tl.int64)
    for off in range(0, chunk, BLOCK):
        m = start + off + tl.arange(0, BLOCK)
        inside = m < M
        x, p, b, t, keep, onehot, cmask = multiclass_tile(
            x_ptr, t_ptr, n, m, inside, C, M, ignore_index, FROM_LOGITS, HAS_IGNORE, CP
        )
        grad = tl.zeros([CP, BLOCK], dtype=tl.float32)
        if DO_REGION:
            if FROM_LOGITS:
                gi_t = tl.sum(tl.where(onehot, gi[:, None], 0.0), axis=0)
                p_t = tl.sum(tl.where(onehot, p, 0.0), axis=0)
                own = p_t * gi_t
                mixed = tl.sum(p * gp[:, None], axis=0) + own
                grad += p * (gp[:, None] - mixed[None, :]) + tl.where(onehot, own[None, :], 0.0)
            else:
                grad += gp[:, None] + tl.where(onehot, gi[:, None], 0.0)
        if DO_PIXEL:
            coef = tl.zeros([BLOCK], dtype=tl.float32) + gt
            grad += multiclass_pixel_grad(
                x, p, b, t, onehot, coef, alpha_ptr, gamma, FROM_LOGITS, FOCAL, HAS_ALPHA
            )
        grad = tl.where(keep[None, :], grad, 0.0)
        ptrs = grad_ptr + n64 * C * M + cls[:, None].to(tl.int64) * M + m[None, :]
        tl.store(ptrs, grad.to(grad_ptr.dtype.element_ty), mask=cmask[:, None] & inside[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def stream_forward(
    x: Tensor, target: Tensor, mode: str, *, from_logits: bool, ignore_index: int | None,
    do_region: bool, do_pixel: bool, gamma: float = 0.0, alpha=None,
) -> tuple[tuple[Tensor, Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """One streaming pass: ``((I, P, G) or None, (loss_sum, kept_count) or None)``.

    ``x``: ``(N, C, M)`` contiguous; ``target``: prepared by :func:`target_for_kernel`.
    """
    n, c, m = x.shape
    dev = x.device
    has_ignore, ignore_value = ignore_args(ignore_index)
    dummy = x.new_empty(1, dtype=torch.float32)
    has_alpha, alpha_scalar, alpha_table = alpha_args(alpha, mode, dev, dummy)
    focal_on = gamma != 0.0
    if mode == MULTICLASS_MODE:
        cp, block = multiclass_block(c)
        splits, chunk = split_rows(n, m, block)
        region = torch.empty((n, splits, 3, c) if do_region else (1,), dtype=torch.float32,
                             device=dev)
        pixel = torch.empty((n * splits, 2) if do_pixel else (1,), dtype=torch.float32,
                            device=dev)
        _multiclass_fwd_kernel[(n, splits)](
            x, target, region, pixel, alpha_table, c, m, chunk, splits, ignore_value,
            float(gamma), FROM_LOGITS=from_logits, HAS_IGNORE=has_ignore, DO_REGION=do_region,
            DO_PIXEL=do_pixel, FOCAL=focal_on, HAS_ALPHA=has_alpha, CP=cp, BLOCK=block,
            INDEX_64=index_64(x), num_warps=8,
        )
        sums = None
        if do_region:
            totals = region.sum(1)  # (N, 3, C)
            sums = (totals[:, 0], totals[:, 1], totals[:, 2])
    else:
        rows = n * c
        splits, chunk = split_rows(rows, m, BLOCK_BINARY)
        region = torch.empty((n, c, splits, 3) if do_region else (1,), dtype=torch.float32,
                             device=dev)
        pixel = torch.empty((rows * splits, 2) if do_pixel else (1,), dtype=torch.float32,
                            device=dev)
        _binary_fwd_kernel[(rows, splits)](
            x, target, region, pixel, m, chunk, splits, float(ignore_value), float(gamma),
            alpha_scalar, FROM_LOGITS=from_logits, HAS_IGNORE=has_ignore, DO_REGION=do_region,
            DO_PIXEL=do_pixel, FOCAL=focal_on, HAS_ALPHA=has_alpha, BLOCK=BLOCK_BINARY,
            INDEX_64=index_64(x), num_warps=4,
        )
        sums = None
        if do_region:
            totals = region.sum(2)  # (N, C, 3)
            sums = (totals[..., 0], totals[..., 1], totals[..., 2])
    pix = None
    if do_pixel:
        # counts are exact integers per program; sum them in float64 so that totals above
        # 2**24 stay exact
        pix = (pixel[:, 0].sum(), pixel[:, 1].to(torch.float64).sum().to(torch.float32))
    return sums, pix


def stream_backward(
    x: Tensor, target: Tensor, mode: str, *, from_logits: bool, ignore_index: int | None,
    grad_intersection: Tensor | None, grad_prediction_sum: Tensor | None,
    grad_total: Tensor | None, gamma: float = 0.0, alpha=None,
) -> Tensor:
    """One elementwise pass: ``dL/dx`` in ``x.dtype`` from the gradients of the sums.

    Region gradients are ``(N, C)`` tensors (``None`` means zero); ``grad_total`` is the
    0-dim gradient of the pixel-loss sum (``None``: no pixel term).
    """
    n, c, m = x.shape
    dev = x.device
    has_ignore, ignore_value = ignore_args(ignore_index)
    dummy = x.new_empty(1, dtype=torch.float32)
    has_alpha, alpha_scalar, alpha_table = alpha_args(alpha, mode, dev, dummy)
    do_region = grad_intersection is not None or grad_prediction_sum is not None
    do_pixel = grad_total is not None
    grad = torch.empty_like(x)
    if not (do_region or do_pixel):
        return grad.zero_()

    def _vec(t: Tensor | None) -> Tensor:
        if t is None:
            return torch.zeros((n, c), dtype=torch.float32, device=dev)
        return t.to(torch.float32).expand(n, c).contiguous()

    gi = _vec(grad_intersection) if do_region else dummy
    gp = _vec(grad_prediction_sum) if do_region else dummy
    gt = grad_total.to(torch.float32).reshape(1).contiguous() if grad_total is not None else dummy
    focal_on = gamma != 0.0
    if mode == MULTICLASS_MODE:
        cp, block = multiclass_block(c)
        splits, chunk = split_rows(n, m, block)
        _multiclass_bwd_kernel[(n, splits)](
            x, target, grad, gi, gp, gt, alpha_table, c, m, chunk, ignore_value, float(gamma),
            FROM_LOGITS=from_logits, HAS_IGNORE=has_ignore, DO_REGION=do_region,
            DO_PIXEL=do_pixel, FOCAL=focal_on, HAS_ALPHA=has_alpha, CP=cp, BLOCK=block,
            INDEX_64=index_64(x), num_warps=8,
        )
    else:
        rows = n * c
        splits, chunk = split_rows(rows, m, BLOCK_BINARY)
        _binary_bwd_kernel[(rows, splits)](
            x, target, grad, gi, gp, gt, m, chunk, float(ignore_value), float(gamma),
            alpha_scalar, FROM_LOGITS=from_logits, HAS_IGNORE=has_ignore, DO_REGION=do_region,
            DO_PIXEL=do_pixel, FOCAL=focal_on, HAS_ALPHA=has_alpha, BLOCK=BLOCK_BINARY,
            INDEX_64=index_64(x), num_warps=4,
        )
    return grad


def _layout(x: Tensor, target: Tensor, mode: str) -> Layout:
    return Layout(x, target, mode, x.shape)


def kept_count(x: Tensor, mode: str, ignore_index: int | None, kept: Tensor) -> Tensor:
    """The normaliser of the mean: the number of elements (known on the host, no reduction)
    or, with ``ignore_index``, the kept count, at least 1."""
    if ignore_index is None:
        numel = x.shape[0] * x.shape[2] * (1 if mode == MULTICLASS_MODE else x.shape[1])
        return torch.full((), float(max(numel, 1)), dtype=torch.float32, device=x.device)
    return kept.clamp_min(1.0)


class TritonRegionSums(torch.autograd.Function):
    """``(I, P, G)``, each ``(N, C)`` float32, by one Triton pass; same contract as
    :class:`dynloss.kernels.torch_backend.RegionSums` (``G`` is not differentiable).

    Saves only the inputs for backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, mode: str, from_logits: bool,
                ignore_index: int | None, checked: bool):
        xk = x.contiguous()
        target_k = target_for_kernel(target)
        sums, _ = stream_forward(xk, target_k, mode, from_logits=from_logits,
                                 ignore_index=ignore_index, do_region=True, do_pixel=False)
        assert sums is not None
        intersection, prediction_sum, target_sum = sums
        ctx.save_for_backward(x, target, xk, target_k)
        ctx.config = (mode, from_logits, ignore_index, checked)
        ctx.mark_non_differentiable(target_sum)
        return intersection, prediction_sum, target_sum

    @staticmethod
    def backward(ctx, grad_intersection, grad_prediction_sum, _grad_target_sum):
        x, target, xk, target_k = ctx.saved_tensors
        mode, from_logits, ignore_index, checked = ctx.config
        nones = (None,) * 5
        if grad_intersection is None and grad_prediction_sum is None:
            return (None, *nones)
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            grads = recompute_backward(
                lambda xs: reference.region_sums(_layout(xs, target, mode), from_logits,
                                                 ignore_index, checked)[:2],
                (x,), (grad_intersection, grad_prediction_sum))
            return (grads[0], *nones)
        grad = stream_backward(
            xk, target_k, mode, from_logits=from_logits, ignore_index=ignore_index,
            grad_intersection=grad_intersection, grad_prediction_sum=grad_prediction_sum,
            grad_total=None,
        )
        return (grad, *nones)


class TritonRegionDistribution(torch.autograd.Function):
    """``(I, P, G, S, count)`` from one pass (a fused composite); ``G`` and ``count`` are not
    differentiable. One elementwise backward pass for whatever combination the caller forms."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, params: CompositeParams, checked: bool):
        region, dist = params.region, params.distribution
        xk = x.contiguous()
        target_k = target_for_kernel(target)
        sums, pix = stream_forward(
            xk, target_k, region.mode, from_logits=region.from_logits,
            ignore_index=region.ignore_index, do_region=True, do_pixel=True, gamma=dist.gamma,
            alpha=dist.alpha,
        )
        assert sums is not None and pix is not None
        intersection, prediction_sum, target_sum = sums
        total, kept = pix
        count = kept_count(xk, region.mode, region.ignore_index, kept)
        ctx.save_for_backward(x, target, xk, target_k)
        ctx.config = (params, checked)
        ctx.mark_non_differentiable(target_sum, count)
        return intersection, prediction_sum, target_sum, total, count

    @staticmethod
    def backward(ctx, grad_intersection, grad_prediction_sum, _grad_target_sum, grad_total,
                 _grad_count):
        x, target, xk, target_k = ctx.saved_tensors
        params, checked = ctx.config
        region, dist = params.region, params.distribution
        nones = (None,) * 3
        if grad_intersection is None and grad_prediction_sum is None and grad_total is None:
            return (None, *nones)
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            def outputs(xs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                layout = _layout(xs, target, region.mode)
                i, p, _ = reference.region_sums(layout, region.from_logits,
                                                region.ignore_index, checked)
                total = reference.distribution_terms(layout, dist, checked)[0].sum()
                return i, p, total

            grads = recompute_backward(outputs, (x,),
                                       (grad_intersection, grad_prediction_sum, grad_total))
            return (grads[0], *nones)
        grad = stream_backward(
            xk, target_k, region.mode, from_logits=region.from_logits,
            ignore_index=region.ignore_index, grad_intersection=grad_intersection,
            grad_prediction_sum=grad_prediction_sum, grad_total=grad_total, gamma=dist.gamma,
            alpha=dist.alpha,
        )
        return (grad, *nones)
