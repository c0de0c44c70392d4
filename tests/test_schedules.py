"""Weight schedules and switch triggers: exact values, validation, state, properties."""

from __future__ import annotations

import io
import math
from copy import deepcopy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dynloss.schedules import (
    Constant,
    Cosine,
    LinearRamp,
    Milestone,
    Plateau,
    RampCosine,
    RelativeImprovement,
    Step,
    WeightSchedule,
)

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


# ------------------------------------------------------------------------------ weight values
def test_constant() -> None:
    assert [Constant().value_at(t) for t in (0, 7)] == [1.0, 1.0]
    assert Constant(0.25).value_at(1000) == 0.25
    assert repr(Constant()) == "Constant()"
    assert repr(Constant(0.25)) == "Constant(value=0.25)"


def test_step_values() -> None:
    schedule = Step(milestones=[2, 4], values=[1.0, 0.5, 0.0])
    assert [schedule.value_at(t) for t in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    assert repr(schedule) == "Step(milestones=[2, 4], values=[1.0, 0.5, 0.0])"


def test_linear_ramp_values() -> None:
    up = LinearRamp(2, 6)
    assert [up.value_at(t) for t in range(8)] == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    down = LinearRamp(0, 4, initial=1.0, final=0.0)
    assert [down.value_at(t) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert repr(down) == "LinearRamp(start=0, end=4, initial=1.0, final=0.0)"


def test_zero_width_ramp_is_a_hard_switch() -> None:
    assert [LinearRamp(3, 3).value_at(t) for t in range(6)] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert [Cosine(3, 3).value_at(t) for t in range(5)] == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_cosine_values() -> None:
    schedule = Cosine(2, 6)
    expected = [1.0, 1.0, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)]
    assert [schedule.value_at(t) for t in range(6)] == pytest.approx(expected, abs=1e-15)
    assert schedule.value_at(6) == 0.0
    assert Cosine(0, 2, initial=0.2, final=0.6).value_at(1) == pytest.approx(0.4)


def test_ramp_cosine_values() -> None:
    schedule = RampCosine(start=2, peak=4, end=8, low=0.1, high=0.9)
    values = [schedule.value_at(t) for t in range(10)]
    assert values[:5] == pytest.approx([0.1, 0.1, 0.1, 0.5, 0.9])
    assert values[6] == pytest.approx(0.5)  # half-way down the cosine
    assert values[5] == pytest.approx(0.1 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert values[8:] == [0.1, 0.1]
    assert max(values) == 0.9


def test_step_counts_calls() -> None:
    schedule = LinearRamp(0, 4)
    assert schedule.value == 0.0 and schedule.count == 0
    assert [schedule.step() for _ in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert schedule() == 1.0 and schedule.count == 5


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LinearRamp(5, 4), "end must be >= start"),
        (lambda: LinearRamp(-1, 4), "start must be >= 0"),
        (lambda: LinearRamp(0, 4, initial=-0.5), "initial must be >= 0"),
        (lambda: Cosine(0, 4, final=math.inf), "final must be finite"),
        (lambda: RampCosine(3, 2, 5), "need start <= peak <= end"),
        (lambda: Step([2, 2], [1.0, 0.5, 0.0]), "strictly increasing"),
        (lambda: Step([2], [1.0]), "values needs one entry more than milestones"),
        (lambda: Constant(-1.0), "value must be >= 0"),
    ],
)
def test_schedule_validation(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_schedule_type_errors() -> None:
    with pytest.raises(TypeError, match=r"start must be an int; got float 1\.5"):
        LinearRamp(1.5, 4)
    with pytest.raises(TypeError, match="must be a real number"):
        Constant("1")


def test_schedule_state_roundtrip() -> None:
    schedule = RampCosine(0, 3, 9)
    for _ in range(5):
        schedule.step()
    buffer = io.BytesIO()
    torch.save(schedule.state_dict(), buffer)
    buffer.seek(0)
    fresh = RampCosine(0, 3, 9)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.count == 5 and fresh.value == schedule.value
    with pytest.raises(ValueError, match="missing keys"):
        fresh.load_state_dict({})
    with pytest.raises(ValueError, match="count must be >= 0"):
        fresh.load_state_dict({"count": -1})


# ---------------------------------------------------------------------------------- property
_counts = st.integers(0, 200)
_weights = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def schedules(draw) -> WeightSchedule:
    kind = draw(st.sampled_from(["constant", "step", "ramp", "cosine", "ramp_cosine"]))
    if kind == "constant":
        return Constant(draw(_weights))
    if kind == "step":
        milestones = sorted(draw(st.sets(_counts, max_size=4)))
        values = draw(st.lists(_weights, min_size=len(milestones) + 1,
                               max_size=len(milestones) + 1))
        return Step(milestones, values)
    a, b, c = sorted(draw(st.lists(_counts, min_size=3, max_size=3)))
    if kind == "ramp":
        return LinearRamp(a, b, draw(_weights), draw(_weights))
    if kind == "cosine":
        return Cosine(a, b, draw(_weights), draw(_weights))
    return RampCosine(a, b, c, draw(_weights), draw(_weights))


@PROPERTY
@given(schedules(), st.lists(st.integers(0, 10_000), max_size=30))
def test_any_schedule_weight_is_finite_and_non_negative(schedule, ts) -> None:
    for t in [*ts, 0, 1, 10_000]:
        value = schedule.value_at(t)
        assert isinstance(value, float)
        assert math.isfinite(value) and value >= 0.0


@PROPERTY
@given(schedules(), st.integers(0, 300))
def test_schedule_stays_between_its_extremes(schedule, t) -> None:
    names = ("initial", "final", "low", "high", "values", "value_")
    bounds: list[float] = []
    for name in names:
        if hasattr(schedule, name):
            attribute = getattr(schedule, name)
            bounds += attribute if isinstance(attribute, list) else [attribute]
    assert min(bounds) <= schedule.value_at(t) <= max(bounds)


@PROPERTY
@given(schedules(), st.integers(0, 250))
def test_schedule_repr_rebuilds_an_equal_schedule(schedule, t) -> None:
    import dynloss.schedules as S

    rebuilt = eval(repr(schedule), vars(S))
    assert repr(rebuilt) == repr(schedule)
    assert rebuilt.value_at(t) == schedule.value_at(t)


# ---------------------------------------------------------------------------------- triggers
def test_milestone() -> None:
    trigger = Milestone(3)
    assert [trigger.update(t, t, None) for t in range(1, 6)] == [False, False, True, True, True]
    assert repr(trigger) == "Milestone(3)"
    with pytest.raises(ValueError, match="at must be >= 1"):
        Milestone(0)


def test_plateau_min_patience_and_delta() -> None:
    trigger = Plateau(patience=2, min_delta=0.05)
    metrics = [1.0, 0.9, 0.87, 0.86, 0.8, 0.79, 0.78]
    fired = [trigger.update(t, t, m) for t, m in enumerate(metrics, start=1)]
    # 0.87 and 0.86 are within min_delta of the best 0.9 -> 2 bad steps -> fires at step 4
    assert fired == [False, False, False, True, False, False, True]
    assert trigger.best == 0.8 and trigger.num_bad == 2


def test_plateau_max_mode_and_nan() -> None:
    trigger = Plateau(patience=1, mode="max")
    assert trigger.update(1, 1, 0.5) is False
    assert trigger.update(2, 2, 0.6) is False
    assert trigger.update(3, 3, math.nan) is True  # NaN never improves


def test_plateau_a_nan_first_value_is_no_improvement() -> None:
    """A diverged first validation pass: NaN is not the best, so the falling values after it
    improve, and the state (NaN-free) still loads."""
    from dynloss import BCELoss, DiceLoss, SwitchingLoss

    trigger = Plateau(patience=2)
    assert [trigger.update(t, t, m) for t, m in enumerate([math.nan, 0.9, 0.8, 0.7], 1)] == [
        False] * 4
    assert (trigger.best, trigger.num_bad) == (0.7, 0)
    loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=2))
    loss.step(metric=math.nan)
    resumed = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=2))
    resumed.load_state_dict(loss.state_dict())
    assert (resumed.triggers[0].best, resumed.triggers[0].num_bad) == (None, 1)


def test_plateau_min_and_max_epochs() -> None:
    trigger = Plateau(patience=0, min_epochs=3)
    assert [trigger.update(t, t, 1.0) for t in range(1, 5)] == [False, False, True, True]
    capped = Plateau(patience=100, max_epochs=3)
    assert [capped.update(t, t, 1.0 / t) for t in range(1, 5)] == [False, False, True, True]
    with pytest.raises(ValueError, match="max_epochs must be >= min_epochs"):
        Plateau(min_epochs=5, max_epochs=2)
    # the bound is inclusive: min_epochs == max_epochs is a fixed stage length (mutation review)
    for trigger in (Plateau(min_epochs=3, max_epochs=3),
                    RelativeImprovement(min_epochs=3, max_epochs=3)):
        assert [trigger.update(t, t, 1.0 / t) for t in range(1, 5)] == [False, False, True, True]
    with pytest.raises(ValueError, match="mode must be one of 'min', 'max'; got 'mean'"):
        Plateau(mode="mean")


def test_plateau_needs_metric() -> None:
    with pytest.raises(ValueError, match=r"Plateau\(patience=3\) monitors a value"):
        Plateau(patience=3).update(1, 1, None)


def test_relative_improvement() -> None:
    trigger = RelativeImprovement(threshold=0.1)
    metrics = [1.0, 0.5, 0.46, 0.3, 0.29]
    # improvements: -, 50 %, 8 %, 34.8 %, 3.3 %
    assert [trigger.update(t, t, m) for t, m in enumerate(metrics, 1)] == [
        False, False, True, False, True,
    ]


def test_relative_improvement_window_patience_max_mode() -> None:
    trigger = RelativeImprovement(threshold=0.2, window=2, patience=2, mode="max")
    metrics = [0.5, 0.55, 0.61, 0.62, 0.64, 0.9]
    # vs two steps back: 0.61/0.5=+22 % (not low), 0.62/0.55=+12.7 %, 0.64/0.61=+4.9 % -> fires
    fired = [trigger.update(t, t, m) for t, m in enumerate(metrics, 1)]
    assert fired == [False, False, False, False, True, False]
    assert trigger.relative_improvement(0.0, 0.0) == 0.0


def test_relative_improvement_max_epochs_below_window_ends_the_stage() -> None:
    """The docstring: no decision on the improvement in the first ``window`` steps, but a
    ``max_epochs`` below ``window`` still ends the stage (found by a docstring review)."""
    trigger = RelativeImprovement(threshold=0.01, window=5, max_epochs=2)
    assert [trigger.update(t, t, 1.0) for t in (1, 2)] == [False, True]
    # without max_epochs, a flat metric decides only once the window is full
    trigger = RelativeImprovement(threshold=0.01, window=5)
    assert [trigger.update(t, t, 1.0) for t in range(1, 7)] == [False] * 5 + [True]


@pytest.mark.parametrize(("mode", "values", "improvement"), [
    ("min", [-1.0, -2.0], 1.0),   # a negative loss (a log-likelihood, say) falling: +100 %
    ("min", [-2.0, -1.0], -0.5),
    ("max", [-2.0, -1.0], 0.5),   # a negative score rising
])
def test_relative_improvement_of_a_negative_value_keeps_its_sign(mode, values, improvement):
    """The improvement divides by |m_{t-w}|: with ``m/ref`` instead, a negative value that
    improves counted as a fall and switched (mutation review)."""
    trigger = RelativeImprovement(threshold=0.1, mode=mode)
    assert trigger.relative_improvement(*values) == improvement
    fired = [trigger.update(t, t, m) for t, m in enumerate(values, 1)]
    assert fired == [False, improvement < 0.1]


def test_trigger_state_roundtrip_and_reset() -> None:
    trigger = Plateau(patience=3)
    for t, m in enumerate([0.5, 0.6, 0.7], 1):
        trigger.update(t, t, m)
    state = trigger.state_dict()
    assert state == {"type": "Plateau", "best": 0.5, "num_bad": 2}
    fresh = Plateau(patience=3)
    fresh.load_state_dict(state)
    assert fresh.update(4, 4, 0.55) is True
    fresh.reset()
    assert fresh.best is None and fresh.num_bad == 0
    with pytest.raises(ValueError, match="cannot load the state of a Plateau trigger into a "
                                         "RelativeImprovement trigger"):
        RelativeImprovement().load_state_dict(state)
    relative = RelativeImprovement(window=2)
    relative.update(1, 1, 1.0)
    copy = RelativeImprovement(window=2)
    copy.load_state_dict(relative.state_dict())
    assert copy.history == [1.0] and copy.num_low == 0
    # A state is a snapshot: later steps do not rewrite a checkpoint kept in memory.
    from dynloss import BCELoss, DiceLoss, SwitchingLoss

    saved = relative.state_dict()
    module = SwitchingLoss([DiceLoss(), BCELoss()], trigger=RelativeImprovement(window=2))
    module.step(metric=1.0)
    module_saved = deepcopy(module.state_dict())
    kept = module.state_dict()
    for value in (0.9, 0.8):
        relative.update(2, 2, value)
        module.step(metric=value)
    assert saved["history"] == [1.0]
    assert repr(kept) == repr(module_saved)


# ------------------------------------------------- issue #11: validated, atomic state loading
def _saved_round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_relative_improvement_resumes_mid_patience_exactly() -> None:
    metrics = [1.0, 0.9, 0.85, 0.84, 0.83, 0.8, 0.6, 0.59, 0.58, 0.575, 0.57]

    def make() -> RelativeImprovement:
        return RelativeImprovement(threshold=0.05, window=2, patience=3)

    # improvements vs two steps back: 15 %, 6.7 %, 2.4 % (low 1), 4.8 % (low 2), 27.7 % (reset),
    # 26 %, 3.3 % (low 1), 2.5 % (low 2), 1.7 % (low 3: fires)
    uninterrupted = make()
    expected = [uninterrupted.update(t, t, m) for t, m in enumerate(metrics, 1)]
    assert expected == [False] * 10 + [True]
    low_counts = []
    for cut in range(len(metrics) + 1):
        first = make()
        head = [first.update(t, t, m) for t, m in enumerate(metrics[:cut], 1)]
        low_counts.append(first.num_low)
        resumed = make()
        resumed.load_state_dict(_saved_round_trip(first.state_dict()))
        assert (resumed.history, resumed.num_low) == (first.history, first.num_low)
        tail = [resumed.update(t, t, m) for t, m in enumerate(metrics[cut:], cut + 1)]
        assert head + tail == expected
    assert low_counts == [0, 0, 0, 0, 0, 1, 2, 0, 0, 1, 2, 3]


@pytest.mark.parametrize(("make", "state", "message"), [
    (lambda: Plateau(), 5, r"Plateau: a trigger state must be a dict; got int"),
    (lambda: Plateau(), {"best": 0.5, "num_bad": 0},
     r"Plateau: the state does not fit \(missing keys \['type'\]"),
    (lambda: Plateau(), {"type": "Plateau", "best": "0.5", "num_bad": 0},
     r"Plateau: invalid best in the state: best must be a number or None; got str '0\.5'"),
    (lambda: Plateau(), {"type": "Plateau", "best": 0.5, "num_bad": 1.5},
     r"Plateau: invalid num_bad in the state: num_bad must be an int; got float 1\.5"),
    (lambda: Plateau(), {"type": "Plateau", "best": 0.5, "num_bad": True},
     r"invalid num_bad in the state: num_bad must be an int; got bool True"),
    (lambda: Plateau(), {"type": "Plateau", "best": 0.5, "num_bad": -1},
     r"invalid num_bad in the state: num_bad must be >= 0; got -1"),
    (lambda: Plateau(), {"type": "Plateau", "best": math.nan, "num_bad": 0},
     r"Plateau: invalid best in the state: a best value cannot be NaN"),
    (lambda: RelativeImprovement(window=2), {"type": "RelativeImprovement", "history": 0.5,
                                             "num_low": 0},
     r"invalid history in the state: history must be a list of numbers; got float"),
    (lambda: RelativeImprovement(window=2), {"type": "RelativeImprovement",
                                             "history": [0.3, "x"], "num_low": 0},
     r"invalid history\[1\] in the state: history\[1\] must be a number; got str 'x'"),
    (lambda: RelativeImprovement(window=2), {"type": "RelativeImprovement",
                                             "history": [0.3], "num_low": "x"},
     r"invalid num_low in the state: num_low must be an int; got str 'x'"),
    (lambda: RelativeImprovement(window=2), {"type": "RelativeImprovement",
                                             "history": [0.3, 0.2, 0.1], "num_low": 0},
     r"the saved history \[0\.3, 0\.2, 0\.1\] does not fit window=2"),
    (lambda: RelativeImprovement(window=2), {"type": "RelativeImprovement",
                                             "history": [0.3], "num_low": 1},
     r"inconsistent state: num_low=1 but the history holds 1 of window=2 values"),
    (lambda: LinearRamp(0, 4), {"count": "3"},
     r"LinearRamp: invalid count in the state: count must be an int; got str '3'"),
    (lambda: LinearRamp(0, 4), {"count": 2.0},
     r"LinearRamp: invalid count in the state: count must be an int; got float 2\.0"),
    (lambda: Constant(), [3], r"Constant: a state must be a dict; got list"),
])
def test_bad_states_are_value_errors_and_change_nothing(make, state, message: str) -> None:
    target = make()
    if isinstance(target, WeightSchedule):
        target.step()
    else:
        for t, m in enumerate([1.0, 0.7, 0.65], 1):
            target.update(t, t, m)
    before = dict(vars(target))
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert vars(target) == before


@pytest.mark.parametrize(("milestones", "values", "message"), [
    (5, [1.0, 0.5], "milestones must be a list; got int 5"),
    ([1], 0.5, "values must be a list; got float 0.5"),
    ("12", [1.0, 0.5, 0.0], "milestones must be a list; got str '12'"),
])
def test_step_needs_lists(milestones, values, message) -> None:
    """It failed with "'int' object is not iterable", naming no argument."""
    with pytest.raises(TypeError, match=message):
        Step(milestones=milestones, values=values)


@pytest.mark.parametrize(("mode", "values", "fires"), [
    ("min", [math.inf, 0.5], False),     # from an infinite loss to a finite one: improved
    ("min", [1e308, 0.5], False),
    ("min", [math.inf, math.inf], True),  # no change
    ("min", [-math.inf, 0.5], True),     # worse
    ("max", [-math.inf, 0.5], False),
])
def test_relative_improvement_from_an_infinite_value(mode, values, fires) -> None:
    """inf -> 0.5 counted as no improvement (inf/inf is NaN) and fired, while 1e308 -> 0.5
    did not."""
    trigger = RelativeImprovement(threshold=0.1, mode=mode)
    assert [trigger.update(t, t, m) for t, m in enumerate(values, start=1)] == [False, fires]


def test_numpy_integers_are_counts():
    """Counts given as numpy integers (read from a config or an array) are ints, as the loss
    arguments take them; they were refused ("must be an int; got int64")."""
    import numpy as np

    from dynloss import BCELoss, DiceLoss, SwitchingLoss
    from dynloss.schedules import LinearRamp, Milestone, Plateau

    three = np.int64(3)
    by_milestones = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[three])
    by_trigger = SwitchingLoss([DiceLoss(), BCELoss()], trigger=[np.int32(3)])
    for loss in (by_milestones, by_trigger):
        assert loss.milestones == [3] and type(loss.milestones[0]) is int
        assert "milestones=[3]" in repr(loss)
    assert type(Milestone(three).at) is int
    plateau = Plateau(patience=np.int64(5), mode="min")
    assert plateau.patience == 5 and type(plateau.patience) is int
    ramp = LinearRamp(np.int64(2), np.int16(6))
    assert (ramp.start, ramp.end) == (2, 6) and type(ramp.start) is int
    assert ramp.value_at(4) == 0.5
    with pytest.raises(TypeError, match="must be an int; got float64"):
        Milestone(np.float64(3.0))
    with pytest.raises(TypeError, match="must be an int; got bool"):
        Milestone(np.bool_(True))


@settings(max_examples=60, deadline=None)
@given(patience=st.integers(1, 4), min_delta=st.sampled_from([0.0, 0.01, 0.05]),
       mode=st.sampled_from(["min", "max"]),
       values=st.lists(st.sampled_from([0.5, 0.1, 0.2, 0.45, 0.5, 0.52, 0.9, math.inf,
                                        -math.inf, math.nan]), max_size=14))
@example(patience=2, min_delta=0.0, mode="min", values=[math.inf] * 4)
@example(patience=2, min_delta=0.0, mode="max", values=[-math.inf, math.nan, 0.2, 0.4, 0.2, 0.1])
def test_plateau_is_reduce_lr_on_plateau_with_one_step_less_patience(patience, min_delta, mode,
                                                                     values):
    """The docstring's mapping: ``Plateau(patience=p, min_delta=d)`` fires at the step where
    ``ReduceLROnPlateau(patience=p - 1, threshold=d, threshold_mode="abs")`` first cuts."""
    from dynloss import BCELoss, DiceLoss, SwitchingLoss

    loss = SwitchingLoss([DiceLoss(), BCELoss()],
                         trigger=Plateau(patience=patience, min_delta=min_delta, mode=mode))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, patience=patience - 1, threshold=min_delta,
        threshold_mode="abs", factor=0.5)
    for value in values:
        loss.step(metric=value)
        scheduler.step(value)
        cut = optimizer.param_groups[0]["lr"] < 1.0
        assert (loss.active_index == 1) == cut
        if cut:
            break
