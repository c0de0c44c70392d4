"""The native CPU kernels (``backend="native"``) against the reference: values, gradients,
value checks, determinism, memory, and the fallback when they cannot be built.

CI sets ``DYNLOSS_REQUIRE_NATIVE=1`` so that a broken build fails the suite instead of
skipping these tests.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dynloss
import dynloss.functional as F
from dynloss import _math
from dynloss._layout import prepare
from dynloss._params import distribution_params
from dynloss.kernels import native_available, native_status, region_pixel_loss, resolve_backend
from dynloss.kernels.capabilities import Need
from dynloss.kernels.dispatch import select
from dynloss.kernels.native import NATIVE as NATIVE_BACKEND
from dynloss.kernels.reference import REFERENCE, distribution_terms, topk_selected

from ._kernel_cases import kernel_inputs, run_loss
from .strategies import cases

NATIVE = native_available()
pytestmark = pytest.mark.skipif(not NATIVE, reason=f"native kernels unavailable: "
                                f"{native_status() if not NATIVE else ''}")

REGION = {"dice": F.dice_loss, "iou": F.iou_loss, "tversky": F.tversky_loss}
PIXEL = {"bce": F.bce_loss, "focal": F.focal_loss}
MODES = ["binary", "multilabel", "multiclass"]
SRC = str(Path(dynloss.__file__).resolve().parents[1])


_inputs = kernel_inputs
_run = run_loss


def _compare(fn, x, t, *, rtol: float = 2e-5, **kw):
    """The native path on float32 input equals the reference (values and gradients), which
    runs in float64: float32 autograd would itself be off where the sigmoid saturates (its
    backward forms 1 - p, which loses digits as p nears 1; the kernels do not)."""
    want, want_grad = (r.float() for r in _run(fn, x.double(), t, "reference", **kw))
    got, got_grad = _run(fn, x, t, "native", ran=True, **kw)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.float32
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6)
    scale = want_grad.abs().max().item() + 1e-12
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-4 * scale)
    return got, got_grad


def test_ci_requires_native():
    """The kernels are built here (this module is skipped otherwise) and they compute the
    loss: one node of theirs, the closed-form value. In CI (``DYNLOSS_REQUIRE_NATIVE=1``) a
    broken build is a failure, not a skip: ``tests/test_native_build.py`` asserts that
    without being skipped with this module."""
    assert native_status() == "" and native_available()
    assert resolve_backend(torch.zeros(1, 1, 2), "auto") == "native"
    logits = torch.tensor([[[2.0, -1.0, 0.5, 0.0]]], requires_grad=True)
    target = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    loss = F.dice_loss(logits, target, backend="native")
    assert type(loss.grad_fn).__name__ == "NativeRegionLossBackward"
    p = torch.sigmoid(logits.detach().double())
    dice = (2 * (p * target).sum() + 2e-7) / (p.sum() + target.sum() + 2e-7)
    torch.testing.assert_close(loss.double(), 1 - dice, rtol=1e-6, atol=0)
    loss.backward()
    want = torch.autograd.functional.jacobian(
        lambda x: F.dice_loss(x, target.double(), backend="reference"), logits.detach().double())
    torch.testing.assert_close(logits.grad.double(), want, rtol=1e-5, atol=1e-7)


def test_auto_picks_native_for_float32_float64_and_16_bit_cpu_inputs():
    x = torch.zeros(2, 1, 4, 4)
    assert resolve_backend(x, "auto") == "native"
    assert resolve_backend(x, "native") == "native"
    assert resolve_backend(x.double(), "auto") == "native"  # computed in double
    assert select("auto", x.double(), Need("distribution", topk=True)).name == "native"
    assert resolve_backend(x.half(), "auto") == "native"  # read as a float32 copy
    assert resolve_backend(x.bfloat16(), "native") == "native"
    assert resolve_backend(x, "torch") == "torch"


# ------------------------------------------------------------------------------ region losses
@pytest.mark.parametrize("name", sorted(REGION))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)], ids=["2d", "3d"])
def test_region_losses(name, mode, spatial):
    x, t = _inputs(mode, spatial, seed=len(name) + len(mode))
    _compare(REGION[name], x, t, mode=mode)


@pytest.mark.parametrize("name", sorted(REGION))
@pytest.mark.parametrize("mode", MODES)
def test_region_per_image_smooth_probabilities(name, mode):
    x, t = _inputs(mode, (4, 6), seed=3)
    _compare(REGION[name], x, t, mode=mode, per_image=True, smooth=0.5)
    p = torch.softmax(x, 1) if mode == "multiclass" else torch.sigmoid(x)
    _compare(REGION[name], p, t, mode=mode, from_logits=False)
    _compare(REGION[name], p, t, mode=mode, from_logits=False, per_image=True,
             reduction="none")


def _graph_nodes(loss: torch.Tensor) -> list[str]:
    """The names of the autograd nodes from ``loss`` back to the leaves, depth first."""
    names, stack = [], [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.append(type(node).__name__)
            stack.extend(next_node for next_node, _ in reversed(node.next_functions))
    return names


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_image", [False, True], ids=["pooled", "per-image"])
@pytest.mark.parametrize("mode", MODES)
def test_region_loss_is_one_node_with_the_reference_gradient(mode, per_image, reduction):
    """The native region losses are one autograd node (kernels/native/autograd.py) whose
    closed-form backward matches autograd through the reference, for any upstream gradient."""
    x, t = _inputs(mode, (5, 6), seed=31)
    for fn, kw in ((F.tversky_loss, {"alpha": 0.2, "beta": 0.9, "smooth": 0.3}),
                   (F.iou_loss, {}), (F.dice_loss, {"smooth": 1.0})):
        kw = dict(kw, mode=mode, per_image=per_image, reduction=reduction)
        xs = [x.detach().clone().requires_grad_(True) for _ in range(2)]
        want = fn(xs[0], t, backend="reference", **kw)
        got = fn(xs[1], t, backend="native", **kw)
        # one node, straight to the input: the kernels read the caller's tensor (no view)
        assert _graph_nodes(got) == ["NativeRegionLossBackward", "AccumulateGrad"]
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
        upstream = torch.rand(want.shape, generator=torch.Generator().manual_seed(4)) + 0.5
        want.backward(upstream)
        got.backward(upstream)
        scale = xs[0].grad.abs().max().item()
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("mode", MODES)
def test_one_node_path_equals_the_generic_native_path(mode):
    """``ddp_pool=True`` outside a process group takes the generic path (region sums node,
    then torch operations): the same value, bitwise, and the same gradient."""
    x, t = _inputs(mode, (7, 5), seed=8)
    results = []
    for ddp_pool in (False, True):
        xi = x.detach().clone().requires_grad_(True)
        loss = F.tversky_loss(xi, t, mode=mode, alpha=0.4, beta=0.8, backend="native",
                              ddp_pool=ddp_pool)
        loss.backward()
        results.append((loss.detach(), xi.grad))
    (fused, fused_grad), (generic, generic_grad) = results
    assert torch.equal(fused, generic)
    torch.testing.assert_close(fused_grad, generic_grad, rtol=1e-5, atol=1e-9)


def test_argument_templates_do_not_leak_between_configurations():
    """The kernels' argument struct is filled once per configuration (ffi._arguments) and the
    backward call copies the forward's: configurations called in turn (target dtype, logits
    or probabilities, ignore_index, region or pixel terms, focal gamma and alpha) each give
    the reference's value and gradient, also on their second call."""
    x, t = _inputs("binary", (6, 5), seed=12)
    t_byte = t.to(torch.uint8)
    t_ignored = t_byte.clone()
    t_ignored[:, :, 0] = 7
    probabilities = torch.sigmoid(x).clamp(0.01, 0.99)
    calls = [
        (F.dice_loss, x, t, {}),
        (F.dice_loss, x, t_byte, {}),
        (F.iou_loss, x, t_ignored, {"ignore_index": 7}),
        (F.tversky_loss, probabilities, t, {"from_logits": False, "alpha": 0.3, "beta": 0.7}),
        (F.focal_loss, x, t, {"gamma": 2.0, "alpha": 0.25}),
        (F.focal_loss, x, t_ignored, {"gamma": 1.5, "ignore_index": 7}),
        (F.bce_loss, probabilities, t, {"from_logits": False}),
    ]
    for _ in range(2):
        for fn, xi, ti, kw in calls:
            _compare(fn, xi, ti, mode="binary", **kw)


@given(st.floats(0.0, 1.0), st.floats(0.0, 1e6), st.floats(0.0, 1e6), st.floats(0.0, 2.0),
       st.floats(0.0, 2.0), st.floats(1e-7, 10.0))
def test_tversky_loss_terms_are_the_index_and_its_autograd_gradient(overlap, p, g, alpha, beta,
                                                                    smoothing):
    """The native backend's one-pass score and gradient (host floats): ``1 - T`` exactly as
    ``tversky_index`` forms it, and ``dT/dI, dT/dP`` equal to autograd through
    ``tversky_index`` in float64. The sums are ones a batch can have: ``I = sum p g`` is at
    most ``P = sum p`` and ``G = sum g`` (so the denominator ``I + a (P - I) + b (G - I) + s``
    is a sum of non-negative terms; sums with ``I > P`` made it cancel to nothing)."""
    i = overlap * min(p, g)
    loss, grad_i, grad_p = _math.tversky_loss_terms(i, p, g, alpha, beta, smoothing)
    assert loss == 1.0 - _math.tversky_index(i, p, g, alpha, beta, smoothing)
    sums = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (i, p)]
    score = _math.tversky_index(*sums, torch.tensor(g, dtype=torch.float64), alpha, beta,
                                smoothing)
    want_i, want_p = torch.autograd.grad(score, sums)
    # both forms subtract terms of this size (dT/dI cancels when alpha + beta is near 0):
    # their rounding is relative to it, not to the difference
    numerator = i + smoothing
    denominator = i + alpha * (p - i) + beta * (g - i) + smoothing
    size = (abs(denominator) + abs(1.0 - alpha - beta) * numerator) / denominator**2
    assert grad_i == pytest.approx(want_i.item(), rel=1e-12, abs=1e-12 * size)
    assert grad_p == pytest.approx(want_p.item(), rel=1e-12, abs=1e-12 * size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(REGION))
def test_region_ignore_index(name, mode):
    x, t = _inputs(mode, (6, 5), seed=5)
    t = t.long()
    t[0, ..., :2] = 255
    if mode != "multiclass":
        t = t.to(torch.uint8)
    _compare(REGION[name], x, t, mode=mode, ignore_index=255)


def test_soft_labels():
    x, _ = _inputs("multilabel", (7, 6), seed=9)
    t = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    for fn in (*REGION.values(), *PIXEL.values()):
        _compare(fn, x, t, mode="multilabel")
    _compare(F.focal_loss, x, t, mode="multilabel", gamma=0.7, alpha=0.3)


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("one_soft", [False, True], ids=["hard", "one-soft-label"])
def test_binary_backward_with_and_without_reading_the_target(one_soft, from_logits):
    """Binary region backward reads only the saved signed slopes when every kept target is 0
    or 1, and the target too when the forward counted a soft label: both equal the reference,
    with ignored pixels (float target 255) getting no gradient."""
    x, t = _inputs("multilabel", (9, 8), seed=21)
    t = t.float()
    t[0, 0, :3] = 255.0
    if one_soft:
        t[1, 1, 4, 4] = 0.25
    x = x if from_logits else torch.sigmoid(x)
    for fn, kw in ((F.dice_loss, {}), (F.tversky_loss, {"alpha": 0.2, "beta": 0.9})):
        _, grad = _compare(fn, x, t, mode="multilabel", ignore_index=255,
                           from_logits=from_logits, **kw)
        assert (grad[0, 0, :3] == 0).all()
    kw = dict(region="dice", pixel="bce", mode="multilabel", ignore_index=255,
              from_logits=from_logits)
    want, want_grad = _run(region_pixel_loss, x, t, "reference", **kw)
    got, got_grad = _run(region_pixel_loss, x, t, "native", **kw)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-4 * scale)
    assert (got_grad[0, 0, :3] == 0).all()


def test_saturated_sigmoid_slope_keeps_its_digits():
    """dp/dx = p (1 - p) is formed as e / (1 + e)^2 with e = exp(-|x|): at x = 15 it is
    3.06e-7 to float precision, where float32 autograd's p * (1 - p) is 17 % off (the
    reference's own sigmoid backward keeps the digits too)."""
    x = torch.tensor([[[[15.0, -15.0, 0.5]]]])
    t = torch.tensor([[[[1.0, 0.0, 0.0]]]])
    want, want_grad = _run(F.dice_loss, x.double(), t, "reference")
    got, got_grad = _run(F.dice_loss, x, t, "native")
    torch.testing.assert_close(got, want.float())
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=0)
    _, float32_grad = _run(F.dice_loss, x, t, "reference")
    torch.testing.assert_close(float32_grad.double(), want_grad, rtol=1e-5, atol=0)
    xs = torch.tensor(15.0, requires_grad=True)
    (plain,) = torch.autograd.grad(torch.sigmoid(xs), xs)  # autograd's p * (1 - p)
    exact = math.exp(-15.0) / (1 + math.exp(-15.0)) ** 2
    assert abs(plain.item() / exact - 1) > 0.1


# ------------------------------------------------------------------------------- pixel losses
@pytest.mark.parametrize("name", sorted(PIXEL))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)], ids=["2d", "3d"])
def test_pixel_losses(name, mode, spatial):
    x, t = _inputs(mode, spatial, seed=len(name) * 7 + len(mode))
    _compare(PIXEL[name], x, t, mode=mode)
    _compare(PIXEL[name], x, t, mode=mode, reduction="sum", rtol=5e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.5])
def test_focal_gamma_alpha_ignore_probabilities(mode, gamma):
    x, t = _inputs(mode, (6, 7), seed=int(gamma * 10))
    alpha = (0.5, 2.0, 1.0) if mode == "multiclass" else 0.25
    _compare(F.focal_loss, x, t, mode=mode, gamma=gamma, alpha=alpha)
    p = torch.softmax(x, 1) if mode == "multiclass" else torch.sigmoid(x)
    _compare(F.focal_loss, p, t, mode=mode, gamma=gamma, alpha=alpha, from_logits=False)
    t = t.long()
    t[..., 0] = -1
    _compare(F.focal_loss, x, t, mode=mode, gamma=gamma, ignore_index=-1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pixel", ["bce", "focal"])
@pytest.mark.parametrize("region", ["dice", "tversky"])
def test_fused_composite(mode, pixel, region):
    x, t = _inputs(mode, (5, 9), seed=11)
    kw = dict(region=region, pixel=pixel, region_weight=0.7, pixel_weight=1.3, mode=mode)
    want, want_grad = _run(region_pixel_loss, x, t, "reference", **kw)
    got, got_grad = _run(region_pixel_loss, x, t, "native", **kw)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-4 * scale)


# --------------------------------------------------------------------- inputs and robustness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bool,
                                   torch.uint8, torch.int32, torch.int64])
def test_binary_target_dtypes(dtype):
    x, t = _inputs("binary", (6, 6), seed=2)
    for fn in (F.dice_loss, F.focal_loss):
        got = _compare(fn, x, t.to(dtype))[0]
        torch.testing.assert_close(got, fn(x, t, backend="native"))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_multiclass_target_dtypes(dtype):
    x, t = _inputs("multiclass", (6, 6), seed=4)
    for fn in (F.iou_loss, F.bce_loss):
        _compare(fn, x, t.to(dtype), mode="multiclass")


def test_extreme_logits_match_reference():
    """Logits up to +-1e4: finite, and equal to the reference (BCE keeps tiny losses)."""
    x = torch.tensor([-1e4, -100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0, 1e4] * 4)
    x = x.view(4, 1, 9)
    t = torch.tensor([0.0, 1.0, 0.0, 1.0] * 9).view(4, 1, 9)
    for fn in (*REGION.values(), *PIXEL.values()):
        _compare(fn, x, t)
    for mode, c in (("multiclass", 3), ("multilabel", 3)):
        xm = x.view(4, 1, 9).repeat(1, c, 1) * torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1)
        tm = (torch.arange(36).view(4, 9) % c if mode == "multiclass"
              else (torch.arange(108).view(4, 3, 9) % 2).float())
        for fn in (*REGION.values(), *PIXEL.values()):
            _compare(fn, xm, tm, mode=mode)


def test_tiny_losses_keep_their_digits():
    x = torch.full((1, 1, 4), -90.0)
    got = F.bce_loss(x, torch.zeros_like(x), backend="native")
    assert got.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(-90.0)).item(),
                                       rel=1e-5)


def test_several_chunks_and_non_contiguous_input():
    """Rows longer than one work chunk (16384 binary, 1024 multiclass), channels-last input."""
    x, t = _inputs("multiclass", (130, 140), n=2, c=4, seed=6)
    x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # a non-contiguous view
    for fn in (F.dice_loss, F.focal_loss):
        _compare(fn, x, t, mode="multiclass")
    xb, tb = _inputs("binary", (150, 150), n=3, seed=7)
    for fn in (F.tversky_loss, F.bce_loss):
        _compare(fn, xb, tb, rtol=5e-5)


def test_empty_input():
    x, t = torch.zeros(2, 1, 0, 3), torch.zeros(2, 1, 0, 3)
    native = _run(F.dice_loss, x, t, "native")
    torch.testing.assert_close(native[0], _run(F.dice_loss, x, t, "torch")[0])
    assert native[0].item() == 0.0 and native[1].shape == x.shape


def test_bitwise_identical_for_any_thread_count():
    x, t = _inputs("binary", (128, 200), n=4, seed=8)
    xm, tm = _inputs("multiclass", (64, 70), n=3, c=5, seed=8)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append([_run(region_pixel_loss, x, t, "native", pixel="focal"),
                            _run(F.iou_loss, xm, tm, "native", mode="multiclass")])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for (value, grad), (value0, grad0) in zip(other, results[0], strict=True):
            assert torch.equal(value, value0) and torch.equal(grad, grad0)


@given(cases("binary", soft=True))
def test_property_binary_soft_targets(case):
    x, t = case
    _compare(F.tversky_loss, x, t, alpha=0.2, beta=0.9, smooth=0.3, rtol=5e-5)
    _compare(F.focal_loss, x, t, rtol=5e-5)


@given(cases("multiclass", max_classes=5))
def test_property_multiclass(case):
    x, t = case
    _compare(F.dice_loss, x, t, mode="multiclass", rtol=5e-5)
    _compare(F.bce_loss, x, t, mode="multiclass", rtol=5e-5)


# ------------------------------------------------------------------------------------- TopK
TOPK_K = [1e-4, 0.1, 0.6, 1.0]  # 1e-4: a single element (n = 1)


def _topk_reference_mask(x, t, mode, k, ignore_index=None, from_logits=True):
    """The reference's TopK selection, ``(N, C, M)`` binary/multilabel or ``(N, M)``."""
    layout = prepare(x, t, mode)
    params = distribution_params(k=k, mode=mode, ignore_index=ignore_index,
                                 from_logits=from_logits)
    loss, valid = distribution_terms(layout, params)
    return topk_selected(loss.detach(), valid, k)[1]


def _selected_by_gradient(grad, mode):
    """Which elements (binary/multilabel) or pixels (multiclass) have a nonzero gradient."""
    n, c = grad.shape[:2]
    grad = grad.reshape(n, c, -1)
    return (grad != 0).any(1) if mode == "multiclass" else grad != 0


def test_topk_runs_on_native_for_float32_and_float64_cpu():
    """TopK on float32 and float64 CPU tensors: "auto" picks the native kernels, one autograd
    node."""
    x, t = _inputs("binary", (4, 4), seed=1)
    need = Need("distribution", "binary", topk=True)
    assert select("auto", x, need).name == "native"
    assert select("native", x, need).name == "native"
    assert select("auto", x.double(), need).name == "native"
    for xs in (x, x.double()):
        loss = F.topk_loss(xs.clone().requires_grad_(True), t, k=0.3)
        assert _graph_nodes(loss) == ["NativeDistributionLossBackward", "AccumulateGrad"]


@pytest.mark.parametrize("k", TOPK_K)
@pytest.mark.parametrize("mode", MODES)
def test_topk_losses(mode, k):
    x, t = _inputs(mode, (6, 7), seed=int(k * 1000) + len(mode))
    _got, grad = _compare(F.topk_loss, x, t, mode=mode, k=k)
    _compare(F.topk_loss, x, t, mode=mode, k=k, reduction="sum", rtol=5e-5)
    # the gradient is nonzero exactly on the reference's selection (random logits: no ties)
    want = _topk_reference_mask(x, t, mode, k)
    assert torch.equal(_selected_by_gradient(grad, mode), want)
    assert want.sum().item() == _math.topk_count(k, want.numel())


@pytest.mark.parametrize("k", TOPK_K)
@pytest.mark.parametrize("mode", MODES)
def test_topk_probabilities_and_soft_labels(mode, k):
    x, t = _inputs(mode, (5, 6), seed=17)
    p = torch.softmax(x, 1) if mode == "multiclass" else torch.sigmoid(x)
    _compare(F.topk_loss, p, t, mode=mode, k=k, from_logits=False)
    if mode != "multiclass":
        soft = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
        _compare(F.topk_loss, x, soft, mode=mode, k=k)
        _compare(F.topk_loss, p, soft, mode=mode, k=k, from_logits=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [0.05, 0.3, 0.6, 1.0])
def test_topk_ignore_index(mode, k):
    """Ignored elements are never selected and count neither in n nor in the mean."""
    x, t = _inputs(mode, (6, 5), seed=23)
    t = t.long()
    t[0, ..., :3] = 255
    t[1, ..., 4] = 255
    if mode != "multiclass":
        t = t.to(torch.uint8)
    _, grad = _compare(F.topk_loss, x, t, mode=mode, k=k, ignore_index=255)
    want = _topk_reference_mask(x, t, mode, k, ignore_index=255)
    assert torch.equal(_selected_by_gradient(grad, mode), want)
    kept = (t != 255).sum().item()
    assert want.sum().item() == _math.topk_count(k, kept)


@pytest.mark.parametrize("mode", MODES)
def test_topk_all_ignored_is_zero(mode):
    x, t = _inputs(mode, (4, 5), seed=2)
    t = torch.full_like(t, 7, dtype=torch.long)
    for reduction in ("mean", "sum"):
        got, grad = _run(F.topk_loss, x, t, "native", mode=mode, k=0.5, ignore_index=7,
                         reduction=reduction)
        want, _ = _run(F.topk_loss, x, t, "reference", mode=mode, k=0.5, ignore_index=7,
                       reduction=reduction)
        assert got.item() == 0.0 == want.item()
        assert not grad.any()


def test_topk_empty_input():
    x, t = torch.zeros(2, 1, 0, 3), torch.zeros(2, 1, 0, 3)
    got, grad = _run(F.topk_loss, x, t, "native", k=0.5)
    assert got.item() == 0.0 and grad.shape == x.shape


def _tied_inputs(mode, shape, seed):
    """Inputs whose losses take a few well-separated values, each shared by many elements
    (the order of the losses is then the same in every implementation: only the tie rule
    decides the selection). No logit is 0, where subgradients differ."""
    gen = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    x = torch.randint(-2, 3, shape, generator=gen).float() * 1.5 + 0.5
    if mode == "multiclass":
        t = torch.randint(0, c, (n, *spatial), generator=gen)
    else:
        t = (torch.rand(shape, generator=gen) > 0.5).float()
    return x, t


def _tie_straddling_ks(x, t, mode, ignore_index=None):
    """Fractions k whose n falls inside a group of tied losses: at the group's first, middle
    and last element (so ties are taken in part, across work chunks)."""
    layout = prepare(x, t, mode)
    params = distribution_params(mode=mode, ignore_index=ignore_index)
    loss, valid = distribution_terms(layout, params)
    flat = loss.detach().reshape(-1)
    kept = flat.numel() if valid is None else int(valid.sum())
    if valid is not None:
        flat = flat[valid.reshape(-1)]
    values, counts = torch.unique(flat, return_counts=True)
    order = values.argsort(descending=True)
    above = 0
    ks = []
    for index in order.tolist():
        count = int(counts[index])
        if count > 100 and above > 0:
            for n in (above + 1, above + count // 2 + 7, above + count - 1):
                k = n / kept
                assert _math.topk_count(k, kept) == n
                ks.append(k)
            if len(ks) >= 6:
                break
        above += count
    assert ks
    return ks


@pytest.mark.parametrize("mode", MODES)
def test_topk_ties_straddling_the_threshold_across_chunks(mode):
    """Many equal losses at the threshold: those of lowest flat index are taken (flat index
    of the (N, C, M) element; of the (N, M) pixel in multiclass mode), also when the tied
    elements spread over several work chunks (16384 elements) and threads."""
    shape = (4, 1, 150, 150) if mode == "binary" else (4, 3, 130, 140)
    x, t = _tied_inputs(mode, shape, seed=41)
    for k in _tie_straddling_ks(x, t, mode):
        got, grad = _run(F.topk_loss, x, t, "native", mode=mode, k=k)
        want_value, want_grad = _run(F.topk_loss, x, t, "reference", mode=mode, k=k)
        want = _topk_reference_mask(x, t, mode, k)
        assert torch.equal(_selected_by_gradient(grad, mode), want)
        torch.testing.assert_close(got, want_value, rtol=1e-5, atol=0)
        scale = want_grad.abs().max().item()
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_topk_ties_with_ignore_index(mode):
    shape = (3, 1, 160, 150) if mode == "binary" else (3, 3, 160, 150)
    x, t = _tied_inputs(mode, shape, seed=43)
    t = t.long()
    t[1, ..., 20:90, :] = -1
    for k in _tie_straddling_ks(x, t, mode, ignore_index=-1)[:3]:
        _, grad = _run(F.topk_loss, x, t, "native", mode=mode, k=k, ignore_index=-1)
        want = _topk_reference_mask(x, t, mode, k, ignore_index=-1)
        assert torch.equal(_selected_by_gradient(grad, mode), want)


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_topk_zero_losses_rank_above_ignored_elements(mode):
    """Probabilities equal to their targets give losses of exactly 0 (-0.0 in some formulas,
    e.g. multiclass -log(1)): they are kept losses, tied with each other and ranked above
    the ignored elements that precede them in flat order. Their slope is not 0, so the
    gradient shows the selection."""
    gen = torch.Generator().manual_seed(31)
    if mode == "binary":
        t = (torch.rand(2, 1, 8, 9, generator=gen) > 0.5).long()
        p = torch.rand(2, 1, 8, 9, generator=gen) * 0.8 + 0.1
        exact = torch.rand(2, 1, 8, 9, generator=gen) > 0.4
        p = torch.where(exact, t.float(), p)  # loss exactly 0 where p == t
        exact, ignored = exact[:, 0], t[:, 0]
    else:
        t = torch.randint(0, 3, (2, 8, 9), generator=gen)
        p = torch.softmax(torch.randn(2, 3, 8, 9, generator=gen), 1)
        exact = torch.rand(2, 8, 9, generator=gen) > 0.4
        one_hot = torch.nn.functional.one_hot(t, 3).movedim(-1, 1).float()
        p = torch.where(exact.unsqueeze(1), one_hot, p)  # -log(1) where p_t == 1
        ignored = t
    ignored[0, :2] = 5  # ignored, before most of the zero losses in flat order
    kept = int((ignored != 5).sum())
    zeros = int((exact & (ignored != 5)).sum())
    kw = dict(mode=mode, from_logits=False, ignore_index=5)
    for k in (1.0, (kept - zeros // 2) / kept, (kept - zeros + 1) / kept):
        _, grad = _run(F.topk_loss, p, t, "native", k=k, **kw)
        want = _topk_reference_mask(p, t, mode, k, ignore_index=5, from_logits=False)
        assert torch.equal(_selected_by_gradient(grad, mode), want)
        _compare(F.topk_loss, p, t, k=k, **kw)


def test_topk_large_random_input_selects_exactly_n():
    """Over several chunks of random losses the selection holds exactly n elements."""
    x, t = _inputs("multilabel", (150, 160), n=2, c=2, seed=37)
    for k in (0.013, 0.6):
        _got, grad = _compare(F.topk_loss, x, t, mode="multilabel", k=k, rtol=5e-5)
        assert int((grad != 0).sum()) == _math.topk_count(k, x.numel())


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("elements", [2 ** 16 - 1, 2 ** 16], ids=["below", "at"])
def test_topk_selects_exactly_on_both_sides_of_the_small_input_digits(mode, elements):
    """Below 2^16 elements the selection counts four 8-bit digits (7 for the first) rather
    than 15, 8 and 8 bits, so as not to clear and scan 2^15 bins for a small input (0.3 ms,
    most of a (1, 1, 64, 64) call). Both find the same threshold: logits on a coarse grid make
    many ties that the first digit cannot tell apart and a split of them at the threshold."""
    gen = torch.Generator().manual_seed(41)
    pixels = elements  # (multiclass: TopK ranks the pixels)
    x = (torch.randn(1, 3 if mode == "multiclass" else 1, pixels, generator=gen) * 4).round() / 4
    t = (torch.randint(0, 3, (1, pixels), generator=gen) if mode == "multiclass"
         else (torch.rand(1, 1, pixels, generator=gen) > 0.7).float())
    for k in (0.013, 0.37, 0.6):
        _, grad = _run(F.topk_loss, x, t, "native", mode=mode, k=k)
        assert torch.equal(_selected_by_gradient(grad, mode), _topk_reference_mask(x, t, mode, k))
        _compare(F.topk_loss, x, t, mode=mode, k=k, rtol=5e-5)


def test_topk_all_losses_equal_takes_the_first_n():
    x, t = torch.full((3, 1, 160, 170), 1.5), torch.ones(3, 1, 160, 170)
    for k in (0.1, 0.37, 0.5, 0.999):
        got, grad = _run(F.topk_loss, x, t, "native", k=k)
        flat = grad.reshape(-1)
        n = _math.topk_count(k, flat.numel())
        assert bool((flat[:n] != 0).all()) and not flat[n:].any()
        torch.testing.assert_close(got, F.bce_loss(x, t), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_topk_nan_and_infinite_logits(mode):
    """A NaN or infinite kept logit makes the loss NaN, and its gradient NaN where the loss
    depends on an element (the selected ones), 0 elsewhere, as the reference's (the kernels
    made the whole gradient NaN); in an ignored element it changes nothing."""
    x, t = _inputs(mode, (6, 5), seed=5)
    for bad in (math.nan, math.inf, -math.inf):
        xb = x.clone()
        xb[1, 0, 2, 3] = bad
        for k in (1e-4, 0.6):
            got, grad = _run(F.topk_loss, xb, t, "native", mode=mode, k=k)
            want, want_grad = _run(F.topk_loss, xb, t, "reference", mode=mode, k=k)
            assert got.isnan() and want.isnan()
            assert torch.equal(grad.isnan(), want_grad.isnan()) and grad.isnan().any()
    t = t.long()
    t[1, ..., 2, 3] = 9
    xb = x.clone()
    xb[1, :, 2, 3] = math.nan
    got, grad = _run(F.topk_loss, xb, t, "native", mode=mode, k=0.3, ignore_index=9)
    want, want_grad = _run(F.topk_loss, xb.double(), t, "reference", mode=mode, k=0.3,
                           ignore_index=9)
    torch.testing.assert_close(got, want.float(), rtol=2e-5, atol=0)
    assert torch.isfinite(grad).all() and not grad[1, :, 2, 3].any()
    # (the reference's autograd leaves 0 * NaN = NaN at the ignored element itself)
    keep = torch.ones_like(grad, dtype=torch.bool)
    keep[1, :, 2, 3] = False
    torch.testing.assert_close(grad[keep], want_grad.float()[keep], rtol=1e-4, atol=1e-7)


def test_topk_infinite_and_nan_losses_rank_first():
    """Finite logits can still give an infinite loss (logsumexp - x_t overflows float32), and
    a class weight of 0 turns it into NaN: both rank above every finite loss, so a TopK of one
    element is inf, or NaN."""
    x, t = _inputs("multiclass", (4, 5), seed=7)
    x[1, :, 2, 2] = torch.tensor([3e38, -3e38, 0.0])
    t[1, 2, 2] = 1
    for k in (1e-4, 0.3):
        got = F.topk_loss(x, t, mode="multiclass", k=k, backend="native")
        assert got.item() == math.inf == F.topk_loss(x, t, mode="multiclass", k=k,
                                                     backend="reference").item()
        params = distribution_params(alpha=(1.0, 0.0, 1.0), k=k, mode="multiclass")
        layout = prepare(x, t, "multiclass")
        assert NATIVE_BACKEND.distribution(layout, params, True).isnan()
        assert REFERENCE.distribution(layout, params, True).isnan()


def test_topk_invalid_target_unchecked_is_nan():
    x, t = _inputs("binary", (5, 5), seed=6)
    t[0, 0, 1, 1] = 2.0
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 1\]"):
        F.topk_loss(x, t, k=0.5, backend="native")
    assert F.topk_loss(x, t, k=0.5, backend="native", check_values=False).isnan()


@pytest.mark.parametrize("mode", MODES)
def test_topk_kernel_with_focal_gamma_and_alpha(mode):
    """The TopK kernel takes the focal modulation and alpha weights too (TopK's own
    parameters have gamma 0 and no alpha): the same value and gradient as the reference."""
    x, t = _inputs(mode, (7, 6), seed=12)
    alpha = (0.5, 2.0, 1.0) if mode == "multiclass" else 0.25
    for gamma in (0.5, 2.0):
        params = distribution_params(gamma=gamma, alpha=alpha, k=0.3, mode=mode)
        results = []
        for backend, xs in ((NATIVE_BACKEND, x), (REFERENCE, x.double())):
            xs = xs.detach().clone().requires_grad_(True)
            loss = backend.distribution(prepare(xs, t, mode), params, True)
            loss.backward()
            results.append((loss.detach().float(), xs.grad.float()))
        (got, got_grad), (want, want_grad) = results
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
        scale = want_grad.abs().max().item()
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-4 * scale)


def test_topk_bitwise_identical_for_any_thread_count():
    """Values and gradients do not depend on the number of threads, with ties taken in part
    across chunks and an input large enough to run in parallel."""
    x, t = _tied_inputs("binary", (4, 1, 150, 150), seed=47)
    xr, tr = _inputs("multilabel", (120, 100), n=3, c=2, seed=48)
    xm, tm = _tied_inputs("multiclass", (4, 3, 130, 140), seed=49)
    k_tied = _tie_straddling_ks(x, t, "binary")[1]
    k_tied_multiclass = _tie_straddling_ks(xm, tm, "multiclass")[1]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append([_run(F.topk_loss, x, t, "native", k=k_tied),
                            _run(F.topk_loss, xr, tr, "native", mode="multilabel", k=0.6),
                            _run(F.topk_loss, xm, tm, "native", mode="multiclass",
                                 k=k_tied_multiclass)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for (value, grad), (value0, grad0) in zip(other, results[0], strict=True):
            assert torch.equal(value, value0) and torch.equal(grad, grad0)


@pytest.mark.parametrize("mode", MODES)
def test_topk_second_order_gradient(mode):
    """create_graph=True recomputes through the reference: the gradient is differentiable,
    and its gradient equals the reference's."""
    x, t = _inputs(mode, (5, 6), seed=19)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for backend in ("native", "reference"):
        xs = x.detach().clone().requires_grad_(True)
        loss = F.topk_loss(xs, t, mode=mode, k=0.4, backend=backend)
        (grad,) = torch.autograd.grad(loss, xs, create_graph=True)
        assert grad.requires_grad
        (second,) = torch.autograd.grad((grad * v).sum(), xs)
        results.append((grad.detach(), second))
    (grad, second), (want_grad, want_second) = results
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(second, want_second, rtol=1e-5, atol=1e-8)
    if mode == "binary":  # TopK mean of BCE: the Hessian is diag(p (1 - p)) / n on the selection
        p = torch.sigmoid(x)
        selected = grad != 0
        n = math.ceil(0.4 * x.numel())
        assert int(selected.sum()) == n
        torch.testing.assert_close(second, torch.where(selected, v * p * (1 - p) / n, 0.0),
                                   rtol=1e-4, atol=1e-9)


def test_topk_saves_one_buffer_and_works_without_gradient():
    x, t = _inputs("binary", (16, 16), seed=1)
    assert _saved_input_sized(F.topk_loss, x, t, k=0.3) == 1  # the slopes, zeroed off the top
    xm, tm = _inputs("multiclass", (9, 8), seed=3)
    for xs, ts, mode in ((x, t, "binary"), (xm, tm, "multiclass")):
        with torch.no_grad():
            value = F.topk_loss(xs, ts, mode=mode, k=0.3, backend="native")
        torch.testing.assert_close(value, F.topk_loss(xs, ts, mode=mode, k=0.3,
                                                      backend="reference"),
                                   rtol=2e-5, atol=1e-6)


def test_topk_retain_graph_backward_twice():
    x, t = _inputs("multiclass", (9, 8), seed=12)
    x.requires_grad_(True)
    loss = F.topk_loss(x, t, mode="multiclass", k=0.3, backend="native")
    first = torch.autograd.grad(loss, x, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, x)[0]
    assert torch.equal(first, second)


@given(cases("binary", soft=True))
def test_property_topk_binary_soft_targets(case):
    x, t = case
    for k in (0.05, 0.5, 1.0):
        _compare(F.topk_loss, x, t, k=k, rtol=5e-5)


@given(cases("multiclass", max_classes=5))
def test_property_topk_multiclass(case):
    x, t = case
    _compare(F.topk_loss, x, t, mode="multiclass", k=0.3, rtol=5e-5)


# ---------------------------------------------------------------------------- memory & checks
def _saved_input_sized(fn, x, t, **kw):
    sizes = []

    def pack(tensor):
        if tensor.numel() >= x.numel() and tensor.data_ptr() not in (x.data_ptr(),
                                                                     t.data_ptr()):
            sizes.append(tensor.numel())
        return tensor

    x = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(x, t, backend="native", **kw).backward()
    return len(sizes)


def test_saved_tensors():
    x, t = _inputs("binary", (16, 16), seed=1)
    assert _saved_input_sized(F.dice_loss, x, t) == 1  # the probabilities
    assert _saved_input_sized(F.dice_loss, x.sigmoid(), t, from_logits=False) == 1
    assert _saved_input_sized(F.dice_loss, x.repeat(1, 3, 1, 1), t.squeeze(1).long() * 2,
                              mode="multiclass") == 1
    assert _saved_input_sized(F.focal_loss, x, t) == 1  # the slopes
    assert _saved_input_sized(region_pixel_loss, x, t, pixel="focal") == 2


@pytest.mark.parametrize("loss", ["dice", "focal", "composite"])
def test_a_saved_tensor_a_hook_keeps_is_not_overwritten_by_backward(loss):
    """The backward writes the gradient into its saved buffer (one input-sized buffer per
    step): a ``saved_tensors_hooks`` pack hook that kept the saved tensor (an inspection
    tool) found the gradient in it afterwards. Under such hooks the gradient gets a buffer
    of its own; torch's own operations never change what they saved. Found by a review."""
    x0, t = _inputs("binary", (64, 64), seed=3)
    fn = {"dice": F.dice_loss, "focal": F.focal_loss,
          "composite": lambda x, t, backend: dynloss.CompositeLoss(
              [dynloss.DiceLoss(backend=backend), dynloss.BCELoss(backend=backend)])(x, t)}[loss]
    kept = []

    def pack(tensor):
        kept.append(tensor)
        return tensor

    x = x0.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = fn(x, t, backend="native")
    before = [tensor.clone() for tensor in kept]
    value.backward()
    assert all(torch.equal(a, b) for a, b in zip(kept, before, strict=True))
    y = x0.detach().clone().requires_grad_(True)
    fn(y, t, backend="reference").backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_without_gradient(mode):
    """No gradient wanted (validation): nothing is saved, the values are the same."""
    x, t = _inputs(mode, (7, 9), seed=14)
    for fn in (F.iou_loss, F.focal_loss):
        with torch.no_grad():
            value = fn(x, t, mode=mode, backend="native")
        torch.testing.assert_close(value, fn(x, t, mode=mode, backend="reference"),
                                   rtol=2e-5, atol=1e-6)
        assert fn(x, t, mode=mode, backend="native").grad_fn is None  # x needs no gradient
    with torch.no_grad():
        value = region_pixel_loss(x, t, mode=mode, pixel="focal", backend="native")
    torch.testing.assert_close(
        value, region_pixel_loss(x, t, mode=mode, pixel="focal", backend="reference"),
        rtol=2e-5, atol=1e-6)


def test_value_checks_in_kernel():
    x, t = _inputs("binary", (4, 4))
    bad = t.clone()
    bad[0, 0, 0, 0] = 2.0
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 1\].*to 2\.0"):
        F.dice_loss(x, bad, backend="native")
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 1\]"):
        F.focal_loss(x, bad.masked_fill(bad == 2.0, float("nan")), backend="native")
    F.dice_loss(x, bad, backend="native", check_values=False)  # the switch turns it off
    ignored = bad.long()
    ignored[ignored == 2] = 255
    F.dice_loss(x, ignored, backend="native", ignore_index=255)  # ignored pixels aside
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\].*from_logits=True"):
        F.bce_loss(x, t, from_logits=False, backend="native")
    xm, tm = _inputs("multiclass", (4, 4))
    tm[0, 0, 0] = 3
    for check in (None, False):  # an index out of range is always an error
        with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\).*to 3"):
            F.dice_loss(xm, tm, mode="multiclass", backend="native", check_values=check)


# ------------------------------------------------------------------------------- the fallback
def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": SRC, **env}
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                          text=True, timeout=300)


def test_disabled_by_environment_falls_back_to_torch():
    code = (
        "import torch, pytest\n"
        "import dynloss.functional as F\n"
        "from dynloss.kernels import native_status, resolve_backend\n"
        "assert native_status() == 'disabled by DYNLOSS_NATIVE=0', native_status()\n"
        "x = torch.zeros(1, 1, 2, 2)\n"
        "assert resolve_backend(x, 'auto') == 'torch'\n"
        "F.dice_loss(x, x)\n"
        "try:\n"
        "    F.dice_loss(x, x, backend='native')\n"
        "except ValueError as e:\n"
        "    assert 'DYNLOSS_NATIVE=0' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    result = _python(code, DYNLOSS_NATIVE="0")
    assert result.returncode == 0, result.stderr


def test_no_compiler_falls_back_to_torch(tmp_path):
    code = (
        "import torch\n"
        "from dynloss.kernels import native_status, resolve_backend\n"
        "print(native_status())\n"
        "assert resolve_backend(torch.zeros(1, 1, 2, 2), 'auto') == 'torch'\n"
    )
    result = _python(code, CXX="/nonexistent/c++", PATH=str(tmp_path),
                     DYNLOSS_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    # the status names the $CXX that named no program (it said "set $CXX", which was set;
    # found by a review of the native build)
    assert ("no C++ compiler found ($CXX='/nonexistent/c++' names no program found, and no "
            "c++, g++ or clang++ is on PATH: install one, or set CXX to one)") in result.stdout
    result = _python(code, CXX="", PATH=str(tmp_path), DYNLOSS_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert ("no C++ compiler found (no c++, g++ or clang++ on PATH: install one, or set CXX to "
            "one)") in result.stdout


def test_a_cache_directory_given_with_spaces_around_it_is_the_directory(monkeypatch, tmp_path):
    """``DYNLOSS_CACHE_DIR=" /path "`` made a folder named with the spaces (a blank value one
    named " " in the working directory), where ``CXX`` and ``DYNLOSS_NATIVE`` are stripped."""
    from dynloss.kernels.native import build

    monkeypatch.setenv("DYNLOSS_CACHE_DIR", f"  {tmp_path}\n")
    assert build.cache_dir() == tmp_path
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("DYNLOSS_CACHE_DIR", " ")
    assert build.cache_dir() == tmp_path / ".cache" / "dynloss"


def test_failing_build_falls_back_with_the_compiler_message(tmp_path):
    fake = tmp_path / "c++"
    fake.write_text("#!/bin/sh\necho 'fake compiler: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    code = ("from dynloss.kernels import native_status\n"
            "print(native_status())\n")
    result = _python(code, CXX=str(fake), DYNLOSS_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert "could not be built" in result.stdout and "fake compiler: no" in result.stdout
    assert not list((tmp_path / "cache").glob("*.so"))  # no half-written library left


@pytest.mark.parametrize("pixel", ["bce", "focal"])
def test_retain_graph_backward_twice(pixel):
    """The gradient reuses the saved buffer only when the graph is freed after backward."""
    x, t = _inputs("multiclass", (9, 8), seed=12)
    x.requires_grad_(True)
    loss = region_pixel_loss(x, t, pixel=pixel, mode="multiclass", backend="native")
    first = torch.autograd.grad(loss, x, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, x, retain_graph=True)[0]
    third = torch.autograd.grad(loss, x)[0]
    assert torch.equal(first, second) and torch.equal(first, third)
    want = torch.autograd.grad(
        region_pixel_loss(x, t, pixel=pixel, mode="multiclass", backend="reference"), x)[0]
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, x)


def test_torch_compile_takes_the_torch_path(recwarn):
    """Under torch.compile "auto" avoids the ctypes call (no graph break), same values."""
    loss = dynloss.DiceLoss()
    compiled = torch.compile(lambda x, t: loss(x, t))
    x, t = _inputs("binary", (8, 8), seed=13)
    xc = x.clone().requires_grad_(True)
    value = compiled(xc, t)
    value.backward()
    want, want_grad = _run(F.dice_loss, x, t, "native")
    torch.testing.assert_close(value.detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xc.grad, want_grad, rtol=1e-4, atol=1e-6)
    assert not [w for w in recwarn if "ctypes" in str(w.message)]


def test_compiler_without_openmp_builds_single_threaded(tmp_path):
    """A compiler that rejects -fopenmp (Apple clang) still gets the kernels, via -fopenmp-simd."""
    real = shutil.which("c++") or shutil.which("g++")
    wrapper = tmp_path / "c++"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "no OpenMP here" >&2; exit 1; }; done\n'
        f'exec {real} "$@" -O0\n'  # quick to compile: what is tested is the build plan
    )
    wrapper.chmod(0o755)
    code = (
        "import torch\n"
        "import dynloss.functional as F\n"
        "from dynloss.kernels import native_status\n"
        "assert native_status() == '', native_status()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(2, 1, 40, 50, generator=g)\n"
        "t = (torch.rand(2, 1, 40, 50, generator=g) > 0.5).float()\n"
        "a, b = F.dice_loss(x, t, backend='native'), F.dice_loss(x, t, backend='reference')\n"
        "assert torch.allclose(a, b, rtol=2e-5), (a, b)\n"
    )
    result = _python(code, CXX=str(wrapper), DYNLOSS_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "cache").glob("*.so"))) == 1


FORKED = """
import os, sys, torch, warnings
import dynloss.functional as F
torch.set_num_threads(2)
x = torch.randn(8, 1, 128, 128, requires_grad=True)
t = (torch.rand(8, 1, 128, 128) > 0.5).float()
F.dice_loss(x, t, backend="native").backward()  # OpenMP's threads now exist in this process
parent = F.dice_loss(x.detach(), t, backend="native").item()
pid = os.fork()
if pid == 0:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.set_num_threads(2)
        child = F.dice_loss(x.detach(), t, backend="native").item()
        F.dice_loss(x.detach(), t, backend="native")
    ok = child == parent and len(caught) == 1 and "forked" in str(caught[0].message)
    os._exit(0 if ok else 3)
_, code = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(code))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_process_forked_after_the_kernels_ran_on_threads_does_not_hang():
    """OpenMP's thread pool does not survive fork: a child that ran the kernels on two threads
    after its parent had waited forever in the team barrier (a multiprocessing "fork" pool, a
    DataLoader worker that sets more threads). The child runs them on one thread, same bits,
    saying so once. Found by a review."""
    source = str(Path(dynloss.__file__).parents[1])
    result = subprocess.run([sys.executable, "-c", FORKED], timeout=60,
                            env={**os.environ, "PYTHONPATH": source})
    assert result.returncode == 0


# ------------------------------------------- gaps a mutation review found (2026-12-05, sixth)
@pytest.mark.parametrize("ignore_index", [0, 2])
@pytest.mark.parametrize("name", ["dice", "tversky", "bce", "focal", "topk"])
def test_multiclass_ignore_index_that_is_a_class(name, ignore_index):
    """``ignore_index`` inside ``[0, C)`` (the background class left out): the kernels'
    multiclass keep mask was tested only with indices outside the classes (a kernel that kept
    such pixels passed every test)."""
    fn = {**REGION, **PIXEL, "topk": F.topk_loss}[name]
    kw = {"k": 0.3} if name == "topk" else {}
    x, t = _inputs("multiclass", (7, 6), seed=12)
    assert (t == ignore_index).any() and (t != ignore_index).any()
    _compare(fn, x, t, mode="multiclass", ignore_index=ignore_index, **kw)


@pytest.mark.parametrize("case", ["per_image", "many_classes"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_more_than_host_scores_region_scores(case, reduction):
    """Past ``HOST_SCORES`` (N * C > 1024 scores) the region gradients are formed with
    tensors, not on the host: a path no test reached (a gradient 1200x too large there went
    unnoticed)."""
    from dynloss.kernels.native.autograd import HOST_SCORES

    if case == "per_image":
        x, t = _inputs("multilabel", (2, 3), n=520, c=2, seed=13)
        kw = {"mode": "multilabel", "per_image": True}
        assert x.shape[0] * x.shape[1] > HOST_SCORES
    else:
        x, t = _inputs("multiclass", (3, 5), c=HOST_SCORES + 7, seed=13)
        kw = {"mode": "multiclass"}
    if reduction == "none":
        fn = lambda *a, **k: F.dice_loss(*a, reduction="none", **k).sum()  # noqa: E731
    else:
        fn = lambda *a, **k: F.dice_loss(*a, reduction=reduction, **k)  # noqa: E731
    _compare(fn, x, t, **kw)


def test_fused_composite_past_host_scores_keeps_the_region_weight():
    """The one-pass composite past ``HOST_SCORES`` scores (per-image Dice of 33 x 32 scores):
    its backward dropped the region term's weight there and no test reached it."""
    x, t = _inputs("multilabel", (2, 2), n=33, c=32, seed=14)
    terms = (dynloss.DiceLoss(mode="multilabel", per_image=True), dynloss.BCELoss(
        mode="multilabel"))

    def composite(input, target, backend):
        for term in terms:
            term.backend = backend
        return dynloss.CompositeLoss(list(terms), weights=[0.5, 1.0])(input, target)

    got, got_grad = _run(composite, x, t, "native")
    want, want_grad = (r.float() for r in _run(composite, x.double(), t, "reference"))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------- the AVX-512 loop beside the portable one
# The binary region forward pass from logits with float32 targets (no ignore_index) has a
# hand-vectorised loop where the compiler targets AVX-512; every test above runs it on such a
# machine. Here each of the two loops is compared with the reference, and with each other.
LOOPS = ["fastest", "portable"]


def _cpu_has_avx512() -> bool:
    from dynloss.kernels.native.build import _cpu_signature  # what -march=native reads
    return {"avx512f", "avx512dq"} <= set(_cpu_signature().split())


@pytest.fixture(params=LOOPS)
def loops(request, monkeypatch):
    from dynloss.kernels.native import ffi
    monkeypatch.setattr(ffi, "_PORTABLE_LOOPS", int(request.param == "portable"))
    return request.param


def test_the_avx512_loop_is_built_where_the_cpu_has_it():
    """On an x86 CPU with AVX-512 F and DQ (this CI's) the -march=native build has the
    hand-vectorised loop, so the tests that run the fastest loop run it."""
    from dynloss.kernels.native import ffi
    from dynloss.kernels.native.build import library
    if not _cpu_has_avx512():
        pytest.skip("this CPU has no AVX-512 F and DQ")
    assert library().dynloss_avx512_loops() in (0, 1)
    assert ffi.avx512_loops()


# lengths around the loop's 16 lanes, its 512-element blocks and the 16384-element chunks
LENGTHS = [1, 5, 15, 16, 17, 511, 512, 513, 16384 + 33]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("mode", ["binary", "multilabel"])
def test_both_loops_equal_the_reference(loops, mode, length):
    x, t = _inputs(mode, (length,), n=2, c=3, seed=length)
    for name, fn in REGION.items():
        kw = {"alpha": 0.3, "beta": 0.7} if name == "tversky" else {}
        _compare(fn, x, t, mode=mode, **kw)
        _compare(fn, x, t, mode=mode, per_image=True, **kw)
    soft = torch.rand(t.shape, generator=torch.Generator().manual_seed(length))
    _compare(F.dice_loss, x, soft, mode=mode)  # soft labels: backward reads the target


def _loops_outputs(monkeypatch, fn, x, t, **kw):
    from dynloss.kernels.native import ffi
    got = {}
    for loop in LOOPS:
        monkeypatch.setattr(ffi, "_PORTABLE_LOOPS", int(loop == "portable"))
        got[loop] = _run(fn, x, t, "native", **kw)
    return got["fastest"], got["portable"]


@pytest.mark.parametrize("length", LENGTHS)
def test_the_two_loops_agree_to_float_rounding(monkeypatch, length):
    """Values and gradients of the two loops within a few float32 roundings of each other
    (they sum in different lane orders), over the whole range of logits: saturated, the
    flush of e^-|x| to 0 near |x| = 87.33, the largest floats, -0 and +0."""
    x, t = _inputs("multilabel", (length,), n=2, c=3, seed=7 + length, scale=40.0)
    edges = torch.tensor([0.0, -0.0, 87.3, -87.3, 87.4, -87.4, 88.0, -104.0, 3e38, -3e38,
                          1e-30, -1e-30, 16.0, -16.0, 0.5, -0.5])
    flat = x.view(-1)
    flat[: min(flat.numel(), edges.numel())] = edges[: flat.numel()]
    t.view(-1)[1::3] = -0.0  # a negative zero is a hard label 0
    for fn in REGION.values():
        (fast, fast_grad), (portable, portable_grad) = _loops_outputs(
            monkeypatch, fn, x, t, mode="multilabel")
        torch.testing.assert_close(fast, portable, rtol=1e-6, atol=0)
        scale = portable_grad.abs().max().item()
        torch.testing.assert_close(fast_grad, portable_grad, rtol=1e-6, atol=1e-7 * scale)


@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan"), float("inf")])
def test_both_loops_refuse_a_target_outside_zero_one(loops, bad):
    """Out of range, NaN or infinite, in the tail past the last whole 16 lanes."""
    x, t = _inputs("binary", (40,))
    t.view(-1)[37] = bad
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 1\]"):
        F.dice_loss(x, t, backend="native")
    # unchecked, an invalid target makes the loss NaN (as on every backend)
    assert math.isnan(F.dice_loss(x, t, backend="native", check_values=False).item())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_both_loops_make_the_loss_nan_for_a_non_finite_logit(loops, bad):
    """An infinite or NaN kept logit: the loss is NaN and the gradient the reference's (NaN
    where the loss depends on the element), in either loop."""
    x, t = _inputs("binary", (40,))
    x.view(-1)[37] = bad
    x = x.requires_grad_()
    loss = F.dice_loss(x, t, backend="native")
    assert math.isnan(loss.item())
    loss.backward()
    xr = x.detach().double().requires_grad_()
    F.dice_loss(xr, t.double(), backend="reference").backward()
    assert torch.equal(x.grad.isnan(), xr.grad.isnan())


def test_both_loops_tell_soft_labels_from_hard_ones(loops):
    """One soft label among hard ones, in the tail lanes: the forward pass reports it, so the
    backward pass reads the target (the signed slopes alone would give a wrong gradient)."""
    x, t = _inputs("binary", (40,), seed=3)
    t.view(-1)[38] = 0.3
    _, grad = _compare(F.iou_loss, x, t)
    assert grad.view(-1)[38] != 0


def test_both_loops_without_gradient_give_the_same_value(loops):
    x, t = _inputs("multilabel", (513,), seed=4)
    with torch.no_grad():
        got = F.dice_loss(x, t, mode="multilabel", backend="native")
    want = F.dice_loss(x.double(), t.double(), mode="multilabel", backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)


def test_the_switch_selects_the_portable_loop(monkeypatch):
    """What tells the loops apart: the portable one counts soft labels, the AVX-512 one only
    says there are some (1 per chunk), so the comparisons above do run both."""
    from dynloss.kernels.native import ffi
    if not ffi.avx512_loops():
        pytest.skip("no AVX-512 loop in this build")
    x, t = _inputs("binary", (64,))
    t.view(-1)[[3, 40, 41]] = 0.5
    x, t = x.view(1, 1, -1), t.view(1, 1, -1)
    soft = {}
    for loop in LOOPS:
        monkeypatch.setattr(ffi, "_PORTABLE_LOOPS", int(loop == "portable"))
        fwd = ffi.native_forward(x, t, "binary", True, None, 0.0, None, True, False, True, True)
        soft[loop] = fwd.out[5]
    assert soft == {"fastest": 1.0, "portable": 3.0}


def test_both_loops_keep_probabilities_down_to_the_flush(loops):
    """Logits in [-87.3, -80]: p = e^x is a normal float32 (down to ~1.2e-38, where e^-|x| is
    flushed to 0), and so is the gradient p (1 - p) times the Dice slope; both loops give the
    reference's, not 0."""
    x = torch.linspace(-87.3, -80.0, 100).view(1, 1, 100)
    t = torch.zeros_like(x)
    _, grad = _compare(F.dice_loss, x, t)
    assert (grad != 0).all()


def test_both_loops_save_the_sign_of_a_zero_slope(monkeypatch):
    """Where p (1 - p) is 0 (|x| above ~87) the slope saved for a target of 1 is -0, whose sign
    bit backward reads as the target: the AVX-512 loop saved +0 (0 - 0), so under an upstream
    gradient that overflows the gradient there was 0 where the portable loop's is NaN."""
    x = torch.tensor([[[-200.0, -3.0]]])
    t = torch.tensor([[[1.0, 0.0]]])
    grads = {}
    from dynloss.kernels.native import ffi
    for loop in LOOPS:
        monkeypatch.setattr(ffi, "_PORTABLE_LOOPS", int(loop == "portable"))
        xs = x.clone().requires_grad_()
        (F.dice_loss(xs, t, backend="native") * 3e38).backward()
        grads[loop] = xs.grad
    assert grads["portable"][0, 0, 0].isnan()  # 0 * (gp + gi), gi * 3e38 = inf
    torch.testing.assert_close(grads["fastest"], grads["portable"], equal_nan=True,
                               rtol=1e-6, atol=0)


def test_a_float64_target_is_reported_with_its_own_values():
    """The native backend reads a float64 target as float32 (keeping its answers to "ignored?"
    and "in [0, 1]?"), and its error named the converted values (1.0000001192092896 for
    1.000000000001, 255.00001525878906 for an ignore_index neighbour): the caller's values,
    as the other backends give, now."""
    x = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([[[[1 + 1e-12, 0.0], [1.0, 0.0]]]], dtype=torch.float64)
    messages = []
    for backend in ("native", "reference"):
        with pytest.raises(ValueError, match=r"target values must lie in \[0, 1\]") as error:
            F.dice_loss(x, t, backend=backend)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "to 1.000000000001" in messages[0]
    t[0, 0, 1, 1] = 255.0000000001
    with pytest.raises(ValueError, match=r"to 255\.0000000001") as error:
        F.dice_loss(x, t, backend="native", ignore_index=255)


DEFAULT_DTYPE_SCRIPT = """
import sys, torch, dynloss
from dynloss import BCELoss, CompositeLoss, DiceLoss, FocalLoss, TopKLoss, TverskyLoss
torch.set_default_dtype(getattr(torch, sys.argv[1]))
g = torch.Generator().manual_seed(0)
worst = 0.0
for mode, channels in (("binary", 1), ("multiclass", 3)):
    # 1.2 MB of float32 in binary mode: above the pool's 1 MiB, so its buffers are pooled
    x = torch.randn(2, channels, 384, 384, generator=g, dtype=torch.float32)
    if mode == "binary":
        t = (torch.rand(2, 1, 384, 384, generator=g) > 0.5).float()
        t[0, 0, :4] = 255
    else:
        t = torch.randint(0, 3, (2, 384, 384), generator=g)
        t[0, :4] = 255
    for make in (DiceLoss, TverskyLoss, BCELoss, FocalLoss, TopKLoss):
        for losses in ([make(mode=mode, ignore_index=255, backend="{backend}")],
                       [CompositeLoss([DiceLoss(mode=mode, ignore_index=255, backend="{backend}"),
                                       make(mode=mode, ignore_index=255, backend="{backend}")])]):
            got = []
            for backend in ("{backend}", "reference"):
                loss = losses[0]
                for module in loss.modules():
                    if hasattr(module, "backend"):
                        module.backend = backend
                for keep in (False, True):  # the second call takes a pooled buffer, and
                    leaf = x.clone().requires_grad_()  # keeps the graph (a fresh gradient)
                    value = loss(leaf, t)
                    value.backward(retain_graph=keep)
                assert value.dtype == leaf.grad.dtype == torch.float32, (value, leaf.grad)
                got.append((value.detach().double(), leaf.grad.double()))
            assert got[0][0].isfinite()
            worst = max(worst, (got[0][0] - got[1][0]).abs().item(),
                        (got[0][1] - got[1][1]).abs().max().item() * 1e3)
print(worst)
"""


@pytest.mark.parametrize("default", ["float64", "float16", "bfloat16"])
def test_a_float32_input_under_another_default_dtype_gets_the_reference_gradient(default):
    """The native backend allocated its saved slopes and gradients with the default dtype:
    under ``torch.set_default_dtype(torch.float64)`` a float32 input got a zero or infinite
    gradient, under float16/bfloat16 the kernel wrote past the buffer (a segfault). Found by
    a review of the backends."""
    code = DEFAULT_DTYPE_SCRIPT.replace("{backend}", "native")
    proc = subprocess.run([sys.executable, "-c", code, default], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-4


@pytest.mark.parametrize("make", [
    lambda b, m: dynloss.DiceLoss(mode=m, backend=b),
    lambda b, m: dynloss.TverskyLoss(mode=m, per_image=True, reduction="none", backend=b),
    lambda b, m: dynloss.BCELoss(mode=m, backend=b),
    lambda b, m: dynloss.FocalLoss(mode=m, alpha=[0.2, 0.3, 0.5] if m == "multiclass" else 0.25,
                                   backend=b),
    lambda b, m: dynloss.TopKLoss(k=0.3, mode=m, backend=b),
    lambda b, m: dynloss.CompositeLoss([dynloss.DiceLoss(mode=m, backend=b),
                                        dynloss.FocalLoss(mode=m, backend=b)]),
], ids=["dice", "tversky-none", "bce", "focal-alpha", "topk", "composite"])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_cpu_tensors_under_another_default_device_stay_on_the_cpu(make, mode):
    """The native backend allocated its outputs, saved buffers, gradients and class weights on
    torch's default device: under ``torch.set_default_device`` (here "meta", standing in for
    "cuda") a CPU call returned a meta loss, and TopK's kernel refused its arguments. Found by
    a review of training loops. Large enough for the buffer pool (1 MiB)."""
    gen = torch.Generator().manual_seed(0)
    c = 3 if mode == "multiclass" else 1
    x = torch.randn(4, c, 256, 256, generator=gen)
    t = (torch.randint(0, 3, (4, 256, 256), generator=gen) if mode == "multiclass"
         else (torch.rand(4, 1, 256, 256, generator=gen) > 0.7).float())
    results = []
    for backend in ("native", "reference"):
        leaf = x.clone().requires_grad_(True)
        with torch.device("meta"):
            value = make(backend, mode)(leaf, t)
            assert value.device.type == "cpu"
            value.sum().backward()
        results.append((value.detach(), leaf.grad))
    (value, grad), (want, want_grad) = results
    assert grad.device.type == "cpu"
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-9)


def test_topk_ranks_a_nan_loss_above_an_infinite_one():
    """Pixel 0's cross-entropy overflows to inf (class weight 1); pixel 1's too, times a class
    weight of 0: NaN. A TopK of one pixel selects the NaN, as the reference does (NaN > +inf >
    finite); the native kernels ranked NaN with +inf and took pixel 0, the lower index."""
    big = torch.finfo(torch.float32).max
    x = torch.tensor([[[big, -big], [-big, big]]])  # (N=1, C=2, M=2)
    t = torch.tensor([[1, 0]])
    params = distribution_params(alpha=(0.0, 1.0), k=0.5, mode="multiclass")
    layout = prepare(x, t, "multiclass")
    assert REFERENCE.distribution(layout, params, True).isnan()
    assert NATIVE_BACKEND.distribution(layout, params, True).isnan()


# Batches of short rows (a few pixels per (sample, class), many samples: (N, 1) logits of a
# classifier, thin patches): one task per row cost seconds at (8e6, 1, 1) and nine doubles of
# partial sums per row (1.2 GB). Where nothing is wanted per row (BCE/Focal/TopK; a region
# loss of one class pooled over the batch) the rows are read as one; otherwise a task takes
# whole rows, kChunk elements' worth.
_SHORT_ROWS = [((3000,), 1), ((700, 2), 3), ((5, 7), 2), ((1,), 3), ((40,), 1)]


@pytest.mark.parametrize(("spatial", "n_factor"), _SHORT_ROWS, ids=str)
@pytest.mark.parametrize("mode", ["binary", "multilabel"])
def test_short_rows_match_the_reference(mode, spatial, n_factor):
    """Rows of 1 to 14 elements, from 40 to 9000 rows: every region and pixel loss, pooled and
    per image, with ignore_index, against the float64 reference."""
    x, t = _inputs(mode, spatial[1:] or (1,), n=spatial[0] * n_factor, c=3, seed=21)
    for fn in REGION.values():
        for per_image in (False, True):
            _compare(fn, x, t, mode=mode, per_image=per_image, rtol=5e-5)
        ignored = t.clone()
        ignored.view(-1)[::7] = 2
        _compare(fn, x, ignored, mode=mode, ignore_index=2, rtol=5e-5)
    for fn in PIXEL.values():
        _compare(fn, x, t, mode=mode, rtol=5e-5)
    _compare(region_pixel_loss, x, t, mode=mode, pixel="focal", rtol=5e-5)


def test_rows_are_read_as_one_where_nothing_is_wanted_per_row(monkeypatch):
    from dynloss.kernels.native import autograd, ffi

    seen = []
    original = ffi.native_forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dims") if "dims" in kwargs else args[12])
        return original(*args, **kwargs)

    monkeypatch.setattr(autograd, "native_forward", spy)
    x, t = _inputs("multilabel", (1,), n=500, c=3, seed=22)
    xb, tb = _inputs("binary", (2,), n=500, seed=22)
    for fn, xi, ti, kw in [(F.focal_loss, x, t, {"mode": "multilabel"}),
                           (F.bce_loss, xb, tb, {}),
                           (F.dice_loss, xb, tb, {}),
                           (region_pixel_loss, xb, tb, {"pixel": "bce"})]:
        seen.clear()
        _run(fn, xi, ti, "native", ran=True, **kw)
        assert seen == [(1, 1, xi.numel())], fn
    for fn, xi, ti, kw in [(F.dice_loss, x, t, {"mode": "multilabel"}),
                           (F.dice_loss, xb, tb, {"per_image": True})]:
        seen.clear()
        _run(fn, xi, ti, "native", ran=True, **kw)
        assert seen == [tuple(xi.reshape(xi.shape[0], xi.shape[1], -1).shape)], fn


def test_short_rows_bitwise_identical_for_any_thread_count():
    """Whole rows per task: the same bits for 1, 2 and 3 threads (above the parallel
    threshold: 40000 rows of 3 elements)."""
    x, t = _inputs("multilabel", (3,), n=20000, c=2, seed=23)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append([_run(F.dice_loss, x, t, "native", mode="multilabel"),
                            _run(region_pixel_loss, x, t, "native", mode="multilabel",
                                 pixel="focal", per_image=True)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for (value, grad), (value0, grad0) in zip(other, results[0], strict=True):
            assert torch.equal(value, value0) and torch.equal(grad, grad0)


# Rows shorter than 16 pixels where the sums are kept per row (per image, several classes,
# multiclass): measured on the project's 2-vCPU machine (forward+backward, 1 Mi elements),
# native took 3-8x the torch backend's time at 1 pixel per row and 1.3-2x at 4, about the same
# at 16, 2-5x less at 64: backend="auto" takes the torch backend below 16.
@pytest.mark.parametrize(("make", "shape", "want"), [
    (lambda: dynloss.DiceLoss(mode="multilabel"), (500, 20, 4), "torch"),
    (lambda: dynloss.DiceLoss(mode="multilabel"), (50, 20, 16), "native"),
    (lambda: dynloss.DiceLoss(per_image=True), (2000, 1, 1), "torch"),
    (lambda: dynloss.DiceLoss(per_image=True), (200, 1, 4, 4), "native"),
    (lambda: dynloss.DiceLoss(), (2000, 1), "native"),  # rows read as one
    (lambda: dynloss.BCELoss(mode="multilabel"), (500, 20, 1), "native"),  # ditto
    (lambda: dynloss.FocalLoss(mode="multiclass"), (500, 3, 4), "torch"),
    (lambda: dynloss.FocalLoss(mode="multiclass"), (50, 3, 16), "native"),
    (lambda: dynloss.TopKLoss(mode="multiclass", k=0.3), (500, 3, 2), "torch"),
    (lambda: dynloss.CompositeLoss([dynloss.DiceLoss(mode="multilabel"),
                                    dynloss.BCELoss(mode="multilabel")]), (500, 4, 3), "torch"),
], ids=lambda value: repr(value()) if callable(value) else str(value))
def test_auto_takes_the_torch_backend_for_short_rows_kept_per_row(make, shape, want):
    from ._kernel_cases import NODES, graph_nodes

    loss = make()
    x = torch.randn(shape, requires_grad=True)
    multiclass = getattr(loss, "mode", None) == "multiclass"
    target = (torch.randint(0, shape[1], (shape[0], *shape[2:])) if multiclass
              else (torch.rand(shape) > 0.5).float())
    value = loss(x, target)
    nodes = graph_nodes(value)
    assert any(node in nodes for node in NODES[want]), nodes
    reference = make()
    for module in [reference, *getattr(reference, "terms", {}).values()]:
        if isinstance(module, dynloss.SegmentationLoss):
            module.backend = "reference"
    torch.testing.assert_close(value, reference(x, target), rtol=2e-5, atol=1e-6)


def test_a_named_native_backend_runs_short_rows():
    x = torch.randn(500, 20, 4, requires_grad=True)
    target = (torch.rand(500, 20, 4) > 0.5).float()
    value = dynloss.DiceLoss(mode="multilabel", backend="native")(x, target)
    assert "NativeRegionLossBackward" in {type(value.grad_fn).__name__}


def test_an_empty_batch_does_not_choose_for_later_short_rows():
    """The cache key counted an empty batch's rows as short while the backend's own test did
    not: the native choice made for N = 0 was then taken for every later short-row call with
    that configuration (found by a review)."""
    from dynloss.kernels import dispatch

    from ._kernel_cases import graph_nodes

    dispatch.clear_cache()
    loss = dynloss.FocalLoss(mode="multiclass")
    loss(torch.randn(0, 4, 4, requires_grad=True), torch.zeros(0, 4, dtype=torch.long))
    x = torch.randn(500, 4, 4, requires_grad=True)
    value = dynloss.FocalLoss(mode="multiclass")(x, torch.randint(0, 4, (500, 4)))
    assert "DistributionSumBackward" in graph_nodes(value)
    assert dynloss.kernels.resolve_backend(torch.zeros(300, 3, 2, 2), "auto") == (
        "native" if NATIVE else "torch")  # binary mode, pooled: one row, never short


@pytest.mark.parametrize("mode", ["multilabel", "multiclass"])
def test_the_arguments_saved_for_backward_point_at_nothing_freed(mode):
    """The forward's argument struct is kept for backward (its sizes and configuration); the
    pointers into memory the forward frees (the input's contiguous copy, the class weights,
    TopK's scratch losses, the positives' weights) or that outlives it only with the caller's
    results (the results array) are cleared, so that no later reader of the struct can follow
    one (they pointed at freed memory, unread by today's backward). Backward sets its own."""
    from dynloss.kernels.native import ffi
    x, t = _inputs(mode, (6, 5), n=2, c=3, seed=11)
    x = x.transpose(-1, -2)  # not contiguous: the kernels read a copy made in the forward
    multiclass = mode == "multiclass"
    fwd = ffi.native_forward(x, t.transpose(-1, -2), mode, True, None, 2.0,
                             (0.5, 2.0, 1.0) if multiclass else 0.25, True, True, True, True,
                             topk=0.5, dims=(2, 3, 30), pos_weight=None if multiclass else 2.0)
    saved = fwd.config[8]
    freed = {name: getattr(saved, name) for name in
             ("x", "class_alpha", "loss", "region", "pixel_out", "check", "pos_weight")}
    assert freed == dict.fromkeys(freed)
    assert (saved.n, saved.c, saved.m) == (2, 3, 30)


def test_multiclass_region_probabilities_down_to_the_flush():
    """A multiclass region loss (no pixel term) flushes a class's probability below 2^-126 to
    0, as the binary region pass does (a logit more than ~87.3 below the pixel's maximum):
    above it, p is a normal float32 and its gradient the reference's; below, p and its
    gradient are 0 where the reference's are subnormal, a difference under 1e-37 that leaves
    the loss unchanged. A pixel loss keeps those values (its log-sum-exp reads them)."""
    gaps = torch.tensor([-80.0, -87.0, -87.3, -88.0, -100.0, -150.0])
    x = torch.stack([torch.zeros(6), gaps, torch.zeros(6) - 1.0]).view(1, 3, 6)
    t = torch.tensor([[0, 1, 2, 1, 0, 1]])
    xs = x.clone().requires_grad_()
    loss = F.dice_loss(xs, t, mode="multiclass", backend="native")
    loss.backward()
    xr = x.double().requires_grad_()
    want = F.dice_loss(xr, t, mode="multiclass", backend="reference")
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    kept, flushed = gaps > -87.33, gaps < -87.33
    grad, want_grad = xs.grad[0, 1], xr.grad[0, 1].float()
    torch.testing.assert_close(grad[kept], want_grad[kept], rtol=1e-4, atol=0)
    assert (grad[kept] != 0).all() and (grad[flushed] == 0).all()
    assert (want_grad[flushed].abs() < 1e-37).all() and (want_grad[flushed] != 0).any()
    # the pixel losses keep them: cross-entropy's gradient there is the reference's
    xs.grad = None
    F.bce_loss(xs, t, mode="multiclass", backend="native").backward()
    xr.grad = None
    F.bce_loss(xr, t, mode="multiclass", backend="reference").backward()
    torch.testing.assert_close(xs.grad[0, 1], xr.grad[0, 1].float(), rtol=1e-4, atol=0)
