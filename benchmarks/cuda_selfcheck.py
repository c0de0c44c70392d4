"""Triton path vs reference on the GPU without pytest (values, gradients, no host sync).

A compact, dependency-free companion of ``tests/test_kernels_triton.py`` for machines that
have torch and triton but no test tools. Prints one line per case and a summary; exits 1 if
any case fails.

Usage::

    PYTHONPATH=src python benchmarks/cuda_selfcheck.py [--device cuda]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import traceback

import torch

import dynloss.functional as F
from dynloss.functional.distribution import topk_count
from dynloss.kernels import region_pixel_loss, resolve_backend

LOSSES = {
    "dice": F.dice_loss, "iou": F.iou_loss, "tversky": F.tversky_loss,
    "bce": F.bce_loss, "focal": F.focal_loss, "topk": F.topk_loss,
}


def inputs(mode: str, shape: tuple[int, ...], dtype, tdtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype)
    if mode == "multiclass":
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    else:
        t = (torch.rand(shape, generator=gen) > 0.6).float()
    return x, t.to(device=device, dtype=tdtype)


def run(fn, x, t, backend, **kw):
    xg = x.detach().clone().requires_grad_(True)
    value = fn(xg, t, backend=backend, **kw)
    value.backward()
    return value.detach().float(), xg.grad.float()


def check(fn, x, t, **kw) -> str | None:
    want, want_grad = run(fn, x, t, "reference", **kw)
    got, got_grad = run(fn, x, t, "triton", **kw)
    low = x.dtype in (torch.float16, torch.bfloat16)
    vtol, gtol = (1e-4, 2e-2) if low else (2e-5, 1e-4)
    scale = want_grad.abs().max().item() + 1e-12
    dv = (got - want).abs().max().item()
    dg = (got_grad - want_grad).abs().max().item()
    if not (torch.isfinite(got).all() and torch.isfinite(got_grad).all()):
        return "non-finite"
    if dv > vtol * abs(want.item()) + 1e-6:
        return f"value {got.item()} vs reference {want.item()}"
    if dg > gtol * scale + 1e-7:
        return f"gradient max diff {dg:.3g} (scale {scale:.3g})"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    start = time.monotonic()
    failures, count = [], 0
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}; auto backend resolves to "
              f"{resolve_backend(torch.zeros(1, device=device), 'auto')}")

    def case(label: str, fn, x, t, **kw) -> None:
        nonlocal count
        count += 1
        try:
            err = check(fn, x, t, **kw)
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(("FAIL " if err else "ok   ") + label + (f": {err}" if err else ""), flush=True)
        if err:
            failures.append(label)

    modes = [("binary", (2, 1, 37, 41), torch.float32),
             ("multilabel", (2, 3, 9, 8, 7), torch.uint8),
             ("multiclass", (2, 5, 33, 31), torch.int64)]
    for (mode, shape, tdtype), dtype, name in itertools.product(
            modes, [torch.float32, torch.bfloat16, torch.float16], LOSSES):
        x, t = inputs(mode, shape, dtype, tdtype, device)
        case(f"{name} {mode} {tuple(shape)} x={dtype} t={tdtype}", LOSSES[name], x, t, mode=mode)
    for mode, shape, _ in modes:
        x, t = inputs(mode, shape, torch.float32, torch.int64, device, seed=1)
        t[0, ..., :3] = 255
        for name in LOSSES:
            case(f"{name} {mode} ignore_index=255", LOSSES[name], x, t, mode=mode,
                 ignore_index=255)
    for tdtype in (torch.bool, torch.int64, torch.float16):
        x, t = inputs("binary", (2, 1, 40, 40), torch.float32, tdtype, device, seed=2)
        for name in ("dice", "focal", "topk"):
            case(f"{name} binary t={tdtype}", LOSSES[name], x, t)
    for mode, shape, tdtype in modes:
        x, t = inputs(mode, shape, torch.float32, tdtype, device, seed=3)
        for region, pixel in (("dice", "bce"), ("dice", "focal"), ("iou", "bce"),
                              ("tversky", "bce"), ("iou", "topk")):
            case(f"{region}+{pixel} {mode}", region_pixel_loss, x, t, mode=mode, region=region,
                 pixel=pixel)
    # TopK ties: constant logits, selection = lowest flat indices
    x = torch.full((3, 1, 50, 70), 1.5, device=device)
    t = torch.ones_like(x)
    for k in (0.1, 0.37, 0.6):
        case(f"topk ties k={k}", F.topk_loss, x, t, k=k)
        xg = x.clone().requires_grad_(True)
        F.topk_loss(xg, t, k, backend="triton").backward()
        sel = (xg.grad.reshape(-1) != 0).cpu()
        n = topk_count(k, sel.numel())
        count += 1
        if not (sel[:n].all() and not sel[n:].any()):
            failures.append(f"topk ties k={k} selection")
            print(f"FAIL topk ties k={k}: selection is not the first {n} elements")
    # no host synchronisation inside the losses
    if device.type == "cuda":
        xb, tb = inputs("binary", (4, 1, 64, 64), torch.bfloat16, torch.uint8, device)
        xm, tm = inputs("multiclass", (2, 4, 32, 32), torch.float32, torch.int64, device)
        xb.requires_grad_(True)
        xm.requires_grad_(True)
        calls = [lambda fn=fn: fn(xb, tb, backend="triton", check_values=False).backward()
                 for fn in LOSSES.values()]
        calls += [lambda fn=fn: fn(xm, tm, mode="multiclass", ignore_index=3, backend="triton",
                                   check_values=False).backward() for fn in LOSSES.values()]
        calls.append(lambda: region_pixel_loss(xb, tb, pixel="focal", backend="triton",
                                               check_values=False).backward())
        for call in calls:
            call()
        torch.cuda.synchronize()
        count += 1
        torch.cuda.set_sync_debug_mode("error")
        try:
            for call in calls:
                call()
            print("ok   no host synchronisation in any Triton loss (forward + backward)")
        except Exception as exc:
            failures.append("host sync")
            print(f"FAIL host synchronisation: {type(exc).__name__}: {exc}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"cuda_selfcheck: {count - len(failures)}/{count} passed in "
          f"{time.monotonic() - start:.0f} s" + (f"; FAILED: {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
