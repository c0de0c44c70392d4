"""Hypothesis strategies: shapes and seeded tensors (drawing a seed keeps examples small)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

spatial_shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@st.composite
def cases(draw, mode="binary", min_classes=1, max_classes=4, scale=(0.1, 30.0), soft=False,
          every_class=False, dtype=torch.float32):
    """``(logits, target)`` in ``mode``; hard targets unless ``soft``."""
    n = draw(st.integers(1, 4))
    spatial = draw(spatial_shapes)
    seed = draw(st.integers(0, 2**31 - 1))
    s = draw(st.floats(*scale))
    gen = torch.Generator().manual_seed(seed)
    if mode == "binary":
        c = 1
    else:
        c = draw(st.integers(max(2, min_classes), max_classes))
    logits = (torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64) * s).to(dtype)
    if mode == "multiclass":
        target = torch.randint(0, c, (n, *spatial), generator=gen)
        if every_class:
            flat = target.view(-1)
            if flat.numel() < c:
                # too few pixels to hold every class: enlarge the batch along the last dim
                return draw(cases(mode, min_classes, max_classes, scale, soft, every_class, dtype))
            flat[torch.randperm(flat.numel(), generator=gen)[:c]] = torch.arange(c)
        return logits, target
    if soft:
        target = torch.rand((n, c, *spatial), generator=gen, dtype=torch.float64).to(dtype)
    else:
        p = draw(st.floats(0.05, 0.95))
        target = (torch.rand((n, c, *spatial), generator=gen) < p).to(dtype)
        if every_class:
            # at least one positive per channel in the batch
            target.view(n, c, -1)[0, :, 0] = 1
    return logits, target
