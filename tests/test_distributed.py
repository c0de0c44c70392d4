"""torch.distributed: pooled region losses and rank-consistent switching, on 2 gloo CPU ranks.

The two ranks run in processes started once per module (``torch.multiprocessing.spawn``); each
check runs on both ranks and records "ok" or its traceback, and one test per check reads the
result. Every check compares with the single-process computation on the concatenated batch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynloss import (
    BCELoss,
    CompositeLoss,
    DiceLoss,
    IoULoss,
    Plateau,
    RelativeImprovement,
    SwitchingLoss,
    TverskyLoss,
)
from dynloss.distributed import (
    all_gather_with_grad,
    all_reduce_with_grad,
    is_distributed,
    pool_across_ranks,
    reduce_mean,
    world_size,
)

WORLD = 2


# ---------------------------------------------------------------------------- rank checks
def _batch(mode: str, n: int = 4, c: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    channels = 1 if mode == "binary" else c
    logits = torch.randn(n, channels, 5, 7, generator=generator, dtype=torch.float64)
    if mode == "multiclass":
        target = torch.randint(0, c, (n, 5, 7), generator=generator)
    else:
        target = (torch.rand(n, channels, 5, 7, generator=generator) > 0.7).to(torch.float64)
    return logits, target


def _shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor.chunk(WORLD)[rank]


POOLED_CASES: list[tuple[str, Callable[..., torch.nn.Module], dict]] = [
    ("binary", DiceLoss, {}),
    ("binary", DiceLoss, {"backend": "reference", "smooth": 1.0}),
    ("multiclass", IoULoss, {"mode": "multiclass", "reduction": "none"}),
    ("multilabel", TverskyLoss, {"mode": "multilabel", "alpha": 0.3, "beta": 0.7}),
    ("multiclass", TverskyLoss, {"mode": "multiclass", "ignore_index": 2, "backend": "reference"}),
    # per-class weights and no background: formed from the pooled scores
    ("multiclass", DiceLoss, {"mode": "multiclass", "weight": [0.0, 2.0, 0.5],
                              "include_background": False}),
    ("multilabel", IoULoss, {"mode": "multilabel", "weight": [3.0, 1.0, 0.25],
                             "reduction": "none"}),
]


def check_pooled_region_losses(rank: int) -> None:
    for mode, cls, kwargs in POOLED_CASES:
        logits, target = _batch(mode)
        full = logits.clone().requires_grad_()
        expected = cls(**kwargs)(full, target)
        expected.sum().backward()
        local = _shard(logits, rank).clone().requires_grad_()
        value = cls(ddp_pool=True, **kwargs)(local, _shard(target, rank))
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
        value.sum().backward()
        # the backward sums the ranks' gradients (DDP then averages): world_size x the slice
        torch.testing.assert_close(local.grad, WORLD * _shard(full.grad, rank),
                                   rtol=1e-10, atol=1e-12)
        # without pooling, the local loss differs from the pooled one
        unpooled = cls(**kwargs)(_shard(logits, rank), _shard(target, rank))
        assert not torch.allclose(unpooled, expected.detach())


def _pooled_float32_on(backend: str, rank: int, cases: list) -> None:
    """float32 CPU inputs, ``ddp_pool=True`` on ``backend``: the reference's loss of the
    whole batch (float64) and ``WORLD`` times its gradient of this rank's slice."""
    for mode, cls, kwargs in cases:
        logits, target = _batch(mode)
        logits = logits.float()
        target = target.float() if mode != "multiclass" else target
        full = logits.clone().requires_grad_()
        expected = cls(backend="reference", **kwargs)(full.double(), target)
        expected.backward()
        local = _shard(logits, rank).clone().requires_grad_()
        value = cls(ddp_pool=True, backend=backend, **kwargs)(local, _shard(target, rank))
        torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-6, atol=1e-7)
        value.backward()
        torch.testing.assert_close(local.grad, WORLD * _shard(full.grad, rank),
                                   rtol=1e-5, atol=1e-8)


def check_pooled_region_losses_on_the_native_kernels(rank: int) -> None:
    """float32 CPU input takes the native kernels, whose pooled path no check reached (every
    batch above is float64): a rank returned its own, unpooled loss there."""
    from dynloss.kernels import native_available

    if native_available():
        _pooled_float32_on("native", rank, [("binary", DiceLoss, {}),
                                            ("multiclass", IoULoss, {"mode": "multiclass"})])


def check_pooled_region_losses_on_the_triton_kernels(rank: int) -> None:
    """The Triton kernels' pooled path (their sums all-reduced, then the score) across two
    ranks, in Triton's interpreter on the CPU: a single process cannot tell it from the
    unpooled loss, and no check ran it (skipping it kept every test green)."""
    from dynloss.kernels import interpreter_active, triton_available

    if not triton_available():
        return
    assert interpreter_active(), "the worker imported Triton before TRITON_INTERPRET=1"
    _pooled_float32_on("triton", rank, [("binary", DiceLoss, {}),
                                        ("multiclass", IoULoss, {"mode": "multiclass",
                                                                 "ignore_index": 2})])


def check_a_non_finite_input_on_one_rank_is_that_ranks_nan_on_every_backend(
        rank: int) -> None:
    """``ddp_pool=True`` with a -inf logit on rank 0 (finite probabilities, finite sums): the
    loss is NaN on rank 0 and the pooled loss on rank 1, as the reference gives; the native
    kernels' pooled sums carried the NaN to every rank. (A NaN logit makes the sums NaN: the
    loss of every rank.)"""
    from dynloss.kernels import interpreter_active, native_available

    backends = ["torch", *(["native"] if native_available() else []),
                *(["triton"] if interpreter_active() else [])]
    results = {}  # every collective first (an assertion on one rank would leave the other
    cases = [(mode, cls, kwargs, bad) for bad in (-math.inf, math.nan)  # waiting in its
             for mode, cls, kwargs in [("binary", DiceLoss, {}),         # all-reduce)
                                       ("multiclass", IoULoss, {"mode": "multiclass",
                                                                "include_background": False})]]
    for mode, cls, kwargs, bad in cases:
        logits, target = _batch(mode)
        x = _shard(logits, rank).float().clone()
        if rank == 0:
            x[0, 0, 1, 1] = bad
        t = _shard(target, rank)
        t = t.float() if mode != "multiclass" else t
        for backend in ("reference", *backends):
            leaf = x.clone().requires_grad_()
            value = cls(ddp_pool=True, backend=backend, check_values=False, **kwargs)(leaf, t)
            value.backward()
            results[mode, bad, backend] = (value.detach(), leaf.grad)
    for mode, _, _, bad in cases:
        want, want_grad = results[mode, bad, "reference"]
        assert want.isnan().item() == (rank == 0 or math.isnan(bad)), want
        for backend in backends:
            got, got_grad = results[mode, bad, backend]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True,
                                       msg=lambda m, b=backend: f"{b}: {m}")
            assert torch.equal(got_grad.isnan(), want_grad.isnan()), backend


def check_native_pooled_sums_leave_ignored_elements_at_zero_under_a_nan_gradient(
        rank: int) -> None:
    """``loss * nan`` through ``ddp_pool=True`` on the native backend (its pooled sums): NaN
    where the loss reads an element, 0 at the ignored ones, as the reference's autograd gives
    (the kernels would multiply the NaN into every element)."""
    from dynloss.kernels import native_available

    if not native_available():
        return
    x = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(rank))
    t = torch.tensor([[[1.0, 0.0, 255.0, 1.0, 0.0, 255.0, 1.0, 0.0]]])
    grads = []
    for backend in ("native", "reference"):
        leaf = x.clone().requires_grad_()
        (DiceLoss(ignore_index=255, ddp_pool=True, backend=backend)(leaf, t)
         * float("nan")).backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0].isnan(), grads[1].isnan()), grads
    assert grads[1][0, 0, [2, 5]].tolist() == [0.0, 0.0] and grads[1].isnan().sum() == 6
    assert torch.equal(grads[0] == 0, grads[1] == 0), grads


def check_ddp_model_gradients_equal_single_process(rank: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 1, 3, padding=1).double()
    reference = torch.nn.Conv2d(3, 1, 3, padding=1).double()
    reference.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(4, 3, 6, 6, generator=generator, dtype=torch.float64)
    masks = (torch.rand(4, 1, 6, 6, generator=generator) > 0.8).double()

    CompositeLoss([DiceLoss(), BCELoss()])(reference(images), masks).backward()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    pooled = CompositeLoss([DiceLoss(ddp_pool=True), BCELoss()])
    pooled(ddp(_shard(images, rank)), _shard(masks, rank)).backward()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def check_all_gather_and_all_reduce_gradients(rank: int) -> None:
    x = torch.tensor([rank + 1.0, 10.0 * (rank + 1)], dtype=torch.float64, requires_grad=True)
    gathered = all_gather_with_grad(x)
    torch.testing.assert_close(gathered, torch.tensor([[1.0, 10.0], [2.0, 20.0]],
                                                      dtype=torch.float64))
    weights = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    (gathered * weights).sum().backward()
    torch.testing.assert_close(x.grad, WORLD * weights[rank])

    y = torch.tensor([rank + 1.0], dtype=torch.float64, requires_grad=True)
    total = all_reduce_with_grad(y)
    assert total.item() == 3.0
    (total * (rank + 1)).backward()  # rank 0 weighs 1, rank 1 weighs 2: sum 3 on both
    assert y.grad.item() == 3.0
    a, b = pool_across_ranks(torch.tensor([1.0 + rank]), torch.tensor([5.0]))
    assert (a.item(), b.item()) == (3.0, 10.0)
    assert is_distributed() and world_size() == WORLD


def check_second_order_gradients_through_pooling(rank: int) -> None:
    """create_graph=True through ddp_pool: the collectives' backward was an in-place
    all_reduce, which autograd recorded as the identity, so a gradient penalty missed the
    other ranks' terms. Correct: each rank gets the sum over ranks of their objectives'
    derivatives, W^2 times the single-process one for ||grad||^2 (the gradient is W x)."""
    for mode, cls, kwargs in POOLED_CASES[:3]:
        logits, target = _batch(mode)
        full = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad(cls(**kwargs)(full, target).sum(), full,
                                      create_graph=True)
        (grad ** 2).sum().backward()
        local = _shard(logits, rank).clone().requires_grad_()
        value = cls(ddp_pool=True, **kwargs)(local, _shard(target, rank))
        (local_grad,) = torch.autograd.grad(value.sum(), local, create_graph=True)
        (local_grad ** 2).sum().backward()
        torch.testing.assert_close(local.grad, WORLD ** 2 * _shard(full.grad, rank),
                                   rtol=1e-9, atol=1e-12)


def check_reduce_mean(rank: int) -> None:
    assert reduce_mean(1.0 if rank == 0 else 2.0) == 1.5
    assert reduce_mean(torch.tensor(4.0 * rank)) == 2.0
    assert reduce_mean(rank) == 0.5
    # A float64 tensor on the collective's device is the caller's: it keeps its value.
    metric = torch.tensor(0.5 + rank, dtype=torch.float64)
    metric_mean = reduce_mean(metric)
    assert (metric_mean, metric.item()) == (1.0, 0.5 + rank)


def _gather(obj: object) -> list:
    out: list = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


# Rank 0 keeps improving, rank 1 is flat: alone, rank 1 would switch at step 3 (patience 2).
RANK_METRICS = [
    [1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2, 0.2, 0.2],
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
]


def _history(loss: SwitchingLoss, metrics: list[float | torch.Tensor]) -> list[int]:
    out = []
    for metric in metrics:
        loss.step(metric=metric)
        out.append(loss.active_index)
    return out


def check_switching_is_consistent_across_ranks(rank: int) -> None:
    mine = RANK_METRICS[rank]
    mean = [(a + b) / 2 for a, b in zip(*RANK_METRICS, strict=True)]
    for make in (lambda **kw: SwitchingLoss([DiceLoss(), BCELoss()],
                                            trigger=Plateau(patience=2), **kw),
                 lambda **kw: SwitchingLoss([DiceLoss(), BCELoss(), IoULoss()],
                                            trigger=[RelativeImprovement(0.05), 8], **kw)):
        synced = _history(make(), [torch.tensor(m) for m in mine])
        histories = _gather(synced)
        assert histories[0] == histories[1], histories
        # the decision is the one a single process takes on the mean of the ranks' metrics
        assert synced == _history(make(sync_metric=False), mean)
        # without synchronisation the ranks would train with different losses
        unsynced = _gather(_history(make(sync_metric=False), mine))
        assert unsynced[0] != unsynced[1], unsynced
    plateau = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=2))
    assert _history(plateau, mine) == [0, 0, 0, 0, 0, 0, 1, 1, 1]


def _resumed_on_rank_0(build: Callable[[], torch.nn.Module], rank: int,
                       trained: torch.nn.Module, metrics: tuple[float, ...]) -> torch.nn.Module:
    """A fresh ``build()`` into which rank 0 alone loads ``trained``'s state after stepping
    it with ``metrics`` (``if rank == 0: loss.load_state_dict(...)``)."""
    for metric in metrics:
        trained.step(metric=metric)
    loss = build()
    if rank == 0:
        loss.load_state_dict(trained.state_dict())
    return loss


def check_ranks_whose_switch_states_differ_are_told_at_the_metric_step(rank: int) -> None:
    """Resuming, a rank that alone loaded the checkpoint's loss state (``if rank == 0:
    loss.load_state_dict(...)``, trusting DDP's broadcast, which covers the model only) is at
    another step than the others: their switch decisions then differ in silence. The metric's
    all-reduce carries each rank's counters, so every rank raises at that step, naming it."""
    def make() -> SwitchingLoss:
        return SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=5))

    trained = make()
    loss = _resumed_on_rank_0(make, rank, trained, (1.0, 0.9, 0.8))
    with pytest.raises(RuntimeError, match=r"SwitchingLoss\.step: the ranks' switch states "
                       r"differ .*count [03] here.*load the loss's state on every rank"):
        loss.step(metric=0.5)
    if rank == 1:  # the same state everywhere: the step is taken (and the ranks agree)
        loss.load_state_dict(trained.state_dict())
    loss.step(metric=0.5)
    assert _gather(loss.count) == [4, 4]
    # the same count, another stage (rank 1 switched on its own metrics, unsynced)
    three = [make3(sync_metric=False) for _ in range(2)]
    for metric in (1.0, 0.9, 0.8) if rank == 0 else (1.0, 1.0, 1.0):
        three[0].step(metric=metric)
    assert _gather(three[0].active_index) == [0, 1]
    three[1].load_state_dict(three[0].state_dict())
    three[1].sync_metric = True
    with pytest.raises(RuntimeError, match=r"differ .*stage '(dice|bce)' here"):
        three[1].step(metric=0.5)
    # counts 2^20, 2^40 and 2^62 apart: every digit of a count is compared
    for far in (2**20, 2**40 + 3, 2**62):
        apart = make()
        apart.count = 5 + (far if rank == 1 else 0)
        with pytest.raises(RuntimeError, match=r"differ \(the step count;"):
            apart.step(metric=0.5)


def check_ranks_whose_switch_states_differ_are_told_before_a_later_adaptive_stage(
        rank: int) -> None:
    """A milestone stage before an adaptive one (``trigger=[5, Plateau(...)]``), rank 0 alone
    resumed at count 3: the ranks reached their first metric all-reduce at different steps
    (rank 0's met rank 1's gradient all-reduce under DDP: gloo aborted; without other
    collectives the two paired and, the counts then equal, nothing was raised). While an
    adaptive trigger is still to come, here or nested, every ``step(metric=...)`` compares
    the states, so the first step after resuming raises on every rank. Found by a review."""
    def make() -> SwitchingLoss:
        return SwitchingLoss([DiceLoss(), BCELoss(), IoULoss()], trigger=[5, Plateau(2)])

    def nested() -> CompositeLoss:  # the adaptive trigger in a loss nested in a later stage
        inner = SwitchingLoss([BCELoss(), IoULoss()], trigger=Plateau(2))
        return CompositeLoss([SwitchingLoss([DiceLoss(), inner], milestones=[4]), BCELoss()])

    for build in (make, nested):
        loss = _resumed_on_rank_0(build, rank, build(), (1.0, 1.0, 1.0))
        with pytest.raises(RuntimeError, match=r"the ranks' switch states differ \(the step "
                           r"count.*count [03] here"):
            loss.step(metric=0.5)
    # in step, the ranks reduce at every step until the last adaptive switch, and the
    # decision is the mean metric's
    loss = make()
    history = []
    for epoch in range(12):
        loss.step(metric=1.0 if rank == 0 or epoch < 6 else 0.5 - 0.01 * epoch)
        history.append(loss.active_index)
    histories = _gather(history)
    assert histories[0] == histories[1]
    assert history == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]  # the mean improves from 6 on


def make3(**kwargs: object) -> SwitchingLoss:
    return SwitchingLoss([DiceLoss(), BCELoss(), IoULoss()], trigger=Plateau(patience=1),
                         **kwargs)


CHECKS = {
    name: fn for name, fn in sorted(globals().items()) if name.startswith("check_")
}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    if not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # (the Triton check runs the interpreter)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    results = {}
    try:
        for name, check in CHECKS.items():
            try:
                check(rank)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("gloo")
    if os.path.exists("/sys/class/net/lo"):  # one machine: talk over loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException:
        # gloo's teardown (destroy_process_group) aborts now and then ("terminate called
        # without an active exception", a few % of runs on this machine, also before these
        # checks existed); a rank writes its results before it, so they are complete
        if not all((tmp / f"rank{r}.json").exists() for r in range(WORLD)):
            raise
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_on_two_gloo_ranks(rank_results: list[dict[str, str]], check: str) -> None:
    for rank, results in enumerate(rank_results):
        assert results.get(check) == "ok", f"rank {rank}:\n{results.get(check)}"


# ------------------------------------------------------------------------- single process
def test_helpers_are_no_ops_in_a_single_process() -> None:
    assert not is_distributed() and world_size() == 1
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    assert all_reduce_with_grad(x) is x
    gathered = all_gather_with_grad(x)
    assert torch.equal(gathered, torch.tensor([[1.0, 2.0]]))
    (gathered * torch.tensor([[3.0, 5.0]])).sum().backward()
    assert x.grad.tolist() == [3.0, 5.0]
    a, b = torch.ones(2), torch.zeros(2)
    assert pool_across_ranks(a, b) == (a, b)
    assert reduce_mean(torch.tensor(0.25)) == 0.25 and reduce_mean(3) == 3.0


def test_reduce_mean_rejects_non_scalars() -> None:
    with pytest.raises(ValueError, match=r"must be a scalar; got shape \(2,\)"):
        reduce_mean(torch.ones(2))
    with pytest.raises(ValueError, match="must be a number or a scalar tensor; got str"):
        reduce_mean("0.5")


def test_a_numpy_array_of_one_real_value_is_a_metric() -> None:
    """A 0-d NumPy array (``np.asarray(score)``, what some metric libraries return) was
    refused as "not a number", while a one-element tensor was accepted."""
    np = pytest.importorskip("numpy")
    from dynloss import SwitchingLoss
    from dynloss.distributed import metric_value
    from dynloss.schedules import Plateau

    assert metric_value(np.array(0.25)) == 0.25 and reduce_mean(np.array([3])) == 3.0
    assert metric_value(np.array([[1.5]], dtype=np.float32)) == 1.5
    assert metric_value(np.array([2.5]).view(np.recarray)) == 2.5  # (a subclass)
    for bad, words in [(np.array(True), "bool"), (np.array([0.5, 1.0]), r"shape \(2,\)"),
                       (np.array(1 + 2j), "complex128"), (np.array("0.5"), "<U3")]:
        with pytest.raises(ValueError, match=f"metric \\(the monitored value\\).*{words}"):
            metric_value(bad)
    loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Plateau(patience=1))
    for value in (1.0, 1.0, 1.0):
        loss.step(metric=np.array(value))
    assert loss.active_index == 1


def test_ddp_pool_is_exact_without_a_process_group() -> None:
    logits, target = _batch("binary")
    torch.testing.assert_close(DiceLoss(ddp_pool=True)(logits, target),
                               DiceLoss()(logits, target), rtol=0, atol=0)


@pytest.mark.parametrize(("backend", "value", "want"), [
    ("nccl", torch.tensor(0.5), "cuda:0"),  # NCCL cannot reduce a CPU tensor
    ("nccl", 0.5, "cuda:0"),
    ("gloo", torch.tensor(0.5), "cpu"),
    ("gloo", 0.5, "cpu"),
])
def test_the_metric_is_reduced_where_the_backend_can(monkeypatch, backend, value, want):
    """A CPU metric tensor under NCCL was all-reduced on the CPU, which NCCL refuses (checked
    by mocking: no two GPUs here)."""
    from dynloss import distributed
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: backend)
    monkeypatch.setattr(distributed.torch.cuda, "current_device", lambda: 0)
    assert distributed._collective_device(value) == torch.device(want)
