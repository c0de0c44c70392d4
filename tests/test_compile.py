"""torch.compile(fullgraph=True) on the CPU: the losses, composites, switches and spec-built
losses trace without a graph break and give the eager values and gradients.

Inside a graph the value checks cannot read the data on the host: an invalid target makes the
loss NaN instead of raising (documented in ``dynloss._layout``). A scheduled weight is read from
a buffer, so a new value does not recompile the graph.
"""

from __future__ import annotations

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
from dynloss.schedules import LinearRamp

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
    (TverskyLoss(mode="multilabel", per_image=True), "multilabel"),
    (FocalLoss(mode="multiclass", alpha=[0.2, 0.3, 0.5]), "multiclass"),
    (BCELoss(mode="multilabel"), "multilabel"),
    (TopKLoss(k=0.3), "binary"),
    (TopKLoss(k=0.5, mode="multiclass", ignore_index=2), "multiclass"),
], ids=lambda v: v if isinstance(v, str) else repr(v))
def test_losses_compile_fullgraph(loss, mode):
    x, t = _inputs(mode)
    _compare(loss, x, t)


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
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
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
