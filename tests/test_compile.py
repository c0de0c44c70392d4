"""torch.compile(fullgraph=True) on the CPU: the losses, composites, switches and spec-built
losses trace without a graph break and give the eager values and gradients.

Inside a graph the value checks cannot read the data on the host: an invalid target makes the
loss NaN instead of raising (documented in ``dynloss._layout``). A scheduled weight is read from
a buffer, so a new value does not recompile the graph.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.utils

import dynloss
from dynloss import (
    BCELoss,
    CompositeLoss,
    DiceLoss,
    FocalLoss,
    IoULoss,
    SwitchingLoss,
    TopKLoss,
    TverskyLoss,
    build_loss,
)
from dynloss.kernels import dispatch
from dynloss.schedules import LinearRamp

from ._backends import FUSED

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _inputs(mode: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c = 1 if mode == "binary" else 3
    x = torch.randn(2, c, 5, 6, generator=gen) * 3
    if mode == "multiclass":
        return x, torch.randint(0, c, (2, 5, 6), generator=gen)
    return x, (torch.rand(2, c, 5, 6, generator=gen) > 0.6).float()


def _compare(loss: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, compiled=None):
    if compiled is None:
        compiled = torch.compile(loss, fullgraph=True)
    xc, xe = (x.clone().requires_grad_() for _ in range(2))
    got, want = compiled(xc, t), loss(xe, t)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-6)
    return got


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# one compile per loss, the modes spread over them (each compile takes a few seconds)
@pytest.mark.parametrize("loss, mode", [
    (DiceLoss(), "binary"),
    (IoULoss(mode="multiclass"), "multiclass"),
    (DiceLoss(mode="multiclass", include_background=False), "multiclass"),
    (TverskyLoss(mode="multilabel", per_image=True), "multilabel"),
    (FocalLoss(mode="multiclass", alpha=[0.2, 0.3, 0.5]), "multiclass"),
    (BCELoss(mode="multilabel"), "multilabel"),
    (BCELoss(mode="multilabel", pos_weight=[2.0, 0.5, 3.0]), "multilabel"),
    (TopKLoss(k=0.3), "binary"),
    (TopKLoss(k=0.5, mode="multiclass", ignore_index=2), "multiclass"),
], ids=lambda v: v if isinstance(v, str) else repr(v))
def test_losses_compile_fullgraph(loss, mode):
    x, t = _inputs(mode)
    _compare(loss, x, t)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", ["dice", "bce", "composite"])
def test_a_named_kernel_backend_compiles_fullgraph(name, backend, monkeypatch):
    """``backend="native"`` named inside ``torch.compile(fullgraph=True)`` in a process whose
    first call it was failed ("Unsupported context manager": loading the kernels takes a lock)
    where ``"auto"`` compiled; a backend that cannot run in a graph gives way to one that can,
    as documented."""
    from dynloss.kernels.native import build

    dispatch.clear_cache()
    monkeypatch.setattr(build, "_status", None)  # as in a new process: not loaded yet
    monkeypatch.setattr(build, "_library", None)
    if name == "composite":
        loss = CompositeLoss([DiceLoss(backend=backend), BCELoss(backend=backend)])
    else:
        loss = dynloss.LOSSES[name](backend=backend)
    _compare(loss, *_inputs("binary"))


def test_composite_with_a_schedule_compiles_once():
    """Ten steps of a ramped weight: the value changes every step, the graph does not."""
    loss = CompositeLoss([DiceLoss(), FocalLoss()], weights=[1.0, LinearRamp(0, 10)])
    compiled = torch.compile(loss, fullgraph=True)
    x, t = _inputs("binary")
    torch._dynamo.utils.counters.clear()
    values = []
    for _ in range(10):
        values.append(_compare(loss, x, t, compiled).item())
        loss.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    dice, focal = DiceLoss()(x, t).item(), FocalLoss()(x, t).item()
    want = [dice + step / 10 * focal for step in range(10)]
    assert values == pytest.approx(want, rel=1e-6)
    assert set(loss.last_terms) == {"dice", "focal"}


def test_switching_across_the_switch_and_spec_built():
    x, t = _inputs("binary", seed=3)
    loss = SwitchingLoss([IoULoss(), BCELoss()], milestones=[1])
    compiled = torch.compile(loss, fullgraph=True)
    first = _compare(loss, x, t, compiled)
    loss.step()
    second = _compare(loss, x, t, compiled)
    assert first.item() == pytest.approx(IoULoss()(x, t).item(), rel=1e-6)
    assert second.item() == pytest.approx(BCELoss()(x, t).item(), rel=1e-6)
    spec = build_loss("dice->0.5*focal+bce@1")
    compiled = torch.compile(spec, fullgraph=True)
    _compare(spec, x, t, compiled)
    spec.step()
    _compare(spec, x, t, compiled)


def test_invalid_target_is_nan_inside_a_graph():
    """The eager check would raise; inside a graph it cannot read the data: NaN instead."""
    x, t = _inputs("binary")
    t[0, 0, 0, 0] = 3.0
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 1\]"):
        dynloss.DiceLoss()(x, t)
    compiled = torch.compile(dynloss.DiceLoss(), fullgraph=True)
    assert torch.isnan(compiled(x, t))


@pytest.mark.parametrize("cls", [dynloss.DiceLoss, dynloss.BCELoss])
def test_a_class_index_equal_to_c_is_nan_inside_a_graph(cls):
    """C itself is out of [0, C): inside a graph, where the eager check cannot run, the loss
    is NaN, not a finite value from a one-hot without that pixel (mutation review)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    t = torch.randint(0, 3, (2, 4, 4), generator=gen)
    loss = cls(mode="multiclass", backend="reference")
    compiled = torch.compile(loss, fullgraph=True)
    assert torch.isfinite(compiled(x, t))
    t[0, 0, 0] = 3
    assert torch.isnan(compiled(x, t))


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_topk_keeps_its_mean_when_the_batch_size_becomes_symbolic(mode):
    """A third batch size makes torch recompile with a symbolic batch size: TopK divided the
    sum of its 60 selected losses by 61 at 100 elements (the count and the selection were
    formed from the symbolic size in two ways). Found by a compile review."""
    loss = TopKLoss(k=0.6, mode=mode)
    compiled = torch.compile(loss)
    gen = torch.Generator().manual_seed(0)
    c = 3 if mode == "multiclass" else 1
    for n in (2, 3, 5):  # 20 pixels per sample: 0.6 * 100 is 60.00000000000001 in floats
        x = torch.randn(n, c, 4, 5, generator=gen) * 3
        t = (torch.randint(0, c, (n, 4, 5), generator=gen) if mode == "multiclass"
             else (torch.rand(n, 1, 4, 5, generator=gen) > 0.6).float())
        _compare(loss, x, t, compiled)


@pytest.mark.parametrize("loss", [DiceLoss(), TverskyLoss(alpha=0.4, beta=0.6),
                                  FocalLoss(gamma=1.5), TopKLoss(k=0.3)], ids=repr)
def test_a_module_compiles_fullgraph_before_its_first_eager_call(loss):
    """The hyper-parameters were checked lazily, inside the first traced call: with
    dynamic=True that check broke the graph (math.isfinite of a symbolic float), and every
    compiled loss was traced twice (a guard on the lazily filled state)."""
    fresh = type(loss)(**{k: getattr(loss, k) for k in ("alpha", "beta", "gamma", "k")
                          if hasattr(loss, k) and k in type(loss).__init__.__code__.co_varnames})
    compiled = torch.compile(fresh, fullgraph=True, dynamic=True)
    torch._dynamo.utils.counters.clear()
    for seed in range(3):
        x, t = _inputs("binary", seed)
        _compare(fresh, x, t, compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_a_reassigned_argument_is_checked_outside_the_graph():
    """`loss.gamma = 0.0` after compiling: the re-check ran inside the traced call and broke a
    fullgraph compile; it now runs at the assignment (an invalid value still raises at the
    next call, as documented)."""
    loss = FocalLoss(gamma=2.0)
    compiled = torch.compile(loss, fullgraph=True)
    x, t = _inputs("binary")
    _compare(loss, x, t, compiled)
    loss.gamma = 0.0
    got = _compare(loss, x, t, compiled)
    torch.testing.assert_close(got, BCELoss()(x, t))
    loss.gamma = -1.0
    with pytest.raises(ValueError, match="gamma must be"):
        loss(x, t)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize(("loss", "target_shape", "message"), [
    (DiceLoss(), (4, 1, 8, 9), r"target shape \(4, 1, 8, 9\) does not match"),
    (BCELoss(), (4, 1, 8, 9), r"target shape \(4, 1, 8, 9\) does not match"),
    (DiceLoss(mode="multiclass"), (4, 8, 9), r"target shape \(4, 8, 9\)"),
], ids=["dice", "bce", "multiclass"])
def test_a_shape_error_in_a_graph_carries_our_message(loss, target_shape, message, dynamic):
    """A wrong target shape in a compiled call: with symbolic sizes (``dynamic=True``, or a
    new batch size after a first call) the error was torch's "tp_repr_impl not implemented"
    (our message formatted the symbolic sizes with ``str``), not our ``ValueError``'s text."""
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
    if loss.mode == "multiclass":
        compiled(torch.randn(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))
        x, t = torch.randn(4, 3, 8, 8), torch.zeros(target_shape, dtype=torch.long)
    else:
        compiled(torch.randn(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))
        x, t = torch.randn(4, 1, 8, 8), torch.zeros(target_shape)
    with pytest.raises(Exception, match=message):
        compiled(x, t)


# torch.jit.trace records the aten ops one call runs: dispatch treats it like torch.compile
# (only compilable backends), so a traced loss replays on new inputs with the eager values.
_TRACED = [
    (DiceLoss(), "binary"),
    (IoULoss(mode="multilabel"), "multilabel"),
    (TverskyLoss(mode="multiclass", ignore_index=2), "multiclass"),
    (FocalLoss(mode="multiclass"), "multiclass"),
    (BCELoss(), "binary"),
    (TopKLoss(k=0.3, mode="multilabel"), "multilabel"),
    (CompositeLoss([DiceLoss(), BCELoss()], [0.5, 1.0]), "binary"),
]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize(("loss", "mode"), _TRACED, ids=lambda v: type(v).__name__
                         if isinstance(v, torch.nn.Module) else v)
def test_jit_trace_replays_the_eager_values_and_gradients(loss, mode):
    traced = torch.jit.trace(loss, _inputs(mode, seed=1), check_trace=False)
    _compare(loss, *_inputs(mode, seed=2), compiled=traced)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", ["dice", "focal", "topk"])
def test_jit_trace_of_a_named_kernel_backend_records_the_reference(backend, name):
    dispatch.clear_cache()
    loss = dynloss.LOSSES[name](mode="multilabel", backend=backend)
    with pytest.warns(RuntimeWarning, match=f"backend='{backend}' cannot compute recording by "
                      r"torch.jit.trace; using the 'reference' backend"):
        traced = torch.jit.trace(loss, _inputs("multilabel", seed=1), check_trace=False)
    reference = dynloss.LOSSES[name](mode="multilabel", backend="reference")
    _compare(reference, *_inputs("multilabel", seed=3), compiled=traced)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_traced_composite_reads_its_scheduled_weights_at_each_replay():
    """Traced through the eager path, the weights were constants of the trace: after four
    steps the replay still weighed BCE 0."""
    loss = CompositeLoss([DiceLoss(), BCELoss()], [1.0, LinearRamp(0, 4)])
    traced = torch.jit.trace(loss, _inputs("binary", seed=1), check_trace=False)
    for _ in range(3):
        loss.step()
    _compare(loss, *_inputs("binary", seed=2), compiled=traced)


def test_tracing_a_switching_loss_says_the_trace_keeps_its_stage():
    loss = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[1])
    with pytest.warns(RuntimeWarning, match=r"SwitchingLoss: torch.jit.trace records the "
                      r"active stage \('dice'\) only: the traced module keeps computing it after "
                      r"a switch \(torch.compile follows the switch\)"):
        torch.jit.trace(loss, _inputs("binary", seed=1), check_trace=False)


def test_a_compiled_composite_follows_schedules_moved_elsewhere():
    """A validation loss sharing the training loss's schedules (docs/schedules.md), a schedule
    loaded or set by hand: the compiled forward reads the weights they have now (it read a
    buffer that only the composite's own step or load refreshed: stale weights, silently)."""
    x, t = _inputs("binary", seed=5)
    first, second = LinearRamp(0, 4, 1.0, 0.0), LinearRamp(0, 4)
    train = CompositeLoss([IoULoss(), BCELoss()], weights=[first, second])
    val = CompositeLoss([IoULoss(), BCELoss()], weights=[first, second])
    compiled = torch.compile(val, fullgraph=True)
    iou, bce = IoULoss()(x, t).item(), BCELoss()(x, t).item()
    for epoch in range(5):
        weight = epoch / 4
        want = (1 - weight) * iou + weight * bce
        assert compiled(x, t).item() == pytest.approx(want, rel=1e-6)
        assert val(x, t).item() == pytest.approx(want, rel=1e-6)
        train.step()
    ramp = LinearRamp(0, 4)
    alone = CompositeLoss([IoULoss(), BCELoss()], weights=[1.0, ramp])
    compiled = torch.compile(alone, fullgraph=True)
    assert compiled(x, t).item() == pytest.approx(iou, rel=1e-6)
    ramp.load_state_dict({"count": 4})
    assert compiled(x, t).item() == pytest.approx(iou + bce, rel=1e-6)
    ramp.count = 2  # by hand
    assert compiled(x, t).item() == pytest.approx(iou + bce / 2, rel=1e-6)
    ramp.end = 2  # an argument reassigned: value_at(2) is now 1
    assert compiled(x, t).item() == pytest.approx(iou + bce, rel=1e-6)


@pytest.mark.parametrize("warm_up", [False, True], ids=["cold", "stepped-eagerly-first"])
def test_stepping_a_composite_inside_a_compiled_training_step(warm_up):
    """``unit="step"``: ``loss.step()`` once per optimiser step, inside the compiled step. It
    crashed in dynamo (a guard on the step registry's finalizers) or, after an eager step,
    recompiled at every call (a guard on the step count)."""
    from torch._dynamo.testing import CompileCounter

    x, t = _inputs("binary", seed=6)
    loss = build_loss("iou + linear_ramp(0, 20)*bce")
    eager = build_loss("iou + linear_ramp(0, 20)*bce")
    if warm_up:
        loss.step()
        eager.step()
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def step(x, t):
        value = loss(x, t)
        loss.step()
        return value

    for _ in range(6):
        want = eager(x, t)
        eager.step()
        torch.testing.assert_close(step(x, t), want, rtol=1e-6, atol=1e-7)
    assert loss.count == eager.count and loss.current_weights() == eager.current_weights()
    assert counter.frame_count <= 2


class _Table(LinearRamp):
    """A custom schedule whose ``step`` moves its count before the table ``value_at`` reads
    (its state is whole only when ``step`` returns), and whose ``value_at`` memoises."""

    def __init__(self) -> None:
        super().__init__(0, 4)
        self.table = [0.0]

    def value_at(self, t: int) -> float:
        self.last = self.table[t]  # an attribute set while the value is read
        return self.last

    def step(self) -> float:
        self.count += 1
        self.table.append(min(self.count / 4, 1.0))
        return self.value


def test_custom_schedules_are_read_when_their_state_is_whole():
    """Told of every attribute set, a composite read a custom schedule half-way through its
    own ``step`` (an IndexError that left the loss broken) and, for a ``value_at`` that sets an
    attribute, recursed without end at construction."""
    x, t = _inputs("binary", seed=7)
    shared = _Table()
    train = CompositeLoss([IoULoss(), BCELoss()], weights=[1.0, shared])
    val = CompositeLoss([IoULoss(), BCELoss()], weights=[1.0, shared])
    compiled = torch.compile(val, fullgraph=True)
    iou, bce = IoULoss()(x, t).item(), BCELoss()(x, t).item()
    for step in range(4):
        assert compiled(x, t).item() == pytest.approx(iou + step / 4 * bce, rel=1e-6)
        train.step()
    state = train.state_dict()
    fresh = _Table()
    rebuilt = CompositeLoss([IoULoss(), BCELoss()], weights=[1.0, fresh])
    fresh.table = [0.0, 0.25, 0.5, 0.75, 1.0]
    rebuilt.load_state_dict(state)
    assert rebuilt.current_weights()["bce"] == 1.0


def test_attributes_set_by_hand_one_after_the_other():
    """Two attributes of a held schedule set one after the other (milestones, then values):
    the first alone was refused at once (an IndexError, the attribute already set); an
    invalid value is refused by the next step or eager call, as before. In between, a compiled
    loss is NaN, not computed with the old weights."""
    from dynloss.schedules import Step

    x, t = _inputs("binary", seed=8)
    schedule = Step([2], [1.0, 0.5])
    loss = CompositeLoss([IoULoss(), BCELoss()], weights=[1.0, schedule])
    compiled = torch.compile(loss, fullgraph=True)
    schedule.count = 3
    schedule.milestones = [1, 2]  # three values needed: the weights cannot be formed yet
    assert torch.isnan(compiled(x, t))
    schedule.values = [1.0, 0.5, 0.25]
    iou, bce = IoULoss()(x, t).item(), BCELoss()(x, t).item()
    assert compiled(x, t).item() == pytest.approx(iou + 0.25 * bce, rel=1e-6)
    ramp = LinearRamp(0, 4)
    ramped = CompositeLoss([IoULoss(), BCELoss()], weights=[1.0, ramp])
    ramp.initial = -1.0  # not refused here
    with pytest.raises(ValueError, match="must be"):
        ramped(x, t)


def test_a_composite_subclass_with_eq_holds_schedules():
    class Named(CompositeLoss):
        def __eq__(self, other: object) -> bool:
            return isinstance(other, Named) and self.names == other.names

    # (unhashable: torch.compile itself cannot take such a module, whose named_modules()
    # fills a set; the buffer the compiled forward would read still follows the schedule)
    ramp = LinearRamp(0, 2)
    loss = Named([IoULoss(), BCELoss()], weights=[1.0, ramp])
    ramp.load_state_dict({"count": 2})
    assert loss._weight_values.tolist() == [1.0, 1.0]


def test_a_composite_at_a_dead_holders_address_is_told():
    """Holders are kept by id: a new composite at the address of a dead one (a validation
    loss rebuilt every epoch around the training loss's schedule) was skipped while the dead
    one's entry stayed, and then never told of a change."""
    import weakref

    from dynloss.schedules import weights

    class Gone:
        pass

    ramp = LinearRamp(0, 2)
    loss = CompositeLoss([IoULoss(), BCELoss()], weights=[1.0, ramp])
    gone = Gone()
    dead = weakref.ref(gone)
    del gone
    weights._HOLDERS[id(ramp)][id(loss)] = dead  # as a dead holder at its address left it
    weights.hold(ramp, loss)
    ramp.load_state_dict({"count": 1})
    assert loss._weight_values.tolist() == [1.0, 0.5]
    with pytest.warns(RuntimeWarning, match="at count 1"):
        holder = CompositeLoss([IoULoss(), BCELoss()], weights=[1.0, ramp])
    key = id(holder)
    del holder  # its entry goes with it
    assert key not in weights._HOLDERS[id(ramp)]


def test_a_composite_built_under_inference_mode_takes_a_half_set_schedule():
    """Its buffer is an inference tensor: NaN written in place outside inference mode raised
    from the user's assignment."""
    from dynloss.schedules import Step

    schedule = Step([2], [1.0, 0.5])
    schedule.count = 3
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="at count 3"):
        loss = CompositeLoss([IoULoss(), BCELoss()], weights=[1.0, schedule])
    schedule.milestones = [1, 2]  # three values needed: not yet
    assert math.isnan(loss._weight_values.tolist()[1])
    schedule.values = [1.0, 0.5, 0.25]
    assert loss._weight_values.tolist() == [1.0, 0.25]


def test_a_change_from_another_thread_waits_for_a_refresh_in_progress(monkeypatch):
    """Thread A refreshes a composite while reading a slow schedule; thread B loads another of
    its schedules meanwhile. B's news was dropped (A was "refreshing"), and A had read the old
    value: the buffer kept it. (A is released once B is at the refresh lock, not after a
    time: on a slow machine B might otherwise come after A.)"""
    import threading

    from dynloss.schedules import composite

    started, release, b_waits = threading.Event(), threading.Event(), threading.Event()

    class Announcing:
        """The refresh lock, which says when thread B comes to it."""

        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            if threading.current_thread().name == "B":
                b_waits.set()
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    monkeypatch.setattr(composite, "_REFRESH_LOCK", Announcing(composite._REFRESH_LOCK))

    class Slow(LinearRamp):
        def value_at(self, t: int) -> float:
            if threading.current_thread().name == "A":
                started.set()
                release.wait(5)
            return super().value_at(t)

    slow, other = Slow(0, 2), LinearRamp(0, 2, 1.0, 0.0)
    loss = CompositeLoss([IoULoss(), BCELoss(), DiceLoss()], weights=[other, 1.0, slow])
    a = threading.Thread(target=lambda: slow.load_state_dict({"count": 1}), name="A")
    a.start()
    assert started.wait(5)
    b = threading.Thread(target=lambda: other.load_state_dict({"count": 2}), name="B")
    b.start()
    assert b_waits.wait(5)  # B's news is at the lock A holds
    b.join(0.1)
    release.set()
    a.join(5)
    b.join(5)
    assert loss._weight_values.tolist() == [0.0, 1.0, 0.5]


def test_eager_calls_between_compiled_ones_do_not_recompile():
    """Compiled training, eager validation on images of their own sizes: the module's memory of
    its eager calls (its plans) was read inside the graph and guarded on, so each new eager
    signature recompiled the training graph, until torch's recompile limit (8) failed a
    ``fullgraph=True`` run. The training input never changes: one graph."""
    for loss in (DiceLoss(), CompositeLoss([DiceLoss(), TopKLoss(k=0.1)])):
        torch._dynamo.reset()
        x, t = _inputs("binary")
        loss(*_inputs("binary", seed=1))  # a sanity-check call before the first compiled one
        compiled = torch.compile(loss, fullgraph=True, backend="eager")
        torch._dynamo.utils.counters.clear()
        for epoch in range(10):
            torch.testing.assert_close(compiled(x, t), loss(x, t), rtol=1e-6, atol=1e-7)
            size = 4 + epoch
            loss(torch.randn(1, 1, size, size), torch.zeros(1, 1, size, size))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, repr(loss)


@pytest.mark.parametrize("backend", ["torch"])
def test_a_named_backend_that_gives_way_in_a_graph_says_so_once(backend):
    """A named backend that cannot run inside a graph hands the call to the reference: said
    once, as in eager calls and under torch.jit.trace (the warning was dropped while tracing),
    pointing at the user's line, and without breaking ``fullgraph=True``. (The native backend
    runs in graphs: ``test_native_compile.py``.)"""
    import warnings

    dispatch.clear_cache()
    loss = DiceLoss(backend=backend)
    x, t = _inputs("binary")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(loss, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x, t), DiceLoss(backend="reference")(x, t))
        compiled(x * 2, t)
    said = [w for w in caught if issubclass(w.category, RuntimeWarning)
            and f"backend={backend!r}" in str(w.message)]
    assert [str(w.message) for w in said] == [
        f"dynloss: backend={backend!r} cannot compute tracing by torch.compile; using the "
        "'reference' backend for such calls"]
    assert said[0].filename == __file__


def test_our_constant_mark_is_torchs_assume_constant_result():
    """``_warn.constant_in_graphs`` marks a function as ``torch.compiler.assume_constant_result``
    does (without importing torch._dynamo at ``import dynloss``): the same attributes."""
    from dynloss._warn import constant_in_graphs

    def ours() -> None: ...

    def theirs() -> None: ...

    constant_in_graphs(ours)
    torch.compiler.assume_constant_result(theirs)
    assert vars(ours) == vars(theirs) != {}


@pytest.mark.parametrize("loss", [DiceLoss(), IoULoss(), TverskyLoss(alpha=0.3, beta=0.7),
                                  DiceLoss(ignore_index=2, smooth=1.0)],
                         ids=lambda v: repr(v))
def test_a_compiled_binary_region_loss_reads_its_input_in_one_fused_pass(loss):
    """Batch-pooled binary Dice/IoU/Tversky inside ``torch.compile``: the sigmoid, the three
    sums and the value checks are one loop over the input and the target, as the peers'
    compiled formulas are. Summed per sample first (``(N, C)``) and then over the batch, the
    sums made Inductor store the probabilities (a buffer the input's size, written and read
    again: 1.4x-1.55x the compiled plain-torch Dice at (32, 1, 256, 256)); the checks of the
    whole tensor were passes of their own."""
    from torch._inductor.utils import run_and_get_code

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 1, 32, 32, generator=gen) * 3).requires_grad_()
    t = (torch.rand(4, 1, 32, 32, generator=gen) > 0.7).float()
    compiled = torch.compile(loss, fullgraph=True)
    _, (forward, *_) = run_and_get_code(compiled, x, t)
    buffers = [shape for shape in _allocated_shapes(forward) if math.prod(shape) == x.numel()]
    assert buffers == [], forward
    assert forward.count(f"<static_cast<int64_t>({x.numel()}L)") == 1, forward
    _compare(loss, x.detach(), t, compiled)


def _allocated_shapes(code: str) -> list[tuple[int, ...]]:
    """The shapes of the buffers the compiled wrapper ``code`` allocates."""
    import ast
    import re

    return [tuple(ast.literal_eval(f"({dims.rstrip(', ')},)")) if dims.strip() else ()
            for dims in re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code)]


_TINY = -1.401298464324817e-45  # the negative float32 subnormal closest to 0
_INF, _NAN = math.inf, math.nan


# (where the values go, dtype, from_logits, the values, whether they are invalid)
@pytest.mark.parametrize("where, dtype, from_logits, values, bad", [
    ("input", torch.float32, True, [0.0, 1e30, -3.0, -1e30, _TINY], False),
    ("input", torch.float32, True, [_INF], True),
    ("input", torch.float32, True, [-_INF], True),
    ("input", torch.float32, True, [_NAN], True),
    ("input", torch.float16, True, [65504.0, -65504.0], False),
    ("input", torch.float16, True, [_INF], True),
    ("input", torch.float32, False, [0.0, 1.0, 0.5, -0.0, 1e-45], False),
    ("input", torch.float32, False, [_TINY], True),
    ("input", torch.float32, False, [1.0000001], True),
    ("input", torch.float32, False, [_NAN], True),
    ("input", torch.float32, False, [_INF], True),
    ("input", torch.float32, False, [-_INF], True),
    ("input", torch.bfloat16, False, [1.0078125], True),
    ("target", torch.float32, True, [0.0, 1.0, 0.3, -0.0, 1e-45], False),
    ("target", torch.float32, True, [_TINY], True),
    ("target", torch.float32, True, [1.0000001], True),
    ("target", torch.float32, True, [2.0], True),
    ("target", torch.float32, True, [_NAN], True),
    ("target", torch.float32, True, [_INF], True),
    ("target", torch.float32, True, [-_INF], True),
    ("input", torch.float64, False, [-5e-324], True),
    ("target", torch.float16, True, [-6e-8], True),
    ("target", torch.int64, True, [0, 1], False),
    ("target", torch.int64, True, [2], True),
    ("target", torch.int64, True, [-1], True),
    ("target", torch.int64, True, [2**40], True),
    ("target", torch.uint8, True, [255], True),
], ids=str)
def test_the_value_checks_in_a_graph_agree_with_the_eager_ones(where, dtype, from_logits,
                                                               values, bad):
    """Inside a graph the value checks are arithmetic the compiler fuses into the loss's pass
    (a sum of ``x * 0``, the negative part of ``v (1 - v)``); they flag exactly what the
    eager checks (the extremes, by ``aminmax``) flag, at the edges of [0, 1] and of the
    finite numbers (subnormals included), for every dtype."""
    from dynloss._layout import invalid_values, prepare

    x = torch.full((2, 1, 3), 0.25 if not from_logits else 0.5, dtype=torch.float32)
    t = torch.zeros(2, 1, 3, dtype=torch.float32)
    if where == "input":
        x = x.to(dtype)
        x.view(-1)[1:1 + len(values)] = torch.tensor(values, dtype=torch.float64).to(dtype)
    else:
        t = t.to(dtype)
        t.view(-1)[1:1 + len(values)] = torch.tensor(values).to(dtype)

    def invalid(x, t):
        return invalid_values(prepare(x, t, "binary"), None, from_logits, targets=True)

    assert bool(invalid(x, t)) == bad
    assert bool(torch.compile(invalid, fullgraph=True)(x, t)) == bad
