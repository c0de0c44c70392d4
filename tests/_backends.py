"""The backends this process can run, and the losses built the same way on each of them.

Shared by the cross-backend tests (``test_backends_agree``, ``test_second_order``,
``test_nan_semantics``). Triton runs on the CPU only under its interpreter, which must be
switched on before Triton is first imported: as in ``test_kernels_triton``, it is switched on
here when no GPU is present and nothing has imported Triton yet (CI exports
``TRITON_INTERPRET=1`` for the whole run anyway).
"""

from __future__ import annotations

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
