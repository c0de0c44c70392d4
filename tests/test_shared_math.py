"""The softmax helpers of :mod:`dynloss._math` that keep their digits where the softmax
saturates: exact values against float64, ties, NaN, and autograd to the second order."""

from __future__ import annotations

import math

import pytest
import torch

from dynloss import _math

from ._kernel_cases import assert_elementwise_close, saturated_multiclass


def _rest_float64(x: torch.Tensor) -> torch.Tensor:
    """sum over the classes of exp(x - max), less one: computed in float64 from the sorted
    logits, an independent formulation."""
    ordered = x.double().sort(dim=1, descending=True).values
    return torch.exp(ordered[:, 1:] - ordered[:, :1]).sum(1, keepdim=True)


@pytest.mark.parametrize("target", ["top", "tie"])
def test_softmax_rest_keeps_the_digits_of_the_other_classes(target):
    x, _ = saturated_multiclass(target=target)
    mx, e, rest = _math.softmax_rest(x)
    want = _rest_float64(x)
    torch.testing.assert_close(rest.double(), want, rtol=1e-6, atol=0)
    assert torch.equal(mx, x.amax(1, keepdim=True))
    torch.testing.assert_close(e, torch.exp(x - mx), rtol=0, atol=0)
    if target == "top":  # 1 - p_top is 1e-6..1e-4 here: as a difference it loses digits
        assert want.max() < 1e-4
        assert not torch.allclose((1 - x.softmax(1).amax(1, keepdim=True)).double(),
                                  want / (1 + want), rtol=1e-3, atol=0)


def test_softmax_rest_counts_every_tie_but_one():
    x = torch.tensor([[[3.0, 1.0, -2.0], [3.0, 1.0, 5.0], [3.0, 1.0, 5.0], [0.0, 1.0, 5.0]]])
    _, _, rest = _math.softmax_rest(x)
    want = torch.tensor([[[2 + torch.exp(torch.tensor(-3.0)).item(), 3.0,
                           2 + torch.exp(torch.tensor(-7.0)).item()]]])
    torch.testing.assert_close(rest, want, rtol=1e-7, atol=0)


def test_softmax_rest_is_nan_for_a_nan_or_infinite_logit():
    x = torch.tensor([[[0.0, 0.0, 1.0], [float("nan"), float("inf"), 2.0]]])
    _, _, rest = _math.softmax_rest(x)
    assert rest[0, 0, :2].isnan().all() and rest[0, 0, 2].isfinite()


def _cross_entropy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _math.pixel_cross_entropy(x, t, from_logits=True).sum()


@pytest.mark.parametrize("target", ["top", "other", "tie"])
def test_pixel_cross_entropy_differentiates_as_logsumexp(target):
    """max and the at-max mask are constants for autograd, yet the gradient is softmax - onehot
    and the Hessian logsumexp's (gradcheck and gradgradcheck in float64, at ties too)."""
    x, t = saturated_multiclass(n=1, m=5, margin=3.0, offset=0.0, target=target)
    x = x.double().requires_grad_()
    (grad,) = torch.autograd.grad(_cross_entropy(x, t), x)
    want = torch.softmax(x.detach(), 1) - torch.nn.functional.one_hot(t, 4).movedim(-1, 1)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(lambda a: _cross_entropy(a, t), (x,))
    assert torch.autograd.gradgradcheck(lambda a: _cross_entropy(a, t), (x,))


@pytest.mark.parametrize("target", ["top", "other", "tie"])
def test_pixel_cross_entropy_gradient_keeps_its_digits_in_float32(target):
    """Autograd's float32 gradient of the cross-entropy holds every element to 1e-4 of the
    float64 one where the softmax saturates: at the target, ``p_t - 1`` comes out as minus the
    sum of the other classes' terms (no ``1 - 1`` cancellation), which the plain
    ``logsumexp(x) - x_t`` loses (up to all its digits here)."""
    x, t = saturated_multiclass(target=target)
    grads = []
    for dtype in (torch.float32, torch.float64):
        xs = x.to(dtype).requires_grad_()
        grads.append(torch.autograd.grad(_cross_entropy(xs, t), xs)[0])
    assert_elementwise_close(grads[0], grads[1], rtol=1e-4)
    if target == "top":  # what the plain formula gives there
        xs = x.clone().requires_grad_()
        plain = (torch.logsumexp(xs, 1) - xs.gather(1, t[:, None]).squeeze(1)).sum()
        (lossy,) = torch.autograd.grad(plain, xs)
        assert not torch.allclose(lossy.double(), grads[1], rtol=1e-2, atol=0)


@pytest.mark.parametrize("target", ["top", "other", "tie"])
def test_softmax_backward_keeps_its_digits_and_differentiates_twice(target):
    """The reference's softmax (``_math.probabilities``, multiclass) has the softmax's first
    and second derivatives (gradcheck/gradgradcheck in float64, at an exact tie too) and a
    float32 vector-Jacobian product within 1e-4 of float64's in every element where the
    softmax saturates, which ``torch.softmax``'s own backward is not."""
    x, _ = saturated_multiclass(n=1, m=6, target=target)
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def softmax(a):
        return _math.probabilities(a, "multiclass", True)

    small = (x.double() - x.double().mean()) / 4  # moderate logits for finite differences
    small.requires_grad_()
    assert torch.autograd.gradcheck(softmax, (small,))
    assert torch.autograd.gradgradcheck(softmax, (small,))
    grads = []
    for dtype in (torch.float32, torch.float64):
        xs = x.to(dtype).requires_grad_()
        (grad,) = torch.autograd.grad(softmax(xs), xs, g.to(dtype))
        grads.append(grad)
    assert_elementwise_close(grads[0], grads[1], rtol=1e-4)
    if target == "top":  # torch's own backward there
        xs = x.clone().requires_grad_()
        (lossy,) = torch.autograd.grad(xs.softmax(1), xs, g.float())
        assert not torch.allclose(lossy.double(), grads[1], rtol=1e-2, atol=0)


def test_sigmoid_backward_keeps_its_digits_and_differentiates_twice():
    """``probabilities`` (binary) under autograd: ``p sigmoid(-x)`` as the derivative, to
    float32's relative precision where the sigmoid saturates (autograd's own sigmoid backward
    gives 0 from |x| ~17 on), and a second derivative that gradgradcheck accepts."""
    x = torch.tensor([[[-30.0, -17.5, -9.0, -0.5, 0.0, 0.5, 9.0, 17.5, 30.0]]])
    xs = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(_math.probabilities(xs, "binary", True).sum(), xs)
    x64 = x.double().requires_grad_()
    (want,) = torch.autograd.grad(torch.sigmoid(x64).sum(), x64)
    assert_elementwise_close(got, want, rtol=1e-6)
    assert (got > 0).all()
    x64 = (torch.randn(2, 1, 5, dtype=torch.float64) * 4).requires_grad_()
    fn = lambda t: _math.probabilities(t, "multilabel", True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x64,))
    assert torch.autograd.gradgradcheck(fn, (x64,))


def test_sigmoid_slope_keeps_its_digits_where_the_sigmoid_saturates():
    """``p (1 - p)`` with ``1 - p`` as a float32 difference is 0 from ``|x|`` ~17 on: the slope
    (the first-order gradient under ``create_graph=True``) is ``sigmoid(x) sigmoid(-x)``."""
    x = torch.tensor([0.0, 5.0, 12.0, 20.0, -20.0, 40.0, -60.0])
    want = (torch.sigmoid(x.double()) * torch.sigmoid(-x.double())).float()
    assert (want[3:] > 0).all()
    torch.testing.assert_close(_math.sigmoid_slope(x), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("x", [-20.5, -25.0, -35.0, 20.5, 30.0])
def test_float64_bce_keeps_its_digits_beyond_twenty(x):
    """``F.softplus`` returns ``x`` itself beyond its threshold 20, exact in float32 but 1e-9
    off in float64: the reference's float64 BCE (and Focal) at ``|x| > 20`` was wrong where
    every other backend was right."""
    g = 1.0 if x < 0 else 0.0  # the wrong label: softplus(|x|)
    xs = torch.tensor([x], dtype=torch.float64, requires_grad=True)
    value = _math.elementwise_bce(xs, torch.tensor([g], dtype=torch.float64), True)
    (grad,) = torch.autograd.grad(value.sum(), xs)
    a = abs(x)
    assert value.item() == pytest.approx(a + math.log1p(math.exp(-a)), rel=1e-15, abs=0)
    want_grad = math.copysign(1 / (1 + math.exp(-a)), x)  # -sigmoid(-x) or sigmoid(x)
    assert grad.item() == pytest.approx(want_grad, rel=1e-15, abs=0)
