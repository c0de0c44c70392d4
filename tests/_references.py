"""Independent float64 references for the six losses, written from the paper's formulas.

They share no code with dynloss: sums by explicit masking, BCE from ``logsigmoid``, TopK by a
full sort.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def probabilities(x, mode):
    x = x.double()
    return x.softmax(1) if mode == "multiclass" else x.sigmoid()


def one_hot(target, num_classes):
    """(N, *S) class indices -> (N, C, *S) float64."""
    return F.one_hot(target.long(), num_classes).movedim(-1, 1).double()


def region_sums(p, g, keep, per_image):
    """p, g, keep: (N, C, *S) float64. Returns I, P, G of shape (N, C) or (C,)."""
    dims = tuple(range(2, p.dim()))
    if not per_image:
        dims = (0, *dims)
    return (p * g * keep).sum(dims), (p * keep).sum(dims), (g * keep).sum(dims)


def tversky_ref(p, g, keep, alpha, beta, smooth=0.0, eps=1e-7, per_image=False):
    i, ps, gs = region_sums(p, g, keep, per_image)
    tp, fp, fn = i, ps - i, gs - i
    s = smooth + eps
    return (1 - (tp + s) / (tp + alpha * fp + beta * fn + s)).mean()


def dice_ref(p, g, keep, smooth=0.0, eps=1e-7, per_image=False):
    i, ps, gs = region_sums(p, g, keep, per_image)
    s = smooth + eps
    return (1 - (2 * i + 2 * s) / (ps + gs + 2 * s)).mean()


def iou_ref(p, g, keep, smooth=0.0, eps=1e-7, per_image=False):
    i, ps, gs = region_sums(p, g, keep, per_image)
    s = smooth + eps
    return (1 - (i + s) / (ps + gs - i + s)).mean()


def bce_elements(x, g):
    """Binary cross-entropy of logits, float64, from log-sigmoid."""
    x, g = x.double(), g.double()
    return -(g * F.logsigmoid(x) + (1 - g) * F.logsigmoid(-x))


def ce_elements(x, target):
    """Softmax cross-entropy per pixel, (N, *S)."""
    logp = F.log_softmax(x.double(), 1)
    return -logp.gather(1, target.long().unsqueeze(1)).squeeze(1)


def focal_elements(b, gamma):
    return (1 - torch.exp(-b)) ** gamma * b


def topk_mean(values, k):
    flat = values.reshape(-1).double()
    n = max(1, math.ceil(round(k * flat.numel(), 9)))
    return flat.sort(descending=True).values[:n].mean()
