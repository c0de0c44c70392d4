"""``torch.export``: a loss exported with a dynamic batch (and spatial) size runs at other
sizes, the empty batch included, and gives the eager values.

Found by a review of the losses under PyTorch's tracing tools: non-strict export of BCE, Focal
and the composites specialised the batch size (``float(loss.numel())`` in the mean's count)
and refused a dynamic batch, or, with dynamic spatial sizes too, gave a program that only
accepted the traced element count; an exported loss fed an empty batch raised (``aminmax``
over an empty tensor: a Python branch on the size that export does not guard), and without
that, a per-image Dice was NaN and TopK indexed out of bounds there.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynloss import BCELoss, CompositeLoss, DiceLoss, FocalLoss, TopKLoss, build_loss


class _Wrapped(nn.Module):
    """The loss as the model that export traces (a module whose forward takes the tensors)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.loss(x, t)


def _case(n: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, h, w), generator=gen) * 3
    return x, (torch.rand((n, 1, h, w), generator=gen) > 0.6).float()


def _export(loss: nn.Module, strict: bool, spatial: bool):
    batch = torch.export.Dim("batch", max=64)
    dims: dict[int, object] = {0: batch}
    if spatial:
        dims.update({2: torch.export.Dim("h", max=64), 3: torch.export.Dim("w", max=64)})
    return torch.export.export(_Wrapped(loss), _case(4, 8, 8, seed=0), strict=strict,
                               dynamic_shapes={"x": dims, "t": dims}).module()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("spatial", [False, True], ids=["batch", "batch-and-spatial"])
@pytest.mark.parametrize("loss", [BCELoss(), FocalLoss(), DiceLoss(),
                                  CompositeLoss([DiceLoss(), BCELoss()], [0.5, 1.0]),
                                  build_loss("0.5*dice + focal")],
                         ids=lambda loss: repr(loss)[:40])
def test_non_strict_export_runs_at_other_sizes(loss, spatial):
    program = _export(loss, strict=False, spatial=spatial)
    for n, h, w in [(3, 8, 8), (7, 8, 8)] + ([(2, 5, 9)] if spatial else []):
        x, t = _case(n, h, w, seed=n)
        torch.testing.assert_close(program(x, t), loss(x, t))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("loss", [DiceLoss(), DiceLoss(per_image=True), BCELoss(),
                                  TopKLoss(k=0.3),
                                  CompositeLoss([DiceLoss(), BCELoss()])],
                         ids=lambda loss: repr(loss)[:40])
def test_an_exported_loss_gives_0_on_an_empty_batch(loss, strict):
    program = _export(loss, strict=strict, spatial=False)
    x, t = _case(0, 8, 8, seed=1)
    assert loss(x, t).item() == 0.0
    assert program(x, t).item() == 0.0
    x, t = _case(5, 8, 8, seed=2)
    torch.testing.assert_close(program(x, t), loss(x, t))


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_exporting_a_switching_loss_warns_that_it_keeps_the_active_stage(strict):
    """An exported SwitchingLoss computes the stage active when it was exported, after any
    later switch (as torch.jit.trace's, which warned): export says so too. Neither it nor a
    CompositeLoss leaves ``last_terms`` tensors behind during export (torch warned of a
    tensor attribute assigned during export)."""
    import warnings

    from dynloss import SwitchingLoss

    switching = SwitchingLoss([DiceLoss(), BCELoss()], milestones=[1])
    x, t = _case(2, 8, 8, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(_Wrapped(switching), (x, t), strict=strict).module()
    said = [w for w in caught if "torch.export records the active stage ('dice') only"
            in str(w.message)]
    assert len(said) == 1  # (strict export's tracer dropped a plain warnings.warn)
    assert said[0].filename == __file__
    assert not [w for w in caught if "last_terms" in str(w.message)]
    switching.step()
    torch.testing.assert_close(program(x, t), DiceLoss()(x, t))

    composite = CompositeLoss([DiceLoss(), BCELoss()], [0.5, 1.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(_Wrapped(composite), (x, t), strict=strict).module()
    assert not [w for w in caught if "last_terms" in str(w.message)]
    torch.testing.assert_close(program(x, t), composite(x, t))
