"""Hyper-parameters given as arrays: per-class weights as a NumPy array (what
``sklearn.utils.class_weight.compute_class_weight`` and ``np.bincount`` arithmetic return) are
read as their values, as a 1-D tensor is; a scalar hyper-parameter may be a 0-d tensor or a 0-d
NumPy array (``(1 - t.mean()) / t.mean()``); ``CompositeLoss`` takes its weights as a 1-D
tensor or array too. An array that is not a number or a list of numbers is still refused with
a TypeError naming the argument."""

from __future__ import annotations

import re

import pytest
import torch

import dynloss
from dynloss import functional as F

np = pytest.importorskip("numpy")

MULTICLASS = (torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)),
              torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(1)))
MULTILABEL = (MULTICLASS[0], torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(2))
              > 0.5)
BINARY = (MULTICLASS[0][:, :1], MULTILABEL[1][:, :1])

PER_CLASS = [
    (dynloss.DiceLoss, "multiclass", "weight"),
    (dynloss.IoULoss, "multilabel", "weight"),
    (dynloss.TverskyLoss, "multiclass", "weight"),
    (dynloss.BCELoss, "multiclass", "weight"),
    (dynloss.FocalLoss, "multiclass", "alpha"),
    (dynloss.BCELoss, "multilabel", "pos_weight"),
]


def inputs(mode):
    return MULTICLASS if mode == "multiclass" else MULTILABEL


@pytest.mark.parametrize("cls, mode, name", PER_CLASS)
@pytest.mark.parametrize("dtype", ["float64", "float32", "int64"])
def test_per_class_weights_as_a_numpy_array_are_its_values(cls, mode, name, dtype):
    values = [0.25, 1.0, 3.0] if dtype != "int64" else [1, 2, 3]
    loss = cls(mode=mode, **{name: np.array(values, dtype=dtype)})
    assert getattr(loss, name) == values  # float32's 0.25, 1.0, 3.0 are exact
    want = cls(mode=mode, **{name: values})(*inputs(mode))
    torch.testing.assert_close(loss(*inputs(mode)), want, rtol=0, atol=0)
    assert repr(loss) == repr(cls(mode=mode, **{name: values}))


def test_a_float32_array_reads_as_its_shortest_decimals_as_a_float32_tensor_does():
    loss = dynloss.DiceLoss("multiclass", weight=np.array([0.2, 1.1, 3.0], dtype=np.float32))
    assert loss.weight == [0.2, 1.1, 3.0]


def test_pos_weight_as_an_array_of_bce_with_logits_shapes():
    """(C, 1, 1), as BCEWithLogitsLoss takes per-channel weights of images, and 0-d / (1,)
    for one weight of every channel."""
    logits, target = MULTILABEL
    per_channel = np.array([2.0, 3.0, 0.5]).reshape(3, 1, 1)
    want = torch.nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(per_channel))(
        logits, target.float())
    got = dynloss.BCELoss("multilabel", pos_weight=per_channel)(logits, target)
    torch.testing.assert_close(got, want)
    for one in (np.array(2.0), np.array([2.0])):
        assert dynloss.BCELoss("multilabel", pos_weight=one).pos_weight == 2.0
    with pytest.raises(ValueError, match=re.escape("pos_weight must hold one weight per "
                                                   "channel: a tensor of shape (C,)")):
        dynloss.BCELoss("multilabel", pos_weight=np.ones((3, 2)))


@pytest.mark.parametrize("make", [torch.tensor, np.array], ids=["tensor", "ndarray"])
def test_a_zero_dimensional_scalar_is_its_value(make):
    logits, target = BINARY
    cases = [(dynloss.DiceLoss, "smooth", 1.0), (dynloss.DiceLoss, "eps", 1e-5),
             (dynloss.TverskyLoss, "alpha", 0.3), (dynloss.FocalLoss, "gamma", 1.5),
             (dynloss.FocalLoss, "alpha", 0.25), (dynloss.TopKLoss, "k", 0.25),
             (dynloss.BCELoss, "pos_weight", 4.0)]
    for cls, name, value in cases:
        loss = cls(**{name: make(value)})
        assert getattr(loss, name) == value and type(getattr(loss, name)) is float, name
        torch.testing.assert_close(loss(logits, target), cls(**{name: value})(logits, target),
                                   rtol=0, atol=0)
    # float32's 0.1 is read as 0.1, as a float32 NumPy scalar is
    assert dynloss.TopKLoss(k=make(0.1)).k == 0.1
    assert dynloss.DiceLoss("multiclass", ignore_index=make(255)).ignore_index == 255
    assert F.dice_loss(logits, target, smooth=make(1.0)).item() == pytest.approx(
        F.dice_loss(logits, target, smooth=1.0).item(), rel=0, abs=0)


@pytest.mark.parametrize("make", [torch.tensor, np.array], ids=["tensor", "ndarray"])
def test_an_array_that_is_no_number_is_refused_naming_the_argument(make):
    with pytest.raises(TypeError, match=r"smooth must be a real number; got (Tensor|ndarray)"):
        dynloss.DiceLoss(smooth=make([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"gamma must be a real number; got (Tensor|ndarray)"):
        dynloss.FocalLoss(gamma=make(True))
    with pytest.raises(TypeError, match=r"ignore_index must be an int or None; got "):
        dynloss.DiceLoss(ignore_index=make(2.0))
    with pytest.raises(TypeError, match=r"weight must be None or a sequence of per-class weights"):
        dynloss.DiceLoss("multiclass", weight=make([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=re.escape("weight[1] must be >= 0; got -2.0")):
        dynloss.DiceLoss("multiclass", weight=make([1.0, -2.0]))
    with pytest.raises(ValueError, match=re.escape("smooth must be finite; got nan")):
        dynloss.DiceLoss(smooth=make(float("nan")))


def test_a_meta_tensor_scalar_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="smooth is a tensor on the meta device"):
        dynloss.DiceLoss(smooth=torch.tensor(1.0, device="meta"))


def test_an_object_array_is_refused_naming_the_argument():
    with pytest.raises(TypeError, match="weight must be None or a sequence of per-class weights"):
        dynloss.DiceLoss("multiclass", weight=np.array([1.0, "a"], dtype=object))


@pytest.mark.parametrize("make", [torch.tensor, np.array], ids=["tensor", "ndarray"])
def test_composite_weights_as_an_array(make):
    terms = [dynloss.DiceLoss("multiclass"), dynloss.BCELoss("multiclass")]
    loss = dynloss.CompositeLoss(terms, weights=make([0.25, 2.0]))
    assert loss.weights == [0.25, 2.0]
    want = dynloss.CompositeLoss(terms, weights=[0.25, 2.0])(*MULTICLASS)
    torch.testing.assert_close(loss(*MULTICLASS), want, rtol=0, atol=0)
    assert dynloss.CompositeLoss(terms, weights=[make(0.25), 2.0]).weights == [0.25, 2.0]
    with pytest.raises(ValueError, match="got 3 weights for 2 losses"):
        dynloss.CompositeLoss(terms, weights=make([0.25, 2.0, 1.0]))
    with pytest.raises(TypeError, match="CompositeLoss: weights must be a list of numbers or "
                                        "schedules"):
        dynloss.CompositeLoss(terms, weights=make([[0.25, 2.0]]))


@pytest.mark.parametrize("cls, mode, name", PER_CLASS)
def test_per_class_weights_reassigned_as_an_array_are_read_as_the_constructor_reads_them(
        cls, mode, name):
    """An array assigned to a loss's per-class weights was kept as the array itself: an edit
    of the array in place showed in ``loss.weight`` but not in the loss (which had read the
    old values), and ``repr`` raised numpy's "truth value of an array is ambiguous" (found by
    a review of bad input). It is read as its values now, as the constructor reads it."""
    values = np.array([1.0, 1.0, 1.0])
    loss = cls(mode=mode)
    setattr(loss, name, values)
    values[:] = [0.0, 0.5, 5.0]  # the caller's array, edited after the assignment
    assert getattr(loss, name) == [1.0, 1.0, 1.0]
    want = cls(mode=mode, **{name: [1.0, 1.0, 1.0]})
    torch.testing.assert_close(loss(*inputs(mode)), want(*inputs(mode)), rtol=0, atol=0)
    assert repr(loss) == repr(want)
    assert repr(dynloss.CompositeLoss([loss])) == repr(dynloss.CompositeLoss([want]))
    with pytest.raises(TypeError, match="cannot be changed in place"):
        getattr(loss, name)[0] = 2.0
    setattr(loss, name, torch.tensor([0.0, 0.5, 5.0]))  # a tensor was read so already
    assert getattr(loss, name) == [0.0, 0.5, 5.0]


@pytest.mark.parametrize("make", [torch.tensor, np.array], ids=["tensor", "ndarray"])
def test_a_scalar_reassigned_as_a_zero_dimensional_array_is_its_value(make):
    """A 0-d tensor assigned to a scalar hyper-parameter was kept as the tensor: the loss read
    its value when assigned, so an edit in place (``fill_``) showed in ``loss.gamma`` but not
    in the loss, and ``repr`` wrote ``alpha=tensor(0.4000)``, which ``build_loss`` refuses
    (found by a review of bad input). It is read as its number now, as the constructor reads
    it."""
    logits, target = BINARY
    cases = [(dynloss.DiceLoss, "smooth", 1.0), (dynloss.TverskyLoss, "alpha", 0.4),
             (dynloss.FocalLoss, "gamma", 1.5), (dynloss.FocalLoss, "alpha", 0.25),
             (dynloss.TopKLoss, "k", 0.25), (dynloss.BCELoss, "pos_weight", 4.0)]
    for cls, name, value in cases:
        loss = cls()
        given = make(value)
        setattr(loss, name, given)
        if isinstance(given, torch.Tensor):
            given.fill_(3.0)
        else:
            given.fill(3.0)
        assert getattr(loss, name) == value and type(getattr(loss, name)) is float, name
        want = cls(**{name: value})
        torch.testing.assert_close(loss(logits, target), want(logits, target), rtol=0, atol=0)
        assert repr(loss) == repr(want) and repr(dynloss.build_loss(repr(loss))) == repr(want)
    loss = dynloss.DiceLoss("multiclass")
    loss.ignore_index = make(255)
    assert loss.ignore_index == 255 and type(loss.ignore_index) is int
    loss = dynloss.FocalLoss()  # what no number is stays refused at the next call, as when built
    loss.gamma = make(True)
    with pytest.raises(TypeError, match=r"gamma must be a real number; got (Tensor|ndarray)"):
        loss(logits, target)


def test_a_subclass_keeps_its_own_tensor_arguments_as_it_stores_them():
    """Reading a reassigned 0-d tensor as a number (the built-in losses' hyper-parameters)
    reached a subclass's own arguments: a learnable ``nn.Parameter`` temperature became a
    float (no longer learned) and a buffer argument refused a tensor (found by a review of the
    change). Only the built-in losses' own arguments are read so."""
    from torch import nn

    class Tempered(dynloss.DiceLoss):
        def __init__(self, temperature: float = 1.0, scale: float = 1.0,
                     smooth: float = 0.0) -> None:
            super().__init__(smooth=smooth)
            self.temperature = nn.Parameter(torch.tensor(float(temperature)))
            self.register_buffer("scale", torch.tensor(scale))

    loss = Tempered()
    assert isinstance(loss.temperature, nn.Parameter)
    assert [name for name, _ in loss.named_parameters()] == ["temperature"]
    loss.scale = torch.tensor(2.0)
    assert isinstance(loss.scale, torch.Tensor) and loss.scale.item() == 2.0
    loss.smooth = torch.tensor(1.0)  # a built-in argument still reads as its number
    assert loss.smooth == 1.0 and type(loss.smooth) is float
