"""TopK by radix select in Triton: five launches forward+backward plus one zero fill, no sort,
no host synchronisation.

TopK keeps the ``n = ceil(k * kept)`` largest per-element losses (BCE or focal, any ``alpha``,
``ignore_index``). The losses are non-negative float32 (a NaN is made the positive quiet NaN),
so their bit patterns, 31-bit keys, order like the values. A radix select finds the ``n``-th
largest key, the *threshold*, 8 + 8 + 8 + 7 bits at a time:

* one zero fill of a small int64 workspace (histograms, counters), the only torch operation;
* four launches of ``_topk_pass_kernel``, one per digit. Each program takes a contiguous chunk
  of the flat elements (of the ``(N, M)`` pixels in multiclass mode), recomputes the losses
  from the inputs (nothing input-sized is stored), histograms the keys that match the prefix
  found so far into a block histogram and adds it to the global one with integer atomics
  (exact, deterministic). Every program re-derives the prefix from the earlier histograms
  itself. The first pass also counts the *bad* kept elements (NaN/inf logits, invalid
  targets), which make the loss NaN. The last pass also sums the losses strictly above the
  threshold's 24-bit prefix and stores its block histogram; the last program to finish (an
  atomic ticket) then forms the loss in a fixed order: those sums, plus ``count * value`` of
  every final-digit bin above the threshold (all keys of such a bin are equal), plus
  ``remaining * threshold`` for the ties that are taken; and the exclusive prefix sum of each
  block's tie count, so that the backward pass takes exactly the ties with the lowest flat
  index (the reference's rule);
* one launch of ``_topk_bwd_kernel``: the distribution loss's gradient on the selected
  elements only.

Counts are int64, so more than 2^31 elements are counted exactly. NaN losses rank above every
other value, so a NaN is always selected and shows in the loss.

Saved for backward: the inputs, ``O(programs)`` int64 tie offsets and a few scalars.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _math
from ..._layout import Layout, float32_value
from ..._params import DistributionParams
from ...constants import MULTICLASS_MODE
from .. import reference
from .._recompute import must_recompute, recompute_backward
from . import math as tm
from .stream import (
    bad_input,
    multiclass_block,
    multiclass_pixel_grad,
    multiclass_tile,
    on_input_device,
    prepare_inputs,
)

__all__ = ["TopKSpec", "TritonTopK", "topk_backward", "topk_forward"]

BLOCK_TOPK = 2048
"""Elements (binary) per tile in the TopK passes; multiclass uses the multiclass tile."""
TOPK_PROGRAMS = 1024
"""At most this many programs per TopK pass (each takes a contiguous chunk of tiles); the
state saved for backward has this many tie offsets whatever the input's size."""
HIST = 256
"""Slots per pass in the workspace (the last pass uses 128)."""
BAD, TICKET, THRESHOLD, REMAINING = 4 * HIST, 4 * HIST + 1, 4 * HIST + 2, 4 * HIST + 3
TIES = 4 * HIST + 8
"""Workspace layout (int64): 4 histograms, counters, the threshold, then per-program tie
offsets."""
LAST_BINS = 128
_SHIFTS = (23, 15, 7, 0)
"""The passes histogram key bits 30-23, 22-15, 14-7 and 6-0."""


# --------------------------------------------------------------------------------------------
# per-tile losses (shared by every pass, so all passes see bit-identical values)
# --------------------------------------------------------------------------------------------


@triton.jit
def _nan_softmax(x, cmask):
    """Pixels of a ``[CP, BLOCK]`` logit tile where a class logit is NaN or +inf: there the
    reference's softmax (a shifted exponential of ``inf - inf``) and so its cross-entropy and
    its every class's gradient are NaN, whichever class the target is (-inf alone is not)."""
    hot = ((x != x) | (x == float("inf"))) & cmask[:, None]
    return tl.max(hot.to(tl.int32), axis=0) > 0


@triton.jit
def _lerp_at_infinity(x, g):
    """The reference's per-element BCE of an infinite logit, ``lerp(softplus(x),
    softplus(-x), g)`` with lerp's two formulas (``a + g (e - a)`` below ``g = 1/2``, ``e -
    (e - a)(1 - g)`` from it on): +inf at ``x = -inf`` for ``0 < g < 1/2`` and at ``x = +inf``
    for ``1/2 <= g < 1``, NaN (``0 * inf``, ``inf - inf``) for the other targets in [0, 1]."""
    # softplus(x) and softplus(-x); both 0 at a finite x, whose result is not used (no
    # invalid operation there)
    a = tl.where(x == float("inf"), float("inf"), 0.0)
    e = tl.where(x == float("-inf"), float("inf"), 0.0)
    return tl.where(g < 0.5, a + g * (e - a), e - (e - a) * (1.0 - g))


@triton.jit
def _topk_tile(x_ptr, t_ptr, alpha_ptr, idx, total, C, M, ignore_value, gamma, alpha,
               MULTICLASS: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr,
               FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, CP: tl.constexpr):
    """Losses (0 where not kept, NaN kept as the positive NaN), their 31-bit keys, the kept
    mask and the bad mask of the flat elements (binary) or pixels (multiclass) ``idx``."""
    inside = idx < total
    if MULTICLASS:
        n = idx // M  # a tile may span two samples: each pixel carries its own sample
        m = idx - n * M
        x, _p, b, t, keep, _onehot, cmask, bad, _top, _complement = multiclass_tile(
            x_ptr, t_ptr, n, m, inside, C, M, ignore_value, FROM_LOGITS, HAS_IGNORE, CP
        )
        if FROM_LOGITS:
            b = tl.where(_nan_softmax(x, cmask), float("nan"), b)
        loss = tm.focal(b, gamma, FOCAL)
        if HAS_ALPHA:
            loss = loss * tl.load(alpha_ptr + t)
    else:
        x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + idx, mask=inside, other=0).to(tl.float32)
        keep = inside
        if HAS_IGNORE:
            keep = keep & (t != ignore_value)
        bad = keep & (bad_input(x, FROM_LOGITS) | ~((t >= 0.0) & (t <= 1.0)))
        g = tl.where(keep, t, 0.0)
        b = tm.binary_bce(x, g, g, FROM_LOGITS)
        if FROM_LOGITS:
            b = tl.where(tl.abs(x) == float("inf"), _lerp_at_infinity(x, g), b)
        loss = tm.focal(b, gamma, FOCAL)
        if HAS_ALPHA:
            loss = loss * (alpha * g + (1.0 - alpha) * (1.0 - g))
    # NaN as the positive quiet NaN, whose bit pattern ranks above +inf: always selected
    loss = tl.where(loss == loss, loss, float("nan"))
    loss = tl.where(keep & ~(loss <= 0.0), loss, 0.0)
    key = loss.to(tl.int32, bitcast=True)
    return loss, key, keep, bad


@triton.jit
def topk_count_of(kept, k_hi, k_mid, k_lo):
    """``ceil(round(k * kept, 9))`` clamped to ``[1, kept]`` (0 of 0), ``k = hi + mid + lo``
    exactly, as :func:`dynloss._math.topk_count`: the fraction alone is rounded to 9 digits
    (``v * 1e9`` leaves float64's exact integers from ``v`` ~ 9e6 on, and ``ceil`` then went
    1 above the host's count at ~1e10 kept elements)."""
    k = tl.cast(k_hi, tl.float64) + tl.cast(k_mid, tl.float64) + tl.cast(k_lo, tl.float64)
    v = k * kept.to(tl.float64)
    whole = tl.floor(v)
    v = whole + tl.floor((v - whole) * 1e9 + 0.5) / 1e9
    n = tl.ceil(v).to(tl.int64)
    return tl.minimum(tl.maximum(n, 1), kept)


@triton.jit
def _topk_resolve(ws_ptr, n_host, k_hi, k_mid, k_lo, PASSES: tl.constexpr,
                  N_FROM_HOST: tl.constexpr):
    """Walk the first ``PASSES`` histograms: ``(prefix, remaining, n)``, all int64.

    ``prefix`` holds the key bits resolved so far, ``remaining`` how many elements with
    exactly that prefix are still to be taken, ``n`` the number to keep.
    """
    bins = tl.arange(0, 256)
    if N_FROM_HOST:
        n = n_host.to(tl.int64)
    else:
        kept = tl.sum(tl.load(ws_ptr + bins, cache_modifier=".cg"), axis=0)
        n = topk_count_of(kept.to(tl.int64), k_hi, k_mid, k_lo)
    remaining = n
    prefix = n * 0
    for p in tl.static_range(PASSES):
        # the last pass has 128 bins (bits 6-0), the others 256
        h = tl.load(ws_ptr + p * 256 + bins, mask=(bins < 128) | (p < 3), other=0,
                    cache_modifier=".cg")
        above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0)
        cond = (above < remaining) & (above + h >= remaining)
        digit = tl.sum(tl.where(cond, bins, 0), axis=0).to(tl.int64)
        remaining = remaining - tl.sum(tl.where(cond, above, 0), axis=0)
        if p == 3:
            prefix = (prefix << 7) | digit
        else:
            prefix = (prefix << 8) | digit
    return prefix, remaining, n


@triton.jit(do_not_specialize=["n_host"])
def _topk_pass_kernel(
    x_ptr, t_ptr, alpha_ptr, ws_ptr, fstate_ptr, local_ptr, out_ptr,
    n_host, k_hi, k_mid, k_lo, total, C, M, chunk, P, ignore_value, gamma, alpha,
    PASS: tl.constexpr, SHIFT: tl.constexpr, BINS: tl.constexpr, PREV_SHIFT: tl.constexpr,
    N_FROM_HOST: tl.constexpr, MEAN: tl.constexpr, MULTICLASS: tl.constexpr,
    FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr, FOCAL: tl.constexpr,
    HAS_ALPHA: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr,
):
    """Histogram of digit ``PASS`` of the keys matching the prefix of the earlier passes, over
    the chunk ``[pid * chunk, (pid + 1) * chunk)``. Pass 0 counts bad elements; pass 3 also
    writes this program's sum above the 24-bit prefix and its histogram, and its last program
    finishes the loss (:func:`_topk_finish`)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * chunk
    if PASS > 0:
        prefix, _remaining, _n = _topk_resolve(ws_ptr, n_host, k_hi, k_mid, k_lo, PASS,
                                               N_FROM_HOST)
    hist = tl.zeros([BINS], dtype=tl.int32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    above = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        loss, key, keep, bad_now = _topk_tile(
            x_ptr, t_ptr, alpha_ptr, idx, total, C, M, ignore_value, gamma, alpha,
            MULTICLASS, FROM_LOGITS, HAS_IGNORE, FOCAL, HAS_ALPHA, CP,
        )
        if PASS == 0:
            bad += bad_now.to(tl.int32)
            hist += tl.histogram((key >> SHIFT) & (BINS - 1), BINS, mask=keep)
        else:
            high = (key >> PREV_SHIFT).to(tl.int64)
            match = keep & (high == prefix)
            if PASS == 3:
                above += tl.where(keep & (high > prefix), loss, 0.0)
            if tl.max(match.to(tl.int32), axis=0) > 0:  # most tiles hold no candidate
                hist += tl.histogram((key >> SHIFT) & (BINS - 1), BINS, mask=match)
    slots = tl.arange(0, BINS)
    tl.atomic_add(ws_ptr + PASS * 256 + slots, hist.to(tl.int64), mask=hist > 0)
    if PASS == 0:
        n_bad = tl.sum(bad, axis=0).to(tl.int64)
        tl.atomic_add(ws_ptr + 4 * 256, n_bad, mask=n_bad > 0)
    if PASS == 3:
        tl.store(local_ptr + pid.to(tl.int64) * 128 + slots, hist)
        tl.store(fstate_ptr + 2 + pid, tl.sum(above, axis=0))
        # every store of this program is made before its ticket (release); the last ticket
        # (acquire) sees every program's stores and atomics
        tl.debug_barrier()
        ticket = tl.atomic_add(ws_ptr + 4 * 256 + 1, 1, sem="acq_rel", scope="gpu")
        if ticket == P - 1:
            _topk_finish(ws_ptr, fstate_ptr, local_ptr, out_ptr, n_host, k_hi, k_mid, k_lo, P,
                         SLOTS, N_FROM_HOST, MEAN)


@triton.jit
def _topk_finish(ws_ptr, fstate_ptr, local_ptr, out_ptr, n_host, k_hi, k_mid, k_lo, P,
                 SLOTS: tl.constexpr, N_FROM_HOST: tl.constexpr, MEAN: tl.constexpr):
    """The loss, the NaN factor, the divisor and the tie offsets, in a fixed order."""
    threshold, remaining, n = _topk_resolve(ws_ptr, n_host, k_hi, k_mid, k_lo, 4, N_FROM_HOST)
    digit = threshold & 127
    high = threshold >> 7
    part = tl.zeros([1024], dtype=tl.float32)
    carry = n * 0
    for p0 in range(0, P, 1024):
        pp = p0 + tl.arange(0, 1024)
        pm = pp < P
        part += tl.load(fstate_ptr + 2 + pp, mask=pm, other=0.0, cache_modifier=".cg")
        ties = tl.load(local_ptr + pp.to(tl.int64) * 128 + digit, mask=pm, other=0,
                       cache_modifier=".cg").to(tl.int64)
        tl.store(ws_ptr + 4 * 256 + 8 + pp, carry + tl.cumsum(ties, axis=0) - ties, mask=pm)
        carry += tl.sum(ties, axis=0)
    total = tl.sum(part, axis=0)
    for p0 in range(P, SLOTS, 1024):  # the unused slots: a defined state whatever the input
        pp = p0 + tl.arange(0, 1024)
        tl.store(fstate_ptr + 2 + pp, tl.zeros([1024], dtype=tl.float32), mask=pp < SLOTS)
    # every key of a final-digit bin is the same value: count * value for the bins above
    b = tl.arange(0, 128)
    h = tl.load(ws_ptr + 3 * 256 + b, cache_modifier=".cg")
    values = ((high << 7) | b).to(tl.int32).to(tl.float32, bitcast=True)
    total += tl.sum(tl.where((b > digit) & (h > 0), h.to(tl.float32) * values, 0.0), axis=0)
    value = threshold.to(tl.int32).to(tl.float32, bitcast=True)
    total += tl.where(remaining > 0, remaining.to(tl.float32) * value, 0.0)
    n_bad = tl.load(ws_ptr + 4 * 256, cache_modifier=".cg")
    poison = tl.where(n_bad > 0, float("nan"), 1.0)
    if MEAN:
        divisor = tl.maximum(n, 1).to(tl.float32)
    else:
        divisor = n.to(tl.float32) * 0.0 + 1.0
    tl.store(out_ptr, total / divisor * poison)
    tl.store(fstate_ptr, poison)
    tl.store(fstate_ptr + 1, divisor)
    tl.store(ws_ptr + 4 * 256 + 2, threshold)
    tl.store(ws_ptr + 4 * 256 + 3, remaining)


@triton.jit
def _topk_bwd_kernel(
    x_ptr, t_ptr, alpha_ptr, grad_ptr, gout_ptr, ws_ptr, fstate_ptr,
    total, C, M, chunk, ignore_value, gamma, alpha,
    MULTICLASS: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_IGNORE: tl.constexpr,
    FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr,
):
    """``dL/dx``: ``upstream / divisor * d loss/dx`` times the NaN factor on the selected
    elements (above the threshold, or a tie ranked below ``remaining`` in flat order), 0
    elsewhere (as the reference's autograd gives)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * chunk
    threshold = tl.load(ws_ptr + 4 * 256 + 2)
    remaining = tl.load(ws_ptr + 4 * 256 + 3)
    rank0 = tl.load(ws_ptr + 4 * 256 + 8 + pid)
    poison = tl.load(fstate_ptr)
    g = tl.load(gout_ptr) / tl.load(fstate_ptr + 1)
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        inside = idx < total
        _loss, key, keep, _bad = _topk_tile(
            x_ptr, t_ptr, alpha_ptr, idx, total, C, M, ignore_value, gamma, alpha,
            MULTICLASS, FROM_LOGITS, HAS_IGNORE, FOCAL, HAS_ALPHA, CP,
        )
        key64 = key.to(tl.int64)
        tie = keep & (key64 == threshold)
        rank = rank0 + tl.cumsum(tie.to(tl.int64), axis=0) - 1
        rank0 += tl.sum(tie.to(tl.int64), axis=0)
        selected = keep & ((key64 > threshold) | (tie & (rank < remaining)))
        coef = tl.where(selected, g * poison, 0.0)
        if MULTICLASS:
            n = idx // M
            m = idx - n * M
            x, p, b, t, _keep, onehot, cmask, _bad2, is_top, complement = multiclass_tile(
                x_ptr, t_ptr, n, m, inside, C, M, ignore_value, FROM_LOGITS, HAS_IGNORE, CP
            )
            offs = n[None, :] * C * M + tl.arange(0, CP)[:, None].to(tl.int64) * M + m[None, :]
            grad = multiclass_pixel_grad(
                x, p, b, t, onehot, is_top, complement, coef, alpha_ptr, gamma, FROM_LOGITS,
                FOCAL, HAS_ALPHA
            )
            if FROM_LOGITS:
                # an unselected pixel too: the reference's autograd gives 0 * NaN there
                grad = tl.where(_nan_softmax(x, cmask)[None, :], float("nan"), grad)
            grad = tl.where(keep[None, :], grad, 0.0)
            tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty),
                     mask=cmask[:, None] & inside[None, :])
        else:
            x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float32)
            t = tl.load(t_ptr + idx, mask=inside, other=0).to(tl.float32)
            g_t = tl.where(keep, t, 0.0)
            c = coef + tl.zeros_like(x)
            if FOCAL:
                c = tm.focal_coef(c, tm.binary_bce(x, g_t, g_t, FROM_LOGITS), gamma)
            if HAS_ALPHA:
                c = c * (alpha * g_t + (1.0 - alpha) * (1.0 - g_t))
            grad = tl.where(keep, tm.binary_bce_grad(x, g_t, g_t, c, FROM_LOGITS), 0.0)
            tl.store(grad_ptr + idx, grad.to(grad_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def split_k(k: float) -> tuple[float, float, float]:
    """Three float32 values whose float64 sum is exactly ``k`` (the kernels take float32)."""
    hi = float32_value(k)
    mid = float32_value(k - hi)
    return hi, mid, float32_value(k - hi - mid)


@dataclass(frozen=True)
class TopKSpec:
    """What the TopK kernels need besides the tensors; ``ints``/``floats`` flatten it for the
    custom ops."""

    multiclass: bool
    from_logits: bool
    ignore_index: int | None
    mean: bool
    gamma: float
    alpha: float | tuple[float, ...] | None
    k: float

    def ints(self) -> list[int]:
        return [int(self.multiclass), int(self.from_logits), int(self.ignore_index is not None),
                0 if self.ignore_index is None else int(self.ignore_index), int(self.mean),
                -1 if self.alpha is None else (len(self.alpha) if isinstance(self.alpha, tuple)
                                               else 0)]

    def floats(self) -> list[float]:
        alpha = list(self.alpha) if isinstance(self.alpha, tuple) else (
            [] if self.alpha is None else [float(self.alpha)])
        return [self.gamma, self.k, *alpha]

    @staticmethod
    def from_lists(ints: list[int], floats: list[float]) -> TopKSpec:
        multiclass, from_logits, has_ignore, ignore, mean, alpha_len = ints
        alpha: float | tuple[float, ...] | None = None
        if alpha_len == 0:
            alpha = floats[2]
        elif alpha_len > 0:
            alpha = tuple(floats[2:2 + alpha_len])
        return TopKSpec(bool(multiclass), bool(from_logits), ignore if has_ignore else None,
                        bool(mean), floats[0], alpha, floats[1])


def build_topk_spec(params: DistributionParams) -> TopKSpec:
    """The :class:`TopKSpec` of a TopK call (``params.k`` given)."""
    assert params.k is not None
    return TopKSpec(params.mode == MULTICLASS_MODE, params.from_logits, params.ignore_index,
                    params.reduction == "mean", params.gamma, params.alpha, params.k)


topk_spec = lru_cache(maxsize=256)(build_topk_spec)
""":func:`build_topk_spec`, cached per parameter object (the eager path)."""


@lru_cache(maxsize=512)
def topk_geometry(n: int, c: int, m: int, multiclass: bool) -> tuple[int, int, int, int, int]:
    """``(total, CP, BLOCK, programs, chunk)`` of the flat TopK passes."""
    if multiclass:
        cp, block = multiclass_block(c)
        total = n * m
    else:
        cp, block = 1, BLOCK_TOPK
        total = n * c * m
    tiles = max(1, triton.cdiv(total, block))
    programs = min(tiles, TOPK_PROGRAMS)
    chunk = triton.cdiv(tiles, programs) * block
    return total, cp, block, max(1, triton.cdiv(max(total, 1), chunk)), chunk


def _alpha_args(spec: TopKSpec, alpha: Tensor | None, dummy: Tensor
                ) -> tuple[bool, float, Tensor]:
    if spec.alpha is None:
        return False, 0.0, dummy
    if spec.multiclass:
        assert alpha is not None
        return True, 0.0, alpha
    return True, float(spec.alpha), dummy  # type: ignore[arg-type]


def new_state(device: torch.device) -> tuple[Tensor, Tensor]:
    """``(workspace, fstate)``: the zeroed int64 workspace (one fill launch) and the float32
    state, both of a fixed size (:data:`TOPK_PROGRAMS` slots whatever the input)."""
    return (torch.zeros(TIES + TOPK_PROGRAMS, dtype=torch.int64, device=device),
            torch.empty(2 + TOPK_PROGRAMS, dtype=torch.float32, device=device))


@on_input_device
def topk_forward(xk: Tensor, target: Tensor, spec: TopKSpec, alpha: Tensor | None, out: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """Launch the radix select; writes the loss to ``out`` (0-dim float32) and returns the
    backward state ``(fstate, workspace)``."""
    n, c, m = xk.shape
    total, cp, block, programs, chunk = topk_geometry(n, c, m, spec.multiclass)
    dev = xk.device
    ws, fstate = new_state(dev)
    local = torch.empty(programs * LAST_BINS, dtype=torch.int32, device=dev)
    has_alpha, alpha_scalar, alpha_ptr = _alpha_args(spec, alpha, fstate)
    # without ignore_index every element is kept (an invalid one makes the loss NaN)
    n_from_host = spec.ignore_index is None
    n_host = _math.topk_count(spec.k, total) if n_from_host else 0
    k_hi, k_mid, k_lo = split_k(spec.k)
    ignore = 0 if spec.ignore_index is None else int(spec.ignore_index)
    for p in range(4):
        _topk_pass_kernel[(programs,)](
            xk, target, alpha_ptr, ws, fstate, local, out, n_host, k_hi, k_mid, k_lo, total,
            c, m, chunk, programs, ignore if spec.multiclass else float(ignore), spec.gamma,
            alpha_scalar, PASS=p, SHIFT=_SHIFTS[p], BINS=LAST_BINS if p == 3 else HIST,
            PREV_SHIFT=_SHIFTS[p - 1] if p else 31, N_FROM_HOST=n_from_host, MEAN=spec.mean,
            MULTICLASS=spec.multiclass, FROM_LOGITS=spec.from_logits,
            HAS_IGNORE=not n_from_host, FOCAL=spec.gamma != 0.0, HAS_ALPHA=has_alpha, CP=cp,
            BLOCK=block, SLOTS=TOPK_PROGRAMS, num_warps=8 if spec.multiclass else 4,
        )
    return fstate, ws


@on_input_device
def topk_backward(xk: Tensor, target: Tensor, spec: TopKSpec, alpha: Tensor | None,
                  fstate: Tensor, ws: Tensor, grad_out: Tensor) -> Tensor:
    """``dL/dx`` of TopK (``xk``'s shape and dtype)."""
    n, c, m = xk.shape
    total, cp, block, programs, chunk = topk_geometry(n, c, m, spec.multiclass)
    has_alpha, alpha_scalar, alpha_ptr = _alpha_args(spec, alpha, fstate)
    grad = torch.empty_like(xk)
    ignore = 0 if spec.ignore_index is None else int(spec.ignore_index)
    _topk_bwd_kernel[(programs,)](
        xk, target, alpha_ptr, grad, grad_out, ws, fstate, total, c, m, chunk,
        ignore if spec.multiclass else float(ignore), spec.gamma, alpha_scalar,
        MULTICLASS=spec.multiclass, FROM_LOGITS=spec.from_logits,
        HAS_IGNORE=spec.ignore_index is not None, FOCAL=spec.gamma != 0.0,
        HAS_ALPHA=has_alpha, CP=cp, BLOCK=block, num_warps=8 if spec.multiclass else 4,
    )
    return grad


def topk_alpha(spec: TopKSpec, device: torch.device) -> Tensor | None:
    """The per-class ``alpha`` table (multiclass), cached per device as for the streaming
    kernels."""
    from .stream import _cached_table

    if not (spec.multiclass and isinstance(spec.alpha, tuple)):
        return None
    return _cached_table(spec.alpha, device)


class TritonTopK(torch.autograd.Function):
    """TopK (mean or sum of the selected per-element losses) by radix select: 0-dim float32.

    ``forward(x, target, params, checked)``; NaN for bad kept elements (see the module
    documentation). Six launches forward+backward, counting the zero fill.
    """

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, params: DistributionParams, checked: bool):
        spec = topk_spec(params)
        xk, target_k = prepare_inputs(x, target)
        alpha = topk_alpha(spec, x.device)
        out = torch.empty((), dtype=torch.float32, device=x.device)
        fstate, ws = topk_forward(xk, target_k, spec, alpha, out)
        ctx.save_for_backward(x, target, xk, target_k, fstate, ws)
        ctx.config = (spec, alpha, params, checked)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, target, xk, target_k, fstate, ws = ctx.saved_tensors
        spec, alpha, params, checked = ctx.config
        nones = (None,) * 3
        if grad_out is None:
            return (None, *nones)
        if must_recompute(grad_out):  # create_graph=True, or batched: through the reference
            def value(xs: Tensor) -> Tensor:
                layout = Layout(xs, target, params.mode, xs.shape)
                return reference.REFERENCE.distribution(layout, params, checked)

            (grad,) = recompute_backward(value, (x,), (grad_out,))
            return (grad, *nones)
        return (topk_backward(xk, target_k, spec, alpha, fstate, ws, grad_out), *nones)
