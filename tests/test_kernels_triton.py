"""Triton kernels against the reference implementation: values and gradients.

Where a CUDA GPU is present the tests run on it (compiled kernels). Without one they run on
the CPU in Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before
Triton is first imported:

* if nothing has imported Triton yet when this module is collected, the module sets
  ``TRITON_INTERPRET=1`` itself and the tests run in this process;
* if Triton was already imported without it (e.g. by smp or MONAI in an earlier test module),
  the tests here are skipped in-process and :func:`test_interpreter_subprocess` runs this file
  again in a fresh interpreter-mode process, so the suite still covers every kernel.

CI may equally export ``TRITON_INTERPRET=1`` for the whole run. Shapes are tiny: the
interpreter executes each program in numpy.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dynloss.functional as F  # noqa: E402
from dynloss.functional.distribution import topk_count  # noqa: E402
from dynloss.kernels import (  # noqa: E402
    interpreter_active,
    native_available,
    region_pixel_loss,
    resolve_backend,
    triton_available,
)

from ._kernel_cases import kernel_inputs, run_loss  # noqa: E402

_SUBPROCESS_FLAG = "DYNLOSS_KERNEL_TESTS_SUBPROCESS"

if not triton_available():
    DEVICES: list[str] = []
    _SKIP = "triton is not installed"
elif interpreter_active():
    DEVICES = ["cpu"]
    _SKIP = ""
elif _CUDA:
    DEVICES = ["cuda"]
    _SKIP = ""
else:
    DEVICES = []
    _SKIP = "triton was imported before TRITON_INTERPRET=1; covered by test_interpreter_subprocess"

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

REGION = {"dice": F.dice_loss, "iou": F.iou_loss, "tversky": F.tversky_loss}
PIXEL = {"bce": F.bce_loss, "focal": F.focal_loss, "topk": F.topk_loss}
LOW_PRECISION = (torch.float16, torch.bfloat16)


@pytest.fixture(params=DEVICES or [pytest.param("none", marks=pytest.mark.skip(reason=_SKIP))])
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _fresh_geometry():
    """Tests patch tile sizes and program counts: the cached launch geometry follows."""
    if not DEVICES:
        yield
        return
    from dynloss.kernels.triton import stream, topk

    stream.geometry.cache_clear()
    topk.topk_geometry.cache_clear()
    yield
    stream.geometry.cache_clear()
    topk.topk_geometry.cache_clear()


_inputs = kernel_inputs
_run = run_loss


def _compare(fn, x, t, device: str, *, dtype=torch.float32, rtol: float | None = None, **kw):
    """The Triton path on ``device`` equals the reference (values and gradients)."""
    x = x.to(device=device, dtype=dtype)
    t = t.to(device)
    want, want_grad = _run(fn, x, t, "reference", **kw)
    got, got_grad = _run(fn, x, t, "triton", ran=True, **kw)
    assert got.dtype == want.dtype and got_grad.dtype == x.dtype
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    low = dtype in LOW_PRECISION
    vtol = rtol if rtol is not None else (1e-4 if low else 2e-5)
    torch.testing.assert_close(got, want, rtol=vtol, atol=1e-6)
    scale = want_grad.float().abs().max().item() + 1e-12
    gtol = 2e-2 if low else 1e-4
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=gtol, atol=gtol * scale)
    return got, got_grad


# ------------------------------------------------------------------------------ region losses


@pytest.mark.parametrize("name", sorted(REGION))
@pytest.mark.parametrize("mode", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)], ids=["2d", "3d"])
def test_region_losses(device, name, mode, spatial):
    x, t = _inputs(mode, spatial, seed=len(name) + len(mode))
    _compare(REGION[name], x, t, device, mode=mode)


@pytest.mark.parametrize("name", sorted(REGION))
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_region_per_image_smooth_probabilities(device, name, mode):
    x, t = _inputs(mode, (4, 6), seed=3)
    _compare(REGION[name], x, t, device, mode=mode, per_image=True, smooth=0.5)
    p = torch.softmax(x, 1) if mode == "multiclass" else torch.sigmoid(x)
    _compare(REGION[name], p, t, device, mode=mode, from_logits=False)


@pytest.mark.parametrize("mode", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("name", sorted(REGION))
def test_region_ignore_index(device, name, mode):
    x, t = _inputs(mode, (6, 5), seed=5)
    t = t.long()
    t[0, ..., :2] = 255
    if mode != "multiclass":
        t = t.to(torch.uint8)
    _compare(REGION[name], x, t, device, mode=mode, ignore_index=255)


# ------------------------------------------------------------------------------- pixel losses


@pytest.mark.parametrize("name", sorted(PIXEL))
@pytest.mark.parametrize("mode", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)], ids=["2d", "3d"])
def test_pixel_losses(device, name, mode, spatial):
    x, t = _inputs(mode, spatial, seed=len(name) * 7 + len(mode))
    _compare(PIXEL[name], x, t, device, mode=mode)


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("name", sorted(PIXEL))
def test_pixel_ignore_index(device, name, mode):
    x, t = _inputs(mode, (6, 5), seed=11)
    t = t.long()
    t[1, ..., 1:4] = -100
    t[0, ..., 0, :] = -100
    _compare(PIXEL[name], x, t, device, mode=mode, ignore_index=-100)


def test_pixel_everything_ignored(device):
    x, t = _inputs("binary", (3, 3))
    t = torch.full_like(t, 7.0)
    for fn in (F.bce_loss, F.focal_loss):
        got, grad = _compare(fn, x, t, device, ignore_index=7)
        assert got.item() == 0.0 and grad.abs().max().item() == 0.0
    # TopK keeps n = 0 elements: loss 0 (sum 0 over a count of 1), no gradient
    got, grad = _run(F.topk_loss, x.to(device), t.to(device), "triton", ignore_index=7)
    assert got.item() == 0.0 and grad.abs().max().item() == 0.0


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.0])
def test_focal_gamma_alpha(device, mode, gamma):
    x, t = _inputs(mode, (5, 6), seed=int(gamma * 10))
    alpha = 0.25 if mode == "binary" else [0.2, 1.0, 0.5]
    _compare(F.focal_loss, x, t, device, mode=mode, gamma=gamma)
    _compare(F.focal_loss, x, t, device, mode=mode, gamma=gamma, alpha=alpha)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize(("mode", "pos_weight"), [
    ("binary", 3.0), ("multilabel", 0.5), ("multilabel", [2.0, 0.25, 4.0]),
], ids=["binary", "multilabel-one", "multilabel-per-channel"])
def test_bce_pos_weight(device, mode, pos_weight, from_logits, dtype):
    """BCE's ``pos_weight`` (one, or one per channel) in the kernels, on hard and soft targets,
    with ignored elements and both reductions."""
    x, t = _inputs(mode, (5, 7), seed=29)
    if not from_logits:
        x = torch.sigmoid(x).clamp(1e-4, 1 - 1e-4)
    soft = torch.rand(t.shape, generator=torch.Generator().manual_seed(3))
    kw = dict(mode=mode, pos_weight=pos_weight, from_logits=from_logits)
    _compare(F.bce_loss, x, t, device, dtype=dtype, **kw)
    _compare(F.bce_loss, x, soft, device, dtype=dtype, **kw)
    ignored = t.clone()
    ignored[0, ..., 1:3, :] = 7.0
    for reduction in ("mean", "sum"):
        _compare(F.bce_loss, x, ignored, device, dtype=dtype, ignore_index=7,
                 reduction=reduction, rtol=5e-5, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("ignore_index", [None, 1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_class_weight(device, reduction, ignore_index, from_logits, dtype):
    """The multiclass cross-entropy's class ``weight``: the mean divides by the kept pixels'
    weights, as ``CrossEntropyLoss(weight=...)``."""
    x, t = _inputs("multiclass", (5, 7), seed=31)
    if not from_logits:
        x = torch.softmax(x, 1).clamp(1e-4, 1 - 1e-4)
    _compare(F.bce_loss, x, t, device, dtype=dtype, mode="multiclass", weight=[0.2, 1.5, 3.0],
             ignore_index=ignore_index, reduction=reduction, from_logits=from_logits,
             rtol=5e-5)


def test_bce_class_weight_of_nothing_kept_is_zero(device):
    """Every kept pixel of a class of weight 0: a loss of 0 and no gradient (not 0/0)."""
    x, t = _inputs("multiclass", (3, 3), seed=37)
    t = torch.zeros_like(t)
    got, grad = _compare(F.bce_loss, x, t, device, mode="multiclass", weight=[0.0, 1.0, 1.0])
    assert got.item() == 0.0 and grad.abs().max().item() == 0.0


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("name", ["bce", "focal", "topk"])
def test_pixel_probabilities(device, mode, name):
    x, t = _inputs(mode, (4, 5), seed=13)
    p = torch.softmax(x, 1) if mode == "multiclass" else torch.sigmoid(x)
    p = p.clamp(1e-4, 1 - 1e-4)
    _compare(PIXEL[name], p, t, device, mode=mode, from_logits=False)


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_probabilities_at_zero_and_one(device, mode):
    """Clamped logs (log 0 = -100): finite values, the reference's zero slope where clamped."""
    x, t = _inputs(mode, (4, 5), seed=14)
    if mode == "multiclass":
        p = torch.softmax(x, 1)
        p[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
        p[1, :, 1, 1] = torch.tensor([0.0, 1.0, 0.0])
    else:
        p = torch.sigmoid(x)
        p[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.0])
        p[1, 0, 1, :2] = torch.tensor([1.0, 0.0])
    for name in ("bce", "focal", "dice"):
        fn = REGION.get(name) or PIXEL[name]
        _compare(fn, p, t, device, mode=mode, from_logits=False)


def test_soft_labels_extreme_logits(device):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 4, 4, generator=gen) * 40
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 1e4, -1e4
    t = torch.rand(2, 2, 4, 4, generator=gen)
    for fn in (F.dice_loss, F.bce_loss, F.focal_loss, F.topk_loss):
        _compare(fn, x, t, device, mode="multilabel")


# ---------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("tdtype", [torch.float32, torch.float16, torch.uint8, torch.bool,
                                    torch.int64])
@pytest.mark.parametrize("name", ["dice", "bce", "topk"])
def test_binary_target_dtypes(device, tdtype, name):
    x, t = _inputs("binary", (5, 6), seed=17)
    fn = REGION.get(name) or PIXEL[name]
    _compare(fn, x, t.to(tdtype), device)


@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("name", ["dice", "focal", "topk"])
def test_multiclass_target_dtypes(device, tdtype, name):
    x, t = _inputs("multiclass", (5, 6), c=5, seed=19)
    fn = REGION.get(name) or PIXEL[name]
    _compare(fn, x, t.to(tdtype), device, mode="multiclass")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("name", ["dice", "tversky", "bce", "focal", "topk"])
def test_low_precision_inputs(device, dtype, mode, name):
    x, t = _inputs(mode, (6, 7), seed=23)
    fn = REGION.get(name) or PIXEL[name]
    _compare(fn, x, t, device, dtype=dtype, mode=mode)


def test_float64_falls_back_to_torch(device):
    x, _t = _inputs("binary", (3, 3))
    assert resolve_backend(x.double().to(device), "triton") == "torch"
    assert resolve_backend(x.to(device), "triton") == "triton"
    for dtype in LOW_PRECISION:  # computed by the kernels (in float32), not handed on
        assert resolve_backend(x.to(device, dtype), "triton") == "triton"


# ---------------------------------------------------------------------------- topk selection


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("k", [0.05, 0.3, 0.6, 0.7, 1.0])
def test_topk_fractions(device, mode, k):
    x, t = _inputs(mode, (5, 8), seed=int(k * 100))
    _compare(F.topk_loss, x, t, device, mode=mode, k=k)


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_topk_ties_take_lowest_flat_index(device, mode, monkeypatch):
    """All losses equal: the selection is the first n elements in flat order, across blocks."""
    from dynloss.kernels.triton import stream as triton_region
    from dynloss.kernels.triton import topk as triton_pixel

    monkeypatch.setattr(triton_pixel, "BLOCK_TOPK", 16)
    monkeypatch.setattr(triton_region, "TILE_MULTICLASS", 64)  # 4 classes -> 16 pixels
    if mode == "binary":
        x, t = torch.full((2, 1, 7, 9), 1.5), torch.ones(2, 1, 7, 9)
    else:
        x, t = torch.zeros(2, 3, 7, 9), torch.ones(2, 7, 9, dtype=torch.long)
        x[:, 1] = 2.0
    for k in (0.1, 0.37, 0.5):
        _got, grad = _compare(F.topk_loss, x, t, device, mode=mode, k=k)
        flat = grad.abs().sum(1).reshape(-1) if mode == "multiclass" else grad.reshape(-1)
        n = topk_count(k, flat.numel())
        selected = flat.abs() > 0
        assert selected.sum().item() == n
        assert selected[:n].all() and not selected[n:].any()
        # matches the torch backend exactly in which elements get gradient
        _, torch_grad = _run(F.topk_loss, x.to(device), t.to(device), "torch", mode=mode, k=k)
        assert torch.equal(grad != 0, torch_grad != 0)


def test_topk_partial_ties_with_ignore(device, monkeypatch):
    from dynloss.kernels.triton import topk as triton_pixel

    monkeypatch.setattr(triton_pixel, "BLOCK_TOPK", 16)
    gen = torch.Generator().manual_seed(29)
    # many equal losses; no logit exactly 0, where the reference's max(x, 0) and |x| pick a
    # different subgradient than the analytic sigmoid(x) - g
    x = torch.randint(-2, 3, (2, 1, 6, 10), generator=gen).float() + 0.5
    t = (torch.rand(2, 1, 6, 10, generator=gen) > 0.5).long()
    t[0, 0, 2] = 9
    for k in (0.15, 0.5, 0.83):
        _compare(F.topk_loss, x, t, device, k=k, ignore_index=9)


# ------------------------------------------------------------------------ fused composites


@pytest.mark.parametrize("region", ["dice", "iou", "tversky"])
@pytest.mark.parametrize("pixel", ["bce", "focal", "topk"])
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_fused_region_pixel(device, region, pixel, mode):
    x, t = _inputs(mode, (5, 6), seed=31)
    kw = dict(region=region, pixel=pixel, mode=mode, region_weight=0.7, pixel_weight=1.3)
    got, _grad = _compare(region_pixel_loss, x, t, device, **kw)
    # equals the sum of the single losses
    xd = x.to(device)
    td = t.to(device)
    a, b = {"dice": (0.5, 0.5), "iou": (1.0, 1.0), "tversky": (0.3, 0.7)}[region]
    single = 0.7 * F.tversky_loss(xd, td, a, b, mode=mode, backend="reference")
    single = single + 1.3 * PIXEL[pixel](xd, td, mode=mode, backend="reference")
    torch.testing.assert_close(got, single, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["binary", "multilabel", "multiclass"])
def test_fused_options(device, mode):
    x, t = _inputs(mode, (4, 3, 5), seed=37)
    t = t.long()
    t[0, ..., 0] = 255
    alpha = 0.25 if mode != "multiclass" else [0.5, 1.0, 2.0]
    _compare(region_pixel_loss, x, t, device, mode=mode, pixel="focal", gamma=1.5,
             focal_alpha=alpha, ignore_index=255, per_image=True, smooth=1.0)
    _compare(region_pixel_loss, x, t, device, mode=mode, pixel="bce", region="iou",
             dtype=torch.bfloat16, ignore_index=255)
    total, r, p = region_pixel_loss(x.to(device), t.to(device), mode=mode, backend="triton",
                                    ignore_index=255, return_terms=True)
    torch.testing.assert_close(total, r + p)


# ------------------------------------------------------------------- tiling and many programs


def test_multi_tile_programs(device, monkeypatch):
    """Chunks of several tiles per program (the loop inside the streaming kernels)."""
    from dynloss.kernels.triton import stream as triton_region
    from dynloss.kernels.triton import topk as triton_pixel

    monkeypatch.setattr(triton_region, "TARGET_PROGRAMS", 1)
    monkeypatch.setattr(triton_region, "BLOCK_BINARY", 64)
    monkeypatch.setattr(triton_region, "TILE_MULTICLASS", 64)
    monkeypatch.setattr(triton_pixel, "TOPK_PROGRAMS", 3)
    monkeypatch.setattr(triton_pixel, "BLOCK_TOPK", 32)
    for mode in ("binary", "multiclass"):
        x, t = _inputs(mode, (13, 17), seed=41)
        assert triton_region.geometry(*x.reshape(2, x.shape[1], -1).shape,
                                      mode == "multiclass").chunk > 64
        for fn in (F.dice_loss, F.focal_loss, F.topk_loss):
            _compare(fn, x, t, device, mode=mode)
        _compare(F.tversky_loss, x, t, device, mode=mode, per_image=True)
        _compare(region_pixel_loss, x, t, device, mode=mode)


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_topk_ties_across_tiles_and_programs(device, mode, monkeypatch):
    """Ties spread over several tiles of several programs: the rank carried from tile to tile
    and the tie offsets of the earlier programs select the lowest flat indices."""
    from dynloss.kernels.triton import stream as triton_region
    from dynloss.kernels.triton import topk as triton_pixel

    monkeypatch.setattr(triton_pixel, "BLOCK_TOPK", 16)
    monkeypatch.setattr(triton_pixel, "TOPK_PROGRAMS", 3)
    monkeypatch.setattr(triton_region, "TILE_MULTICLASS", 64)
    if mode == "binary":
        x, t = torch.full((2, 1, 7, 9), 1.5), torch.ones(2, 1, 7, 9)
        x[1, 0, 3, 4] = 3.0  # one loss below the ties (a positive logit, target 1)
    else:
        x, t = torch.zeros(2, 3, 7, 9), torch.ones(2, 7, 9, dtype=torch.long)
        x[:, 1] = 2.0
        x[0, 1, 2, 2] = -1.0  # one loss above the ties
    for k in (0.2, 0.45, 0.9):
        _got, grad = _compare(F.topk_loss, x, t, device, mode=mode, k=k)
        _, torch_grad = _run(F.topk_loss, x.to(device), t.to(device), "torch", mode=mode, k=k)
        assert torch.equal(grad != 0, torch_grad != 0)


def test_int64_offsets(device, monkeypatch):
    """The int64-offset variants (tensors of 2^31 elements and more) compute the same."""
    from dynloss.kernels.triton import stream as triton_region

    monkeypatch.setattr(triton_region, "INDEX_64_FROM", 0)
    for mode in ("binary", "multiclass"):
        x, t = _inputs(mode, (5, 7), seed=42)
        for fn in (F.dice_loss, F.bce_loss):
            _compare(fn, x, t, device, mode=mode)
        _compare(region_pixel_loss, x, t, device, mode=mode, pixel="focal")


@pytest.mark.parametrize("mode", ["multilabel", "multiclass"])
def test_epilogue_reads_partials_in_several_tiles(device, mode, monkeypatch):
    """Small epilogue tiles and a low cap on multiclass partials: the one-program epilogue
    loops over partial rows (pooled and per image)."""
    from dynloss.kernels.triton import stream as triton_region

    monkeypatch.setattr(triton_region, "EPILOGUE_TILE", 16)
    monkeypatch.setattr(triton_region, "MAX_PARTIALS", 64)
    monkeypatch.setattr(triton_region, "BLOCK_BINARY", 16)
    monkeypatch.setattr(triton_region, "TILE_MULTICLASS", 64)
    x, t = _inputs(mode, (9, 8), n=3, c=5, seed=43)
    for per_image in (False, True):
        _compare(F.dice_loss, x, t, device, mode=mode, per_image=per_image)
    _compare(region_pixel_loss, x, t, device, mode=mode, pixel="focal")


# -------------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("mode", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_region_reductions(device, mode, per_image, reduction):
    """``reduction="none"``/``"sum"`` in the epilogue; a non-uniform upstream gradient."""
    x, t = _inputs(mode, (5, 6), seed=47)
    kw = dict(mode=mode, per_image=per_image, reduction=reduction)
    got, _ = _compare(F.tversky_loss, x, t, device, **kw)
    assert got.shape == F.tversky_loss(x, t, **kw, backend="reference").shape
    if reduction == "none":
        weight = torch.linspace(-1.0, 2.0, got.numel()).reshape(got.shape).to(device)
        grads = []
        for backend in ("triton", "reference"):
            xg = x.to(device).clone().requires_grad_(True)
            value = F.tversky_loss(xg, t.to(device), backend=backend, **kw)
            grads.append(torch.autograd.grad(value, xg, weight)[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4,
                                   atol=1e-6 * grads[1].abs().max().item())


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("name", ["bce", "focal", "topk"])
def test_distribution_sum(device, mode, name):
    x, t = _inputs(mode, (5, 6), seed=53)
    _compare(PIXEL[name], x, t, device, mode=mode, reduction="sum", rtol=5e-5)


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_composite_terms_get_their_own_gradients(device, mode):
    """Each output of the fused composite carries its own gradient (the others None)."""
    x, t = _inputs(mode, (5, 6), seed=59)
    xd, td = x.to(device), t.to(device)
    kw = dict(mode=mode, pixel="focal", region="tversky", region_weight=0.7, pixel_weight=1.3,
              return_terms=True)
    grads = {}
    for backend in ("triton", "reference"):
        xg = xd.clone().requires_grad_(True)
        total, region, pixel = region_pixel_loss(xg, td, backend=backend, **kw)
        grads[backend] = [
            torch.autograd.grad(out, xg, retain_graph=True)[0]
            for out in (total, region, pixel, 2.0 * region - pixel + 0.5 * total)
        ]
    for got, want in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("name", ["dice", "focal", "topk", "composite"])
def test_create_graph_is_differentiable(device, name):
    """``create_graph=True``: the gradient is itself differentiable (recomputed through the
    reference), so Hessian-vector products match the reference's."""
    x, t = _inputs("multiclass", (4, 5), seed=61)
    xd, td = x.to(device), t.to(device)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    fn = {"dice": F.dice_loss, "focal": F.focal_loss, "topk": F.topk_loss,
          "composite": region_pixel_loss}[name]
    hvps = []
    for backend in ("triton", "reference"):
        xg = xd.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(xg, td, mode="multiclass", backend=backend), xg,
                                      create_graph=True)
        hvps.append(torch.autograd.grad((grad * v).sum(), xg)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-4,
                               atol=1e-6 * hvps[1].abs().max().item())


@pytest.mark.parametrize("shape", [(0, 1, 4, 4), (2, 1, 0, 4), (0, 3, 5)])
def test_empty_inputs_match_the_reference(device, shape):
    mode = "multiclass" if len(shape) == 3 else "binary"
    x = torch.zeros(shape, device=device)
    t = (torch.zeros((shape[0], *shape[2:]), dtype=torch.long) if mode == "multiclass"
         else torch.zeros(shape)).to(device)
    for fn in (F.dice_loss, F.bce_loss, F.topk_loss, region_pixel_loss):
        want = fn(x, t, mode=mode, backend="reference")
        got = fn(x, t, mode=mode, backend="triton")
        torch.testing.assert_close(got, want, equal_nan=True)


# ----------------------------------------------------------------------- invalid values -> NaN

NAN_CASES = {
    "dice": (F.dice_loss, {}),
    "tversky-per-image": (F.tversky_loss, {"per_image": True}),
    "iou-none": (F.iou_loss, {"reduction": "none"}),
    "bce": (F.bce_loss, {}),
    "focal": (F.focal_loss, {"gamma": 2.0}),
    "topk": (F.topk_loss, {"k": 0.3}),
    "composite": (region_pixel_loss, {"pixel": "focal"}),
}


def _nan_run(name, x, t, device, backend, **kw):
    fn, extra = NAN_CASES[name]
    return _run(fn, x.to(device), t.to(device), backend, **extra, **kw)


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(NAN_CASES))
def test_non_finite_kept_input_gives_nan(device, mode, value, name):
    """A NaN or infinite logit in a kept element: the loss is NaN and so is the gradient of
    every element that the loss depends on (every kept one; TopK: every selected one), as in
    the reference (the loss times a NaN factor), with or without value checks. In an ignored
    element it changes nothing, and that element gets a zero gradient (the reference's
    autograd leaks ``0 * sigmoid'(NaN) = NaN`` there)."""
    x, t = _inputs(mode, (4, 5), seed=67)
    x[1, 0, 2, 3] = value
    for check in (None, False):
        got, grad = _nan_run(name, x, t, device, "triton", mode=mode, check_values=check)
        want, want_grad = _nan_run(name, x, t, device, "reference", mode=mode,
                                   check_values=check)
        assert torch.isnan(want).all() and torch.isnan(got).all()
        assert torch.isnan(grad).any()
        assert torch.equal(torch.isnan(grad), torch.isnan(want_grad))
        torch.testing.assert_close(grad.nan_to_num(), want_grad.nan_to_num())
    t = t.long()
    t[1, ..., 2, 3] = 255
    got, grad = _nan_run(name, x, t, device, "triton", mode=mode, ignore_index=255)
    want, want_grad = _nan_run(name, x, t, device, "reference", mode=mode, ignore_index=255)
    assert torch.isfinite(got).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    assert (grad[1, :, 2, 3] == 0).all()
    want_grad[1, :, 2, 3] = 0.0
    torch.testing.assert_close(grad, want_grad, rtol=1e-4,
                               atol=1e-4 * want_grad.abs().max().item())


@pytest.mark.parametrize("bad", [2.0, -0.5, float("nan")], ids=["2", "-0.5", "nan"])
@pytest.mark.parametrize("name", sorted(NAN_CASES))
def test_invalid_binary_target(device, bad, name):
    """A binary target outside [0, 1]: NaN loss and gradient without value checks (no host
    read), a ValueError with them."""
    x, t = _inputs("binary", (4, 5), seed=71)
    t[0, 0, 1, 1] = bad
    got, grad = _nan_run(name, x, t, device, "triton", check_values=False)
    want, want_grad = _nan_run(name, x, t, device, "reference", check_values=False)
    assert torch.isnan(want).all() and torch.isnan(got).all() and torch.isnan(grad).any()
    assert torch.equal(torch.isnan(grad), torch.isnan(want_grad))
    with pytest.raises(ValueError, match="target values must lie in"):
        _nan_run(name, x, t, device, "triton", check_values=True)


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("name", ["dice", "bce", "topk", "composite"])
def test_probabilities_outside_unit_interval(device, mode, name):
    x, t = _inputs(mode, (4, 5), seed=73)
    p = torch.softmax(x, 1) if mode == "multiclass" else torch.sigmoid(x)
    p[0, 0, 1, 2] = 1.5
    got, grad = _nan_run(name, p, t, device, "triton", mode=mode, from_logits=False,
                         check_values=False)
    want, want_grad = _nan_run(name, p, t, device, "reference", mode=mode, from_logits=False,
                               check_values=False)
    assert torch.isnan(got).all() and torch.isnan(want).all() and torch.isnan(grad).any()
    assert torch.equal(torch.isnan(grad), torch.isnan(want_grad))
    with pytest.raises(ValueError, match="probabilities in"):
        _nan_run(name, p, t, device, "triton", mode=mode, from_logits=False,
                 check_values=True)


@pytest.mark.parametrize("name", sorted(NAN_CASES))
def test_invalid_class_index_counted_in_kernel(device, name):
    """A multiclass label outside ``[0, C)`` that no host check read (as on CUDA): the loss is
    NaN, the gradient NaN, and no table or class row is read at that label (the per-class
    alpha is given). Called below the dispatch, which checks CPU labels on the host."""
    from dynloss._params import composite_params, distribution_params, region_params
    from dynloss.kernels.triton import stream, topk

    x, t = _inputs("multiclass", (4, 5), seed=79)
    x3 = x.reshape(2, 3, -1).to(device).requires_grad_(True)
    t3 = t.reshape(2, -1).clone()
    t3[0, 3], t3[1, 7] = 3, -1
    t3 = t3.to(device)
    common = dict(mode="multiclass", ignore_index=255)
    focal = distribution_params(gamma=2.0, alpha=(0.5, 1.0, 2.0), **common)
    if name == "topk":
        out = topk.TritonTopK.apply(x3, t3, distribution_params(k=0.3, **common), False)
    elif name == "composite":
        params = composite_params(region_params(alpha=0.5, beta=0.5, **common), focal)
        out = stream.TritonFusedLoss.apply(x3, t3, "multiclass", params, False)[0]
    elif name in ("bce", "focal"):
        out = stream.TritonFusedLoss.apply(x3, t3, "multiclass", focal, False)
    else:
        _fn, extra = NAN_CASES[name]
        a, b = {"dice": (0.5, 0.5), "iou-none": (1.0, 1.0)}.get(name, (0.3, 0.7))
        params = region_params(alpha=a, beta=b, **extra, **common)
        out = stream.TritonFusedLoss.apply(x3, t3, "multiclass", params, False)
    (grad,) = torch.autograd.grad(out.sum(), x3)
    assert torch.isnan(out).all() and torch.isnan(grad).any()


def test_non_contiguous_input(device):
    x, t = _inputs("multilabel", (6, 5), seed=43)
    xt = x.transpose(2, 3)
    tt = t.transpose(2, 3)
    for fn in (F.dice_loss, F.bce_loss, F.topk_loss):
        _compare(fn, xt, tt, device, mode="multilabel")


# ---------------------------------------------------------------------------------- dispatch


def test_auto_uses_triton_only_on_cuda(device):
    x = torch.zeros(1, 1, 2, 2, device=device)
    cpu_auto = "native" if native_available() else "torch"  # CPU: never the interpreter
    expected = "triton" if device == "cuda" else cpu_auto
    assert resolve_backend(x, "auto") == expected
    assert resolve_backend(x, "torch") == "torch"


@pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")
def test_no_host_sync_on_cuda(device):
    x, t = _inputs("binary", (64, 64), seed=47)
    x = x.cuda().requires_grad_(True)
    t = t.cuda()
    xm, tm = _inputs("multiclass", (32, 32), seed=47)
    xm = xm.cuda().requires_grad_(True)
    tm = tm.cuda()
    for fn in (*REGION.values(), *PIXEL.values()):  # warm up (compilation may sync)
        fn(x, t, backend="triton").backward()
        fn(xm, tm, mode="multiclass", backend="triton", ignore_index=2).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for fn in (*REGION.values(), *PIXEL.values()):
            fn(x, t, backend="triton", check_values=False).backward()
            fn(xm, tm, mode="multiclass", backend="triton", ignore_index=2,
               check_values=False).backward()
        region_pixel_loss(x, t, pixel="focal", backend="triton", check_values=False).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_triton_backend_refused_on_plain_cpu():
    """Without the interpreter a CPU tensor cannot take backend='triton' (clear ValueError)."""
    code = (
        "import os, sys, torch\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "import dynloss, dynloss.functional as F\n"
        "assert 'triton' not in sys.modules, 'import dynloss imported triton'\n"
        "x = torch.zeros(1, 1, 2, 2); t = torch.ones(1, 1, 2, 2)\n"
        "F.dice_loss(x, t)\n"
        "assert 'triton' not in sys.modules, 'the CPU auto path imported triton'\n"
        "try:\n"
        "    F.dice_loss(x, t, backend='triton')\n"
        "except ValueError as e:\n"
        "    assert 'TRITON_INTERPRET' in str(e) or 'Triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ValueError')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(bool(DEVICES) or not triton_available() or _CUDA
                    or os.environ.get(_SUBPROCESS_FLAG) == "1",
                    reason="the kernel tests already run in this process")
def test_interpreter_subprocess():
    """Triton was imported without the interpreter here: run this file in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{_SUBPROCESS_FLAG: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_ddp_pool_sums_path(device, mode):
    """``ddp_pool=True`` takes the raw sums (outside a process group pooling is a no-op)."""
    x, t = _inputs(mode, (5, 6), seed=83)
    _compare(F.dice_loss, x, t, device, mode=mode, ddp_pool=True)
    _compare(F.tversky_loss, x, t, device, mode=mode, ddp_pool=True, ignore_index=1)
    x[0, 0, 0, 0] = float("nan")
    got, grad = _run(F.dice_loss, x.to(device), t.to(device), "triton", mode=mode,
                     ddp_pool=True)
    assert torch.isnan(got).all() and torch.isnan(grad).any()


def test_ddp_pool_sums_path_without_value_checks_poisons_an_invalid_target(device):
    """``check_values=False`` on the ``ddp_pool`` path: a binary target of 2 makes the loss NaN
    on Triton as on the reference (a mutant that poisoned only when checked gave a finite
    value; mutation review)."""
    x, t = _inputs("binary", (5, 6), seed=84)
    t[0, 0, 0, 0] = 2.0
    for backend in ("reference", "triton"):
        got, _ = _run(F.dice_loss, x.to(device), t.to(device), backend,
                      ran=backend == "triton", ddp_pool=True, check_values=False)
        assert torch.isnan(got), backend


if DEVICES:  # a jitted function resolves the names it calls among its module's globals
    import triton
    import triton.language as tl

    from dynloss.kernels.triton.topk import topk_count_of

    @triton.jit
    def _count_kernel(kept_ptr, out_ptr, k_hi, k_mid, k_lo):
        """Stores ``topk_count_of`` of each kept count."""
        i = tl.program_id(0)
        tl.store(out_ptr + i, topk_count_of(tl.load(kept_ptr + i), k_hi, k_mid, k_lo))


@pytest.mark.parametrize("k", [0.3, 0.6, 0.7, 0.05, 0.07, 0.123456789, 1.0])
def test_the_in_kernel_topk_count_equals_the_hosts(device, k):
    """With ignore_index the kernels count the kept elements themselves: their count rounded
    ``v * 1e9`` (beyond float64's exact integers) and kept one element too many at
    15_448_544_170 kept elements (k = 0.3). Found by a review of the Triton kernels."""
    from dynloss.kernels.triton import topk

    # (100 at k = 0.07: 7.000000000000001 in float64, which the rounding to 9 digits makes 7)
    kept = [0, 1, 7, 10, 100, 1001, 9_999_999, 9_697_018_125, 15_448_544_170, 2**40 + 3]
    values = torch.tensor(kept, dtype=torch.int64, device=device)
    out = torch.empty_like(values)
    _count_kernel[(len(kept),)](values, out, *topk.split_k(k))
    assert out.tolist() == [topk_count(k, n) for n in kept]


def test_a_triton_that_fails_to_import_is_not_called_missing():
    """Triton installed but failing at import (its interpreter needs numpy) was reported as
    "Triton is not installed"."""
    pytest.importorskip("triton")
    code = (
        "import os, sys\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "sys.modules['numpy'] = None\n"
        "import torch, dynloss.functional as F\n"
        "x = torch.zeros(1, 1, 2, 2); t = torch.ones(1, 1, 2, 2)\n"
        "try:\n"
        "    F.dice_loss(x, t, backend='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Triton is installed but could not be imported (" in proc.stdout, proc.stdout
    assert "numpy" in proc.stdout and "not installed" not in proc.stdout


def test_the_class_limit_is_inclusive(device):
    """The kernels take up to ``MAX_CLASSES`` classes, that many included (the bound was
    untested: with ``>=`` a 1024-class call fell back to the torch backend, warning)."""
    from dynloss.kernels.capabilities import Need
    from dynloss.kernels.dispatch import select
    from dynloss.kernels.triton import MAX_CLASSES

    need = Need("region", "multiclass")
    at = torch.zeros(1, MAX_CLASSES, 2, device=device)
    assert select("triton", at, need, False, MAX_CLASSES).name == "triton"
    over = torch.zeros(1, MAX_CLASSES + 1, 2, device=device)
    assert select("triton", over, need, False, MAX_CLASSES + 1).name != "triton"
