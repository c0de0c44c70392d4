"""``CompositeLoss.weights`` after construction: assigning new weights is checked as the
constructor checks them and is what ``torch.compile`` reads; changing the list in place is a
``TypeError`` that says how to change it.

Found by a review under torch.compile: ``loss.weights[1] = 0.0`` (or ``loss.weights = [...]``)
changed the eager loss but not a compiled one (it reads the weights from a buffer that only
``step()`` and ``load_state_dict()`` refreshed), and a negative weight was taken silently
(the constructor refuses it)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from dynloss import BCELoss, CompositeLoss, DiceLoss
from dynloss.schedules import LinearRamp


def _case():
    gen = torch.Generator().manual_seed(0)
    return torch.randn((2, 1, 6, 6), generator=gen), (
        torch.rand((2, 1, 6, 6), generator=gen) > 0.5).float()


def _weighted(weights):
    x, t = _case()
    return weights[0] * DiceLoss()(x, t) + weights[1] * BCELoss()(x, t)


def test_assigned_weights_are_what_a_compiled_loss_uses():
    loss = CompositeLoss([DiceLoss(), BCELoss()])
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    x, t = _case()
    torch.testing.assert_close(compiled(x, t), _weighted([1.0, 1.0]))
    loss.weights = [1.0, 0.25]
    torch.testing.assert_close(loss(x, t), _weighted([1.0, 0.25]))
    torch.testing.assert_close(compiled(x, t), _weighted([1.0, 0.25]))
    loss.weights = {"dice": 0.5, "bce": LinearRamp(0, 2)}
    assert loss.current_weights() == {"dice": 0.5, "bce": 0.0}
    torch.testing.assert_close(compiled(x, t), _weighted([0.5, 0.0]))
    loss.step()
    torch.testing.assert_close(compiled(x, t), _weighted([0.5, 0.5]))
    assert repr(loss) == ("CompositeLoss([DiceLoss(), BCELoss()], "
                          "weights=[0.5, LinearRamp(start=0, end=2)])")


def test_assigned_weights_are_checked_and_a_refused_one_changes_nothing():
    loss = CompositeLoss([DiceLoss(), BCELoss()], [1.0, 0.5])
    with pytest.raises(ValueError, match="weight of 'bce'"):
        loss.weights = [1.0, -3.0]
    with pytest.raises(ValueError, match="weight of 'dice'"):
        loss.weights = [float("nan"), 1.0]
    with pytest.raises(ValueError, match="got 3 weights for 2 losses"):
        loss.weights = [1.0, 1.0, 1.0]
    with pytest.raises(TypeError, match="weight of 'bce' must be a real number"):
        loss.weights = [1.0, "0.5"]
    assert loss.weights == [1.0, 0.5]
    torch.testing.assert_close(loss(*_case()), _weighted([1.0, 0.5]))


def test_changing_the_weights_in_place_says_how_to_change_them():
    loss = CompositeLoss([DiceLoss(), BCELoss()], [1.0, 0.5])
    message = r"CompositeLoss.weights cannot be changed in place: assign a new list"
    with pytest.raises(TypeError, match=message):
        loss.weights[1] = 0.0
    for change in (lambda w: w.append(1.0), lambda w: w.pop(), lambda w: w.clear(),
                   lambda w: w.extend([1.0]), lambda w: w.sort(), lambda w: w.__delitem__(0),
                   lambda w: w.__iadd__([1.0])):
        with pytest.raises(TypeError, match=message):
            change(loss.weights)
    assert loss.weights == [1.0, 0.5] and list(loss.weights) == [1.0, 0.5]
    torch.testing.assert_close(loss(*_case()), _weighted([1.0, 0.5]))


def test_weights_survive_copies_and_pickles():
    loss = CompositeLoss([DiceLoss(), BCELoss()], [1.0, LinearRamp(0, 4)])
    loss.step()
    for other in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss))):
        assert other.current_weights() == {"dice": 1.0, "bce": 0.25}
        with pytest.raises(TypeError, match="cannot be changed in place"):
            other.weights[0] = 2.0
        other.step()
        assert other.current_weights() == {"dice": 1.0, "bce": 0.5}
    buffer = io.BytesIO()
    torch.save(loss, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(*_case()), loss(*_case()))


def test_a_module_pickled_with_a_plain_weights_list_loads():
    """A CompositeLoss pickled by 0.1.0 held ``weights`` in its ``__dict__``."""
    loss = CompositeLoss([DiceLoss(), BCELoss()], [1.0, LinearRamp(0, 4)])
    loss.step()
    state = loss.__dict__.copy()
    state["weights"] = list(state.pop("_weights"))
    state["_buffers"] = {}  # 0.1.0 had no weights buffer (step() then failed on it)
    for key in ("_recorded", "_explicit_names"):
        state.pop(key, None)
    old = CompositeLoss.__new__(CompositeLoss)
    old.__setstate__(state)
    assert old.current_weights() == {"dice": 1.0, "bce": 0.25}
    torch.testing.assert_close(old(*_case()), _weighted([1.0, 0.25]))
    with pytest.raises(TypeError, match="cannot be changed in place"):
        old.weights[0] = 2.0
    old.step()
    compiled = torch.compile(old, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*_case()), _weighted([1.0, 0.5]))


def test_a_copy_sent_to_another_process_has_a_buffer_of_its_own():
    """torch.multiprocessing moves a module's buffers to shared memory: a loss sent to a worker
    (a sweep, mp.spawn) shared the buffer a compiled loss reads its weights from, so the
    worker's steps changed the parent's compiled loss (found by a review of losses across
    processes). Pickled as torch.multiprocessing pickles, in one process."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # (registers torch's reductions)

    loss = CompositeLoss([DiceLoss(), BCELoss()], [1.0, LinearRamp(0, 4)])
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    x, t = _case()
    child = pickle.loads(ForkingPickler.dumps(loss))
    for _ in range(4):
        child.step()
    assert child.current_weights() == {"dice": 1.0, "bce": 1.0}
    torch.testing.assert_close(compiled(x, t), _weighted([1.0, 0.0]))
    torch.testing.assert_close(torch.compile(child, backend="aot_eager")(x, t),
                               _weighted([1.0, 1.0]))
    loss.step()  # and the other way round
    torch.testing.assert_close(torch.compile(child, backend="aot_eager")(x, t),
                               _weighted([1.0, 1.0]))


def test_a_loss_built_under_inference_mode_steps():
    """Its weights' buffer was an inference tensor: every step() raised after the counters had
    moved (a retry then stepped twice)."""
    with torch.inference_mode():
        loss = CompositeLoss([DiceLoss(), BCELoss()], [1.0, LinearRamp(0, 4)])
    loss.step()
    assert loss.count == 1 and loss.current_weights() == {"dice": 1.0, "bce": 0.25}
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*_case()), _weighted([1.0, 0.25]))
    loss.weights = [0.5, 0.5]
    torch.testing.assert_close(compiled(*_case()), _weighted([0.5, 0.5]))


def test_a_refused_schedule_leaves_the_weights_as_they_were():
    """A custom schedule whose value is no weight (NaN) was assigned before its value was
    checked: the setter raised, yet the loss held it and every later call raised."""
    from dynloss.schedules import WeightSchedule

    class Broken(WeightSchedule):
        def value_at(self, t: int) -> float:
            return float("nan")

    loss = CompositeLoss([DiceLoss(), BCELoss()], [1.0, 0.5])
    with pytest.raises(ValueError, match="weight of 'dice'"):
        loss.weights = [Broken(), 1.0]
    assert loss.weights == [1.0, 0.5]
    torch.testing.assert_close(loss(*_case()), _weighted([1.0, 0.5]))


@pytest.mark.parametrize("stepped", ["schedule", "nested loss"])
def test_assigning_weights_does_not_excuse_a_part_stepped_elsewhere(stepped):
    """The setter recorded every part's count anew: a schedule or nested loss stepped by hand
    (or by another loss) before the assignment went unnoticed at the next step."""
    from dynloss import SwitchingLoss

    switch = SwitchingLoss([BCELoss(), DiceLoss()], milestones=[3])
    ramp = LinearRamp(0, 4)
    loss = CompositeLoss([switch, BCELoss()], [ramp, 0.5])
    loss.step()
    (ramp if stepped == "schedule" else switch).step()
    loss.weights = [ramp, 0.25]
    with pytest.raises(ValueError, match="was stepped elsewhere"):
        loss.step()
    fresh = LinearRamp(0, 4)
    loss.weights = [fresh, 0.25]  # a new schedule is recorded as it is
    if stepped == "schedule":
        loss.step()
        assert fresh.count == 1


def test_an_assigned_constant_schedule_is_not_said_to_be_started():
    """The constructor says nothing of a Constant at a count other than 0 (it has one value at
    every count); the setter warned."""
    import warnings

    from dynloss.schedules import Constant

    constant = Constant(0.5)
    constant.step()
    loss = CompositeLoss([DiceLoss(), BCELoss()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompositeLoss([DiceLoss(), BCELoss()], [1.0, constant])
        loss.weights = [1.0, constant]


def test_a_cpu_composite_steps_under_another_default_device():
    """The weights written at a step were formed on torch's default device: under
    ``torch.set_default_device("meta")`` (standing in for "cuda") a CPU composite's step
    raised "Cannot copy out of meta tensor". Found by a review of the diff."""
    loss = CompositeLoss([DiceLoss(), BCELoss()], weights=[LinearRamp(0, 4), 1.0])
    with torch.device("meta"):
        loss.step()
    assert loss._weight_values.device.type == "cpu"
    assert loss._weight_values.tolist() == [0.25, 1.0]


@pytest.mark.parametrize(("value", "message"), [
    (torch.tensor(0.5), "must be a real number; got Tensor"),
    ("1", "must be a real number; got str"),
    (True, "must be a real number; got bool"),
])
def test_a_custom_schedule_returning_no_real_number_is_refused_naming_the_term(value, message):
    """A custom ``value_at`` returning a 0-d tensor passed construction and ``step()`` and
    failed at the first forward of a fused pair naming an internal parameter
    (``region_weight``); one returning a string raised a bare ``TypeError`` from ``math``."""
    from dynloss.schedules import WeightSchedule

    class Custom(WeightSchedule):
        def value_at(self, t):
            return value

    with pytest.raises(TypeError, match=r"CompositeLoss: the weight of 'dice' \(a Custom at "
                                        r"step 0\) " + message):
        CompositeLoss([DiceLoss(), BCELoss()], weights=[Custom(), 1.0])


def test_a_custom_schedule_may_return_any_real_number():
    """numpy scalars and ints are real numbers: read as Python floats."""
    import numpy as np

    from dynloss.schedules import WeightSchedule

    class Custom(WeightSchedule):
        def value_at(self, t):
            return np.float32(0.5) if t == 0 else 2

    loss = CompositeLoss([DiceLoss(), BCELoss()], weights=[Custom(), 1.0])
    assert loss.current_weights() == {"dice": 0.5, "bce": 1.0}
    assert type(loss.current_weights()["dice"]) is float
    loss.step()
    assert loss.current_weights() == {"dice": 2.0, "bce": 1.0}
    assert type(loss.current_weights()["dice"]) is float
    x, t = torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    torch.testing.assert_close(loss(x, t), 2.0 * DiceLoss()(x, t) + BCELoss()(x, t))


def test_a_term_that_sums_is_not_fused_as_a_mean():
    """The fused Dice+BCE pass forms the mean of the pixel term; a BCE term with another
    reduction keeps its own (a mutant fusing it anyway gave the mean: 1.2 for 25.5;
    mutation review)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=gen)
    t = torch.randint(0, 2, (2, 1, 4, 4), generator=gen).float()
    bce = BCELoss(reduction="sum")
    want = DiceLoss()(x, t) + bce(x, t)
    torch.testing.assert_close(CompositeLoss([DiceLoss(), bce])(x, t), want,
                               rtol=1e-6, atol=1e-6)


def test_a_weights_mapping_must_name_exactly_the_terms():
    """A misspelled name among the weights is refused, not silently dropped."""
    losses = {"dice": DiceLoss(), "bce": BCELoss()}
    with pytest.raises(ValueError, match=r"weights must name the same terms as losses "
                                         r"\['dice', 'bce'\]; got \['bce', 'bec', 'dice'\]"):
        CompositeLoss(losses, weights={"dice": 1.0, "bce": 0.5, "bec": 2.0})
    with pytest.raises(ValueError, match=r"weights must name the same terms"):
        CompositeLoss(losses, weights={"dice": 1.0})
    assert CompositeLoss(losses, weights={"bce": 0.5, "dice": 1.0}).weights == [1.0, 0.5]


def test_a_fused_composite_plans_its_calls_as_a_single_loss_does(monkeypatch):
    """A fused composite (Dice + CE, one pass) prepares the layout and chooses the backend
    once per signature of its tensors, as a single loss does with its plans (it did both at
    every call); a new shape, a term's reassigned argument, new weights and a copy are
    honoured, each value the sum of the terms computed alone."""
    import dynloss.functional._call as call

    prepared = []
    real_prepare = call.prepare
    monkeypatch.setattr(call, "prepare", lambda *a: prepared.append(a[2]) or real_prepare(*a))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((2, 3, 5, 4), generator=gen)
    t = torch.randint(0, 3, (2, 5, 4), generator=gen)

    def alone(dice, bce, weights, x=x, t=t):
        return weights[0] * dice(x, t) + weights[1] * bce(x, t)

    loss = CompositeLoss([DiceLoss(mode="multiclass"), BCELoss(mode="multiclass")])
    want = alone(DiceLoss(mode="multiclass"), BCELoss(mode="multiclass"), [1.0, 1.0])
    prepared.clear()
    for _ in range(3):
        torch.testing.assert_close(loss(x, t), want)
    assert prepared == ["multiclass"]  # once, then planned
    wide = torch.randn((2, 3, 5, 6), generator=gen)
    wide_t = torch.randint(0, 3, (2, 5, 6), generator=gen)
    want = alone(DiceLoss(mode="multiclass"), BCELoss(mode="multiclass"), [1.0, 1.0], wide,
                 wide_t)
    prepared.clear()
    torch.testing.assert_close(loss(wide, wide_t), want)
    assert prepared == ["multiclass"]  # another signature: planned anew
    loss.terms["dice"].smooth = 1.0  # a term's argument: its plans start afresh
    want = alone(DiceLoss(mode="multiclass", smooth=1.0), BCELoss(mode="multiclass"),
                 [1.0, 1.0])
    prepared.clear()
    torch.testing.assert_close(loss(x, t), want)
    loss(x, t)
    assert prepared == ["multiclass"]
    want = alone(DiceLoss(mode="multiclass", smooth=1.0), BCELoss(mode="multiclass"),
                 [0.5, 2.0])
    loss.weights = [0.5, 2.0]  # new weights: the same plans (they do not depend on them)
    prepared.clear()
    torch.testing.assert_close(loss(x, t), want)
    assert prepared == []
    twin = copy.deepcopy(loss)
    torch.testing.assert_close(twin(x, t), loss(x, t))
    restored = pickle.loads(pickle.dumps(loss))
    torch.testing.assert_close(restored(x, t), loss(x, t))
