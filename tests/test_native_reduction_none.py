"""``reduction="none"`` of BCE, Focal and TopK on the native kernels: one forward pass writes
every element's loss and slope (TopK's selection then zeroes both outside it), backward
multiplies the slopes by the upstream gradient.

Each case runs the native backend and the reference in the same test and compares the
per-element values and the gradients under a weight map (the reason to ask for ``"none"``),
also where the map is NaN or infinite, where an input is NaN, with ``ignore_index``,
``pos_weight`` (one or per channel), ``alpha``, ``gamma``, probabilities, 16-bit and
non-contiguous inputs, a kept graph, saved-tensor hooks and a recorded backward.
"""

from __future__ import annotations

import math

import pytest
import torch

import dynloss
from dynloss._math import topk_count
from dynloss.kernels import native_available
from dynloss.kernels.capabilities import Need
from dynloss.kernels.dispatch import select

from ._backends import (
    MODES,
    assert_second_order_is_the_references,
    elementwise_case,
    elementwise_options,
    make_loss,
    weight_map,
    with_nan_and_inf,
)
from ._kernel_cases import graph_nodes

pytestmark = pytest.mark.skipif(not native_available(), reason="native kernels unavailable")

NODE = "NativeDistributionElementsBackward"


def _case(mode: str, from_logits: bool, ignore: bool):
    return elementwise_case(mode, from_logits, ignore)


_weights = weight_map


def _run(loss_fn, x, target, upstream, *, native: bool):
    leaf = x.clone().requires_grad_(True)
    loss = loss_fn(leaf, target)
    assert (NODE in graph_nodes(loss)) == native
    (loss * upstream).sum().backward()
    return loss.detach(), leaf.grad


def _compare(name, mode, x, target, upstream, **kwargs):
    native = _run(make_loss(name, mode, "native", reduction="none", **kwargs), x, target,
                  upstream, native=True)
    want = _run(make_loss(name, mode, "reference", reduction="none", **kwargs), x, target,
                upstream, native=False)
    assert native[0].shape == want[0].shape and native[0].dtype == want[0].dtype
    torch.testing.assert_close(native[0], want[0], rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(native[1], want[1], rtol=1e-5, atol=1e-6, equal_nan=True)
    return native


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("ignore", [False, True], ids=["all", "ignore"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,kwargs", [("bce", {}), ("focal", {}),
                                         ("focal", {"gamma": 0.5}),
                                         ("focal", {"gamma": 1.5, "alpha": "weights"}),
                                         ("topk", {"k": 0.3}), ("topk", {"k": 0.02})],
                         ids=["bce", "focal", "focal-0.5", "focal-alpha", "topk-0.3",
                              "topk-0.02"])
def test_values_and_gradients_are_the_references(name, kwargs, mode, ignore, from_logits):
    x, target = _case(mode, from_logits, ignore)
    kwargs = elementwise_options(kwargs, mode, from_logits, ignore)
    weights = _weights(x, mode)
    for upstream in (weights, with_nan_and_inf(weights), torch.ones_like(weights)):
        loss, _ = _compare(name, mode, x, target, upstream, **kwargs)
    if ignore:  # an ignored element's loss is 0
        at = (0, 1, slice(0, 3)) if mode == "multiclass" else (0, slice(None), 1, slice(0, 3))
        assert loss[at].abs().max().item() == 0.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["bce", "focal", "topk"])
def test_an_invalid_element_is_nan_alone_and_so_is_its_gradient(name, mode):
    x, target = _case(mode, True, False)
    x[1, 0, 2, 3] = math.nan
    x[0, 0, 4, 4] = math.inf
    loss, grad = _compare(name, mode, x, target, _weights(x, mode))
    assert torch.isnan(loss).sum().item() == 2
    assert torch.isnan(grad).any()


def test_unchecked_invalid_targets_are_nan_as_the_references():
    x, target = _case("binary", True, False)
    target[0, 0, 0, 0] = 2.0
    loss, _ = _compare("bce", "binary", x, target, _weights(x, "binary"), check_values=False)
    assert math.isnan(loss[0, 0, 0, 0].item()) and torch.isnan(loss).sum().item() == 1
    with pytest.raises(ValueError, match="target"):
        make_loss("bce", "binary", "native", reduction="none")(x, target)


@pytest.mark.parametrize("pos_weight", [2.5, (0.5, 1.0, 3.0, 2.0)], ids=["one", "per-channel"])
@pytest.mark.parametrize("mode", ["binary", "multilabel"])
def test_pos_weight(mode, pos_weight):
    if mode == "binary" and isinstance(pos_weight, tuple):
        pos_weight = pos_weight[:1]
    x, target = _case(mode, True, True)
    _compare("bce", mode, x, target, _weights(x, mode), pos_weight=pos_weight,
             ignore_index=255)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs(dtype):
    x, target = _case("multilabel", True, False)
    x = x.to(dtype)
    loss, grad = _compare("focal", "multilabel", x, target, _weights(x, "multilabel"))
    assert loss.dtype == torch.float32 and grad.dtype == dtype


def test_non_contiguous_and_channels_last_inputs():
    x, target = _case("multiclass", True, False)
    for view in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3)):
        t = target if view.shape[2:] == target.shape[1:] else target.transpose(1, 2)
        _compare("bce", "multiclass", view, t, _weights(view, "multiclass"))


def test_a_kept_graph_gives_the_same_gradient_twice():
    """``retain_graph=True``: the first backward must leave the saved slopes as they were."""
    x, target = _case("binary", True, False)
    weights = _weights(x, "binary")
    leaf = x.clone().requires_grad_(True)
    loss = make_loss("bce", "binary", "native", reduction="none")(leaf, target)
    (first,) = torch.autograd.grad((loss * weights).sum(), leaf, retain_graph=True)
    (second,) = torch.autograd.grad((loss * weights).sum(), leaf)
    assert torch.equal(first, second)
    _, want = _run(make_loss("bce", "binary", "reference", reduction="none"), x, target,
                   weights, native=False)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-6)


def test_saved_tensor_hooks_see_the_slopes_unchanged():
    x, target = _case("binary", True, False)
    kept = []
    leaf = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        loss = make_loss("focal", "binary", "native", reduction="none")(leaf, target)
    assert NODE in graph_nodes(loss)
    before = [t.clone() for t in kept]
    (loss * _weights(x, "binary")).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(kept, before, strict=True))


@pytest.mark.parametrize("mode", MODES)
def test_second_order_is_the_references(mode):
    """A recorded backward (``create_graph=True``) goes through the reference maths."""
    x, target = _case(mode, True, False)
    assert_second_order_is_the_references("native", mode, x, target, _weights(x, mode))


def test_no_gradient_wanted():
    x, target = _case("binary", True, False)
    with torch.no_grad():
        loss = dynloss.BCELoss(reduction="none", backend="native")(x, target)
    want = dynloss.BCELoss(reduction="none", backend="reference")(x, target)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["bce", "focal", "topk"])
def test_auto_picks_native_for_bce_focal_and_topk(name, dtype):
    """TopK's per-element losses (0 outside the selection) too: they ran on the torch
    backend."""
    x = torch.zeros(2, 1, 8, 8, dtype=dtype)
    need = Need("distribution", "binary", topk=name == "topk", reduction_none=True)
    assert select("auto", x, need).name == "native"
    assert select("native", x, need).name == "native"


@pytest.mark.parametrize("mode", MODES)
def test_topk_elements_are_zero_outside_the_selection_as_the_references(mode):
    """The selected elements keep their loss, the others (ignored ones too) are 0, and
    exactly n = topk_count(k, kept) are selected (ties by lowest flat index): a constant
    input, every loss equal, selects the first n kept elements."""
    x, target = _case(mode, True, True)
    x = torch.full_like(x, 0.25)
    target = target.clone()
    if mode != "multiclass":
        target[target != 255] = 1.0
    else:
        target[target != 255] = 2
    weights = _weights(x, mode)
    loss, _ = _compare("topk", mode, x, target, weights, k=0.3, ignore_index=255)
    kept = (target != 255).reshape(-1)
    n = topk_count(0.3, int(kept.sum()))
    first = torch.zeros_like(kept)
    first[kept.nonzero().squeeze(1)[:n]] = True  # the first n kept elements in flat order
    assert torch.equal(loss.reshape(-1) != 0, first)


def test_topk_elements_in_float64_and_16_bit():
    x, target = _case("multilabel", True, True)
    for dtype in (torch.float64, torch.bfloat16):
        xs = x.to(dtype)
        _, grad = _compare("topk", "multilabel", xs, target, _weights(xs, "multilabel"),
                              k=0.4, ignore_index=255)
        assert grad.dtype == dtype


def test_the_losses_keep_float32_under_a_float64_default_dtype():
    """The NaN marks of invalid elements were formed in torch's default dtype: with float64
    as the default, a batch holding a NaN came back float64 (float32 without one). Found by
    a review."""
    x, target = _case("binary", True, False)
    x[0, 0, 0, 0] = math.nan
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for backend in ("native", "reference"):
            loss = make_loss("bce", "binary", backend, reduction="none")(x, target)
            assert loss.dtype == torch.float32, backend
            assert torch.isnan(loss).sum().item() == 1
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_elements_rank_a_pixel_with_a_nan_logit_in_another_class_as_nan(dtype):
    """Multiclass: a NaN logit in a class other than the target makes the pixel's loss NaN,
    which TopK ranks above every loss. The kernels' max over the classes passed over the NaN
    and ranked a finite loss instead, so another pixel took its place (the NaN was marked
    afterwards: the values differed from the reference's in which pixels were 0). Found by a
    review."""
    x, target = _case("multiclass", True, False)
    x = x.to(dtype)
    x[0, 1, 0, ::3] = math.nan
    x[1, 3, 2, 1:4] = math.nan
    target[0, 0, ::3] = 0  # the NaN in another class than the target
    target[1, 2, 1:4] = 2
    loss, _ = _compare("topk", "multiclass", x, target, _weights(x, "multiclass"), k=0.2,
                       check_values=False)
    assert torch.isnan(loss).sum().item() == len(range(0, 7, 3)) + 3
