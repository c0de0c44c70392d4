"""The :mod:`torch.func` transforms and forward-mode AD: per-sample gradients (``vmap`` over
``grad``, the recipe of differential privacy and of influence functions), ``jvp``,
``hessian`` and :mod:`torch.autograd.forward_ad`.

Every loss raised inside torch before, with the default backend: the fused kernels are
autograd Functions without the rules these transforms need ("it must override the
setup_context staticmethod", "You must implement the jvp function"), and the value checks
read on the host, which ``vmap`` cannot. Dispatch now records the reference under them (the
``func_transforms`` and ``forward_ad`` capabilities), whose two Functions (the sigmoid and
softmax with their careful backward) have a generated vmap rule and a jvp; under
``torch.func`` the values are checked in the graph (an invalid target makes the loss NaN).
Found by a review of the losses as a demanding user would use them."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacfwd, jvp, vmap

from dynloss import BCELoss, CompositeLoss, DiceLoss, FocalLoss, SwitchingLoss, build_loss
from dynloss.kernels import dispatch

from ._backends import FUSED, LOSS_NAMES, MODES, make_loss, seeded_case

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def _eager_grad(loss, x, target):
    leaf = x.clone().requires_grad_()
    return torch.autograd.grad(loss(leaf, target), leaf)[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_grad_is_the_reference_gradient(name, mode):
    """float64: the exact reference gradient; float32 on backend="auto" (the kernels run
    eagerly first, so a plan kept from that call is not reused under the transform)."""
    x, target = seeded_case(mode, (2, 3, 4), seed=11, dtype=torch.float64)
    x[0, 0, 0, 0] = 30.0  # a saturated sigmoid/softmax in the mix
    reference = make_loss(name, mode, "reference")
    want = _eager_grad(reference, x, target)
    loss = make_loss(name, mode, "auto")
    got = grad(lambda v: loss(v, target))(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)

    x32 = x.float()
    eager = _eager_grad(loss, x32, target)  # the kernels (native on the CPU)
    got = grad(lambda v: loss(v, target))(x32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_vmap_of_grad_gives_each_sample_s_gradient(name, mode):
    x, target = seeded_case(mode, (3, 2, 4), seed=12)
    loss = make_loss(name, mode, "auto")
    loss(x, target)  # an eager call first
    per_sample = vmap(grad(lambda v, t: loss(v[None], t[None])))(x, target)
    want = torch.stack([_eager_grad(loss, x[i:i + 1], target[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(per_sample, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_jvp_and_forward_ad_give_the_directional_derivative(name, mode):
    """The tangent is the gradient's dot product with the direction, in the loss's dtype (a
    weighted composite's was float64 through torch's forward formula of a 0-dim tensor times
    a Python float, pytorch/pytorch#90065)."""
    x, target = seeded_case(mode, (2, 3, 4), seed=13)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    loss = make_loss(name, mode, "auto")
    want = (_eager_grad(make_loss(name, mode, "reference"), x, target) * direction).sum()
    value, tangent = jvp(lambda v: loss(v, target), (x,), (direction,))
    assert (value.dtype, tangent.dtype) == (torch.float32, torch.float32)
    torch.testing.assert_close(value, loss(x, target))
    torch.testing.assert_close(tangent, want, rtol=1e-5, atol=1e-6)
    with fwAD.dual_level():
        out = loss(fwAD.make_dual(x, direction), target)
        primal, tangent = fwAD.unpack_dual(out)
    assert tangent is not None and tangent.dtype == torch.float32
    torch.testing.assert_close(primal, loss(x, target))
    torch.testing.assert_close(tangent, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["dice", "tversky", "focal", "topk", "composite"])
def test_hessian_by_torch_func_is_autograd_s(name, mode):
    """torch.func.hessian (forward over reverse) against torch.autograd's double backward of
    the reference."""
    x, target = seeded_case(mode, (1, 2, 2), seed=14, dtype=torch.float64)
    loss = make_loss(name, mode, "auto")
    reference = make_loss(name, mode, "reference")
    want = torch.autograd.functional.hessian(lambda v: reference(v, target), x)
    torch.testing.assert_close(hessian(lambda v: loss(v, target))(x), want)
    torch.testing.assert_close(jacfwd(grad(lambda v: loss(v, target)))(x), want)


def test_scheduled_losses_under_the_transforms():
    """A weighted CompositeLoss (fused and not), a SwitchingLoss after its switch and a spec."""
    x, target = seeded_case("binary", (3, 4, 4), seed=15)
    direction = torch.ones_like(x)
    switch = SwitchingLoss([BCELoss(), DiceLoss()], milestones=[1])
    switch.step()
    losses = [CompositeLoss([DiceLoss(), BCELoss()], [0.3, 0.7]),
              CompositeLoss([DiceLoss(), FocalLoss(), BCELoss()], [0.5, 2.0, 0.25]),
              switch, build_loss("0.4*dice + 0.6*focal")]
    for loss in losses:
        want = _eager_grad(loss, x, target)
        torch.testing.assert_close(grad(lambda v, loss=loss: loss(v, target))(x), want)
        _, tangent = jvp(lambda v, loss=loss: loss(v, target), (x,), (direction,))
        assert tangent.dtype == torch.float32, loss
        torch.testing.assert_close(tangent, want.sum(), rtol=1e-5, atol=1e-6)
        per_sample = vmap(grad(lambda v, t, loss=loss: loss(v[None], t[None])))(x, target)
        torch.testing.assert_close(per_sample[1], _eager_grad(loss, x[1:2], target[1:2])[0])


def test_per_sample_gradients_of_a_model_s_parameters():
    """The torch.func recipe: vmap over grad of functional_call."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 1, 6, 6)
    target = (torch.rand(4, 1, 6, 6) > 0.5).float()
    loss = DiceLoss()

    def sample_loss(p, image, mask):
        return loss(functional_call(model, p, (image[None],)), mask[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(4):
        model.zero_grad()
        loss(model(x[i:i + 1]), target[i:i + 1]).backward()
        torch.testing.assert_close(per_sample["weight"][i], model.weight.grad)
        torch.testing.assert_close(per_sample["bias"][i], model.bias.grad)


@pytest.mark.parametrize("backend", FUSED)
def test_a_named_kernel_backend_warns_once_and_computes_the_reference(backend):
    dispatch.clear_cache()
    x, target = seeded_case("multilabel", (2, 3, 4), seed=16)
    loss = DiceLoss(mode="multilabel", backend=backend)
    with pytest.warns(RuntimeWarning, match=f"backend='{backend}' cannot compute a torch.func "
                      r"transform \(grad, vmap, jvp, ...\); using the 'reference' backend"):
        got = grad(lambda v: loss(v, target))(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad(lambda v: loss(v, target))(x)
    want = _eager_grad(DiceLoss(mode="multilabel", backend="reference"), x, target)
    torch.testing.assert_close(got, want)
    with pytest.warns(RuntimeWarning, match=f"backend='{backend}' cannot compute forward-mode "
                      r"AD; using the 'reference' backend"), fwAD.dual_level():
        loss(fwAD.make_dual(x, torch.ones_like(x)), target)


@pytest.mark.parametrize("mode", MODES)
def test_under_vmap_an_invalid_target_makes_its_sample_s_loss_nan(mode):
    """A host read of the values (the eager check, the CPU's class-index check) cannot run
    under vmap: the check is the graph's, and only the bad sample's loss is NaN."""
    x, target = seeded_case(mode, (3, 2, 4), seed=17)
    bad = target.clone()
    bad[1].view(-1)[0] = 7 if mode == "multiclass" else 2.0
    for name in ("dice", "bce"):
        loss = make_loss(name, mode, "auto")
        values = vmap(lambda v, t, loss=loss: loss(v[None], t[None]))(x, bad)
        assert torch.isnan(values[1]), name
        want = torch.stack([loss(x[i:i + 1], target[i:i + 1]) for i in (0, 2)])
        torch.testing.assert_close(values[[0, 2]], want)
    with pytest.raises(ValueError, match="target"):  # eager: the error, as before
        make_loss("dice", mode, "auto")(x, bad)


def test_the_recorder_names_what_transforms_a_call():
    from dynloss._recorder import recorder

    x = torch.zeros(2)
    seen = []
    assert recorder(x) is None
    grad(lambda v: (seen.append(recorder(v)), v.sum())[1])(x)
    vmap(lambda v: (seen.append(recorder(v)), v.sum())[1])(x)
    with fwAD.dual_level():
        seen.append(recorder(fwAD.make_dual(x, x)))
    assert seen == ["torch.func", "torch.func", "forward-mode AD"]
    assert recorder(x) is None


@pytest.mark.parametrize("backend", ["auto", *FUSED])
def test_torch_compile_around_a_transform_gives_the_reference_derivative(backend):
    """Under torch.compile around torch.func.jvp (or a dual level) the call is traced under
    both: dispatch asked "compiling?" first and took the compilable Triton kernels, which have
    no forward-mode rule: a tangent of 0 (jvp) or None (dual level), silently."""
    x, target = seeded_case("binary", (2, 4, 4), seed=18)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    for name in ("dice", "focal"):
        loss = make_loss(name, "binary", backend)
        want = (_eager_grad(make_loss(name, "binary", "reference"), x, target) * direction).sum()
        torch._dynamo.reset()
        compiled = torch.compile(lambda v, loss=loss: jvp(lambda u: loss(u, target), (v,),
                                                          (direction,)), backend="aot_eager")
        torch.testing.assert_close(compiled(x)[1], want, rtol=1e-5, atol=1e-6)

        def dual(v, loss=loss):
            with fwAD.dual_level():
                return fwAD.unpack_dual(loss(fwAD.make_dual(v, direction), target)).tangent

        torch._dynamo.reset()
        tangent = torch.compile(dual, backend="aot_eager", fullgraph=True)(x)
        assert tangent is not None, name
        torch.testing.assert_close(tangent, want, rtol=1e-5, atol=1e-6)


def test_a_compiled_loss_called_while_a_dual_level_is_open_stays_one_graph():
    """A dual level is the process's: with one open (here, or in another thread) a compiled
    loss on plain tensors read the values on the host, a graph break (an error with
    fullgraph=True)."""
    x, target = seeded_case("multiclass", (2, 4, 4), seed=20)
    loss = CompositeLoss([DiceLoss(mode="multiclass"), FocalLoss(mode="multiclass")])
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    with fwAD.dual_level():
        value = compiled(x, target)
    torch.testing.assert_close(value, loss(x, target))


def test_last_terms_are_empty_after_a_call_under_a_transform():
    """Under vmap the terms are batched tensors of the transform: kept in last_terms, every
    later use of them raised ("tensor may have escaped from inside a function being
    vmapped", an internal assert in torch.stack). An eager call fills them again."""
    x, target = seeded_case("binary", (3, 4, 4), seed=19)
    switch = SwitchingLoss([CompositeLoss([DiceLoss(), BCELoss()]), DiceLoss()],
                           milestones=[5])
    for loss in (CompositeLoss([DiceLoss(), BCELoss()], [0.5, 1.0]),
                 CompositeLoss([DiceLoss(), FocalLoss(), BCELoss()]), switch):
        loss(x, target)
        names = sorted(loss.last_terms)
        vmap(lambda v, t, loss=loss: loss(v[None], t[None]))(x, target)
        assert loss.last_terms == {}
        grad(lambda v, loss=loss: loss(v, target))(x)
        assert loss.last_terms == {}
        loss(x, target)
        assert sorted(loss.last_terms) == names
        assert torch.stack(list(loss.last_terms.values())).isfinite().all()
