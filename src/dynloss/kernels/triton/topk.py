"""Triton kernels for the distribution losses: BCE / cross-entropy, Focal, and TopK.

BCE and Focal (any ``alpha``, ``ignore_index``) reuse the streaming kernels of
:mod:`dynloss.kernels.triton.stream` with only the distribution term switched on: one forward
pass producing ``(sum, count)``, one elementwise backward pass.

TopK keeps the ``n = ceil(k * kept)`` largest per-element losses. It never sorts: the loss
values are non-negative float32, so their bit patterns order like the values, and a radix
select finds the ``n``-th largest bit pattern (the threshold) with four histogram passes of
8 bits each. Each pass recomputes the losses from the inputs (nothing input-sized is stored),
histograms the ones that match the prefix found so far and adds the block histogram to a
global one with integer atomics (deterministic). Every program re-derives the prefix from the
previous histograms itself, so no host synchronisation and no extra launch is needed. A final
pass sums the losses above the threshold, adds ``missing * threshold`` for the ties that are
taken, and counts the ties of each block; the exclusive prefix sum of those counts lets the
backward pass take exactly the ties with the lowest flat index (the reference rule).

Counts (histograms, ties, the number kept) are int64, so more than 2^31 elements are counted
exactly. NaN losses rank above every other value (their bit patterns are the largest), so a
NaN is always selected and shows in the loss.

Saved for backward: the inputs, plus ``O(num_blocks)`` int64 tie offsets and 3 scalars.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _math
from ..._layout import Layout
from ..._params import DistributionParams
from ...constants import MULTICLASS_MODE
from .. import reference
from .._recompute import recompute_backward
from . import math as tm
from .stream import (
    alpha_args,
    ignore_args,
    kept_count,
    multiclass_block,
    multiclass_pixel_grad,
    multiclass_tile,
    stream_backward,
    stream_forward,
    target_for_kernel,
)

BLOCK_TOPK = 2048
"""Elements (binary) per program in the TopK passes; multiclass uses pixels per tile."""
RADIX_BITS = 8
RADIX_PASSES = 4


# --------------------------------------------------------------------------------------------
# per-block losses (shared by every TopK pass, so all passes see bit-identical values)
# --------------------------------------------------------------------------------------------


@triton.jit
def _topk_block(x_ptr, t_ptr, alpha_ptr, pid, total, C, M, ignore_value, gamma, alpha,
                MULTICLASS: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr,
                FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, CP: tl.constexpr,
                BLOCK: tl.constexpr):
    """Losses (0 where not kept, NaN kept as a positive NaN), their int32 sort keys and the
    kept mask of flat block ``pid``.

    Binary: elements ``pid*BLOCK ...`` of the flat ``(N, C, M)`` tensor; multiclass: pixels
    ``pid*BLOCK ...`` of the flat ``(N, M)`` pixel grid.
    """
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < total
    if MULTICLASS:
        n = idx // M  # a tile may span two samples: each pixel carries its own sample
        m = idx - n * M
        _x, _p, b, t, keep, _onehot, _cmask = multiclass_tile(
            x_ptr, t_ptr, n, m, inside, C, M, ignore_value, FROM_LOGITS, HAS_IGNORE, CP
        )
        loss = tm.focal(b, gamma, FOCAL)
        if HAS_ALPHA:
            loss = loss * tl.load(alpha_ptr + t)
    else:
        x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + idx, mask=inside, other=0).to(tl.float32)
        keep = inside
        if HAS_IGNORE:
            keep = keep & (t != ignore_value)
        g = tl.where(keep, t, 0.0)
        loss = tm.focal(tm.binary_bce(x, g, FROM_LOGITS), gamma, FOCAL)
        if HAS_ALPHA:
            loss = loss * (alpha * g + (1.0 - alpha) * (1.0 - g))
    # NaN as the positive quiet NaN, whose bit pattern ranks above +inf: always selected
    loss = tl.where(loss == loss, loss, float("nan"))
    loss = tl.where(keep & ~(loss <= 0.0), loss, 0.0)
    key = loss.to(tl.int32, bitcast=True)
    return loss, key, keep


@triton.jit
def _topk_resolve(hist_ptr, state_ptr, n_host, PASSES: tl.constexpr, N_FROM_HOST: tl.constexpr):
    """Walk the first ``PASSES`` histograms: ``(prefix, remaining, n)``, all int64.

    ``prefix`` holds the top ``8*PASSES`` bits of the threshold key, ``remaining`` how many
    elements with exactly that prefix are still to be taken, ``n`` the number to keep.
    """
    bins = tl.arange(0, 256)
    if N_FROM_HOST:
        n = n_host.to(tl.int64)
    else:
        # n = ceil(round(k * kept, 9)) clamped to [1, kept]; k (float64) sits in state_ptr
        kept = tl.sum(tl.load(hist_ptr + bins), axis=0)
        k = tl.load(state_ptr)
        v = k * kept.to(tl.float64)
        v = tl.floor(v * 1e9 + 0.5) / 1e9
        n = tl.ceil(v).to(tl.int64)
        n = tl.minimum(tl.maximum(n, 1), kept)
    remaining = n
    prefix = n * 0
    for p in tl.static_range(PASSES):
        h = tl.load(hist_ptr + p * 256 + bins)
        above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0)
        cond = (above < remaining) & (above + h >= remaining)
        digit = tl.sum(tl.where(cond, bins, 0), axis=0).to(tl.int64)
        remaining = remaining - tl.sum(tl.where(cond, above, 0), axis=0)
        prefix = (prefix << 8) | digit
    return prefix, remaining, n


@triton.jit(do_not_specialize=["n_host"])
def _topk_hist_kernel(
    x_ptr, t_ptr, alpha_ptr, hist_ptr, state_ptr, n_host,
    total, C, M, ignore_value, gamma, alpha,
    PASS: tl.constexpr, N_FROM_HOST: tl.constexpr, MULTICLASS: tl.constexpr,
    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, FOCAL: tl.constexpr,
    HAS_ALPHA: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    _loss, key, keep = _topk_block(
        x_ptr, t_ptr, alpha_ptr, pid, total, C, M, ignore_value, gamma, alpha,
        MULTICLASS, FROM_LOGITS, HAS_IGNORE, FOCAL, HAS_ALPHA, CP, BLOCK,
    )
    match = keep
    if PASS > 0:
        prefix, _remaining, _n = _topk_resolve(hist_ptr, state_ptr, n_host, PASS, N_FROM_HOST)
        match = match & ((key >> (32 - 8 * PASS)).to(tl.int64) == prefix)
    digit = (key >> (24 - 8 * PASS)) & 255
    hist = tl.histogram(digit, 256, mask=match).to(tl.int64)
    # after the first pass most bins are empty: skip their atomics (less L2 contention)
    tl.atomic_add(hist_ptr + PASS * 256 + tl.arange(0, 256), hist, mask=hist > 0)


@triton.jit(do_not_specialize=["n_host"])
def _topk_final_kernel(
    x_ptr, t_ptr, alpha_ptr, hist_ptr, state_ptr, n_host, partial_ptr, ties_ptr,
    total, C, M, ignore_value, gamma, alpha,
    N_FROM_HOST: tl.constexpr, MULTICLASS: tl.constexpr,
    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, FOCAL: tl.constexpr,
    HAS_ALPHA: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    loss, key, keep = _topk_block(
        x_ptr, t_ptr, alpha_ptr, pid, total, C, M, ignore_value, gamma, alpha,
        MULTICLASS, FROM_LOGITS, HAS_IGNORE, FOCAL, HAS_ALPHA, CP, BLOCK,
    )
    threshold, remaining, n = _topk_resolve(hist_ptr, state_ptr, n_host, 4, N_FROM_HOST)
    key64 = key.to(tl.int64)
    above = keep & (key64 > threshold)
    tie = keep & (key64 == threshold)
    part = tl.sum(tl.where(above, loss, 0.0), axis=0)
    if pid == 0:
        # the ties taken all equal the threshold value
        value = threshold.to(tl.int32).to(tl.float32, bitcast=True)
        part += tl.where(remaining > 0, remaining.to(tl.float32) * value, 0.0)
        out = state_ptr.to(tl.pointer_type(tl.int64))
        tl.store(out + 1, threshold)
        tl.store(out + 2, remaining)
        tl.store(out + 3, n)
    tl.store(partial_ptr + pid, part)
    tl.store(ties_ptr + pid, tl.sum(tie.to(tl.int64), axis=0))


@triton.jit
def _topk_bwd_kernel(
    x_ptr, t_ptr, alpha_ptr, grad_ptr, gt_ptr, state_ptr, ties_ptr,
    total, C, M, ignore_value, gamma, alpha,
    MULTICLASS: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr,
    FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    _loss, key, keep = _topk_block(
        x_ptr, t_ptr, alpha_ptr, pid, total, C, M, ignore_value, gamma, alpha,
        MULTICLASS, FROM_LOGITS, HAS_IGNORE, FOCAL, HAS_ALPHA, CP, BLOCK,
    )
    st = state_ptr.to(tl.pointer_type(tl.int64))
    threshold = tl.load(st + 1)
    remaining = tl.load(st + 2)
    key64 = key.to(tl.int64)
    tie = keep & (key64 == threshold)
    rank = tl.load(ties_ptr + pid) + tl.cumsum(tie.to(tl.int64), axis=0) - 1
    selected = keep & ((key64 > threshold) | (tie & (rank < remaining)))
    coef = tl.where(selected, tl.load(gt_ptr), 0.0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < total
    if MULTICLASS:
        n = idx // M
        m = idx - n * M
        x, p, b, t, _keep, onehot, cmask = multiclass_tile(
            x_ptr, t_ptr, n, m, inside, C, M, ignore_value, FROM_LOGITS, HAS_IGNORE, CP
        )
        offs = n[None, :] * C * M + tl.arange(0, CP)[:, None].to(tl.int64) * M + m[None, :]
        tmask = cmask[:, None] & inside[None, :]
        grad = multiclass_pixel_grad(
            x, p, b, t, onehot, coef, alpha_ptr, gamma, FROM_LOGITS, FOCAL, HAS_ALPHA
        )
        grad = tl.where(keep[None, :], grad, 0.0)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=tmask)
    else:
        x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + idx, mask=inside, other=0).to(tl.float32)
        g = tl.where(keep, t, 0.0)
        d = tm.binary_bce_grad(x, g, FROM_LOGITS)
        if FOCAL:
            d = d * tm.focal_grad(tm.binary_bce(x, g, FROM_LOGITS), gamma)
        if HAS_ALPHA:
            d = d * (alpha * g + (1.0 - alpha) * (1.0 - g))
        grad = tl.where(keep, coef * d, 0.0)
        tl.store(grad_ptr + idx, grad.to(grad_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _topk_geometry(x: Tensor, mode: str) -> tuple[bool, int, int, int, int]:
    """``(multiclass, total, CP, BLOCK, programs)`` of the flat TopK passes."""
    n, c, m = x.shape
    if mode == MULTICLASS_MODE:
        cp, block = multiclass_block(c)
        total = n * m
        return True, total, cp, block, max(1, triton.cdiv(total, block))
    total = n * c * m
    return False, total, 1, BLOCK_TOPK, max(1, triton.cdiv(total, BLOCK_TOPK))


def topk_forward(
    x: Tensor, target: Tensor, mode: str, *, from_logits: bool, ignore_index: int | None,
    gamma: float, alpha, k: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(total, count, state, tie_offsets)`` of TopK by radix select; no host sync."""
    multiclass, total, cp, block, programs = _topk_geometry(x, mode)
    _, c, m = x.shape
    dev = x.device
    has_ignore, ignore_value = ignore_args(ignore_index)
    dummy = x.new_empty(1, dtype=torch.float32)
    has_alpha, alpha_scalar, alpha_table = alpha_args(alpha, mode, dev, dummy)
    # without ignore_index every element is kept (an out-of-range label makes the loss NaN)
    n_from_host = ignore_index is None
    n_host = _math.topk_count(k, total) if n_from_host else 0
    hist = torch.zeros(RADIX_PASSES * 256, dtype=torch.int64, device=dev)
    # state: float64 k in slot 0, then int64 [threshold, remaining, n] in slots 1..3
    state = torch.full((4,), k, dtype=torch.float64, device=dev)
    partial = torch.empty(programs, dtype=torch.float32, device=dev)
    ties = torch.empty(programs, dtype=torch.int64, device=dev)
    ignore_arg = ignore_value if multiclass else float(ignore_value)
    common = dict(
        MULTICLASS=multiclass, FROM_LOGITS=from_logits, HAS_IGNORE=has_ignore,
        FOCAL=gamma != 0.0, HAS_ALPHA=has_alpha, CP=cp, BLOCK=block,
        num_warps=8 if multiclass else 4,
    )
    for p in range(RADIX_PASSES):
        _topk_hist_kernel[(programs,)](
            x, target, alpha_table, hist, state, n_host, total, c, m, ignore_arg,
            float(gamma), alpha_scalar, PASS=p, N_FROM_HOST=n_from_host, **common,
        )
    _topk_final_kernel[(programs,)](
        x, target, alpha_table, hist, state, n_host, partial, ties, total, c, m, ignore_arg,
        float(gamma), alpha_scalar, N_FROM_HOST=n_from_host, **common,
    )
    loss_sum = partial.sum()
    n_kept = state.view(torch.int64)[3]
    count = n_kept.clamp_min(1).to(torch.float32)
    tie_offsets = torch.cumsum(ties, 0) - ties
    return loss_sum, count, state, tie_offsets


def topk_backward(
    x: Tensor, target: Tensor, mode: str, *, from_logits: bool, ignore_index: int | None,
    gamma: float, alpha, state: Tensor, tie_offsets: Tensor, grad_total: Tensor,
) -> Tensor:
    """``dL/dx`` of TopK: the distribution loss's gradient on the selected elements only."""
    multiclass, total, cp, block, programs = _topk_geometry(x, mode)
    _, c, m = x.shape
    dev = x.device
    has_ignore, ignore_value = ignore_args(ignore_index)
    dummy = x.new_empty(1, dtype=torch.float32)
    has_alpha, alpha_scalar, alpha_table = alpha_args(alpha, mode, dev, dummy)
    grad = torch.empty_like(x)
    gt = grad_total.to(torch.float32).reshape(1).contiguous()
    _topk_bwd_kernel[(programs,)](
        x, target, alpha_table, grad, gt, state, tie_offsets, total, c, m,
        ignore_value if multiclass else float(ignore_value), float(gamma), alpha_scalar,
        MULTICLASS=multiclass, FROM_LOGITS=from_logits, HAS_IGNORE=has_ignore,
        FOCAL=gamma != 0.0, HAS_ALPHA=has_alpha, CP=cp, BLOCK=block,
        num_warps=8 if multiclass else 4,
    )
    return grad


class TritonDistributionSum(torch.autograd.Function):
    """``(S, count)`` by Triton; same contract as
    :class:`dynloss.kernels.torch_backend.DistributionSum` (``count`` is not differentiable).

    ``k=None``: one streaming pass (BCE / Focal, ``alpha``, ``ignore_index``). ``k`` given:
    TopK by radix select (five passes forward, one backward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, params: DistributionParams, checked: bool):
        xk = x.contiguous()
        target_k = target_for_kernel(target)
        if params.k is None:
            _, pix = stream_forward(xk, target_k, params.mode, from_logits=params.from_logits,
                                    ignore_index=params.ignore_index, do_region=False,
                                    do_pixel=True, gamma=params.gamma, alpha=params.alpha)
            assert pix is not None
            total, kept = pix
            count = kept_count(xk, params.mode, params.ignore_index, kept)
            ctx.save_for_backward(x, target, xk, target_k)
        else:
            total, count, state, tie_offsets = topk_forward(
                xk, target_k, params.mode, from_logits=params.from_logits,
                ignore_index=params.ignore_index, gamma=params.gamma, alpha=params.alpha,
                k=params.k)
            ctx.save_for_backward(x, target, xk, target_k, state, tie_offsets)
        ctx.config = (params, checked)
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    def backward(ctx, grad_total, _grad_count):
        params, checked = ctx.config
        nones = (None,) * 3
        if grad_total is None:
            return (None, *nones)
        x, target, xk, target_k = ctx.saved_tensors[:4]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            def value(xs: Tensor) -> Tensor:
                layout = Layout(xs, target, params.mode, xs.shape)
                return reference.distribution_sum(layout, params, checked)[0]

            (grad,) = recompute_backward(value, (x,), (grad_total,))
            return (grad, *nones)
        if params.k is None:
            grad = stream_backward(
                xk, target_k, params.mode, from_logits=params.from_logits,
                ignore_index=params.ignore_index, grad_intersection=None,
                grad_prediction_sum=None, grad_total=grad_total, gamma=params.gamma,
                alpha=params.alpha)
        else:
            state, tie_offsets = ctx.saved_tensors[4:]
            grad = topk_backward(
                xk, target_k, params.mode, from_logits=params.from_logits,
                ignore_index=params.ignore_index, gamma=params.gamma, alpha=params.alpha,
                state=state, tie_offsets=tie_offsets, grad_total=grad_total)
        return (grad, *nones)
