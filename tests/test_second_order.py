"""Second-order gradients on every backend equal the reference's (issue #11).

A fused backend writes its gradient with a kernel; when the backward pass is itself recorded
(``create_graph=True``: gradient penalties, MAML, Hessian-vector products) it must recompute
a differentiable gradient (``kernels/_recompute.py``). Each test takes the gradient with
``create_graph=True`` on float32 input on each fused backend and differentiates it again (the
gradient's squared norm, its norm, a Hessian-vector product), against the float64 reference.
``gradgradcheck`` checks the torch and reference backends against finite differences.
"""

from __future__ import annotations

import pytest
import torch

from ._backends import FUSED, LOSS_NAMES, MODES, make_loss, seeded_case
from ._kernel_cases import NODES, graph_nodes

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def second_order(loss_fn, x: torch.Tensor, target: torch.Tensor, backend: str | None = None):
    """``(loss, g, d|g|^2/dx, d|g|/dx, H v)`` with ``g = d sum(loss) / dx``."""
    x = x.detach().clone().requires_grad_(True)
    loss = loss_fn(x, target)
    if backend is not None:  # the fused kernels ran, not a silent fallback to the reference
        expected = NODES[backend]
        assert graph_nodes(loss) & set(expected), (backend, graph_nodes(loss))
    (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    assert g.requires_grad  # a differentiable gradient
    v = torch.linspace(-1.0, 1.0, x.numel(), dtype=x.dtype).view_as(x)
    (penalty,) = torch.autograd.grad(g.square().sum(), x, retain_graph=True)
    (norm,) = torch.autograd.grad(g.norm(), x, retain_graph=True)
    (hvp,) = torch.autograd.grad((g * v).sum(), x)
    return loss.detach(), g.detach(), penalty, norm, hvp


def assert_same(got, want, names=("loss", "gradient", "d|g|^2", "d|g|", "Hv")):
    for name, a, b in zip(names, got, want, strict=True):
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5 * scale + 1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _float64_reference(name, mode, x, target, **kwargs):
    target64 = target.double() if target.is_floating_point() else target
    return second_order(make_loss(name, mode, "reference", **kwargs), x.double(), target64)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_second_order_equals_the_reference(name, mode, backend):
    x, target = seeded_case(mode, (2, 3, 5), seed=len(name) + 7 * len(mode))
    want = _float64_reference(name, mode, x, target)
    got = second_order(make_loss(name, mode, backend), x, target, backend)
    assert_same(got, want)


VARIANTS = [
    ("dice", {"per_image": True, "smooth": 1.0}),
    ("dice", {"reduction": "none"}),
    ("dice", {"reduction": "sum", "per_image": True}),
    ("dice", {"ddp_pool": True}),
    ("iou", {"per_image": True, "reduction": "none"}),
    ("tversky", {"alpha": 1.5, "beta": 0.2}),
    ("tversky", {"alpha": 0.2, "beta": 0.9, "per_image": True}),
    ("focal", {"gamma": 0.5}),
    ("focal", {"gamma": 2.0, "alpha": "weights"}),
    ("focal", {"gamma": 3.0, "reduction": "sum"}),
    ("bce", {"reduction": "sum"}),
    ("topk", {"k": 0.3}),
    ("topk", {"k": 1.0, "reduction": "sum"}),
    ("composite", {}),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("variant", "options"),
                         [(i, o) for i in range(len(VARIANTS))
                          for o in ("ignore", "probabilities", "soft")])
def test_second_order_with_options(variant, options, mode, backend):
    """Options on top: ignored pixels, probabilities instead of logits, soft targets."""
    name, kwargs = VARIANTS[variant]
    kwargs = dict(kwargs)
    if kwargs.get("alpha") == "weights":
        kwargs["alpha"] = [0.5, 1.0, 2.0] if mode == "multiclass" else 0.25
    if options == "soft" and mode == "multiclass":
        options = "ignore"
    x, target = seeded_case(mode, (2, 3, 4), seed=variant, soft=options == "soft")
    if options == "ignore":
        target = target.clone()
        target.view(-1)[::4] = 255
        kwargs["ignore_index"] = 255
    if options == "probabilities":
        x = (x.softmax(1) * 0.9 + 0.1 / x.shape[1] if mode == "multiclass"
             else x.sigmoid() * 0.9 + 0.05)
        kwargs["from_logits"] = False
    want = _float64_reference(name, mode, x, target, **kwargs)
    got = second_order(make_loss(name, mode, backend, **kwargs), x, target, backend)
    assert_same(got, want)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", MODES)
def test_gradient_penalty_through_a_model(mode, backend):
    """WGAN-GP style: the penalty on d loss / d images, backpropagated to a conv's weights."""
    c = 1 if mode == "binary" else 3
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 2, 4, 5, generator=gen)
    _, target = seeded_case(mode, (2, 4, 5), seed=3)
    results = []
    for name, dtype in ((backend, torch.float32), ("reference", torch.float64)):
        conv = torch.nn.Conv2d(2, c, 3, padding=1).to(dtype)
        with torch.no_grad():
            for p in conv.parameters():
                p.copy_(torch.linspace(-0.5, 0.5, p.numel(), dtype=dtype).view_as(p))
        inputs = images.to(dtype).requires_grad_(True)
        t = target.to(dtype) if target.is_floating_point() else target
        loss = make_loss("composite", mode, name)(conv(inputs), t)
        (g,) = torch.autograd.grad(loss, inputs, create_graph=True)
        (loss + 10.0 * g.square().sum()).backward()
        results.append((conv.weight.grad, conv.bias.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4,
                                   atol=2e-5 * want.abs().max().item())


GRADGRAD = [("dice", {}), ("iou", {"per_image": True}), ("tversky", {"alpha": 0.3, "beta": 0.7}),
            ("focal", {"gamma": 2.0}), ("bce", {}), ("topk", {"k": 0.5}), ("composite", {})]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "kwargs"), GRADGRAD, ids=[n for n, _ in GRADGRAD])
def test_gradgradcheck_float64(name, kwargs, mode, backend):
    x, target = seeded_case(mode, (2, 2, 3), seed=11, dtype=torch.float64, classes=3,
                            soft=True)
    x = x.requires_grad_(True)
    loss = make_loss(name, mode, backend, **kwargs)
    assert torch.autograd.gradgradcheck(lambda inp: loss(inp, target), (x,), eps=1e-6,
                                        atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
@pytest.mark.parametrize("kwargs", [{"reduction": "none"}, {"reduction": "none", "per_image": True},
                                    {"weight": [0.5, 2.0]}], ids=["none", "none-per-image",
                                                                   "weight"])
def test_second_order_without_the_background(kwargs, mode, backend):
    """``include_background=False``: the kernels' second-order path recomputes through the
    reference with the background left out, ``reduction="none"`` included (its scores' shape
    must be the chosen classes')."""
    kwargs = {"include_background": False, **kwargs}
    x, target = seeded_case(mode, (2, 3, 4), seed=11)
    want = _float64_reference("dice", mode, x, target, **kwargs)
    got = second_order(make_loss("dice", mode, backend, **kwargs), x, target, backend)
    assert_same(got, want)
