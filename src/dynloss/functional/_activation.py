"""The probabilities a loss sees: sigmoid (binary, multilabel) or softmax (multiclass)."""

from __future__ import annotations

from torch import Tensor

from ..constants import MULTICLASS_MODE


def probabilities(x: Tensor, mode: str, from_logits: bool) -> Tensor:
    """``x`` in layout ``(N, C, M)``; returns probabilities of the same shape."""
    if not from_logits:
        return x
    if mode == MULTICLASS_MODE:
        return x.softmax(dim=1)
    return x.sigmoid()
