"""Bad input raises a clear TypeError/ValueError naming the argument and what was expected."""

from __future__ import annotations

import math
import re

import pytest
import torch

import dynloss
from dynloss import functional as F

ALL = list(dynloss.LOSSES.values())


def raises(exc, pattern):
    return pytest.raises(exc, match=re.escape(pattern) if not pattern.startswith("re:")
                         else pattern[3:])


@pytest.mark.parametrize("cls", ALL)
def test_unknown_mode_and_reduction_and_backend(cls):
    with raises(ValueError, "mode must be one of 'binary', 'multilabel', 'multiclass'; got 'bin'"):
        cls(mode="bin")
    with raises(ValueError, "reduction must be one of 'mean', 'sum', 'none'; got 'avg'"):
        cls(reduction="avg")
    with raises(ValueError, "backend must be one of"):
        cls(backend="cuda")


@pytest.mark.parametrize("cls", ALL)
def test_shape_mismatch(cls):
    with raises(ValueError, "target shape (2, 1, 4, 5) does not match input shape (2, 1, 4, 4)"):
        cls()(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with raises(ValueError, "in mode='multilabel' the target must have the input's shape"):
        cls(mode="multilabel")(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4))


@pytest.mark.parametrize("cls", ALL)
def test_shape_mismatch_of_a_one_dimensional_binary_input(cls):
    """A binary input (N,) is N one-pixel samples; a target of another shape is a ValueError,
    not an IndexError from the hint (found by a review of unusual inputs)."""
    x = torch.zeros(4)
    for target, shown in ((torch.ones(4, 1), "(4, 1)"), (torch.ones(3), "(3)"),
                          (torch.ones(5), "(5)")):
        with raises(ValueError, f"target shape {shown} does not match input shape (4)"):
            cls()(x, target)
    with raises(ValueError, "target shape (5) does not match input shape (4)"):
        F.bce_loss(x, torch.ones(5))


@pytest.mark.parametrize("cls", ALL)
def test_wrong_channel_count_for_the_mode(cls):
    with raises(ValueError, "the input has 3 channels but mode='binary' needs 1 channel"):
        cls()(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4))
    with raises(ValueError, "mode='multiclass' needs an input with C >= 2 channels; got C=1"):
        cls(mode="multiclass")(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with raises(ValueError, "looks one-hot: pass target.argmax(1)"):
        cls(mode="multiclass")(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("cls", ALL)
def test_binary_target_outside_unit_interval(cls):
    with raises(ValueError, "target values must lie in [0, 1] in mode='binary'; got values from "
                            "0.0 to 2.0"):
        cls()(torch.zeros(1, 1, 2, 2), torch.tensor([[[[0.0, 1.0], [2.0, 0.0]]]]))
    with raises(ValueError, "got values from -1 to 1"):
        cls(mode="multilabel")(torch.zeros(1, 2, 2), torch.tensor([[[0, 1], [-1, 0]]]))
    # NaN targets are rejected too
    with raises(ValueError, "target values must lie in [0, 1]"):
        cls()(torch.zeros(1, 1, 2), torch.tensor([[[0.0, float("nan")]]]))
    # ignore_index pixels are exempt
    cls(ignore_index=255)(torch.zeros(1, 1, 2), torch.tensor([[[1.0, 255.0]]]))


@pytest.mark.parametrize("cls", ALL)
def test_value_checks_are_behind_a_switch(cls):
    bad = torch.tensor([[[0.0, 3.0]]])
    unchecked = cls(check_values=False)(torch.zeros(1, 1, 2), bad)  # no error, no sync
    assert unchecked.isnan(), unchecked  # an invalid target makes the loss NaN (documented)
    with raises(ValueError, "target values must lie in [0, 1]"):
        cls(check_values=True)(torch.zeros(1, 1, 2), bad)


@pytest.mark.parametrize("cls", ALL)
def test_multiclass_target_outside_class_range_and_float_target(cls):
    logits = torch.zeros(1, 3, 2)
    with raises(ValueError, "target class indices must lie in [0, 3) for an input with C=3 "
                            "channels; got values from 0 to 3"):
        cls(mode="multiclass")(logits, torch.tensor([[0, 3]]))
    with raises(ValueError, "or equal ignore_index=-100; got values from -1 to 2"):
        cls(mode="multiclass", ignore_index=-100)(logits, torch.tensor([[-1, 2]]))
    cls(mode="multiclass", ignore_index=-100)(logits, torch.tensor([[-100, 2]]))
    with raises(TypeError, "target must be an integer tensor of class indices in "
                           "mode='multiclass'; got torch.float32"):
        cls(mode="multiclass")(logits, torch.tensor([[0.0, 1.0]]))
    with raises(TypeError, "got torch.bool"):
        cls(mode="multiclass")(logits, torch.tensor([[True, False]]))



@pytest.mark.parametrize("cls", ALL)
def test_float_class_index_targets_get_a_hint_that_keeps_the_classes(cls):
    """A float label map ((N, 1, *spatial), nnU-Net's) was told to take ``.argmax(1)``, which
    makes it all zeros: a silently wrong target for whoever follows the hint."""
    logits = torch.zeros(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 1, 4, 4)).float()
    with raises(TypeError, "got torch.float32 (class indices stored as floats: pass "
                           "target[:, 0].long())"):
        cls(mode="multiclass")(logits, labels)
    with raises(TypeError, "(class indices stored as floats: pass target.long())"):
        cls(mode="multiclass")(logits, labels[:, 0])
    with raises(TypeError, "(a one-hot or probability target: pass target.argmax(1))"):
        cls(mode="multiclass")(logits, torch.zeros(2, 3, 4, 4))
    with raises(ValueError, "has a channel dimension of size 1: pass target[:, 0]"):
        cls(mode="multiclass")(logits, labels.long())
    # bool targets: argmax refuses bool, and a mask of indices wants .long()
    one_hot = torch.nn.functional.one_hot(labels[:, 0].long(), 3).movedim(-1, 1).bool()
    with raises(TypeError, "(a one-hot target: pass target.long().argmax(1))"):
        cls(mode="multiclass")(logits, one_hot)
    assert torch.equal(one_hot.long().argmax(1), labels[:, 0].long())
    with raises(TypeError, "got torch.bool (class indices stored as bool: pass target.long())"):
        cls(mode="multiclass")(logits, labels[:, 0] > 0)


@pytest.mark.parametrize("cls", ALL)
def test_a_mode_passed_in_the_place_of_a_number_says_mode_is_a_keyword(cls):
    """smp's order, ``FocalLoss("multiclass")``, said only "gamma must be a real number". (A
    loss that takes no argument by position, as one added by docs/adding-a-loss.md may, gets
    Python's own "takes 1 positional argument".)"""
    import inspect

    by_position = [p for p in inspect.signature(cls).parameters.values()
                   if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    try:
        cls("multiclass")
    except TypeError as error:
        expected = ("pass the mode by keyword: mode='multiclass'" if by_position
                    else "takes 1 positional argument but 2 were given")
        assert expected in str(error), str(error)
    else:  # the losses whose first argument is the mode
        assert by_position[0].name == "mode" and cls("multiclass").mode == "multiclass"


@pytest.mark.parametrize("cls", ALL)
def test_input_types(cls):
    with raises(TypeError, "input must be a floating-point tensor of logits or probabilities; "
                           "got torch.int64"):
        cls()(torch.zeros(1, 1, 2, dtype=torch.long), torch.zeros(1, 1, 2))
    with raises(TypeError, "input must be a torch.Tensor; got list"):
        cls()([0.0, 1.0], torch.zeros(1, 1, 2))
    with raises(TypeError, "target must be a torch.Tensor; got ndarray"):
        import numpy as np

        cls()(torch.zeros(1, 1, 2), np.zeros((1, 1, 2)))
    with raises(TypeError, "target must be a real (float, integer or bool) tensor"):
        cls()(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2, dtype=torch.complex64))
    with raises(ValueError, "input must hold probabilities in [0, 1] when from_logits=False"):
        cls(from_logits=False)(torch.tensor([[[0.5, 1.5]]]), torch.zeros(1, 1, 2))
    with raises(TypeError, "from_logits must be a bool; got str 'yes'"):
        cls(from_logits="yes")
    with raises(TypeError, "ignore_index must be an int or None; got float 255.0"):
        cls(ignore_index=255.0)


def test_hyperparameter_ranges():
    for k in (0, -0.1, 1.5, float("nan")):
        with raises(ValueError, "re:k must be (a fraction in \\(0, 1\\]|finite)"):
            dynloss.TopKLoss(k)
    with raises(TypeError, "k must be a real number; got str '0.5'"):
        dynloss.TopKLoss("0.5")
    with raises(ValueError, "alpha must be >= 0; got -0.1"):
        dynloss.TverskyLoss(-0.1, 0.7)
    with raises(ValueError, "beta must be >= 0; got -1.0"):
        dynloss.TverskyLoss(0.3, -1.0)
    with raises(ValueError, "gamma must be >= 0; got -2.0"):
        dynloss.FocalLoss(-2.0)
    with raises(ValueError, "alpha must lie in [0, 1]; got 1.5"):
        dynloss.FocalLoss(2.0, 1.5)
    with raises(TypeError, "alpha must be None or a sequence of per-class weights in "
                           "mode='multiclass'; got float 0.25"):
        dynloss.FocalLoss(2.0, 0.25, mode="multiclass")
    with raises(ValueError, "alpha must hold one weight per class: 3 values for an input with "
                            "C=3; got 2"):
        dynloss.FocalLoss(2.0, [1.0, 2.0], mode="multiclass")(
            torch.zeros(1, 3, 2), torch.zeros(1, 2, dtype=torch.long))
    for cls in (dynloss.DiceLoss, dynloss.IoULoss, dynloss.TverskyLoss):
        with raises(ValueError, "smooth must be >= 0; got -1.0"):
            cls(smooth=-1.0)
        with raises(ValueError, "eps must be >= 0; got -1e-07"):
            cls(eps=-1e-7)
        with raises(ValueError, "smooth + eps must be > 0"):
            cls(smooth=0.0, eps=0.0)
        # below float32's smallest normal number the backends disagreed (native 0 and inf
        # where the reference gave NaN) and native divided by zero on the host (1e-300)
        for eps in (1e-40, 1e-300):
            with raises(ValueError, "smooth + eps must be at least 1.1754943508222875e-38 "
                                    "(float32's smallest normal number"):
                cls(smooth=0.0, eps=eps)
        cls(smooth=0.0, eps=1.1754943508222875e-38)  # the smallest accepted
        with raises(TypeError, "per_image must be a bool; got int 1"):
            cls(per_image=1)


def test_functional_forms_check_their_arguments_too():
    x, t = torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)
    with raises(ValueError, "k must be a fraction in (0, 1]; got 10.0"):
        F.topk_loss(x, t, k=10)
    with raises(ValueError, "gamma must be >= 0"):
        F.focal_loss(x, t, gamma=-1)
    with raises(ValueError, "alpha must be >= 0"):
        F.tversky_loss(x, t, alpha=-1)
    with raises(ValueError, "mode must be one of"):
        F.dice_loss(x, t, mode="multi")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_is_reported():
    with raises(ValueError, "input and target must be on the same device"):
        dynloss.DiceLoss()(torch.zeros(1, 1, 2, device="cuda"), torch.zeros(1, 1, 2))


WIDE_UNSIGNED = [torch.uint16, torch.uint32, torch.uint64]
FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("mode, dtype", [*(("binary", d) for d in [*WIDE_UNSIGNED, *FLOAT8]),
                                         *(("multiclass", d) for d in WIDE_UNSIGNED)])
def test_targets_of_every_integer_and_float_dtype_are_read_as_their_values(mode, dtype, cls,
                                                                           backend):
    """uint16 label maps (as nibabel reads many NIfTI files) worked on the native path and
    crashed elsewhere with NotImplementedError ("aminmax_cpu" not implemented for 'UInt16'),
    depending on the input's dtype; float8 targets alike. Found by a dtype review."""
    generator = torch.Generator().manual_seed(5)
    if mode == "binary":
        logits = torch.randn(2, 1, 4, 4, generator=generator)
        labels = (torch.rand(2, 1, 4, 4, generator=generator) > 0.5).long()
    else:
        logits = torch.randn(2, 3, 4, 4, generator=generator)
        labels = torch.randint(0, 3, (2, 4, 4), generator=generator)
    loss = cls(mode=mode, backend=backend)
    for x in (logits, logits.half()):
        want = cls(mode=mode, backend="reference")(x, labels)
        torch.testing.assert_close(loss(x, labels.to(dtype)), want)
    if mode == "binary" and dtype in WIDE_UNSIGNED:
        with pytest.raises(ValueError, match=r"target values must lie in \[0, 1\]"):
            loss(logits, (labels * 2).to(dtype))


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_a_uint64_label_above_int64_is_named_as_too_large(mode, backend):
    """A uint64 label above int64's range wrapped negative when read as int64: the error
    said "got values from -9223372036854775803" for a label 2**63 + 5. Such labels now read
    as 2**63 - 1, too large for any mode, and the error says so."""
    x = torch.randn(1, 3 if mode == "multiclass" else 1, 2, 2)
    labels = torch.tensor([0, 1, 1 if mode == "binary" else 2, 2**63 + 5], dtype=torch.uint64)
    labels = labels.view(1, 2, 2) if mode == "multiclass" else labels.view(1, 1, 2, 2)
    for cls in ALL:
        with pytest.raises(ValueError, match=r"got values from 0 to 9223372036854775807"):
            cls(mode=mode, backend=backend)(x, labels)
        with pytest.raises(ValueError, match=r"got values from 0 to 9223372036854775807"):
            cls(mode=mode, backend=backend, ignore_index=-1)(x, labels)


@pytest.mark.parametrize("dtype", FLOAT8)
@pytest.mark.parametrize("cls", ALL)
def test_a_float8_input_is_computed_in_float32(cls, dtype):
    """float8 logits crashed with NotImplementedError; the docs say any float dtype, computed
    in float32 at least. The gradient comes back in the input's dtype."""
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 1, 4, 4, generator=generator).to(dtype)
    target = (torch.rand(2, 1, 4, 4, generator=generator) > 0.5).float()
    x = logits.clone().requires_grad_()
    value = cls()(x, target)
    value.backward()
    wide = logits.float().requires_grad_()
    want = cls(backend="reference")(wide, target)
    want.backward()
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, want)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), wide.grad.to(dtype).float())


@pytest.mark.parametrize("make", [
    lambda big: dynloss.FocalLoss(gamma=big),
    lambda big: dynloss.DiceLoss(smooth=big),
    lambda big: dynloss.TverskyLoss(alpha=big),
    lambda big: dynloss.LinearRamp(0, 10, initial=big),
    lambda big: dynloss.Plateau(min_delta=big),
    lambda big: dynloss.CompositeLoss([dynloss.DiceLoss(), dynloss.BCELoss()], weights=[1, big]),
])
def test_an_int_too_large_for_a_float_is_a_value_error_naming_the_argument(make):
    """``float(10**400)`` raises OverflowError; the checks said nothing of the argument."""
    with pytest.raises(ValueError, match="must be finite; got a number too large for a float"):
        make(10**400)


@pytest.mark.parametrize("backend", ["auto", "reference", "torch", "native"])
@pytest.mark.parametrize("loss", [dynloss.DiceLoss, dynloss.BCELoss, dynloss.TopKLoss])
def test_multilabel_without_channels_is_a_value_error(loss, backend):
    """C = 0 crashed in the native kernel (code 2) and the torch backend's reshape; the
    reference returned 0."""
    x, t = torch.zeros(2, 0, 4, 4), torch.zeros(2, 0, 4, 4)
    with pytest.raises(ValueError, match=r"mode='multilabel' needs an input with C >= 1 "
                                         r"channels; got C=0 in input shape \(2, 0, 4, 4\)"):
        loss(mode="multilabel", backend=backend)(x, t)


@pytest.mark.parametrize("check_values", [True, None])
@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("loss", [dynloss.DiceLoss, dynloss.FocalLoss])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_meta_tensors_give_the_shape(loss, mode, backend, check_values):
    """A meta tensor holds no values to check: ``check_values=True`` crashed in ``.item()``;
    the torch backend's multiclass region sums crashed in ``bincount`` (no meta kernel)."""
    x = torch.zeros(2, 3 if mode == "multiclass" else 1, 4, 4, device="meta",
                    requires_grad=True)
    t = (torch.zeros(2, 4, 4, dtype=torch.long) if mode == "multiclass"
         else torch.zeros(2, 1, 4, 4)).to("meta")
    value = loss(mode=mode, backend=backend, check_values=check_values)(x, t)
    assert value.is_meta and value.shape == ()
    (grad,) = torch.autograd.grad(value, x)
    assert grad.is_meta and grad.shape == x.shape


@pytest.mark.parametrize("make", [
    lambda: dynloss.DiceLoss(smooth=1e39),
    lambda: dynloss.TverskyLoss(alpha=1e39),
    lambda: dynloss.TverskyLoss(beta=3.5e38),
    lambda: F.iou_loss(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), eps=1e39),
    lambda: dynloss.FocalLoss(mode="multiclass", alpha=[1e39, 1.0, 1.0]),
    lambda: dynloss.FocalLoss(gamma=1e39),
    lambda: F.focal_loss(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), gamma=3.5e38),
])
def test_arguments_beyond_float32_are_refused(make):
    """A finite argument above float32's largest number (1e39) gave NaN on the reference and
    torch backends (it overflowed to inf in float32) and 0 on the native kernels; a Focal
    ``gamma`` of 1e39 gave 7.5 on the reference and NaN on the native kernels (found by a
    review of unusual inputs)."""
    with pytest.raises(ValueError, match=r"(smooth \+ eps|alpha|beta|alpha\[0\]|gamma) must be "
                                         r"at most 3\.4028234663852886e\+38 \(float32's "
                                         r"largest"):
        make()


@pytest.mark.parametrize(("dtype", "ignore"), [(torch.bool, 1), (torch.bfloat16, 255),
                                               (torch.float16, 2047)])
def test_an_ignore_index_the_target_dtype_holds_exactly_is_honoured(dtype, ignore):
    """An ignore_index a bool, bfloat16 or float16 target holds exactly (1; 255 with bfloat16's
    8 significant bits; 2047 with float16's 11) ignores those pixels, as with a float32
    target (bfloat16 and 255 was refused as out of [0, 1]; a bool 1 ignored nothing)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 4, 4, generator=gen)
    target = (torch.rand(2, 1, 4, 4, generator=gen) > 0.5).float()
    target[0, 0, :2] = ignore
    # to float32 rounding: the native loops are compiled per target type, and the compiler may
    # vectorise (so sum) a bool target's loop in another order than a float one's (1 ulp apart
    # on a 2-vCPU AMD EPYC without AVX-512, GCC 12); ignoring nothing would change the value in
    # its first digits
    for loss in (dynloss.BCELoss(ignore_index=ignore), dynloss.DiceLoss(ignore_index=ignore)):
        torch.testing.assert_close(loss(x, target.to(dtype)), loss(x, target), rtol=1e-6, atol=0)


def _warn_free(make):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (sparse CSR, quantization and nested tensors warn)
        return make()


_X = torch.randn(2, 1, 4, 4)
_T = (torch.rand(2, 1, 4, 4) > 0.5).float()
_NOT_DENSE = {
    "target-sparse": (lambda: (_X, _T.to_sparse()), "target", "torch.sparse_coo"),
    "input-sparse": (lambda: (_X.to_sparse(), _T), "input", "torch.sparse_coo"),
    "input-mkldnn": (lambda: (_X.to_mkldnn(), _T), "input", "torch._mkldnn"),
    "input-nested": (lambda: (torch.nested.nested_tensor([_X[0], _X[1]]), _T), "input",
                     "nested"),
    "target-nested": (lambda: (_X, torch.nested.nested_tensor([_T[0], _T[1]])), "target",
                      "nested"),
}


@pytest.mark.parametrize("backend", ["auto", "reference", "torch"])
@pytest.mark.parametrize("case", list(_NOT_DENSE))
@pytest.mark.parametrize("planned", [False, True], ids=["first-call", "after-a-dense-call"])
def test_a_tensor_that_is_not_dense_is_a_type_error_naming_it(case, backend, planned):
    """Sparse, MKL-DNN and nested tensors failed with torch's RuntimeError from inside (and,
    after a dense call of the same shape, skipped the checks of a planned signature)."""
    make, name, what = _NOT_DENSE[case]
    loss = dynloss.DiceLoss(backend=backend)
    if planned:
        loss(_X, _T)
    x, t = _warn_free(make)
    with raises(TypeError, f"re:{name} must be a dense tensor \\(torch.strided\\); got a "
                           f"{re.escape(what)}"):
        loss(x, t)


@pytest.mark.parametrize("dtype", [d for d in ("uint4", "int2", "bits8", "quint8")
                                   if hasattr(torch, d)])
def test_a_target_dtype_torch_cannot_compute_with_is_a_type_error(dtype):
    dt = getattr(torch, dtype)
    if dtype == "quint8":
        target = _warn_free(lambda: torch.quantize_per_tensor(_T, 1.0, 0, dt))
    else:
        target = torch.zeros(2, 1, 4, 4, dtype=torch.uint8).view(dt)
    with raises(TypeError, f"target dtype {dt} is not supported"):
        dynloss.DiceLoss()(_X, target)


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="no float4 in this torch")
def test_a_packed_float4_input_is_a_type_error():
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with raises(TypeError, "input dtype torch.float4_e2m1fn_x2 is not supported"):
        dynloss.DiceLoss()(x, _T)


@pytest.mark.parametrize("backend", ["native", "torch", "reference"])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_the_range_of_bad_probabilities_leaves_out_ignored_pixels(backend, mode):
    """The native kernels' error named the range over every pixel (7.0 of an ignored one)."""
    if mode == "binary":
        p = torch.full((1, 1, 2, 2), 0.5)
        t = torch.tensor([[[[255.0, 1.0], [0.0, 1.0]]]])
        p[0, 0, 0, 0] = 7.0  # ignored
        p[0, 0, 1, 1] = 1.5  # kept, out of range
        expected = "got values from 0.5 to 1.5"
    else:
        p = torch.full((1, 2, 2, 2), 0.5)
        t = torch.tensor([[[255, 1], [0, 1]]])
        p[0, :, 0, 0] = -3.0  # ignored
        p[0, 1, 1, 1] = 1.25
        expected = "got values from 0.5 to 1.25"
    loss = dynloss.DiceLoss(mode=mode, from_logits=False, ignore_index=255, backend=backend)
    with raises(ValueError, expected):
        loss(p, t)


def test_a_fallback_warning_says_why_the_fallback_was_taken():
    """A float64 input with a target that requires a gradient said only "cannot compute
    torch.float64 input" and named the reference, which float64 alone does not need. (The
    Triton kernels, run here by their interpreter: the native ones now compute float64 and
    everything the torch backend does.)"""
    import warnings

    from dynloss.kernels.dispatch import REGISTRY, clear_cache
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    if REGISTRY["triton"].unavailable(x) is not None:
        pytest.skip("needs the Triton kernels (CUDA, or the interpreter on the CPU)")
    clear_cache()
    t = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dynloss.DiceLoss(backend="triton")(x, t)
        dynloss.DiceLoss(backend="triton")(x, t.detach())
    messages = [str(w.message) for w in caught if "backend='triton'" in str(w.message)]
    assert messages == [
        "dynloss: backend='triton' cannot compute torch.float64 input; using the 'reference' "
        "backend for such calls (the 'torch' backend cannot compute a gradient for the "
        "target)",
        "dynloss: backend='triton' cannot compute torch.float64 input; using the 'torch' "
        "backend for such calls",
    ]


def test_topk_k_none_is_a_type_error_not_bce():
    """``topk_loss(k=None)`` and a ``TopKLoss`` whose ``k`` was set to None computed BCE
    silently (None meant "not TopK" inside). Found by a review of TopK."""
    x, t = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    with pytest.raises(TypeError, match="k must be a real number; got NoneType None"):
        F.topk_loss(x, t, k=None)
    loss = dynloss.TopKLoss()
    loss.k = None
    with pytest.raises(TypeError, match="k must be a real number; got NoneType None"):
        loss(x, t)


def test_an_attribute_that_is_not_an_argument_never_changes_a_loss():
    """``BCELoss`` has no ``gamma`` and ``TopKLoss`` no ``alpha``, but the losses read them
    if set: ``bce.gamma = 2.0`` made a BCELoss compute focal once it was rebuilt (a copy, or
    another argument reassigned), with its repr still ``BCELoss()``."""
    import copy

    x, t = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    for loss, stray in [(dynloss.BCELoss(), {"gamma": 2.0, "alpha": 0.9, "k": 0.1}),
                        (dynloss.TopKLoss(k=0.5), {"alpha": 0.9, "gamma": 3.0}),
                        (dynloss.FocalLoss(), {"k": 0.1})]:
        want = loss(x, t)
        for name, value in stray.items():
            setattr(loss, name, value)
        loss.reduction = "mean"  # rebuilt
        torch.testing.assert_close(loss(x, t), want, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(loss)(x, t), want, rtol=0, atol=0)


def test_tversky_index_checks_its_arguments_like_the_losses():
    """The public ``tversky_index`` took ``alpha=-1`` (index 1), NaN, ``True``, a negative
    smoothing, and crashed inside torch on a string or on shapes that do not broadcast."""
    i, p, g = torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([5.0])
    for name, position in (("alpha", 3), ("beta", 4), ("smoothing", 5)):
        for bad, error, message in [(-1.0, ValueError, f"{name} must be >= 0; got -1.0"),
                                    (math.nan, ValueError, f"{name} must be finite; got nan"),
                                    (True, TypeError, f"{name} must be a real number; got bool"),
                                    ("0.5", TypeError, f"{name} must be a real number; got str"),
                                    (None, TypeError,
                                     f"{name} must be a real number; got NoneType")]:
            args = [i, p, g, 0.5, 0.5, 0.0]
            args[position] = bad
            with pytest.raises(error, match=re.escape(message)):
                F.tversky_index(*args)
    with pytest.raises(TypeError, match="prediction_sum must be a tensor or a real number; "
                                        "got str"):
        F.tversky_index(i, "4", g, 0.5, 0.5, 0.0)
    with pytest.raises(TypeError, match="intersection must be a tensor or a real number; "
                                        "got bool True"):
        F.tversky_index(True, 2.0, 2.0, 0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match=re.escape(
            "intersection, prediction_sum and target_sum must broadcast to one shape; got "
            "(2,), (3,) and (1,)")):
        F.tversky_index(torch.ones(2), torch.ones(3), g, 0.5, 0.5, 0.0)
    assert F.tversky_index(3.0, 4.0, 5.0, 0.5, 0.5, 0.0) == pytest.approx(6 / 9)
    torch.testing.assert_close(F.tversky_index(i, p, g, 1, 1, 0), torch.tensor([0.5]))
    # found by a review of bad input: an int beyond float's range was an OverflowError, and
    # sums on two devices torch's RuntimeError, where the shapes had a ValueError naming them
    with pytest.raises(ValueError, match=re.escape(
            "prediction_sum must be finite; got a number too large for a float")):
        F.tversky_index(3, 10**400, 5, 0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match=re.escape(
            "intersection, prediction_sum and target_sum must be on one device; got meta, cpu "
            "and cpu")):
        F.tversky_index(torch.ones(2, device="meta"), torch.ones(2), g, 0.5, 0.5, 0.0)
    torch.testing.assert_close(  # a 0-d CPU tensor goes with any device, as in torch
        F.tversky_index(torch.tensor(3.0), p, g, 0.5, 0.5, 0.0), torch.tensor([6 / 9]))
    with pytest.raises(ValueError, match=re.escape(  # a 0-d tensor elsewhere does not
            "intersection, prediction_sum and target_sum must be on one device; got meta, cpu "
            "and cpu")):
        F.tversky_index(torch.tensor(3.0, device="meta"), p, g, 0.5, 0.5, 0.0)


def test_tversky_index_of_numbers_divides_as_a_tensor_does():
    """Python numbers with a zero denominator raised ZeroDivisionError where tensors give NaN
    (0/0) or inf: a number is divided as a tensor of it would be."""
    for sums, weights in [((0.0, 0.0, 0.0), (0.5, 0.5, 0.0)), ((1.0, 0.0, 1.0), (1.0, 0.0, 0.0)),
                          ((-1.0, 0.0, -1.0), (1.0, 0.0, 0.0)), ((3.0, 4.0, 5.0), (0.3, 0.7, 0))]:
        want = F.tversky_index(*(torch.tensor([v], dtype=torch.float64) for v in sums), *weights)
        got = F.tversky_index(*sums, *weights)
        assert isinstance(got, float)
        torch.testing.assert_close(torch.tensor([got], dtype=torch.float64), want,
                                   equal_nan=True, rtol=0, atol=0)


def test_tversky_index_takes_tensor_weights_and_compiles_with_changing_ones():
    """The checks of the previous fix refused a learnable (tensor) ``alpha`` and broke
    ``torch.compile(fullgraph=True)`` when a float weight changed between calls (a symbolic
    float). Found by a review of that fix."""
    i, p, g = torch.tensor([3.0, 1.0]), torch.tensor([4.0, 2.0]), torch.tensor([5.0, 1.0])
    alpha = torch.tensor(0.3, requires_grad=True)
    value = F.tversky_index(i, p, g, alpha, 0.7, 0.0)
    value.sum().backward()
    torch.testing.assert_close(value, F.tversky_index(i, p, g, 0.3, 0.7, 0.0))
    assert alpha.grad is not None and alpha.grad < 0

    compiled = torch.compile(F.tversky_index, fullgraph=True, backend="eager")
    for a in (0.3, 0.4, 0.5):
        torch.testing.assert_close(compiled(i, p, g, a, 1 - a, 0.0),
                                   F.tversky_index(i, p, g, a, 1 - a, 0.0))


def test_a_numpy_scalar_under_compile_is_named_with_a_hint():
    """Dynamo traces a NumPy scalar argument as a tensor: the checks' error then failed on
    the tensor's repr ("Unsupported repr() on tensor"); it now says what to pass."""
    np = pytest.importorskip("numpy")
    x, labels = torch.randn(2, 3, 4), torch.tensor([[0, 1, 2, 2], [1, 2, 1, 0]])
    for kwargs in ({"smooth": np.float64(1.0)}, {"ignore_index": np.int64(255)}):
        torch._dynamo.reset()
        compiled = torch.compile(
            lambda a, t, kw=kwargs: F.dice_loss(a, t, mode="multiclass", **kw),
            fullgraph=True, backend="eager")
        with pytest.raises(Exception, match="pass a Python number"):
            compiled(x, labels)
    torch._dynamo.reset()


def test_a_subclass_that_declares_alpha_reads_it():
    """Each loss reads only its own arguments (the previous fix), and those its subclass's
    constructor declares: a class-balanced BCE with its own ``alpha`` lost it."""
    class BalancedBCE(dynloss.BCELoss):
        def __init__(self, alpha: float = 0.25, *, mode: str = "binary") -> None:
            super().__init__(mode=mode, backend="reference")
            self.alpha = alpha
            self._ready()

    x, t = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    torch.testing.assert_close(BalancedBCE(alpha=0.9)(x, t),
                               F.focal_loss(x, t, gamma=0.0, alpha=0.9, backend="reference"))


def test_a_subclass_that_declares_k_is_bce_or_topk_as_given():
    """A BCE subclass with its own optional ``k`` crashed when built (``k`` was checked
    while its base constructor ran, before the subclass set it). Found by a review."""
    class MaybeTopK(dynloss.BCELoss):
        def __init__(self, k: float | None = None) -> None:
            super().__init__(backend="reference")
            self.k = k
            self._ready()

    x, t = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    torch.testing.assert_close(MaybeTopK(0.5)(x, t), F.topk_loss(x, t, k=0.5))
    torch.testing.assert_close(MaybeTopK()(x, t), F.bce_loss(x, t))


def test_under_compile_a_wrong_python_value_is_still_shown():
    """The NumPy hint replaced every value under ``torch.compile``: ``ignore_index=2.5``
    read "got float (... pass a Python number)" though it was one."""
    x, labels = torch.randn(2, 3, 4), torch.tensor([[0, 1, 2, 2], [1, 2, 1, 0]])
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, t: F.dice_loss(a, t, mode="multiclass", ignore_index=2.5),
                             fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"ignore_index must be an int or None; got float 2\.5"):
        compiled(x, labels)
    torch._dynamo.reset()


def test_a_numpy_float32_hyperparameter_is_read_as_its_shortest_decimal():
    """np.float32(0.1) is 0.10000000149...: TopK's ceil(k * M) then kept 11 of 100 elements
    where k=0.1 keeps 10."""
    np = pytest.importorskip("numpy")
    x, t = torch.linspace(-3, 3, 100).reshape(1, 1, 100), torch.zeros(1, 1, 100)
    for dtype in (np.float32, np.float16):
        loss = dynloss.TopKLoss(k=dtype(0.1))
        assert loss.k == 0.1 and type(loss.k) is float
        torch.testing.assert_close(loss(x, t), dynloss.TopKLoss(k=0.1)(x, t), rtol=0, atol=0)
    assert dynloss.FocalLoss(gamma=np.float64(0.1)).gamma == 0.1  # float64: as it is
    with raises(ValueError, "k must be finite; got inf"):
        dynloss.TopKLoss(k=np.float32("inf"))


def test_focal_multiclass_alpha_may_be_a_tensor():
    """``FocalLoss(alpha=torch.tensor([...]), mode="multiclass")`` raised TypeError, where
    BCE's ``weight``/``pos_weight`` and Dice's ``weight`` take a 1-D tensor (MONAI's and
    torch's weights are tensors): its values are the weights."""
    import dynloss.functional as F

    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    listed = dynloss.FocalLoss(2.0, [0.2, 1.0, 3.0], mode="multiclass")
    given = dynloss.FocalLoss(2.0, torch.tensor([0.2, 1.0, 3.0]), mode="multiclass")
    assert given.alpha == [0.2, 1.0, 3.0] and repr(given) == repr(listed)
    assert torch.equal(given(logits, target), listed(logits, target))
    assert torch.equal(F.focal_loss(logits, target, alpha=torch.tensor([0.2, 1.0, 3.0]),
                                    mode="multiclass"), listed(logits, target))
    given.alpha = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    assert given.alpha == [1.0, 1.0, 0.5]
    binary = dynloss.FocalLoss(2.0, 0.25)  # one weight in [0, 1]: a tensor is no number
    binary.alpha = torch.tensor([0.5])
    with raises(TypeError, "alpha must be a real number; got Tensor tensor([0.5000])"):
        binary(torch.zeros(1, 1, 2), torch.ones(1, 1, 2))
    with raises(ValueError, "alpha[1] must be >= 0; got -1.0"):
        dynloss.FocalLoss(2.0, torch.tensor([1.0, -1.0, 1.0]), mode="multiclass")
    with raises(TypeError, "alpha must be None or a sequence of per-class weights in "
                           "mode='multiclass'; got Tensor tensor([[1., 1., 1.]])"):
        dynloss.FocalLoss(2.0, torch.ones(1, 3), mode="multiclass")


def test_a_nan_value_is_named_as_such():
    """One NaN among valid targets (or probabilities) was reported as "got values from nan to
    nan", as if every value were NaN: torch.aminmax gives NaN for both ends."""
    x = torch.full((1, 1, 4), 0.5)
    target = torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])
    bad_x, bad_target = x.clone(), target.clone()
    bad_x[0, 0, 1] = bad_target[0, 0, 2] = float("nan")
    with raises(ValueError, "target values must lie in [0, 1] in mode='binary'; got NaN"):
        dynloss.DiceLoss()(x, bad_target)
    with raises(ValueError, "input must hold probabilities in [0, 1] when from_logits=False; "
                            "got NaN (pass from_logits=True for logits)"):
        dynloss.BCELoss(from_logits=False)(bad_x, target)
    with raises(ValueError, "target values must lie in [0, 1] in mode='multilabel'; got values "
                            "from -1.0 to 1.0"):  # (a range without NaN as before)
        dynloss.DiceLoss("multilabel")(torch.zeros(1, 2, 2), torch.tensor([[[0.0, -1.0],
                                                                          [1.0, 0.0]]]))


@pytest.mark.parametrize("build, name", [
    (lambda w: dynloss.DiceLoss(mode="multiclass", weight=w), "weight"),
    (lambda w: dynloss.TverskyLoss(mode="multilabel", weight=w), "weight"),
    (lambda w: dynloss.BCELoss(mode="multiclass", weight=w), "weight"),
    (lambda w: dynloss.FocalLoss(mode="multiclass", alpha=w), "alpha"),
    (lambda w: dynloss.BCELoss("multilabel", pos_weight=w), "pos_weight"),
    (lambda w: dynloss.BCELoss(pos_weight=w[:1]), "pos_weight"),
])
def test_weights_on_the_meta_device_are_refused_naming_the_argument(build, name):
    """Weights built under ``torch.device("meta")`` crashed the constructors with
    NotImplementedError ("Cannot copy out of meta tensor") where every other bad weight gets
    a ValueError naming it."""
    with torch.device("meta"):
        weights = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=re.escape(
            f"{name} is a tensor on the meta device, which holds no values to read: create it "
            "on the CPU (or give numbers)")):
        build(weights)
    build(torch.tensor([1.0, 2.0, 3.0]))  # the same weights on the CPU are taken


def test_a_reassigned_list_is_named_a_list_in_the_error():
    """``FocalLoss().alpha = [0.1, 0.2]`` in binary mode was refused as "got _Weights [0.1,
    0.2]", a private class's name (the loss keeps per-class weights in a list that refuses
    changes in place); the constructor says "list" (found by a review of bad input)."""
    import dynloss

    loss = dynloss.FocalLoss()
    loss.alpha = [0.1, 0.2]
    with pytest.raises(TypeError, match=r"^alpha must be a real number; got list \[0\.1, 0\.2\]$"):
        loss(torch.randn(2, 1, 4, 4), torch.ones(2, 1, 4, 4))
    with pytest.raises(TypeError, match=r"^alpha must be a real number; got list \[0\.1, 0\.2\]$"):
        dynloss.FocalLoss(alpha=[0.1, 0.2])


@pytest.mark.parametrize("make, name, scalar", [
    (lambda w: dynloss.DiceLoss(mode="multiclass", weight=w), "weight", False),
    (lambda w: dynloss.TverskyLoss(mode="multilabel", weight=w), "weight", False),
    (lambda w: dynloss.BCELoss(mode="multiclass", weight=w), "weight", False),
    (lambda w: dynloss.FocalLoss(mode="multiclass", alpha=w), "alpha", False),
    (lambda w: dynloss.BCELoss(pos_weight=w), "pos_weight", False),
    (lambda w: dynloss.TverskyLoss(alpha=w, beta=0.5), "alpha", True),
    (lambda w: dynloss.CompositeLoss([dynloss.DiceLoss(), dynloss.BCELoss()],
                                     weights=[w, 1.0]), "weight of 'dice'", True),
], ids=["dice", "tversky", "bce", "focal", "pos_weight", "tversky-alpha", "composite"])
def test_a_sparse_tensor_hyperparameter_is_a_type_error_naming_it(make, name, scalar):
    """A sparse tensor of weights raised torch's "reshape is not implemented for sparse
    tensors" (a RuntimeError). Found by a review."""
    number = torch.tensor(0.5).to_sparse()
    given = (number,) if scalar else (torch.tensor([1.0, 0.5, 0.25]).to_sparse(), [number] * 3)
    for sparse in given:
        with pytest.raises(TypeError, match=rf"{name}.* must be a dense tensor \(torch\.strided"
                                            r"\); got a torch\.sparse_coo tensor"):
            make(sparse)


@pytest.mark.parametrize("make", [
    lambda w: dynloss.DiceLoss(mode="multiclass", weight=w),
    lambda w: dynloss.BCELoss(mode="multiclass", weight=w),
    lambda w: dynloss.FocalLoss(mode="multiclass", alpha=w),
], ids=["dice", "bce", "focal"])
def test_per_class_weights_whose_sum_overflows_float32_are_refused(make):
    """Weights each within float32 whose sum is not: the native backend raised torch's
    "value cannot be converted to type float without overflow" forming a Dice sum, and gave
    a finite mean where the reference gave inf. Found by a review."""
    with pytest.raises(ValueError, match=r"weight|alpha"):
        make([2e38, 2e38, 1.0])
    with pytest.raises(ValueError, match=r"the sum of .* is .*beyond float32's largest"):
        make([2e38, 2e38, 1.0])
    make([1e38, 1e38, 1.0])  # (a sum within float32 stays allowed)


def test_a_subnormal_class_weight_is_refused():
    """``BCELoss("multiclass", weight=[1e-40, 0, 0])``: a finite loss with a NaN gradient
    (the weighted mean divides by the weights' sum, whose reciprocal overflows float32). A
    weight is 0 or at least float32's smallest normal number. Found by a review."""
    with pytest.raises(ValueError, match=r"weight\[0\]=1e-40 is below float32's smallest "
                                         r"normal number 1\.1754944e-38: use 0 or a larger"):
        dynloss.BCELoss(mode="multiclass", weight=[1e-40, 0.0, 0.0])
    x = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    t = torch.randint(0, 3, (2, 5, 4), generator=torch.Generator().manual_seed(1))
    dynloss.BCELoss(mode="multiclass", weight=[1.2e-38, 0.0, 0.0])(x, t).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("make, name", [
    (lambda w: dynloss.DiceLoss(mode="multiclass", weight=w), "weight"),
    (lambda w: dynloss.BCELoss(mode="multiclass", weight=w), "weight"),
    (lambda w: dynloss.FocalLoss(mode="multiclass", alpha=w), "alpha"),
    (lambda w: dynloss.BCELoss(mode="multilabel", pos_weight=w), "pos_weight"),
], ids=["dice", "bce", "focal", "pos_weight"])
def test_a_nested_tensor_hyperparameter_is_a_type_error_naming_it(make, name):
    """``pos_weight`` read the nested tensor's shape first: torch's "NestedTensorImpl doesn't
    support sizes" (a RuntimeError). Found by a review."""
    with pytest.raises(TypeError, match=rf"^{name} must be a dense tensor \(torch\.strided\); "
                                        r"got a nested tensor"):
        make(torch.nested.nested_tensor([torch.ones(3)]))
