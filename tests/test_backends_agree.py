"""Every backend computes the reference's loss, in every use (issue #11).

* a soft target that requires a gradient gets the reference's gradient on every
  ``backend=`` (a named backend says once, with a RuntimeWarning, that the reference computes
  such calls; ``"auto"`` says nothing);
* a hypothesis property test over the available backends: NaN/±inf inputs, empty and soft
  targets, ignored pixels, non-contiguous and channels-last inputs, target gradients and (on
  a subset) second-order gradients, against the float64 reference;
* multiclass inputs whose softmax saturates (the target class within ~1e-6 of 1): every
  backend keeps the float64 reference's digits there;
* the gaps a mutation pass found: the log clamp of BCE on probabilities, a Triton row cut in
  several chunks with a partial last one at the default settings, tensors on another device.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import dynloss.functional as F
from dynloss import BCELoss, CompositeLoss, DiceLoss, FocalLoss, TverskyLoss
from dynloss.kernels.dispatch import clear_cache

from ._backends import (
    BACKENDS,
    FUSED,
    LOSS_NAMES,
    MODES,
    REGION_NAMES,
    channels,
    make_loss,
    seeded_case,
)
from ._kernel_cases import (
    NODES,
    assert_elementwise_close,
    graph_nodes,
    run_loss,
    saturated_multiclass,
)

NAMED = ("torch", "native", "triton")


# ---------------------------------------------------------------------------- target gradients
def _with_target_grad(loss_fn, x: torch.Tensor, target: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    target = target.detach().clone().requires_grad_(True)
    loss = loss_fn(x, target)
    loss.backward()
    return loss.detach(), x.grad, target.grad


@pytest.mark.parametrize("ignore", [False, True], ids=["all-kept", "ignore"])
@pytest.mark.parametrize("mode", ["binary", "multilabel"])
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("backend", ["auto", *(b for b in NAMED if b in FUSED)])
def test_soft_target_gets_the_reference_gradient(backend, name, mode, ignore):
    x, target = seeded_case(mode, (2, 3, 4), seed=len(name), soft=True)
    kwargs = {}
    if ignore:
        target[0, 0, 1] = 255.0
        kwargs["ignore_index"] = 255
    want = _with_target_grad(make_loss(name, mode, "reference", **kwargs), x, target)
    assert want[2].abs().sum().item() != 0.0
    if ignore:
        assert (want[2][0, 0, 1] == 0).all()
    clear_cache()  # forget earlier choices and warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _with_target_grad(make_loss(name, mode, backend, **kwargs), x, target)
        second = _with_target_grad(make_loss(name, mode, backend, **kwargs), x, target)
    for got in (first, second):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # the reference computed it
    messages = [str(w.message) for w in caught]
    if backend == "auto":
        assert messages == []
    else:
        assert messages == [f"dynloss: backend={backend!r} cannot compute a gradient for the "
                            "target; using the 'reference' backend for such calls"]
        assert all(w.category is RuntimeWarning for w in caught)


@pytest.mark.parametrize("ignore", [False, True], ids=["all-kept", "ignore"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("backend", ["auto", *FUSED])
def test_a_target_made_in_inference_mode_gets_the_reference_answer(backend, name, mode, ignore):
    """Pseudo-labels made under ``torch.inference_mode`` (``teacher(x).argmax(1)``): the
    reference, which converts the target, trained on them; every fused backend saved the
    caller's target for backward and raised "Inference tensors cannot be saved for backward"
    (found by a review of autograd uses): with ``ignore_index``, a uint8 target, or multiclass
    region losses, also on the default backend."""
    x, target = seeded_case(mode, (2, 3, 4), seed=len(name) + len(mode))
    kwargs = {}
    if ignore:
        target[0, ..., 1] = 255
        kwargs["ignore_index"] = 255
    if mode == "multilabel":  # (binary: float32; multiclass: int64)
        target = target.to(torch.uint8)
    with torch.inference_mode():
        labels = target.clone()
    assert labels.is_inference()
    want_x = x.detach().clone().requires_grad_(True)
    want = make_loss(name, mode, "reference", **kwargs)(want_x, target)
    want.backward()
    got_x = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a named backend's fallback notes)
        got = make_loss(name, mode, backend, **kwargs)(got_x, labels)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_x.grad, want_x.grad, rtol=1e-5, atol=1e-7)


def test_an_input_made_in_inference_mode_with_a_target_that_needs_a_gradient():
    """The other way round (distilling into the target, the input fixed): the reference
    gives the target its gradient; the fused backends must not fail on the saved input."""
    x, target = seeded_case("binary", (2, 3, 4), soft=True)
    with torch.inference_mode():
        frozen = x.clone()
    want_t = target.detach().clone().requires_grad_(True)
    want = DiceLoss(backend="reference")(x, want_t)
    want.backward()
    for backend in ("auto", *FUSED):
        got_t = target.detach().clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = DiceLoss(backend=backend)(frozen, got_t)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_t.grad, want_t.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_target_that_needs_no_gradient_here_keeps_the_kernels(name):
    """Under ``torch.no_grad()`` a target that requires a gradient gets none: the kernels
    compute the call (no warning) and give the reference's value."""
    x, target = seeded_case("binary", (2, 3, 4), seed=3, soft=True)
    target.requires_grad_(True)
    want = make_loss(name, "binary", "reference")(x, target)
    clear_cache()
    for backend in FUSED:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback would say so: the kernels ran
            with torch.no_grad():
                got = make_loss(name, "binary", backend)(x, target)
        torch.testing.assert_close(got, want.detach(), rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------------------- property test
LAYOUTS = ("contiguous", "channels_last", "transposed", "strided", "negated")


def _as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (4-D), stored another way."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # H and W swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "negated":  # contiguous, the memory holding -t and the negative bit set
        return torch._neg_view(-t)
    return t


@st.composite
def property_cases(draw, mode: str, name: str):
    """One case of loss ``name`` in ``mode`` (each pair is a test of its own: drawn from one
    strategy, the derandomized CI draws left some pairs out and compared Focal on no finite,
    non-empty input). Mostly non-empty and finite: an empty input or a non-finite value is
    one case in six, resp. three in seven."""
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    empty = draw(st.sampled_from([None] * 10 + ["samples", "height"]))
    n, h = (0 if empty == "samples" else n), (0 if empty == "height" else h)
    case = {
        "mode": mode, "name": name, "shape": (n, h, w),
        "seed": draw(st.integers(0, 2**16)),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "soft": mode != "multiclass" and draw(st.booleans()),
        "ignore": draw(st.booleans()),
        "from_logits": draw(st.booleans()),
        "bad": draw(st.sampled_from([None] * 4 + ["nan", "+inf", "-inf"])),
        "bad_ignored": draw(st.booleans()),
        "classes": draw(st.integers(2, 4)),
    }
    case["target_grad"] = case["soft"] and draw(st.booleans())
    kwargs = {}
    if name in REGION_NAMES:
        kwargs["per_image"] = draw(st.booleans())
        kwargs["smooth"] = draw(st.sampled_from([0.0, 1.0]))
    if name == "focal":
        kwargs["gamma"] = draw(st.sampled_from([0.5, 2.0, 3.0]))
    if name == "topk":
        kwargs["k"] = draw(st.sampled_from([0.1, 0.5, 1.0]))
    if name != "composite":
        kwargs["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    case["kwargs"] = kwargs
    return case


def _build(case):
    mode = case["mode"]
    x, target = seeded_case(mode, case["shape"], seed=case["seed"], classes=case["classes"],
                            soft=case["soft"], dtype=torch.float64, scale=3.0)
    kwargs = dict(case["kwargs"], from_logits=case["from_logits"])
    n, h, w = case["shape"]
    if case["ignore"]:
        kwargs["ignore_index"] = 255
        if n * h * w:
            keep = torch.rand((n, h, w), generator=torch.Generator().manual_seed(case["seed"]))
            keep = keep > 0.3
            keep.view(-1)[0] = False
            target = (target.masked_fill(~keep, 255) if mode == "multiclass"
                      else target.masked_fill(~keep.unsqueeze(1), 255.0))
    if not case["from_logits"]:
        x = x.softmax(1) if mode == "multiclass" else x.sigmoid()
    # the float64 reference sees the float32 input's values exactly (else 1 - p of a p near 1
    # differs by the rounding of p alone)
    x = x.float().double()
    if target.is_floating_point():
        target = target.float().double()
    if case["bad"] is not None and n * h * w:
        value = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}[case["bad"]]
        at = (0, 0, 0, 0) if case["ignore"] and case["bad_ignored"] else (-1, 0, -1, -1)
        x[at] = value  # the first pixel is ignored, the last one may be
    return x, target, kwargs


def _run(name, mode, backend, kwargs, x, target, layout, target_grad, dtype):
    x = _as_layout(x.detach().to(dtype, copy=True), layout).requires_grad_(True)
    if target.is_floating_point():
        target = _as_layout(target.detach().to(dtype, copy=True), layout)
        target.requires_grad_(target_grad)
    loss = make_loss(name, mode, backend, **kwargs)(x, target)
    nodes = graph_nodes(loss)
    # An upstream gradient that is not 1 (a weighted or accumulated loss): each backend's
    # backward must scale by it (its sign and, for ``reduction="none"``, each element's).
    upstream = torch.linspace(-1.5, 2.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * upstream).sum().backward()
    t_grad = target.grad if target_grad else None
    return loss.detach(), x.grad, t_grad, nodes


def _fused_computes(case) -> bool:
    """Whether every fused backend computes ``case`` itself: a call that needs no gradient
    for the target, a reduced distribution loss (``reduction="none"`` is the reference's), a
    non-empty input. Independent of what the backends declare, so that a capability dropped
    by mistake (the call then quietly computed by another backend) fails here."""
    n, h, w = case["shape"]
    elementwise = (case["name"] in ("focal", "bce", "topk")
                   and case["kwargs"].get("reduction") == "none")
    return not case["target_grad"] and not elementwise and n * h * w > 0


def _close(got, want, what):
    scale = want[torch.isfinite(want)].abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5 * scale + 1e-6,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
@settings(max_examples=8)
@given(data=st.data())
def test_property_every_backend_equals_the_reference(name, mode, data):
    case = data.draw(property_cases(mode, name), label="case")
    x, target, kwargs = _build(case)
    event(f"{'empty' if x.numel() == 0 else 'non-empty'}, bad={case['bad']}, "
          f"ignore={case['ignore']}")
    try:
        want = _run(name, mode, "reference", kwargs, x, target, "contiguous",
                    case["target_grad"], torch.float64)
    except ValueError as error:  # a probability outside [0, 1] on the CPU: checked eagerly
        assert not case["from_logits"] and case["bad"] is not None
        for backend in FUSED:
            with pytest.raises(ValueError, match="input must hold probabilities in"):
                _run(name, mode, backend, kwargs, x, target, case["layout"], False,
                     torch.float32)
        assert "from_logits=False" in str(error)
        return
    for backend in FUSED:
        got = _run(name, mode, backend, kwargs, x, target, case["layout"],
                   case["target_grad"], torch.float32)
        assert got[0].shape == want[0].shape and got[0].dtype == torch.float32, backend
        if _fused_computes(case):
            assert got[3] & set(NODES[backend]), (backend, got[3])
        assert torch.equal(torch.isnan(got[0]), torch.isnan(want[0])), backend
        if torch.isfinite(want[0]).all():
            _close(got[0], want[0], f"{backend} loss")
            _close(got[1], want[1], f"{backend} input gradient")
            if case["target_grad"]:
                _close(got[2], want[2], f"{backend} target gradient")
        else:  # NaN: the gradient says so too
            assert torch.isnan(got[1]).any() == torch.isnan(want[1]).any(), backend


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
@settings(max_examples=3)
@given(data=st.data())
def test_property_second_order_equals_the_reference(name, mode, data):
    case = data.draw(property_cases(mode, name), label="case")
    case = dict(case, bad=None)  # finite inputs: the second-order terms are compared
    x, target, kwargs = _build(case)
    if not case["from_logits"]:  # probabilities away from 0 and 1 (the log clamp)
        x = x * 0.9 + 0.05 if mode != "multiclass" else x * 0.9 + 0.1 / x.shape[1]
    results = []
    for backend, dtype in (("reference", torch.float64), *((b, torch.float32) for b in FUSED)):
        xb = _as_layout(x.detach().to(dtype, copy=True),
                        case["layout"] if backend != "reference" else "contiguous")
        xb.requires_grad_(True)
        t = target.to(dtype) if target.is_floating_point() else target
        loss = make_loss(name, mode, backend, **kwargs)(xb, t)
        (g,) = torch.autograd.grad(loss.sum(), xb, create_graph=True)
        v = torch.linspace(-1.0, 1.0, xb.numel(), dtype=dtype).view_as(xb)
        if not g.requires_grad:  # an empty input: nothing depends on it
            assert xb.numel() == 0
            results.append((g, torch.zeros_like(xb)))
            continue
        (hvp,) = torch.autograd.grad((g * v).sum(), xb, allow_unused=True)
        results.append((g.detach(), torch.zeros_like(xb) if hvp is None else hvp))
    (want_g, want_hvp), *others = results
    for backend, (g, hvp) in zip(FUSED, others, strict=True):
        _close(g, want_g, f"{backend} gradient")
        _close(hvp, want_hvp, f"{backend} Hessian-vector product")


# -------------------------------------------------------------------- gaps a mutation pass found
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bce_of_probabilities_clamps_the_log_at_minus_100_in_float64(backend):
    """p = 1e-50 is representable in float64 and log(p) = -115.1: the loss is exactly the
    clamp, 100, with no gradient; p = 1e-40 (log -92.1) is below the clamp."""
    p = torch.tensor([[[1e-50, 1e-40]]], dtype=torch.float64, requires_grad=True)
    loss = F.bce_loss(p, torch.ones(1, 1, 2, dtype=torch.float64), from_logits=False,
                      reduction="none", backend="reference" if backend == "reference"
                      else "auto")
    assert loss[0, 0, 0].item() == 100.0
    assert loss[0, 0, 1].item() == pytest.approx(40 * math.log(10), rel=1e-15)
    mean = F.bce_loss(p[..., :1], torch.ones(1, 1, 1, dtype=torch.float64), from_logits=False,
                      backend=backend)
    assert mean.dtype == torch.float64 and mean.item() == 100.0
    (grad,) = torch.autograd.grad(mean, p)
    assert grad.tolist() == [[[0.0, 0.0]]]
    # the same at 1 - p for a negative target: 1 - 1e-50 rounds to 1, log(0) is clamped
    q = torch.tensor([[[1.0]]], dtype=torch.float64)
    zero = torch.zeros(1, 1, 1, dtype=torch.float64)
    assert F.bce_loss(q, zero, from_logits=False, backend=backend).item() == 100.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bce_of_probabilities_at_zero_and_subnormal_is_exactly_100_in_float32(backend):
    p = torch.tensor([[[0.0, 1e-44, 1.0, 0.5]]], requires_grad=True)
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    loss = F.bce_loss(p[..., :3], target[..., :3], from_logits=False, backend=backend)
    assert loss.item() == 100.0
    (grad,) = torch.autograd.grad(loss, p)
    assert grad.tolist() == [[[0.0, 0.0, 0.0, 0.0]]]


# Probabilities below ~2.9e-39 are subnormal in float32 (torch.sigmoid gives them for logits
# below ~-88.7) and 1/p overflows there. Autograd divides the upstream gradient by p last, so a
# term whose weight is 0 (the target's other class, an alpha of 0, a CompositeLoss weight of 0)
# contributes 0, and a mean's 1/N can bring -1/p back into range; a backend that forms
# weight * (1/p) gets 0 * inf = NaN, or inf.
_SUBNORMAL = 1e-40


def _subnormal_case(name: str):
    """``(loss factory, p, target)``: float32 probabilities with subnormal entries whose exact
    gradient is finite (the subnormal's term has weight 0, or the mean scales it into range)."""
    p = torch.tensor([[[_SUBNORMAL, 0.5, 3e-39, 0.25]]])
    binary = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])
    if name == "bce":
        return lambda b: BCELoss(from_logits=False, reduction="sum", backend=b), p, binary
    if name == "focal":
        return (lambda b: FocalLoss(gamma=2.0, alpha=0.25, from_logits=False, reduction="sum",
                                    backend=b), p, binary)
    if name == "focal-alpha-0":  # a positive of weight alpha = 0 at a subnormal probability
        target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
        return (lambda b: FocalLoss(gamma=0.5, alpha=0.0, from_logits=False, reduction="sum",
                                    backend=b), p, target)
    if name == "multiclass-alpha-0":  # class 0 weighs 0 and its probability is subnormal
        probs = torch.tensor([[[_SUBNORMAL, 0.5], [0.5, 0.25], [0.5, 0.25]]])
        return (lambda b: FocalLoss(gamma=2.0, alpha=[0.0, 1.0, 1.0], mode="multiclass",
                                    from_logits=False, reduction="sum", backend=b),
                probs, torch.tensor([[0, 1]]))
    if name == "mean-positive":  # -1/(64 p) = -7.8e36: in range, though -1/p is not
        p = torch.full((1, 1, 64), 0.5)
        p[0, 0, 0] = 2e-39
        return lambda b: BCELoss(from_logits=False, backend=b), p, torch.ones(1, 1, 64)
    assert name == "composite-weight-0"  # the BCE term weighs 0: a positive at p = 1e-40
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    return (lambda b: CompositeLoss([DiceLoss(from_logits=False, backend=b),
                                     BCELoss(from_logits=False, backend=b)], weights=[1.0, 0.0]),
            p, target)


@pytest.mark.parametrize("name", ["bce", "focal", "focal-alpha-0", "multiclass-alpha-0",
                                  "mean-positive", "composite-weight-0"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gradient_at_a_subnormal_probability_is_formed_as_autograd_forms_it(backend, name):
    factory, p, target = _subnormal_case(name)
    want_x = p.double().requires_grad_()
    want = factory("reference")(want_x, target.double() if target.is_floating_point()
                                else target)
    (want_grad,) = torch.autograd.grad(want, want_x)
    assert torch.isfinite(want_grad).all()
    x = p.clone().requires_grad_()
    loss = factory(backend)(x, target)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all(), grad
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bce", "dice", "composite"])
@pytest.mark.parametrize("ignore_index", [256, 257, -1, 2**40])
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_an_ignore_index_the_target_dtype_cannot_hold_ignores_nothing(backend, ignore_index,
                                                                     name):
    """torch compares a uint8 tensor with 257 as with 1 (the value wraps): the reference and
    torch backends dropped every positive pixel, the native kernels none."""
    x = torch.tensor([[[2.0, -3.0, 1.0, 0.5]]])
    target = torch.tensor([[[1, 0, 1, 0]]], dtype=torch.uint8)
    want = make_loss(name, "binary", "reference")(x, target.float())
    got = make_loss(name, "binary", backend, ignore_index=ignore_index)(x, target)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_a_class_index_that_an_unholdable_ignore_index_would_wrap_to_is_out_of_range(backend):
    """uint8 255 is not -1: a class index out of range (it crashed in gather, or was NaN)."""
    x = torch.zeros(1, 3, 2)
    target = torch.tensor([[0, 255]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"target class indices must lie in \[0, 3\)"):
        make_loss("bce", "multiclass", backend, ignore_index=-1)(x, target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float16_target_is_ignored_only_where_it_equals_the_index(backend):
    x = torch.tensor([[[2.0, -3.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0, 2048.0]]], dtype=torch.float16)
    kept = make_loss("bce", "binary", backend, ignore_index=2048)(x, target)
    torch.testing.assert_close(kept, make_loss("bce", "binary", "reference")(
        x[..., :2], target[..., :2].float()))
    with pytest.raises(ValueError, match="target"):  # 2049 is not 2048: a target out of range
        make_loss("bce", "binary", backend, ignore_index=2049)(x, target)


triton_only = pytest.mark.skipif("triton" not in FUSED, reason="Triton cannot run here")


@triton_only
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mode", MODES)
def test_triton_rows_in_several_chunks_with_a_partial_last_one(mode):
    """At the default settings a row of 1500 pixels is cut in two chunks of 1024, the second
    holding 476 (nothing forced: no monkeypatched block or program count)."""
    from dynloss.kernels.triton import stream, topk

    c = channels(mode)
    block = stream.BLOCK_BINARY if mode != "multiclass" else stream.multiclass_block(c)[1]
    assert stream.split_rows(c, 1500, block) == (2, 1024)
    x, target = seeded_case(mode, (1, 1500), seed=21)
    if mode == "multiclass":
        target[0, -3:] = 255  # ignored pixels in the partial chunk
    else:
        target[0, :, -3:] = 255.0
    for name, kwargs in (("dice", {}), ("tversky", {"per_image": True}), ("bce", {}),
                         ("focal", {"gamma": 2.0}), ("composite", {})):
        for ignore in (None, 255):
            kwargs = dict(kwargs, ignore_index=ignore)
            t = target if ignore is not None else target.masked_fill(target == 255, 0)
            want = _run(name, mode, "reference", kwargs, x, t, "contiguous", False,
                        torch.float64)
            got = _run(name, mode, "triton", kwargs, x, t, "contiguous", False, torch.float32)
            _close(got[0], want[0], f"{name} loss")
            _close(got[1], want[1], f"{name} gradient")
    # TopK: 5000 pixels are programs of 2048 elements (multiclass: 1024 pixels), the last
    # one partial
    x, target = seeded_case(mode, (1, 5000), seed=22)
    programs = {"binary": 3, "multilabel": 8, "multiclass": 5}[mode]
    total, _, block, got_programs, chunk = topk.topk_geometry(1, c, 5000, mode == "multiclass")
    assert (got_programs, chunk) == (programs, block) and total % block != 0
    want = _run("topk", mode, "reference", {"k": 0.3}, x, target, "contiguous", False,
                torch.float64)
    got = _run("topk", mode, "triton", {"k": 0.3}, x, target, "contiguous", False,
               torch.float32)
    _close(got[0], want[0], "topk loss")
    _close(got[1], want[1], "topk gradient")


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_a_target_on_another_device_is_a_value_error(backend):
    x = torch.zeros(2, 1, 3)
    meta = torch.zeros(2, 1, 3, device="meta")
    message = r"input and target must be on the same device; got cpu and meta"
    for name in LOSS_NAMES:
        with pytest.raises(ValueError, match=message):
            make_loss(name, "binary", backend)(x, meta)
        with pytest.raises(ValueError, match=r"same device; got meta and cpu"):
            make_loss(name, "binary", backend)(meta, x)


@pytest.mark.skipif("native" not in FUSED, reason="the native kernels are not built")
def test_the_native_ffi_refuses_tensors_off_the_cpu():
    from dynloss.kernels.native.ffi import native_forward

    cpu, meta = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4, device="meta")
    for x, t, where in ((meta, meta, "meta and target on meta"),
                        (cpu, meta, "cpu and target on meta"),
                        (meta, cpu, "meta and target on cpu")):
        with pytest.raises(ValueError, match=f"the native kernels need CPU tensors; got input "
                                             f"on {where}"):
            native_forward(x, t, "binary", True, None, 0.0, None, True, False, True, False)
    for backend in ("native", "triton"):  # named kernels on a meta tensor: why they cannot run
        with pytest.raises(ValueError, match=rf"backend='{backend}' cannot run: it needs a "
                                             r"(CPU|CUDA) tensor; got a tensor on meta"):
            F.dice_loss(meta, meta, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_meta_tensors_give_a_meta_loss(backend):
    meta = torch.zeros(2, 1, 3, device="meta")
    loss = F.dice_loss(meta, meta, backend=backend)
    assert loss.device.type == "meta" and loss.shape == ()


# ------------------------------------------------------------------- saturated softmax (issue #11)
_SATURATED = [(backend, name) for backend in FUSED
              for name in ("bce", "focal", "topk", "dice", "tversky", "composite")]
# the reference keeps them through autograd too (its cross-entropy's form, its softmax's
# backward: _math.pixel_cross_entropy, _math.softmax_backward)
_SATURATED += [("reference", name)
               for name in ("bce", "focal", "topk", "dice", "tversky", "composite")]


@pytest.mark.parametrize("target", ["top", "other", "tie"])
@pytest.mark.parametrize(("backend", "name"), _SATURATED)
def test_saturated_softmax_keeps_its_digits(backend, name, target):
    """Where the softmax of the target class is within ~1e-6 of 1 (the pixels a trained
    network gets right), every gradient element and the cross-entropy's value keep float32's
    relative precision against the float64 reference: ``1 - p_t`` and ``logsumexp - x_t`` are
    formed from the other classes (``log1p`` of their sum), and the softmax Jacobian at the
    most probable class from the differences to the others; as differences of nearly equal
    float32 numbers they lost up to all their digits here (the cross-entropy 1.5 % of its
    value, single gradient elements 20 %). A region loss's value ``1 - T`` comes from float32
    sums of the probabilities: it is exact to float32's absolute precision (in every backend),
    not relative to its own size (~1e-5 here). The same where the network is confidently
    wrong (``target="other"``: the top class's Jacobian) and where two classes tie exactly
    for the max (``"tie"``: each backend's test for the most probable class must not take
    both, nor neither)."""
    kwargs = {"k": 0.5} if name == "topk" else {}
    x, t = saturated_multiclass(target=target)
    _assert_keeps_its_digits(name, "multiclass", backend, x, t, kwargs)


def _assert_keeps_its_digits(name, mode, backend, x, t, kwargs):
    """``backend``'s float32 loss and gradient against the float64 reference: every gradient
    element to 1e-4 of itself; a region loss's value to float32's absolute precision (it comes
    from float32 sums), a cross-entropy's to 1e-5 of itself."""
    def run(b, xs):
        loss = make_loss(name, mode, b, **kwargs)
        target = t.to(xs.dtype) if t.is_floating_point() else t
        return run_loss(lambda a, c, backend: loss(a, c), xs, target, b)

    want, want_grad = run("reference", x.double())
    got, got_grad = run(backend, x)
    if name in ("dice", "tversky"):
        torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)
    elif name == "composite":  # a region term plus a cross-entropy of ~20 here: to float32's
        # absolute precision and one ulp of the total (float32 sums of the cross-entropy)
        torch.testing.assert_close(got, want.float(), rtol=2.0**-23, atol=1e-6)
    else:
        assert_elementwise_close(got, want, rtol=1e-5)
    assert_elementwise_close(got_grad, want_grad, rtol=1e-4)


def saturated_binary(mode: str, *, target: str, seed: int = 0):
    """Logits ``(2, C, 32)`` of magnitude 12-30, where ``p`` is within float32's rounding of 1
    (or of 0) and ``1 - p`` as a float32 difference loses its digits (all of them from ~17);
    the target agrees with the sign (``"agree"``: a trained network) or not (``"disagree"``)."""
    gen = torch.Generator().manual_seed(seed)
    c = 1 if mode == "binary" else 3
    size = torch.rand((2, c, 32), generator=gen) * 18 + 12
    sign = torch.where(torch.rand((2, c, 32), generator=gen) > 0.5, 1.0, -1.0)
    x = size * sign
    positive = (sign > 0).float()
    return x, positive if target == "agree" else 1 - positive


@pytest.mark.parametrize("target", ["agree", "disagree"])
@pytest.mark.parametrize("mode", ["binary", "multilabel"])
@pytest.mark.parametrize(("backend", "name"), _SATURATED)
def test_saturated_sigmoid_keeps_its_digits(backend, name, mode, target):
    """Where the sigmoid saturates, ``1 - p`` is ``sigmoid(-x)``, not a float32 difference:
    the cross-entropy's slope ``p - g`` and the sigmoid's derivative ``p (1 - p)`` were formed
    as differences (torch backend, Triton, the native BCE/Focal/TopK, the reference's region
    losses through autograd's sigmoid backward): about 1 % off at |x| = 12, exactly 0 from
    ~17 on, against the float64 reference."""
    kwargs = {"k": 0.5} if name == "topk" else {}
    x, t = saturated_binary(mode, target=target)
    _assert_keeps_its_digits(name, mode, backend, x, t, kwargs)


# float64 targets whose float32 rounding would change the answer to "in [0, 1]?" or "ignored?"
WIDE_TARGETS = [
    # (values, ignore_index, valid): 1 + 1e-9 and -1e-50 lie outside [0, 1]; float32 rounds them
    # onto 1 and -0
    ([1 + 1e-9, 0.0, 1.0, 0.0], None, False),
    ([-1e-50, 0.0, 1.0, 0.0], None, False),
    # 16777216 is not ignore_index 16777217 (which float32 rounds onto it): kept, invalid
    ([16777216.0, 0.0, 1.0, 16777217.0], 16777217, False),
    # 1 - 1e-12 is not ignore_index 1: kept (float32 rounds it onto 1)
    ([1 - 1e-12, 0.0, 1.0, 0.25], 1, True),
    ([1e-50, 0.0, 1.0, 0.25], 0, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["dice", "bce", "composite"])
@pytest.mark.parametrize("values, ignore_index, valid", WIDE_TARGETS)
def test_a_float64_target_is_judged_by_its_own_values(backend, name, values, ignore_index,
                                                      valid):
    """The native and Triton kernels read a float64 target as float32: 1 + 1e-9 passed the
    [0, 1] check (and gave a number where the reference gives NaN unchecked), and a value
    next to ignore_index was ignored. Found by a dtype review."""
    logits = torch.tensor([0.5, -1.0, 2.0, 0.25]).view(1, 1, 2, 2)
    target = torch.tensor(values, dtype=torch.float64).view(1, 1, 2, 2)
    kw = {} if ignore_index is None else {"ignore_index": ignore_index}
    for check_values in (True, False):
        loss = make_loss(name, "binary", backend, check_values=check_values, **kw)
        want = make_loss(name, "binary", "reference", check_values=check_values, **kw)
        if check_values and not valid:
            with pytest.raises(ValueError, match=r"target values must lie in \[0, 1\]"):
                loss(logits, target)
            continue
        got, expected = loss(logits, target), want(logits, target)
        torch.testing.assert_close(got, expected.to(got.dtype), equal_nan=True)
        assert math.isnan(got.item()) != valid


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha, beta", [(0.9, 0.9), (0.3, 0.7), (2.0, 0.5)])
@pytest.mark.parametrize("mode", ["binary", "multilabel"])
def test_a_perfect_prediction_scores_exactly_zero_for_any_weights(backend, alpha, beta, mode):
    """The Triton epilogue formed the denominator as (1 - a - b) I + a P + b G: for a + b > 1 a
    perfect prediction scored -2.4e-7 instead of 0 (the shared maths forms I + a (P - I) +
    b (G - I), exact there). Found by a review of the Triton kernels."""
    c = 1 if mode == "binary" else 3
    target = (torch.arange(2 * c * 9).view(2, c, 3, 3) % 3 != 0).float()
    loss = TverskyLoss(alpha=alpha, beta=beta, mode=mode, from_logits=False, backend=backend)
    assert loss(target.clone(), target).item() == 0.0
    per_image = TverskyLoss(alpha=alpha, beta=beta, mode=mode, from_logits=False,
                            per_image=True, backend=backend)
    assert per_image(target.clone(), target).item() == 0.0


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_torch_backend_keeps_no_probabilities_for_a_binary_region_loss(from_logits, dtype):
    """Its binary backward forms dp/dx from x alone (exact where the sigmoid saturates), so
    the probabilities it kept were an input-sized tensor held for nothing."""
    x = torch.rand(2, 1, 8, 8, dtype=dtype, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).to(dtype)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = DiceLoss(backend="torch", from_logits=from_logits)(x, target)
    # input-sized tensors kept besides x and the target themselves (views of them are free)
    extra = [t for t in kept if t.numel() == x.numel()
             and t.data_ptr() not in (x.data_ptr(), target.data_ptr())]
    assert extra == []
    loss.backward()
    want = x.detach().clone().requires_grad_()
    DiceLoss(backend="reference", from_logits=from_logits)(want, target).backward()
    torch.testing.assert_close(x.grad, want.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_binary_input_of_shape_n_is_n_one_pixel_samples(backend, name, reduction):
    """``(N,)`` is ``(N, *spatial)`` without spatial dims, as ``BCEWithLogitsLoss`` takes it
    (an image-level head): the loss of ``(N, 1)``; it was refused, by a message that named
    the shape it had."""
    if name == "composite" and reduction != "mean":
        pytest.skip("a composite reduces by the mean")
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(9, generator=gen) * 3
    target = (torch.rand(9, generator=gen) > 0.5).float()
    kwargs = {} if name == "composite" else {"reduction": reduction}
    loss = make_loss(name, "binary", backend, **kwargs)
    x, x2 = (logits.clone().requires_grad_() for _ in range(2))
    got = loss(x, target)
    want = loss(x2.view(9, 1), target.view(9, 1))
    if reduction == "none" and name not in REGION_NAMES:
        want = want.view(9)
    assert torch.equal(got, want)
    got.sum().backward()
    want.sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_a_zero_dim_input_is_refused():
    with pytest.raises(ValueError, match=r"input must have shape \(N, 1, \*spatial\) or "
                                         r"\(N, \*spatial\) in mode='binary'; got \(\)"):
        DiceLoss()(torch.tensor(0.5), torch.tensor(1.0))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_a_tensor_with_the_negative_bit_is_read_as_its_values(name, mode, backend):
    """A contiguous tensor whose memory holds ``-x`` and whose negative bit is set (what
    ``z.conj().imag`` gives) is ``x``: the kernels read the raw memory and computed the loss of
    ``-x`` (BCE 0.20 instead of 1.70 for a logit of -1.5, with ``backend="auto"`` too), and of
    a target ``-1`` (NaN)."""
    x, target = seeded_case(mode, (2, 3, 5))
    want = _run(name, mode, "reference", {}, x.double(), target.double()
                if target.is_floating_point() else target, "contiguous", False, torch.float64)
    negated = _as_layout(x, "negated")
    assert negated.is_neg() and negated.is_contiguous() and torch.equal(negated, x)
    got = _run(name, mode, backend, {}, x, target, "negated", False, torch.float32)
    assert got[3] & set(NODES[backend]), (backend, got[3])  # the kernels ran
    _close(got[0], want[0], f"{backend} loss")
    _close(got[1], want[1], f"{backend} input gradient")
    if not target.is_floating_point():  # a class index with the bit set
        got = _run(name, mode, backend, {}, x, _as_layout(target, "negated"), "contiguous",
                   False, torch.float32)
        _close(got[0], want[0], f"{backend} loss, negated class indices")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", MODES)
def test_the_fused_composite_terms_carry_their_gradients(mode, backend):
    """The fused pass returns ``(total, region, distribution)``; the native one marked the two
    terms non-differentiable, so a gradient through a term alone (the deprecated
    ``region_pixel_loss(return_terms=True)``, ``RegionPixelLoss``) was 0 or an error, where
    the other backends give the reference's."""
    from dynloss._params import composite_params, distribution_params, region_params
    from dynloss.functional._call import composite_loss

    x, target = seeded_case(mode, (2, 3, 5))

    def terms(backend, x):
        common = dict(mode=mode, backend=backend, ignore_index=None)
        params = composite_params(region_params(alpha=0.3, beta=0.7, **common),
                                  distribution_params(gamma=2.0, **common), 0.7, 1.3)
        return composite_loss(x, target, params)

    for weights in [(0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, -2.0, 3.0)]:
        got, want = [], []
        for name, out in (("backend", got), ("reference", want)):
            xs = x.double().detach().requires_grad_(True) if name == "reference" else (
                x.detach().clone().requires_grad_(True))
            values = terms(backend if name == "backend" else "reference", xs)
            sum(w * v for w, v in zip(weights, values, strict=True)).backward()
            out += [*(v.detach() for v in values), xs.grad]
        for what, g, w in zip(("total", "region", "distribution", "gradient"), got, want,
                              strict=True):
            _close(g, w, f"{backend} {what} for weights {weights}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_focal_slope_stays_finite_where_the_cross_entropy_overflows(backend, gamma, dtype):
    """Finite logits whose gap exceeds the dtype's range give a cross-entropy ``b = inf`` (and
    an infinite loss, as torch's); the focal slope ``q^g (1 + g e^{-b} b / q)`` tends to 1
    there, but ``e^{-b} b`` was formed as ``0 * inf``: a NaN gradient on every backend, where
    BCE's and torch's cross-entropy gradient is finite."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float32 (float64 goes to another backend)")
    big = torch.finfo(dtype).max
    x = torch.tensor([[[-big], [big]], [[0.5], [-0.25]]], dtype=dtype).reshape(2, 2, 1)
    x.requires_grad_(True)
    target = torch.tensor([[0], [0]])
    loss = FocalLoss(mode="multiclass", gamma=gamma, backend=backend)(x, target)
    loss.backward()
    assert loss.item() == math.inf
    # pixel 0: the slope's limit 1 times d b / d x = softmax - one-hot = (-1, 1), over 2 pixels
    torch.testing.assert_close(x.grad[0, :, 0], torch.tensor([-0.5, 0.5], dtype=dtype))
    # pixel 1: the float64 formula (b = softplus(x_1 - x_0) of two classes)
    b = torch.nn.functional.softplus(torch.tensor(-0.75, dtype=torch.float64))
    q = -torch.expm1(-b)
    slope = q ** gamma * (1 + gamma * torch.exp(-b) * b / q)
    p1 = torch.sigmoid(torch.tensor(-0.75, dtype=torch.float64))
    want = (slope * torch.stack([-p1, p1]) / 2).to(dtype)
    torch.testing.assert_close(x.grad[1, :, 0], want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_a_16_bit_input_gets_the_reference_answer_from_every_backend(name, mode, dtype):
    """A float16/bfloat16 input (a network under ``torch.autocast``): each fused backend
    computes it (on the CPU the native kernels read a float32 copy: they had left such inputs
    to the torch backend, 2-3x slower than the peers) and gives the reference's float32 loss
    and its input gradient, in the input's dtype."""
    x, target = seeded_case(mode, (2, 5, 7), seed=3, dtype=torch.float64, scale=3.0)
    x = x.to(dtype).double()  # values the 16-bit input holds exactly
    want = _run(name, mode, "reference", {}, x, target, "contiguous", False, dtype)
    for backend in FUSED:
        got = _run(name, mode, backend, {}, x, target, "contiguous", False, dtype)
        assert got[3] & set(NODES[backend]), (backend, got[3])  # the kernels ran
        assert got[0].dtype == torch.float32 and got[1].dtype == dtype, backend
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, b=backend: f"{b} loss: {m}")
        # gradients in the input's dtype, from float32 values that agree to float32 rounding:
        # within two of the dtype's units in the last place
        torch.testing.assert_close(got[1].float(), want[1].float(),
                                   rtol=2 * torch.finfo(dtype).eps, atol=1e-6,
                                   msg=lambda m, b=backend: f"{b} gradient: {m}")


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("ignore", [False, True], ids=["all", "ignore"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["bce", "focal", "topk"])
def test_reduction_none_on_the_torch_backend_gives_the_references_answer(name, mode, ignore,
                                                                        from_logits):
    """``reduction="none"`` on the CPU is computed by the torch backend (one autograd node
    whose forward forms the slopes; it was the reference's, 3.2x slower than torch's
    ``BCEWithLogitsLoss(reduction="none")``): the same per-element values and gradient under
    a weight map, also where that map is NaN or infinite (at an ignored or unselected element
    the reference's gradient is 0 whatever the weight) and where an input is NaN (that
    element's loss and gradient alone)."""
    x, target = seeded_case(mode, (2, 5, 7), seed=11, dtype=torch.float64, scale=3.0)
    if not from_logits:
        x = x.softmax(1) if mode == "multiclass" else x.sigmoid()
    x = x.float()
    kwargs = dict(reduction="none", from_logits=from_logits, **({"k": 0.3} if name == "topk"
                                                                else {}))
    if not from_logits:  # a NaN probability: NaN, as a NaN logit (checked, it is an error)
        kwargs["check_values"] = False
    if ignore:
        kwargs["ignore_index"] = 255
        target = target.clone()
        if mode == "multiclass":
            target[0, 1, :3] = 255
        else:
            target[0, :, 1, :3] = 255.0
    gen = torch.Generator().manual_seed(5)
    weights = torch.rand(x.shape if mode != "multiclass" else (2, 5, 7), generator=gen)
    odd = weights.clone()
    odd.view(-1)[7] = math.nan
    odd.view(-1)[5] = math.inf  # a kept element; element 7 is ignored (with ignore_index)
    bad = x.clone()
    bad[1, 0, 2, 3] = math.nan
    for inputs, upstream in ((x, weights), (x, odd), (bad, weights)):
        results = {}
        for backend in ("torch", "reference"):
            leaf = inputs.clone().requires_grad_(True)
            loss = make_loss(name, mode, backend, **kwargs)(leaf, target)
            if backend == "torch":
                assert "DistributionElementsBackward" in graph_nodes(loss)
            (loss * upstream).sum().backward()
            results[backend] = (loss.detach(), leaf.grad)
        (got, got_grad), (want, want_grad) = results["torch"], results["reference"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["bce", "focal", "topk"])
def test_reduction_none_on_the_torch_backend_passes_gradcheck(name, mode):
    """The torch backend's per-element losses (their slopes formed in the forward pass),
    first and second order, in float64 against finite differences."""
    x, target = seeded_case(mode, (2, 3, 4), seed=13, dtype=torch.float64)
    kwargs = dict(reduction="none", backend="torch", ignore_index=255,
                  **({"k": 0.4} if name == "topk" else {"gamma": 1.5} if name == "focal"
                     else {}))
    target = target.clone()
    target.view(-1)[0] = 255
    loss_fn = make_loss(name, mode, **kwargs)

    def loss(x):
        out = loss_fn(x, target)
        assert "DistributionElementsBackward" in graph_nodes(out)
        return out

    x = x.requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (x,), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(loss, (x,))
