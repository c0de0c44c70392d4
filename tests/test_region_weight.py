"""``weight`` on Dice, IoU and Tversky: each class's loss weighed before the reduction, as
MONAI's ``DiceLoss(weight=w)`` (and the Dice term of its ``DiceCELoss(weight=w)``).

Against an independent float64 formula and MONAI, on every backend this process runs, values
and gradients; with ``include_background=False`` (C weights, or MONAI's C - 1); the errors; a
composite (one fused pass), a spec, ``repr``, pickling and ``torch.compile``.
"""

from __future__ import annotations

import pickle
import re
import warnings

import pytest
import torch
from monai.losses import DiceCELoss as MonaiDiceCELoss
from monai.losses import DiceLoss as MonaiDiceLoss

import dynloss
import dynloss.functional as F
from dynloss import BCELoss, CompositeLoss, DiceLoss, IoULoss, TverskyLoss, build_loss

from ._backends import BACKENDS, seeded_case
from .test_include_background import WEIGHTS as TVERSKY
from .test_include_background import _independent, _make

CLASS_WEIGHTS = [0.5, 2.0, 0.0, 1.5]


@pytest.mark.parametrize("include_background", [True, False], ids=["all", "no-background"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_image", [False, True], ids=["pooled", "per-image"])
@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
@pytest.mark.parametrize("name", ["dice", "iou", "tversky"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_class_loss_is_weighed(backend, name, mode, per_image, reduction,
                                    include_background):
    logits, target = seeded_case(mode, (2, 5, 6), seed=6, classes=4)
    alpha, beta = TVERSKY[name]
    loss = _make(name, mode, backend, weight=CLASS_WEIGHTS, per_image=per_image,
                 reduction=reduction, include_background=include_background, smooth=0.5)
    x = logits.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a backend's fallback note
        got = loss(x, target)
    xd = logits.double().requires_grad_()
    entries = _independent(xd, target, mode, alpha, beta, 0.5 + 1e-7, per_image)
    entries = entries * torch.tensor(CLASS_WEIGHTS, dtype=torch.float64)
    if not include_background:
        entries = entries[..., 1:]
    want = {"mean": entries.mean(), "sum": entries.sum(), "none": entries}[reduction]
    assert_like_the_formula(got, x, want, xd, seed=1)


def assert_like_the_formula(got, x, want, xd, seed, value_atol=1e-7):
    """``got`` (of input ``x``) is the float64 ``want`` (of ``xd``) in shape, value and
    gradient, for a seeded random upstream gradient of every entry."""
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=value_atol)
    upstream = torch.rand(got.shape, generator=torch.Generator().manual_seed(seed))
    got.backward(upstream)
    want.backward(upstream.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("include_background", [True, False], ids=["all", "no-background"])
@pytest.mark.parametrize("batch", [False, True])
def test_equals_monai(batch, include_background):
    """MONAI's weight (C values, or C - 1 without the background) on its per-image (or batch)
    loss; its smooth_nr = smooth_dr = t is our smooth = t / 2, eps = 0."""
    logits, target = seeded_case("multiclass", (2, 6, 5), seed=7, classes=4)
    weights = CLASS_WEIGHTS if include_background else CLASS_WEIGHTS[1:]
    monai = MonaiDiceLoss(softmax=True, to_onehot_y=True, batch=batch,
                          weight=torch.tensor(weights), include_background=include_background,
                          smooth_nr=1e-5, smooth_dr=1e-5)
    ours = DiceLoss("multiclass", weight=weights, per_image=not batch, smooth=0.5e-5, eps=0.0,
                    include_background=include_background)
    _assert_equals_monai(ours, monai, logits, target)


def _assert_equals_monai(ours, monai, logits, target):
    """Values and gradients of ``ours(x, target)`` and MONAI's ``monai(x, target[:, None])``."""
    x, xm = (logits.clone().requires_grad_() for _ in range(2))
    got, want = ours(x, target), monai(xm, target.unsqueeze(1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, xm.grad, rtol=1e-4, atol=1e-8)


def test_monai_dice_ce_with_weight():
    """MONAI's DiceCELoss(weight=w) weighs both terms: our Dice(weight=w) + BCE(weight=w)."""
    logits, target = seeded_case("multiclass", (2, 6, 5), seed=8, classes=4)
    w = [0.5, 2.0, 1.0, 1.5]
    monai = MonaiDiceCELoss(softmax=True, to_onehot_y=True, weight=torch.tensor(w))
    ours = CompositeLoss([DiceLoss("multiclass", weight=w, per_image=True, smooth=0.5e-5, eps=0),
                          BCELoss("multiclass", weight=w)])
    _assert_equals_monai(ours, monai, logits, target)
    # both terms in one fused pass (tests/test_class_choice_pass.py)
    assert ours._fused_params([1.0, 1.0]) is not None


def test_weights_of_one_are_the_unweighted_loss():
    logits, target = seeded_case("multilabel", (2, 5, 5), seed=2)
    for backend in BACKENDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = DiceLoss("multilabel", weight=[1.0, 1.0, 1.0], backend=backend)(logits, target)
            want = DiceLoss("multilabel", backend=backend)(logits, target)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


def test_ddp_pool_single_process_is_the_loss():
    logits, target = seeded_case("multiclass", (2, 5, 5), seed=3, classes=4)
    pooled = DiceLoss("multiclass", weight=CLASS_WEIGHTS, ddp_pool=True)(logits, target)
    scores = DiceLoss("multiclass", reduction="none")(logits, target)
    torch.testing.assert_close(pooled, (scores * torch.tensor(CLASS_WEIGHTS)).mean())


def test_functional_and_gradcheck():
    logits, target = seeded_case("multiclass", (2, 3, 2), seed=1, classes=4,
                                 dtype=torch.float64)
    x = logits.requires_grad_()
    for backend in ("reference", "torch"):
        def fn(a, backend=backend):
            return F.tversky_loss(a, target, mode="multiclass", weight=CLASS_WEIGHTS,
                                  per_image=True, smooth=1.0, backend=backend)

        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))
    got = F.dice_loss(logits, target, mode="multiclass", weight=torch.tensor(CLASS_WEIGHTS))
    want = DiceLoss("multiclass", weight=CLASS_WEIGHTS)(logits, target)
    assert torch.equal(got, want)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"mode": "binary", "weight": [2.0]}, ValueError,
     "weight needs mode='multiclass' or 'multilabel'"),
    ({"mode": "multiclass", "weight": [1.0, -1.0]}, ValueError, r"weight\[1\] must be >= 0"),
    ({"mode": "multiclass", "weight": [1.0, float("nan")]}, ValueError,
     r"weight\[1\] must be finite"),
    ({"mode": "multiclass", "weight": 2.0}, TypeError, "weight must be None or a sequence"),
    ({"mode": "multiclass", "weight": "ab"}, TypeError, "weight must be None or a sequence"),
    ({"mode": "multilabel", "weight": 2.0}, TypeError,
     "weight must be None or a sequence of per-class weights in mode='multilabel'; got float"),
    ({"mode": "multilabel", "weight": torch.ones(2, 2)}, TypeError,
     "weight must be None or a sequence of per-class weights in mode='multilabel'; got Tensor"),
])
def test_bad_weight_is_refused_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        DiceLoss(**kwargs)


@pytest.mark.parametrize(("include_background", "count"), [(True, 3), (True, 5), (False, 2)])
def test_the_number_of_weights_is_checked_per_call(include_background, count):
    logits, target = seeded_case("multiclass", (1, 3, 3), classes=4)
    loss = IoULoss("multiclass", weight=[1.0] * count, include_background=include_background)
    expected = "4 values for an input with C=4" + (
        " (or 3, of classes 1..3)" if not include_background else "")
    with pytest.raises(ValueError, match=re.escape("weight must hold one weight per class: "
                                                   + expected + f"; got {count}")):
        loss(logits, target)


def test_module_repr_spec_pickle_and_immutability():
    loss = DiceLoss("multiclass", weight=torch.tensor([0.2, 1.0, 3.0]))
    assert loss.weight == [0.2, 1.0, 3.0]
    assert repr(loss) == "DiceLoss(mode='multiclass', weight=[0.2, 1.0, 3.0])"
    assert loss.hyperparameters()["weight"] == [0.2, 1.0, 3.0]
    with pytest.raises(TypeError, match=r"DiceLoss\.weight cannot be changed in place"):
        loss.weight[0] = 1.0
    logits, target = seeded_case("multiclass", (2, 4, 4), seed=5)
    restored = pickle.loads(pickle.dumps(loss))
    assert torch.equal(restored(logits, target), loss(logits, target))
    spec = build_loss("dice(mode='multiclass', weight=[0.2, 1.0, 3.0])")
    assert torch.equal(spec(logits, target), loss(logits, target))
    loss.weight = [1.0, 1.0, 0.0]  # assigned anew: seen
    want = DiceLoss("multiclass", reduction="none")(logits, target) * torch.tensor(
        [1.0, 1.0, 0.0])
    torch.testing.assert_close(loss(logits, target), want.mean())
    old = DiceLoss("multiclass")
    state = old.__getstate__()
    del state["weight"]  # as a DiceLoss pickled before the argument existed
    older = DiceLoss.__new__(DiceLoss)
    older.__setstate__(state)
    assert older.weight is None and torch.equal(older(logits, target), old(logits, target))


def test_compile_fullgraph_matches_eager():
    logits, target = seeded_case("multiclass", (2, 6, 6), seed=9, classes=4)
    loss = TverskyLoss(mode="multiclass", weight=CLASS_WEIGHTS, include_background=False)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x, xc = (logits.clone().requires_grad_() for _ in range(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want, got = loss(x, target), compiled(xc, target)
    assert not caught, [str(w.message) for w in caught]  # (e.g. dynamo on a cache wrapper)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    want.backward()
    got.backward()
    torch.testing.assert_close(xc.grad, x.grad, rtol=1e-5, atol=1e-8)


def test_every_region_loss_takes_it():
    for cls in (DiceLoss, IoULoss, TverskyLoss, dynloss.JaccardLoss):
        assert cls(mode="multilabel", weight=[1.0, 2.0]).weight == [1.0, 2.0]


def test_fake_tensors_and_export_before_any_eager_call():
    """A first call under FakeTensorMode (as tracing tools make it) or a non-strict export
    must not leave a fake weights tensor behind for the eager calls, nor mix a real one into
    the fake call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    logits, target = seeded_case("multiclass", (2, 4, 4), seed=4)
    loss = DiceLoss("multiclass", weight=[0.25, 1.0, 3.0])
    x64 = logits.double()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = loss(mode.from_tensor(x64), mode.from_tensor(target))
    assert fake.shape == () and fake.dtype == torch.float64
    want = (DiceLoss("multiclass", reduction="none")(x64, target)
            * torch.tensor([0.25, 1.0, 3.0], dtype=torch.float64)).mean()
    torch.testing.assert_close(loss(x64, target), want)

    class Wrapped(torch.nn.Module):
        def forward(self, x, t):
            return IoULoss("multilabel", weight=[0.5, 2.0, 1.0])(x, t)

    ml_logits, ml_target = seeded_case("multilabel", (2, 4, 4), seed=5)
    half = ml_logits.half()  # (a dtype no call has used yet)
    program = torch.export.export(Wrapped(), (half, ml_target), strict=False).module()
    eager = Wrapped()(half, ml_target)
    torch.testing.assert_close(program(half, ml_target), eager)
