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


_inputs = kernel_inputs
_run = run_loss


def _compare(fn, x, t, device: str, *, dtype=torch.float32, rtol: float | None = None, **kw):
    """The Triton path on ``device`` equals the reference (values and gradients)."""
    x = x.to(device=device, dtype=dtype)
    t = t.to(device)
    want, want_grad = _run(fn, x, t, "reference", **kw)
    got, got_grad = _run(fn, x, t, "triton", **kw)
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

    monkeypatch.setattr(triton_region, "TARGET_PROGRAMS", 1)
    monkeypatch.setattr(triton_region, "BLOCK_BINARY", 64)
    monkeypatch.setattr(triton_region, "TILE_MULTICLASS", 64)
    for mode in ("binary", "multiclass"):
        x, t = _inputs(mode, (13, 17), seed=41)
        for fn in (F.dice_loss, F.focal_loss):
            _compare(fn, x, t, device, mode=mode)
        _compare(region_pixel_loss, x, t, device, mode=mode)


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
