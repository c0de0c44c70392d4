"""A differentiable backward for the fused autograd Functions: recompute, then differentiate.

The fused Functions (torch, native, Triton) write their gradient with a kernel that autograd
cannot differentiate. When the backward pass itself is recorded (``create_graph=True``:
gradient penalties, MAML, Hessian-vector products), their ``backward`` calls
:func:`recompute_backward` instead: it runs the same computation through the reference
maths with autograd and returns ``autograd.grad`` of it with ``create_graph=True``, so the
gradient is itself differentiable (and equals the reference's to rounding). So it does when
the upstream gradient is batched (:func:`must_recompute`), which the kernels cannot take.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._math import batched

__all__ = ["must_recompute", "recompute_backward"]


def must_recompute(*grads: Tensor | None) -> bool:
    """Whether a fused Function's backward must go through :func:`recompute_backward`: the
    backward pass is recorded (grad mode on: ``create_graph=True``), or an upstream gradient
    is batched (``torch.autograd.grad(..., is_grads_batched=True)``, the vectorized
    ``torch.autograd.functional.jacobian``, ``gradcheck(check_batched_grad=True)``: torch runs
    the backward pass under ``vmap``), which a kernel cannot read on the host or by pointer."""
    if torch.is_grad_enabled():
        return True
    return any(g is not None and batched(g) for g in grads)


def recompute_backward(
    function: Callable[..., Tensor | Sequence[Tensor]],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor | None],
) -> tuple[Tensor | None, ...]:
    """Gradients of ``function(*inputs)`` w.r.t. ``inputs`` for ``grad_outputs``, recorded
    when the backward pass is (grad mode on), plain tensors otherwise (a Function's exact
    fallback, e.g. where its saved slopes overflowed).

    ``inputs`` are the tensors the Function saved (the originals, still attached to the graph
    before the Function); ``None`` is returned for an input that needs no gradient.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        outputs = function(*inputs)
    if isinstance(outputs, Tensor):
        outputs = (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True)
             if g is not None and o.requires_grad]
    wanted = [t for t in inputs if t.requires_grad]
    grads: dict[int, Tensor | None] = {}
    if pairs and wanted:
        found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                    create_graph=create_graph, allow_unused=True)
        grads = {id(t): g for t, g in zip(wanted, found, strict=True)}
    result = []
    for t in inputs:
        g = grads.get(id(t))
        if g is None and t.requires_grad:
            g = torch.zeros_like(t)
        result.append(g)
    return tuple(result)
