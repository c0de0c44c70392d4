r"""Distribution (per-pixel) losses: BCE, Focal and TopK.

Binary and multilabel modes score each element with the binary cross-entropy of its logit
:math:`x` and target :math:`g \in [0, 1]`, written as a sum of two non-negative terms so that
no logit overflows and nothing cancels (``torch.nn.BCEWithLogitsLoss`` computes
:math:`(1-g)x - \log\sigma(x)`, which loses all digits of a tiny loss at :math:`x \ll 0`):

.. math:: b(x, g) = (1 - g)\,\operatorname{softplus}(x) + g\,\operatorname{softplus}(-x).

Multiclass mode scores each pixel with the softmax cross-entropy
:math:`b = \operatorname{logsumexp}_c x_c - x_t` of its class :math:`t`. With probabilities
(``from_logits=False``) the logarithms are clamped at -100, as ``torch.nn.BCELoss`` does.

* BCE is the mean of :math:`b` over the kept (not ignored) elements.
* Focal is the mean of :math:`a \cdot (1 - e^{-b})^\gamma \, b`: :math:`e^{-b}` is the
  probability of the true class :math:`p_t` for hard labels (smp's formulation, which also
  defines soft labels), and :math:`a = \alpha g + (1-\alpha)(1-g)` when ``alpha`` is given.
* TopK is the mean of the :math:`n = \lceil k \cdot M \rceil` largest :math:`b` over the
  :math:`M` kept elements of the whole batch (at least one), with :math:`k \cdot M` rounded to
  9 decimals first so that ``0.7 * 10`` keeps 7. Elements tied at the threshold are taken in
  order of their flat index, so the selection (and the gradient) is deterministic.

Ignored elements (``target == ignore_index``) are left out of the loss, of its normaliser and
of the gradient. smp keeps them in BCE's mean (as zeros); dynloss does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import (
    check_backend,
    check_bool,
    check_fraction,
    check_ignore_index,
    check_mode,
    check_non_negative,
    check_optional_bool,
    check_probability,
    check_reduction,
)
from .._layout import Layout, compute_dtype, prepare
from ..constants import MULTICLASS_MODE

__all__ = [
    "bce_loss",
    "elementwise_bce",
    "focal_loss",
    "focal_modulation",
    "pixel_cross_entropy",
    "pixel_losses_reference",
    "positive_weight",
    "topk_count",
    "topk_loss",
    "topk_mask",
]

LOG_CLAMP = -100.0
"""Smallest log-probability used with ``from_logits=False`` (``torch.nn.BCELoss``'s)."""


def _clamped_log(p: Tensor) -> Tensor:
    """``max(log p, -100)``, with a finite gradient (0 where clamped) even at ``p == 0``."""
    positive = p > 0
    log_p = torch.log(torch.where(positive, p, 1.0))
    return torch.where(positive, log_p, LOG_CLAMP).clamp_min(LOG_CLAMP)


def elementwise_bce(x: Tensor, g: Tensor, from_logits: bool) -> Tensor:
    """Per-element binary cross-entropy of logits (or probabilities) ``x`` and targets ``g``."""
    if from_logits:
        # lerp(a, b, w) returns b exactly at w == 1 and a at w == 0: exact for hard labels
        return torch.lerp(F.softplus(x), F.softplus(-x), g)
    return -(g * _clamped_log(x) + (1 - g) * _clamped_log(1 - x))


def pixel_cross_entropy(x: Tensor, index: Tensor, from_logits: bool) -> Tensor:
    """Per-pixel cross-entropy of ``x`` ``(N, C, M)`` against class indices ``index`` ``(N, M)``."""
    picked = x.gather(1, index.unsqueeze(1)).squeeze(1)
    if from_logits:
        return torch.logsumexp(x, dim=1) - picked
    return -_clamped_log(picked)


def focal_modulation(b: Tensor, gamma: float) -> Tensor:
    r""":math:`(1 - e^{-b})^\gamma \, b`; ``1 - e^{-b}`` is computed as ``-expm1(-b)``.

    Works in place on its own temporaries when no gradient is recorded (the fused path).
    """
    if gamma == 0:
        return b
    q = -torch.expm1(-b)
    if torch.is_grad_enabled() and b.requires_grad:
        return q.pow(gamma) * b
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
    ratio = torch.div(b, q).nan_to_num_(nan=1.0)  # b / q, which is 1 at b = q = 0
    ratio.mul_(e).mul_(gamma).add_(1)
    q = q if gamma == 1 else q.square_() if gamma == 2 else q.pow_(gamma)
    ratio.mul_(q)
    return q.mul_(b), ratio


def topk_count(k: float, kept: int) -> int:
    """How many of ``kept`` elements TopK averages: ``ceil(k * kept)``, at least 1."""
    if kept <= 0:
        return 0
    return max(1, min(kept, math.ceil(round(k * kept, 9))))


def topk_mask(values: Tensor, n: int) -> Tensor:
    """Boolean mask of the ``n`` largest entries of the flat tensor ``values``.

    The threshold is found by selection (``kthvalue``), not a sort; of the entries equal to
    the threshold, the ones with the lowest flat index are taken.
    """
    m = values.numel()
    if n >= m:
        return torch.ones_like(values, dtype=torch.bool)
    if n <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold = values.kthvalue(m - n + 1).values
    at_least = values >= threshold
    if int(at_least.sum()) == n:  # no tie straddles the threshold: the common case
        return at_least
    selected = values > threshold
    ties = (values == threshold).nonzero().squeeze(1)
    selected[ties[: n - int(selected.sum())]] = True
    return selected


def positive_weight(g: Tensor, alpha: float) -> Tensor:
    """Focal ``alpha`` weights :math:`\alpha g + (1-\alpha)(1-g)`, computed in one pass."""
    return g.mul(2 * alpha - 1).add_(1 - alpha)


def _alpha_weights(layout: Layout, g_or_index: Tensor, alpha, dtype) -> Tensor | None:
    if alpha is None:
        return None
    if layout.mode == MULTICLASS_MODE:
        table = torch.as_tensor(alpha, dtype=dtype, device=g_or_index.device)
        return table[g_or_index]
    return positive_weight(g_or_index, alpha)


def pixel_losses_reference(
    layout: Layout,
    *,
    gamma: float,
    alpha: float | Sequence[float] | None,
    from_logits: bool,
    ignore_index: int | None,
) -> tuple[Tensor, Tensor | None]:
    """Per-element losses (autograd) and the kept mask (``None`` when nothing is ignored).

    Shapes: ``(N, C, M)`` in binary/multilabel mode, ``(N, M)`` in multiclass mode; ignored
    elements hold 0.
    """
    dtype = compute_dtype(layout.x.dtype)
    x = layout.x.to(dtype)
    target = layout.target
    valid = None if ignore_index is None else target != ignore_index
    if layout.mode == MULTICLASS_MODE:
        index = target if valid is None else target.masked_fill(~valid, 0)
        index = index.long()
        b = pixel_cross_entropy(x, index, from_logits)
        weight = _alpha_weights(layout, index, alpha, dtype)
    else:
        g = target.to(dtype)
        if valid is not None:
            g = g.masked_fill(~valid, 0)
        b = elementwise_bce(x, g, from_logits)
        weight = _alpha_weights(layout, g, alpha, dtype)
    loss = focal_modulation(b, gamma)
    if weight is not None:
        loss = loss * weight
    if valid is not None:
        loss = torch.where(valid, loss, 0.0)
    return loss, valid


def _check_alpha(alpha: object, mode: str) -> float | tuple[float, ...] | None:
    if alpha is None:
        return None
    if mode == MULTICLASS_MODE:
        if isinstance(alpha, (str, bytes)) or not isinstance(alpha, Sequence):
            raise TypeError(
                "alpha must be None or a sequence of per-class weights in mode='multiclass'; "
                f"got {type(alpha).__name__} {alpha!r}"
            )
        return tuple(check_non_negative(f"alpha[{i}]", a) for i, a in enumerate(alpha))
    return check_probability("alpha", alpha)


def _distribution_loss(
    input: Tensor,
    target: Tensor,
    *,
    gamma: float,
    alpha: object,
    k: float | None,
    mode: str,
    from_logits: bool,
    ignore_index: int | None,
    reduction: str,
    backend: str,
    check_values: bool | None,
) -> Tensor:
    mode = check_mode(mode)
    check_bool("from_logits", from_logits)
    ignore_index = check_ignore_index(ignore_index)
    reduction = check_reduction(reduction)
    backend = check_backend(backend)
    check_values = check_optional_bool("check_values", check_values)
    alpha = _check_alpha(alpha, mode)
    native = False
    if backend != "reference" and reduction != "none" and k is None and isinstance(input, Tensor):
        from ..kernels import native_runs

        native = native_runs(input, backend)
    layout = prepare(
        input, target, mode, from_logits=from_logits, ignore_index=ignore_index,
        check_values=check_values, defer_value_checks=native,
    )
    # _check_alpha gives a tuple of per-class weights in multiclass mode, else a float
    if isinstance(alpha, tuple) and mode == MULTICLASS_MODE and len(alpha) != layout.num_classes:
        raise ValueError(
            f"alpha must hold one weight per class: {layout.num_classes} values for an input "
            f"with C={layout.num_classes}; got {len(alpha)}"
        )
    with torch.autocast(device_type=input.device.type, enabled=False):
        if backend != "reference" and reduction != "none":
            from ..kernels import pixel_loss_sum

            total, count = pixel_loss_sum(
                layout, gamma=gamma, alpha=alpha, k=k, from_logits=from_logits,
                ignore_index=ignore_index, backend=backend,
            )
            return total / count if reduction == "mean" else total
        loss, valid = pixel_losses_reference(
            layout, gamma=gamma, alpha=alpha, from_logits=from_logits, ignore_index=ignore_index
        )
        if k is not None:
            flat = loss.reshape(-1)
            kept = flat.numel() if valid is None else int(valid.sum())
            n = topk_count(k, kept)
            ranked = flat.detach() if valid is None else flat.detach().masked_fill(
                ~valid.reshape(-1), -math.inf
            )
            loss = torch.where(topk_mask(ranked, n), flat, 0.0).reshape(loss.shape)
            denominator: int | Tensor = max(n, 1)
        else:
            denominator = loss.numel() if valid is None else valid.sum().clamp_min(1)
        if reduction == "none":
            return loss.reshape(layout.elementwise_shape)
        total = loss.sum()
        return total / denominator if reduction == "mean" else total


_SHARED_DOC = """
    Args:
        input: logits (``from_logits=True``) or probabilities, ``(N, C, *spatial)``; in binary
            mode also ``(N, *spatial)``. Any float dtype; computed in float32 at least.
        target: binary/multilabel: the input's shape (binary also without the channel dim),
            values in [0, 1] (soft labels allowed), float, bool or integer dtype. Multiclass:
            integer class indices ``(N, *spatial)`` in ``[0, C)``.
        mode: ``"binary"`` (default), ``"multilabel"`` or ``"multiclass"`` (softmax).
        from_logits: whether ``input`` holds logits (default) or probabilities.
        ignore_index: elements whose target equals it are left out of the loss, its normaliser
            and the gradient.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``: per-element losses of the
            input's shape (binary/multilabel) or ``(N, *spatial)`` (multiclass), 0 where
            ignored (and, for TopK, where not selected).
        backend: ``"auto"`` (default: Triton on CUDA, the native kernels for float32 CPU
            tensors, else ``"torch"``), ``"torch"`` (fused autograd Function), ``"native"``
            (compiled C++, CPU; not TopK), ``"triton"`` or ``"reference"`` (plain autograd);
            see :mod:`dynloss.kernels`. ``reduction="none"`` always uses the reference.
        check_values: check target (and probability) values, which reads the data; ``None``
            (default) checks CPU tensors only, where that costs no device synchronisation.

    Returns:
        The loss, a float32 (float64 for float64 input) tensor shaped by ``reduction``.
"""


def _with_shared_doc(function):
    """Insert the arguments shared by this family into ``function``'s docstring."""
    function.__doc__ = function.__doc__.replace("    {shared}\n", _SHARED_DOC.lstrip("\n"))
    return function


@_with_shared_doc
def bce_loss(
    input: Tensor,
    target: Tensor,
    *,
    mode: str = "binary",
    from_logits: bool = True,
    ignore_index: int | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    check_values: bool | None = None,
) -> Tensor:
    r"""Binary cross-entropy (softmax cross-entropy in multiclass mode), mean over kept elements.

    Equals ``torch.nn.BCEWithLogitsLoss`` (binary, multilabel) and
    ``torch.nn.CrossEntropyLoss(ignore_index=...)`` (multiclass).

    {shared}
    Examples:
        >>> import torch
        >>> from dynloss.functional import bce_loss
        >>> logits = torch.tensor([[[[2.0, -1.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0]]]])
        >>> round(bce_loss(logits, target).item(), 4)
        0.2201
    """
    return _distribution_loss(
        input, target, gamma=0.0, alpha=None, k=None, mode=mode, from_logits=from_logits,
        ignore_index=ignore_index, reduction=reduction, backend=backend,
        check_values=check_values,
    )


@_with_shared_doc
def focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | None = None,
    *,
    mode: str = "binary",
    from_logits: bool = True,
    ignore_index: int | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    check_values: bool | None = None,
) -> Tensor:
    r"""Focal loss, the mean of :math:`a\,(1 - p_t)^\gamma\,(-\log p_t)` with :math:`p_t = e^{-b}`.

    ``gamma`` (default 2.0, the paper's) must be >= 0; ``gamma=0`` is BCE. ``alpha`` (default
    None): in binary/multilabel mode the weight of positives in [0, 1] (negatives get
    ``1 - alpha``); in multiclass mode a sequence of ``C`` per-class weights.

    Equals smp's ``FocalLoss("binary")`` (binary mode). In multiclass mode dynloss uses the
    softmax probability of the true class; smp's multiclass focal loss sums one-vs-rest
    sigmoid focal losses instead.

    {shared}
    Examples:
        >>> import torch
        >>> from dynloss.functional import focal_loss
        >>> logits = torch.tensor([[[[2.0, -1.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0]]]])
        >>> round(focal_loss(logits, target).item(), 4)
        0.0122
    """
    gamma = check_non_negative("gamma", gamma)
    return _distribution_loss(
        input, target, gamma=gamma, alpha=alpha, k=None, mode=mode, from_logits=from_logits,
        ignore_index=ignore_index, reduction=reduction, backend=backend,
        check_values=check_values,
    )


@_with_shared_doc
def topk_loss(
    input: Tensor,
    target: Tensor,
    k: float = 0.6,
    *,
    mode: str = "binary",
    from_logits: bool = True,
    ignore_index: int | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    check_values: bool | None = None,
) -> Tensor:
    r"""TopK loss: the mean cross-entropy of the ``k`` fraction of elements that score worst.

    ``k`` is a *fraction* in (0, 1] (default 0.6, the paper's value read as 60 %);
    nnU-Net's ``TopKLoss(k=10)`` means 10 %, which is ``k=0.1`` here. The selection pools the
    whole batch (all samples and channels), as nnU-Net does. ``k=1`` is BCE. ``reduction="sum"``
    returns the sum of the selected losses.

    {shared}
    Examples:
        >>> import torch
        >>> from dynloss.functional import topk_loss
        >>> logits = torch.tensor([[[[2.0, -1.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0]]]])
        >>> round(topk_loss(logits, target, k=0.5).item(), 4)
        0.3133
    """
    k = check_fraction("k", k)
    return _distribution_loss(
        input, target, gamma=0.0, alpha=None, k=k, mode=mode, from_logits=from_logits,
        ignore_index=ignore_index, reduction=reduction, backend=backend,
        check_values=check_values,
    )
