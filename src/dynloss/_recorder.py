"""What records or transforms a loss call instead of running it once, eagerly, on plain tensors.

Dispatch (:mod:`dynloss.kernels.dispatch`) picks only backends that declare they run under
the recorder it names; the value checks (:mod:`dynloss._layout`) read nothing on the host
where :func:`checked_in_graph` says so; the shared maths (:mod:`dynloss._math`) use
their Functions' forward-mode rules only where forward derivatives are formed.

>>> import torch
>>> from dynloss._recorder import recorder
>>> recorder(torch.zeros(2)) is None
True
>>> torch.func.grad(lambda x: torch.tensor(float(recorder(x) == "torch.func")) + x.sum())(
...     torch.zeros(2))
tensor([1., 1.])
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch._C._functorch import maybe_current_level as _functorch_level
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["FORWARD_DERIVATIVES", "checked_in_graph", "is_fake", "recorder", "traced"]

def recorder(tensor: Tensor) -> str | None:
    """What records or transforms this call instead of running it once, eagerly, on plain
    tensors (None when nothing does): ``"torch.compile"`` (also for a FakeTensor),
    ``"torch.jit.trace"``, ``"torch.func"`` (a transform of :mod:`torch.func`: ``grad``,
    ``vmap``, ``jvp``, ``jacrev``, ...) or ``"forward-mode AD"`` (a
    :func:`torch.autograd.forward_ad.dual_level` is open: torch's dual levels are the
    process's, so a level open in another thread counts too; the answer is then the
    reference's, only slower). A transform is named before ``torch.compile``, which may trace
    one."""
    # the transforms first: torch.compile around a torch.func.jvp traces the call under both,
    # and a compilable backend without forward-mode rules gave a tangent of 0 there
    if _functorch_level() is not None:
        return "torch.func"
    if getattr(_forward_ad, "_current_level", -1) >= 0:
        return "forward-mode AD"
    if traced(tensor):
        return "torch.compile"
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    return None


def checked_in_graph(tensor: Tensor) -> bool:
    """Whether no value may be read on the host for this call, so that the values are checked
    in the graph (an invalid one makes the loss NaN): while ``torch.compile`` traces (also a
    FakeTensor's call, and inside a dual level: a host read broke the graph) and under a
    :mod:`torch.func` transform (``vmap`` cannot branch on a value)."""
    return traced(tensor) or _functorch_level() is not None


def traced(tensor: Tensor) -> bool:
    """Whether ``torch.compile`` traces the call or ``tensor`` is a FakeTensor
    (``FakeTensorMode``, non-strict ``torch.export``): the kernel backends then call their
    custom operators, whose fake implementations give the shapes (their eager kernels cannot
    run on fake tensors, nor be traced)."""
    return torch.compiler.is_compiling() or is_fake(tensor)


FORWARD_DERIVATIVES = ("torch.func", "forward-mode AD")
"""The recorders under which forward-mode derivatives may be formed (``jvp``, ``jacfwd``,
``hessian``, dual tensors)."""


def is_fake(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a FakeTensor (``FakeTensorMode``: a shape, a dtype, a device and
    no data, as tracing tools use): traced like a call under ``torch.compile``, never read."""
    return isinstance(tensor, FakeTensor)
