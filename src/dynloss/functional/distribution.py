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

from collections.abc import Sequence

from torch import Tensor

from .._checks import check_fraction
from .._layout import Layout
from .._math import (
    LOG_CLAMP,
    elementwise_bce,
    focal_modulation,
    pixel_cross_entropy,
    positive_weight,
    topk_count,
    topk_mask,
)
from .._params import distribution_params
from ..kernels import reference
from ._call import distribution_loss, shared_doc

__all__ = [
    "LOG_CLAMP",
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
    elements hold 0. ``layout`` is :func:`dynloss._layout.prepare`'s canonical layout.
    """
    params = distribution_params(gamma=gamma, alpha=alpha, mode=layout.mode,
                                 from_logits=from_logits, ignore_index=ignore_index)
    return reference.distribution_terms(layout, params)


_SHARED_DOC = """
    Args:
        input: logits (``from_logits=True``) or probabilities, ``(N, C, *spatial)``; in binary
            mode also ``(N, *spatial)``. Any float dtype; computed in float32 at least.
        target: binary/multilabel: the input's shape (binary also without the channel dim),
            values in [0, 1] (soft labels allowed), float, bool or integer dtype. Multiclass:
            integer class indices ``(N, *spatial)`` in ``[0, C)``.
        mode: ``"binary"`` (default), ``"multilabel"`` or ``"multiclass"`` (softmax).
        from_logits: whether ``input`` holds logits (default) or probabilities (multiclass:
            each pixel's class probabilities, a softmax output; their sum over the classes
            is not checked, as torch's ``NLLLoss`` does not check it).
        ignore_index: elements whose target equals it are left out of the loss, its normaliser
            and the gradient.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``: per-element losses of the
            input's shape (binary/multilabel) or ``(N, *spatial)`` (multiclass), 0 where
            ignored (and, for TopK, where not selected).
        backend: ``"auto"`` (default: Triton on CUDA, the native kernels for CPU tensors
            (float64 in double, 16-bit ones as a float32 copy) but rows of fewer than 16
            pixels kept per row, else ``"torch"``; the
            reference for what those cannot do), ``"torch"``
            (fused autograd Function), ``"native"`` (compiled C++, CPU), ``"triton"`` or
            ``"reference"`` (plain autograd); see :mod:`dynloss.kernels.dispatch`.
            ``reduction="none"`` runs on the native kernels (CPU) too, and for BCE and Focal
            on the Triton kernels (CUDA); TopK's on the reference on CUDA.
        check_values: raise a ``ValueError`` for target (or probability) values out of
            range, which reads the data on the host; ``None`` (default): for CPU tensors,
            where that costs no device synchronisation. Where the check does not run (CUDA
            by default, ``False``, inside ``torch.compile``) such values make the loss NaN
            (per element with ``reduction="none"``); class indices outside ``[0, C)`` in CPU
            tensors raise even with ``False``. A NaN or infinite kept input makes the loss
            NaN (with ``reduction="none"``, its own element).

    Returns:
        The loss, a float32 (float64 for float64 input) tensor shaped by ``reduction``.
"""


_with_shared_doc = shared_doc(_SHARED_DOC)


@_with_shared_doc
def bce_loss(
    input: Tensor,
    target: Tensor,
    *,
    mode: str = "binary",
    from_logits: bool = True,
    pos_weight: float | Sequence[float] | Tensor | None = None,
    weight: Sequence[float] | Tensor | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    check_values: bool | None = None,
) -> Tensor:
    r"""Binary cross-entropy (softmax cross-entropy in multiclass mode), mean over kept elements.

    Equals ``torch.nn.BCEWithLogitsLoss`` (binary, multilabel; with its ``pos_weight``) and
    ``torch.nn.CrossEntropyLoss(ignore_index=...)`` (multiclass).

    ``pos_weight`` (default None: 1) weighs the positives' term, per element
    :math:`(1-g)\,\mathrm{softplus}(x) + w\,g\,\mathrm{softplus}(-x)` (with probabilities
    :math:`-(w\,g \log p + (1-g) \log(1-p))`), still averaged over the :math:`M` kept
    elements: one number >= 0 for every channel, or a sequence of ``C`` per-channel weights
    (a tensor, ``(C, 1, 1)`` as ``BCEWithLogitsLoss`` takes per-channel weights of images, or
    ``(C,)``, is read as its values; one value serves every channel). Binary and multilabel
    mode only. Computed by every backend (the native and Triton kernels weigh each row by its
    channel's weight); a weight of 1 is the unweighted loss, on any backend.

    ``weight`` (default None; multiclass mode only): ``C`` per-class weights >= 0 of the
    cross-entropy, as ``torch.nn.CrossEntropyLoss(weight=w)``: per pixel :math:`w_t\,b`, and
    the mean divides by the kept pixels' :math:`\sum w_t` (not their number; a loss of 0
    where that sum is 0, where torch gives NaN). A 1-D tensor is read as its values. Computed
    by every backend.

    {shared}
    Examples:
        >>> import torch
        >>> from dynloss.functional import bce_loss
        >>> logits = torch.tensor([[[[2.0, -1.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0]]]])
        >>> round(bce_loss(logits, target).item(), 4)
        0.2201
        >>> round(bce_loss(logits, target, pos_weight=3.0).item(), 4)  # (3 * 0.1269 + 0.3133) / 2
        0.347
    """
    return distribution_loss(input, target, distribution_params(
        mode=mode, from_logits=from_logits, ignore_index=ignore_index, reduction=reduction,
        backend=backend, check_values=check_values, pos_weight=pos_weight, weight=weight,
    ))


@_with_shared_doc
def focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | Tensor | None = None,
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

    Equals smp's ``FocalLoss("binary")`` (binary mode; for probabilities, where they lie in
    smp's clip range [1e-7, 1 - 1e-7]). In multiclass mode dynloss uses the softmax
    probability of the true class; smp 0.6's multiclass focal loss averages one-vs-rest
    sigmoid focal losses over the classes instead (earlier smp summed them), which is
    ``mode="multilabel"`` on the one-hot target (from logits, without ``ignore_index``).

    {shared}
    Examples:
        >>> import torch
        >>> from dynloss.functional import focal_loss
        >>> logits = torch.tensor([[[[2.0, -1.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0]]]])
        >>> round(focal_loss(logits, target).item(), 4)
        0.0122
    """
    return distribution_loss(input, target, distribution_params(
        gamma=gamma, alpha=alpha, mode=mode, from_logits=from_logits,
        ignore_index=ignore_index, reduction=reduction, backend=backend,
        check_values=check_values,
    ))


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
    nnU-Net's ``TopKLoss(k=10)`` means 10 %, which is ``k=0.1`` here (and its ``k=1``, 1 %,
    is ``k=0.01``: ``k=1`` keeps every element). The selection pools the
    whole batch (all samples and channels), as nnU-Net does, and counts only the elements kept
    (nnU-Net's ``ignore_label`` counts the ignored ones too, at loss 0). ``k=1`` is BCE.
    ``reduction="sum"`` returns the sum of the selected losses.

    {shared}
    Examples:
        >>> import torch
        >>> from dynloss.functional import topk_loss
        >>> logits = torch.tensor([[[[2.0, -1.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0]]]])
        >>> round(topk_loss(logits, target, k=0.5).item(), 4)
        0.3133
    """
    return distribution_loss(input, target, distribution_params(
        k=check_fraction("k", k), mode=mode, from_logits=from_logits, ignore_index=ignore_index,
        reduction=reduction, backend=backend, check_values=check_values,
    ))
