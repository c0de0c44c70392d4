"""Gradients: torch.autograd.gradcheck in float64 for every loss, mode and backend, and the
fused path's values and gradients against the reference path."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dynloss
from tests._backends import BACKENDS as EVERY_BACKEND
from tests.strategies import cases

MODES = ["binary", "multilabel", "multiclass"]
BACKENDS = ["torch", "reference"]
LOSS_KWARGS = {
    "bce": [{}],
    "focal": [{"gamma": 2.0}, {"gamma": 0.5}, {"gamma": 2.0, "alpha": "weights"}],
    "topk": [{"k": 0.6}, {"k": 0.25}],
    "dice": [{}, {"per_image": True, "smooth": 1.0}],
    "iou": [{}, {"per_image": True}],
    "tversky": [{"alpha": 0.3, "beta": 0.7}, {"alpha": 1.5, "beta": 0.2, "per_image": True}],
}


def make(name, kwargs, mode, backend, classes=3, **extra):
    kwargs = dict(kwargs)
    if kwargs.get("alpha") == "weights":
        kwargs["alpha"] = [0.5 + i for i in range(classes)] if mode == "multiclass" else 0.25
    return dynloss.LOSSES[name](mode=mode, backend=backend, **kwargs, **extra)


def sample(mode, soft, ignore, gen):
    c = 1 if mode == "binary" else 3
    logits = torch.randn(2, c, 3, 4, generator=gen, dtype=torch.float64) * 2
    if mode == "multiclass":
        target = torch.randint(0, c, (2, 3, 4), generator=gen)
    elif soft:
        target = torch.rand(2, c, 3, 4, generator=gen, dtype=torch.float64)
    else:
        target = (torch.rand(2, c, 3, 4, generator=gen) > 0.5).double()
    if ignore:
        target = target.clone()
        target.view(-1)[::5] = 255
    return logits, target


CASES = [
    (name, i, mode, backend, from_logits, ignore)
    for name, variants in LOSS_KWARGS.items()
    for i in range(len(variants))
    for mode, backend, from_logits, ignore in itertools.product(
        MODES, BACKENDS, [True, False], [False, True])
]


@pytest.mark.parametrize(("name", "variant", "mode", "backend", "from_logits", "ignore"), CASES)
def test_gradcheck(name, variant, mode, backend, from_logits, ignore):
    # A seed stable across processes (the built-in hash() of strings is salted per process).
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{variant}-{mode}".encode()))
    logits, target = sample(mode, soft=mode != "multiclass", ignore=ignore, gen=gen)
    loss = make(name, LOSS_KWARGS[name][variant], mode, backend, from_logits=from_logits,
                ignore_index=255 if ignore else None)
    if from_logits:
        x = logits
    else:  # probabilities kept away from 0 and 1: finite differences stay inside [0, 1], and
        # the curvature of -log(p) stays small against the step eps (at p = 1e-5 it is not)
        x = (logits.softmax(1) * 0.9 + 0.1 / logits.shape[1] if mode == "multiclass"
             else logits.sigmoid() * 0.9 + 0.05)
    x = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda inp: loss(inp, target), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(LOSS_KWARGS))
@pytest.mark.parametrize("mode", MODES)
@given(data=st.data(), ignore=st.booleans(), from_logits=st.booleans(), variant=st.integers(0, 2))
def test_fused_matches_reference(name, mode, data, ignore, from_logits, variant):
    variants = LOSS_KWARGS[name]
    kwargs = variants[variant % len(variants)]
    logits, target = data.draw(cases(mode, soft=mode != "multiclass", scale=(0.1, 8.0),
                                     dtype=torch.float64))
    if ignore:
        target = target.clone()
        target.view(-1)[::3] = 255
    if not from_logits:
        logits = logits.softmax(1) if mode == "multiclass" else logits.sigmoid()
    results = []
    for backend in BACKENDS:
        x = logits.clone().requires_grad_()
        loss = make(name, kwargs, mode, backend, classes=logits.shape[1],
                    from_logits=from_logits, ignore_index=255 if ignore else None)(x, target)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (fused, fused_grad), (reference, reference_grad) = results
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSS_KWARGS))
def test_float32_fused_matches_float64_reference(name):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 1, 32, 32, generator=gen) * 4
    target = (torch.rand(4, 1, 32, 32, generator=gen) > 0.8).float()
    x32 = logits.clone().requires_grad_()
    x64 = logits.double().requires_grad_()
    make(name, LOSS_KWARGS[name][0], "binary", "torch")(x32, target).backward()
    make(name, LOSS_KWARGS[name][0], "binary", "reference")(x64, target.double()).backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


def test_fused_path_saves_one_input_sized_tensor_besides_input_and_target():
    """What a loss keeps alive for backward, counted with saved-tensor hooks: the caller's
    input and target (kept so that a ``create_graph=True`` backward can recompute through the
    reference maths; they are the caller's tensors, no copy), plus at most one float32
    tensor of the input's size and one byte per element."""
    x = torch.randn(4, 1, 64, 64, requires_grad=True)
    target = (torch.rand(4, 1, 64, 64) > 0.5).float()
    callers = {x.untyped_storage().data_ptr(), target.untyped_storage().data_ptr()}
    for name in ("bce", "focal", "topk", "dice", "iou", "tversky"):  # (a loss added later
        cls = dynloss.LOSSES[name]  # runs on the reference: docs/adding-a-loss.md)
        saved = []

        def pack(t, saved=saved):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = cls()(x, target)
        big = [t for t in saved if t.numel() >= x.numel()
               and t.untyped_storage().data_ptr() not in callers]
        bytes_kept = sum(t.numel() * t.element_size() for t in big)
        assert bytes_kept <= x.numel() * x.element_size() + x.numel(), name
        loss.backward()



# (float64 on the native and Triton backends falls back to torch, with a warning; the Triton
# interpreter's numpy warns of exp(800) overflowing, as intended)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_focal_gradient_is_finite_where_the_loss_is_exactly_zero(gamma, mode, from_logits,
                                                                 dtype):
    """Where a pixel is classified with certainty (its cross-entropy ``b`` is exactly 0: a
    probability of exactly 1, or logits so far apart that the other classes' exponentials
    underflow), ``(1 - e^{-b})^gamma b`` has slope 0 for every ``gamma > 0``. Autograd through
    ``q^gamma`` forms ``gamma q^(gamma - 1) = inf`` there for ``gamma < 1`` and the
    reference's gradient was NaN (and with it every backend's under ``create_graph=True``,
    which differentiates the reference maths); each backend must give the fused slope, 0."""
    if mode == "multiclass":
        x = torch.tensor([[[800.0, 0.0], [0.0, 1.0], [0.0, 2.0]]], dtype=dtype)
        target = torch.tensor([[0, 1]])
        if not from_logits:
            x = x.softmax(1)
    else:
        x = torch.tensor([[[800.0, -800.0, 0.5]]], dtype=dtype)
        target = torch.tensor([[[1.0, 0.0, 1.0]]], dtype=dtype)
        if not from_logits:
            x = x.sigmoid()
    grads = {}
    for backend in ("auto", *EVERY_BACKEND):
        for create_graph in (False, True):
            xs = x.clone().requires_grad_()
            loss = dynloss.FocalLoss(mode=mode, gamma=gamma, from_logits=from_logits,
                                     backend=backend)(xs, target)
            (grad,) = torch.autograd.grad(loss, xs, create_graph=create_graph)
            grads[backend, create_graph] = grad.detach()
    want = grads["torch", False]
    certain = (x == x.amax(1, keepdim=True)) if mode == "multiclass" else None
    assert want.isfinite().all()
    if certain is not None:  # the certain pixel: no slope at all
        assert (want[..., 0] == 0).all()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-30, msg=str(key))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("gamma", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_focal_gradient_is_finite_where_the_loss_is_subnormal(gamma, mode, dtype):
    """A confident, right pixel whose cross-entropy ``b`` is tiny but not 0 (float32: a
    subnormal, logits about 100 apart; float64: about 740): autograd's ``gamma q^(gamma - 1)``
    overflowed there for small ``gamma`` and the reference's gradient was NaN -- also every
    backend's with ``create_graph=True`` or ``reduction="none"``, and the gradient of a soft
    target. The slope in ``b`` is ``q^gamma (1 + gamma e^{-b} b / q)``, finite: every backend
    and path agrees with the fused one."""
    far = 740.0 if dtype == torch.float64 else 100.0
    if mode == "multiclass":
        x = torch.tensor([[[far, 0.0], [0.0, 1.0], [0.0, 2.0]]], dtype=dtype)
        target = torch.tensor([[0, 1]])
    else:
        x = torch.tensor([[[far, -far, 0.5]]], dtype=dtype)
        target = torch.tensor([[[1.0, 0.0, 1.0]]], dtype=dtype)
    grads = {}
    for backend in ("auto", *EVERY_BACKEND):
        for create_graph, reduction in ((False, "mean"), (True, "mean"), (False, "none")):
            xs = x.clone().requires_grad_()
            loss = dynloss.FocalLoss(mode=mode, gamma=gamma, backend=backend,
                                     reduction=reduction)(xs, target)
            scale = 1.0 / target.numel() if reduction == "none" else 1.0
            (grad,) = torch.autograd.grad(loss.sum() * scale, xs, create_graph=create_graph)
            grads[backend, create_graph, reduction] = grad.detach()
    want = grads["torch", False, "mean"]
    assert want.isfinite().all()
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # (bfloat16: an ulp of the gradient)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, want, rtol=rtol, atol=1e-30, msg=str(key))
    if mode == "binary":  # a soft target's gradient (the reference's autograd) is finite too
        soft = torch.tensor([[[0.9, 0.1, 0.7]]], dtype=dtype, requires_grad=True)
        xs = x.clone().requires_grad_()
        loss = dynloss.FocalLoss(gamma=gamma)(xs, soft)
        grad_x, grad_t = torch.autograd.grad(loss, (xs, soft))
        assert grad_x.isfinite().all() and grad_t.isfinite().all()


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_focal_modulation_slope_below_the_smallest_normal(gamma):
    """``_math.focal_modulation``'s autograd slope equals the closed form of
    ``focal_modulation_and_slope`` for subnormal and tiny ``b`` (float32 and float64)."""
    from dynloss import _math

    for dtype in (torch.float32, torch.float64):
        tiny = torch.finfo(dtype).tiny
        b = torch.tensor([tiny / 64, tiny, tiny * 1e10, 1e-5, 0.5, 3.0], dtype=dtype)
        value, slope = _math.focal_modulation_and_slope(b.clone(), gamma)
        bs = b.clone().requires_grad_()
        got = _math.focal_modulation(bs, gamma)
        (grad,) = torch.autograd.grad(got.sum(), bs)
        # a subnormal result holds fewer digits (an absolute tolerance of the smallest
        # normal); autograd's slope of b^(1 + gamma) is b^((1 + gamma) - 1), an exponent
        # rounded in float64, which moves b^gamma by up to |log b| ulps (1e-13 at 1e-310)
        rtol = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(got, value, rtol=rtol, atol=tiny)
        torch.testing.assert_close(grad, slope, rtol=rtol, atol=tiny)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("eps", [1e-20, 1e-30, 1e-37])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_region_gradient_is_finite_for_the_smallest_allowed_smoothing(mode, eps):
    """``smooth + eps`` may be as small as float32's smallest normal number; where a class is
    absent and predicted absent, the score's denominator is about that small, and its square
    underflowed to 0 in the Triton kernels (an infinite ``1 / D^2`` and NaN gradients) where
    ``(N / D) / D`` stays finite. Every backend agrees with the reference."""
    if mode == "multiclass":
        x = torch.tensor([[[0.0] * 4, [-50.0] * 4, [-1e4] * 4]])
        target = torch.zeros(1, 4, dtype=torch.long)
    else:
        x = torch.tensor([[[-1e4, -1e4, -60.0, -50.0]]])
        target = torch.zeros(1, 1, 4)
    grads = {}
    for backend in ("auto", *EVERY_BACKEND):
        for per_image in (False, True):
            xs = x.clone().requires_grad_()
            loss = dynloss.DiceLoss(mode=mode, eps=eps, per_image=per_image,
                                    backend=backend)(xs, target)
            (grad,) = torch.autograd.grad(loss, xs)
            grads[backend, per_image] = (loss.detach(), grad)
    want_loss, want = grads["reference", False]
    assert want.isfinite().all()
    for key, (loss, grad) in grads.items():
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7, msg=str(key))
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-30, msg=str(key))
