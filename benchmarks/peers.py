"""The peers dynloss is timed against, in binary, multiclass and multilabel mode: smp, MONAI,
nnU-Net and plain PyTorch.

:func:`implementation` returns ``loss(x, target)`` of one implementation (``dynloss``,
``smp``, ``monai``, ``torch``, ``nnunet``) for one loss (``dice``, ``iou``, ``tversky``,
``bce``, ``focal``, ``topk``, the composites ``dice+bce``, ``dice+focal`` and the weight maps
of :data:`WEIGHT_MAPS`) in one mode, or
None where that library has no such loss. ``x`` is the logits ``(N, C, *spatial)``; the
target is ``(N, 1, *spatial)`` of 0/1 in binary mode, class indices ``(N, *spatial)`` (int64)
in multiclass mode, where BCE is the cross-entropy, and 0/1 of the input's shape in multilabel
mode (a sigmoid per channel, as binary mode: the region losses score each channel over the
batch, then average the channels). ``bench_cuda.py`` times every one of them on a GPU,
``bench_cpu.py --mode multiclass`` and ``--mode multilabel`` on the CPU (its binary peers are
in ``competitors.py``).

Every peer is that project's own formulation of the loss with the hyper-parameters of
dynloss's (:data:`TVERSKY`, :data:`TOPK`, focal ``gamma=2``), not a weaker stand-in: smp's and
MONAI's loss classes, nnU-Net's TopK (per-pixel losses, then ``torch.topk(..., sorted=False)``
of ``k``; its count is rounded down, dynloss's up) and ``torch``, the loss written the obvious
way in eager PyTorch. A peer is given only where it computes dynloss's loss; in multiclass
mode these are left out:

* smp's multiclass ``FocalLoss``: a one-vs-rest sigmoid focal, another loss;
* MONAI's multiclass ``DiceFocalLoss``: its focal term is the sigmoid one whatever
  ``softmax`` says, another loss (its ``FocalLoss(use_softmax=True)`` is the same terms, averaged
  over the one-hot tensor: it is timed times C);
* neither smp nor MONAI has a TopK, MONAI no BCE/cross-entropy of its own (it is torch's).

smp's multiclass Dice/IoU/Tversky score a class absent from the target as 0 where dynloss
scores it 1: they compute the same loss where every class is present (a benchmark's random
targets; ``bench_cpu.py`` checks on a probe that holds every class). In multilabel mode every
peer here computes dynloss's loss (smp's multilabel losses, MONAI's sigmoid ones with
``batch=True``, whose Focal averages over every element as dynloss's does), smp's region losses
again where every channel has a positive; none has a TopK but torch and nnU-Net, none a BCE
but torch and smp.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as TF

import dynloss

TVERSKY = (0.3, 0.7)
TOPK = 0.6

WEIGHT_MAPS = ("bce_weight_map", "focal_weight_map")
"""BCE (multiclass: the cross-entropy) and Focal (``gamma=2``) under a per-pixel weight map:
the mean of the per-element losses (``reduction="none"``) times :func:`weight_map`, as
U-Net's border weights are used. Plain torch's binary BCE takes the map as
``binary_cross_entropy_with_logits``'s own ``weight=``."""

_WEIGHT_MAPS: dict[tuple, torch.Tensor] = {}


def weight_map(target: torch.Tensor) -> torch.Tensor:
    """The weight map of :data:`WEIGHT_MAPS` for ``target`` (one weight per element of a
    binary or multilabel target, per pixel of a class-index one): values drawn uniformly
    from [1, 5) (seeded), made once per shape and device, so that no candidate pays for it."""
    key = (tuple(target.shape), str(target.device))
    found = _WEIGHT_MAPS.get(key)
    if found is None:
        gen = torch.Generator().manual_seed(7)
        found = _WEIGHT_MAPS[key] = (1.0 + 4.0 * torch.rand(key[0], generator=gen)).to(
            target.device)
    return found


def weighted(per_element: Callable) -> Callable:
    """``mean(per_element(x, t) * weight_map(t))``; per-element losses of any shape with the
    target's number of elements (smp's Focal returns them flattened)."""
    def loss(x, t):
        return (per_element(x, t).reshape(-1) * weight_map(t).reshape(-1)).mean()

    return loss


def _probs(x, mode):
    return x.float().softmax(1) if mode == "multiclass" else x.float().sigmoid()


def _onehot(x, t, mode):
    if mode == "multiclass":
        return TF.one_hot(t, x.shape[1]).movedim(-1, 1).float()
    return t.float()


def _pixel_losses(x, t, mode):
    if mode == "multiclass":
        return TF.cross_entropy(x.float(), t, reduction="none")
    return TF.binary_cross_entropy_with_logits(x.float(), t.float(), reduction="none")


def _plain_torch(loss: str, mode: str) -> Callable | None:
    """Eager PyTorch written the obvious way (what a user would write by hand)."""
    def region(a, b):
        def fn(x, t):
            p, g = _probs(x, mode), _onehot(x, t, mode)
            dims = [0, *range(2, x.dim())]
            tp = (p * g).sum(dims)
            fp = (p * (1 - g)).sum(dims)
            fn_ = ((1 - p) * g).sum(dims)
            return (1 - (tp + 1e-7) / (tp + a * fp + b * fn_ + 1e-7)).mean()
        return fn

    if loss == "dice":
        return region(0.5, 0.5)
    if loss == "iou":
        return region(1.0, 1.0)
    if loss == "tversky":
        return region(*TVERSKY)
    if loss == "bce":
        return lambda x, t: _pixel_losses(x, t, mode).mean()
    if loss == "focal":
        def focal(x, t):
            b = _pixel_losses(x, t, mode)
            return ((1 - torch.exp(-b)) ** 2 * b).mean()
        return focal
    if loss == "topk":
        def topk(x, t):
            b = _pixel_losses(x, t, mode).flatten()
            return b.topk(math.ceil(TOPK * b.numel())).values.mean()
        return topk
    if loss == "bce_weight_map":
        if mode == "multiclass":
            return weighted(lambda x, t: _pixel_losses(x, t, mode))
        return lambda x, t: TF.binary_cross_entropy_with_logits(x.float(), t.float(),
                                                                weight=weight_map(t))
    if loss == "focal_weight_map":
        def focal_elements(x, t):
            b = _pixel_losses(x, t, mode)
            return (1 - torch.exp(-b)) ** 2 * b
        return weighted(focal_elements)
    return None


def _nnunet(loss: str, mode: str) -> Callable | None:
    """nnU-Net's TopK formulation (``nnunetv2.training.loss.robust_ce_loss.TopKLoss``): the
    per-pixel cross-entropy, then ``torch.topk(..., sorted=False)`` of ``k`` percent."""
    if loss != "topk":
        return None

    def topk(x, t):
        res = _pixel_losses(x, t, mode)
        num_voxels = res.numel()
        res, _ = torch.topk(res.view((-1,)), int(num_voxels * TOPK), sorted=False)
        return res.mean()

    return topk


def _smp(smp, loss: str, mode: str) -> Callable | None:
    L = smp.losses
    if loss == "dice":
        return L.DiceLoss(mode)
    if loss == "iou":
        return L.JaccardLoss(mode)
    if loss == "tversky":
        return L.TverskyLoss(mode, alpha=TVERSKY[0], beta=TVERSKY[1])
    if loss == "focal":
        # smp's multiclass FocalLoss is a one-vs-rest sigmoid focal: another loss, not timed
        return None if mode == "multiclass" else L.FocalLoss(mode)
    if loss == "bce":
        if mode == "multiclass":
            return L.SoftCrossEntropyLoss(smooth_factor=0.0)
        return L.SoftBCEWithLogitsLoss()
    if loss in WEIGHT_MAPS and mode != "multiclass":  # its per-element losses, weighed
        per_element = (L.SoftBCEWithLogitsLoss(reduction="none") if loss == "bce_weight_map"
                       else L.FocalLoss(mode, reduction="none"))
        return weighted(per_element)
    return None  # smp has no TopK


def _monai(monai_losses, loss: str, mode: str) -> Callable | None:
    mc = mode == "multiclass"
    kw = dict(softmax=True, to_onehot_y=True) if mc else dict(sigmoid=True)
    if loss == "dice":
        fn = monai_losses.DiceLoss(batch=True, **kw)
    elif loss == "iou":
        fn = monai_losses.DiceLoss(batch=True, jaccard=True, **kw)
    elif loss == "tversky":
        fn = monai_losses.TverskyLoss(alpha=TVERSKY[0], beta=TVERSKY[1], batch=True, **kw)
    elif loss == "focal":
        fn = monai_losses.FocalLoss(gamma=2.0, use_softmax=mc, to_onehot_y=mc)
        if mc:  # its mean is over N*C*H*W (one nonzero term per pixel): ours over N*H*W
            return lambda x, t: fn(x, t.unsqueeze(1)) * x.shape[1]
    elif loss == "focal_weight_map":  # its per-element (multiclass: per-class) terms, weighed
        fn = monai_losses.FocalLoss(gamma=2.0, use_softmax=mc, to_onehot_y=mc, reduction="none")
        if mc:  # one nonzero term per pixel, at its class: their sum is the pixel's loss
            return weighted(lambda x, t: fn(x, t.unsqueeze(1)).sum(1))
        return weighted(fn)
    elif loss == "dice+bce":
        fn = monai_losses.DiceCELoss(batch=True, **kw)
    elif loss == "dice+focal":
        if mc:  # its focal term is the sigmoid one-vs-rest one whatever softmax says: another
            return None  # loss (its FocalLoss(use_softmax=True) above is the same terms)
        fn = monai_losses.DiceFocalLoss(batch=True, gamma=2.0, **kw)
    else:
        return None  # no BCE/TopK of its own (BCE is torch's)
    if mc:  # MONAI wants a channel dim on class-index targets
        return lambda x, t: fn(x, t.unsqueeze(1))
    return fn


def _dynloss(loss: str, mode: str, backend: str) -> Callable:
    kw = dict(mode=mode, backend=backend, check_values=False)
    single = {
        "dice": lambda: dynloss.DiceLoss(**kw),
        "iou": lambda: dynloss.IoULoss(**kw),
        "tversky": lambda: dynloss.TverskyLoss(*TVERSKY, **kw),
        "bce": lambda: dynloss.BCELoss(**kw),
        "focal": lambda: dynloss.FocalLoss(gamma=2.0, **kw),
        "topk": lambda: dynloss.TopKLoss(k=TOPK, **kw),
    }
    if loss in WEIGHT_MAPS:
        per_element = dynloss.BCELoss if loss == "bce_weight_map" else dynloss.FocalLoss
        return weighted(per_element(reduction="none", **kw))
    if "+" in loss:
        return dynloss.CompositeLoss([single[part]() for part in loss.split("+")])
    return single[loss]()


def _composite(parts: list[Callable | None]) -> Callable | None:
    if any(p is None for p in parts):
        return None
    return lambda x, t: sum(p(x, t) for p in parts)  # type: ignore[misc]


def implementation(impl: str, loss: str, mode: str, smp, monai_losses, backend: str
                   ) -> Callable | None:
    """``loss(x, target)`` of ``impl``, or None where that library has no such loss."""
    if impl == "dynloss":
        return _dynloss(loss, mode, backend)
    if impl == "torch":
        return (_composite([_plain_torch(p, mode) for p in loss.split("+")]) if "+" in loss
                else _plain_torch(loss, mode))
    if impl == "nnunet":
        return _nnunet(loss, mode)
    if impl == "smp":
        if isinstance(smp, str):
            return None
        return (_composite([_smp(smp, p, mode) for p in loss.split("+")]) if "+" in loss
                else _smp(smp, loss, mode))
    if impl == "monai":
        return None if monai_losses is None else _monai(monai_losses, loss, mode)
    raise ValueError(f"unknown implementation {impl}")
