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


def run_loss(fn, x: torch.Tensor, t: torch.Tensor, backend: str, **kw):
    """``(loss, d sum(loss) / d x)`` of ``fn(x, t, backend=backend, **kw)`` on a copy of ``x``."""
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, t, backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad
