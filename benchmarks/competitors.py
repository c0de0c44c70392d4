"""The implementations dynloss is compared with: smp, MONAI, nnU-Net and plain PyTorch.

Each factory returns ``{label: callable(logits, target) -> loss}`` for one loss in binary mode;
a library that is not installed is left out (and reported as missing by the caller). Every
peer is that project's own formulation of the loss, not a weaker stand-in: TopK's is
nnU-Net's (``torch.topk(..., sorted=False)``, see :func:`nnunet_topk`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

import dynloss
from peers import WEIGHT_MAPS, weight_map, weighted

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

HAVE_SMP = importlib.util.find_spec("segmentation_models_pytorch") is not None
HAVE_MONAI = importlib.util.find_spec("monai") is not None
HAVE_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _plain_region(alpha: float, beta: float) -> Loss:
    """The Tversky loss in the fewest eager operations: the three sums I, P, G (FP = P - I,
    FN = G - I), no (1 - p) or (1 - t) temporaries."""
    def loss(x, t):
        p = torch.sigmoid(x)
        tp, ps, gs = (p * t).sum(), p.sum(), t.sum()
        return 1 - tp / (tp + alpha * (ps - tp) + beta * (gs - tp)).clamp_min(1e-7)

    return loss


def nnunet_topk(k: float) -> Loss:
    """nnU-Net's TopK formulation (``nnunet.training.loss_functions.TopK_loss.TopKLoss``) in
    binary mode: the per-element cross-entropy (``reduction="none"``), then the mean of its
    ``int(numel * k)`` largest values over the whole batch by
    ``torch.topk(flat, count, sorted=False)``. nnU-Net's ``k`` is a percentage
    (``k=10`` keeps 10 %); here a fraction, as dynloss's (``k=0.6`` keeps 60 %). nnU-Net rounds
    the count down, dynloss up (``ceil(k * numel)``): where ``k * numel`` is not an integer
    dynloss averages one element more, so the values differ by that element's share (4e-5
    relative at (8, 1, 64, 64), 6e-7 at (32, 1, 256, 256)); the work timed is the same.
    """

    def loss(x, t):
        per_element = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        count = int(per_element.numel() * k)
        return torch.topk(per_element.view(-1), count, sorted=False).values.mean()

    return loss


POS_WEIGHT = 3.0
"""``bce_pos_weight``'s weight of the positives."""

def _dynloss(name: str, backend: str) -> Loss:
    if name == "bce_pos_weight":
        return dynloss.BCELoss(pos_weight=POS_WEIGHT, backend=backend)
    if name in WEIGHT_MAPS:
        loss = dynloss.BCELoss if name == "bce_weight_map" else dynloss.FocalLoss
        return weighted(loss(reduction="none", backend=backend))
    return dynloss.LOSSES[name](backend=backend)


def competitors(name: str, backends: tuple[str, ...] = ("auto", "torch", "reference"),
                ) -> dict[str, Loss]:
    """Candidates for loss ``name`` (a key of ``dynloss.LOSSES``, ``"bce_pos_weight"``: BCE
    with ``pos_weight=3``, or one of :data:`WEIGHT_MAPS`), dynloss first."""
    found: dict[str, Loss] = {}
    for backend in backends:
        found[f"dynloss[{backend}]"] = _dynloss(name, backend)
    smp_losses = monai_losses = None
    if HAVE_SMP:
        import segmentation_models_pytorch.losses as smp_losses
    if HAVE_MONAI:
        import monai.losses as monai_losses
    if name == "dice":
        if smp_losses:
            found["smp"] = smp_losses.DiceLoss("binary")
        if monai_losses:
            found["monai"] = monai_losses.DiceLoss(sigmoid=True, batch=True)
        found["torch"] = _plain_region(0.5, 0.5)
    elif name in ("iou", "jaccard"):
        if smp_losses:
            found["smp"] = smp_losses.JaccardLoss("binary")
        if monai_losses:
            found["monai"] = monai_losses.DiceLoss(sigmoid=True, batch=True, jaccard=True)
        found["torch"] = _plain_region(1.0, 1.0)
    elif name == "tversky":
        if smp_losses:
            found["smp"] = smp_losses.TverskyLoss("binary", alpha=0.3, beta=0.7)
        if monai_losses:
            found["monai"] = monai_losses.TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7,
                                                      batch=True)
        found["torch"] = _plain_region(0.3, 0.7)
    elif name == "focal":
        if smp_losses:
            found["smp"] = smp_losses.FocalLoss("binary")
        if monai_losses:
            found["monai"] = monai_losses.FocalLoss(gamma=2.0)
        if HAVE_TORCHVISION:
            from torchvision.ops import sigmoid_focal_loss

            found["torch"] = lambda x, t: sigmoid_focal_loss(x, t, alpha=-1, gamma=2.0,
                                                             reduction="mean")
    elif name == "bce_pos_weight":
        weight = torch.tensor([POS_WEIGHT])
        if smp_losses:
            found["smp"] = smp_losses.SoftBCEWithLogitsLoss(pos_weight=weight)
        found["torch"] = torch.nn.BCEWithLogitsLoss(pos_weight=weight)
    elif name == "bce_weight_map":
        if smp_losses:
            found["smp"] = weighted(smp_losses.SoftBCEWithLogitsLoss(reduction="none"))
        found["torch"] = lambda x, t: F.binary_cross_entropy_with_logits(x, t,
                                                                         weight=weight_map(t))
    elif name == "focal_weight_map":
        if smp_losses:
            found["smp"] = weighted(smp_losses.FocalLoss("binary", reduction="none"))
        if monai_losses:
            found["monai"] = weighted(monai_losses.FocalLoss(gamma=2.0, reduction="none"))
        if HAVE_TORCHVISION:
            from torchvision.ops import sigmoid_focal_loss

            found["torch"] = weighted(lambda x, t: sigmoid_focal_loss(x, t, alpha=-1, gamma=2.0,
                                                                      reduction="none"))
    elif name == "bce":
        if smp_losses:
            found["smp"] = smp_losses.SoftBCEWithLogitsLoss()
        found["torch"] = torch.nn.BCEWithLogitsLoss()
    elif name == "topk":
        found["nnunet"] = nnunet_topk(0.6)
    return found
