"""CompositeLoss and SwitchingLoss: values, switching, callbacks, state and resume."""

from __future__ import annotations

import bisect
import copy
import io
import math
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynloss import (
    BCELoss,
    CompositeLoss,
    Constant,
    DiceLoss,
    FocalLoss,
    IoULoss,
    LinearRamp,
    Milestone,
    Plateau,
    RelativeImprovement,
    SwitchEvent,
    SwitchingLoss,
    TopKLoss,
    Trigger,
    TverskyLoss,
    WeightSchedule,
    build_loss,
    reset_plateau_scheduler,
)
from dynloss.schedules import SpecError

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 6, 6, generator=generator)
    target = (torch.rand(2, 1, 6, 6, generator=generator) > 0.6).float()
    return logits, target


def _saved(module: torch.nn.Module) -> dict:
    """state_dict through torch.save / torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ----------------------------------------------------------------------------- CompositeLoss
def test_composite_is_the_weighted_sum_of_terms(batch) -> None:
    logits, target = batch
    dice, focal = DiceLoss(), FocalLoss()
    loss = CompositeLoss([dice, focal], weights=[0.5, 2.0])
    value = loss(logits, target)
    expected = 0.5 * dice(logits, target) + 2.0 * focal(logits, target)
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    assert list(loss.last_terms) == ["dice", "focal"]
    torch.testing.assert_close(loss.last_terms["dice"], dice(logits, target), rtol=0, atol=0)
    assert not loss.last_terms["dice"].requires_grad


def test_composite_paper_pairs_equal_plain_sum(batch) -> None:
    logits, target = batch
    for a, b in [(DiceLoss(), FocalLoss()), (IoULoss(), BCELoss()), (TverskyLoss(), BCELoss()),
                 (IoULoss(), TopKLoss())]:
        expected = a(logits, target) + b(logits, target)
        # to float32 rounding, as documented: the fused pass sums in another order (the
        # native region-only pass has a hand-vectorised loop of its own)
        torch.testing.assert_close(CompositeLoss([a, b])(logits, target), expected,
                                   rtol=2.0**-22, atol=0)


def test_composite_gradients_flow(batch) -> None:
    logits, target = batch
    x = logits.clone().requires_grad_()
    CompositeLoss([DiceLoss(), BCELoss()], weights=[0.0, 1.0])(x, target).backward()
    y = logits.clone().requires_grad_()
    BCELoss()(y, target).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_composite_names_nesting_and_mapping(batch) -> None:
    logits, target = batch
    inner = CompositeLoss({"a": DiceLoss(), "b": BCELoss()})
    outer = CompositeLoss([DiceLoss(), inner, DiceLoss(smooth=1.0)])
    assert outer.names == ["dice", "compositeloss", "dice_2"]
    outer(logits, target)
    assert sorted(outer.last_terms) == [
        "compositeloss", "compositeloss.a", "compositeloss.b", "dice", "dice_2",
    ]
    torch.testing.assert_close(
        outer.last_terms["compositeloss"],
        outer.last_terms["compositeloss.a"] + outer.last_terms["compositeloss.b"],
    )


def test_composite_scheduled_weights_follow_step() -> None:
    loss = CompositeLoss([DiceLoss(), BCELoss()],
                         weights=[LinearRamp(0, 2, 1.0, 0.0), LinearRamp(0, 2)])
    seen = []
    for _ in range(4):
        seen.append(loss.current_weights())
        loss.step()
    assert seen == [{"dice": 1.0, "bce": 0.0}, {"dice": 0.5, "bce": 0.5},
                    {"dice": 0.0, "bce": 1.0}, {"dice": 0.0, "bce": 1.0}]
    assert loss.count == 4


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"losses": [DiceLoss()], "weights": [1.0, 2.0]}, ValueError, "got 2 weights for 1"),
        ({"losses": [DiceLoss()], "weights": [-1.0]}, ValueError, "weight of 'dice' must be"),
        ({"losses": [DiceLoss()], "weights": "1"}, TypeError, "weights must be a list"),
        ({"losses": []}, ValueError, "needs at least one loss"),
        ({"losses": DiceLoss()}, TypeError, "wrap it in a list"),
        ({"losses": [DiceLoss, BCELoss()]}, TypeError, "must be an nn.Module"),
        ({"losses": {"a.b": DiceLoss()}}, ValueError, "without '.'"),
        ({"losses": {"a": DiceLoss()}, "weights": {"b": 1.0}}, ValueError, "same terms"),
    ],
)
def test_composite_validation(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        CompositeLoss(**kwargs)


class _Returns(torch.nn.Module):
    """A term whose forward returns ``value`` (not a tensor)."""

    def __init__(self, value) -> None:
        super().__init__()
        self.value = value

    def forward(self, input, target):
        return self.value


@pytest.mark.parametrize("value", [0.5, None, (1.0, 2.0)], ids=["float", "None", "tuple"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_term_that_returns_no_tensor_is_named(batch, value, compiled) -> None:
    """A term whose forward returned a float, None or a tuple crashed with "AttributeError:
    'float' object has no attribute 'shape'", which named no term (found by a review of bad
    input): a TypeError names the term and what it returned (under torch.compile, the
    compiler's error carries its message, as with our other refusals in a graph)."""
    got = type(value).__name__
    cases = [
        (CompositeLoss([DiceLoss(), _Returns(value)]),
         rf"CompositeLoss: term '_returns' \(_Returns\) returned {got}, not a tensor"),
        (CompositeLoss({"first": _Returns(value), "dice": DiceLoss()}),
         rf"CompositeLoss: term 'first' \(_Returns\) returned {got}, not a tensor"),
        (SwitchingLoss([_Returns(value), DiceLoss()], milestones=[3]),
         rf"SwitchingLoss: stage '_returns' \(_Returns\) returned {got}, not a tensor"),
    ]
    for loss, message in cases:
        call = torch.compile(loss, backend="eager", fullgraph=True) if compiled else loss
        with pytest.raises(Exception if compiled else TypeError,
                           match=message + r": a loss must return its value as a tensor"):
            call(*batch)


def test_composite_shared_schedule_is_rejected() -> None:
    ramp = LinearRamp(0, 3)
    with pytest.raises(ValueError, match="same schedule object"):
        CompositeLoss([DiceLoss(), BCELoss()], weights=[ramp, ramp])


def test_composite_state_roundtrip_and_mismatch() -> None:
    loss = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 10)])
    for _ in range(3):
        loss.step()
    state = _saved(loss)
    fresh = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 10)])
    fresh.load_state_dict(state)
    assert fresh.count == 3 and fresh.current_weights() == {"dice": 1.0, "bce": 0.3}
    with pytest.raises(ValueError, match=r"the state has 2 terms \['dice', 'bce'\], this loss "
                                         r"has 3"):
        CompositeLoss([DiceLoss(), BCELoss(), FocalLoss()]).load_state_dict(state)
    with pytest.raises(ValueError, match="schedule weight in the state but a constant here"):
        CompositeLoss([DiceLoss(), BCELoss()]).load_state_dict(state)


@pytest.mark.parametrize("key, value, message", [
    ("count", "4", r"invalid count in the state: count must be an int; got str"),
    ("count", -1, r"invalid count in the state: count must be >= 0"),
    ("names", 7, r"invalid names in the state: names must be a list of str; got int"),
])
def test_composite_failed_load_changes_nothing(key, value, message) -> None:
    """Everything is checked before anything is assigned: the weight schedules keep their
    counters when the state's count (checked last before) or names are bad."""
    loss = CompositeLoss([DiceLoss(), BCELoss()], weights=[LinearRamp(0, 10), LinearRamp(0, 4)])
    for _ in range(3):
        loss.step()
    state = _saved(loss)
    fresh = CompositeLoss([DiceLoss(), BCELoss()], weights=[LinearRamp(0, 10), LinearRamp(0, 4)])
    extra = next(k for k in state if k.endswith("_extra_state"))
    bad = dict(state)
    bad[extra] = dict(state[extra], **{key: value})
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(bad)
    assert fresh.count == 0 and fresh.current_weights() == {"dice": 0.0, "bce": 0.0}
    assert [w.count for w in fresh.weights] == [0, 0]


# ----------------------------------------------------------------------------- SwitchingLoss
def test_switching_default_is_the_papers_epoch_50(batch) -> None:
    logits, target = batch
    loss = SwitchingLoss([IoULoss(), BCELoss()])
    assert loss.milestones == [50] and loss.unit == "epoch"
    for epoch in range(60):
        expected = IoULoss() if epoch < 50 else BCELoss()
        assert loss.active_index == (0 if epoch < 50 else 1)
        if epoch in (0, 49, 50, 59):
            torch.testing.assert_close(loss(logits, target), expected(logits, target),
                                       rtol=0, atol=0)
        switched = loss.step()
        assert switched == (epoch == 49)
    assert loss.switches == [(0, 1, 50)]
    assert repr(loss) == "SwitchingLoss([IoULoss(), BCELoss()], milestones=[50])"


def test_switching_three_stages_and_last_terms(batch) -> None:
    logits, target = batch
    loss = SwitchingLoss({"warm": CompositeLoss([DiceLoss(), FocalLoss()]), "bce": BCELoss(),
                          "topk": TopKLoss()}, milestones=[1, 3], unit="step")
    names = []
    for _ in range(5):
        names.append(loss.active_name)
        loss(logits, target)
        loss.step()
    assert names == ["warm", "bce", "bce", "topk", "topk"]
    loss2 = SwitchingLoss({"warm": CompositeLoss([DiceLoss(), FocalLoss()]), "bce": BCELoss(),
                           "topk": TopKLoss()}, milestones=[1, 3], unit="step")
    loss2(logits, target)
    assert sorted(loss2.last_terms) == ["warm", "warm.dice", "warm.focal"]
    assert repr(loss2) == (
        "SwitchingLoss({'warm': CompositeLoss([DiceLoss(), FocalLoss()]), 'bce': BCELoss(), "
        "'topk': TopKLoss()}, milestones=[1, 3], unit='step')"
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ([[DiceLoss()]], {}, ValueError, "at least two stages"),
        ([[DiceLoss(), BCELoss(), FocalLoss()]], {}, ValueError, "needs milestones"),
        ([[DiceLoss(), BCELoss()], [10, 20]], {}, ValueError, r"2 stages need 1 milestone \("),
        ([[DiceLoss(), BCELoss(), FocalLoss()], [20, 10]], {}, ValueError, "strictly increasing"),
        ([[DiceLoss(), BCELoss()], [0]], {}, ValueError, r"milestones\[0\] must be >= 1"),
        ([[DiceLoss(), BCELoss()], [5]], {"trigger": Plateau()}, ValueError, "not both"),
        ([[DiceLoss(), BCELoss()]], {"unit": "iteration"}, ValueError, "unit must be one of"),
        ([[DiceLoss(), BCELoss()]], {"trigger": "plateau"}, TypeError, "must be a Trigger"),
        ([[DiceLoss(), BCELoss()], 50], {}, TypeError, "milestones must be a list of ints"),
    ],
)
def test_switching_validation(args, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        SwitchingLoss(*args, **kwargs)


def test_switching_trigger_forms() -> None:
    shared = Plateau(patience=2)
    loss = SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()], trigger=shared)
    assert loss.triggers[0] is shared and loss.triggers[1] is not shared
    assert repr(loss.triggers[1]) == "Plateau(patience=2)"
    mixed = SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()], trigger=[Plateau(), 40])
    assert isinstance(mixed.triggers[1], Milestone) and mixed.milestones is None
    with pytest.raises(ValueError, match="same trigger object is used twice"):
        SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()], trigger=[shared, shared])


def test_adaptive_switch_on_plateau_with_min_epochs() -> None:
    loss = SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()],
                         trigger=[Plateau(patience=1, min_epochs=3), Plateau(patience=2)])
    metrics = [1.0, 1.0, 1.0, 0.5, 0.4, 0.4, 0.4, 0.4]
    indices = []
    for metric in metrics:
        loss.step(metric=metric)
        indices.append(loss.active_index)
    # stage 0: no improvement at step 2 but min_epochs=3 -> switch at step 3.
    # stage 1 starts fresh: 0.5 best, 0.4 better, 0.4, 0.4 -> 2 bad steps at step 7.
    assert indices == [0, 0, 1, 1, 1, 1, 2, 2]
    assert loss.switches == [(0, 1, 3), (1, 2, 7)]


def test_adaptive_switch_accepts_a_tensor_metric_and_requires_one() -> None:
    loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=RelativeImprovement(threshold=0.5))
    loss.step(torch.tensor(1.0))
    assert loss.step(torch.tensor(0.9)) is True
    fresh = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau())
    with pytest.raises(ValueError, match=r"Plateau\(\) monitors a value: call step\(metric="):
        fresh.step()


def test_on_switch_callbacks_receive_the_event() -> None:
    events: list[SwitchEvent] = []
    dice, bce = DiceLoss(), BCELoss()
    loss = SwitchingLoss([dice, bce], milestones=[2], on_switch=events.append)
    order: list[str] = []
    loss.on_switch(lambda event: order.append("second"))
    for _ in range(4):
        loss.step()
    assert len(events) == 1 and order == ["second"]
    event = events[0]
    assert (event.old_index, event.new_index, event.count, event.unit) == (0, 1, 2, "epoch")
    assert event.old is dice and event.new is bce
    assert (event.old_name, event.new_name) == ("dice", "bce")
    assert repr(event.trigger) == "Milestone(2)"
    with pytest.raises(TypeError, match="needs a callable"):
        loss.on_switch(3)


def test_reset_plateau_scheduler_at_the_switch() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=2, factor=0.5)
    loss = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[3])
    loss.on_switch(reset_plateau_scheduler(scheduler))
    for train_loss in [0.5, 0.4, 0.4]:  # region-loss scale
        scheduler.step(train_loss)
        loss.step()
    assert loss.active_index == 1
    assert scheduler.best == float("inf") and scheduler.num_bad_epochs == 0
    assert optimizer.param_groups[0]["lr"] == 1.0
    restart = reset_plateau_scheduler(scheduler, lr=0.25)
    restart(None)
    assert optimizer.param_groups[0]["lr"] == 0.25 and scheduler.get_last_lr() == [0.25]
    with pytest.raises(TypeError, match=r"needs a torch\.optim\.lr_scheduler\.ReduceLROnPlateau"):
        reset_plateau_scheduler(torch.optim.lr_scheduler.StepLR(optimizer, 3))
    with pytest.raises(ValueError, match="got 2 values for 1 parameter groups"):
        reset_plateau_scheduler(scheduler, lr=[0.1, 0.2])


def test_without_reset_a_scale_jump_keeps_stale_plateau_state() -> None:
    """Why the recipe exists: after the switch the stale best value is never beaten."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=1)
    for dice in [0.7, 0.75]:  # validation Dice under the region loss
        scheduler.step(dice)
    scheduler.step(0.74)  # first epoch after the switch: a transient dip
    assert scheduler.num_bad_epochs == 1
    reset_plateau_scheduler(scheduler)(None)
    scheduler.step(0.74)
    assert scheduler.num_bad_epochs == 0 and scheduler.best == 0.74


def test_switching_steps_nested_schedules_on_the_global_counter() -> None:
    ramp = LinearRamp(2, 4)
    composite = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, ramp])
    loss = SwitchingLoss([BCELoss(), composite], milestones=[1])
    for _ in range(3):
        loss.step()
    assert ramp.count == 3 and composite.count == 3
    assert composite.current_weights() == {"dice": 1.0, "bce": 0.5}


# ------------------------------------------------------------------------------ properties
@PROPERTY
@given(st.lists(st.integers(1, 60), min_size=1, max_size=4, unique=True),
       st.sampled_from(["epoch", "step"]))
def test_switch_happens_exactly_at_the_milestone(milestones, unit) -> None:
    milestones = sorted(milestones)
    stages = [DiceLoss(), BCELoss(), FocalLoss(), TopKLoss(), IoULoss()][: len(milestones) + 1]
    loss = SwitchingLoss(stages, milestones=milestones, unit=unit)
    for count in range(milestones[-1] + 3):
        assert loss.count == count
        assert loss.active_index == bisect.bisect_right(milestones, count)
        assert loss.active is stages[loss.active_index]
        loss.step()
    assert [s[2] for s in loss.switches] == milestones


@PROPERTY
@given(st.integers(1, 30), st.integers(0, 40))
def test_hard_switch_equals_a_ramp_of_zero_width(milestone, epochs) -> None:
    logits = torch.linspace(-3, 3, 18).reshape(2, 1, 3, 3)
    target = (torch.arange(18).reshape(2, 1, 3, 3) % 3 == 0).float()
    first, second = IoULoss(), BCELoss()
    switching = SwitchingLoss([first, second], milestones=[milestone])
    ramped = CompositeLoss([first, second], weights=[
        LinearRamp(milestone, milestone, initial=1.0, final=0.0),
        LinearRamp(milestone, milestone, initial=0.0, final=1.0),
    ])
    for _ in range(epochs):
        switching.step()
        ramped.step()
    weights = list(ramped.current_weights().values())
    assert weights == ([1.0, 0.0] if switching.active_index == 0 else [0.0, 1.0])
    # to float32 rounding: the composite's one pass sums in another order than a single loss's
    # (see test_a_composite_of_zero_weight_gives_the_other_term)
    torch.testing.assert_close(switching(logits, target), ramped(logits, target),
                               rtol=2.0**-22, atol=0)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_composite_of_zero_weight_gives_the_other_term(backend) -> None:
    """The one-pass composite of the kernels sums in another order than a single loss's pass:
    the same value and gradient to float32 rounding (the docs said "exactly"); the
    reference's composite is the separate terms, bit for bit."""
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(2, 1, 8, 8, generator=gen) * 3
        target = (torch.rand(2, 1, 8, 8, generator=gen) > 0.7).float()
        first, second = IoULoss(backend=backend), BCELoss(backend=backend)
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        alone = first(x1, target)
        alone.backward()
        ramped = CompositeLoss([first, second], weights=[1.0, 0.0])
        both = ramped(x2, target)
        both.backward()
        if backend == "reference":
            assert torch.equal(both, alone) and torch.equal(x2.grad, x1.grad)
            assert torch.equal(ramped.last_terms["iou"], alone)
        else:
            torch.testing.assert_close(both, alone, rtol=3e-7, atol=0)
            torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(ramped.last_terms["iou"], alone.detach(), rtol=3e-7,
                                       atol=0)


def _make_resumable(kind: str) -> SwitchingLoss:
    composite = CompositeLoss([DiceLoss(), BCELoss()], weights=[LinearRamp(3, 9, 1.0, 0.0),
                                                                LinearRamp(3, 9)])
    if kind == "milestones":
        return SwitchingLoss([composite, FocalLoss(), BCELoss()], milestones=[6, 14])
    if kind == "plateau":
        return SwitchingLoss([composite, FocalLoss(), BCELoss()],
                             trigger=[Plateau(patience=2, min_delta=0.01), Plateau(patience=3)])
    return SwitchingLoss([composite, FocalLoss(), BCELoss()],
                         trigger=[RelativeImprovement(0.05, window=2), 18])


def _trace(loss: SwitchingLoss, metrics: list[float]) -> list[tuple]:
    composite = loss.stages[loss.names[0]]
    out = []
    for metric in metrics:
        loss.step(metric=metric)
        out.append((loss.count, loss.active_index, loss.stage_count,
                    tuple(composite.current_weights().values()), tuple(loss.switches)))
    return out


@PROPERTY
@given(st.sampled_from(["milestones", "plateau", "relative"]),
       st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=30),
       st.data())
def test_resume_at_any_step_reproduces_the_uninterrupted_run(kind, metrics, data) -> None:
    cut = data.draw(st.integers(0, len(metrics)))
    uninterrupted = _trace(_make_resumable(kind), metrics)
    first = _make_resumable(kind)
    head = _trace(first, metrics[:cut])
    resumed = _make_resumable(kind)
    resumed.load_state_dict(_saved(first))
    assert resumed.count == cut
    assert head + _trace(resumed, metrics[cut:]) == uninterrupted


def test_state_dict_contents_and_mismatch_errors() -> None:
    loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=1))
    loss.step(0.5)
    loss.step(0.6)
    state = _saved(loss)
    assert state["_extra_state"] == {
        "num_stages": 2, "unit": "epoch", "count": 2, "stage_count": 0, "idle_count": 0,
        "active_index": 1, "switches": [[0, 1, 2]],
        "triggers": [{"type": "Plateau", "best": 0.5, "num_bad": 1}],
    }
    three = SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()], milestones=[2, 4])
    with pytest.raises(ValueError, match="saved from a loss with 2 stages; this one has 3 "
                                         r"\(dice, bce, focal\)"):
        three.load_state_dict(state)
    with pytest.raises(ValueError, match="cannot load the state of a Plateau trigger into a "
                                         "Milestone trigger"):
        SwitchingLoss([DiceLoss(), BCELoss()], milestones=[5]).load_state_dict(state)
    with pytest.raises(ValueError, match="the state counts unit='epoch', this loss unit='step'"):
        SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(), unit="step").load_state_dict(
            state)
    with pytest.raises(ValueError, match="not saved from a SwitchingLoss"):
        loss.load_state_dict({"_extra_state": {"count": 1}})


def _built_and_stepped(spec: str, steps: int) -> SwitchingLoss:
    loss = build_loss(spec)
    for _ in range(steps):
        loss.step()
    return loss


@pytest.mark.parametrize(("saved", "target", "message"), [
    # a switch at 2 that this loss's Milestone(5) could not have made (found by a review of
    # the schedules: it loaded, and the loss sat in stage 'bce' from a switch at count 2)
    (("iou->bce@2", 3), "iou->bce@5",
     r"SwitchingLoss: the state switched from stage 0 \('iou'\) at count 2, but this loss's "
     r"trigger Milestone\(5\) cannot fire before count 5: the state was saved from a loss with "
     r"other milestones"),
    # still in stage 0 at count 7, which this loss would have left at 5 (it loaded, and the
    # loss then switched at 8)
    (("iou->bce@10", 7), "iou->bce@5",
     r"SwitchingLoss: the state is in stage 0 \('iou'\) at count 7, but this loss's trigger "
     r"Milestone\(5\) would have switched at count 5: the state was saved from a loss with "
     r"other milestones"),
    (("dice->bce@2->focal@9", 7), "dice->bce@2->focal@6",
     r"the state is in stage 1 \('bce'\) at count 7, but this loss's trigger Milestone\(6\) "
     r"would have switched at count 6"),
    (("dice->bce@2->focal@4", 5), "dice->bce@3->focal@4",
     r"the state switched from stage 0 \('dice'\) at count 2, but this loss's trigger "
     r"Milestone\(3\) cannot fire before count 3"),
])
def test_a_state_that_contradicts_the_milestones_is_refused(saved, target, message) -> None:
    loss = build_loss(target)
    before = loss.state_dict()["_extra_state"]
    with pytest.raises(ValueError, match=message):
        loss.load_state_dict(_built_and_stepped(*saved).state_dict())
    assert loss.state_dict()["_extra_state"] == before


@pytest.mark.parametrize(("saved", "target", "active"), [
    (("iou->bce@5", 3), "iou->bce@8", "iou"),  # a milestone moved, still ahead: resumes
    (("iou->bce@5", 3), "iou->bce@4", "iou"),
    (("dice->bce@2->focal@9", 7), "dice->bce@2->focal@8", "bce"),
    # a switch after its milestone is not refused (a nested loss not in use switches so)
    (("iou->bce@2", 3), "iou->bce@1", "bce"),
    (("dice->bce@4", 4), "dice->bce@4", "bce"),
])
def test_a_state_the_milestones_allow_loads(saved, target, active) -> None:
    loss = build_loss(target)
    loss.load_state_dict(_built_and_stepped(*saved).state_dict())
    assert loss.active_name == active and loss.count == saved[1]


def test_a_nested_loss_idle_past_its_milestone_resumes() -> None:
    """A nested switch's Milestone is consulted only while it is in use: a state past its
    milestone with idle steps is what an uninterrupted run holds, and loads."""
    outer = SwitchingLoss([BCELoss(), SwitchingLoss([DiceLoss(), IoULoss()], milestones=[3])],
                          milestones=[5])
    for _ in range(5):
        outer.step()
    inner = outer.stages["switchingloss"]
    assert (inner.count, inner.active_index, inner.idle_count) == (5, 0, 5)
    twin = SwitchingLoss([BCELoss(), SwitchingLoss([DiceLoss(), IoULoss()], milestones=[3])],
                         milestones=[5])
    twin.load_state_dict(outer.state_dict())
    twin.step()
    outer.step()
    assert twin.stages["switchingloss"].switches == inner.switches == [(0, 1, 6)]


def test_state_dict_nested_in_a_model_checkpoint() -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Conv2d(1, 1, 1)
            self.loss = build_loss("dice+linear_ramp(0,4)*bce->focal@3")

    model = Wrapper()
    for _ in range(4):
        model.loss.step()
    state = _saved(model)
    assert "loss._extra_state" in state and "loss.stages.compositeloss._extra_state" in state
    fresh = Wrapper()
    fresh.load_state_dict(state)
    assert fresh.loss.active_index == 1 and fresh.loss.stages["compositeloss"].count == 4


def test_region_loss_ddp_pool_validation() -> None:
    with pytest.raises(ValueError, match="ddp_pool=True pools the batch sums across ranks and "
                                         "needs per_image=False"):
        DiceLoss(per_image=True, ddp_pool=True)
    with pytest.raises(TypeError, match="ddp_pool must be a bool"):
        TverskyLoss(ddp_pool=1)
    assert repr(IoULoss(ddp_pool=True)) == "IoULoss(ddp_pool=True)"


def test_mismatched_nested_state_is_a_value_error_not_a_key_error() -> None:
    saved = _saved(build_loss("dice+bce->focal@3->bce@6"))
    with pytest.raises(ValueError, match="saved from a loss with 3 stages; this one has 2"):
        build_loss("dice+bce->focal@3").load_state_dict(saved)


def test_public_exports() -> None:
    import dynloss
    from dynloss.functional import dice_loss

    for name in ("CompositeLoss", "SwitchingLoss", "build_loss", "LinearRamp", "RampCosine",
                 "Plateau", "RelativeImprovement", "Milestone", "reset_plateau_scheduler"):
        assert name in dynloss.__all__ and getattr(dynloss, name) is getattr(dynloss.schedules,
                                                                               name)
    logits, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert dice_loss(logits, target, ddp_pool=True).item() == pytest.approx(1 / 3)


# ------------------------------------------------------------- issue #11: callbacks checked
@pytest.mark.parametrize(("on_switch", "message"), [
    (DiceLoss(), r"on_switch needs a callback that takes a SwitchEvent; got the loss DiceLoss\(\)"),
    ([print, BCELoss()], r"got the loss BCELoss\(\) \(a further stage belongs in losses\)"),
    (LinearRamp(0, 2), r"got the weight schedule LinearRamp\(start=0, end=2\)"),
    (3, "on_switch must be a callable or a list of callables; got int"),
    ("report", "on_switch needs a callable; got str 'report'"),
    ([print, None], "on_switch needs a callable; got NoneType None"),
])
def test_on_switch_rejects_what_cannot_be_a_callback(on_switch, message) -> None:
    with pytest.raises(TypeError, match=message):
        SwitchingLoss([DiceLoss(), BCELoss()], milestones=[2], on_switch=on_switch)
    loss = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[2])
    if not isinstance(on_switch, (int, list)):
        with pytest.raises(TypeError, match=message):
            loss.on_switch(on_switch)
    assert repr(loss) == "SwitchingLoss([DiceLoss(), BCELoss()], milestones=[2])"


def test_repr_names_the_registered_callbacks() -> None:
    model = torch.nn.Linear(2, 1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD(model.parameters()))
    loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=2))
    loss.on_switch(reset_plateau_scheduler(scheduler))
    assert repr(loss) == ("SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=2), "
                          "on_switch=['reset_plateau_scheduler'])")

    class Recorder:
        def __call__(self, event: SwitchEvent) -> None:
            pass

    loss.on_switch(Recorder())
    assert repr(loss).endswith(
        "on_switch=['reset_plateau_scheduler', "
        "'test_repr_names_the_registered_callbacks.<locals>.Recorder'])"
    )


# ----------------------------------------------------- issue #11: validated, atomic loading
def _two_triggers() -> SwitchingLoss:
    return SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()], trigger=[
        Plateau(patience=1), RelativeImprovement(threshold=0.5, window=2, patience=2)])


def _snapshot(loss: SwitchingLoss) -> tuple:
    return (loss.count, loss.stage_count, loss.active_index, list(loss.switches),
            loss.just_switched, [copy.deepcopy(vars(t)) for t in loss.triggers])


@pytest.fixture
def target_and_saved() -> tuple[SwitchingLoss, dict]:
    """A loss mid-run, and the (different) state of a twin that ran further."""
    target = _two_triggers()
    for metric in [1.0, 0.9, 0.95, 0.5]:  # Plateau fires at count 3
        target.step(metric)
    twin = _two_triggers()
    for metric in [2.0, 1.0, 1.5, 0.8, 0.7, 0.69]:  # switch at 3; then one low improvement
        twin.step(metric)
    saved = _saved(twin)["_extra_state"]
    assert saved == {
        "num_stages": 3, "unit": "epoch", "count": 6, "stage_count": 3, "idle_count": 0,
        "active_index": 1, "switches": [[0, 1, 3]],
        "triggers": [{"type": "Plateau", "best": 1.0, "num_bad": 1},
                     {"type": "RelativeImprovement", "history": [0.7, 0.69], "num_low": 1}],
    }
    assert _snapshot(target) != _snapshot(twin)
    return target, saved


def test_a_consistent_state_loads(target_and_saved) -> None:
    target, saved = target_and_saved
    full = target.state_dict()
    full["_extra_state"] = saved
    target.load_state_dict(full)
    assert (target.count, target.stage_count, target.active_index, target.switches) == (
        6, 3, 1, [(0, 1, 3)])
    assert target.triggers[1].history == [0.7, 0.69] and target.triggers[1].num_low == 1
    assert target.step(0.68) is True  # second low step in a row: the twin would switch too


def _set(**changes):
    def change(state: dict) -> dict:
        state.update(changes)
        return state
    return change


def _set_trigger(index: int, value):
    def change(state: dict) -> dict:
        state["triggers"][index] = value(state["triggers"][index])
        return state
    return change


_BAD_STATES = [
    (lambda s: [s], r"not saved from a SwitchingLoss \(a state must be a dict; got list\)"),
    (lambda s: {k: v for k, v in s.items() if k != "switches"},
     r"not saved from a SwitchingLoss \(missing keys \['switches'\], unexpected keys \[\]\)"),
    (_set(extra=1), r"missing keys \[\], unexpected keys \['extra'\]"),
    (_set(num_stages="3"), r"invalid num_stages in the state: num_stages must be an int; got str"),
    (_set(num_stages=2), r"saved from a loss with 2 stages; this one has 3"),
    (_set(unit=3), r"the state counts unit=3, this loss unit='epoch'"),
    (_set(count="6"), r"invalid count in the state: count must be an int; got str '6'"),
    (_set(count=True), r"invalid count in the state: count must be an int; got bool True"),
    (_set(count=-1), r"invalid count in the state: count must be >= 0; got -1"),
    (_set(stage_count=3.0), r"invalid stage_count in the state: stage_count must be an int"),
    (_set(active_index=None), r"invalid active_index in the state: active_index must be an int"),
    (_set(active_index=3, switches=[[0, 1, 3], [1, 2, 4], [2, 3, 5]], stage_count=1),
     r"active_index 3 in the state is out of range for 3 stages"),
    (_set(active_index=2, switches=[], stage_count=6),
     r"inconsistent state: active_index is 2 but 0 switches are recorded"),
    (_set(active_index=0),
     r"inconsistent state: active_index is 0 but 1 switch is recorded"),
    (_set(switches=3), r"invalid switches in the state: switches must be a list of "
                       r"\[old_index, new_index, count\]; got int"),
    (_set(switches=[[0, 1]]), r"invalid switches\[0\] in the state: must be "
                              r"\[old_index, new_index, count\] \(three ints\); got \[0, 1\]"),
    (_set(switches=[[0, 1, "3"]]), r"invalid switches\[0\] in the state: must be"),
    (_set(switches=[[0, 1, True]]), r"invalid switches\[0\] in the state: must be"),
    (_set(switches=[[0, 2, 3]]),
     r"inconsistent state: switches\[0\] goes from stage 0 to 2; expected 0 -> 1"),
    (_set(switches=[[0, 1, 7]]),
     r"inconsistent state: switches\[0\] happened at count 7; expected a count after 0 \(the "
     r"previous switch, or the start\) and not above count=6"),
    (_set(switches=[[0, 1, 0]], stage_count=6),
     r"switches\[0\] happened at count 0; expected a count after 0"),
    (_set(active_index=2, switches=[[0, 1, 4], [1, 2, 3]]),
     r"switches\[1\] happened at count 3; expected a count after 4"),
    (_set(active_index=2, switches=[[0, 1, 3], [1, 2, 3]], stage_count=3),
     r"switches\[1\] happened at count 3; expected a count after 3"),
    (_set(stage_count=6),
     r"inconsistent state: stage_count is 6 and idle_count 0, but count - the last switch's "
     r"count = 6 - 3 = 3 \(their sum\)"),
    (_set(triggers=3), r"invalid triggers in the state: triggers must be a list of trigger "
                       r"states; got int"),
    (lambda s: {**s, "triggers": s["triggers"][:1]}, r"the state has 1 triggers, this loss 2"),
    (_set_trigger(0, lambda t: 5),
     r"triggers\[0\]: Plateau: a trigger state must be a dict; got int"),
    (_set_trigger(1, lambda t: {"type": "Milestone"}),
     r"triggers\[1\]: cannot load the state of a Milestone trigger into a RelativeImprovement"),
    (_set_trigger(1, lambda t: {**t, "history": [0.7, "x"]}),
     r"triggers\[1\]: RelativeImprovement: invalid history\[1\] in the state"),
    (_set_trigger(1, lambda t: {**t, "num_low": "1"}),
     r"triggers\[1\]: RelativeImprovement: invalid num_low in the state: num_low must be an int"),
    (_set_trigger(1, lambda t: {**t, "history": [0.7]}),
     r"triggers\[1\]: RelativeImprovement: inconsistent state: num_low=1 but the history "
     r"holds 1 of window=2 values"),
    (_set_trigger(0, lambda t: {**t, "best": float("nan")}),
     r"triggers\[0\]: Plateau: invalid best in the state: a best value cannot be NaN"),
]


@pytest.mark.parametrize(("corrupt", "message"), _BAD_STATES)
def test_an_inconsistent_state_is_rejected_and_changes_nothing(target_and_saved, corrupt,
                                                               message: str) -> None:
    target, saved = target_and_saved
    before = _snapshot(target)
    full = target.state_dict()
    full["_extra_state"] = corrupt(copy.deepcopy(saved))
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(full)
    assert _snapshot(target) == before
    # the state itself was not changed by the failed attempt either
    assert target.step(0.45) is False and target.count == 5


class _CheckLate(Trigger):
    """A custom trigger whose own _load changes itself before it checks (not atomic)."""

    def __init__(self) -> None:
        self.seen = 0

    def update(self, count, stage_count, metric) -> bool:
        self.seen += 1
        return False

    def _state(self) -> dict:
        return {"seen": self.seen}

    def _load(self, state) -> None:
        self.loaded = True
        self.seen = int(state["seen"])


def test_loading_is_atomic_even_with_custom_triggers_that_are_not() -> None:
    loss = SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()], trigger=[_CheckLate(), _CheckLate()])
    loss.step()
    before = _snapshot(loss)
    state = loss.state_dict()
    state["_extra_state"]["triggers"] = [{"type": "_CheckLate", "seen": 5},
                                         {"type": "_CheckLate", "seen": [1]}]
    with pytest.raises(ValueError, match=r"triggers\[1\]: int\(\) argument must be .*not 'list'"):
        loss.load_state_dict(state)
    assert _snapshot(loss) == before and not hasattr(loss.triggers[0], "loaded")
    state["_extra_state"]["triggers"][1] = {"type": "_CheckLate", "seen": "x"}
    with pytest.raises(ValueError, match=r"triggers\[1\]: invalid literal for int\(\)"):
        loss.load_state_dict(state)
    assert _snapshot(loss) == before
    state["_extra_state"]["triggers"][1] = {"type": "_CheckLate", "seen": 2}
    loss.load_state_dict(state)
    assert [t.seen for t in loss.triggers] == [5, 2]


def test_relative_improvement_resumes_mid_patience_inside_a_switching_loss() -> None:
    metrics = [1.0, 0.9, 0.85, 0.84, 0.83, 0.8, 0.6, 0.59, 0.58, 0.575, 0.57, 0.5]

    def make() -> SwitchingLoss:
        return SwitchingLoss([DiceLoss(), BCELoss()], trigger=RelativeImprovement(
            threshold=0.05, window=2, patience=3))

    uninterrupted = make()
    expected = [uninterrupted.step(m) for m in metrics]
    assert uninterrupted.switches == [(0, 1, 11)] and expected.index(True) == 10
    first = make()
    head = [first.step(m) for m in metrics[:10]]
    assert first.triggers[0].num_low == 2  # resumed between two low steps and the third
    resumed = make()
    resumed.load_state_dict(_saved(first))
    assert head + [resumed.step(m) for m in metrics[10:]] == expected
    assert resumed.switches == uninterrupted.switches and resumed.active_name == "bce"


# ------------------------------------------------------------- gaps a review found (2026-12-05)
@pytest.mark.parametrize("outer", ["switching", "composite"])
def test_a_step_without_the_metric_a_trigger_needs_changes_nothing(outer):
    """The ValueError comes before any counter, schedule or nested loss moves, so a caller that
    catches it and steps again with the metric gets one step, not two."""
    inner = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 4)])
    switching = SwitchingLoss([inner, BCELoss()], trigger=Plateau(patience=3))
    loss = switching if outer == "switching" else CompositeLoss([switching, FocalLoss()])
    before = copy.deepcopy(loss.state_dict())
    with pytest.raises(ValueError, match=r"Plateau\(patience=3\) monitors a value: call "
                                         r"step\(metric=\.\.\.\)"):
        loss.step()
    assert (switching.count, switching.stage_count, inner.count) == (0, 0, 0)
    assert inner.current_weights() == {"dice": 1.0, "bce": 0.0}
    assert repr(loss.state_dict()) == repr(before)
    loss.step(metric=0.5)
    assert (switching.count, inner.count) == (1, 1)
    assert inner.current_weights() == {"dice": 1.0, "bce": 0.25}


def test_a_step_needs_no_metric_once_the_plateau_trigger_has_fired():
    loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=1))
    loss.step(metric=1.0)
    loss.step(metric=1.0)
    assert loss.active_index == 1
    loss.step()  # the last stage has no trigger: nothing monitors a value any more
    assert loss.count == 3


@pytest.mark.parametrize("reductions", [("none", "none"), ("none", "mean"), ("mean", "none")])
def test_a_composite_of_terms_of_different_shapes_is_a_value_error(reductions):
    """Dice's per-class scores (C,) and the cross-entropy's per-pixel map (N, H, W) would be
    broadcast into a wrong number."""
    x = torch.randn(2, 3, 4, 5)
    y = torch.randint(0, 3, (2, 4, 5))
    loss = CompositeLoss([DiceLoss(mode="multiclass", reduction=reductions[0]),
                          BCELoss(mode="multiclass", reduction=reductions[1])])
    with pytest.raises(ValueError, match=r"CompositeLoss adds its terms, so their values must "
                                         r"have one shape: term 'dice' gave \(.*\) and term "
                                         r"'bce' gave \(.*\) \(check their reduction="):
        loss(x, y)


def test_a_composite_of_unreduced_terms_of_one_shape_adds_them():
    x = torch.randn(2, 3, 4, 5)
    y = torch.randint(0, 3, (2, 4, 5))
    dice = DiceLoss(mode="multiclass", reduction="none")
    iou = IoULoss(mode="multiclass", reduction="none")
    got = CompositeLoss([dice, iou], weights=[0.5, 2.0])(x, y)
    assert got.shape == (3,)
    torch.testing.assert_close(got, 0.5 * dice(x, y) + 2.0 * iou(x, y))


def test_a_loss_shared_by_two_stages_is_stepped_once_per_step():
    """Stage 1 = stage 0 + a term: the shared composite's ramp moves one step per step (it
    moved two, as every stage steps its children)."""
    base = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 10)])
    loss = SwitchingLoss([base, CompositeLoss([base, FocalLoss()])], milestones=[5])
    for _ in range(3):
        loss.step()
    assert (loss.count, base.count) == (3, 3)
    assert base.current_weights() == {"dice": 1.0, "bce": pytest.approx(0.3)}
    with pytest.warns(RuntimeWarning, match="'compositeloss' \\(CompositeLoss\\) is at count 3"):
        nested = CompositeLoss([base, SwitchingLoss([base, FocalLoss()], milestones=[1])])
    nested.step()
    assert base.count == 4


@pytest.mark.parametrize("spec", ["iou->bce@5", "dice+bce", "iou->bce@plateau(patience=5)",
                                  "linear_ramp(0, 4)*dice+bce"])
def test_a_metric_that_is_no_number_is_refused_whether_or_not_a_trigger_reads_it(spec):
    """``step(metric="val_loss")`` (a name where its value was meant) was refused by a
    Plateau trigger but accepted without a word by a milestone switch and a composite, where
    the mistake shows only once an adaptive stage starts, if ever (found by a review of bad
    input). Every step checks a metric it is given; nothing changes on a refused one."""
    loss = build_loss(spec)
    with pytest.raises(ValueError, match=r"metric \(the monitored value\) must be a number or a "
                                         r"scalar tensor; got str 'val_loss'"):
        loss.step(metric="val_loss")
    with pytest.raises(ValueError, match=r"metric \(the monitored value\) must be a scalar; "
                                         r"got shape \(3,\)"):
        loss.step(metric=torch.tensor([0.5, 0.6, 0.7]))
    assert loss.count == 0
    loss.step(metric=torch.tensor(0.5))
    loss.step(metric=0.4)
    assert loss.count == 2


@pytest.mark.parametrize("sync_metric", [True, False])
def test_the_metric_is_checked_alike_with_and_without_sync(sync_metric):
    """A NumPy float is a number on both paths (it was refused with sync_metric=True), a
    string on neither (it was accepted without), and the errors name the argument."""
    np = pytest.importorskip("numpy")
    loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(), sync_metric=sync_metric)
    loss.step(metric=np.float32(0.5))
    assert loss.count == 1
    for bad, message in [("0.5", r"metric \(the monitored value\) must be a number or a "
                                 r"scalar tensor; got str '0.5'"),
                         (True, "got bool True"),
                         (torch.tensor([0.1, 0.2]), r"must be a scalar; got shape \(2,\)"),
                         (10**400, "must be within the float range; got int beyond it"),
                         # tensors: a real number that can be read (a complex one crashed in
                         # float(), a meta one in .item(); a bool one passed as 1.0)
                         (torch.tensor(0.5 + 0j), "got a tensor of dtype torch.complex64"),
                         (torch.tensor(True), "got a tensor of dtype torch.bool"),
                         (torch.tensor(0.5, device="meta"), "got a tensor on the meta device")]:
        with pytest.raises(ValueError, match=message):
            loss.step(metric=bad)
    assert loss.count == 1


@pytest.mark.parametrize(("milestones", "error", "message"), [
    ([0, 5], ValueError, r"milestones\[0\] must be >= 1; got 0"),
    ([3, 5.0], TypeError, r"milestones\[1\] must be an int; got float 5.0"),
])
def test_a_bad_milestone_is_named_by_its_place(milestones, error, message):
    """The error said "at must be >= 1" (the Milestone trigger's argument), not milestones[i]."""
    with pytest.raises(error, match=message):
        SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()], milestones=milestones)


@pytest.mark.parametrize("cast", ["bfloat16", "half", "to_float16"])
def test_a_composite_cast_to_half_precision_keeps_its_exact_weights(cast):
    """``model.to(torch.bfloat16)`` with the loss inside cast the weights' float64 buffer, so
    the compiled forward (which reads it) used 0.3008 for 0.3 (about 1e-3 of the total; the
    two paths' kernels may differ by float32 rounding: the one-pass composite and the
    separate terms run different loops)."""
    loss = CompositeLoss([DiceLoss(), BCELoss()], weights=[0.3, 0.1])
    if cast == "to_float16":
        loss.to(torch.float16)
    else:
        getattr(loss, cast)()
    assert loss._weight_values.dtype == torch.float64
    assert loss._weight_values.tolist() == [0.3, 0.1]
    x = torch.randn(2, 1, 4, 4)
    y = (torch.rand(2, 1, 4, 4) > 0.5).float()
    torch.testing.assert_close(loss._compiled_forward(x, y), loss(x, y), rtol=1e-6, atol=0)


def test_a_failed_load_into_a_nested_loss_changes_nothing():
    """torch loads a module before its children: a state whose nested part fails (a key only
    the saved loss has, a nested composite's bad state) left the parent loaded, as the docs
    said it would not."""
    saved = SwitchingLoss([CompositeLoss([DiceLoss(), BCELoss()]), BCELoss()], milestones=[3])
    for _ in range(5):
        saved.step()
    other = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[3])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict(saved.state_dict())
    assert (other.count, other.active_index, other.switches) == (0, 0, [])
    events = []
    same = SwitchingLoss([CompositeLoss([DiceLoss(), BCELoss()]), BCELoss()], milestones=[3],
                         on_switch=events.append)
    state = saved.state_dict()
    state["stages.compositeloss._extra_state"] = dict(
        state["stages.compositeloss._extra_state"], count="5")
    with pytest.raises(ValueError, match="count"):
        same.load_state_dict(state)
    assert (same.count, same.active_index) == (0, 0)
    same.load_state_dict(saved.state_dict())
    assert (same.count, same.active_index, same.switches) == (5, 1, [(0, 1, 3)])
    assert same._callbacks == [events.append]  # shared, not copied, by the trial load


@pytest.mark.parametrize("stages, message", [
    ([DiceLoss(), BCELoss(mode="multiclass")],
     r"losses: stage 'bce' takes class-index targets \(mode='multiclass'\) but stage 'dice' "
     r"takes targets of the input's shape \(mode='binary'\)"),
    ({"warmup": CompositeLoss([DiceLoss(mode="multiclass"), FocalLoss(mode="multiclass")]),
      "fine": TverskyLoss(mode="multilabel")},
     r"losses: stage 'fine' takes targets of the input's shape \(mode='multilabel'\) but "
     r"stage 'warmup' takes class-index targets \(mode='multiclass'\)"),
])
def test_stages_that_cannot_take_the_same_target_are_refused_when_built(stages, message):
    """Binary/multilabel and multiclass losses need different targets: a SwitchingLoss of
    both failed only at the switch (epoch 50 by default), hours into a run."""
    with pytest.raises(ValueError, match=message):
        SwitchingLoss(stages)


@pytest.mark.parametrize("terms, message", [
    ([DiceLoss(mode="multiclass"), BCELoss()],
     r"losses: term 'bce' takes targets of the input's shape \(mode='binary'\) "
     r"but term 'dice' takes class-index targets \(mode='multiclass'\); every term is called "
     r"with the same input and target \(binary and multilabel terms may be mixed\)"),
    ({"region": CompositeLoss([DiceLoss(mode="multilabel"), IoULoss(mode="multilabel")]),
      "ce": SwitchingLoss([BCELoss(mode="multiclass"), FocalLoss(mode="multiclass")],
                          milestones=[2])},
     r"term 'ce' takes class-index targets \(mode='multiclass'\) but term 'region' takes "
     r"targets of the input's shape \(mode='multilabel'\)"),
])
def test_terms_that_cannot_take_the_same_target_are_refused_when_built(terms, message):
    """A CompositeLoss of multiclass and binary terms was built (a SwitchingLoss of the same
    pair is refused), then failed at its first call with a shape error that named no term
    (found by a review of bad input)."""
    with pytest.raises(ValueError, match=message):
        CompositeLoss(terms)


def test_an_error_in_a_term_names_the_term():
    """Two terms each with a wrong number of class weights gave the same message, which named
    no term (found by a review of bad input): the error carries a note naming the term (shown
    under the message in a traceback; Python >= 3.11), nested composites each theirs."""
    if sys.version_info < (3, 11):
        pytest.skip("exception notes need Python 3.11")
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 4, 4, generator=generator)
    target = torch.randint(0, 3, (2, 4, 4), generator=generator)
    loss = CompositeLoss([DiceLoss(mode="multiclass", weight=[1.0, 2.0, 3.0]),
                          BCELoss(mode="multiclass", weight=[1.0, 2.0])])
    with pytest.raises(ValueError, match="3 values for an input with C=3; got 2") as info:
        loss(logits, target)
    assert info.value.__notes__ == ["in term 'bce' of the CompositeLoss of terms dice, bce"]
    outer = CompositeLoss({"inner": CompositeLoss([DiceLoss(mode="multiclass"),
                                                   IoULoss(mode="multiclass", weight=[1.0])]),
                           "bce": BCELoss(mode="multiclass")})
    with pytest.raises(ValueError, match="got 1") as info:
        outer(logits, target)
    assert info.value.__notes__ == ["in term 'iou' of the CompositeLoss of terms dice, iou",
                                    "in term 'inner' of the CompositeLoss of terms inner, bce"]


class _OneHot(torch.nn.Module):
    """A user's module: a multilabel loss on the one-hot encoded class-index target."""

    def __init__(self, loss) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, input, target):
        one_hot = torch.nn.functional.one_hot(target, input.shape[1]).movedim(-1, 1)
        return self.loss(input, one_hot.to(input.dtype))


def test_a_loss_inside_a_users_module_is_not_judged_by_its_own_mode():
    """What a module of the user's passes to a loss it holds is the user's: a multilabel loss
    inside a wrapper that one-hot encodes a class-index target mixes with multiclass terms
    and stages (the check of the targets looked into every submodule)."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, 5, generator=generator)
    target = torch.randint(0, 3, (2, 5, 5), generator=generator)
    wrapped = _OneHot(BCELoss(mode="multilabel"))
    composite = CompositeLoss({"dice": DiceLoss(mode="multiclass"), "bce": wrapped})
    assert torch.equal(composite(logits, target),
                       DiceLoss(mode="multiclass")(logits, target) + wrapped(logits, target))
    switching = SwitchingLoss({"dice": DiceLoss(mode="multiclass"), "bce": wrapped},
                              milestones=[1])
    switching.step()
    assert torch.equal(switching(logits, target), wrapped(logits, target))


def test_binary_and_multilabel_stages_take_the_same_target_and_may_switch():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, 5, generator=generator)
    target = (torch.rand(2, 3, 5, 5, generator=generator) > 0.5).float()
    first, second = DiceLoss(mode="multilabel"), BCELoss(mode="binary")
    loss = SwitchingLoss([first, second], milestones=[1])
    assert torch.equal(loss(logits, target), first(logits, target))
    loss.step()
    assert torch.equal(loss(logits, target), second(logits, target))


def test_no_collective_once_no_active_trigger_reads_the_metric(monkeypatch):
    """After the last adaptive switch, step(metric=...) still all-reduced the metric (a
    finished trigger counted): a rank that stepped without one then left the others waiting in
    all_reduce until the timeout. Found by a DDP review."""
    from dynloss.schedules import switching

    reduced = []
    monkeypatch.setattr(switching, "reduce_mean_comparing",
                        lambda m, counters: reduced.append(m) or (float(m), (True,) * 3))
    loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=1))
    loss.step(metric=1.0)
    loss.step(metric=2.0)  # no improvement for one step: switches to the last stage
    assert loss.active_index == 1 and reduced == [1.0, 2.0]
    loss.step(metric=0.5)
    loss.step()
    assert reduced == [1.0, 2.0] and loss.count == 4
    nested = CompositeLoss([SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=1)),
                            FocalLoss()])
    nested.step(metric=1.0)
    assert reduced == [1.0, 2.0, 1.0]


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_relative_improvement_nan_after_a_zero_value_is_no_improvement(mode, sign) -> None:
    """A NaN metric is no improvement whatever its sign bit (``float("nan")`` has it clear,
    ``torch.tensor(0.) / 0`` on x86 set), also after a value of exactly 0 (a validation Dice
    of 0 in the first epoch): it was an infinite improvement for a NaN with the bit clear."""
    nan = math.copysign(math.nan, sign)
    loss = SwitchingLoss([DiceLoss(), BCELoss()],
                         trigger=RelativeImprovement(threshold=0.01, mode=mode))
    assert [loss.step(metric=m) for m in (0.0, nan)] == [False, True]


def test_a_schedule_shared_by_two_composite_stages_steps_once_per_step() -> None:
    """One weight schedule in two composites (two stages) follows the global counter: it was
    stepped once per composite, so a 10-epoch ramp read 0.6 after 3 epochs."""
    ramp = LinearRamp(0, 10)
    first = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, ramp])
    second = CompositeLoss([FocalLoss(), BCELoss()], weights=[1.0, ramp])
    loss = SwitchingLoss([first, second], milestones=[5])
    for _ in range(3):
        loss.step()
    assert ramp.count == 3
    assert first.current_weights()["bce"] == second.current_weights()["bce"] == 0.3
    resumed_ramp = LinearRamp(0, 10)
    resumed = SwitchingLoss([CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, resumed_ramp]),
                             CompositeLoss([FocalLoss(), BCELoss()], weights=[1.0, resumed_ramp])],
                            milestones=[5])
    resumed.load_state_dict(_saved(loss))
    resumed.step()
    assert resumed_ramp.count == 4


def test_a_trigger_starts_fresh_in_a_new_switching_loss() -> None:
    """The same trigger object given to a second loss (a sweep loop) starts with no history:
    it kept the first run's best and bad-epoch count and switched on the first step."""
    trigger = Plateau(patience=2)
    first = SwitchingLoss([DiceLoss(), BCELoss()], trigger=trigger)
    for metric in (0.5, 0.6):
        first.step(metric=metric)
    second = SwitchingLoss([DiceLoss(), BCELoss()], trigger=trigger)
    assert [second.step(metric=m) for m in (0.9, 0.95, 0.99)] == [False, False, True]


class _Locked(torch.nn.Module):
    """A loss that cannot be deep-copied (a lock; a process group is the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.bce = BCELoss()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.scale * self.bce(input, target)


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_of_losses_that_cannot_be_copied(batch, assign) -> None:
    """Loading rolls a failed load back without deep-copying the tree first: a stage holding a
    lock or a process group failed to load at all (TypeError from copy.deepcopy)."""
    trained = SwitchingLoss([DiceLoss(), CompositeLoss([_Locked(), IoULoss()])], milestones=[2])
    for _ in range(3):
        trained.step()
    with torch.no_grad():
        trained.stages["compositeloss"].terms["_locked"].scale.fill_(5.0)
    state = _saved(trained)
    fresh = SwitchingLoss([DiceLoss(), CompositeLoss([_Locked(), IoULoss()])], milestones=[2])
    fresh.load_state_dict(state, assign=assign)
    assert (fresh.active_index, fresh.count, fresh.stages["compositeloss"].count) == (1, 3, 3)
    assert float(fresh.stages["compositeloss"].terms["_locked"].scale) == 5.0
    # a failed load changes nothing: values, the parameter objects (an optimizer holds them)
    # and the schedules' counters
    target = SwitchingLoss([DiceLoss(), CompositeLoss([_Locked(), IoULoss()])], milestones=[2])
    target.step()
    parameter = target.stages["compositeloss"].terms["_locked"].scale
    bad = dict(state)
    bad["stages.compositeloss._extra_state"] = {**state["stages.compositeloss._extra_state"],
                                                "names": ["x", "y"]}
    with pytest.raises(ValueError, match="differ from this loss's"):
        target.load_state_dict(bad, assign=assign)
    assert target.stages["compositeloss"].terms["_locked"].scale is parameter
    assert float(parameter) == 2.0
    assert (target.active_index, target.count, target.stages["compositeloss"].count) == (0, 1, 1)


def test_a_trigger_checks_the_metric_it_is_given_directly() -> None:
    """``Trigger.update`` (called by a custom loop) took ``"0.5"`` as 0.5 through float()."""
    with pytest.raises(ValueError, match=r"must be a number or a scalar tensor; got str '0\.5'"):
        Plateau().update(1, 1, "0.5")  # type: ignore[arg-type]


class _Constantly(WeightSchedule):
    """A custom schedule that breaks the contract (finite, >= 0) from some step on."""

    def __init__(self, value: float, after: int = 0) -> None:
        super().__init__()
        self.bad, self.after = value, after

    def value_at(self, t: int) -> float:
        return self.bad if t >= self.after else 1.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
@pytest.mark.parametrize("other", [BCELoss, TopKLoss])
def test_a_custom_schedule_outside_its_contract_is_named(bad, other) -> None:
    """The fused path (Dice + BCE) said "distribution_weight must be finite", an argument the
    user never gave; the unfused one (Dice + TopK) returned NaN/inf or a negative loss."""
    x, t = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    message = (r"CompositeLoss: the weight of '\w+' \(a _Constantly at step \d(, the next "
               r"step's)?\) must be finite and >= 0; got")
    with pytest.raises(ValueError, match=message):
        CompositeLoss([DiceLoss(), other()], weights=[1.0, _Constantly(bad)])
    loss = CompositeLoss([DiceLoss(), other()], weights=[1.0, _Constantly(bad, after=1)])
    loss(x, t)
    with pytest.raises(ValueError, match=message):
        loss.step()


# ------------------------------------------- gaps a mutation review found (2026-12-05, sixth)
@pytest.mark.parametrize("backend", ["reference", "torch", "native"])
def test_composite_with_the_distribution_term_first(batch, backend) -> None:
    """``[BCE, Dice]`` with unequal weights: the one-pass composite swaps the terms into
    (region, distribution) and back. Neither the swap of the weights nor of ``last_terms`` was
    tested (an unswapped weight gave 1.43 for 1.86)."""
    logits, target = batch
    bce, dice = BCELoss(backend=backend), DiceLoss(backend=backend)
    loss = CompositeLoss([bce, dice], weights=[2.0, 0.5])
    value = loss(logits, target)
    torch.testing.assert_close(value, 2.0 * bce(logits, target) + 0.5 * dice(logits, target),
                               rtol=1e-6, atol=0)
    assert list(loss.last_terms) == ["bce", "dice"]
    torch.testing.assert_close(loss.last_terms["bce"], bce(logits, target), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.last_terms["dice"], dice(logits, target), rtol=1e-6, atol=0)


def test_plateau_in_max_mode_needs_min_delta_more_than_the_best() -> None:
    """``mode="max"``: an improvement is ``m > best + min_delta``; a value just below the best
    is no improvement (untested with ``min_delta > 0``)."""
    trigger = Plateau(patience=1, mode="max", min_delta=0.1)
    assert [trigger.update(t, t, m) for t, m in enumerate([0.5, 0.45], start=1)] == [False, True]
    trigger = Plateau(patience=1, mode="max", min_delta=0.1)
    assert [trigger.update(t, t, m) for t, m in enumerate([0.5, 0.65, 0.7], start=1)] == [
        False, False, True]


def test_relative_improvement_at_the_threshold_is_enough() -> None:
    """The trigger fires once ``r < threshold``: ``r == threshold`` is not low."""
    trigger = RelativeImprovement(threshold=0.5)
    assert [trigger.update(t, t, m) for t, m in enumerate([1.0, 0.5], start=1)] == [False, False]
    trigger = RelativeImprovement(threshold=0.5)
    assert [trigger.update(t, t, m) for t, m in enumerate([1.0, 0.5001], start=1)] == [
        False, True]


@pytest.mark.parametrize(("mode", "values", "want"), [
    ("min", [0.0, 0.1], -math.inf),  # worse from exactly 0: an infinite loss of improvement
    ("min", [0.0, -0.1], math.inf),
    ("max", [0.0, 0.1], math.inf),
    ("max", [0.0, -0.1], -math.inf),
])
def test_relative_improvement_from_exactly_zero(mode, values, want) -> None:
    trigger = RelativeImprovement(threshold=0.01, mode=mode)
    assert trigger.relative_improvement(*values) == want
    fired = [trigger.update(t, t, m) for t, m in enumerate(values, start=1)]
    assert fired == [False, want < 0]


def test_a_composite_built_on_meta_then_to_empty_keeps_its_weights() -> None:
    """Deferred initialisation (built under ``torch.device("meta")``, then ``to_empty``) left
    the weights' buffer, which the compiled forward reads, uninitialised (a compiled loss of
    0.0 where the eager one was 0.73): it is refilled from the weights after every move."""
    with torch.device("meta"):
        loss = CompositeLoss([DiceLoss(), BCELoss()], weights=[0.3, LinearRamp(0, 4)])
    loss.step()
    loss.to_empty(device="cpu")
    assert loss._weight_values.device.type == "cpu"
    assert loss._weight_values.tolist() == [0.3, 0.25]


@pytest.mark.parametrize("copyable", [True, False])
def test_a_failed_load_keeps_just_switched(copyable) -> None:
    """The rollback of a failed load put back the extra states but not ``just_switched``,
    which ``set_extra_state`` resets: a failed load turned True into False."""
    stages = [DiceLoss(), BCELoss() if copyable else _Locked()]
    loss = SwitchingLoss(stages, milestones=[1])
    assert loss.step() is True
    state = loss.state_dict()
    state["unexpected"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        loss.load_state_dict(state)
    assert loss.just_switched is True and loss.active_index == 1


def test_a_successful_load_clears_just_switched() -> None:
    """``just_switched`` says whether the last ``step()`` switched; a loaded state has taken
    no step here, so it reads False (a mutant that kept True survived the suite)."""
    loss = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[1])
    fresh = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[1])
    assert loss.step() is True and loss.just_switched is True
    loss.load_state_dict(fresh.state_dict())
    assert loss.just_switched is False and loss.active_index == 0


def test_a_lazy_module_in_the_tree_loads() -> None:
    """A term holding a lazy module (an uninitialised parameter): the rollback's copy of every
    tensor raised on it, so even a good state did not load."""
    class WithLazy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.LazyLinear(2)

        def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.head(input).sum()

    loss = CompositeLoss({"dice": DiceLoss(), "lazy": WithLazy()})
    assert str(loss.load_state_dict(loss.state_dict())) == "<All keys matched successfully>"


class _Aliased(_Locked):
    """Not deep-copyable, with an extra state the module updates in place, and a
    non-persistent buffer that a pending backward saved."""

    def __init__(self) -> None:
        super().__init__()
        self.state = {"n": 0}
        self.register_buffer("factor", torch.full((3,), 2.0), persistent=False)

    def get_extra_state(self) -> dict:
        return self.state

    def set_extra_state(self, state: dict) -> None:
        self.state.update(state)


def test_the_in_place_rollback_puts_back_exactly_what_the_load_changed() -> None:
    """A tree that cannot be copied is loaded in place and rolled back: an extra state the
    module returns by reference was not kept (the failed value stayed), and every tensor was
    written back (a pending backward then failed: "modified by an inplace operation")."""
    loss = CompositeLoss({"dice": DiceLoss(), "a": _Aliased()})
    x = torch.randn(3, requires_grad=True)
    pending = (x * loss.terms["a"].factor).sum()
    state = loss.state_dict()
    state["terms.a._extra_state"] = {"n": 7}
    state["unexpected"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        loss.load_state_dict(state)
    assert loss.terms["a"].state == {"n": 0}
    pending.backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_each_stage_s_trigger_starts_fresh_when_its_stage_begins() -> None:
    """One trigger for two switches is copied for the second; a trigger that has run before
    (best 0.1, two bad steps) gives each stage a trigger that starts fresh when its stage
    begins: the second stage waits ``patience`` steps of its own (its copy kept the old best
    and bad-step count and switched at once)."""
    plateau = Plateau(patience=2)
    for t, value in enumerate([0.1, 0.2, 0.3], start=1):
        plateau.update(t, t, value)
    loss = SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()], trigger=plateau)
    fired = [loss.step(metric=0.5) for _ in range(6)]
    assert fired == [False, False, True, False, False, True]
    assert loss.switches == [(0, 1, 3), (1, 2, 6)]


@pytest.mark.parametrize("nested", [False, True], ids=["composite", "inside-a-switch"])
def test_a_step_that_would_break_a_weights_contract_changes_nothing(nested) -> None:
    """A custom schedule going negative at the next step: the error came after the counters
    (the composite's, its schedules', a SwitchingLoss's around it) had advanced, so a caller
    that caught it had skipped a step. Now every weight of the next step is checked first."""
    schedule = _Constantly(-1.0, after=2)
    composite = CompositeLoss([DiceLoss(), BCELoss()], weights=[schedule, 1.0])
    loss = SwitchingLoss([composite, FocalLoss()], milestones=[10]) if nested else composite
    loss.step()
    message = (r"CompositeLoss: the weight of 'dice' \(a _Constantly at step 2, the next "
               r"step's\) must be finite and >= 0; got -1\.0; the step was not taken")
    with pytest.raises(ValueError, match=message):
        loss.step()
    assert (composite.count, schedule.count) == (1, 1)
    assert composite.current_weights() == {"dice": 1.0, "bce": 1.0}
    if nested:
        assert (loss.count, loss.stage_count) == (1, 1)


class _HoldsAtTheEnd(WeightSchedule):
    """A custom schedule that overrides ``step`` to stay on the last of its values (its
    ``value_at`` is defined only up to there)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values

    def value_at(self, t: int) -> float:
        return self.values[t]

    def step(self) -> float:
        self.count = min(self.count + 1, len(self.values) - 1)
        return self.value


def test_the_check_before_a_step_follows_a_schedules_own_step() -> None:
    """The check of the next step's weights asked ``value_at(count + 1)``, past the end of a
    schedule whose own ``step`` holds its counter there: an IndexError where the step itself
    was fine."""
    schedule = _HoldsAtTheEnd([1.0, 0.5])
    loss = CompositeLoss([DiceLoss(), BCELoss()], weights=[schedule, 1.0])
    for _ in range(3):
        loss.step()
    assert (loss.count, schedule.count) == (3, 1)
    assert loss.current_weights() == {"dice": 0.5, "bce": 1.0}


@pytest.mark.parametrize("bad", [torch.tensor([1.0, 2.0]), "0.5", 10 ** 400],
                         ids=["two-elements", "str", "beyond-float"])
def test_a_bad_metric_for_a_nested_switch_changes_nothing(bad) -> None:
    """A SwitchingLoss inside a CompositeLoss checked its metric after the composite and its
    weight schedules had advanced."""
    switch = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=2))
    ramp = LinearRamp(0, 10)
    loss = CompositeLoss([switch, FocalLoss()], weights=[1.0, ramp])
    with pytest.raises(ValueError, match="metric"):
        loss.step(metric=bad)
    assert (loss.count, ramp.count, switch.count) == (0, 0, 0)
    loss.step(metric=0.5)
    assert (loss.count, ramp.count, switch.count) == (1, 1, 1)


_STEPPED: list[int] = []


class _Recording(WeightSchedule):
    """A custom ``step`` with a side effect outside the schedule, holding a tensor that is
    not a graph leaf (which ``copy.deepcopy`` refuses)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = torch.ones(1, requires_grad=True) * 2

    def value_at(self, t: int) -> float:
        return 1.0

    def step(self) -> float:
        _STEPPED.append(self.count)
        return super().step()


def test_the_check_before_a_step_neither_copies_nor_steps_a_custom_schedule_twice() -> None:
    """The check of the next weights stepped a deep copy of each schedule: a schedule that
    holds what deep-copy refuses (a non-leaf tensor, a DataLoader iterator) made every step()
    fail, and a custom step() ran twice per step (its side effects too: logging, the global
    RNG). Schedules with their own step() or value are now checked after their step, as
    before; those that define value_at alone, before."""
    _STEPPED.clear()
    schedule = _Recording()
    loss = CompositeLoss([DiceLoss(), BCELoss()], weights=[schedule, 1.0])
    loss.step()
    loss.step()
    assert _STEPPED == [0, 1] and schedule.count == 2


class _HoldingTrigger(_CheckLate):
    """A custom trigger holding a tensor that is not a graph leaf (deep-copy refuses it)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = torch.ones(1, requires_grad=True) * 2


def test_a_checkpoint_loads_into_schedules_and_triggers_that_deep_copy_refuses() -> None:
    """The state of each weight schedule and trigger was dry-run on a deep copy of it first,
    and a copy that failed otherwise than with TypeError (a non-leaf tensor: RuntimeError) made
    every load fail. Such a tree is loaded in place, with a failure rolled back (see
    ``load_all_or_nothing``): the dry run is skipped where no copy can be made."""
    composite = CompositeLoss([DiceLoss(), BCELoss()], weights=[_Recording(), 1.0])
    switch = SwitchingLoss([composite, FocalLoss()], trigger=_HoldingTrigger())
    state = copy.deepcopy(switch.state_dict())
    switch.step()
    switch.step()
    switch.load_state_dict(state)
    assert (switch.count, composite.count, composite.weights[0].count) == (0, 0, 0)
    assert switch.triggers[0].seen == 0
    bad = copy.deepcopy(state)
    bad["_extra_state"]["triggers"] = [{"type": "_CheckLate", "seen": [1]}]
    switch.step()
    with pytest.raises(ValueError, match=r"triggers\[0\]"):
        switch.load_state_dict(bad)
    assert (switch.count, composite.count, switch.triggers[0].seen) == (1, 1, 1)


# ------------------------------------------------- a nested SwitchingLoss in a later stage
def _switch_count(trigger_factory, metrics) -> int:
    """The count at which a top-level two-stage loss with this trigger switches."""
    loss = SwitchingLoss([BCELoss(), FocalLoss()], trigger=trigger_factory())
    for metric in metrics:
        if loss.step(metric=metric):
            return loss.count
    raise AssertionError("no switch")


def test_a_nested_switch_holds_its_stage_until_its_stage_begins() -> None:
    """The outer loss stepped every stage with the metric: a Plateau nested in stage 1 switched
    at count 3 while stage 0 trained, its callback ran then, and stage 1 began on focal."""
    inner = SwitchingLoss([BCELoss(), FocalLoss()], trigger=Plateau(patience=2))
    events: list[int] = []
    inner.on_switch(lambda event: events.append(event.count))
    outer = SwitchingLoss([DiceLoss(), inner], milestones=[10])
    for _ in range(10):
        outer.step(metric=1.0)  # a plateau from the first step
    assert (outer.active_index, inner.active_index, events) == (1, 0, [])
    assert (inner.count, inner.stage_count) == (10, 0)  # counted, but not in use
    fresh = _switch_count(lambda: Plateau(patience=2), [1.0] * 10)
    for _ in range(fresh):
        outer.step(metric=1.0)
    assert events == [10 + fresh] and inner.switches == [(0, 1, 10 + fresh)]


def test_a_nested_adaptive_trigger_needs_no_metric_before_its_stage() -> None:
    """``build_loss("dice->(bce->focal@plateau)@10").step()`` raised "Plateau() monitors a
    value" although the active trigger was the milestone."""
    loss = build_loss("dice->(bce->focal@plateau(patience=2))@10")
    for _ in range(10):
        loss.step()
    assert loss.active_index == 1
    with pytest.raises(ValueError, match=r"Plateau\(patience=2\) monitors a value"):
        loss.step()
    assert loss.count == 10  # the refused step changed nothing


def test_a_nested_stage_counts_its_stage_from_when_it_begins() -> None:
    """``min_epochs`` of a nested trigger counts the steps its stage is in use."""
    inner = SwitchingLoss([BCELoss(), FocalLoss()], trigger=Plateau(patience=1, min_epochs=4))
    outer = SwitchingLoss([DiceLoss(), inner], milestones=[6])
    switched = [outer.step(metric=1.0) or inner.just_switched for _ in range(12)]
    assert inner.switches == [(0, 1, 6 + 4)]
    assert switched.index(True) == 5  # (the outer switch at count 6)


def test_a_loss_used_as_two_stages_starts_fresh_in_the_second() -> None:
    """The same nested loss as stages 0 and 2: its trigger and stage length start again when
    stage 2 begins, as a top-level stage's do."""
    inner = SwitchingLoss([BCELoss(), FocalLoss()], trigger=Plateau(patience=2))
    outer = SwitchingLoss([inner, DiceLoss(), inner], milestones=[2, 4])
    for metric in (1.0, 0.5, 0.7, 0.7):  # inner in use at counts 1-2 (best 0.5), idle at 3-4
        outer.step(metric=metric)
    assert outer.active_index == 2 and inner.stage_count == 0
    for _ in range(3):
        outer.step(metric=0.9)  # fresh: best 0.9 at 5, no improvement at 6 and 7
    assert inner.switches == [(0, 1, 7)]  # (with the old best 0.5: at 6)


def test_a_checkpoint_of_a_nested_switch_resumes_the_same_sequence() -> None:
    def build() -> SwitchingLoss:
        return build_loss("dice->(bce->focal@plateau(patience=2, min_epochs=1))@4")

    metrics = [1.0, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7]
    straight = build()
    for metric in metrics:
        straight.step(metric=metric)
    for cut in range(len(metrics)):
        first = build()
        for metric in metrics[:cut]:
            first.step(metric=metric)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        resumed = build()
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        for metric in metrics[cut:]:
            resumed.step(metric=metric)
        assert resumed.state_dict() == straight.state_dict(), cut


def test_a_state_saved_before_idle_steps_were_counted_still_loads() -> None:
    """States saved by earlier versions have no ``idle_count``: 0."""
    loss = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[2])
    for _ in range(3):
        loss.step()
    state = loss.state_dict()
    assert state["_extra_state"]["idle_count"] == 0
    del state["_extra_state"]["idle_count"]
    other = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[2])
    other.load_state_dict(state)
    assert (other.count, other.stage_count, other.active_index) == (3, 1, 1)
    state["_extra_state"]["idle_count"] = 1  # stage_count + idle_count != count - last
    with pytest.raises(ValueError, match="inconsistent state: stage_count is 1 and "
                                         "idle_count 1"):
        other.load_state_dict(state)


class _LockedTrigger(Trigger):
    """A trigger deep-copy refuses (a lock), loading only a valid state (checks, then sets)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen = 0

    def update(self, count: int, stage_count: int, metric: float | None) -> bool:
        self.seen += 1
        return False

    def _state(self) -> dict:
        return {"seen": self.seen}

    def _load(self, state) -> None:
        if not isinstance(state["seen"], int):
            raise ValueError("seen must be an int")
        self.seen = state["seen"]


class _LockedSchedule(WeightSchedule):
    """A weight schedule deep-copy refuses, with a state of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.level = 0

    def value_at(self, t: int) -> float:
        return 1.0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "level": self.level}

    def load_state_dict(self, state) -> None:
        if not isinstance(state["level"], int):
            raise ValueError("level must be an int")
        super().load_state_dict({"count": state["count"]})
        self.level = state["level"]


def test_a_failed_load_through_a_parent_module_leaves_the_triggers_as_they_were() -> None:
    """A parent module's load_state_dict calls set_extra_state directly: with a trigger that
    deep-copy refuses (no dry run), trigger 0 was loaded before trigger 1 failed."""
    def build() -> SwitchingLoss:
        return SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()],
                             trigger=[Plateau(patience=9), _LockedTrigger()])

    trained = build()
    for metric in (1.0, 0.5, 0.7):
        trained.step(metric=metric)
    state = trained.state_dict()["_extra_state"]
    state["triggers"][1] = {**state["triggers"][1], "seen": "bad"}
    model = torch.nn.Module()
    model.loss = build()
    before = model.loss.triggers[0].state_dict()
    with pytest.raises(ValueError, match="seen must be an int"):
        model.load_state_dict({"loss._extra_state": state})
    assert model.loss.triggers[0].state_dict() == before
    assert model.loss.count == 0


def test_a_failed_load_through_a_parent_module_leaves_the_schedules_as_they_were() -> None:
    def build() -> CompositeLoss:
        return CompositeLoss([DiceLoss(), BCELoss(), FocalLoss()],
                             weights=[LinearRamp(0, 4), _LockedSchedule(), 1.0])

    trained = build()
    for _ in range(3):
        trained.step()
    state = trained.state_dict()["_extra_state"]
    assert state["schedules"][0]["count"] == 3
    state["schedules"][1] = {**state["schedules"][1], "level": "bad"}
    model = torch.nn.Module()
    model.loss = build()
    with pytest.raises(ValueError, match="level must be an int"):
        model.load_state_dict({"loss._extra_state": state})
    assert model.loss.weights[0].count == 0 and model.loss.count == 0


def test_an_int_trigger_below_one_is_named_as_given() -> None:
    """``trigger=[0]`` said "at must be >= 1", an argument the user never wrote."""
    with pytest.raises(ValueError, match=r"trigger\[1\] must be >= 1 \(an int is a milestone\); "
                                         r"got 0"):
        SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()], trigger=[Plateau(), 0])


@pytest.mark.parametrize("weight", [lambda t: t, Plateau()], ids=["function", "trigger"])
def test_a_weight_that_is_neither_a_number_nor_a_schedule_says_what_is(weight) -> None:
    with pytest.raises(TypeError, match=r"weight of 'dice' must be a real number or a "
                                        r"WeightSchedule \(.*LinearRamp.*\); got"):
        CompositeLoss([DiceLoss(), BCELoss()], weights=[weight, 1.0])


def test_a_nested_switch_in_use_on_both_sides_of_a_switch_goes_on() -> None:
    """Stage 1 = stage 0 + a term, stage 0 a SwitchingLoss: the outer switch restarted the
    nested loss's Plateau and stage length although it never stopped being in use."""
    def build() -> SwitchingLoss:
        return SwitchingLoss([BCELoss(), FocalLoss()], trigger=Plateau(patience=3, max_epochs=5))

    alone = build()
    for _ in range(7):
        alone.step(metric=1.0)
    inner = build()
    outer = SwitchingLoss([inner, CompositeLoss([inner, DiceLoss()])], milestones=[3])
    for _ in range(7):
        outer.step(metric=1.0)
    assert inner.switches == alone.switches == [(0, 1, 4)]
    assert (inner.stage_count, inner.idle_count) == (alone.stage_count, 0)


@pytest.mark.parametrize("order", ["held-first", "direct-first"])
def test_a_switch_both_held_and_used_directly_is_in_use(order) -> None:
    """S in M's inactive stage and also a term of the composite: whether S counted as in use
    depended on the order of the terms, and with the held one first its trigger was never
    consulted although a metric was required for it."""
    held = SwitchingLoss([BCELoss(), FocalLoss()], trigger=Plateau(patience=2))
    holder = SwitchingLoss([DiceLoss(), held], milestones=[100])
    terms = [holder, held] if order == "held-first" else [held, holder]
    outer = SwitchingLoss([CompositeLoss(terms), IoULoss()], milestones=[50])
    with pytest.raises(ValueError, match="monitors a value"):
        outer.step()
    for _ in range(5):
        outer.step(metric=1.0)
    assert held.switches == [(0, 1, 3)] and held.idle_count == 0


class _Fussy(_LockedTrigger):
    """Breaks the contract: loads no state with ``seen == 0``, its own first state."""

    def _load(self, state) -> None:
        self.seen = state["seen"]
        if self.seen == 0 or not isinstance(self.seen, int):
            raise ValueError("seen out of range")


def test_a_rollback_that_fails_for_one_part_still_restores_the_others() -> None:
    def build() -> SwitchingLoss:
        return SwitchingLoss([DiceLoss(), BCELoss(), FocalLoss()],
                             trigger=[_LockedTrigger(), _Fussy()])

    trained = build()
    for _ in range(3):
        trained.step()
    state = trained.state_dict()["_extra_state"]
    state["triggers"][1] = {**state["triggers"][1], "seen": "bad"}
    model = torch.nn.Module()
    model.loss = build()
    with pytest.raises(ValueError, match=r"SwitchingLoss: triggers\[1\]: seen out of range"):
        model.load_state_dict({"loss._extra_state": state})
    assert model.loss.triggers[0].seen == 0


# ------------------------------------------------------ one schedule or trigger, one loss
def test_a_schedule_reused_in_a_new_composite_says_where_it_goes_on_from() -> None:
    """A sweep loop that builds a new composite per run around one schedule object: the
    second run began with the ramp finished, silently. A schedule is state (a validation loss
    may share the training loss's on purpose): building says so."""
    ramp = LinearRamp(0, 10)
    first = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, ramp])
    for _ in range(10):
        first.step()
    with pytest.warns(RuntimeWarning, match=r"CompositeLoss: the weight schedule of 'bce' "
                      r"\(LinearRamp\) is at count 10, where another loss left it; this loss "
                      r"goes on from there \(a schedule is shared state: pass a new one, or "
                      r"load_state_dict\(\{'count': 0\}\), to begin at 0\)"):
        second = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, ramp])
    assert (second.count, ramp.count, second.current_weights()["bce"]) == (0, 10, 1.0)


def test_a_validation_loss_may_share_the_training_losss_schedules() -> None:
    """Built around a live loss's schedules after a resume, a composite rewound them (the
    training loss then trained with the wrong weights until its next step)."""
    train = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 10)])
    train.load_state_dict(_saved(_stepped(CompositeLoss(
        [DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 10)]), 5)))
    with pytest.warns(RuntimeWarning, match="is at count 5, where another loss left it; this "
                      "loss goes on from there"):
        val = CompositeLoss([DiceLoss(), BCELoss()], weights=train.weights)
    assert train.current_weights() == val.current_weights() == {"dice": 1.0, "bce": 0.5}
    train.step()
    assert val.current_weights()["bce"] == 0.6
    # the warning's advice, taken after the build, is no step: training goes on
    train.weights[1].load_state_dict({"count": 0})
    train.step()
    assert train.current_weights()["bce"] == 0.1


def _stepped(loss, steps: int):
    for _ in range(steps):
        loss.step()
    return loss


def test_a_schedule_given_to_two_live_losses_is_refused_at_the_step() -> None:
    """One ramp in two losses (one per output head) was stepped by each: 0.6 after 3 epochs
    of a 10-epoch ramp. The second step names it; the step is not taken."""
    ramp = LinearRamp(0, 10)
    heads = [CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, ramp]) for _ in range(2)]
    heads[0].step()
    with pytest.raises(ValueError, match=r"CompositeLoss: the weight schedule of 'bce' "
                       r"\(LinearRamp\) was stepped elsewhere since this loss was built or last "
                       r"stepped it \(1 more step\(s\)\): by another live loss that holds it "
                       r"too, or by hand.*The step was not taken"):
        heads[1].step()
    assert (heads[1].count, ramp.count) == (0, 1)


def test_a_failed_step_leaves_the_loss_usable() -> None:
    """A callback that raised in the middle of a step left the records of the levels above it
    behind: every later step was refused as shared."""
    calls = []

    def flaky(event):
        calls.append(event.new_name)
        if len(calls) == 1:
            raise ConnectionError("the logger is down")

    mix = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 4)])
    loss = SwitchingLoss([DiceLoss(), SwitchingLoss([mix, FocalLoss()], milestones=[4])],
                         milestones=[2], on_switch=flaky)
    loss.step()
    with pytest.raises(ConnectionError):
        loss.step()
    for _ in range(3):
        loss.step()
    assert (loss.count, mix.count, loss.active_name) == (5, 5, "switchingloss")


@pytest.mark.parametrize("holder", ["composite", "switch"])
def test_a_nested_loss_held_by_two_live_losses_is_refused_at_the_step(holder) -> None:
    """A warm-up composite (or a nested switch) in two heads' losses was stepped by each: its
    ramp read 0.6 after 3 epochs, its plateau switched after 2 flat epochs of patience 3."""
    warm = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 10)])
    if holder == "composite":
        heads = [CompositeLoss([warm, IoULoss()]) for _ in range(2)]
        label = "term 'compositeloss'"
    else:
        heads = [SwitchingLoss([warm, loss], milestones=[20]) for loss in (BCELoss(), FocalLoss())]
        label = "stage 'compositeloss'"
    heads[0].step()
    with pytest.raises(ValueError, match=rf"{label} \(CompositeLoss\) was stepped elsewhere "
                       r"since this loss was built or last stepped it \(1 more step\(s\)\)"):
        heads[1].step()
    assert warm.count == 1


def test_a_nested_loss_stepped_directly_as_well_is_refused() -> None:
    inner = SwitchingLoss([BCELoss(), FocalLoss()], trigger=Plateau(patience=3))
    outer = SwitchingLoss([DiceLoss(), inner], milestones=[1])
    outer.step()
    inner.step(metric=1.0)
    with pytest.raises(ValueError, match=r"stage 'switchingloss' \(SwitchingLoss\) .* \(1 more "
                       r"step\(s\)\)"):
        outer.step(metric=1.0)


def test_a_schedule_of_a_copied_or_reloaded_composite_is_its_own() -> None:
    ramp = LinearRamp(0, 4)
    loss = SwitchingLoss([CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, ramp]),
                          CompositeLoss([FocalLoss(), BCELoss()], weights=[1.0, ramp])],
                         milestones=[3])
    loss.step()
    twin = copy.deepcopy(loss)
    twin.step()
    loss.step()
    state = _saved(loss)
    fresh_ramp = LinearRamp(0, 4)
    fresh = SwitchingLoss([CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, fresh_ramp]),
                           CompositeLoss([FocalLoss(), BCELoss()], weights=[1.0, fresh_ramp])],
                          milestones=[3])
    fresh.load_state_dict(state)
    for resumed in (loss, fresh, twin):
        resumed.step()
    assert ramp.count == fresh_ramp.count == 3


def test_a_trigger_given_to_two_live_losses_is_refused_at_the_step() -> None:
    """One Plateau in two losses (one per head) recorded each metric twice: both switched
    after 3 epochs where one loss alone with patience 2 had not."""
    trigger = Plateau(patience=2)
    heads = [SwitchingLoss([DiceLoss(), BCELoss()], trigger=trigger) for _ in range(2)]
    heads[0].step(metric=1.0)
    with pytest.raises(ValueError, match=r"SwitchingLoss: the trigger of stage 'dice' "
                       r"\(Plateau\) was stepped elsewhere since this loss "
                       r"was built or last stepped it \(1 more step\(s\)\).*The step was not "
                       "taken"):
        heads[1].step(metric=1.0)
    assert heads[1].count == 0


def test_two_live_losses_consulting_one_trigger_are_refused() -> None:
    """Built into a second loss, a live loss's trigger starts afresh there (a sweep loop);
    once both consult it, the second is refused."""
    trigger = Plateau(patience=3)
    live = SwitchingLoss([DiceLoss(), BCELoss()], trigger=trigger)
    for _ in range(3):
        live.step(metric=1.0)
    other = SwitchingLoss([IoULoss(), BCELoss()], trigger=trigger)
    other.step(metric=1.0)
    with pytest.raises(ValueError, match="the trigger of stage 'dice'"):
        live.step(metric=1.0)


def test_one_trigger_may_serve_two_nested_switches_one_after_the_other() -> None:
    """Only the switch in use consults it: the idle one was refused once the other had."""
    plateau = Plateau(patience=2)
    warm = SwitchingLoss([DiceLoss(), BCELoss()], trigger=plateau)
    fine = SwitchingLoss([IoULoss(), FocalLoss()], trigger=plateau)
    loss = SwitchingLoss({"warm": warm, "fine": fine}, milestones=[3])
    for metric in (0.9, 0.8, 0.7, 0.7, 0.7, 0.7):
        loss.step(metric=metric)
    assert (loss.active_name, fine.active_name) == ("fine", "focal")


def test_a_frozen_dataclass_trigger_works() -> None:
    """The check once wrote a counter onto the trigger: a frozen dataclass refused it in the
    middle of a step (counters moved, no switch ever)."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class At(Trigger):
        at: int

        def update(self, count: int, stage_count: int, metric: float | None) -> bool:
            return count >= self.at

    loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=At(2))
    assert [loss.step() for _ in range(3)] == [False, True, False]


def test_a_milestone_or_constant_may_serve_two_losses() -> None:
    """Without state they answer alike however often they are asked."""
    at, half = Milestone(2), Constant(0.5)
    heads = [SwitchingLoss([CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, half]),
                            BCELoss()], trigger=at) for _ in range(2)]
    assert [[head.step() for head in heads] for _ in range(2)] == [[False, False], [True, True]]
    assert heads[0].stages["compositeloss"].current_weights()["bce"] == 0.5


def test_a_trigger_of_a_copied_or_reloaded_switch_is_its_own() -> None:
    loss = SwitchingLoss([DiceLoss(), BCELoss(), IoULoss()], trigger=Plateau(patience=2))
    loss.step(metric=1.0)
    twin = copy.deepcopy(loss)
    fresh = SwitchingLoss([DiceLoss(), BCELoss(), IoULoss()], trigger=Plateau(patience=2))
    fresh.load_state_dict(_saved(loss))
    for resumed in (loss, twin, fresh):
        assert [resumed.step(metric=1.0) for _ in range(4)] == [False, True, False, False]


class _Below(Milestone):
    """A milestone that also needs the metric below ``limit``."""

    needs_metric = True

    def __init__(self, at: int, limit: float = 0.5) -> None:
        super().__init__(at)
        self.limit = limit

    def update(self, count: int, stage_count: int, metric: float | None) -> bool:
        return count >= self.at and metric is not None and metric < self.limit


class _Doubled(Constant):
    def value_at(self, t: int) -> float:
        return 2 * self.value_


def test_a_subclass_of_milestone_or_constant_is_written_by_its_own_name() -> None:
    """Written as the base class, a logged repr rebuilt a loss that switched and weighed
    otherwise."""
    loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=_Below(3, limit=0.25))
    assert loss.milestones is None
    assert repr(loss) == "SwitchingLoss([DiceLoss(), BCELoss()], trigger=_Below(at=3, limit=0.25))"
    composite = CompositeLoss([DiceLoss(), BCELoss()], weights=[_Doubled(0.5), 1.0])
    assert repr(composite) == ("CompositeLoss([DiceLoss(), BCELoss()], "
                               "weights=[_Doubled(value=0.5), 1.0])")
    rebuilt = build_loss(repr(composite), names={"_Doubled": _Doubled})
    assert rebuilt.current_weights() == composite.current_weights() == {"dice": 1.0, "bce": 1.0}
    assert type(build_loss(repr(loss), names={"_Below": _Below}).triggers[0]) is _Below
    assert repr(Milestone(3)) == "Milestone(3)" and repr(Constant(0.5)) == "Constant(value=0.5)"


@pytest.mark.parametrize("owner", ["SwitchingLoss", "CompositeLoss"])
@pytest.mark.parametrize("name", ["update", "keys", "training", "forward", "_modules"])
def test_a_loss_named_after_a_module_dict_attribute_is_a_value_error(owner, name) -> None:
    cls = SwitchingLoss if owner == "SwitchingLoss" else CompositeLoss
    message = (rf"{owner}: a loss cannot be named {name!r}, the name of an attribute of "
               r"torch.nn.ModuleDict")
    with pytest.raises(ValueError, match=message):
        cls({name: DiceLoss(), "bce": BCELoss()})
    spec = f"{owner}({{{name!r}: DiceLoss(), 'bce': BCELoss()}})"
    with pytest.raises(SpecError, match=message):
        build_loss(spec)


def test_a_nested_switch_counting_another_unit_is_refused() -> None:
    """A nested loss's counter follows the outer one: milestones=[1000] with unit="step"
    inside an epoch-counted switch switched after 1000 epochs, its event saying 'step'."""
    inner = SwitchingLoss([BCELoss(), FocalLoss()], milestones=[1000], unit="step")
    message = (r"SwitchingLoss: stage 'switchingloss' holds a SwitchingLoss with unit='step'; "
               r"this loss counts unit='epoch' and steps the losses it holds")
    with pytest.raises(ValueError, match=message):
        SwitchingLoss([DiceLoss(), inner], milestones=[5])
    with pytest.raises(ValueError, match=message.replace("stage 'switchingloss'",
                                                         "stage 'compositeloss'")):
        SwitchingLoss([DiceLoss(), CompositeLoss([IoULoss(), inner])], milestones=[5])
    SwitchingLoss([DiceLoss(), inner], milestones=[5], unit="step")  # the same unit: fine


def test_a_composite_of_switches_counting_different_units_is_refused() -> None:
    """A composite steps every switch it holds with one step(): a step-counted and an
    epoch-counted switch in it built (the same tree in a SwitchingLoss was refused), and the
    step-counted one then counted epochs."""
    by_step = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[500], unit="step")
    by_epoch = SwitchingLoss([IoULoss(), FocalLoss()], milestones=[5])
    message = (r"CompositeLoss: term 'switchingloss_2' holds a SwitchingLoss with unit='epoch' "
               r"and term 'switchingloss' one with unit='step'; one step\(\) steps them all, so "
               r"they count the same \(give them one unit\)")
    with pytest.raises(ValueError, match=message):
        CompositeLoss([by_step, by_epoch])
    with pytest.raises(ValueError, match=message.replace("switchingloss_2", "switchingloss")
                       .replace("term 'switchingloss' one", "term 'compositeloss' one")):
        CompositeLoss([CompositeLoss([IoULoss(), by_step]), by_epoch])
    both = CompositeLoss([by_step, SwitchingLoss([IoULoss(), FocalLoss()], [5], unit="step")])
    assert [m.unit for m in both.terms.values()] == ["step", "step"]  # one unit: fine


class _DeepSupervision(torch.nn.Module):
    """A user's wrapper: the outer loss does not step what it holds (the user does)."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs, target):
        return sum(self.loss(output, target) for output in outputs)


def test_a_switch_inside_a_users_wrapper_may_count_another_unit() -> None:
    """Only the losses a step reaches (stages, terms) count the outer loss's steps: one in a
    wrapper of the user's, stepped by the user, was refused."""
    inner = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[1000], unit="step")
    outer = SwitchingLoss([FocalLoss(), _DeepSupervision(inner)], milestones=[5])
    outer.step()
    assert (outer.count, inner.count) == (1, 0)


def test_a_nested_loss_loaded_through_a_parent_module_is_recorded_after_its_load() -> None:
    """torch loads a module before its children: what a switch recorded of its nested
    composite at its own set_extra_state was the count before the composite loaded. Also
    for a loss pickled before the record existed (no record)."""
    def build():
        return torch.nn.ModuleDict({"loss": SwitchingLoss(
            [CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 4)]),
             BCELoss()], milestones=[6])})

    saved = build()
    for _ in range(3):
        saved["loss"].step()
    for legacy in (False, True):
        model = build()
        if legacy:
            for module in model.modules():
                if hasattr(module, "_recorded"):
                    del module._recorded
                    module._load_state_dict_post_hooks.clear()
            model["loss"].step()
        model.load_state_dict(saved.state_dict())
        model["loss"].step()
        assert model["loss"].stages["compositeloss"].current_weights()["bce"] == 1.0



@pytest.mark.parametrize("shape", ["nested", "terms"])
def test_one_trigger_active_in_two_switches_of_one_loss_is_refused_before_the_step(shape):
    """Consulted twice per step: a Plateau(patience=1) fed a strictly improving metric
    switched the outer loss at the first step, and no error followed."""
    trigger = Plateau(patience=1)
    inner = SwitchingLoss([DiceLoss(), BCELoss()], trigger=trigger)
    if shape == "nested":
        loss = SwitchingLoss([inner, IoULoss()], trigger=trigger)
    else:
        loss = CompositeLoss([inner, SwitchingLoss([IoULoss(), FocalLoss()], trigger=trigger)])
    with pytest.raises(ValueError, match=r"SwitchingLoss: one Plateau object is the active "
                       r"trigger of two switches in use in this loss: each step would consult "
                       r"it twice; give each switch its own trigger\. The step was not taken"):
        loss.step(metric=1.0)
    assert (loss.count, inner.count, trigger.best) == (0, 0, None)


def test_a_failed_step_leaves_a_loss_sharing_a_nested_loss_between_stages_usable() -> None:
    """Stage 1 = stage 0 + a term, and a callback that raised: the composite of stage 1,
    not reached by the failed step, kept a stale record and every later step was refused."""
    calls = []

    def flaky(event):
        calls.append(event)
        if len(calls) == 1:
            raise ConnectionError("the logger is down")

    inner = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[1], on_switch=flaky)
    loss = SwitchingLoss([inner, CompositeLoss([inner, FocalLoss()])], milestones=[10])
    with pytest.raises(ConnectionError):
        loss.step()
    for _ in range(3):
        loss.step()
    assert (loss.count, inner.count) == (4, 4)


@pytest.mark.parametrize("copier", ["deepcopy", "torch.save"])
def test_a_validation_loss_around_a_copied_losss_schedule(copier) -> None:
    """The copy's records named its original's step counts: once a validation loss had
    tracked the copy's (new) schedule from 0, the copy's next step was refused (-3 steps)."""
    loss = _stepped(CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 10)]), 3)
    if copier == "deepcopy":
        copied = copy.deepcopy(loss)
    else:
        buffer = io.BytesIO()
        torch.save(loss, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    with pytest.warns(RuntimeWarning, match="is at count 3"):
        CompositeLoss([DiceLoss(), BCELoss()], weights=copied.weights)
    copied.step()
    assert copied.current_weights()["bce"] == 0.4


def test_a_trigger_serving_two_switches_in_turn_survives_reloading_an_earlier_state() -> None:
    """The idle switch recorded the shared trigger one step behind; a load that made it
    active again (no stage beginning) left every later step refused."""
    def build():
        plateau = Plateau(patience=2)
        return SwitchingLoss([SwitchingLoss([DiceLoss(), BCELoss()], trigger=plateau),
                              SwitchingLoss([IoULoss(), FocalLoss()], trigger=plateau)],
                             milestones=[2])

    loss = build()
    loss.step(metric=1.0)
    early = _saved(loss)
    for _ in range(3):
        loss.step(metric=1.0)
    loss.load_state_dict(early)
    assert [loss.step(metric=0.5) for _ in range(3)] == [True, False, False]


def test_a_schedule_stepped_by_hand_is_refused_at_the_composites_step() -> None:
    """The composite steps its schedules: one stepped by hand as well ran ahead of the
    composite (and of the weight a compiled composite reads)."""
    ramp = LinearRamp(0, 4)
    loss = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, ramp])
    loss.step()
    ramp.step()
    with pytest.raises(ValueError, match=r"CompositeLoss: the weight schedule of 'bce' "
                       r"\(LinearRamp\) was stepped elsewhere since this loss was built or last "
                       r"stepped it \(1 more step\(s\)\): by another live loss that holds it too, "
                       r"or by hand; give each loss its own and step only the outermost loss\. "
                       r"The step was not taken"):
        loss.step()
    assert (loss.count, ramp.count) == (1, 2)


@pytest.mark.parametrize("owner", ["SwitchingLoss", "CompositeLoss"])
def test_a_nested_loss_reused_at_a_count_says_where_it_goes_on_from(owner) -> None:
    """A sweep loop reusing one nested loss in each run's new loss: the second run's nested
    loss began at the first run's count (its ramp finished), without a word."""
    mix = _stepped(CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 10)]), 12)
    kind = "stage" if owner == "SwitchingLoss" else "term"
    with pytest.warns(RuntimeWarning, match=rf"{owner}: {kind} 'compositeloss' \(CompositeLoss\) "
                      r"is at count 12, where another loss left it; this loss goes on from "
                      r"there \(build a new one, or load a state, to begin at 0\)"):
        if owner == "SwitchingLoss":
            SwitchingLoss([mix, FocalLoss()], milestones=[5])
        else:
            CompositeLoss([mix, FocalLoss()])


@pytest.mark.parametrize("spec", ["dice->bce@plateau(patience=2)",
                                  "dice->(bce->focal@plateau(patience=1))@2"])
def test_a_switching_loss_pickled_by_0_1_0_checkpoints_and_steps(spec):
    """A SwitchingLoss pickled whole by 0.1.0 (``torch.save(loss)``) had no ``idle_count``:
    its ``state_dict()`` raised AttributeError, and so did ``step()`` where it was nested."""
    from dynloss import build_loss

    def old_pickle(loss):
        loss.step(metric=1.0)
        for module in loss.modules():  # what a 0.1.0 pickle holds
            module.__dict__.pop("idle_count", None)
            module.__dict__.pop("_recorded", None)
        buffer = io.BytesIO()
        torch.save(loss, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    def uncounted(state):  # a nested loss's idle steps, which 0.1.0 did not count
        return {key: {k: v for k, v in value.items() if k != "idle_count"}
                for key, value in state.items()}

    old, fresh = old_pickle(build_loss(spec)), build_loss(spec)
    fresh.step(metric=1.0)
    assert uncounted(old.state_dict()) == uncounted(fresh.state_dict())
    for metric in (0.9, 0.95, 0.97, 0.99):
        assert old.step(metric=metric) == fresh.step(metric=metric)
    assert uncounted(old.state_dict()) == uncounted(fresh.state_dict())
    assert [m.switches for m in old.modules() if hasattr(m, "switches")] == [
        m.switches for m in fresh.modules() if hasattr(m, "switches")]
    rebuilt = build_loss(spec)
    rebuilt.load_state_dict(old.state_dict())
    assert rebuilt.state_dict() == old.state_dict()
