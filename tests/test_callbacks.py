"""reset_plateau_scheduler across checkpoints: the callback must act on the optimizer's *current*
parameter groups, which ``optimizer.load_state_dict`` replaces by new dicts."""

from __future__ import annotations

import pickle

import pytest
import torch

from dynloss import BCELoss, DiceLoss, IoULoss, SwitchingLoss
from dynloss.schedules import reset_plateau_scheduler


def _setup(restart_lr: float | None):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    # patience 0, factor 0.5: every epoch whose value does not improve halves the LR
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", patience=0, factor=0.5
    )
    loss = SwitchingLoss([IoULoss(), BCELoss()], milestones=[3])
    loss.on_switch(reset_plateau_scheduler(scheduler, lr=restart_lr))
    return model, optimizer, scheduler, loss


# the monitored value never improves after the first epoch: the LR halves every epoch
VALUES = [0.5, 0.6, 0.7, 0.8, 0.9]


def _epochs(optimizer, scheduler, loss, values):
    lrs = []
    for value in values:
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(value)
        loss.step()
    return lrs


def test_uninterrupted_restart_restores_the_lr_at_the_switch() -> None:
    _, optimizer, scheduler, loss = _setup(restart_lr=1.0)
    lrs = _epochs(optimizer, scheduler, loss, VALUES)
    # epochs 0-2 under IoU (halved after epochs 1 and 2), restart to 1.0 at the switch (3);
    # the reset plateau history makes epoch 3's value the new best, so no halving after it
    assert lrs == [1.0, 1.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("restart_lr", [1.0, None])
def test_resume_before_the_switch_keeps_the_restart(restart_lr) -> None:
    """Interrupted after epoch 1 (before the switch at 3), resumed like a training script does:
    objects rebuilt, the callback attached, then every state loaded."""
    _, optimizer, scheduler, loss = _setup(restart_lr)
    full = _epochs(optimizer, scheduler, loss, VALUES)

    model, optimizer, scheduler, loss = _setup(restart_lr)
    first = _epochs(optimizer, scheduler, loss, VALUES[:2])
    saved = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "loss": loss.state_dict(),
    }
    model, optimizer, scheduler, loss = _setup(restart_lr)
    groups_before = optimizer.param_groups[0]
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    loss.load_state_dict(saved["loss"])
    assert optimizer.param_groups[0] is not groups_before  # what made the old callback miss
    rest = _epochs(optimizer, scheduler, loss, VALUES[2:])
    assert first + rest == full
    assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]
    if restart_lr is None:  # keep: no restart; the LR halved after epoch 2 is kept
        assert full == [1.0, 1.0, 0.5, 0.25, 0.25]
    else:
        assert full == [1.0, 1.0, 0.5, 1.0, 1.0]


def test_restart_checks_the_groups_of_the_current_optimizer() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    reset = reset_plateau_scheduler(scheduler, lr=[0.5])
    extra = torch.nn.Parameter(torch.zeros(1))
    optimizer.add_param_group({"params": [extra], "lr": 1.0})
    with pytest.raises(ValueError, match="lr: got 1 value for 2 parameter groups"):
        reset(None)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0]  # nothing half-applied


@pytest.mark.parametrize(("lr", "error", "message"), [
    (float("nan"), ValueError, "lr must be finite; got nan"),
    (-1.0, ValueError, r"lr must be >= 0; got -1.0"),
    (True, TypeError, "lr must be a learning rate or one per parameter group; got bool True"),
    ("0.1", TypeError, "got str '0.1'"),
    ([0.1, -0.5], ValueError, r"lr\[1\] must be >= 0; got -0.5"),
])
def test_reset_plateau_scheduler_checks_lr(lr, error, message):
    """A NaN, negative or boolean learning rate was set at the switch without a word."""
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1e-3)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(error, match=message):
        reset_plateau_scheduler(scheduler, lr=lr)


def test_a_loss_with_the_reset_callback_pickles_and_the_copy_resets_its_scheduler():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    loss = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[1],
                         on_switch=reset_plateau_scheduler(scheduler, lr=0.25))
    copy = pickle.loads(pickle.dumps(loss))  # a closure could not be pickled
    assert copy.step()  # the switch: the copy's callback resets the copy's scheduler
    (callback,) = copy._callbacks
    assert callback.scheduler.optimizer.param_groups[0]["lr"] == 0.25
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the original's is untouched


def test_reset_plateau_scheduler_fills_a_tensor_learning_rate_in_place():
    """An optimizer built with a tensor lr keeps that tensor (as ReduceLROnPlateau does): the
    callback replaced it by a float, so anything holding the tensor (a capturable or compiled
    optimizer step) kept the old rate."""
    parameter = torch.nn.Parameter(torch.zeros(3))
    lr = torch.tensor(1e-2)
    optimizer = torch.optim.Adam([parameter], lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
    loss = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[1])
    loss.on_switch(reset_plateau_scheduler(scheduler, lr=1e-4))
    loss.step()
    assert optimizer.param_groups[0]["lr"] is lr
    assert lr.item() == pytest.approx(1e-4)
    # get_last_lr() as torch's schedulers leave it: a copy of the tensor (was a float)
    (last,) = scheduler.get_last_lr()
    assert isinstance(last, torch.Tensor) and last is not lr
    assert last.item() == pytest.approx(1e-4)


def test_reset_plateau_scheduler_clears_the_cooldown_and_reaches_every_group():
    """The switch ends a cooldown in progress, and one learning rate goes to every parameter
    group the optimizer has then, including one added after the callback was made (the
    callback refused: "got 1 value for 2 parameter groups")."""
    first, second = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([first], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, cooldown=3)
    loss = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[1])
    loss.on_switch(reset_plateau_scheduler(scheduler, lr=0.25))
    scheduler.step(1.0)
    scheduler.step(2.0)
    assert scheduler.cooldown_counter == 3
    optimizer.add_param_group({"params": [second], "lr": 0.5})
    loss.step()
    assert scheduler.cooldown_counter == 0
    assert [group["lr"] for group in optimizer.param_groups] == [0.25, 0.25]
