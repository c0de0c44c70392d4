"""The documented semantics of bad and degenerate inputs, on every backend (issue #11).

From ``dynloss/_layout.py`` and the functional docstrings:

* NaN or ±inf in a kept input makes the loss NaN (and its gradient), on every backend, for
  every loss (TopK too, however many elements are NaN); a NaN in an *ignored* pixel changes
  nothing (neither the loss nor the gradient);
* an empty batch, a zero-size spatial dimension or a target that is all ``ignore_index``
  gives a loss of 0 (``"mean"`` and ``"sum"``) and a zero gradient; ``reduction="none"``
  keeps its shapes;
* invalid target values where the eager check does not run (``check_values=False``) make
  the loss NaN; a multiclass index out of ``[0, C)`` is a ValueError on the CPU always;
* ``ignore_index`` is an int in the int64 range (a bool is refused).
"""

from __future__ import annotations

import math

import pytest
import torch

import dynloss
import dynloss.functional as F
from dynloss.kernels import torch_backend

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

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # native TopK -> torch

DISTRIBUTION_NAMES = ("focal", "bce", "topk")


def loss_and_grad(loss_fn, x: torch.Tensor, target: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    loss = loss_fn(x, target)
    loss.sum().backward()
    return loss.detach(), x.grad


def _element_mask(mode: str, x: torch.Tensor, where) -> torch.Tensor:
    """Bool mask of the per-element loss's shape marking the elements of ``x[where]``."""
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[where] = True
    return mask.any(1) if mode == "multiclass" else mask


# ------------------------------------------------------------------------- non-finite inputs
BAD_VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
def test_a_non_finite_logit_makes_the_loss_nan(bad, name, mode, backend):
    x, target = seeded_case(mode, (2, 3, 5), seed=1)
    x[1, 0, 2, 3] = BAD_VALUES[bad]
    loss, grad = loss_and_grad(make_loss(name, mode, backend), x, target)
    assert loss.shape == () and math.isnan(loss.item())
    if name == "topk":
        # the selection keeps the NaN element's gradient NaN (others may be unselected: 0)
        assert torch.isnan(grad).any()
        if bad == "nan":
            assert torch.isnan(grad[1, 0, 2, 3])
    else:
        assert torch.isnan(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_ninety_percent_nan_logits(name, mode, backend):
    x, target = seeded_case(mode, (2, 4, 5), seed=2)
    nan = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < 0.9
    x[nan] = math.nan
    for reduction in (("mean",) if name == "composite" else ("mean", "sum")):
        kwargs = {} if name == "composite" else {"reduction": reduction}
        loss, grad = loss_and_grad(make_loss(name, mode, backend, **kwargs), x, target)
        assert math.isnan(loss.item()), reduction
        assert torch.isnan(grad).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_a_nan_focal_loss_leaves_a_certain_elements_gradient_as_the_reference(mode, gamma,
                                                                           backend):
    """A NaN input makes the Focal loss NaN and the gradient NaN wherever the loss reads an
    element; at an element classified with certainty (cross-entropy exactly 0: a logit of
    -200 with target 0, a class at -inf that the pixel does not target) the reference takes
    no power for 0 < gamma < 1 and its gradient stays 0. The Triton kernels formed the slope
    there and multiplied it by the NaN (found by a review that fuzzed every backend)."""
    if mode == "binary":
        x = torch.tensor([[[-200.0, math.nan, 0.3]]])
        target = torch.tensor([[[0.0, 1.0, 1.0]]])
    else:
        x = torch.tensor([[[-1.7319, -math.inf, math.nan], [0.1255, -0.2193, 0.5]]])
        target = torch.tensor([[0, 1, 1]])
    loss_fn = dynloss.FocalLoss(gamma=gamma, mode=mode, backend=backend)
    got, grad = loss_and_grad(loss_fn, x, target)
    want, want_grad = loss_and_grad(dynloss.FocalLoss(gamma=gamma, mode=mode,
                                                      backend="reference"), x, target)
    assert got.isnan() and want.isnan()
    assert torch.equal(grad.isnan(), want_grad.isnan()), (grad, want_grad)
    certain = (0, 0, 0) if mode == "binary" else (0, slice(None), 1)  # (multiclass: pixel 1)
    if gamma < 1:
        assert not want_grad[certain].any() and not grad[certain].any()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", DISTRIBUTION_NAMES)
def test_reduction_none_marks_exactly_the_bad_elements(name, mode):
    """Per-element losses: NaN exactly where a kept input is not finite (the reference
    computes ``reduction="none"`` for every backend)."""
    x, target = seeded_case(mode, (2, 3, 5), seed=4)
    x[0, 0, 1, 1], x[1, -1, 2, 4] = math.nan, math.inf
    want = _element_mask(mode, x, (0, 0, 1, 1)) | _element_mask(mode, x, (1, -1, 2, 4))
    # the gradient too: NaN at exactly those elements (every class of a multiclass pixel),
    # also at +-inf, whose slope alone is finite or 0
    want_grad = (want.unsqueeze(1) if mode == "multiclass" else want).expand_as(x)
    for backend in BACKENDS:
        xs = x.clone().requires_grad_()
        loss = make_loss(name, mode, backend, reduction="none")(xs, target)
        assert torch.equal(torch.isnan(loss), want), backend
        assert torch.isfinite(loss[~want]).all()
        (grad,) = torch.autograd.grad(loss.sum(), xs)
        assert torch.equal(torch.isnan(grad), want_grad), backend


def _ignore_one_pixel(mode: str, x: torch.Tensor, target: torch.Tensor, value: float):
    """Mark pixel (0, 1, 2) ignored (255) and put ``value`` in all its logits."""
    target = target.clone()
    x = x.clone()
    if mode == "multiclass":
        target[0, 1, 2] = 255
    else:
        target[0, :, 1, 2] = 255
    x[0, :, 1, 2] = value
    return x, target


# Found by these tests; fixed in kernels/reference.py, kernels/torch_backend.py and the native
# kernels (ignored pixels are selected out, not multiplied by 0).


@pytest.mark.parametrize(
    ("name", "mode", "backend"),
    [(n, m, b) for n in LOSS_NAMES for m in MODES for b in BACKENDS],
)
def test_nan_in_an_ignored_pixel_changes_nothing(name, mode, backend):
    x, target = seeded_case(mode, (2, 3, 5), seed=5)
    clean_x, ignored = _ignore_one_pixel(mode, x, target, 0.0)
    nan_x, _ = _ignore_one_pixel(mode, x, target, math.nan)
    loss_fn = make_loss(name, mode, backend, ignore_index=255)
    want, want_grad = loss_and_grad(loss_fn, clean_x, ignored)
    got, got_grad = loss_and_grad(loss_fn, nan_x, ignored)
    assert torch.isfinite(want) and torch.isfinite(want_grad).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)
    assert (got_grad[0, :, 1, 2] == 0).all()


@pytest.mark.parametrize("bad", ["+inf", "-inf"])
@pytest.mark.parametrize(
    ("name", "mode", "backend"),
    [(n, m, b) for n in LOSS_NAMES for m in MODES for b in BACKENDS],
)
def test_inf_in_an_ignored_pixel_changes_nothing(name, mode, backend, bad):
    x, target = seeded_case(mode, (2, 3, 5), seed=6)
    clean_x, ignored = _ignore_one_pixel(mode, x, target, 0.0)
    inf_x, _ = _ignore_one_pixel(mode, x, target, BAD_VALUES[bad])
    loss_fn = make_loss(name, mode, backend, ignore_index=255)
    want, want_grad = loss_and_grad(loss_fn, clean_x, ignored)
    got, got_grad = loss_and_grad(loss_fn, inf_x, ignored)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "mode", "backend"),
    [(n, m, b) for n in LOSS_NAMES for m in MODES for b in BACKENDS],
)
def test_bad_probability_in_an_ignored_pixel_changes_nothing(name, mode, backend):
    """Checked eagerly (the CPU default) or not, as for logits: an ignored pixel's input
    is not looked at (the eager check read every input, ignored or not)."""
    x, target = seeded_case(mode, (2, 3, 5), seed=13)
    p = x.softmax(1) if mode == "multiclass" else x.sigmoid()
    clean_p, ignored = _ignore_one_pixel(mode, p, target, 0.25)
    for bad, check in ((math.nan, None), (-0.5, None), (1.5, False)):  # None: checked
        bad_p, _ = _ignore_one_pixel(mode, p, target, bad)
        loss_fn = make_loss(name, mode, backend, ignore_index=255, from_logits=False,
                            check_values=check)
        want, want_grad = loss_and_grad(loss_fn, clean_p, ignored)
        got, got_grad = loss_and_grad(loss_fn, bad_p, ignored)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{bad} {check}")
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0, msg=f"{bad} {check}")
    # a kept pixel's bad probability is still an error
    p[1, :, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"input must hold probabilities in \[0, 1\] when "
                                         r"from_logits=False; got values from .* to 1\.5"):
        make_loss(name, mode, backend, ignore_index=255, from_logits=False)(p, ignored)


# --------------------------------------------------------------------------- empty and ignored
EMPTY_SHAPES = {"no-samples": (0, 3, 4), "zero-height": (2, 0, 4), "zero-width": (2, 3, 0)}


def _empty_case(mode: str, shape: tuple[int, ...]):
    n, *spatial = shape
    c = channels(mode)
    x = torch.randn(n, c, *spatial)
    target = (torch.zeros(n, *spatial, dtype=torch.long) if mode == "multiclass"
              else torch.zeros(n, c, *spatial))
    return x, target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(EMPTY_SHAPES.values()), ids=list(EMPTY_SHAPES))
def test_empty_inputs_give_zero(shape, mode, backend):
    x, target = _empty_case(mode, shape)
    c = channels(mode)
    n = shape[0]
    for name in LOSS_NAMES:
        reductions = ("mean",) if name == "composite" else ("mean", "sum", "none")
        for reduction in reductions:
            kwargs = {} if name == "composite" else {"reduction": reduction}
            loss, grad = loss_and_grad(make_loss(name, mode, backend, **kwargs), x, target)
            what = (name, reduction)
            assert loss.dtype == torch.float32, what
            assert grad.shape == x.shape and not grad.any(), what
            if reduction != "none":
                assert loss.shape == () and loss.item() == 0.0, what
            elif name in REGION_NAMES:
                assert loss.shape == (c,) and not loss.any(), what
            else:  # per-element losses: the input's shape, (N, *spatial) in multiclass mode
                assert loss.shape == (x.shape if mode != "multiclass"
                                      else x.shape[:1] + x.shape[2:]), what
        for name in REGION_NAMES:  # one score per sample and class
            loss = make_loss(name, mode, backend, per_image=True, reduction="none")(x, target)
            assert loss.shape == (n, c) and not loss.any(), name
            for reduction in ("mean", "sum"):
                loss = make_loss(name, mode, backend, per_image=True,
                                 reduction=reduction)(x, target)
                assert loss.item() == 0.0, (name, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_everything_ignored_gives_zero(mode, backend):
    x, _ = seeded_case(mode, (2, 3, 4), seed=7)
    target = (torch.full((2, 3, 4), 255) if mode == "multiclass"
              else torch.full(x.shape, 255.0))
    for name in LOSS_NAMES:
        reductions = ("mean",) if name == "composite" else ("mean", "sum")
        for reduction in reductions:
            kwargs = {} if name == "composite" else {"reduction": reduction}
            loss_fn = make_loss(name, mode, backend, ignore_index=255, **kwargs)
            loss, grad = loss_and_grad(loss_fn, x, target)
            assert loss.item() == 0.0 and not grad.any(), (name, reduction)


# ------------------------------------------------------------------- invalid values, no checks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["binary", "multilabel"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_target_out_of_range_without_checks_is_nan(name, mode, backend):
    x, target = seeded_case(mode, (2, 3, 4), seed=8)
    target[1, 0, 2, 1] = 3.0
    loss, grad = loss_and_grad(make_loss(name, mode, backend, check_values=False), x, target)
    assert math.isnan(loss.item())
    assert torch.isnan(grad).any()
    with pytest.raises(ValueError, match=rf"target values must lie in \[0, 1\] in "
                                         rf"mode='{mode}'; got values from 0\.0 to 3\.0"):
        make_loss(name, mode, backend, check_values=True)(x, target)
    with pytest.raises(ValueError, match=r"got values from 0\.0 to 3\.0"):
        make_loss(name, mode, backend)(x, target)  # the default checks CPU tensors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_probability_out_of_range_without_checks_is_nan(name, backend):
    x, target = seeded_case("binary", (2, 3, 4), seed=9)
    p = x.sigmoid()
    p[0, 0, 1, 1] = 1.5
    loss = make_loss(name, "binary", backend, from_logits=False, check_values=False)(p, target)
    assert math.isnan(loss.item())
    with pytest.raises(ValueError, match=r"input must hold probabilities in \[0, 1\] when "
                                         r"from_logits=False; got values from .* to 1\.5"):
        make_loss(name, "binary", backend, from_logits=False)(p, target)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("label", [255, -1, 3])
def test_multiclass_label_out_of_range_is_an_error_on_the_cpu(label, name, backend):
    x, target = seeded_case("multiclass", (2, 3, 4), seed=10)
    target[1, 2, 0] = label
    lo, hi = min(0, label), max(2, label)
    message = (r"target class indices must lie in \[0, 3\) for an input with C=3 channels; "
               rf"got values from {lo} to {hi}")
    for check in (None, False, True):
        with pytest.raises(ValueError, match=message):
            make_loss(name, "multiclass", backend, check_values=check)(x, target)
    # with another ignore_index the message names it
    with pytest.raises(ValueError, match=r"or equal ignore_index=7; got values"):
        make_loss(name, "multiclass", backend, ignore_index=7)(x, target)
    # as the ignore_index it is no error: the loss of the other pixels
    kept = torch.ones(target.shape, dtype=torch.bool)
    kept[1, 2, 0] = False
    loss = make_loss(name, "multiclass", backend, ignore_index=label)(x, target)
    want = make_loss(name, "multiclass", "reference", ignore_index=label)(
        x.double(), torch.where(kept, target, label))
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------------------- ignore_index
FUNCTIONS = [F.dice_loss, F.iou_loss, F.jaccard_loss, F.tversky_loss, F.bce_loss, F.focal_loss,
             F.topk_loss]
CLASSES = sorted(set(dynloss.LOSSES.values()), key=lambda cls: cls.__name__)
RANGE = r"ignore_index must lie in the int64 range \[-2\*\*63, 2\*\*63 - 1\]; got "


@pytest.mark.parametrize("value", [2**64 + 1, 2**63, -(2**63) - 1])
def test_ignore_index_outside_int64_is_a_value_error(value):
    for cls in CLASSES:
        with pytest.raises(ValueError, match=RANGE + str(value).replace("-", r"\-")):
            cls(ignore_index=value)
    x = torch.zeros(1, 1, 2)
    for fn in FUNCTIONS:
        with pytest.raises(ValueError, match=RANGE + str(value).replace("-", r"\-")):
            fn(x, x, ignore_index=value)


@pytest.mark.parametrize("value", [True, False, 255.0, "255"])
def test_ignore_index_must_be_an_int(value):
    message = (rf"ignore_index must be an int or None; got {type(value).__name__} "
               rf"{value!r}".replace(".", r"\."))
    for cls in CLASSES:
        with pytest.raises(TypeError, match=message):
            cls(ignore_index=value)
        loss = cls()
        loss.ignore_index = value  # checked again at the next call
        with pytest.raises(TypeError, match=message):
            loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))
    x = torch.zeros(1, 1, 2)
    for fn in FUNCTIONS:
        with pytest.raises(TypeError, match=message):
            fn(x, x, ignore_index=value)


def test_a_numpy_integer_ignore_index_is_an_int():
    """``ignore_index=np.int64(255)`` (a value read from a NumPy array or config) was refused
    by the constructor; reassigned, its ``repr`` read ``ignore_index=255`` while the next call
    refused it. A NumPy integer is an int; a NumPy bool is not."""
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 3, 4)
    labels = torch.tensor([[0, 1, 255, 2], [255, 2, 1, 0]])
    for cls in CLASSES:
        want = cls(mode="multiclass", ignore_index=255)(x, labels)
        for value in (np.int64(255), np.uint8(255), np.int16(255)):
            loss = cls(mode="multiclass", ignore_index=value)
            assert type(loss.ignore_index) is int
            assert repr(loss) == f"{cls.__name__}(mode='multiclass', ignore_index=255)"
            torch.testing.assert_close(loss(x, labels), want, rtol=0, atol=0)
            reassigned = cls(mode="multiclass")
            reassigned.ignore_index = value
            torch.testing.assert_close(reassigned(x, labels), want, rtol=0, atol=0)
        with pytest.raises(TypeError, match="ignore_index must be an int or None; got bool"):
            cls(ignore_index=np.bool_(True))
    for fn in FUNCTIONS:
        want = fn(x, labels, mode="multiclass", ignore_index=255)
        torch.testing.assert_close(fn(x, labels, mode="multiclass", ignore_index=np.int64(255)),
                                   want, rtol=0, atol=0)


def test_dice_ignore_index_true_is_a_type_error():
    with pytest.raises(TypeError, match="ignore_index must be an int or None; got bool True"):
        dynloss.DiceLoss(ignore_index=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [2**63 - 1, -(2**63)])
def test_ignore_index_at_the_int64_limits_works(value, backend):
    """The extremes of int64 are valid labels to ignore, on every backend."""
    x, target = seeded_case("multiclass", (2, 3, 4), seed=12)
    ignored = target.clone()
    ignored[0] = value
    for name in LOSS_NAMES:
        want = make_loss(name, "multiclass", "reference")(x[1:], target[1:])
        got = make_loss(name, "multiclass", backend, ignore_index=value)(x, ignored)
        # sample 0 left out of every sum and mean: the loss of sample 1 alone
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6, msg=name)


# ------------------------------------------------- the in-graph flag from the extremes
_SPECIAL = {"finite": None, "nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf"),
            "big": 3.0e38, "negative": -0.25, "above_one": 1.5}


@pytest.mark.parametrize("mode", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("in_input", sorted(_SPECIAL))
@pytest.mark.parametrize("in_target", ["valid", "nan", "below", "above"])
def test_invalid_values_from_the_extremes_equals_the_per_element_test(mode, from_logits,
                                                                      in_input, in_target):
    """Without ``ignore_index`` the 0-dim flag is formed from ``aminmax`` of the input and
    of the target; it must say exactly what the per-element test says, for every kind of
    bad value in either tensor (the per-element test is the definition)."""
    from dynloss._layout import invalid_elements, invalid_values, prepare

    gen = torch.Generator().manual_seed(0)
    c = 1 if mode == "binary" else 3
    x = torch.randn(2, c, 5, generator=gen)
    if not from_logits:
        x = x.sigmoid()
    if _SPECIAL[in_input] is not None:
        x[1, -1, 3] = _SPECIAL[in_input]
    if mode == "multiclass":
        target = torch.randint(0, c, (2, 5), generator=gen)
        if in_target in ("below", "above"):
            target[0, 2] = -1 if in_target == "below" else c
    else:
        target = (torch.rand(2, c, 5, generator=gen) > 0.5).float()
        if in_target != "valid":
            target[0, 0, 2] = {"nan": float("nan"), "below": -0.5, "above": 2.0}[in_target]
    layout = prepare(x, target, mode)
    for targets in (True, False):
        want = invalid_elements(layout, None, from_logits, targets).any()
        got = invalid_values(layout, None, from_logits, targets)
        assert got.shape == () and got.dtype == torch.bool
        assert bool(got) == bool(want), (targets, bool(got), bool(want))
    expect_bad_input = (in_input in ("nan", "+inf", "-inf") if from_logits
                        else in_input not in ("finite",))
    assert bool(invalid_values(layout, None, from_logits, False)) == expect_bad_input


def _assert_the_references_gradient(name, mode, backend, x, target, kwargs) -> None:
    """The gradient on ``backend`` is the reference's, NaN for NaN."""
    _, want = loss_and_grad(make_loss(name, mode, "reference", **kwargs), x, target)
    _, got = loss_and_grad(make_loss(name, mode, backend, **kwargs), x, target)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("ignore", [None, 255])
def test_a_nan_input_gives_the_references_gradient_pattern(ignore, name, mode, backend):
    """With a NaN among the kept inputs the gradient is NaN where the loss depends on the
    element and 0 where it does not (ignored pixels, elements TopK did not select), as on the
    reference: the torch backend and the native kernels made every element NaN."""
    x, target = seeded_case(mode, (2, 4, 5), seed=6)
    x = x.float()
    if ignore is not None:
        target[0, ..., 1, :2] = ignore
    x[1, 0, 2, 3] = math.nan
    kwargs = {} if ignore is None else {"ignore_index": ignore}
    if name == "topk":
        kwargs["k"] = 0.3
    _assert_the_references_gradient(name, mode, backend, x, target, kwargs)


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
@pytest.mark.parametrize("chosen", ["no-background", "weights"])
@pytest.mark.parametrize("name", ["dice", "composite"])
def test_a_class_choice_keeps_the_references_gradient_pattern(name, chosen, mode, from_logits,
                                                              backend):
    """A region term that leaves class 0 out or weighs the classes, with a non-finite kept
    input (in class 0's channel or another's): the gradient is NaN where the reference's is.
    With the class choice formed in the backends, the torch backend (and the reference, in
    multilabel mode) left class 0's channel at 0 where every backend had given NaN."""
    choice = ({"include_background": False} if chosen == "no-background"
              else {"weight": [0.0, 2.0, 0.5]})
    for where, bad in (((1, 0, 2, 3), math.inf), ((1, 1, 2, 3), math.nan)):
        x, target = seeded_case(mode, (2, 4, 5), seed=8)
        if not from_logits:
            x = x.softmax(1) if mode == "multiclass" else x.sigmoid()
        x = x.float()
        if mode == "multiclass":
            target[1, 2, 3] = 2  # (the bad pixel's class is not class 0)
        x[where] = bad
        common = dict(mode=mode, from_logits=from_logits, check_values=False)

        def make(on, common=common):
            dice = dynloss.DiceLoss(backend=on, **choice, **common)
            if name == "dice":
                return dice
            return dynloss.CompositeLoss([dice, dynloss.BCELoss(backend=on, **common)])

        _, want = loss_and_grad(make("reference"), x, target)
        _, got = loss_and_grad(make(backend), x, target)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (where, got, want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", DISTRIBUTION_NAMES)
def test_a_nan_probability_gives_the_references_gradient_pattern(name, mode, backend):
    """Probabilities (``from_logits=False``, unchecked) with a NaN: the torch backend made
    every element's gradient NaN, where the reference (and the kernels) leave 0 at elements
    the loss does not read (a multiclass pixel's other classes; the clamped log's constant)."""
    x, target = seeded_case(mode, (2, 4, 5), seed=7)
    x = (x.softmax(1) if mode == "multiclass" else x.sigmoid()).float()
    x[1, -1, 2, 3] = math.nan
    kwargs = {"from_logits": False, "check_values": False}
    if name == "topk":
        kwargs["k"] = 0.5
    _assert_the_references_gradient(name, mode, backend, x, target, kwargs)


def test_the_torch_backend_without_host_reads_keeps_the_references_nan_pattern(monkeypatch):
    """Where nothing may be read on the host (CUDA) the torch backend keeps the mask of the
    elements the loss does not read for backward: an ignored pixel and an element TopK did
    not select get 0, not slope * NaN. Simulated on the CPU (whose path reads the upstream
    gradient instead) by declaring nothing readable."""
    x, target = seeded_case("binary", (2, 4, 5), seed=6)
    x = x.float()
    target[0, ..., 1, :2] = 255
    x[1, 0, 2, 3] = math.nan
    for name, kwargs in (("focal", {"ignore_index": 255}),
                         ("topk", {"ignore_index": 255, "k": 0.3})):
        _, want = loss_and_grad(make_loss(name, "binary", "reference", **kwargs), x, target)
        with monkeypatch.context() as patch:
            patch.setattr(torch_backend, "_host_readable", lambda t: False)
            _, got = loss_and_grad(make_loss(name, "binary", "torch", **kwargs), x, target)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_topk_mask_ranks_nan_above_inf_above_every_finite_value():
    """The reference turned +inf into float32's largest finite value (``nan_to_num``'s
    default), so an infinite loss tied with a loss of exactly that value and went by flat
    index; the native kernels tied NaN with +inf. Every backend now ranks NaN > +inf > finite,
    as the docs say."""
    from dynloss._math import topk_mask

    big = torch.finfo(torch.float32).max
    cases = [([big, math.inf], 1, [False, True]),
             ([math.inf, math.nan, 1.0], 1, [False, True, False]),
             ([math.inf, math.nan, math.inf, math.nan], 3, [True, True, False, True]),
             ([1.0, math.inf, big, math.nan, -math.inf], 3, [False, True, True, True, False])]
    for values, n, want in cases:
        values = torch.tensor(values)
        assert topk_mask(values, n).tolist() == want
        assert topk_mask(values, torch.tensor(n)).tolist() == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_selects_an_infinite_loss_above_the_largest_finite_one(backend):
    """Finite logits whose cross-entropy is exactly float32's largest value (pixel 0) and one
    that overflows to inf (pixel 1): TopK of one pixel is inf, with the gradient on pixel 1.
    The reference and torch backends selected pixel 0. Found by a review of TopK."""
    big = torch.finfo(torch.float32).max
    x = torch.tensor([[[2.0**127, big], [-(big - 2.0**127), -big]]])  # (N=1, C=2, M=2)
    t = torch.tensor([[1, 1]])
    losses = F.topk_loss(x, t, mode="multiclass", k=1.0, reduction="none", backend="reference")
    assert losses.tolist() == [[big, math.inf]]
    leaf = x.clone().requires_grad_()
    value = F.topk_loss(leaf, t, mode="multiclass", k=0.5, backend=backend)
    value.backward()
    assert value.item() == math.inf
    assert (leaf.grad != 0).any(1).view(-1).tolist() == [False, True]


@pytest.mark.parametrize("upstream", [math.nan, math.inf])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_upstream_gradient_leaves_unread_elements_at_zero(backend, upstream):
    """``loss * nan`` (or inf) upstream: the reference gives 0 to the elements the loss does
    not read (ignored pixels, TopK's unselected ones) and NaN/inf elsewhere; the native
    backend multiplied the upstream value into every element. Found by a review of the
    backends. Under an infinite upstream gradient every backend gives the reference's NaN
    and +-inf on the CPU (below; the torch backend on CUDA does not, see the changelog)."""
    x0 = torch.randn(1, 1, 2, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([[[[1.0, 0.0, 255.0, 1.0], [0.0, 255.0, 1.0, 0.0]]]])
    cases = [
        lambda x, b: F.bce_loss(x, t, ignore_index=255, backend=b),
        lambda x, b: F.focal_loss(x, t, ignore_index=255, backend=b),
        lambda x, b: F.topk_loss(x, t.clamp(max=1), k=0.25, backend=b),
        lambda x, b: F.dice_loss(x, t, ignore_index=255, backend=b),
        lambda x, b: dynloss.CompositeLoss([dynloss.DiceLoss(ignore_index=255, backend=b),
                                            dynloss.BCELoss(ignore_index=255, backend=b)])(x, t),
        lambda x, b: F.dice_loss(x, t, ignore_index=255, backend=b, ddp_pool=True),
    ]
    for case in cases:
        grads = []
        for b in (backend, "reference"):
            x = x0.clone().requires_grad_()
            (case(x, b) * upstream).backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[0], grads[1], equal_nan=True)
        assert torch.equal(grads[0] == 0, grads[1] == 0)
        assert torch.equal(grads[0].isfinite(), grads[1].isfinite())
        assert (grads[1] == 0).sum() >= 2  # the ignored (or unselected) elements


@pytest.mark.parametrize("backend", FUSED)
def test_a_nan_in_a_per_image_upstream_gradient_stays_in_its_image(backend):
    """``reduction="none"`` with ``per_image=True`` gives a loss per image; a NaN in one
    image's upstream gradient gives NaN to the elements that image's loss reads, 0 to its
    ignored ones and the finite gradient to the other image, as the reference's."""
    x0 = torch.randn(2, 1, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([[[1.0, 0.0, 255.0, 1.0]], [[0.0, 255.0, 1.0, 0.0]]])
    upstream = torch.tensor([[math.nan], [1.0]])
    grads = []
    for b in (backend, "reference"):
        x = x0.clone().requires_grad_()
        F.dice_loss(x, t, ignore_index=255, reduction="none", per_image=True,
                    backend=b).backward(upstream)
        grads.append(x.grad)
    assert grads[1][0, 0].isnan().tolist() == [True, True, False, True]
    assert grads[1][0, 0, 2] == 0 and grads[1][1].isfinite().all()
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_an_integer_label_that_float32_rounds_onto_ignore_index_is_not_ignored(dtype, backend):
    """Triton compared binary targets with ``ignore_index`` in float32: the invalid label
    2**24 + 1 rounds onto ``ignore_index=2**24`` and was ignored (a finite loss) where every
    other backend keeps it (NaN, unchecked). Found by a review of the backends."""
    x = torch.tensor([[[0.5, -1.0, 2.0, 0.3]]])
    t = torch.tensor([[[1, 0, 2**24 + 1, 2**24]]], dtype=dtype)
    for fn in (F.dice_loss, F.bce_loss, F.topk_loss):
        assert fn(x, t, ignore_index=2**24, check_values=False, backend=backend).isnan()
        ok = t.clone()
        ok[0, 0, 2] = 1
        assert fn(x, ok, ignore_index=2**24, check_values=False, backend=backend).isfinite()


def test_topk_mask_reads_no_data_so_vmap_and_tracing_work():
    """A fast path read ``nan.any()`` on the host: ``torch.func.vmap`` refused the
    data-dependent branch and ``torch.jit.trace`` froze the branch of its example input.
    Found by a review."""
    from dynloss._math import topk_mask

    rows = torch.tensor([[1.0, 3.0, 2.0, 3.0], [math.nan, 0.0, math.inf, 5.0]])
    got = torch.func.vmap(lambda row: topk_mask(row, 2))(rows)
    assert got.tolist() == [[False, True, False, True], [True, False, True, False]]
    traced = torch.jit.trace(lambda v: topk_mask(v, 1), (torch.tensor([1.0, 2.0, 3.0]),))
    assert traced(torch.tensor([1.0, math.nan, 3.0])).tolist() == [False, True, False]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", MODES)
def test_topk_selects_the_references_elements_among_infinite_logits(mode, backend):
    """Several +-inf logits, with targets of both values, and a TopK smaller than their
    number: the loss is NaN on every backend and the gradient is NaN exactly on the elements
    the reference selects. The reference's per-element loss (``lerp`` of two softplus terms)
    is NaN at every infinite logit, so all of them tie and go by flat index; Triton's was
    +inf where the target's own term was infinite (``x = +inf, g = 0``) and NaN elsewhere,
    so it ranked them differently and put the NaN gradient on other elements. Found by a
    review of TopK."""
    x, target = seeded_case(mode, (2, 4, 4), seed=11)
    flat = x.view(-1)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    where = torch.arange(3, flat.numel(), max(flat.numel() // 9, 1))[:8]
    flat[where] = signs[: where.numel()] * math.inf
    if mode != "multiclass":
        target.view(-1)[where] = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])[
            : where.numel()]
    for k in (0.05, 0.1, 0.2):
        _, want = loss_and_grad(make_loss("topk", mode, "reference", k=k), x, target)
        loss, got = loss_and_grad(make_loss("topk", mode, backend, k=k), x, target)
        assert math.isnan(loss.item())
        assert torch.equal(got.isnan(), want.isnan()), k


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", MODES)
def test_topk_gradient_is_nan_where_the_references_is(mode, backend):
    """Random NaN/+-inf logits (a few, or many), hard and soft targets, some pixels ignored,
    several k: the loss is NaN and the gradient NaN at the same elements as the reference's,
    equal elsewhere."""
    gen = torch.Generator().manual_seed(3)
    for case in range(16):  # soft targets too: lerp's per-element loss of an infinite logit
        # is +inf for some (x = -inf, 0 < g < 1/2; x = +inf, 1/2 <= g < 1), NaN for the others
        soft = mode != "multiclass" and case >= 8
        x, target = seeded_case(mode, (2, 3, 3), seed=100 + case, soft=soft)
        hit = torch.rand(x.shape, generator=gen) < (0.05, 0.2, 0.5)[case % 3]
        pick = torch.randint(0, 3, (int(hit.sum()),), generator=gen)
        x[hit] = torch.tensor([math.nan, math.inf, -math.inf])[pick]
        kwargs = {"k": (0.05, 0.2, 0.5, 1.0)[case % 4]}
        if case % 2:
            target[0, ..., 0, :] = 7
            kwargs["ignore_index"] = 7
        want_loss, want = loss_and_grad(make_loss("topk", mode, "reference", **kwargs), x,
                                        target)
        loss, got = loss_and_grad(make_loss("topk", mode, backend, **kwargs), x, target)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert torch.equal(got.isnan(), want.isnan()), case
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("upstream", [math.inf, -math.inf])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", MODES)
def test_an_infinite_upstream_gradient_gives_the_references_nan_and_inf(mode, backend,
                                                                         from_logits, upstream):
    """``loss * inf`` upstream of every loss and a fused composite: the gradient is NaN exactly
    where the reference's chain of operations makes it ``0 * inf`` or ``inf - inf`` (every
    kept element of a BCE term from logits; the target class of a multiclass pixel; every
    class of a multiclass region term from probabilities, ``gI * onehot``), +-inf where the
    reference's is. Triton (and the torch backend's fused multiclass region term) formed
    those as one product or a selection and gave +-inf there. Found by a review of the
    backends."""
    x, target = seeded_case(mode, (2, 3, 4), seed=21)
    if not from_logits:
        x = torch.softmax(x, 1) if mode == "multiclass" else torch.sigmoid(x)
    kwargs = {"from_logits": from_logits, "ignore_index": 7}
    target[0, ..., 1, :] = 7
    for name in LOSS_NAMES:
        grads = []
        for b in ("reference", backend):
            leaf = x.clone().requires_grad_()
            loss = make_loss(name, mode, b, **kwargs)(leaf, target)
            grads.append(torch.autograd.grad(loss, leaf, torch.tensor(upstream))[0])
        want, got = grads
        assert torch.equal(got.isnan(), want.isnan()), name
        assert torch.equal(got.isinf(), want.isinf()), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_topk_ranks_an_infinite_logit_as_the_reference_s_lerp_does_for_soft_targets():
    """The reference's per-element BCE is ``lerp(softplus(x), softplus(-x), g)``, whose two
    formulas (below and above ``g = 1/2``) give +inf at ``x = -inf`` for ``0 < g < 1/2`` and
    at ``x = +inf`` for ``1/2 <= g < 1``, NaN at the other infinite logits: a NaN logit
    (pixel 2) ranks above such a +inf (pixel 0). Triton ranked every infinite logit as NaN.
    Found by a review of the change that made it NaN (it had been +inf or NaN by its own
    formula)."""
    for x0, g0 in ((-math.inf, 0.3), (math.inf, 0.7), (math.inf, 0.5)):
        x = torch.tensor([[[x0, 0.0, math.nan, 1.0]]])
        t = torch.tensor([[[g0, 1.0, 0.0, 0.0]]])
        grads = []
        for b in ("reference", *FUSED):
            leaf = x.clone().requires_grad_()
            F.topk_loss(leaf, t, k=0.25, backend=b).backward()
            grads.append(leaf.grad)
        assert grads[0][0, 0].isnan().tolist() == [False, False, True, False], x0
        for got in grads[1:]:
            assert torch.equal(got.isnan(), grads[0].isnan()), (x0, g0, got)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("backend", FUSED)
def test_an_infinite_upstream_gradient_through_a_saturated_focal_term(backend, from_logits):
    """Multiclass Focal where a pixel's cross-entropy is large enough that ``1 - e^-b``
    rounds to 1 in float32 (pixel 0, ``b`` about 20.5): the reference's chain multiplies the
    infinite upstream gradient by the exact 0 of ``d(-expm1(-b))/db`` there, NaN in every
    class of the pixel from logits (at its target class from probabilities); Triton's slope,
    formed from ``e^-b`` itself, gave +-inf. Found by a review of the backends."""
    x = torch.tensor([[[-20.0, 0.0], [0.5, 0.0]]])  # (N=1, C=2, M=2)
    if not from_logits:
        x = torch.softmax(x, 1)
    t = torch.tensor([[0, 0]])
    grads = []
    for b in ("reference", backend):
        leaf = x.clone().requires_grad_()
        loss = F.focal_loss(leaf, t, gamma=2.0, mode="multiclass", from_logits=from_logits,
                            backend=b)
        grads.append(torch.autograd.grad(loss, leaf, torch.tensor(math.inf))[0])
    assert grads[0][0, 0, 0].isnan()  # the target class of pixel 0 (from logits: every one)
    assert torch.equal(grads[1].isnan(), grads[0].isnan()), grads
    assert torch.equal(grads[1].isinf(), grads[0].isinf()), grads
    if from_logits:
        return
    # binary: a probability of 0 (its log clamped at -100) with a soft target of 0.3, b = 30
    x, t = torch.tensor([[[0.0, 0.5]]]), torch.tensor([[[0.3, 1.0]]])
    for loss_fn in (F.focal_loss, F.topk_loss):
        grads = []
        for b in ("reference", backend):
            leaf = x.clone().requires_grad_()
            kwargs = {"gamma": 2.0} if loss_fn is F.focal_loss else {"k": 1.0}
            loss = loss_fn(leaf, t, from_logits=False, backend=b, **kwargs)
            grads.append(torch.autograd.grad(loss, leaf, torch.tensor(math.inf))[0])
        assert torch.equal(grads[1].isnan(), grads[0].isnan()), grads
        assert torch.equal(grads[1].isinf(), grads[0].isinf()), grads


@pytest.mark.parametrize("name", REGION_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_infinite_probabilities_of_both_signs_unchecked_make_the_region_loss_nan(mode, name):
    """``check_values=False`` with a probability of +inf in one sample and -inf in another:
    the native backend's float64 sums of the per-sample partial sums (``math.fsum``) raised
    ``ValueError: -inf + inf in fsum``; the loss is NaN, as on every backend. Found by a
    review of the backends."""
    c = channels(mode)
    x = torch.full((2, c, 4), 0.3)
    x[0, 0, 0] = math.inf
    x[1, 0, 1] = -math.inf
    if mode == "multiclass":
        t = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2]])
    else:
        t = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]]).unsqueeze(1).expand(
            2, c, 4).contiguous()
    for backend in BACKENDS:
        for per_image in (False, True):
            loss = make_loss(name, mode, backend, from_logits=False, check_values=False,
                             per_image=per_image)(x, t)
            assert loss.isnan(), (backend, per_image)


@pytest.mark.parametrize("backend", sorted({"reference", "torch", *FUSED}))
def test_a_fused_composites_terms_are_nan_like_the_single_losses(backend):
    """An invalid probability with ``check_values=False``: each term a fused composite logs in
    ``last_terms`` is NaN exactly where the single loss is (the torch backend's fused pass
    left its distribution term finite)."""
    x = torch.tensor([[[[0.2, 1.5], [0.7, 0.4]]]])
    t = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    common = dict(from_logits=False, check_values=False, backend=backend)
    composite = dynloss.CompositeLoss([dynloss.DiceLoss(**common), dynloss.BCELoss(**common)])
    total = composite(x, t)
    singles = {"dice": dynloss.DiceLoss(**common)(x, t), "bce": dynloss.BCELoss(**common)(x, t)}
    assert torch.isnan(total)
    for name, single in singles.items():
        assert torch.isnan(single), name
        assert torch.isnan(composite.last_terms[name]), name
