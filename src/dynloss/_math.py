r"""The element-wise formulas of every loss, written once in torch.

The reference backend builds the losses from these functions with plain autograd; the fused
backends (eager ``torch`` Functions, native C++, Triton) implement the same formulas in their
own kernels and are tested against them, and fall back on them to recompute a differentiable
gradient (``create_graph=True``). Nothing here checks arguments: callers pass checked values.

Notation: ``x`` logits (or probabilities when ``from_logits=False``), ``p`` probabilities,
``g`` binary targets in [0, 1], ``b`` the per-element cross-entropy.

>>> import torch
>>> from dynloss import _math
>>> x, g = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
>>> _math.elementwise_bce(x, g, from_logits=True)  # softplus(-2), softplus(-1)
tensor([0.1269, 0.3133])
>>> _math.tversky_index(torch.tensor(3.0), torch.tensor(4.0), torch.tensor(5.0), 0.5, 0.5, 0.0)
tensor(0.6667)
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ._recorder import FORWARD_DERIVATIVES, recorder
from .constants import MULTICLASS_MODE

TensorOrFloat = TypeVar("TensorOrFloat", Tensor, float)

__all__ = [
    "LOG_CLAMP",
    "batched",
    "bce_slope",
    "clamped_log",
    "clamped_log_ratio",
    "cross_entropy_from_rest",
    "elementwise_bce",
    "focal_modulation",
    "focal_modulation_and_slope",
    "non_finite_poison",
    "pixel_cross_entropy",
    "positive_weight",
    "probabilities",
    "reduce",
    "scaled",
    "sigmoid_backward",
    "sigmoid_slope",
    "softmax_backward",
    "softmax_rest",
    "topk_count",
    "topk_count_tensor",
    "topk_mask",
    "tversky_index",
    "tversky_index_grads",
    "tversky_loss_terms",
]

LOG_CLAMP = -100.0
"""Smallest log-probability used with ``from_logits=False`` (``torch.nn.BCELoss``'s)."""


# ------------------------------------------------------------------------------ probabilities
def probabilities(x: Tensor, mode: str, from_logits: bool) -> Tensor:
    """``x`` in layout ``(N, C, M)`` as probabilities: softmax over ``C`` (multiclass) or a
    sigmoid per element; ``x`` itself when it already holds probabilities.

    The softmax's backward is :func:`softmax_backward` (under autograd), the sigmoid's
    :func:`sigmoid_slope`: they keep their digits where the softmax or sigmoid saturates,
    where autograd through ``torch.softmax`` or ``torch.sigmoid`` would not. So are their
    forward-mode derivatives, under :mod:`torch.func` and forward-mode AD (Functions with a
    ``jvp``, which ``torch.compile`` cannot trace, are used there only)."""
    if not from_logits:
        return x
    # (Functions with a jvp only outside torch.compile, which cannot trace one and forms the
    # forward derivative of these Functions itself)
    forward = recorder(x) in FORWARD_DERIVATIVES and not torch.compiler.is_compiling()
    if not (forward or (torch.is_grad_enabled() and x.requires_grad)):
        return x.softmax(dim=1) if mode == MULTICLASS_MODE else x.sigmoid()
    if mode == MULTICLASS_MODE:
        return (_SoftmaxWithJvp if forward else _Softmax).apply(x)
    return (_SigmoidWithJvp if forward else _Sigmoid).apply(x)


def sigmoid_slope(x: Tensor) -> Tensor:
    r"""The sigmoid's derivative :math:`\sigma(x)\,\sigma(-x)` (``p (1 - p)``), with
    ``1 - p`` as ``sigmoid(-x)``: where the sigmoid saturates (``|x|`` above ~9 in float32)
    ``1 - p`` as a float32 difference loses its digits, all of them from ~17 on (what
    ``torch.sigmoid``'s own backward does).

    >>> import torch
    >>> from dynloss._math import sigmoid_slope
    >>> sigmoid_slope(torch.tensor([0.0, 20.0, -20.0]))
    tensor([2.5000e-01, 2.0612e-09, 2.0612e-09])
    """
    return torch.sigmoid(x) * torch.sigmoid(-x)


_FUNCTORCH = torch._C._functorch
_BATCHED = tuple(getattr(_FUNCTORCH, name) for name in (
    "is_legacy_batchedtensor",  # autograd's own vmap (is_grads_batched, vectorized jacobian)
    "is_batchedtensor",  # torch.func.vmap's
) if hasattr(_FUNCTORCH, name))


def batched(grad: Tensor) -> bool:
    """Whether ``grad`` is batched by ``vmap``: a backward pass run for several upstream
    gradients at once (``torch.autograd.grad(..., is_grads_batched=True)``, the vectorized
    ``torch.autograd.functional.jacobian``, ``gradcheck(check_batched_grad=True)``). In-place
    operations on unbatched temporaries, reads on the host and kernels cannot take it.
    False inside ``torch.compile`` (which traces a backward unbatched)."""
    if torch.compiler.is_compiling():
        return False
    return any(check(grad) for check in _BATCHED)


def sigmoid_backward(g: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
    """``g * sigmoid_slope(x)`` without autograd, as ``s (1 - s)`` with ``s = sigmoid(-|x|)
    <= 1/2`` (where ``1 - s`` keeps its digits) in one fused op; into ``out`` if given (it may
    be ``g`` itself). One temporary, ``s``."""
    small = x.abs().neg_().sigmoid_()
    if out is None:
        return torch.ops.aten.sigmoid_backward(g, small)
    return torch.ops.aten.sigmoid_backward.grad_input(g, small, grad_input=out)


class _Sigmoid(torch.autograd.Function):
    """``torch.sigmoid`` with :func:`sigmoid_slope` in its backward (differentiable again:
    under ``create_graph`` the backward is recorded); runs under the :mod:`torch.func`
    transforms (its vmap rule generated from these ops)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.sigmoid()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return g * sigmoid_slope(x)
        return sigmoid_backward(g, x)



class _SigmoidWithJvp(_Sigmoid):
    """:class:`_Sigmoid` with its forward-mode derivative."""

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return tangent * sigmoid_slope(x)


def softmax_backward(p: Tensor, g: Tensor) -> Tensor:
    r"""The softmax's vector-Jacobian product over ``C`` of probabilities ``p`` and upstream
    ``g`` ``(N, C, M)``: :math:`p_k (g_k - \sum_j p_j g_j)`.

    Formed as :math:`p_k ((g_k - \bar g) + (\bar g\, C - R))` with, per pixel, the classes
    at the max ``T``, :math:`\bar g` the mean of their ``g``, :math:`C = \sum_{j \notin T}
    p_j` and :math:`R = \sum_{j \notin T} p_j g_j` (equal, as ``sum p = 1``): at a single
    most probable class ``g_k - \bar g`` is exactly 0 and the product comes from the other
    classes' small ``p_j`` alone, where ``g_top - sum_j p_j g_j``, a difference of two nearly
    equal numbers, loses up to all its digits in float32 as the softmax saturates (what
    ``torch.softmax``'s own backward does). In differentiable operations (the masks are
    constants) under autograd, so that its gradient is the softmax's second derivative (at a
    tie for the max, where ``p_top <= 1/2`` and nothing cancels, the plain form there); in
    place otherwise.
    """
    # 1 below the max, 0 at it: a constant mask, by amax and sign (max with indices over the
    # classes is 15x slower than amax on the CPU, a boolean mask 3x slower than sign)
    p0 = p.detach()
    below = torch.sub(p0.amax(dim=1, keepdim=True), p0).sign_()
    at_max = 1 - below
    count = at_max.sum(1, keepdim=True)
    if torch.is_grad_enabled() or batched(g):  # create_graph (a differentiable gradient),
        # or a batched g (out of place: in-place ops on unbatched temporaries cannot take it).
        # Its own derivative in p must be the softmax's second one: at a tie the mean of the
        # tied g would not vary as they do, so there the plain form, which keeps its digits
        # for p_top <= 1/2
        single = at_max * (count == 1).to(p.dtype)
        others = p * below
        corrected = (g * at_max).sum(1, keepdim=True) * others.sum(1, keepdim=True) - (
            others * g).sum(1, keepdim=True)
        plain = g - (p * g).sum(1, keepdim=True)
        return p * torch.lerp(plain, corrected.expand_as(plain), single)
    g_ref = (g * at_max).sum(1, keepdim=True) / count
    others = below.mul_(p)  # in place of `below` (no graph to record)
    offset = g_ref * others.sum(1, keepdim=True) - others.mul_(g).sum(1, keepdim=True)
    return torch.sub(g, g_ref).add_(offset).mul_(p)


class _Softmax(torch.autograd.Function):
    """``torch.softmax`` over dim 1 with :func:`softmax_backward` as its backward; runs under
    the :mod:`torch.func` transforms (its vmap rule generated from these ops)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.softmax(dim=1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        return softmax_backward(p, g)



class _SoftmaxWithJvp(_Softmax):
    """:class:`_Softmax` with its forward-mode derivative: the softmax's Jacobian is
    symmetric, so it is :func:`softmax_backward` of the tangent."""

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        return softmax_backward(p, tangent)


# ------------------------------------------------------------------------------ cross-entropy
def clamped_log(p: Tensor) -> Tensor:
    """``max(log p, -100)``, with a finite gradient (0 where clamped) even at ``p == 0``.

    >>> import torch
    >>> from dynloss._math import clamped_log
    >>> clamped_log(torch.tensor([1.0, 0.0, 1e-50], dtype=torch.float64))
    tensor([   0., -100., -100.], dtype=torch.float64)
    """
    positive = p > 0
    log_p = torch.log(torch.where(positive, p, 1.0))
    return torch.where(positive, log_p, LOG_CLAMP).clamp_min(LOG_CLAMP)


def clamped_log_ratio(w: Tensor | float, p: Tensor) -> Tensor:
    """``w`` times the slope of :func:`clamped_log`, formed as the quotient ``w / p`` (0 where
    the log is clamped), as autograd forms it: a zero ``w`` gives 0 even where ``1/p``
    overflows (float32 ``p`` below ~2.9e-39, the subnormals ``torch.sigmoid`` returns for
    logits below ~-88.7), where ``w * (1/p)`` would be ``0 * inf = NaN``.

    >>> import torch
    >>> from dynloss._math import clamped_log_ratio
    >>> clamped_log_ratio(torch.tensor([0.0, 2.0, 1.0]), torch.tensor([1e-40, 0.5, 0.0]))
    tensor([0., 4., 0.])
    """
    unclamped = torch.log(p) > LOG_CLAMP
    return torch.where(unclamped, w / torch.where(unclamped, p, 1.0), 0.0)


def elementwise_bce(x: Tensor, g: Tensor, from_logits: bool,
                    pos_weight: Tensor | float | None = None) -> Tensor:
    r"""Per-element binary cross-entropy of logits (or probabilities) ``x`` and targets ``g``,
    the positives' term weighed by ``pos_weight`` :math:`w` (None: 1; a tensor broadcasts
    against ``x``, e.g. ``(1, C, 1)`` for one weight per channel).

    Logits: :math:`(1-g)\,\mathrm{softplus}(x) + w g\,\mathrm{softplus}(-x)`, two
    non-negative terms (nothing cancels; ``lerp`` is exact for hard labels). Probabilities:
    :math:`-(w g \max(\log p, -100) + (1-g) \max(\log(1-p), -100))`. The weight multiplies
    ``g`` first: a negative element reads nothing of a weighted term that overflows.

    >>> import torch
    >>> from dynloss._math import elementwise_bce
    >>> x, g = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])
    >>> elementwise_bce(x, g, True, pos_weight=2.0)  # 2 log 2 and log 2
    tensor([1.3863, 0.6931])
    """
    if from_logits:
        # F.softplus returns x itself beyond its threshold: exact in float32 from 20 on, in
        # float64 only from 40 on (exp(-40) is below half an ulp of 40, and 1 - sigmoid too)
        threshold = 40.0 if x.dtype == torch.float64 else 20.0
        positive = F.softplus(-x, threshold=threshold)
        if pos_weight is None:
            return torch.lerp(F.softplus(x, threshold=threshold), positive, g)
        # (g w) first: w softplus(-x) may overflow where g = 0 reads none of it
        return (1 - g) * F.softplus(x, threshold=threshold) + (g * pos_weight) * positive
    weighted = g if pos_weight is None else g * pos_weight
    return -(weighted * clamped_log(x) + (1 - g) * clamped_log(1 - x))


def bce_slope(x: Tensor, g: Tensor, from_logits: bool, weight: Tensor | None = None,
              pos_weight: Tensor | float | None = None) -> Tensor:
    """``weight * d elementwise_bce / dx`` (``pos_weight`` as there): ``weight (sigmoid(x) -
    g)`` for logits (``weight ((1-g) sigmoid(x) - w g sigmoid(-x))`` with a ``pos_weight``
    ``w``), formed as ``(1-g) sigmoid(x) - g sigmoid(-x)`` (exact for hard labels where the
    sigmoid saturates: ``sigmoid(x) - 1`` would lose the digits of ``-sigmoid(-x)``); else the
    clamped logs' slope ``(weight (1-g))/(1-p) - (weight w g)/p`` with a term dropped where its
    log is clamped, each formed as a quotient (:func:`clamped_log_ratio`)."""
    if from_logits:  # lerp is exact at the weights 0 and 1
        positive = torch.sigmoid(-x).neg_()
        if pos_weight is not None:
            positive = positive.mul_(pos_weight)
        slope = torch.lerp(torch.sigmoid(x), positive, g)
        return slope if weight is None else slope.mul_(weight)
    w = 1.0 if weight is None else weight
    positive = g * w if pos_weight is None else g * w * pos_weight
    return clamped_log_ratio((1 - g) * w, 1 - x) - clamped_log_ratio(positive, x)


def softmax_rest(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(max, e, rest)`` of logits ``x`` ``(N, C, M)``: the largest logit ``(N, 1, M)``,
    :math:`e = e^{x - \max}` ``(N, C, M)`` (the unnormalised softmax, ``p = e / (1 + rest)``),
    and :math:`\text{rest} = \sum_{k \ne \text{top}} e_k` ``(N, 1, M)`` over every class but
    one at the max.

    Then :math:`\operatorname{logsumexp} x = \max + \log(1 + \text{rest})` and
    :math:`1 - p_\text{top} = \text{rest} / (1 + \text{rest})` keep every digit where the
    softmax saturates (``p_top`` within float32's rounding of 1, as for the pixels a trained
    network gets right), which ``logsumexp(x) - x_t`` and ``1 - p`` lose.

    ``rest`` is :math:`\sum_k (e_k - a_k) + \sum_k a_k - 1` with ``a`` 1 at the max and 0
    below it: ``e_k - a_k`` is exactly 0 at the max (``e`` is exactly 1 there), so no digit is
    lost. No class index is formed: ``max`` with indices over the classes is 15x slower than
    ``amax`` on the CPU, and a boolean mask 3x slower than ``sign``. A NaN or infinite logit
    makes ``rest`` NaN. For backends that write their gradient themselves (the torch
    backend); :func:`pixel_cross_entropy` is the form to differentiate.

    >>> import torch
    >>> from dynloss._math import softmax_rest
    >>> mx, e, rest = softmax_rest(torch.tensor([[[0.0], [20.0], [2.0]]]))
    >>> mx.item(), f"{rest.item():.4e}"  # e^-20 + e^-18
    (20.0, '1.7291e-08')
    >>> softmax_rest(torch.tensor([[[3.0], [3.0], [3.0]]]))[2].item()  # two ties: 1 + 1
    2.0
    """
    mx = x.amax(dim=1, keepdim=True)
    shifted = x - mx
    at_max = torch.sign(shifted).add_(1)  # 1 at the max, 0 below (NaN stays NaN)
    ties = at_max.sum(1, keepdim=True) - 1
    e = shifted.exp_()
    return mx, e, at_max.neg_().add_(e).sum(1, keepdim=True) + ties  # e - at_max, in place


def pixel_cross_entropy(x: Tensor, index: Tensor, from_logits: bool) -> Tensor:
    r"""Per-pixel cross-entropy of ``x`` ``(N, C, M)`` against class indices ``index`` ``(N, M)``.

    Logits: :math:`\operatorname{logsumexp}_c x_c - x_t`, formed as
    :math:`(s - x_t) + \operatorname{log1p}(R + \operatorname{expm1}(x_t - s))` with
    :math:`R = \sum_{k \ne t} e^{x_k - s}` and the shift ``s`` the target's own logit where
    the target is the most probable class, the max elsewhere (so that no exponent is
    positive). Where the target class dominates (the pixels a trained network gets right) the
    loss is then ``log1p(R)``, every digit kept, where ``logsumexp(x) - x_t`` is the
    difference of two nearly equal large numbers (about 1 % off in float32 for a loss of 1e-5
    at logits near 35); and autograd's gradient at the target, ``p_t - 1``, comes out as
    ``-R / (1 + R)`` from the other classes' terms (``s - x_t`` and ``expm1(x_t - s)``
    contribute exact zeros there), not as a difference that float32 would lose. The max is a
    constant for autograd (``logsumexp`` does not depend on the shift): the function is
    ``logsumexp(x) - x_t`` everywhere, to every order. Probabilities:
    :math:`-\max(\log p_t, -100)`.

    >>> import torch
    >>> from dynloss._math import pixel_cross_entropy
    >>> x = torch.tensor([[[0.0], [30.0], [20.0]]])  # log(1 + e^-30 + e^-10)
    >>> f"{pixel_cross_entropy(x, torch.tensor([[1]]), True).item():.6e}"
    '4.539890e-05'
    >>> f"{(torch.logsumexp(x, 1) - x[:, 1]).item():.6e}"  # as a difference: 0.8 % off
    '4.577637e-05'
    """
    at = index.unsqueeze(1)
    picked = x.gather(1, at)
    if not from_logits:
        return -clamped_log(picked.squeeze(1))
    mx = x.detach().amax(dim=1, keepdim=True)
    shift = torch.where(picked.detach() == mx, picked, mx)
    rest = torch.exp(x - shift).scatter(1, at, 0.0).sum(1, keepdim=True)  # k != t
    return ((shift - picked) + torch.log1p(rest + torch.expm1(picked - shift))).squeeze(1)


def cross_entropy_from_rest(mx: Tensor, rest: Tensor, picked: Tensor) -> Tensor:
    """``(max - x_t) + log1p(rest)``: the cross-entropy from :func:`softmax_rest`'s parts and
    the target's logit ``picked`` (all of one shape, e.g. ``(N, 1, M)``), for a backend that
    writes its gradient itself (autograd through it would form ``p_t - 1`` as a difference:
    :func:`pixel_cross_entropy` is the differentiable form)."""
    return (mx - picked) + torch.log1p(rest)


# ------------------------------------------------------------------------------ focal and alpha
_SQRT_TINY = {dtype: math.sqrt(torch.finfo(dtype).tiny) for dtype in (torch.float32,
                                                                     torch.float64)}
"""Per dtype the losses compute in (half precision is computed in float32), the square root
of its smallest normal number: below it ``1 - e^{-b}`` is ``b`` to every digit, and
``gamma q^(gamma - 1)`` may overflow (:func:`focal_modulation`)."""
SATURATED_B = 100.0
"""A cross-entropy ``b`` beyond which ``e^{-b} b`` (at most 3.8e-42) is 0 against 1 in every
dtype: the focal slope's ``e^{-b} b / q`` is formed with ``b`` clamped to it, so that an
infinite ``b`` (finite logits whose gap overflows) gives the slope's limit, not ``0 * inf``.
The native and Triton kernels clamp at the same value."""


def focal_modulation(b: Tensor, gamma: float) -> Tensor:
    r""":math:`(1 - e^{-b})^\gamma \, b`; ``1 - e^{-b}`` is computed as ``-expm1(-b)``.

    Works in place on its own temporaries when no gradient is recorded (the fused path).
    Where ``b`` is exactly 0 (a pixel classified with certainty) the slope of ``q^\gamma b``
    is 0 for every :math:`\gamma > 0`; for :math:`\gamma < 1` autograd through
    ``q^\gamma`` would form :math:`\gamma q^{\gamma - 1} = \infty` there and a NaN gradient,
    so the power is taken only where ``q`` is not 0 (0 elsewhere, with slope 0). Where ``q``
    is tiny but not 0 (a subnormal ``b``: logits about 100 apart in float32) that factor
    overflows too: below the square root of the dtype's smallest normal number, where
    ``q = b`` to every digit, the value is formed as :math:`b^{1+\gamma}`, whose slope
    :math:`(1+\gamma)\,b^\gamma` is finite (the closed form's
    :math:`q^\gamma (1 + \gamma e^{-b} b/q)` there).

    >>> import torch
    >>> from dynloss._math import focal_modulation
    >>> b = torch.tensor([0.0, 0.5], dtype=torch.float64, requires_grad=True)
    >>> focal_modulation(b, 0.5).sum().backward()
    >>> b.grad[0].item()
    0.0
    """
    if gamma == 0:
        return b
    if torch.is_grad_enabled() and b.requires_grad:
        # q's slope e^{-b} is 0 from SATURATED_B on: no 0 * inf where b is infinite
        q = -torch.expm1(-b.clamp(max=SATURATED_B))
        if gamma >= 1:  # gamma q^(gamma - 1) is finite at q = 0
            return q.pow(gamma) * b
        certain = q == 0  # NaN is not: it stays NaN
        limit = _SQRT_TINY.get(b.dtype) or math.sqrt(torch.finfo(b.dtype).tiny)
        tiny = (q < limit) & ~certain
        small = torch.where(tiny, b, 1.0).pow(1 + gamma)
        large = torch.where(certain | tiny, 1.0, q).pow(gamma) * b
        return torch.where(certain, 0.0, torch.where(tiny, small, large))
    q = -torch.expm1(-b)
    q = q if gamma == 1 else q.square_() if gamma == 2 else q.pow_(gamma)
    return q.mul_(b)


def focal_modulation_and_slope(b: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    r""":func:`focal_modulation` and its derivative in ``b``, sharing their exponentials.

    With :math:`q = 1 - e^{-b}`: :math:`\frac{d}{db}\, q^\gamma b = q^\gamma
    (1 + \gamma e^{-b} b / q)`, where :math:`b / q \to 1` as :math:`b \to 0`, so the slope is
    finite for every :math:`\gamma \ge 0`. For use without autograd (the fused kernels).
    """
    q = b.neg()
    e = torch.exp(q)  # e^{-b}
    q.expm1_().neg_()  # 1 - e^{-b}, computed directly (no cancellation at small b)
    # b / q is 1 at b = q = 0 (0/0; a NaN b still makes e, and so the slope, NaN), and b at
    # most SATURATED_B where b is infinite (e^{-b} b is then 0, not 0 * inf)
    ratio = torch.div(b, q).nan_to_num_(nan=1.0, posinf=SATURATED_B)
    ratio.mul_(e).mul_(gamma).add_(1)
    q = q if gamma == 1 else q.square_() if gamma == 2 else q.pow_(gamma)
    ratio.mul_(q)
    return q.mul_(b), ratio


def positive_weight(g: Tensor, alpha: float) -> Tensor:
    r"""Focal ``alpha`` weights :math:`\alpha g + (1-\alpha)(1-g)`, computed in one pass."""
    return g.mul(2 * alpha - 1).add_(1 - alpha)


# ------------------------------------------------------------------------------ TopK
def topk_count(k: float, kept: int) -> int:
    """How many of ``kept`` elements TopK averages: ``ceil(k * kept)``, at least 1 (0 of 0).

    >>> from dynloss._math import topk_count
    >>> topk_count(0.6, 10), topk_count(0.01, 10), topk_count(0.5, 0)
    (6, 1, 0)
    """
    if kept <= 0:
        return 0
    return max(1, min(kept, math.ceil(round(k * kept, 9))))


def topk_count_tensor(k: float, kept: Tensor) -> Tensor:
    """:func:`topk_count` of a 0-dim integer tensor ``kept``, without reading it on the host."""
    v = kept.to(torch.float64) * k
    # round(k * kept, 9), as topk_count: the fraction alone is scaled (v * 1e9 leaves float64's
    # exact integers from v ~ 9e6 on, and ceil then went 1 above topk_count at ~5e9)
    whole = torch.floor(v)
    v = whole + torch.floor((v - whole) * 1e9 + 0.5) / 1e9
    n = torch.ceil(v).to(torch.int64)
    return torch.minimum(n.clamp_min(1), kept.to(torch.int64))


def topk_mask(values: Tensor, n: int | Tensor) -> Tensor:
    """Boolean mask of the ``n`` largest entries of the flat tensor ``values``.

    Ties at the threshold are taken by lowest flat index; NaN ranks above +inf, and +inf
    above every finite value (so a NaN loss is always selected and shows in the sum). ``n``
    may be an int or a 0-dim integer tensor; nothing is read on the host either way (no
    device synchronisation), so this also runs inside ``torch.compile`` graphs.

    >>> import torch
    >>> from dynloss._math import topk_mask
    >>> topk_mask(torch.tensor([1.0, 3.0, 2.0, 3.0]), 2).tolist()
    [False, True, False, True]
    >>> topk_mask(torch.tensor([2.0, 1.0, 2.0, 2.0]), torch.tensor(2)).tolist()
    [True, False, True, False]
    """
    m = values.numel()
    if isinstance(n, int):
        if n >= m:
            return torch.ones_like(values, dtype=torch.bool)
        if n <= 0:
            return torch.zeros_like(values, dtype=torch.bool)
    nan = values.isnan()
    ranked = values.masked_fill(nan, math.inf)  # NaN with +inf here; first among the ties
    if isinstance(n, int):
        threshold = ranked.kthvalue(m - n + 1).values
        wanted: int | Tensor = n
    else:
        if torch.compiler.is_compiling():  # no branch on a size a graph may bake in (export):
            # one -inf past the end (last in the descending order below, so no index before
            # it moves), so that the gather has an element to read in an empty batch
            ranked_or_inf = torch.cat((ranked, ranked.new_full((1,), -math.inf)))
        elif m == 0:
            return torch.zeros_like(values, dtype=torch.bool)
        else:
            ranked_or_inf = ranked
        wanted = n.clamp(0, m)
        descending = ranked_or_inf.sort(descending=True).values
        threshold = descending.gather(0, (wanted - 1).clamp_min(0).reshape(1)).squeeze(0)
        # with n == 0 nothing is taken: a threshold above every value
        threshold = torch.where(wanted > 0, threshold, math.inf)
    above = ranked > threshold
    ties = ranked == threshold
    missing = wanted - above.sum()
    # the ties fill the places left above the threshold: NaN first (they tie only at +inf),
    # then the others, each by lowest flat index
    nan_ties = ties & nan
    taken_nan = nan_ties & (torch.cumsum(nan_ties, 0) <= missing)
    others = ties & ~nan
    taken = others & (torch.cumsum(others, 0) <= missing - nan_ties.sum())
    return above | taken_nan | taken


# ------------------------------------------------------------------------------ Tversky index
def tversky_index(
    intersection: TensorOrFloat,
    prediction_sum: TensorOrFloat,
    target_sum: TensorOrFloat,
    alpha: float,
    beta: float,
    smoothing: float,
) -> TensorOrFloat:
    r"""The Tversky index from the three sums: :math:`(I + s) / (I + \alpha(P-I) + \beta(G-I) + s)`.

    The denominator is formed as :math:`I + \alpha (P - I) + \beta (G - I)`: a perfect
    prediction (:math:`P = G = I`) gives exactly :math:`T = 1` in any precision and for any
    weights (``0.3 * P + 0.7 * G`` need not round to ``I``).
    """
    denominator = _tversky_denominator(intersection, prediction_sum, target_sum, alpha, beta)
    return (intersection + smoothing) / (denominator + smoothing)


def _tversky_denominator(intersection: TensorOrFloat, prediction_sum: TensorOrFloat,
                         target_sum: TensorOrFloat, alpha: float, beta: float) -> TensorOrFloat:
    """:math:`TP + \alpha FP + \beta FN = I + \alpha (P - I) + \beta (G - I)`."""
    return (intersection + alpha * (prediction_sum - intersection)
            + beta * (target_sum - intersection))


def tversky_loss_terms(
    intersection: TensorOrFloat,
    prediction_sum: TensorOrFloat,
    target_sum: TensorOrFloat,
    alpha: float,
    beta: float,
    smoothing: float,
) -> tuple[TensorOrFloat, TensorOrFloat, TensorOrFloat]:
    r"""``(1 - T, dT/dI, dT/dP)`` of :func:`tversky_index` in one pass over the same
    intermediate values (the native backend forms each (sample, class) score and its gradient
    on the host from Python floats). The gradient's closed form is given at
    :func:`tversky_index_grads`, which returns the last two.

    >>> from dynloss._math import tversky_index, tversky_index_grads, tversky_loss_terms
    >>> terms = tversky_loss_terms(3.0, 4.0, 5.0, 0.3, 0.7, 0.1)
    >>> terms == (1.0 - tversky_index(3.0, 4.0, 5.0, 0.3, 0.7, 0.1),
    ...           *tversky_index_grads(3.0, 4.0, 5.0, 0.3, 0.7, 0.1))
    True
    """
    numerator = intersection + smoothing
    denominator = _tversky_denominator(intersection, prediction_sum, target_sum, alpha,
                                       beta) + smoothing
    # each slope divides twice by the denominator D: 1 / D^2 overflows in float32 for a D
    # near the smallest smoothing allowed (a class absent and predicted absent)
    ratio = numerator / denominator
    return (1.0 - ratio, (1.0 - (1.0 - (alpha + beta)) * ratio) / denominator,
            (-alpha * ratio) / denominator)


def tversky_index_grads(
    intersection: TensorOrFloat,
    prediction_sum: TensorOrFloat,
    target_sum: TensorOrFloat,
    alpha: float,
    beta: float,
    smoothing: float,
) -> tuple[TensorOrFloat, TensorOrFloat]:
    r""":math:`(\partial T/\partial I, \partial T/\partial P)` of :func:`tversky_index`.

    The sums may be tensors or Python floats (the native backend forms the score of a few
    classes in float64 on the host, without tensor operations).

    With :math:`D = I + \alpha (P - I) + \beta (G - I) = (1-\alpha-\beta) I + \alpha P +
    \beta G`:
    :math:`\partial T/\partial I = ((D + s) - (1-\alpha-\beta)(I + s)) / (D + s)^2` and
    :math:`\partial T/\partial P = -\alpha (I + s) / (D + s)^2`.

    >>> import torch
    >>> from dynloss._math import tversky_index, tversky_index_grads
    >>> i, p, g = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (3., 4., 5.))
    >>> di, dp = torch.autograd.grad(tversky_index(i, p, g, 0.3, 0.7, 0.1), (i, p))
    >>> closed = tversky_index_grads(i.detach(), p.detach(), g.detach(), 0.3, 0.7, 0.1)
    >>> torch.allclose(torch.stack(closed), torch.stack([di, dp]), rtol=1e-14, atol=0)
    True
    """
    _, grad_intersection, grad_prediction_sum = tversky_loss_terms(
        intersection, prediction_sum, target_sum, alpha, beta, smoothing)
    return grad_intersection, grad_prediction_sum


# ------------------------------------------------------------------------------ reductions
def reduce(loss: Tensor, reduction: str) -> Tensor:
    """``loss.mean()`` (0 for an empty ``loss``), ``loss.sum()``, or ``loss`` (``"none"``)."""
    if reduction == "mean":
        if torch.compiler.is_compiling():  # no branch on a size a graph may bake in, nor a
            # max of sizes, which export simplifies on its assumption that a size is >= 2
            count = torch.full((), loss.numel(), dtype=loss.dtype, device=loss.device)
            return loss.sum() / count.clamp_min(1)
        if loss.numel() == 0:
            return loss.sum()
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def non_finite_poison(bad: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A factor that is 1 where ``bad`` is False and NaN where True (``bad``'s shape: 0-dim
    for a whole loss, per element for ``reduction="none"``), in ``dtype``.

    Multiplying a loss by it makes the loss, and its gradient, NaN exactly where ``bad``
    holds (multiplied, not selected: a selection would send an invalid element no gradient,
    and +-inf has a finite or zero slope), without reading ``bad`` on the host.
    """
    return torch.where(bad, math.nan, 1.0).to(dtype)


def scaled(weight: float, value: Tensor) -> Tensor:
    """``weight * value`` (a composite's weighted term): ``value`` itself for a weight of 1;
    a 0-dim ``value`` times the weight as a 0-dim tensor of its dtype, since torch's
    forward-mode derivative of a 0-dim tensor times a Python float is float64 whatever the
    tensor's dtype (pytorch/pytorch#90065: ``torch.func.jvp`` of a float32 composite gave a
    float64 tangent). The same product either way (float32 and float64; other dtypes as
    ``value * weight``).

    >>> import torch
    >>> from dynloss._math import scaled
    >>> scaled(0.25, torch.tensor(2.0))
    tensor(0.5000)
    """
    if weight == 1.0:
        return value
    if value.dim() or value.dtype not in (torch.float32, torch.float64):
        return value * weight  # (a 16-bit product is formed in float32 from the float)
    return value * torch.full((), weight, dtype=value.dtype, device=value.device)
