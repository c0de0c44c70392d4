"""``torch.distributed`` helpers: differentiable all-reduce / all-gather and metric averaging.

Everything here is a no-op in a single process (``torch.distributed`` not available, not
initialised, or a world of size 1), so code written for DDP runs unchanged without it.

Gradient convention (the one of nnU-Net's ``AllGatherGrad``): the backward of a collective
*sums* the incoming gradients of all ranks. DDP then averages parameter gradients over the
ranks, so that after ``loss.backward()`` every parameter gradient equals the gradient of the
single-process loss on the concatenated batch. (Without DDP's averaging, the gradient that
reaches a rank's own inputs is ``world_size`` times the single-process one.)

Example (single process: the identity):
    >>> import torch
    >>> from dynloss.distributed import all_reduce_with_grad, is_distributed
    >>> is_distributed()
    False
    >>> all_reduce_with_grad(torch.tensor([1.0, 2.0]))
    tensor([1., 2.])
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_with_grad",
    "all_reduce_with_grad",
    "check_metric",
    "is_distributed",
    "metric_value",
    "pool_across_ranks",
    "reduce_mean",
    "reduce_mean_comparing",
    "world_size",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank.

    Examples:
        >>> from dynloss.distributed import is_distributed
        >>> is_distributed()  # a single process
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 outside an initialised process group).

    Examples:
        >>> from dynloss.distributed import world_size
        >>> world_size()
        1
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: sum of the ranks' incoming gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        # the sum's adjoint is the sum again, through this Function, so that create_graph=True
        # records it (an in-place all_reduce here was recorded as the identity)
        return _AllReduceSum.apply(grad.contiguous())


class _AllGather(torch.autograd.Function):
    """Forward: stack every rank's tensor. Backward: sum over ranks, keep this rank's slice."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _AllReduceSum.apply(grad.contiguous())[dist.get_rank()]


def all_reduce_with_grad(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over all ranks, differentiable (see the module's gradient convention).

    Every rank must call it with a tensor of the same shape and dtype. Returns ``tensor``
    itself in a single process.

    Examples:
        >>> import torch
        >>> from dynloss.distributed import all_reduce_with_grad
        >>> all_reduce_with_grad(torch.tensor([1.0, 2.0]))  # a single process: unchanged
        tensor([1., 2.])
    """
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor)


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` stacked along a new leading dim, ``(world_size, *shape)``.

    Differentiable: the gradient of each rank's slice flows back to that rank (summed over the
    ranks that used it). In a single process returns ``tensor.unsqueeze(0)``.

    Examples:
        >>> import torch
        >>> from dynloss.distributed import all_gather_with_grad
        >>> all_gather_with_grad(torch.tensor([1.0, 2.0])).shape  # (world_size, 2)
        torch.Size([1, 2])
    """
    if not is_distributed():
        return tensor.unsqueeze(0)
    return _AllGather.apply(tensor)


def pool_across_ranks(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Sum each tensor over the ranks with one differentiable all-reduce.

    Used by the region losses' ``ddp_pool=True``: the per-class sums ``I, P, G`` of every
    rank's batch add up to those of the concatenated batch. The tensors must share shape and
    dtype.

    Examples:
        >>> import torch
        >>> from dynloss.distributed import pool_across_ranks
        >>> intersection, total = pool_across_ranks(torch.tensor([3.0]), torch.tensor([8.0]))
        >>> intersection, total  # a single process: unchanged
        (tensor([3.]), tensor([8.]))
    """
    if not is_distributed():
        return tensors
    pooled = all_reduce_with_grad(torch.stack(tensors))
    return tuple(pooled.unbind(0))


def _collective_device(value: object) -> torch.device:
    """Where the all-reduce of ``value`` runs: NCCL reduces CUDA tensors only (a CPU metric
    tensor, as ``loss.item()``-free code passes, goes to the current CUDA device); other
    backends reduce a tensor where it is and a number on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(value, Tensor):
        return value.device
    return torch.device("cpu")


def check_metric(value: object) -> None:
    """Raise unless ``value`` is a monitored value: a real number (a Python or NumPy int or
    float, not a bool), a one-element tensor or a one-element NumPy array of ints or floats.

    Raises:
        ValueError: anything else (a string, a bool, a tensor or array of several elements,
            of a bool, complex or other dtype, or on the meta device).

    Examples:
        >>> import torch
        >>> from dynloss.distributed import check_metric
        >>> check_metric(torch.tensor(0.5))
        >>> check_metric("0.5")
        Traceback (most recent call last):
        ...
        ValueError: metric (the monitored value) must be a number or a scalar tensor; got str '0.5'
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric (the monitored value) must be a scalar; got shape "
                f"{tuple(value.shape)}"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"metric (the monitored value) must be a real number; got a "
                             f"tensor of dtype {value.dtype}")
        if value.is_meta:
            raise ValueError("metric (the monitored value) must hold a value; got a tensor on "
                             "the meta device")
    elif _is_numpy_array(value):
        size, dtype = value.size, value.dtype  # type: ignore[attr-defined]
        if size != 1:
            raise ValueError(f"metric (the monitored value) must be a scalar; got shape "
                             f"{tuple(value.shape)}")  # type: ignore[attr-defined]
        if dtype.kind not in "iuf":
            raise ValueError(f"metric (the monitored value) must be a real number; got an "
                             f"array of dtype {dtype}")
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"metric (the monitored value) must be a number or a scalar tensor; got "
            f"{type(value).__name__} {value!r}"
        )


def _is_numpy_array(value: object) -> bool:
    """Whether ``value`` is a NumPy ndarray (without importing NumPy, an optional
    dependency)."""
    return any(kind.__name__ == "ndarray" and kind.__module__ == "numpy"
               for kind in type(value).__mro__)  # (a subclass too: np.memmap, ...)


def metric_value(value: object) -> float:
    """``value`` (see :func:`check_metric`) as a Python float.

    >>> import torch
    >>> from dynloss.distributed import metric_value
    >>> metric_value(torch.tensor([0.5])), metric_value(3)
    (0.5, 3.0)
    """
    check_metric(value)
    try:
        if isinstance(value, Tensor) or _is_numpy_array(value):
            value = value.item()  # type: ignore[attr-defined]
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(
            f"metric (the monitored value) must be within the float range; got "
            f"{type(value).__name__} beyond it"
        ) from None


def reduce_mean(value: float | Tensor) -> float:
    """The mean of a scalar over all ranks, as a Python float (identical on every rank).

    Single process: ``float(value)``. Distributed: one all-reduce (on the tensor's device, on
    the current CUDA device for NCCL, else on the CPU) in float64. Every rank must call it.

    Raises:
        ValueError: ``value`` is not a scalar.

    Examples:
        >>> import torch
        >>> from dynloss.distributed import reduce_mean
        >>> reduce_mean(torch.tensor(0.25))
        0.25
    """
    return reduce_mean_comparing(value, ())[0]


def _digit_bits(world: int) -> int:
    """Bits per digit of a compared counter over ``world`` ranks: the largest ``b`` for which
    the ranks' sum of squared digits, below ``world * 2**(2b)``, is exact in float64."""
    return (53 - max(world - 1, 1).bit_length()) // 2


def reduce_mean_comparing(value: float | Tensor, counters: Sequence[int]
                          ) -> tuple[float, tuple[bool, ...]]:
    """:func:`reduce_mean` of ``value``, and for each of ``counters`` (integers in
    ``[0, 2**64)``, as many on every rank) whether every rank holds the same, in the same
    all-reduce.

    Each counter travels as its digits ``d`` in base ``2**b`` (``b`` from the world size
    ``W``: 26 bits for 2 ranks, 20 for 8192) and their squares: the ranks agree where ``W *
    sum(d**2) == sum(d)**2`` for every digit (equality holds only for equal digits), sums
    exact in float64. Every rank gets the same answer. Single process: every counter agrees.

    Examples:
        >>> from dynloss.distributed import reduce_mean_comparing
        >>> reduce_mean_comparing(0.5, (3, 0))
        (0.5, (True, True))
    """
    if not is_distributed():
        return metric_value(value), (True,) * len(counters)
    check_metric(value)
    device = _collective_device(value)
    world = dist.get_world_size()
    bits = _digit_bits(world)
    per_counter = -(-64 // bits)
    digits = [float((int(count) >> (bits * i)) & ((1 << bits) - 1))
              for count in counters for i in range(per_counter)]
    if isinstance(value, Tensor):
        # A copy: the all-reduce writes in place, and the caller's tensor keeps its value.
        metric = value.detach().reshape(1).to(device=device, dtype=torch.float64, copy=True)
    else:
        metric = torch.tensor([metric_value(value)], device=device, dtype=torch.float64)
    buffer = metric if not digits else torch.cat([metric, torch.tensor(
        [x for d in digits for x in (d, d * d)], device=device, dtype=torch.float64)])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    total, *sums = buffer.tolist()
    same = [world * int(sums[2 * i + 1]) == int(sums[2 * i]) ** 2 for i in range(len(digits))]
    agree = tuple(all(same[i * per_counter:(i + 1) * per_counter])
                  for i in range(len(counters)))
    return total / world, agree
