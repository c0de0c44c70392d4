"""A loss added the way docs/adding-a-loss.md describes runs correctly on every device with no
kernel change: the kernel backends list their ops, so dispatch gives the new op to the
reference (and a named kernel backend falls back, saying so once).

The example is the focal Tversky loss, ``(1 - T)^gamma`` (Abraham & Khan, 2019), written only
with the shared maths and the reference backend's region sums.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from dynloss import _math
from dynloss._layout import Layout
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
