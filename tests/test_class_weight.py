"""``weight`` on BCE in multiclass mode: ``torch.nn.CrossEntropyLoss(weight=w)``, whose mean
divides by the weights of the kept pixels' classes (MONAI's ``DiceCELoss(weight=...)`` uses it).

Against torch's own loss (values and gradients) and an independent float64 formula, on every
backend this process runs; the errors; a composite, a spec and ``repr``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import dynloss.functional as F
from dynloss import BCELoss, CompositeLoss, DiceLoss, build_loss

from ._backends import BACKENDS, seeded_case
from ._kernel_cases import graph_nodes

WEIGHTS = [0.2, 1.5, 3.0]


def _independent(logits, target, weight, ignore_index=None, from_logits=True):
    """``(sum_i w_t b_i, sum_i w_t)`` over the kept pixels, in float64."""
    x = logits.double()
    kept = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else (
        target != ignore_index)
    labels = torch.where(kept, target, 0)
    log_p = torch.log_softmax(x, 1) if from_logits else torch.log(x).clamp_min(-100)
    b = -log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    w = torch.tensor(weight, dtype=torch.float64)[labels] * kept
    return w * b, w


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [None, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_torch_cross_entropy_with_weight(backend, ignore_index, reduction):
    logits, target = seeded_case("multiclass", (2, 9, 7), seed=4, scale=3.0)
    torch_loss = torch.nn.CrossEntropyLoss(
        weight=torch.tensor(WEIGHTS), reduction=reduction,
        ignore_index=-100 if ignore_index is None else ignore_index)
    loss = BCELoss("multiclass", weight=WEIGHTS, ignore_index=ignore_index,
                   reduction=reduction, backend=backend)
    x, xt = (logits.clone().requires_grad_() for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # triton: the fallback's note
        got = loss(x, target)
    want = torch_loss(xt, target)
    # (torch's log_softmax loses the digits of a tiny per-pixel loss: the float64 check below
    # is the tight one)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    terms, w = _independent(logits, target, WEIGHTS, ignore_index)
    independent = {"mean": terms.sum() / w.sum(), "sum": terms.sum(), "none": terms}[reduction]
    torch.testing.assert_close(got.double(), independent, rtol=1e-6, atol=1e-8)
    upstream = torch.rand_like(got)
    got.backward(upstream)
    want.backward(upstream)
    # float32 rounding of gradients up to ~3 (reduction "sum"): a few ulps
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-5, atol=1e-6)
    xd = logits.double().requires_grad_()
    terms, w = _independent(xd, target, WEIGHTS, ignore_index)
    value = {"mean": terms.sum() / w.sum(), "sum": terms.sum(), "none": terms}[reduction]
    value.backward(upstream.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_probabilities(backend):
    logits, target = seeded_case("multiclass", (2, 5, 5), seed=6)
    p = torch.softmax(logits, 1)
    x, xr = (p.clone().requires_grad_() for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = F.bce_loss(x, target, mode="multiclass", from_logits=False, weight=WEIGHTS,
                         backend=backend)
    terms, w = _independent(p, target, WEIGHTS, from_logits=False)
    torch.testing.assert_close(got.double(), terms.sum() / w.sum(), rtol=1e-6, atol=1e-8)
    got.backward()
    F.bce_loss(xr, target, mode="multiclass", from_logits=False, weight=WEIGHTS,
               backend="reference").backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_weight_kept_is_a_loss_of_zero(backend):
    """Every kept pixel of a class of weight 0 (or all ignored): 0, as when every pixel is
    ignored (torch gives NaN, 0/0)."""
    logits, target = seeded_case("multiclass", (1, 3, 3), seed=2)
    target.fill_(0)
    x = logits.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = F.bce_loss(x, target, mode="multiclass", weight=[0.0, 1.0, 1.0], backend=backend)
    assert got.item() == 0.0
    got.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_weights_below_one_divide_by_their_sum():
    """A mean's normaliser below 1 (few pixels of small weight) is not raised to 1."""
    logits = torch.tensor([[[2.0], [0.5], [-1.0]]])  # (1, 3, 1): one pixel
    target = torch.tensor([[1]])
    got = F.bce_loss(logits, target, mode="multiclass", weight=[1.0, 0.25, 1.0])
    want = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 0.25, 1.0]))(logits, target)
    torch.testing.assert_close(got, want)


def test_gradcheck():
    logits, target = seeded_case("multiclass", (2, 3, 2), seed=1, dtype=torch.float64)
    x = logits.requires_grad_()
    for backend in ("reference", "torch"):
        def fn(a, backend=backend):
            return F.bce_loss(a, target, mode="multiclass", weight=WEIGHTS, backend=backend)

        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"weight": WEIGHTS}, ValueError,
     "weight is the per-class weight of multiclass mode's cross-entropy"),
    ({"weight": [1.0, -1.0], "mode": "multiclass"}, ValueError,
     r"weight\[1\] must be >= 0; got -1.0"),
    ({"weight": 2.0, "mode": "multiclass"}, TypeError,
     "weight must be None or a sequence of per-class weights"),
])
def test_bad_weight_is_refused_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        BCELoss(**kwargs)


def test_one_weight_per_class():
    logits, target = seeded_case("multiclass", (1, 2, 2), classes=3)
    with pytest.raises(ValueError, match="weight must hold one weight per class: 3 values for "
                                         "an input with C=3; got 2"):
        BCELoss("multiclass", weight=[1.0, 2.0])(logits, target)


def test_module_repr_spec_and_tensor():
    loss = BCELoss("multiclass", weight=torch.tensor(WEIGHTS))
    assert loss.weight == WEIGHTS
    assert repr(loss) == "BCELoss(mode='multiclass', weight=[0.2, 1.5, 3.0])"
    assert build_loss(repr(loss)).hyperparameters() == loss.hyperparameters()
    with pytest.raises(TypeError, match=r"BCELoss\.weight cannot be changed in place"):
        loss.weight[0] = 1.0


def test_dice_ce_composite():
    """MONAI's DiceCELoss(weight=w): a Dice term and the weighted cross-entropy, term by term."""
    logits, target = seeded_case("multiclass", (2, 6, 6), seed=3)
    composite = CompositeLoss([DiceLoss("multiclass"), BCELoss("multiclass", weight=WEIGHTS)])
    x, xs = (logits.clone().requires_grad_() for _ in range(2))
    got = composite(x, target)
    want = (DiceLoss("multiclass")(xs, target)
            + torch.nn.CrossEntropyLoss(weight=torch.tensor(WEIGHTS))(xs, target))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, xs.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dice_ce_composite_is_one_pass(backend, from_logits):
    """DiceCE with class weights fused (one pass where the backend has one): the terms
    computed apart, term by term, values and gradients, with ignored pixels."""
    logits, target = seeded_case("multiclass", (2, 6, 5), seed=9, scale=3.0)
    x0 = logits if from_logits else torch.softmax(logits, 1)
    target[1, 2:4, 1] = 2  # (2 is ignored below)
    kw = dict(mode="multiclass", backend=backend, ignore_index=2, from_logits=from_logits)
    composite = CompositeLoss([BCELoss(weight=WEIGHTS, **kw), DiceLoss(**kw)])
    assert composite._fused_params([1.0, 1.0]) is not None
    x, xs = (x0.clone().requires_grad_() for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = composite(x, target)
        want = BCELoss(weight=WEIGHTS, **kw)(xs, target) + DiceLoss(**kw)(xs, target)
    fused = {"native": "NativeCompositeLossBackward", "triton": "TritonFusedLossBackward"}
    if backend in fused:
        assert fused[backend] in graph_nodes(got)
    terms, w = _independent(x0, target, WEIGHTS, 2, from_logits=from_logits)
    torch.testing.assert_close(composite.last_terms["bce"].double(), terms.sum() / w.sum(),
                               rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, xs.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("weight", [[1.0, 1.0], [], [1.0] * 5], ids=["two-ones", "empty", "five"])
def test_ones_or_none_of_the_wrong_number_are_refused(weight):
    """Weights of 1 (or none) became the unweighted loss before their number was checked: a
    wrong number passed silently (torch: "weight tensor should be defined either for all or
    no classes")."""
    logits, target = seeded_case("multiclass", (1, 2, 2), classes=3)
    with pytest.raises(ValueError, match="weight must hold one weight per class: 3 values"):
        BCELoss("multiclass", weight=weight)(logits, target)


def test_weights_of_one_are_the_unweighted_loss():
    logits, target = seeded_case("multiclass", (2, 6, 6), seed=9)
    for backend in BACKENDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = F.bce_loss(logits, target, mode="multiclass", weight=[1.0] * 3,
                             backend=backend)
            want = F.bce_loss(logits, target, mode="multiclass", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=backend)


def test_a_weights_tensor_keeps_its_values():
    """float32: the shortest decimals (the same float32); half precision: the exact values
    (0.2 in bfloat16 is 0.2001953125: rounding it to 0.2 changed the loss); float32's
    largest number stays allowed."""
    from dynloss._checks import tensor_values

    assert tensor_values("weight", torch.tensor([0.2, 1.5])) == [0.2, 1.5]
    half = torch.tensor([0.2, 1.1], dtype=torch.bfloat16)
    assert tensor_values("weight", half) == [0.2001953125, 1.1015625]
    assert BCELoss("multiclass", weight=half).weight == [0.2001953125, 1.1015625]
    largest = torch.finfo(torch.float32).max
    assert BCELoss(pos_weight=torch.tensor([largest])).pos_weight == largest
    assert tensor_values("weight", torch.tensor([3, 4])) == [3, 4]
