"""The backends this process can run, and the losses built the same way on each of them.

Shared by the cross-backend tests (``test_backends_agree``, ``test_second_order``,
``test_nan_semantics``). Triton runs on the CPU only under its interpreter, which must be
switched on before Triton is first imported: as in ``test_kernels_triton``, it is switched on
here when no GPU is present and nothing has imported Triton yet (CI exports
``TRITON_INTERPRET=1`` for the whole run anyway).
"""

from __future__ import annotations

import math
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dynloss
from dynloss import BCELoss, CompositeLoss, DiceLoss
from dynloss.kernels.dispatch import REGISTRY

MODES = ("binary", "multilabel", "multiclass")
LOSS_NAMES = ("dice", "iou", "tversky", "focal", "bce", "topk", "composite")
"""The six losses and a fused CompositeLoss([DiceLoss(), BCELoss()])."""
REGION_NAMES = ("dice", "iou", "tversky")


def _runs_here(name: str) -> bool:
    return REGISTRY[name].unavailable(torch.zeros(1, 1, 1)) is None


FUSED = tuple(name for name in ("torch", "native", "triton") if _runs_here(name))
"""The fused backends that run on CPU tensors in this process (CI: all three)."""
BACKENDS = ("reference", *FUSED)


def make_loss(name: str, mode: str, backend: str, **kwargs) -> torch.nn.Module:
    """Loss ``name`` of :data:`LOSS_NAMES` on ``backend``; ``"composite"`` is
    ``CompositeLoss([DiceLoss(...), BCELoss(...)])`` (one fused pass where the backend has one),
    and gets only the keyword arguments both terms share."""
    if name == "composite":
        return CompositeLoss([DiceLoss(mode=mode, backend=backend, **kwargs),
                              BCELoss(mode=mode, backend=backend, **kwargs)])
    return dynloss.LOSSES[name](mode=mode, backend=backend, **kwargs)


def channels(mode: str, classes: int = 3) -> int:
    return 1 if mode == "binary" else classes


def seeded_case(mode: str, shape: tuple[int, ...] = (2, 3, 5), *, seed: int = 0,
                classes: int = 3, soft: bool = False, dtype: torch.dtype = torch.float32,
                scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, target)``: logits ``(N, C, *spatial)`` for ``shape = (N, *spatial)``; a hard
    (or ``soft``) target, class indices in multiclass mode."""
    gen = torch.Generator().manual_seed(seed)
    n, *spatial = shape
    c = channels(mode, classes)
    logits = (torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64) * scale)
    if mode == "multiclass":
        target = torch.randint(0, c, (n, *spatial), generator=gen)
    elif soft:
        target = torch.rand((n, c, *spatial), generator=gen, dtype=torch.float64).to(dtype)
    else:
        target = (torch.rand((n, c, *spatial), generator=gen) > 0.5).to(dtype)
    return logits.to(dtype), target


def assert_second_order_is_the_references(backend: str, mode: str, x: torch.Tensor,
                                          target: torch.Tensor, weights: torch.Tensor) -> None:
    """Focal's per-element losses on ``backend`` under a weight map: the gradient recorded
    (``create_graph=True``) and its own gradient (of ``sum(g**2)``) equal the reference's."""
    results = []
    for name in (backend, "reference"):
        leaf = x.clone().requires_grad_(True)
        loss = make_loss("focal", mode, name, reduction="none", gamma=1.5)(leaf, target)
        (g,) = torch.autograd.grad((loss * weights).sum(), leaf, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), leaf)
        results.append((g.detach(), h))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)


def elementwise_case(mode: str, from_logits: bool, ignore: bool, spatial=(5, 7), seed: int = 3,
                     device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, target)`` for ``reduction="none"`` tests: float32 logits (or probabilities) of
    ``(2, C, *spatial)``, ``C = 4`` but 1 in binary mode, scaled by 3; a float32 target (class
    indices in multiclass mode) with, if ``ignore``, some elements of sample 0 set to 255."""
    x, target = seeded_case(mode, (2, *spatial), seed=seed, dtype=torch.float64, scale=3.0,
                            classes=4)
    if not from_logits:
        x = x.softmax(1) if mode == "multiclass" else x.sigmoid()
    x = x.float()
    if mode != "multiclass":
        target = target.float()
    if ignore:
        target = target.clone()
        if mode == "multiclass":
            target[0, 1, :3] = 255
        else:
            target[0, :, 1, :3] = 255.0
    return x.to(device), target.to(device)


def weight_map(x: torch.Tensor, mode: str, seed: int = 5) -> torch.Tensor:
    """A per-element (multiclass: per-pixel) weight map in [0, 1) for the input ``x``."""
    shape = (x.shape[0], *x.shape[2:]) if mode == "multiclass" else x.shape
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(x.device)


def elementwise_options(kwargs: dict, mode: str, from_logits: bool, ignore: bool,
                        **extra: object) -> dict:
    """A per-element case's loss arguments: ``alpha="weights"`` as per-class weights
    (multiclass) or 0.25, ``from_logits``, ``ignore_index=255`` with ``ignore``."""
    if kwargs.get("alpha") == "weights":
        kwargs = dict(kwargs, alpha=(0.1, 0.2, 0.3, 0.4) if mode == "multiclass" else 0.25)
    kwargs = dict(kwargs, from_logits=from_logits, **extra)
    if ignore:
        kwargs["ignore_index"] = 255
    return kwargs


def with_nan_and_inf(weights: torch.Tensor) -> torch.Tensor:
    """``weights`` with element 7 NaN (ignored in :func:`elementwise_case`'s ``ignore``
    cases: its gradient is then 0 whatever the weight) and element 5 infinite."""
    odd = weights.clone()
    odd.view(-1)[7] = math.nan
    odd.view(-1)[5] = math.inf
    return odd
