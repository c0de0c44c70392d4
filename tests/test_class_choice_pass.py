"""A region term that leaves out the background (``include_background=False``) or weighs its
classes (``weight=``) computed by the backend itself from its per-class scores, and fused
with a distribution term in one pass (nnU-Net's DC_and_CE, ``do_bg=False``; MONAI's
``DiceCELoss(include_background=False)`` or ``(weight=w)``), where the backend can.

Against an independent float64 formula and the terms computed apart, on every backend this
process runs, values and gradients; the native kernels' host scores and their tensor path (more
than 1024 sample-class scores); a backend that cannot (Triton) computes the same values with
the generic per-class path and two passes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dynloss import BCELoss, CompositeLoss, DiceLoss, FocalLoss
from dynloss.kernels.native.autograd import HOST_SCORES

from ._backends import BACKENDS, seeded_case
from .test_include_background import WEIGHTS as TVERSKY
from .test_include_background import _independent, _make
from .test_region_weight import assert_like_the_formula

CHOICES = {
    "no-background": dict(include_background=False),
    "weights": dict(weight=[0.5, 2.0, 0.0, 1.5]),
    "weights-no-background": dict(weight=[2.0, 0.25, 1.5], include_background=False),
}
"""Region arguments that choose or weigh classes (MONAI's C - 1 weights in the last)."""



def _want(logits, target, mode, name, per_image, reduction, choice, ignore_index=None):
    """The chosen classes' weighted ``1 - T``, reduced, from first principles (float64)."""
    alpha, beta = TVERSKY[name]
    entries = _independent(logits, target, mode, alpha, beta, 0.5 + 1e-7, per_image,
                           ignore_index)
    kwargs = CHOICES[choice]
    weights = kwargs.get("weight")
    first = 0 if kwargs.get("include_background", True) else 1
    if weights is not None:
        weights = [0.0] * (entries.shape[-1] - len(weights)) + list(weights)
        entries = entries * torch.tensor(weights, dtype=torch.float64)
    entries = entries[..., first:]
    return {"mean": entries.mean(), "sum": entries.sum(), "none": entries}[reduction]


def _quiet(function, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a backend's fallback note
        return function(*args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_image", [False, True], ids=["pooled", "per-image"])
@pytest.mark.parametrize("choice", sorted(CHOICES))
@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "triton"])
def test_many_scores_take_the_tensor_path(backend, mode, choice, per_image, reduction):
    """More sample-class scores than the native kernels form on the host (their float64
    tensor path), values and gradients for an upstream gradient of every score, with
    ignored pixels. (Triton, which cannot, is tested at this size in
    test_region_weight.py and test_include_background.py; its interpreter takes minutes
    for a thousand rows.)"""
    n = HOST_SCORES // 4 + 7
    logits, target = seeded_case(mode, (n, 2, 3), seed=11, classes=4)
    ignore = -1 if mode == "multiclass" else 2
    target = target.clone()
    target[3, 0, :] = ignore
    loss = _make("tversky", mode, backend, per_image=per_image, reduction=reduction,
                 smooth=0.5, ignore_index=ignore, **CHOICES[choice])
    x, xd = logits.clone().requires_grad_(), logits.double().requires_grad_()
    got = _quiet(loss, x, target)
    want = _want(xd, target, mode, "tversky", per_image, reduction, choice, ignore)
    assert_like_the_formula(got, x, want, xd, seed=2, value_atol=1e-6)


@pytest.mark.parametrize("choice", sorted(CHOICES))
@pytest.mark.parametrize("per_image", [False, True], ids=["pooled", "per-image"])
def test_the_native_kernels_score_the_chosen_classes_themselves(per_image, choice):
    """One native pass (the loss is the kernels' own node), not every class's scores from the
    kernels then weighed and cut by autograd operations: the same values and gradients."""
    if "native" not in BACKENDS:
        pytest.skip("the native kernels do not run here")
    logits, target = seeded_case("multiclass", (2, 5, 6), seed=5, classes=4)
    for reduction in ("mean", "sum", "none"):
        loss = _make("dice", "multiclass", "native", per_image=per_image, reduction=reduction,
                     smooth=0.5, **CHOICES[choice])
        x, xd = logits.clone().requires_grad_(), logits.double().requires_grad_()
        got = loss(x, target)
        assert type(got.grad_fn).__name__ == "NativeRegionLossBackward", reduction
        want = _want(xd, target, "multiclass", "dice", per_image, reduction, choice)
        assert_like_the_formula(got, x, want, xd, seed=3)


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("per_image", [False, True], ids=["pooled", "per-image"])
@pytest.mark.parametrize("choice", sorted(CHOICES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_composite_with_such_a_region_term_is_one_pass(backend, choice, per_image,
                                                         from_logits):
    """Dice (a class choice) + weighted BCE, or + Focal: one fused pass on the kernel
    backends (one kernel node in the graph), the terms computed apart and the formula, term
    by term, values and gradients, with ignored pixels."""
    logits, target = seeded_case("multiclass", (2, 6, 5), seed=9, classes=4, scale=3.0)
    x0 = logits if from_logits else torch.softmax(logits, 1)
    target[1, 2:4, 1] = 3  # (3 is ignored below)
    kw = dict(mode="multiclass", backend=backend, ignore_index=3, from_logits=from_logits)
    for other in (BCELoss(weight=[1.0, 0.5, 2.0, 1.0], **kw), FocalLoss(gamma=2.0, **kw)):
        dice = DiceLoss(per_image=per_image, smooth=0.5, **CHOICES[choice], **kw)
        composite = CompositeLoss([dice, other], weights=[0.7, 0.3])
        assert composite._fused_params([0.7, 0.3]) is not None
        x, xs = (x0.clone().requires_grad_() for _ in range(2))
        got = _quiet(composite, x, target)
        want = _quiet(lambda: 0.7 * dice(xs, target) + 0.3 * other(xs, target))
        kernel_nodes = {"native": ("NativeCompositeLossBackward", "NativeRegionLossBackward",
                                   "NativeDistributionLossBackward"),
                        "triton": ("TritonFusedLossBackward",)}.get(backend, ())
        if kernel_nodes:  # one pass: one kernel node, the composite's
            found = _count_nodes(got, kernel_nodes)
            assert found == {kernel_nodes[0]: 1}, found
        formula = _want(logits.double(), target, "multiclass", "dice", per_image, "mean",
                        choice, ignore_index=3)
        torch.testing.assert_close(composite.last_terms["dice"].double(), formula,
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
        got.backward()
        want.backward()
        torch.testing.assert_close(x.grad, xs.grad, rtol=1e-4, atol=1e-7)


def _count_nodes(t: torch.Tensor, names: tuple[str, ...]) -> dict[str, int]:
    """How many autograd nodes of each of ``names`` ``t``'s graph holds."""
    counts: dict[str, int] = {}
    stack, seen = [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in names:
            counts[type(node).__name__] = counts.get(type(node).__name__, 0) + 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wrong_number_of_weights_is_refused_before_the_pass(backend):
    """The weights' number is checked against the input's C on every path (C, or C - 1
    without the background), also in a composite."""
    logits, target = seeded_case("multiclass", (2, 4, 4), seed=1, classes=4)
    kw = dict(mode="multiclass", backend=backend)
    for loss in (DiceLoss(weight=[1.0, 2.0], **kw),
                 CompositeLoss([DiceLoss(weight=[1.0, 2.0], include_background=False, **kw),
                                BCELoss(**kw)])):
        with pytest.raises(ValueError, match=r"weight must hold one weight per class: 4 values "
                                             r"for an input with C=4"):
            _quiet(loss, logits, target)


@pytest.mark.parametrize("choice", sorted(CHOICES))
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "reference"])
def test_second_order_gradients_are_the_reference(backend, choice):
    """``create_graph=True`` through a region term with a class choice, alone and in a
    composite: the gradient of the gradient's norm is the reference's."""
    logits, target = seeded_case("multiclass", (2, 5, 4), seed=4, classes=4)
    kw = dict(mode="multiclass", smooth=0.5, **CHOICES[choice])

    def grad_of_grad_norm(make):
        x = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad(_quiet(make(), x, target), x, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), x)
        return second

    for make in (lambda b: DiceLoss(backend=b, per_image=True, **kw),
                 lambda b: CompositeLoss([DiceLoss(backend=b, **kw),
                                          BCELoss(mode="multiclass", backend=b)])):
        torch.testing.assert_close(grad_of_grad_norm(lambda: make(backend)),
                                   grad_of_grad_norm(lambda: make("reference")),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("choice", sorted(CHOICES))
def test_a_backend_without_class_choice_gets_every_class_and_the_same_loss(monkeypatch,
                                                                           choice):
    """A backend that does not declare ``class_choice`` (a backend added later; every one
    here declares it) is asked for every class's score and the caller weighs and cuts them:
    the same values and gradients, the composite's terms one after the other."""
    import dataclasses

    from dynloss.kernels.torch_backend import TORCH

    logits, target = seeded_case("multiclass", (2, 5, 4), seed=6, classes=4)
    asked = []
    region = TORCH.region

    def every_class_only(layout, params, checked):
        asked.append((params.include_background, params.class_weight, params.reduction))
        return region(layout, params, checked)

    kw = dict(mode="multiclass", backend="torch", smooth=0.5, **CHOICES[choice])
    results = []
    for declared in (True, False):
        asked.clear()
        monkeypatch.setattr(TORCH, "capabilities",
                            dataclasses.replace(TORCH.capabilities, class_choice=declared))
        monkeypatch.setattr(TORCH, "region", every_class_only)
        for make in (lambda: DiceLoss(per_image=True, reduction="none", **kw),
                     lambda: CompositeLoss([DiceLoss(**kw),
                                            BCELoss(mode="multiclass", backend="torch")])):
            x = logits.clone().requires_grad_()
            value = make()(x, target)
            value.sum().backward()
            results.append((value.detach(), x.grad))
    assert asked == [(True, None, "none")] * 2  # every class, unweighted, unreduced
    for got, want in zip(results[2:], results[:2], strict=True):
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
