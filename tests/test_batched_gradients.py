"""Batched gradients (``torch.autograd.grad(..., is_grads_batched=True)``, the vectorized
``torch.autograd.functional.jacobian``, ``gradcheck(check_batched_grad=True)``): torch runs the
backward pass under ``vmap``, which the fused kernels cannot take (they read their upstream
gradient on the host or hand its storage to a kernel). Every backend then computes the
gradient through the reference maths, and gives the reference's answer; each crashed inside
torch before ("Batching rule not implemented for aten::item", "Cannot access storage of
BatchedTensorImpl"). Found by a review of the losses in training-loop integrations."""

from __future__ import annotations

import pytest
import torch

from ._backends import FUSED, LOSS_NAMES, MODES, make_loss, seeded_case

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SCALES = torch.tensor([1.0, -2.0, 0.5])


@pytest.mark.parametrize("backend", ["auto", *FUSED])
@pytest.mark.parametrize("mode", MODES)
def test_batched_upstream_gradients_give_the_reference_s_rows(mode, backend):
    x, target = seeded_case(mode, (2, 3, 4), seed=4)
    x[0, 0, 0, 0] = 9.0  # a saturated sigmoid/softmax in the mix
    for name in LOSS_NAMES:
        leaf = x.clone().requires_grad_()
        want = torch.autograd.grad(make_loss(name, mode, "reference")(leaf, target), leaf)[0]
        leaf = x.clone().requires_grad_()
        loss = make_loss(name, mode, backend)(leaf, target)
        (rows,) = torch.autograd.grad(loss, leaf, SCALES, is_grads_batched=True)
        assert rows.shape == (3, *x.shape), name
        torch.testing.assert_close(rows, SCALES.view(3, 1, 1, 1, 1) * want, rtol=1e-5,
                                   atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_with_batched_gradients_and_a_vectorized_jacobian(mode):
    x, target = seeded_case(mode, (2, 2, 3), seed=5, dtype=torch.float64)
    x = x.requires_grad_()
    for name in LOSS_NAMES:
        loss = make_loss(name, mode, "auto", reduction="none") if name in (
            "dice", "iou", "tversky") else make_loss(name, mode, "auto")
        assert torch.autograd.gradcheck(lambda v, loss=loss: loss(v, target), (x,),
                                        check_batched_grad=True), name
        jacobian = torch.autograd.functional.jacobian(lambda v, loss=loss: loss(v, target),
                                                      x, vectorize=True)
        reference = make_loss(name, mode, "reference", **(
            {"reduction": "none"} if name in ("dice", "iou", "tversky") else {}))
        want = torch.autograd.functional.jacobian(lambda v: reference(v, target), x)
        torch.testing.assert_close(jacobian, want, msg=lambda m, name=name: f"{name}: {m}")
