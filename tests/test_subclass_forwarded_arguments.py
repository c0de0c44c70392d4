"""A loss subclass whose constructor forwards the base class's arguments through ``**kwargs``
(``def __init__(self, scale=2.0, **kwargs): super().__init__(**kwargs)``), the usual way to
extend a class. Its arguments are its own named ones plus those of the base it forwards to:
a reassigned ``smooth`` or ``gamma`` is read again (it had been ignored: a silent wrong
value), ``hyperparameters()`` lists them and ``repr`` (which raised an AttributeError on
``kwargs``, breaking ``print(loss)``) writes those that differ from the defaults."""

from __future__ import annotations

import pickle

import pytest
import torch

import dynloss
from dynloss import functional as F

LOGITS = torch.randn(2, 1, 5, 6, generator=torch.Generator().manual_seed(0))
TARGET = (torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(1)) > 0.6).float()


class ScaledDice(dynloss.DiceLoss):
    def __init__(self, scale: float = 2.0, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.scale = scale

    def forward(self, input, target):  # type: ignore[no-untyped-def]
        return self.scale * super().forward(input, target)


class ScaledFocal(dynloss.FocalLoss):
    def __init__(self, *args, scale: float = 1.0, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.scale = scale


class DoubleScaledDice(ScaledDice):  # forwards twice
    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)


@pytest.mark.parametrize("cls", [ScaledDice, DoubleScaledDice])
def test_a_reassigned_forwarded_argument_is_read_again(cls) -> None:
    loss = cls(smooth=1.0)
    expected = 2.0 * F.dice_loss(LOGITS, TARGET, smooth=1.0)
    torch.testing.assert_close(loss(LOGITS, TARGET), expected, rtol=0, atol=0)
    loss.smooth = 5.0
    expected = 2.0 * F.dice_loss(LOGITS, TARGET, smooth=5.0)
    torch.testing.assert_close(loss(LOGITS, TARGET), expected, rtol=0, atol=0)
    loss.per_image = True
    expected = 2.0 * F.dice_loss(LOGITS, TARGET, smooth=5.0, per_image=True)
    torch.testing.assert_close(loss(LOGITS, TARGET), expected, rtol=0, atol=0)


def test_a_forwarded_argument_reassigned_invalid_is_refused_at_the_next_call() -> None:
    loss = ScaledDice()
    loss.smooth = -1.0
    with pytest.raises(ValueError, match="smooth"):
        loss(LOGITS, TARGET)


def test_forwarded_distribution_arguments_positional_and_keyword_are_read_again() -> None:
    loss = ScaledFocal(1.0, mode="binary")  # gamma given by position through *args
    torch.testing.assert_close(loss(LOGITS, TARGET), F.focal_loss(LOGITS, TARGET, gamma=1.0),
                               rtol=0, atol=0)
    loss.gamma = 3.0
    loss.alpha = 0.25
    torch.testing.assert_close(loss(LOGITS, TARGET),
                               F.focal_loss(LOGITS, TARGET, gamma=3.0, alpha=0.25),
                               rtol=0, atol=0)


def test_hyperparameters_and_repr_list_the_forwarded_arguments() -> None:
    loss = ScaledDice(scale=3.0, smooth=1.0, mode="multilabel")
    assert loss.hyperparameters() == {
        "scale": 3.0, **dynloss.DiceLoss(smooth=1.0, mode="multilabel").hyperparameters()}
    assert repr(loss) == "ScaledDice(scale=3.0, mode='multilabel', smooth=1.0)"
    loss.smooth = 2  # a float argument of the base written as a float
    assert repr(loss) == "ScaledDice(scale=3.0, mode='multilabel', smooth=2.0)"
    assert repr(DoubleScaledDice()) == "DoubleScaledDice()"
    assert repr(ScaledFocal(3.0)) == "ScaledFocal(gamma=3.0)"
    rebuilt = dynloss.build_loss(repr(loss), names={"ScaledDice": ScaledDice})
    assert rebuilt.hyperparameters() == loss.hyperparameters()


def test_a_pickled_subclass_reads_its_forwarded_arguments() -> None:
    loss = ScaledDice(smooth=1.0)
    loss.smooth = 4.0
    copied = pickle.loads(pickle.dumps(loss))
    torch.testing.assert_close(copied(LOGITS, TARGET),
                               2.0 * F.dice_loss(LOGITS, TARGET, smooth=4.0), rtol=0, atol=0)


class Tag:
    """A class of the user's that is not a loss, before the loss in the bases."""


class Forwarding:
    """A mixin whose constructor forwards everything to the next class of the MRO."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)


class TaggedDice(Tag, dynloss.DiceLoss):
    def __init__(self, scale: float = 1.0, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.scale = scale


class MixedDice(Forwarding, dynloss.DiceLoss):
    pass


@pytest.mark.parametrize("cls", [TaggedDice, MixedDice])
def test_a_forwarding_subclass_with_other_bases_has_the_losss_arguments(cls) -> None:
    """The base whose arguments a forwarding constructor takes is the next class of the
    subclass's own MRO that defines one, past a user's mixin (it was the owner's direct base,
    and no argument was found behind a class that is not a loss: a reassigned ``smooth`` was
    ignored and the repr lost the mode). Found by a review of the change."""
    loss = cls(smooth=3.0, mode="multilabel")
    loss.smooth = 5.0
    torch.testing.assert_close(loss(LOGITS, TARGET),
                               F.dice_loss(LOGITS, TARGET, mode="multilabel", smooth=5.0),
                               rtol=0, atol=0)
    assert "mode='multilabel'" in repr(loss) and "smooth=5.0" in repr(loss)


class MultilabelDice(dynloss.DiceLoss):
    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(mode="multilabel", **kwargs)


def test_the_repr_of_a_subclass_that_fixes_an_argument_rebuilds_it() -> None:
    """A forwarded argument is written where it differs from what the subclass builds by
    default, not from the base's default: ``MultilabelDice(mode='multilabel')`` (its own
    fixed mode compared with DiceLoss's "binary") could not be rebuilt ("got multiple values
    for keyword argument 'mode'"). Found by a review of the change."""
    loss = MultilabelDice(smooth=2.0)
    assert repr(loss) == "MultilabelDice(smooth=2.0)"
    rebuilt = dynloss.build_loss(repr(loss), names={"MultilabelDice": MultilabelDice})
    assert rebuilt.hyperparameters() == loss.hyperparameters()
    assert repr(MultilabelDice()) == "MultilabelDice()"
