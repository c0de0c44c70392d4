"""Float64 inputs on the native CPU kernels: computed in double, the reference's answer.

The kernels are instantiated for float and double; a float64 input is read as it is (no
float32 copy), every saved buffer and the gradient are float64, and the exponential, the
logarithms and ``1 - e^-b`` are double-precision polynomials (< 2 ulp). Each case here runs
the loss with ``backend="native"``, records that the kernels' entry points were called, and
compares the value and the input gradient with the float64 reference to 1e-12, where float32
arithmetic would be 1e-7 off.
TopK's radix select keys the double losses by their 64-bit patterns.
"""

from __future__ import annotations

import math

import pytest
import torch

import dynloss
from dynloss.kernels.native.buffer_pool import BufferPool
from dynloss.kernels.native.ffi import recorded_calls

from ._backends import FUSED, MODES, make_loss, seeded_case

pytestmark = pytest.mark.skipif("native" not in FUSED, reason="native kernels not built")

RTOL = 1e-12


def _run(loss: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
         upstream: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.clone().requires_grad_(True)
    value = loss(leaf, target)
    weights = torch.ones_like(value) if upstream is None else upstream
    (grad,) = torch.autograd.grad((value * weights).sum(), leaf)
    return value.detach(), grad


def _assert_native_is_the_reference(name: str, mode: str, x: torch.Tensor,
                                    target: torch.Tensor, **kwargs: object) -> None:
    """``name`` computed by the native kernels, forward and backward (their entry points
    called; ``reduction="none"``'s backward multiplies the saved slopes in torch), gives the
    float64 reference's value and gradient to :data:`RTOL`."""
    with recorded_calls() as calls:
        value, grad = _run(make_loss(name, mode, "native", **kwargs), x, target)
    assert any(call.endswith("_forward") for call in calls), calls
    if kwargs.get("reduction") != "none":
        assert any(call.endswith("_backward") for call in calls), calls
    want, want_grad = _run(make_loss(name, mode, "reference", **kwargs), x, target)
    assert value.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(value, want, rtol=RTOL, atol=1e-15)
    scale = float(want_grad.abs().max())
    torch.testing.assert_close(grad, want_grad, rtol=RTOL, atol=RTOL * scale + 1e-300)


OPTIONS = {
    "plain": {},
    "ignore": {"ignore_index": 255},
    "probabilities": {"from_logits": False},
    "sum": {"reduction": "sum"},
}
REGION_OPTIONS = {"per-image": {"per_image": True},
                  "tversky-weights": {"alpha": 0.7, "beta": 0.3}}
DISTRIBUTION_OPTIONS = {"gamma-1.5": {"gamma": 1.5}, "alpha": {"alpha": 0.25},
                        "none": {"reduction": "none"}}


def _case(mode: str, option: str, soft: bool = False, seed: int = 1
          ) -> tuple[torch.Tensor, torch.Tensor]:
    x, target = seeded_case(mode, (2, 9, 11), seed=seed, dtype=torch.float64, scale=4.0,
                            soft=soft)
    if option == "probabilities":
        x = x.softmax(1) if mode == "multiclass" else x.sigmoid()
    if option == "ignore":
        target = target.clone()
        if mode == "multiclass":
            target[0, 2, :4] = 255
        else:
            target[0, :, 2, :4] = 255.0
    return x, target


REGION_CASES = [(name, option) for name in ("dice", "iou", "tversky")
                for option in (*OPTIONS, *REGION_OPTIONS)
                if option != "tversky-weights" or name == "tversky"]
DISTRIBUTION_CASES = [
    (name, option) for name in ("bce", "focal", "composite")
    for option in (*OPTIONS, *DISTRIBUTION_OPTIONS)
    # a composite's terms share only the first three; gamma and alpha are focal's
    if (name != "composite" or option in ("plain", "ignore", "probabilities"))
    and (name != "bce" or option not in ("gamma-1.5", "alpha"))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "option"), REGION_CASES)
def test_region_losses_in_float64_are_the_references(name, mode, option):
    kwargs = dict(OPTIONS.get(option, REGION_OPTIONS.get(option, {})))
    x, target = _case(mode, option)
    _assert_native_is_the_reference(name, mode, x, target, **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "option"), DISTRIBUTION_CASES)
def test_distribution_losses_and_composites_in_float64_are_the_references(name, mode, option):
    kwargs = dict(OPTIONS.get(option, DISTRIBUTION_OPTIONS.get(option, {})))
    if option == "alpha" and mode == "multiclass":
        kwargs = {"alpha": (0.2, 0.3, 0.5)}  # one weight per class
    x, target = _case(mode, option)
    _assert_native_is_the_reference(name, mode, x, target, **kwargs)


@pytest.mark.parametrize("mode", ["binary", "multilabel"])
@pytest.mark.parametrize("name", ["dice", "bce", "focal", "composite"])
def test_soft_labels_in_float64_are_the_references(name, mode):
    x, target = _case(mode, "plain", soft=True)
    _assert_native_is_the_reference(name, mode, x, target)


@pytest.mark.parametrize(("mode", "pos_weight"), [
    ("binary", 3.0), ("multilabel", 3.0), ("multilabel", (0.5, 2.0, 4.0))])
def test_bce_pos_weight_in_float64_is_the_references(mode, pos_weight):
    x, target = _case(mode, "plain")
    _assert_native_is_the_reference("bce", mode, x, target, pos_weight=pos_weight)


def test_multiclass_class_weights_of_bce_in_float64_are_the_references():
    """``BCELoss(mode="multiclass", weight=...)``: the mean divided by the kept pixels' class
    weights (CrossEntropyLoss's), in double."""
    x, target = _case("multiclass", "ignore")
    _assert_native_is_the_reference("bce", "multiclass", x, target, ignore_index=255,
                                    weight=(0.5, 1.0, 3.0))


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
def test_binary_targets_of_any_dtype_with_float64_input(target_dtype):
    x, target = _case("binary", "plain")
    for name in ("dice", "bce"):
        _assert_native_is_the_reference(name, "binary", x, target.to(target_dtype))


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int32, torch.int64])
def test_class_indices_of_any_dtype_with_float64_input(target_dtype):
    x, target = _case("multiclass", "plain")
    for name in ("dice", "focal"):
        _assert_native_is_the_reference(name, "multiclass", x, target.to(target_dtype))


@pytest.mark.parametrize("name", ["dice", "bce", "focal"])
def test_float64_extremes_of_the_logits(name):
    """Logits far beyond float32's range and at float64's edges: the sigmoid, its slope and
    softplus in double, as the reference's (a float32 copy would turn 1e300 into inf)."""
    values = [-1e300, -800.0, -745.0, -709.0, -40.0, -1e-300, 0.0, 1e-300, 36.0, 40.0, 709.0,
              745.0, 800.0, 1e300]
    x = torch.tensor(values, dtype=torch.float64).view(1, 1, 2, 7)
    target = torch.tensor([0.0, 1.0] * 7, dtype=torch.float64).view(1, 1, 2, 7)
    _assert_native_is_the_reference(name, "binary", x, target)
    _assert_native_is_the_reference(name, "binary", x, 1 - target)


@pytest.mark.parametrize("name", ["bce", "focal", "dice"])
def test_float64_probabilities_at_the_edges(name):
    """Probabilities whose log is below -100 (clamped, slope 0), subnormal and within an ulp
    of 1: the clamped log and its quotient slope in double."""
    values = [0.0, 5e-324, 1e-310, 1e-50, 1e-44, 3e-10, 0.5, 1 - 1e-15, 1 - 2**-53, 1.0]
    x = torch.tensor(values, dtype=torch.float64).view(1, 1, 10)
    for target in (torch.zeros_like(x), torch.ones_like(x)):
        _assert_native_is_the_reference(name, "binary", x, target, from_logits=False)


def test_a_nan_or_infinite_logit_makes_the_float64_loss_nan_as_the_references():
    x, target = _case("binary", "plain")
    x = x.clone()
    x.view(-1)[3] = math.inf
    x.view(-1)[8] = math.nan
    for name in ("dice", "bce", "focal"):
        with recorded_calls() as calls:
            value, grad = _run(make_loss(name, "binary", "native"), x, target)
        assert calls == ["dynloss_binary_forward"]  # (backward: the reference's NaN pattern)
        want, want_grad = _run(make_loss(name, "binary", "reference"), x, target)
        assert math.isnan(value.item()) and math.isnan(want.item())
        torch.testing.assert_close(grad, want_grad, equal_nan=True)


def test_an_invalid_float64_target_is_refused_as_by_the_reference():
    x, target = _case("binary", "plain")
    target = target.clone()
    target.view(-1)[4] = 1 + 1e-12  # above 1 in float64 (float32 would round it onto 1)
    with pytest.raises(ValueError) as native:
        dynloss.DiceLoss(backend="native")(x, target)
    with pytest.raises(ValueError) as reference:
        dynloss.DiceLoss(backend="reference")(x, target)
    assert str(native.value) == str(reference.value)


def test_gradcheck_of_the_native_float64_kernels():
    """The kernels' own backward (not a recompute through the reference) against finite
    differences: float64 in, float64 out, so ``gradcheck`` applies to them directly."""
    x, target = _case("multilabel", "ignore", seed=4)
    x = x[:, :, :3, :4].contiguous().requires_grad_(True)
    target = target[:, :, :3, :4].contiguous()
    with recorded_calls() as calls:
        for name, kwargs in (("dice", {"ignore_index": 255}),
                             ("focal", {"gamma": 1.5, "ignore_index": 255}),
                             ("composite", {"ignore_index": 255})):
            loss = make_loss(name, "multilabel", "native", **kwargs)
            assert torch.autograd.gradcheck(lambda t, loss=loss: loss(t, target), (x,))
        xm, tm = _case("multiclass", "plain", seed=5)
        xm = xm[:, :, :3, :3].contiguous().requires_grad_(True)
        tm = tm[:, :3, :3].contiguous()
        for name in ("tversky", "bce"):
            loss = make_loss(name, "multiclass", "native")
            assert torch.autograd.gradcheck(lambda t, loss=loss: loss(t, tm), (xm,))
    assert {"dynloss_binary_backward", "dynloss_multiclass_backward"} <= set(calls)


def test_float64_weight_map_gradient_is_the_references():
    """``reduction="none"`` under a weight map: the per-element slopes times the upstream
    gradient, in double."""
    x, target = _case("multiclass", "ignore")
    weights = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64)
    results = []
    for backend in ("native", "reference"):
        loss = dynloss.FocalLoss(mode="multiclass", reduction="none", ignore_index=255,
                                 backend=backend)
        with recorded_calls() as calls:
            results.append(_run(loss, x, target, weights))
        assert calls == (["dynloss_multiclass_forward"] if backend == "native" else [])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=RTOL, atol=1e-15)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=RTOL, atol=1e-15)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("option", ["plain", "ignore", "probabilities", "sum", "none"])
@pytest.mark.parametrize("k", [0.6, 0.05, 1.0])
def test_topk_in_float64_is_the_references(mode, option, k):
    """TopK's selection by a radix select on the double losses' 64-bit patterns (eight digits
    of 7 and 8 bits below 65536 losses): the n largest, the reference's value and gradient
    (``"none"``: each element's loss, 0 outside the selection)."""
    x, target = _case(mode, option)
    kwargs = DISTRIBUTION_OPTIONS["none"] if option == "none" else OPTIONS[option]
    _assert_native_is_the_reference("topk", mode, x, target, k=k, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_topk_in_float64_over_many_losses_is_the_references(mode):
    """Above 65536 losses the select takes four digits (15 and three of 16 bits); ties at the
    threshold (a constant region) are taken by lowest flat index, as the reference takes
    them, and a loss one ulp above the others is always selected."""
    x, target = seeded_case(mode, (2, 120, 300), seed=9, dtype=torch.float64, scale=4.0)
    x = x.clone()
    x[:, :, :60] = 0.5  # a constant region: equal losses where the targets agree
    x[1, 0, 7, 11] = math.nextafter(0.5, 1.0)
    for k in (0.3, 0.9):
        _assert_native_is_the_reference("topk", mode, x, target, k=k)


def test_topk_in_float64_with_a_nan_logit_is_nan_as_the_references():
    x, target = _case("binary", "plain")
    x = x.clone()
    x.view(-1)[5] = math.nan
    with recorded_calls() as calls:
        value, grad = _run(dynloss.TopKLoss(k=0.2, backend="native"), x, target)
    assert calls[:2] == ["dynloss_binary_forward", "dynloss_binary_topk"]
    want, want_grad = _run(dynloss.TopKLoss(k=0.2, backend="reference"), x, target)
    assert math.isnan(value.item()) and math.isnan(want.item())
    torch.testing.assert_close(grad, want_grad, equal_nan=True)


def test_the_buffer_pool_hands_out_buffers_of_the_asked_dtype():
    pool = BufferPool(min_bytes=0)
    wide = pool.empty((4, 8), torch.float64)
    assert wide.dtype == torch.float64 and wide.shape == (4, 8)
    address = wide.data_ptr()
    del wide  # free: the pool may hand it out again, but only as float64
    narrow = pool.empty((4, 8))
    assert narrow.dtype == torch.float32 and narrow.data_ptr() != address
    again = pool.empty((4, 8), torch.float64)
    assert again.dtype == torch.float64 and again.data_ptr() == address
    assert pool.nbytes() == 4 * 8 * 8 + 4 * 8 * 4


@pytest.mark.parametrize("mode", MODES)
def test_float64_over_many_chunks_is_the_references_and_the_same_for_any_thread_count(mode):
    """Rows longer than a chunk (16384 elements), cut into tasks on several threads: the
    reference's answer, and bit for bit the same on one thread as on two."""
    x, target = seeded_case(mode, (2, 96, 200), seed=7, dtype=torch.float64, scale=4.0)
    for name in ("dice", "focal", "composite"):
        _assert_native_is_the_reference(name, mode, x, target)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with recorded_calls() as calls:
                results.append(_run(make_loss("composite", mode, "native"), x, target))
            assert len(calls) == 2, calls  # forward and backward
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(("name", "kwargs"), [
    ("bce", {}), ("focal", {}), ("focal", {"gamma": 2.5}),
    ("focal", {"gamma": 1.2345678901234567})])
def test_float64_per_element_losses_keep_double_precision(name, kwargs):
    """Each element's loss and slope over logits from -740 to 740 (reduction="none", no sum
    to average errors away): within 1e-14 of the reference's (tens of ulp; subnormal results
    to their last bit), where a float polynomial would be 1e-7 off; a check of the double
    exp, log1p and 1 - e^-b, and of the power q^gamma of a focal gamma other than 2 (formed
    from the log's two parts: as e^(gamma log q) of a rounded log it was 500 ulp off where
    |gamma log q| is large; found by a review)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.cat([torch.linspace(-740, 740, 2001, dtype=torch.float64),
                   torch.randn(2000, generator=gen, dtype=torch.float64) * 3]).view(1, 1, -1)
    target = (torch.rand(x.shape, generator=gen) < 0.5).double()
    with recorded_calls() as calls:
        value, grad = _run(make_loss(name, "binary", "native", reduction="none", **kwargs), x,
                           target)
    assert calls == ["dynloss_binary_forward"]
    want, want_grad = _run(make_loss(name, "binary", "reference", reduction="none", **kwargs),
                           x, target)
    # (atol: the last bit of a subnormal result, e^-740's, is a 1 % relative difference)
    torch.testing.assert_close(value, want, rtol=1e-14, atol=1e-320)
    torch.testing.assert_close(grad, want_grad, rtol=1e-14, atol=1e-320)


@pytest.mark.parametrize("layout", ["sliced", "expanded", "transposed"])
@pytest.mark.parametrize("mode", MODES)
def test_float64_targets_in_any_memory_layout(mode, layout):
    """A float64 target (int64 class indices) already of the dtype the kernels read but not
    contiguous (a crop, an ``expand``ed mask, a transposed view) is read as a contiguous copy:
    it was read as if it were one (wrong losses, NaN, a segmentation fault past an expanded
    target's storage). Found by a review."""
    x, target = _case(mode, "plain")
    spatial = target.shape[-2:]
    if layout == "sliced":
        big = torch.cat([target, target.flip(-1)], dim=-1)
        target = big[..., ::2]
    elif layout == "expanded":
        target = target[:1].expand(target.shape)
    else:
        target = target.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not target.is_contiguous() and target.shape[-2:] == spatial
    for name in ("dice", "bce"):
        _assert_native_is_the_reference(name, mode, x, target)


def test_a_large_expanded_float64_target_is_read_within_its_storage():
    """An expanded (1, 1, H, W) target for a large batch: its storage holds one image."""
    x = torch.randn(64, 1, 128, 128, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    target = (torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(4)) < 0.2)
    target = target.double().expand(64, 1, 128, 128)
    _assert_native_is_the_reference("bce", "binary", x, target)


@pytest.mark.parametrize("checked", [True, False])
def test_an_integer_label_that_float64_rounds_onto_a_huge_ignore_index_stays_kept(checked):
    """``ignore_index=2**53 + 1`` with an int64 target holding 2**53: float64 rounds the label
    onto the ignore index, so it was silently ignored where the reference (which compares
    the integers) keeps it and refuses it (or makes the loss NaN unchecked). Found by a
    review."""
    x = torch.tensor([[[0.3, -1.2, 2.0, 0.7]]], dtype=torch.float64)
    target = torch.tensor([[[0, 1, 2**53, 2**53 + 1]]])
    for name in ("dice", "bce"):
        losses = [make_loss(name, "binary", backend, ignore_index=2**53 + 1,
                            check_values=checked) for backend in ("native", "reference")]
        if checked:
            messages = []
            for loss in losses:
                with pytest.raises(ValueError) as error:
                    loss(x, target)
                messages.append(str(error.value))
            assert messages[0] == messages[1]
        else:
            values = [loss(x, target) for loss in losses]
            assert math.isnan(values[0].item()) and math.isnan(values[1].item())


@pytest.mark.parametrize("mode", MODES)
def test_float64_hyperparameters_are_not_narrowed_to_float(mode):
    """Hyper-parameters and upstream gradients that float32 cannot hold (gamma, alpha, class
    weights, pos_weight, Tversky's weights, the composite's weights, a weight map): the
    kernels read them in double (a float copy would be 1e-8 off)."""
    x, target = _case(mode, "ignore")
    odd = 1.2345678901234567
    alpha = (math.pi / 10, 0.3333333333333333, 0.1111111111111111) if mode == "multiclass" \
        else math.pi / 10
    cases = [("focal", {"gamma": odd, "alpha": alpha}),
             ("tversky", {"alpha": 1 / 3, "beta": 2 / 3}),
             ("topk", {"k": 0.3})]
    if mode != "multiclass":
        cases.append(("bce", {"pos_weight": 1.7777777777777777}))
    for name, kwargs in cases:
        _assert_native_is_the_reference(name, mode, x, target, ignore_index=255, **kwargs)
    composite = [dynloss.CompositeLoss(
        [dynloss.DiceLoss(mode=mode, ignore_index=255, backend=backend),
         dynloss.FocalLoss(mode=mode, ignore_index=255, gamma=odd, backend=backend)],
        weights=[odd, 1 / 3]) for backend in ("native", "reference")]
    with recorded_calls() as calls:
        value, grad = _run(composite[0], x, target)
    assert calls, "the composite ran on the native kernels"
    want, want_grad = _run(composite[1], x, target)
    torch.testing.assert_close(value, want, rtol=RTOL, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=RTOL, atol=RTOL * float(want_grad.abs().max()))
    weights = torch.full(x.shape if mode != "multiclass" else (2, 9, 11), odd,
                         dtype=torch.float64)
    results = [_run(make_loss("bce", mode, backend, reduction="none", ignore_index=255), x,
                    target, weights) for backend in ("native", "reference")]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=RTOL, atol=1e-15)
