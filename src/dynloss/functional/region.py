r"""Region (overlap) losses: Dice, IoU (Jaccard) and Tversky.

All three are one formula. With :math:`p_i` the predicted probability and :math:`g_i` the
target of pixel :math:`i` (ignored pixels left out), the three sums

.. math:: I = \sum_i p_i g_i, \qquad P = \sum_i p_i, \qquad G = \sum_i g_i

give :math:`TP = I`, :math:`FP = P - I`, :math:`FN = G - I` and the Tversky index

.. math:: T_{\alpha,\beta} = \frac{TP + s}{TP + \alpha\,FP + \beta\,FN + s},
          \qquad s = \text{smooth} + \text{eps}.

Dice is :math:`T_{1/2,1/2} = (2I + 2s) / (P + G + 2s)` and IoU is
:math:`T_{1,1} = (I + s) / (P + G - I + s)`; the loss is :math:`1 - T`. The identities
``tversky(0.5, 0.5) == dice`` and ``tversky(1, 1) == iou`` therefore hold exactly, for any
smoothing.

``eps`` (default 1e-7) sits in numerator and denominator, so an empty target scored against an
empty prediction gives 1 (loss 0) instead of 0/0, and the loss never divides by zero. With
``smooth=0`` the loss differs from smp's (which clamps the denominator to ``eps`` instead) by a
relative ``eps / (TP + alpha FP + beta FN + eps)`` (Dice ``2 eps / (P + G + 2 eps)``, IoU
``eps / (P + G - I + eps)``): below 2e-7 for Dice and 1e-7 for IoU on any image with a
positive pixel.

Sums run over the pixels of each (sample, class). ``per_image=False`` (default; smp's and
the paper's convention) pools them over the batch, giving one score per class;
``per_image=True`` (MONAI's default) gives one score per sample and class. The loss is then
averaged over classes (and samples).

Where dynloss differs from smp: smp sets the loss of a class with no positive pixel in the
batch to 0, so false positives on an empty batch cost nothing; dynloss keeps the Tversky loss,
which is ``alpha P / (alpha P + s)`` for an empty target (Dice ``P / (P + 2s)``, IoU
``P / (P + s)``): near 1 as soon as anything is predicted, 0 for an empty prediction. With
``smooth=0`` that value carries almost no gradient (the Dice index of an empty target is
flat); pass ``smooth > 0`` (e.g. 1.0) to push false positives on empty targets down.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import overload

import torch
from torch import Tensor

from .. import _math
from .._checks import check_non_negative
from .._layout import Layout
from .._params import region_params
from ..kernels import reference
from ._call import region_loss, shared_doc

__all__ = [
    "dice_loss",
    "iou_loss",
    "jaccard_loss",
    "region_sums_reference",
    "tversky_index",
    "tversky_loss",
]


@overload
def tversky_index(intersection: float, prediction_sum: float, target_sum: float,  # type: ignore[overload-overlap]
                  alpha: float, beta: float, smoothing: float) -> float: ...
@overload
def tversky_index(intersection: Tensor | float, prediction_sum: Tensor | float,
                  target_sum: Tensor | float, alpha: float | Tensor, beta: float | Tensor,
                  smoothing: float | Tensor) -> Tensor: ...
def tversky_index(
    intersection: Tensor | float,
    prediction_sum: Tensor | float,
    target_sum: Tensor | float,
    alpha: float | Tensor,
    beta: float | Tensor,
    smoothing: float | Tensor,
) -> Tensor | float:
    r"""The Tversky index from the three sums: :math:`(I + s) / (I + \alpha(P-I) + \beta(G-I) + s)`.

    ``intersection`` (:math:`I`), ``prediction_sum`` (:math:`P`) and ``target_sum``
    (:math:`G`) are tensors of any one (broadcastable) shape, e.g. ``(N, C)`` per sample and
    class or ``(C,)`` pooled over the batch (or Python numbers); the index has that shape.
    ``smoothing`` is :math:`s = \text{smooth} + \text{eps}` of the losses.
    :math:`\alpha = \beta = 1/2` gives the Dice index :math:`(2I + 2s)/(P + G + 2s)`,
    :math:`\alpha = \beta = 1` the IoU :math:`(I + s)/(P + G - I + s)`. The losses are
    :math:`1 - T`.

    The denominator is formed as :math:`I + \alpha (P - I) + \beta (G - I) + s`, so a perfect
    prediction (:math:`P = G = I`) scores exactly 1 in any precision. ``alpha``, ``beta`` and
    ``smoothing`` are numbers, finite and >= 0 (a ``ValueError``/``TypeError`` naming the
    argument), or tensors (a learnable weight; not checked); nothing is checked inside
    ``torch.compile``.

    Examples:
        >>> import torch
        >>> from dynloss.functional import tversky_index
        >>> i, p, g = torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([5.0])
        >>> tversky_index(i, p, g, 0.5, 0.5, 0.0)  # Dice: 2I / (P + G) = 6 / 9
        tensor([0.6667])
        >>> tversky_index(i, p, g, 1.0, 1.0, 0.0)  # IoU: I / (P + G - I) = 3 / 6
        tensor([0.5000])
        >>> tversky_index(i, p, g, 0.3, 0.7, 0.0)  # 3 / (3 + 0.3 * 1 + 0.7 * 2)
        tensor([0.6383])
        >>> tversky_index(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
        ...               0.5, 0.5, 1e-7)  # empty target, empty prediction: a perfect score
        tensor([1.])
    """
    if torch.compiler.is_compiling():  # (a scheduled weight is a symbolic float there)
        return _math.tversky_index(intersection, prediction_sum, target_sum,  # type: ignore[type-var]
                                   alpha, beta, smoothing)  # type: ignore[arg-type]
    sums = {"intersection": intersection, "prediction_sum": prediction_sum,
            "target_sum": target_sum}
    for name, value in sums.items():
        if not isinstance(value, Tensor) and (isinstance(value, bool)
                                              or not isinstance(value, Real)):
            raise TypeError(f"{name} must be a tensor or a real number; got "
                            f"{type(value).__name__} {value!r}")
        if not isinstance(value, Tensor):
            try:
                float(value)
            except OverflowError:  # an int beyond float's range
                raise ValueError(f"{name} must be finite; got a number too large for a "
                                 "float") from None
    if len({value.device for value in sums.values()  # (a 0-d CPU tensor goes with any
            if isinstance(value, Tensor)  # device, as in torch)
            and (value.dim() or not value.is_cpu)}) > 1:
        where = [str(value.device) if isinstance(value, Tensor) else "a number"
                 for value in sums.values()]
        raise ValueError("intersection, prediction_sum and target_sum must be on one device; "
                         f"got {where[0]}, {where[1]} and {where[2]}")
    shapes = [value.shape for value in sums.values() if isinstance(value, Tensor)]
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError:
        named = [tuple(value.shape) if isinstance(value, Tensor) else "a number"
                 for value in sums.values()]
        raise ValueError("intersection, prediction_sum and target_sum must broadcast to one "
                         f"shape; got {named[0]}, {named[1]} and {named[2]}") from None
    weights = [value if isinstance(value, Tensor) else check_non_negative(name, value)
               for name, value in (("alpha", alpha), ("beta", beta), ("smoothing", smoothing))]
    try:
        return _math.tversky_index(intersection, prediction_sum,  # type: ignore[type-var]
                                   target_sum, *weights)  # type: ignore[arg-type]
    except ZeroDivisionError:  # numbers only: divided as float64 tensors of them (0/0: NaN)
        as_tensors = (torch.tensor(float(v), dtype=torch.float64) for v in sums.values())
        return _math.tversky_index(*as_tensors, *weights).item()  # type: ignore[arg-type]


def region_sums_reference(layout: Layout, *, from_logits: bool, ignore_index: int | None):
    """``(I, P, G)`` of shape ``(N, C)`` as plain autograd code: the reference for the kernels.

    ``layout`` is :func:`dynloss._layout.prepare`'s canonical layout of input and target.
    """
    return reference.region_sums(layout, from_logits, ignore_index)


_SHARED_DOC = """
    Args:
        input: logits (``from_logits=True``) or probabilities, ``(N, C, *spatial)``; in binary
            mode also ``(N, *spatial)``. Any float dtype; sums accumulate in float32 at least.
        target: binary/multilabel: the input's shape (binary also without the channel dim),
            values in [0, 1] (soft labels allowed), float, bool or integer dtype. Multiclass:
            integer class indices ``(N, *spatial)`` in ``[0, C)``.
        mode: ``"binary"`` (C == 1, sigmoid), ``"multilabel"`` (sigmoid per channel) or
            ``"multiclass"`` (C >= 2, softmax over dim 1); default ``"binary"``.
        from_logits: whether ``input`` holds logits (default) or probabilities (multiclass:
            each pixel's class probabilities, a softmax output; their sum over the classes
            is not checked, as torch's ``NLLLoss`` does not check it).
        smooth: additive smoothing ``s`` in numerator and denominator (default 0).
        eps: numerical floor added to the smoothing (default 1e-7); ``smooth + eps`` at least
            float32's smallest normal number, 1.18e-38.
        per_image: one score per sample and class (True) or per class over the pooled batch
            (False, default).
        ignore_index: pixels whose target equals it are left out of all sums and get no
            gradient.
        reduction: ``"mean"`` (default) over classes (and samples), ``"sum"``, or ``"none"``:
            shape ``(C,)`` with ``per_image=False``, ``(N, C)`` with ``per_image=True``
            (``C == 1`` in binary mode).
        backend: ``"auto"`` (default: Triton on CUDA, the native kernels for CPU tensors
            (float64 in double, 16-bit ones as a float32 copy) but rows of fewer than 16
            pixels kept per row, else ``"torch"``; the
            reference for what those cannot do), ``"torch"``
            (fused autograd Function), ``"native"`` (compiled C++, CPU), ``"triton"`` or
            ``"reference"`` (plain autograd); see :mod:`dynloss.kernels.dispatch`.
        check_values: raise a ``ValueError`` for target (or probability) values out of
            range, which reads the data on the host; ``None`` (default): for CPU tensors,
            where that costs no device synchronisation. Where the check does not run (CUDA
            by default, ``False``, inside ``torch.compile``) such values make the loss NaN;
            class indices outside ``[0, C)`` in CPU tensors raise even with ``False``. A NaN
            or infinite kept input makes the loss NaN (with ``reduction="none"``, every
            score: one test of the whole input decides).
        ddp_pool: with ``per_image=False``, sum ``I, P, G`` over all ``torch.distributed``
            ranks (differentiably) before the score, so the loss equals the single-process
            loss on the concatenated batch (default False; no-op outside a process group).
            Every rank must call the loss. See :mod:`dynloss.distributed`.
        include_background: False leaves the score of class 0 (the background) out of the
            mean and of ``reduction="none"``'s scores, ``(C - 1,)`` or ``(N, C - 1)``
            (MONAI's ``include_background=False``, nnU-Net's ``do_bg=False``); multiclass
            and multilabel mode only, ``C >= 2``. Class 0 still takes part in the softmax.
            Default True.
        weight: None (default), or one weight >= 0 per class (multiclass and multilabel
            mode) multiplying each class's loss ``1 - T_c`` (each sample's too with
            ``per_image``) before the reduction: ``"mean"`` is then
            the mean of ``w_c (1 - T)`` over the scores (not divided by the weights'
            sum), as MONAI's ``DiceLoss(weight=w)`` where it scores two classes or more
            (MONAI ignores its weight where it scores one); ``C`` values, or with
            ``include_background=False`` also MONAI's ``C - 1`` (classes ``1 .. C-1``); a
            1-D tensor is read as its values.

    Returns:
        The loss, a float32 (float64 for float64 input) tensor shaped by ``reduction``.
"""


_with_shared_doc = shared_doc(_SHARED_DOC)


@_with_shared_doc
def tversky_loss(
    input: Tensor,
    target: Tensor,
    alpha: float = 0.3,
    beta: float = 0.7,
    *,
    mode: str = "binary",
    from_logits: bool = True,
    smooth: float = 0.0,
    eps: float = 1e-7,
    per_image: bool = False,
    ignore_index: int | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    check_values: bool | None = None,
    ddp_pool: bool = False,
    include_background: bool = True,
    weight: Sequence[float] | Tensor | None = None,
) -> Tensor:
    r"""Tversky loss :math:`1 - (TP + s) / (TP + \alpha FP + \beta FN + s)`, ``s = smooth + eps``.

    ``alpha`` weighs false positives, ``beta`` false negatives (defaults 0.3 / 0.7, the paper's).
    ``alpha = beta = 0.5`` is :func:`dice_loss`, ``alpha = beta = 1`` is :func:`iou_loss`.
    Equals smp's ``TverskyLoss("binary", alpha=a, beta=b)`` for ``smooth=0`` whenever the batch
    has a positive pixel, and MONAI's ``TverskyLoss(sigmoid=True, alpha=a, beta=b,
    smooth_nr=s, smooth_dr=s)`` with ``per_image=True`` (with the same ``alpha``, ``beta``:
    smp's and MONAI's defaults are 0.5 / 0.5).

    {shared}
    Examples:
        >>> import torch
        >>> from dynloss.functional import tversky_loss
        >>> logits = torch.tensor([[[[4.0, -4.0], [4.0, -4.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
        >>> round(tversky_loss(logits, target).item(), 4)
        0.2659
    """
    return region_loss(input, target, region_params(
        alpha=alpha, beta=beta, mode=mode, from_logits=from_logits, smooth=smooth, eps=eps,
        per_image=per_image, ignore_index=ignore_index, reduction=reduction, backend=backend,
        check_values=check_values, ddp_pool=ddp_pool, include_background=include_background,
        weight=weight,
    ))


@_with_shared_doc
def dice_loss(
    input: Tensor,
    target: Tensor,
    *,
    mode: str = "binary",
    from_logits: bool = True,
    smooth: float = 0.0,
    eps: float = 1e-7,
    per_image: bool = False,
    ignore_index: int | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    check_values: bool | None = None,
    ddp_pool: bool = False,
    include_background: bool = True,
    weight: Sequence[float] | Tensor | None = None,
) -> Tensor:
    r"""Dice loss :math:`1 - (2I + 2s) / (P + G + 2s)`, ``s = smooth + eps``.

    Equals smp's ``DiceLoss(mode)`` (``smooth=0``) whenever every class has a positive pixel in
    the batch; smp 0.6's ``smooth=t`` is ours ``smooth=t`` (it also adds ``2t``; the two differ
    by ``eps`` only). With ``per_image=True`` it equals MONAI's ``DiceLoss(smooth_nr=2s,
    smooth_dr=2s)``.

    {shared}
    Examples:
        >>> import torch
        >>> from dynloss.functional import dice_loss
        >>> logits = torch.tensor([[[[4.0, -4.0], [4.0, -4.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
        >>> round(dice_loss(logits, target).item(), 4)
        0.2072
    """
    return region_loss(input, target, region_params(
        alpha=0.5, beta=0.5, mode=mode, from_logits=from_logits, smooth=smooth, eps=eps,
        per_image=per_image, ignore_index=ignore_index, reduction=reduction, backend=backend,
        check_values=check_values, ddp_pool=ddp_pool, include_background=include_background,
        weight=weight,
    ))


@_with_shared_doc
def iou_loss(
    input: Tensor,
    target: Tensor,
    *,
    mode: str = "binary",
    from_logits: bool = True,
    smooth: float = 0.0,
    eps: float = 1e-7,
    per_image: bool = False,
    ignore_index: int | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    check_values: bool | None = None,
    ddp_pool: bool = False,
    include_background: bool = True,
    weight: Sequence[float] | Tensor | None = None,
) -> Tensor:
    r"""IoU (Jaccard) loss :math:`1 - (I + s) / (P + G - I + s)`, ``s = smooth + eps``.

    Equals smp's ``JaccardLoss(mode)`` (same ``smooth``) whenever every class has a positive
    pixel in the batch. The paper prints a factor 2 in the numerator; that is a typo (it would
    not be the Jaccard index) and is not reproduced.

    {shared}
    Examples:
        >>> import torch
        >>> from dynloss.functional import iou_loss
        >>> logits = torch.tensor([[[[4.0, -4.0], [4.0, -4.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
        >>> round(iou_loss(logits, target).item(), 4)
        0.3433
    """
    return region_loss(input, target, region_params(
        alpha=1.0, beta=1.0, mode=mode, from_logits=from_logits, smooth=smooth, eps=eps,
        per_image=per_image, ignore_index=ignore_index, reduction=reduction, backend=backend,
        check_values=check_values, ddp_pool=ddp_pool, include_background=include_background,
        weight=weight,
    ))


jaccard_loss = iou_loss
