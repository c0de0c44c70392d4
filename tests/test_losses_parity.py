"""Parity with the libraries the paper used (smp 0.6, PyTorch) and with MONAI."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
from hypothesis import given
from hypothesis import strategies as st
from monai.losses import DiceLoss as MonaiDiceLoss
from monai.losses import TverskyLoss as MonaiTverskyLoss

import dynloss
from tests.strategies import cases

RTOL = 1e-5
BACKENDS = ["torch", "reference"]


def close(ours, theirs, rtol=RTOL, atol=1e-6):
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol, atol=atol)


# smp 0.6 computes the intersection as (P + G - |p - g|_1) / 2, which equals sum(p * g) only
# for hard labels (and is formed from a difference of sums in float32).
# Parity is therefore checked in float64, where both sides are exact to ~1e-12.


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases("binary", every_class=True, dtype=torch.float64))
def test_binary_region_losses_equal_smp(backend, case):
    logits, target = case
    close(dynloss.DiceLoss(backend=backend)(logits, target),
          smp.losses.DiceLoss("binary")(logits, target))
    close(dynloss.IoULoss(backend=backend)(logits, target),
          smp.losses.JaccardLoss("binary")(logits, target))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases("binary", every_class=True, dtype=torch.float64),
       alpha=st.floats(0.05, 2), beta=st.floats(0.05, 2))
def test_binary_tversky_equals_smp(backend, case, alpha, beta):
    # (alpha = beta = 0 is left out: smp clamps a denominator below eps=1e-7 to eps there)
    logits, target = case
    ours = dynloss.TverskyLoss(alpha, beta, backend=backend)(logits, target)
    theirs = smp.losses.TverskyLoss("binary", alpha=alpha, beta=beta)(logits, target)
    close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases("binary"))
def test_binary_focal_equals_smp(backend, case):
    logits, target = case
    close(dynloss.FocalLoss(backend=backend)(logits, target),
          smp.losses.FocalLoss("binary")(logits, target), atol=1e-6)


@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_multi_region_losses_equal_smp_when_every_class_present(mode, backend, data):
    logits, target = data.draw(cases(mode, every_class=True, dtype=torch.float64))
    close(dynloss.DiceLoss(mode, backend=backend)(logits, target),
          smp.losses.DiceLoss(mode)(logits, target))
    close(dynloss.IoULoss(mode, backend=backend)(logits, target),
          smp.losses.JaccardLoss(mode)(logits, target))


@pytest.mark.parametrize("mode", ["binary", "multilabel"])
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_bce_equals_torch_bce_with_logits(mode, backend, data):
    logits, target = data.draw(cases(mode, soft=data.draw(st.booleans()), dtype=torch.float64))
    ours = dynloss.BCELoss(mode, backend=backend)(logits, target)
    theirs = torch.nn.BCEWithLogitsLoss()(logits, target)
    close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases("multiclass", dtype=torch.float64), ignore=st.booleans())
def test_multiclass_bce_equals_cross_entropy(backend, case, ignore):
    logits, target = case
    if ignore:
        target = target.clone()
        target.view(-1)[::3] = -100
    ours = dynloss.BCELoss("multiclass", ignore_index=-100 if ignore else None,
                           backend=backend)(logits, target)
    theirs = torch.nn.CrossEntropyLoss(ignore_index=-100)(logits, target)
    if ignore and (target != -100).sum() == 0:
        assert ours.item() == 0.0
    else:
        close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases("binary", soft=True), smooth=st.floats(0, 2))
def test_per_image_dice_equals_monai(backend, case, smooth):
    logits, target = case
    s = 2 * (smooth + 1e-7)
    monai = MonaiDiceLoss(sigmoid=True, smooth_nr=s, smooth_dr=s, batch=False)
    ours = dynloss.DiceLoss(smooth=smooth, per_image=True, backend=backend)
    close(ours(logits, target), monai(logits.unsqueeze(1) if logits.dim() == 2 else logits,
                                      target.unsqueeze(1) if target.dim() == 2 else target))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases("multiclass"), smooth=st.floats(0, 2))
def test_per_image_multiclass_dice_equals_monai(backend, case, smooth):
    logits, target = case
    s = 2 * (smooth + 1e-7)
    monai = MonaiDiceLoss(softmax=True, to_onehot_y=True, smooth_nr=s, smooth_dr=s, batch=False)
    ours = dynloss.DiceLoss("multiclass", smooth=smooth, per_image=True, backend=backend)
    close(ours(logits, target), monai(logits, target.unsqueeze(1)))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases("multilabel", soft=True), smooth=st.floats(0, 2),
       alpha=st.floats(0, 1), beta=st.floats(0, 1))
def test_per_image_tversky_equals_monai(backend, case, smooth, alpha, beta):
    logits, target = case
    s = smooth + 1e-7
    monai = MonaiTverskyLoss(sigmoid=True, alpha=alpha, beta=beta, smooth_nr=s, smooth_dr=s,
                             batch=False)
    ours = dynloss.TverskyLoss(alpha, beta, mode="multilabel", smooth=smooth, per_image=True,
                               backend=backend)
    close(ours(logits, target), monai(logits, target))


def test_smp_zeroes_empty_batches_and_we_do_not():
    """Our documented difference: false positives on an all-empty batch cost (nearly) 1."""
    logits = torch.full((2, 1, 4, 4), 3.0)  # confident foreground everywhere
    target = torch.zeros(2, 1, 4, 4)
    assert smp.losses.DiceLoss("binary")(logits, target).item() == 0.0
    ours = dynloss.DiceLoss()(logits, target)
    p_sum = torch.sigmoid(torch.tensor(3.0)).item() * 32
    s = 1e-7
    assert ours.item() == pytest.approx(1 - 2 * s / (p_sum + 2 * s), rel=1e-6)
    # and with smoothing the false positives get a gradient that lowers the logits:
    # d/dx_i (1 - 2s / (P + 2s)) = 2s / (P + 2s)^2 * p_i (1 - p_i), the same for every pixel
    x = logits.clone().requires_grad_()
    dynloss.DiceLoss(smooth=1.0)(x, target).backward()
    p = torch.sigmoid(torch.tensor(3.0, dtype=torch.float64))
    s = 1.0 + 1e-7
    slope = 2 * s / (32 * p + 2 * s) ** 2 * p * (1 - p)
    torch.testing.assert_close(x.grad, torch.full_like(x, slope.item()), rtol=1e-5, atol=0)


def test_smp_keeps_ignored_pixels_in_bce_mean_and_we_do_not():
    logits = torch.tensor([[[[2.0, -1.0, 0.5, 4.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 255.0, 255.0]]]])
    ours = dynloss.BCELoss(ignore_index=255)(logits, target)
    kept = torch.nn.functional.binary_cross_entropy_with_logits(logits[..., :2], target[..., :2])
    close(ours, kept, rtol=1e-6)
    smp_value = smp.losses.SoftBCEWithLogitsLoss(ignore_index=255)(logits, target)
    # smp averages over all 4 pixels, counting the two ignored ones as zeros
    close(smp_value, kept / 2, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases("multiclass", dtype=torch.float64))
def test_smp_multiclass_focal_is_our_multilabel_focal_on_the_one_hot_target(backend, case):
    """The docs' mapping: smp averages one-vs-rest sigmoid focal losses over the classes (the
    docs said it summed them)."""
    logits, target = case
    one_hot = torch.movedim(torch.nn.functional.one_hot(target, logits.shape[1]), -1, 1)
    ours = dynloss.FocalLoss(mode="multilabel", backend=backend)(logits, one_hot.double())
    close(ours, smp.losses.FocalLoss("multiclass")(logits, target), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t", [1.0, 1e-5, 1e-9])
def test_monai_smoothing_maps_with_eps_zero_for_any_t(t):
    """The docs' recipe ``smooth=t/2, eps=0`` (Dice), ``smooth=t, eps=0`` (Tversky): the old
    one, ``smooth=t/2 - eps``, is a ValueError below t = 2e-7."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64)
    target = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).double()
    close(dynloss.DiceLoss(per_image=True, smooth=t / 2, eps=0.0)(logits, target),
          MonaiDiceLoss(sigmoid=True, smooth_nr=t, smooth_dr=t)(logits, target),
          rtol=1e-12, atol=1e-15)
    close(dynloss.TverskyLoss(0.3, 0.7, per_image=True, smooth=t, eps=0.0)(logits, target),
          MonaiTverskyLoss(sigmoid=True, alpha=0.3, beta=0.7, smooth_nr=t, smooth_dr=t)(
              logits, target), rtol=1e-12, atol=1e-15)


def test_class_subsets_and_weights_from_reduction_none_as_the_docs_say():
    """The docs' one-liners for smp's ``classes=``, ``class_weights=`` and Tversky ``gamma``
    and MONAI's ``weight=``; smp's only where each class has a positive pixel (as the docs
    say: smp scores an absent class 0)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 4, (2, 6, 6), generator=g)
    scores = dynloss.DiceLoss("multiclass", reduction="none")(x, t)
    close(scores[[1, 3]].mean(), smp.losses.DiceLoss("multiclass", classes=[1, 3])(x, t),
          rtol=1e-7, atol=1e-8)  # (smp clamps its denominator to eps, we add eps: ~1e-9)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    per_image = dynloss.DiceLoss("multiclass", per_image=True, reduction="none",
                                 smooth=0.5e-5, eps=0.0)(x, t)
    monai = MonaiDiceLoss(softmax=True, to_onehot_y=True, weight=w, smooth_nr=1e-5,
                          smooth_dr=1e-5)(x, t.unsqueeze(1))
    close((per_image * w).mean(), monai, rtol=1e-12, atol=1e-14)
    weights = [0.1, 0.2, 0.3, 0.4]
    close((scores * w).sum() / w.sum(),
          smp.losses.DiceLoss("multiclass", class_weights=weights)(x, t), rtol=1e-6, atol=1e-7)
    absent = t.clamp_max(2)  # class 3 has no pixel: smp's loss for it is 0, ours ~1
    ours = dynloss.DiceLoss("multiclass", reduction="none")(x, absent)
    theirs = smp.losses.DiceLoss("multiclass", classes=[1, 3])(x, absent)
    close(ours[1] / 2, theirs, rtol=1e-7, atol=1e-8)
    assert ours[3] > 0.5
    tversky = dynloss.TverskyLoss(0.3, 0.7, mode="multiclass")(x, t)
    close(tversky ** 1.5, smp.losses.TverskyLoss("multiclass", alpha=0.3, beta=0.7, gamma=1.5)(
        x, t), rtol=1e-7, atol=1e-8)


def test_weighted_cross_entropy_from_focal_sum_as_the_docs_say():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.randint(0, 3, (2, 5, 5), generator=g)
    w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    total = dynloss.FocalLoss(gamma=0, alpha=w.tolist(), mode="multiclass", reduction="sum")(x, t)
    close(total / w[t].sum(), torch.nn.functional.cross_entropy(x, t, weight=w), rtol=1e-12,
          atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases("multilabel", dtype=torch.float64), alpha=st.sampled_from([None, 0.25, 0.8]))
def test_monai_sigmoid_focal_is_our_multilabel_focal(backend, case, alpha):
    """docs/losses/distribution.md: MONAI's FocalLoss (sigmoid) is our binary/multilabel one,
    ``alpha`` included, and ``ignore_index`` in binary mode."""
    from monai.losses import FocalLoss as MonaiFocalLoss

    logits, target = case
    ours = dynloss.FocalLoss(alpha=alpha, mode="multilabel", backend=backend)
    close(ours(logits, target), MonaiFocalLoss(alpha=alpha)(logits, target))
    binary_logits, binary_target = logits[:, :1], target[:, :1].clone()
    binary_target.reshape(-1)[::3] = 255  # every third pixel ignored
    ours = dynloss.FocalLoss(alpha=alpha, ignore_index=255, backend=backend)
    close(ours(binary_logits, binary_target),
          MonaiFocalLoss(alpha=alpha, ignore_index=255)(binary_logits, binary_target))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases("multiclass", dtype=torch.float64))
def test_monai_softmax_focal_is_our_multiclass_focal_over_the_classes(backend, case):
    """docs/losses/distribution.md: MONAI's ``use_softmax=True, to_onehot_y=True`` averages
    over N·C·pixels (our value / C); its ``reduction="sum"`` is our sum / pixels per image."""
    from monai.losses import FocalLoss as MonaiFocalLoss

    logits, target = case
    classes, pixels = logits.shape[1], logits[0, 0].numel()
    for reduction, scale in (("mean", 1 / classes), ("sum", 1 / pixels)):
        ours = dynloss.FocalLoss(mode="multiclass", reduction=reduction, backend=backend)
        theirs = MonaiFocalLoss(use_softmax=True, to_onehot_y=True, reduction=reduction)
        close(ours(logits, target) * scale, theirs(logits, target.unsqueeze(1)))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases("binary", soft=True, dtype=torch.float64), t=st.floats(1e-3, 2))
def test_monai_jaccard_is_our_per_image_iou_with_half_the_smoothing(backend, case, t):
    """docs/losses/region.md: MONAI's ``DiceLoss(jaccard=True, smooth_nr=t, smooth_dr=t)`` is
    our ``IoULoss(per_image=True, smooth=t/2, eps=0)``."""
    logits, target = case
    if logits.dim() == 2:
        logits, target = logits.unsqueeze(1), target.unsqueeze(1)
    theirs = MonaiDiceLoss(sigmoid=True, jaccard=True, smooth_nr=t, smooth_dr=t, batch=False)
    ours = dynloss.IoULoss(per_image=True, smooth=t / 2, eps=0.0, backend=backend)
    close(ours(logits, target), theirs(logits, target), rtol=1e-9, atol=1e-12)


def test_smp_tversky_defaults_are_dice_and_ours_the_papers():
    """The docstrings: smp's TverskyLoss defaults to 0.5 / 0.5 (Dice), ours to 0.3 / 0.7."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    target = (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).double()
    theirs = smp.losses.TverskyLoss("binary", smooth=0.0)(logits, target)
    close(dynloss.TverskyLoss(0.5, 0.5, smooth=0.0)(logits, target), theirs)
    close(dynloss.DiceLoss(smooth=0.0)(logits, target), theirs)
    assert abs(dynloss.TverskyLoss(smooth=0.0)(logits, target).item() - theirs.item()) > 1e-3


def test_topk_reads_k_1_as_every_pixel_not_one_percent():
    """docs/losses/distribution.md: nnU-Net's ``k=1`` (1 %) is ``k=0.01`` here; ``k=1`` is the
    cross-entropy over every pixel."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 10, 10, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (1, 10, 10), generator=gen)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    close(dynloss.TopKLoss(k=1, mode="multiclass")(logits, labels), ce.mean())
    close(dynloss.TopKLoss(k=0.01, mode="multiclass")(logits, labels), ce.max())
