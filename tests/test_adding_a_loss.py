"""A loss added the way docs/adding-a-loss.md describes runs correctly on every device with no
kernel change: the kernel backends list their ops, so dispatch gives the new op to the
reference (and a named kernel backend falls back, saying so once).

The example is the focal Tversky loss, ``(1 - T)^gamma`` (Abraham & Khan, 2019), written only
with the shared maths and the reference backend's region sums.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

import dynloss
from dynloss import (
    LOSSES,
    BCELoss,
    CompositeLoss,
    SegmentationLoss,
    SwitchingLoss,
    _math,
    build_loss,
)
from dynloss._checks import check_non_negative
from dynloss._layout import Layout
from dynloss._params import RegionParams
from dynloss.functional import _call
from dynloss.kernels import reference
from dynloss.kernels.capabilities import Need
from dynloss.kernels.dispatch import REGISTRY, clear_cache, select


@dataclass(frozen=True)
class FocalTverskyParams:
    alpha: float
    beta: float
    gamma: float
    smoothing: float = 1e-7
    mode: str = "binary"
    from_logits: bool = True
    ignore_index: int | None = None
    backend: str = "auto"
    check_values: bool | None = None


def _focal_tversky(self, layout: Layout, params: FocalTverskyParams, checked: bool) -> Tensor:
    """The reference backend's new op: pooled sums, Tversky index, ``(1 - T)^gamma``, mean."""
    i, p, g = reference.region_sums(layout, params.from_logits, params.ignore_index, checked)
    score = _math.tversky_index(i.sum(0), p.sum(0), g.sum(0), params.alpha, params.beta,
                                params.smoothing)
    return ((1.0 - score) ** params.gamma).mean()


@pytest.fixture
def with_new_op(monkeypatch):
    monkeypatch.setattr(type(REGISTRY["reference"]), "focal_tversky", _focal_tversky,
                        raising=False)
    clear_cache()
    yield
    clear_cache()


def _independent(x: Tensor, t: Tensor, alpha: float, beta: float, gamma: float) -> Tensor:
    p = torch.sigmoid(x.double())
    g = t.double()
    tp, fp, fn = (p * g).sum(), (p * (1 - g)).sum(), ((1 - p) * g).sum()
    s = 1e-7
    return (1 - (tp + s) / (tp + alpha * fp + beta * fn + s)) ** gamma


def test_no_kernel_backend_claims_a_new_op(with_new_op):
    x = torch.zeros(2, 1, 4, 4)
    need = Need("focal_tversky")
    assert select("auto", x, need).name == "reference"
    assert select("auto", x.double(), need).name == "reference"
    with pytest.warns(RuntimeWarning, match="cannot compute the focal_tversky op"):
        assert select("native", x, need).name == "reference"


@pytest.mark.parametrize("backend", ["auto", "torch", "native"])
def test_new_loss_values_and_gradients(with_new_op, backend):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 6, 7, generator=gen, dtype=torch.float64) * 2
    t = (torch.rand(3, 1, 6, 7, generator=gen) > 0.6).double()
    params = FocalTverskyParams(alpha=0.3, beta=0.7, gamma=0.75, backend=backend)
    xs = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a named backend falls back, once
        got = _call.run("focal_tversky", xs, t, params)
    want = _independent(x, t, 0.3, 0.7, 0.75)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(got, xs)
    assert torch.autograd.gradcheck(
        lambda v: _call.run("focal_tversky", v, t, params), (xs,))
    (want_grad,) = torch.autograd.grad(_independent(xs, t, 0.3, 0.7, 0.75), xs)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


# ------------------------------------------- steps 2 and 4: parameters, module, specs, composite
@dataclass(frozen=True, slots=True, kw_only=True)
class FocalTverskyRegionParams(RegionParams):
    """The parameters as a loss that reuses the region losses' fields would write them."""

    gamma: float


class FocalTverskyLoss(SegmentationLoss):
    """The module, as docs/adding-a-loss.md step 4 describes it."""

    name = "focal_tversky"

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, gamma: float = 0.75, *,
                 mode: str = "binary", from_logits: bool = True,
                 ignore_index: int | None = None, reduction: str = "mean",
                 backend: str = "auto", check_values: bool | None = None) -> None:
        super().__init__(mode=mode, from_logits=from_logits, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, check_values=check_values)
        self.alpha, self.beta = check_non_negative("alpha", alpha), check_non_negative("beta", beta)
        self.gamma = check_non_negative("gamma", gamma)
        self._ready()

    def _prepare(self):
        params = FocalTverskyRegionParams(
            alpha=self.alpha, beta=self.beta, gamma=self.gamma, smoothing=1e-7,
            per_image=False, ddp_pool=False, mode=self.mode, from_logits=self.from_logits,
            ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
            check_values=self.check_values)
        return (functools.partial(_call.run, "focal_tversky"), params,
                Need("focal_tversky", params.mode))


@pytest.fixture
def registered(with_new_op, monkeypatch):
    monkeypatch.setitem(LOSSES, "focal_tversky", FocalTverskyLoss)
    monkeypatch.setattr(dynloss, "FocalTverskyLoss", FocalTverskyLoss, raising=False)


def _batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 1, 5, 6, generator=gen) * 2
    return x, (torch.rand(2, 1, 5, 6, generator=gen) > 0.5).float()


def test_the_module_of_a_new_loss(registered):
    """``_prepare`` returning ``functools.partial(_call.run, op)`` is a module's function (it
    failed: ``run`` took no ``plans``); the value is the independent formula's."""
    x, t = _batch()
    loss = FocalTverskyLoss(gamma=0.5)
    for _ in range(2):  # the second call takes the module's plan of the first
        torch.testing.assert_close(loss(x, t).double(), _independent(x, t, 0.3, 0.7, 0.5),
                                   rtol=1e-6, atol=0)
    assert loss._checked()[3], "the call left no plan"


def test_a_new_loss_in_spec_strings_and_composites(registered):
    """A composite of the new loss and BCE is their weighted sum: the one-pass composite took
    any ``RegionParams`` for a Tversky loss's (Tversky + BCE, silently)."""
    x, t = _batch()
    new = FocalTverskyLoss(gamma=2.0)
    composite = CompositeLoss([new, BCELoss()], weights=[1.0, 0.5])
    want = new(x, t) + 0.5 * BCELoss()(x, t)
    torch.testing.assert_close(composite(x, t), want, rtol=1e-6, atol=0)
    switching = build_loss("focal_tversky(gamma=2.0)->0.5*bce@3")
    assert isinstance(switching, SwitchingLoss)
    torch.testing.assert_close(switching(x, t), new(x, t), rtol=0, atol=0)
    assert repr(build_loss(repr(new))) == repr(new) == "FocalTverskyLoss(gamma=2.0)"


def test_an_op_the_reference_lacks_names_the_missing_step():
    """Step 3 skipped (no method for the op on the reference backend): a TypeError that names
    the op and points at the page, as a missing ``_prepare`` does, not a bare AttributeError."""
    params = FocalTverskyParams(alpha=0.5, beta=0.5, gamma=1.0)
    with pytest.raises(TypeError, match=r"the 'reference' backend has no op 'focal_tversky'.*"
                                        r"docs/adding-a-loss\.md"):
        _call.run("focal_tversky", torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4), params)


def test_a_distribution_op_with_its_own_parameters_runs_in_every_mode():
    """Step 3 lets a per-element loss give its own parameters the fields
    ``reference.distribution_terms`` reads (not subclass ``DistributionParams``): binary and
    multilabel mode also read ``pos_weight``, which the page now names."""

    @dataclass(frozen=True)
    class PolyParams:
        epsilon: float
        gamma: float = 0.0
        alpha: float | None = None
        pos_weight: float | None = None
        mode: str = "binary"
        from_logits: bool = True
        ignore_index: int | None = None
        backend: str = "auto"
        check_values: bool | None = None

    def poly(self, layout: Layout, params: PolyParams, checked: bool) -> Tensor:
        b, _ = reference.distribution_terms(layout, params, checked)
        return (b + params.epsilon * (1 - torch.exp(-b))).mean()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    cases = {"binary": (x[:, :1], (x[:, :1] > 0).double()),
             "multilabel": (x, (torch.rand(2, 3, 4, 4, generator=gen) > 0.5).double()),
             "multiclass": (x, torch.randint(0, 3, (2, 4, 4), generator=gen))}
    try:
        type(reference.REFERENCE).poly = poly
        clear_cache()
        for mode, (logits, target) in cases.items():
            bce = BCELoss(mode)(logits, target)
            got = _call.run("poly", logits, target, PolyParams(0.0, mode=mode))
            torch.testing.assert_close(got, bce)
    finally:
        del type(reference.REFERENCE).poly
        clear_cache()
    doc = (Path(__file__).parents[1] / "docs" / "adding-a-loss.md").read_text()
    assert "`params.pos_weight`" in doc
