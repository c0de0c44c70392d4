"""Element-wise math shared by the Triton kernels (imported only when Triton is used).

Every helper works on float32 blocks. Triton has no ``log1p``/``expm1``; the helpers below use
Kahan's tricks so that small arguments keep full relative precision, which keeps the kernels
within float32 rounding of the reference formulas in :mod:`dynloss.functional.distribution`.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG_CLAMP = tl.constexpr(-100.0)


@triton.jit
def sigmoid(x):
    """``1 / (1 + exp(-x))``; exact 0/1 at the extremes, no NaN."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def log1p(e):
    """``log(1 + e)`` for ``e > -1``, accurate for small ``|e|`` (Kahan)."""
    w = 1.0 + e
    d = w - 1.0
    exact = d == 0.0
    return tl.where(exact, e, tl.log(w) * (e / tl.where(exact, 1.0, d)))


@triton.jit
def one_minus_exp_neg(b):
    """``q = 1 - exp(-b) = -expm1(-b)`` for ``b >= 0``, accurate for small ``b`` (Kahan)."""
    u = tl.exp(-b)
    tiny = u == 1.0
    big = u < 0.5
    log_u = tl.log(tl.where(tiny | big, 0.5, u))
    kahan = (1.0 - u) * b / tl.where(tiny | big, 1.0, -log_u)
    return tl.where(tiny, b, tl.where(big, 1.0 - u, kahan))


@triton.jit
def clamped_log(p):
    """``max(log p, -100)``, with ``log 0 = -100`` (``torch.nn.BCELoss``'s clamp)."""
    return tl.maximum(tl.log(tl.where(p > 0.0, p, 0.0)), LOG_CLAMP)


@triton.jit
def clamped_log_ratio(w, p):
    """``w`` times the slope of :func:`clamped_log`, formed as the quotient ``w / p`` (0 where
    the log is clamped), as autograd forms it: a zero ``w`` gives 0 even where ``1/p``
    overflows (``dynloss._math.clamped_log_ratio``)."""
    unclamped = tl.log(p) > LOG_CLAMP
    return tl.where(unclamped, w / tl.where(unclamped, p, 1.0), 0.0)


@triton.jit
def binary_bce(x, g, gw, FROM_LOGITS: tl.constexpr):
    """Per-element BCE ``b(x, g)`` of a logit (or probability) and a target in [0, 1], the
    positives' term weighed by ``gw = w g`` (``g`` itself unweighted; ``w`` is BCE's
    ``pos_weight``).

    Logits: ``(1-g) softplus(x) + w g softplus(-x)``, two non-negative terms, so nothing
    cancels (the reference's formulation). Probabilities: ``-(w g clog(p) + (1-g)
    clog(1-p))``.
    """
    if FROM_LOGITS:
        tail = log1p(tl.exp(-tl.abs(x)))
        b = (1.0 - g) * (tl.maximum(x, 0.0) + tail) + gw * (tl.maximum(-x, 0.0) + tail)
    else:
        b = -(gw * clamped_log(x) + (1.0 - g) * clamped_log(1.0 - x))
    return b


@triton.jit
def binary_bce_grad(x, g, gw, coef, FROM_LOGITS: tl.constexpr):
    """``coef * db/dx`` (``gw = w g`` as in :func:`binary_bce`): ``coef ((1-g) sigmoid(x) -
    w g sigmoid(-x))`` for logits, formed as
    ``(coef (1-g)) sigmoid(x) - (coef w g) sigmoid(-x)`` (exact for hard labels where the
    sigmoid saturates, where ``sigmoid(x) - 1`` would lose the digits of ``-sigmoid(-x)``;
    NaN for an infinite ``coef``, as the reference's autograd); for probabilities the
    derivative of the clamped logs, ``(coef (1-g))/(1-p) - (coef g)/p`` with a term dropped
    where its log is clamped, each a quotient (:func:`clamped_log_ratio`): the coefficient
    (upstream gradient, focal slope, alpha weight) goes into the numerators, as autograd
    forms it, so a zero weight gives 0 where ``1/p`` overflows."""
    if FROM_LOGITS:
        # the reference's order, (coef (1-g)) s(x) - (coef g) s(-x): an infinite coefficient
        # gives NaN (0 * inf, inf - inf) as there, not +-inf
        d = (coef * (1.0 - g)) * sigmoid(x) - (coef * gw) * sigmoid(-x)
    else:
        d = clamped_log_ratio((1.0 - g) * coef, 1.0 - x) - clamped_log_ratio(gw * coef, x)
    return d


@triton.jit
def focal(b, gamma, FOCAL: tl.constexpr):
    r"""``(1 - e^{-b})^\gamma b`` (``b`` itself when ``FOCAL`` is off, i.e. ``gamma == 0``)."""
    if FOCAL:
        q = one_minus_exp_neg(b)
        qg = tl.where(q > 0.0, tl.exp(gamma * tl.log(tl.where(q > 0.0, q, 1.0))), 0.0)
        out = qg * b
    else:
        out = b
    return out


@triton.jit
def focal_coef(coef, b, gamma):
    r"""``coef`` times :math:`\frac{d}{db} [(1 - e^{-b})^\gamma b] = q^\gamma (1 + \gamma
    e^{-b} b / q)` with :math:`q = 1 - e^{-b}`: the chain rule through the focal modulation.
    An infinite ``coef`` meets the reference's exact 0 of :math:`d(1 - e^{-b})/db` where
    :math:`q` rounds to 1 (its autograd forms that slope from ``-expm1(-b)``): NaN there, as
    the reference's ``inf * 0``, not +-inf. Where ``b`` is exactly 0 (an element classified
    with certainty) and ``gamma < 1`` the reference takes no power (its value there is the
    constant 0: :func:`dynloss._math.focal_modulation`), so its gradient is 0 whatever
    ``coef``, also a NaN one (a NaN loss)."""
    q = one_minus_exp_neg(b)
    pos = q > 0.0
    # b clamped to dynloss._math.SATURATED_B: e^{-b} b is 0, not 0 * inf, at an infinite b
    ratio = tl.where(pos, tl.minimum(b, 100.0) / tl.where(pos, q, 1.0), 1.0)
    qg = tl.where(pos, tl.exp(gamma * tl.log(tl.where(pos, q, 1.0))), 0.0)
    slope = qg * (1.0 + gamma * tl.exp(-b) * ratio)
    saturated = (tl.abs(coef) == float("inf")) & (q == 1.0)
    certain = (q == 0.0) & (gamma < 1.0)
    return tl.where(certain, 0.0, tl.where(saturated, float("nan"), coef * slope))
