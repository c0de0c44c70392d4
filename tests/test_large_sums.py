"""Region sums over millions of elements keep their digits on every backend.

A confident model makes the loss small, so a relative error of the sums shows many times
over in the loss. The torch backend summed one value after another in float32 in three places
(a BLAS dot for the batch-pooled binary intersection, ``scatter_add_`` for the multiclass
intersection and kept-pixel counts, ``einsum`` for the multiclass prediction sum with
``ignore_index``): at 4 Mi binary elements the Dice loss was 3 % off, at (4, 3, 2**18)
multiclass 60 %. The reference (``torch.sum``, pairwise) and the kernels (blocked sums in
float64) are exact to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

import dynloss.functional as F

from ._backends import FUSED


def _confident(shape: tuple[int, ...], mode: str, ignore_index: int | None):
    gen = torch.Generator().manual_seed(0)
    if mode == "binary":
        target = torch.rand(shape, generator=gen) > 0.9
        logits = torch.where(target, 8.0, -8.0) + 0.5 * torch.randn(shape, generator=gen)
        return logits, target.float()
    n, c, m = shape
    labels = torch.randint(0, c, (n, m), generator=gen)
    onehot = torch.nn.functional.one_hot(labels, c).permute(0, 2, 1).float()
    logits = 8.0 * onehot + 0.5 * torch.randn(shape, generator=gen)
    if ignore_index is not None:
        labels[:, ::7] = ignore_index
    return logits, labels


CASES = [
    ((1, 1, 2**22), "binary", None),
    ((2, 3, 2**18), "multiclass", None),
    ((4, 3, 2**18), "multiclass", 255),
]


@pytest.mark.parametrize("backend", [b for b in FUSED if b != "triton"])
@pytest.mark.parametrize(("shape", "mode", "ignore_index"), CASES)
def test_large_region_sums_match_float64(backend, shape, mode, ignore_index):
    logits, target = _confident(shape, mode, ignore_index)
    exact_input = logits.double().requires_grad_()
    exact = F.dice_loss(exact_input, target, mode=mode, ignore_index=ignore_index,
                        backend="reference")
    exact.backward()
    x = logits.clone().requires_grad_()
    got = F.dice_loss(x, target, mode=mode, ignore_index=ignore_index, backend=backend)
    got.backward()
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=0)
    scale = exact_input.grad.abs().max()
    assert (x.grad.double() - exact_input.grad).abs().max() <= 1e-4 * scale


@pytest.mark.skipif("triton" not in FUSED, reason="Triton cannot run in this process")
@pytest.mark.parametrize("name", ["dice", "bce"])
def test_triton_is_not_chosen_for_more_rows_than_its_int32_offsets_reach(name):
    """The kernels' partial sums are addressed with int32 offsets (``row * 3`` and the like),
    which wrap from N x C = 357,913,942 rows on (a tiny spatial size, e.g. per-voxel
    classification): a named Triton backend hands such a call on, saying why. An expanded
    view has that many rows in 4 bytes; dispatch decides without running anything."""
    import warnings

    import dynloss
    from dynloss.kernels import dispatch

    dispatch.clear_cache()
    rows = dynloss.kernels.triton.MAX_ROWS + 1
    x = torch.zeros(1, 1, 1).expand(rows, 1, 1)
    need = dispatch.Need("region" if name == "dice" else "distribution")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = dispatch.select("triton", x, need, classes=1)
    assert chosen.name == "torch"
    assert [str(w.message) for w in caught] == [
        f"dynloss: backend='triton' cannot compute more than {rows - 1} rows (N x C); "
        "using the 'torch' backend for such calls"]
    assert dispatch.select("triton", x[:-1], need, classes=1).name == "triton"
    # The rows are N x C: C classes of a batch within the limit still exceed it.
    classes = 4
    batch = torch.zeros(1, 1, 1).expand(rows // classes + 1, classes, 1)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert dispatch.select("triton", batch, need, classes=classes).name == "torch"
    fits = torch.zeros(1, 1, 1).expand((rows - 1) // classes, classes, 1)
    assert dispatch.select("triton", fits, need, classes=classes).name == "triton"
