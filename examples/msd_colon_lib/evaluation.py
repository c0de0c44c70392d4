"""Dice and IoU at threshold 0.5, in four averaging conventions side by side.

The paper does not say how it averages Dice. The conventions differ a lot on this data, where
about 90 % of the slices hold no tumour:

- ``slice``   per 2D slice, then the mean over slices; a slice with no tumour and no
  prediction scores 1 (so a model that predicts nothing scores about 0.9);
- ``tumour``  per slice, mean over the slices that *contain* tumour only;
- ``global``  one Dice over all pixels of the test set (TP, FP, FN summed over every slice);
- ``patient`` per patient in 3D (counts summed over the patient's test slices), then the mean
  over patients -- the convention of the Decathlon and nnU-Net: a patient with no tumour and
  no prediction is left out (every real case holds tumour, but under ``--split slice`` a
  patient's test slices may not), one with no tumour but false positives scores 0.

Per-slice confusion counts come from ``segmentation_models_pytorch.metrics.get_stats`` and the
scores from its ``f1_score`` / ``iou_score`` (``zero_division=1`` makes empty-vs-empty 1).
"""

from __future__ import annotations

import numpy as np
import torch

CONVENTIONS = ("slice", "tumour", "global", "patient")
METRIC_KEYS = tuple(f"{m}_{c}" for c in CONVENTIONS for m in ("dice", "iou"))
THRESHOLD = 0.5


def confusion(probs: torch.Tensor, masks: torch.Tensor, threshold: float = THRESHOLD) -> np.ndarray:
    """Per-slice ``[tp, fp, fn, tn]`` (int64, shape ``(N, 4)``) of probabilities vs masks."""
    import segmentation_models_pytorch as smp

    probs = probs.detach().float().reshape(len(probs), 1, -1)
    masks = masks.detach().long().reshape(len(masks), 1, -1)
    tp, fp, fn, tn = smp.metrics.get_stats(probs, masks, mode="binary", threshold=threshold)
    stacked = torch.stack([tp[:, 0], fp[:, 0], fn[:, 0], tn[:, 0]], dim=1)
    return stacked.cpu().numpy().astype(np.int64)


def _scores(counts: np.ndarray, reduction: str | None) -> tuple[float | np.ndarray, ...]:
    import segmentation_models_pytorch as smp

    t = torch.from_numpy(np.asarray(counts, dtype=np.int64).reshape(-1, 4))
    tp, fp, fn, tn = (t[:, i : i + 1] for i in range(4))
    dice = smp.metrics.f1_score(tp, fp, fn, tn, reduction=reduction, zero_division=1.0)
    iou = smp.metrics.iou_score(tp, fp, fn, tn, reduction=reduction, zero_division=1.0)
    return dice.numpy().reshape(-1), iou.numpy().reshape(-1)


def summarize(counts: np.ndarray, patients: np.ndarray) -> dict[str, float]:
    """The eight numbers ``{dice,iou}_{slice,tumour,global,patient}`` from per-slice counts.

    ``counts``: ``(N, 4)`` ``[tp, fp, fn, tn]`` per slice; ``patients``: ``(N,)`` patient ids.
    ``*_tumour`` is NaN when no slice contains tumour, ``*_patient`` when no patient has
    tumour or a prediction.
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(-1, 4)
    patients = np.asarray(patients)
    if len(counts) == 0:
        raise ValueError("no slices to evaluate")
    out: dict[str, float] = {}
    dice, iou = _scores(counts, None)
    out["dice_slice"], out["iou_slice"] = float(dice.mean()), float(iou.mean())
    has_tumour = (counts[:, 0] + counts[:, 2]) > 0
    if has_tumour.any():
        out["dice_tumour"] = float(dice[has_tumour].mean())
        out["iou_tumour"] = float(iou[has_tumour].mean())
    else:
        out["dice_tumour"] = out["iou_tumour"] = float("nan")
    dice, iou = _scores(counts.sum(0), None)
    out["dice_global"], out["iou_global"] = float(dice[0]), float(iou[0])
    per_patient = np.stack([counts[patients == p].sum(0) for p in np.unique(patients)])
    scored = per_patient[per_patient[:, :3].sum(1) > 0]  # empty vs empty: left out (nnU-Net)
    if len(scored):
        dice, iou = _scores(scored, None)
        out["dice_patient"], out["iou_patient"] = float(dice.mean()), float(iou.mean())
    else:
        out["dice_patient"] = out["iou_patient"] = float("nan")
    return {k: out[k] for k in METRIC_KEYS}


@torch.no_grad()
def predict_counts(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    keep: set[int] | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Run ``model`` over ``loader``: per-slice counts, slice indices, and kept probabilities.

    ``keep``: slice indices whose predicted probability maps are returned (for figures).
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    all_counts, all_index, kept = [], [], {}
    for images, masks, index in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images)
        probs = torch.sigmoid(logits.float())
        all_counts.append(confusion(probs, masks.to(device)))
        all_index.append(np.asarray(index))
        if keep:
            for j, k in enumerate(np.asarray(index).tolist()):
                if k in keep:
                    kept[k] = probs[j, 0].cpu().numpy()
    model.train(was_training)
    return np.concatenate(all_counts), np.concatenate(all_index), kept
