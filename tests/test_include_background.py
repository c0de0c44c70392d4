"""``include_background=False`` on Dice, IoU and Tversky: the score of class 0 is left out of
the mean (MONAI's ``include_background=False``, nnU-Net's ``do_bg=False``).

Against an independent float64 formula and MONAI, on every backend this process runs, values
and gradients; the shapes of ``reduction="none"``; the errors; a composite and a spec.
"""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceLoss as MonaiDiceLoss
from monai.losses import TverskyLoss as MonaiTverskyLoss

import dynloss
import dynloss.functional as F
from dynloss import BCELoss, CompositeLoss, DiceLoss, IoULoss, TverskyLoss, build_loss

from ._backends import BACKENDS, seeded_case

WEIGHTS = {"dice": (0.5, 0.5), "iou": (1.0, 1.0), "tversky": (0.3, 0.7)}


def _independent(logits, target, mode, alpha, beta, smoothing, per_image, ignore_index=None):
    """``1 - T`` per class (and sample) in float64, from first principles, background kept."""
    x = logits.double()
    c = x.shape[1]
    if mode == "multiclass":
        p = torch.softmax(x, 1)
        kept = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else (
            target != ignore_index)
        labels = torch.where(kept, target, 0)
        g = torch.movedim(torch.nn.functional.one_hot(labels, c), -1, 1).double()
        kept = kept.unsqueeze(1).expand_as(p)
    else:
        p = torch.sigmoid(x)
        g = target.double()
        kept = torch.ones_like(g, dtype=torch.bool) if ignore_index is None else (
            target != ignore_index)
        g = torch.where(kept, g, 0.0)
    p, g = p * kept, g * kept
    dims = tuple(range(2, x.dim())) if per_image else (0, *range(2, x.dim()))
    i, ps, gs = (p * g).sum(dims), p.sum(dims), g.sum(dims)
    index = (i + smoothing) / (i + alpha * (ps - i) + beta * (gs - i) + smoothing)
    return 1 - index


def _make(name, mode, backend, **kwargs):
    if name == "tversky":
        return TverskyLoss(*WEIGHTS[name], mode=mode, backend=backend, **kwargs)
    return dynloss.LOSSES[name](mode=mode, backend=backend, **kwargs)


@pytest.mark.parametrize("per_image", [False, True], ids=["pooled", "per-image"])
@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
@pytest.mark.parametrize("name", ["dice", "iou", "tversky"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients_leave_out_class_0(backend, name, mode, per_image):
    logits, target = seeded_case(mode, (2, 5, 6), seed=4, classes=4)
    alpha, beta = WEIGHTS[name]
    want = _independent(logits, target, mode, alpha, beta, 1e-7, per_image)[..., 1:].mean()
    reference = _make(name, mode, "reference", per_image=per_image, include_background=False)
    loss = _make(name, mode, backend, per_image=per_image, include_background=False)
    x, xr = (logits.clone().requires_grad_() for _ in range(2))
    got = loss(x, target)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    got.backward()
    reference(xr, target).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-7)
    if mode == "multiclass":  # class 0's logit still moves the other classes' softmax
        assert x.grad[:, 0].abs().sum() > 0
    else:  # sigmoid channels are independent: class 0 gets no gradient
        assert torch.equal(x.grad[:, 0], torch.zeros_like(x.grad[:, 0]))


@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
@pytest.mark.parametrize("name", ["dice", "iou", "tversky"])
def test_gradcheck_without_the_background(name, mode):
    logits, target = seeded_case(mode, (2, 3, 2), seed=1, classes=3, dtype=torch.float64)
    loss = _make(name, mode, "reference", include_background=False, smooth=0.5)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: loss(v, target), (x,))
    assert torch.autograd.gradgradcheck(lambda v: loss(v, target), (x,))


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("backend", ["reference", "torch"])  # float64: the others fall back
def test_equals_monai_include_background_false(backend, batch):
    logits, target = seeded_case("multiclass", (2, 5, 6), seed=2, classes=4,
                                 dtype=torch.float64)
    t = 1e-5
    monai = MonaiDiceLoss(softmax=True, to_onehot_y=True, include_background=False,
                          smooth_nr=t, smooth_dr=t, batch=batch)
    ours = DiceLoss("multiclass", include_background=False, per_image=not batch,
                    smooth=t / 2, eps=0.0, backend=backend)
    torch.testing.assert_close(ours(logits, target), monai(logits, target.unsqueeze(1)),
                               rtol=1e-10, atol=1e-12)
    logits, target = seeded_case("multilabel", (2, 5, 6), seed=3, classes=3,
                                 dtype=torch.float64)
    monai_t = MonaiTverskyLoss(sigmoid=True, include_background=False, alpha=0.3, beta=0.7,
                               smooth_nr=t, smooth_dr=t, batch=batch)
    ours_t = TverskyLoss(0.3, 0.7, mode="multilabel", include_background=False,
                         per_image=not batch, smooth=t, eps=0.0, backend=backend)
    torch.testing.assert_close(ours_t(logits, target), monai_t(logits, target),
                               rtol=1e-10, atol=1e-12)


def test_equals_nnunet_soft_dice_without_background():
    """nnU-Net v2's SoftDiceLoss(batch_dice=True, do_bg=False, smooth=1e-5) is ``-dc``:
    ``1 + nnU-Net`` is ours with ``smooth + eps = smooth / 2``."""
    logits, target = seeded_case("multiclass", (2, 5, 6), seed=5, classes=3,
                                 dtype=torch.float64)
    p = torch.softmax(logits, 1)
    g = torch.movedim(torch.nn.functional.one_hot(target, 3), -1, 1).double()
    axes = (0, 2, 3)
    tp, fp, fn = (p * g).sum(axes), (p * (1 - g)).sum(axes), ((1 - p) * g).sum(axes)
    dc = (2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5).clamp_min(1e-8)
    nnunet = -dc[1:].mean()
    ours = DiceLoss("multiclass", include_background=False, smooth=0.5e-5, eps=0.0)
    torch.testing.assert_close(ours(logits, target), 1 + nnunet, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_ignore_index(backend):
    logits, target = seeded_case("multiclass", (2, 5, 6), seed=6, classes=4)
    target[0, :2] = 255
    full = _independent(logits, target, "multiclass", 0.5, 0.5, 1e-7, True, 255)
    kw = {"mode": "multiclass", "per_image": True, "ignore_index": 255, "backend": backend,
          "include_background": False}
    none = DiceLoss(reduction="none", **kw)(logits, target)
    assert none.shape == (2, 3)
    torch.testing.assert_close(none.double(), full[:, 1:], rtol=1e-5, atol=1e-7)
    total = DiceLoss(reduction="sum", **kw)(logits, target)
    torch.testing.assert_close(total.double(), full[:, 1:].sum(), rtol=1e-5, atol=1e-6)
    pooled = DiceLoss("multiclass", include_background=False, reduction="none",
                      backend=backend)(logits, target.clamp_max(3))
    assert pooled.shape == (3,)


def test_functional_forms_take_it():
    logits, target = seeded_case("multiclass", (2, 5, 6), seed=7, classes=3)
    for function, module in ((F.dice_loss, DiceLoss), (F.iou_loss, IoULoss)):
        assert torch.equal(
            function(logits, target, mode="multiclass", include_background=False),
            module("multiclass", include_background=False)(logits, target))
    assert torch.equal(
        F.tversky_loss(logits, target, 0.3, 0.7, mode="multiclass", include_background=False),
        TverskyLoss(mode="multiclass", include_background=False)(logits, target))
    # the default keeps the background: the same as before the argument existed
    assert not torch.equal(F.dice_loss(logits, target, mode="multiclass"),
                           F.dice_loss(logits, target, mode="multiclass",
                                       include_background=False))


def test_binary_mode_and_a_single_channel_are_refused():
    with pytest.raises(ValueError, match="include_background=False needs mode='multiclass' or "
                                         "'multilabel'"):
        DiceLoss(include_background=False)
    with pytest.raises(ValueError, match="include_background=False needs mode="):
        F.iou_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), include_background=False)
    with pytest.raises(TypeError, match="include_background must be a bool; got str 'no'"):
        DiceLoss("multiclass", include_background="no")
    loss = DiceLoss("multilabel", include_background=False)
    with pytest.raises(ValueError, match="include_background=False leaves no class to score "
                                         "in an input with C=1 channel"):
        loss(torch.zeros(2, 1, 3), torch.zeros(2, 1, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_composite_term_without_background_is_not_fused_into_a_wrong_value(backend):
    """The fused composite pass knows nothing of the argument: such a term is computed on
    its own, and the total is the weighted sum of the two terms."""
    logits, target = seeded_case("multiclass", (2, 5, 6), seed=8, classes=4)
    dice = DiceLoss("multiclass", include_background=False, backend=backend)
    bce = BCELoss("multiclass", backend=backend)
    composite = CompositeLoss([dice, bce], weights=[0.7, 0.3])
    want = 0.7 * dice(logits, target) + 0.3 * bce(logits, target)
    got = composite(logits, target)
    torch.testing.assert_close(got, want, rtol=2e-7, atol=0)
    torch.testing.assert_close(composite.last_terms["dice"], dice(logits, target))


def test_repr_and_spec_round_trip():
    loss = TverskyLoss(mode="multiclass", include_background=False)
    assert repr(loss) == "TverskyLoss(mode='multiclass', include_background=False)"
    rebuilt = build_loss(repr(loss))
    assert rebuilt.hyperparameters() == loss.hyperparameters()
    assert build_loss("dice(mode='multilabel', include_background=False)").include_background \
        is False
    assert DiceLoss().hyperparameters()["include_background"] is True
