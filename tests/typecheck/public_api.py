"""A user's typed code: CI runs ``mypy --strict`` on this file, and tests/test_typecheck.py runs it.

Every call here is documented use that works at runtime; ``assert_type`` pins what a type
checker sees (a loss call is a ``Tensor``, not ``Any``). A hint that rejects documented use,
or that widens a result to ``Any``, fails CI.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import assert_type

from dynloss import (
    LOSSES,
    BCELoss,
    CompositeLoss,
    DiceLoss,
    FocalLoss,
    IoULoss,
    SegmentationLoss,
    SwitchingLoss,
    TopKLoss,
    TverskyLoss,
    build_loss,
)
from dynloss.functional import dice_loss, focal_loss, tversky_index
from dynloss.schedules import LinearRamp, Plateau, reset_plateau_scheduler


def loss_value(loss: DiceLoss, logits: Tensor, target: Tensor) -> Tensor:
    return loss(logits, target)  # a Tensor, not Any (mypy --strict: no-any-return)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=gen, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).float()
    scores = torch.randn(2, 3, 8, 8, generator=gen)
    labels = torch.randint(0, 3, (2, 8, 8), generator=gen)

    assert_type(DiceLoss()(logits, target), Tensor)
    assert_type(loss_value(DiceLoss(), logits, target), Tensor)
    losses: list[SegmentationLoss] = [
        BCELoss(pos_weight=2.0), BCELoss("multiclass", weight=[1.0, 2.0, 3.0]),
        FocalLoss(alpha=0.25), FocalLoss(alpha=torch.tensor([0.2, 0.3, 0.5]), mode="multiclass"),
        TopKLoss(k=0.1), IoULoss(smooth=1.0), TverskyLoss(0.3, 0.7, per_image=True),
    ]
    for loss in losses:
        assert_type(loss(scores if loss.mode == "multiclass" else logits,
                         labels if loss.mode == "multiclass" else target), Tensor)
    runs = {name: LOSSES[name]() for name in ("bce", "dice")}  # as examples/demo.py does
    assert_type(runs["dice"], SegmentationLoss)

    composite = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 10)])
    assert_type(composite(logits, target), Tensor)
    composite.step()
    switching = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=2))
    value = switching(logits, target)
    assert_type(value, Tensor)
    torch.autograd.backward(value)
    switched: bool = switching.step(metric=value.detach())
    assert not switched

    built = build_loss("iou->bce@50")
    assert_type(built, SegmentationLoss | CompositeLoss | SwitchingLoss)
    if isinstance(built, SwitchingLoss):  # narrowed, as the build_loss docstring says
        model = nn.Linear(1, 1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        built.on_switch(reset_plateau_scheduler(scheduler))
        built.step()
    mine = DiceLoss(mode="multiclass")
    assert_type(build_loss(mine), DiceLoss)  # a module comes back as it is

    assert_type(dice_loss(scores, labels, mode="multiclass"), Tensor)
    assert_type(focal_loss(scores, labels, alpha=torch.tensor([0.2, 0.3, 0.5]),
                           mode="multiclass"), Tensor)
    i, p, g = torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([5.0])
    assert_type(tversky_index(i, p, g, 0.5, 0.5, 0.0), Tensor)
    assert_type(tversky_index(3.0, 4.0, 5.0, 0.5, 0.5, 0.0), float)

    state = switching.state_dict()
    fresh = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=2))
    fresh.load_state_dict(state)


if __name__ == "__main__":
    main()
