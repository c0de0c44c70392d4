"""Inputs and a forward+backward runner shared by the kernel tests (Triton and native)."""

from __future__ import annotations

import torch


def kernel_inputs(mode: str, spatial: tuple[int, ...], *, n: int = 2, c: int = 3, seed: int = 0,
                  scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded logits ``(n, C, *spatial)`` and a target for ``mode`` (40 % positives)."""
    gen = torch.Generator().manual_seed(seed)
    channels = 1 if mode == "binary" else c
    x = torch.randn((n, channels, *spatial), generator=gen) * scale
    if mode == "multiclass":
        t = torch.randint(0, c, (n, *spatial), generator=gen)
    else:
        t = (torch.rand((n, channels, *spatial), generator=gen) > 0.6).float()
    return x, t


NODES = {
    "torch": ("RegionSumsBackward", "DistributionSumBackward"),
    "native": ("NativeRegionLossBackward", "NativeDistributionLossBackward",
               "NativeCompositeLossBackward", "NativeSumsBackward"),
    "triton": ("TritonFusedLossBackward", "TritonTopKBackward", "TritonRegionSumsBackward"),
}
"""The autograd nodes each fused backend puts in the graph of a loss it computes."""


def graph_nodes(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes in ``t``'s graph."""
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def assert_ran_on(loss: torch.Tensor, backend: str) -> None:
    """``backend``'s kernels computed ``loss``: not a fallback to another backend (which
    dispatch announces once, with a warning that tests filter)."""
    found = graph_nodes(loss)
    assert found & set(NODES[backend]), f"{backend} did not run: the graph holds {found}"


def run_loss(fn, x: torch.Tensor, t: torch.Tensor, backend: str, *, ran: bool = False, **kw):
    """``(loss, d sum(loss) / d x)`` of ``fn(x, t, backend=backend, **kw)`` on a copy of ``x``;
    with ``ran``, assert that ``backend`` computed it (:func:`assert_ran_on`)."""
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, t, backend=backend, **kw)
    if ran:
        assert_ran_on(loss, backend)
    loss.sum().backward()
    return loss.detach(), x.grad


def saturated_multiclass(*, n: int = 2, c: int = 4, m: int = 32, margin: float = 14.0,
                         offset: float = 20.0, seed: int = 0, target: str = "top"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(n, c, m)`` whose every pixel has one class ``margin`` above the others (the
    softmax there is within ``~c e^-margin`` of 1) on top of a large ``offset``, and the
    target that class (``target="top"``): where a well-trained network is, and where float32
    loses the digits of ``1 - p`` and of ``logsumexp - x_t`` unless they are formed from the
    other classes. ``target="other"``: the next class is the target (a confidently wrong
    network: the softmax Jacobian at the top class still loses its digits). ``target="tie"``:
    the next class is ``margin`` above the rest too, exactly tied with the top (the softmax
    is 1/2 there), and the target is the top."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, m), generator=gen) + offset
    top = torch.randint(0, c, (n, m), generator=gen)
    following = (top + 1) % c
    if target == "tie":
        x.scatter_(1, following[:, None], x.gather(1, top[:, None]))
        x.scatter_add_(1, following[:, None], torch.full((n, 1, m), margin))
    x.scatter_add_(1, top[:, None], torch.full((n, 1, m), margin))
    return x, following if target == "other" else top


def assert_elementwise_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Every element within ``rtol`` of ``want`` relative to itself (a tolerance of 1e-6 of
    the largest only for elements that are nearly 0)."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=1e-6 * scale)
