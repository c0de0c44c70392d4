"""The Triton path on a GPU without pytest: values, no host sync, launches, graphs, compile.

A compact, dependency-free companion of the CUDA tests (``tests/test_kernels_triton.py``,
``tests/test_triton_launches.py``, ``tests/test_triton_graphs.py``) for machines that have
torch and Triton but no test tools. Prints one line per check and a summary; exits 1 if any
check fails. Checks:

* values and gradients against the reference backend, every loss, mode, input dtype, several
  target dtypes, ``ignore_index``, composites, TopK ties;
* NaN of a non-finite logit and of an invalid target, with no host synchronisation;
* no host synchronisation in any loss (``torch.cuda.set_sync_debug_mode("error")``);
* launches per forward+backward counted by the profiler (kernels, memsets, copies; the
  autograd seed made outside): at most 4 (Dice, IoU, Tversky, BCE, Focal, composites), at
  most 6 (TopK);
* a forward+backward step captured in a CUDA graph and replayed on new data = eager;
* ``torch.compile(fullgraph=True, mode="reduce-overhead")`` = eager.

Usage::

    PYTHONPATH=src python benchmarks/cuda_selfcheck.py
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
import traceback
import warnings

import torch

import dynloss
import dynloss.functional as F
from dynloss.functional.distribution import topk_count
from dynloss.kernels import resolve_backend

LOSSES = {
    "dice": F.dice_loss, "iou": F.iou_loss, "tversky": F.tversky_loss,
    "bce": F.bce_loss, "focal": F.focal_loss, "topk": F.topk_loss,
}
LAUNCH_GOAL = {"topk": 6}
"""At most 4 launches per forward+backward, 6 for TopK."""


def inputs(mode: str, shape: tuple[int, ...], dtype, tdtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype)
    if mode == "multiclass":
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    else:
        t = (torch.rand(shape, generator=gen) > 0.6).float()
    return x, t.to(device=device, dtype=tdtype)


def composite(region: str, pixel: str, **kw):
    """``fn(x, t, backend=None, **more)``: the fused CompositeLoss of two terms."""
    classes = {"dice": dynloss.DiceLoss, "iou": dynloss.IoULoss, "tversky": dynloss.TverskyLoss,
               "bce": dynloss.BCELoss, "focal": dynloss.FocalLoss, "topk": dynloss.TopKLoss}

    def fn(x, t, backend=None, **more):
        options = dict(kw, **more)
        if backend is not None:
            options["backend"] = backend
        return dynloss.CompositeLoss([classes[region](**options),
                                      classes[pixel](**options)])(x, t)

    return fn


def run(fn, x, t, backend, **kw):
    xg = x.detach().clone().requires_grad_(True)
    value = fn(xg, t, backend=backend, **kw)
    value.sum().backward()
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
    if dv > vtol * want.abs().max().item() + 1e-6:
        return f"value {got.tolist()} vs reference {want.tolist()}"
    if dg > gtol * scale + 1e-7:
        return f"gradient max diff {dg:.3g} (scale {scale:.3g})"
    return None


def launches(step) -> int:
    """GPU activities (kernels, memsets, copies) of one ``step`` per the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    warnings.simplefilter("ignore")
    start = time.monotonic()
    failures: list[str] = []
    count = 0
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}; auto backend resolves to "
              f"{resolve_backend(torch.zeros(1, device=device), 'auto')}")

    def record(label: str, err: str | None) -> None:
        nonlocal count
        count += 1
        print(("FAIL " if err else "ok   ") + label + (f": {err}" if err else ""), flush=True)
        if err:
            failures.append(label)

    def case(label: str, body) -> None:
        try:
            err = body()
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        record(label, err)

    # -------------------------------------------------------------- values and gradients
    modes = [("binary", (2, 1, 37, 41), torch.float32),
             ("multilabel", (2, 3, 9, 8, 7), torch.uint8),
             ("multiclass", (2, 5, 33, 31), torch.int64)]
    for (mode, shape, tdtype), dtype, name in itertools.product(
            modes, [torch.float32, torch.bfloat16, torch.float16], LOSSES):
        x, t = inputs(mode, shape, dtype, tdtype, device)
        case(f"{name} {mode} {tuple(shape)} x={dtype} t={tdtype}",
             lambda x=x, t=t, name=name, mode=mode: check(LOSSES[name], x, t, mode=mode))
    for mode, shape, _ in modes:
        x, t = inputs(mode, shape, torch.float32, torch.int64, device, seed=1)
        t[0, ..., :3] = 255
        for name in LOSSES:
            case(f"{name} {mode} ignore_index=255",
                 lambda x=x, t=t, name=name, mode=mode: check(LOSSES[name], x, t, mode=mode,
                                                              ignore_index=255))
    for tdtype in (torch.bool, torch.int64, torch.float16):
        x, t = inputs("binary", (2, 1, 40, 40), torch.float32, tdtype, device, seed=2)
        for name in ("dice", "focal", "topk"):
            case(f"{name} binary t={tdtype}",
                 lambda x=x, t=t, name=name: check(LOSSES[name], x, t))
    for mode, shape, tdtype in modes:
        x, t = inputs(mode, shape, torch.float32, tdtype, device, seed=3)
        for region, pixel in (("dice", "bce"), ("dice", "focal"), ("iou", "bce"),
                              ("tversky", "focal"), ("iou", "topk")):
            case(f"{region}+{pixel} {mode}",
                 lambda x=x, t=t, mode=mode, region=region, pixel=pixel: check(
                     composite(region, pixel, mode=mode), x, t))
    # a region term without class 0 and with class weights, fused with BCE (the epilogue's
    # class choice)
    for mode, shape, tdtype in modes[1:]:
        x, t = inputs(mode, shape, torch.float32, tdtype, device, seed=4)

        def chosen(x, t, backend=None, mode=mode, c=shape[1]):
            kw = dict(mode=mode, backend=backend or "auto")
            return dynloss.CompositeLoss([
                dynloss.DiceLoss(include_background=False,
                                 weight=[0.5 + i for i in range(c - 1)], **kw),
                dynloss.BCELoss(**kw)])(x, t)

        case(f"dice(no background, weights)+bce {mode}",
             lambda x=x, t=t, fn=chosen: check(fn, x, t))
    # TopK ties: constant logits, selection = lowest flat indices
    x = torch.full((3, 1, 50, 70), 1.5, device=device)
    t = torch.ones_like(x)
    for k in (0.1, 0.37, 0.6):
        def ties(k=k) -> str | None:
            err = check(F.topk_loss, x, t, k=k)
            xg = x.clone().requires_grad_(True)
            F.topk_loss(xg, t, k, backend="triton").backward()
            sel = (xg.grad.reshape(-1) != 0).cpu()
            n = topk_count(k, sel.numel())
            if not (sel[:n].all() and not sel[n:].any()):
                return err or f"selection is not the first {n} elements"
            return err
        case(f"topk ties k={k}", ties)
    if device.type != "cuda":
        print(f"cuda_selfcheck: {count - len(failures)}/{count} passed")
        return 1 if failures else 0

    # ------------------------------------------------------- NaN and invalid values (GPU)
    xb, tb = inputs("binary", (4, 1, 64, 64), torch.bfloat16, torch.uint8, device)
    xm, tm = inputs("multiclass", (2, 4, 32, 32), torch.float32, torch.int64, device)

    def nan_checks() -> str | None:
        bad_x = xb.clone()
        bad_x[1, 0, 3, 4] = float("nan")
        bad_t = tm.clone()
        bad_t[0, 5, 5] = 7  # a label outside [0, C): no host check on CUDA by default
        for name, fn in LOSSES.items():
            for x, t, mode in ((bad_x, tb, "binary"), (xm, bad_t, "multiclass")):
                value, grad = run(fn, x, t, "triton", mode=mode)
                if not (torch.isnan(value).all() and torch.isnan(grad).any()):
                    return f"{name} {mode}: loss {value.tolist()} is not NaN"
        return None
    case("NaN for a NaN logit and for an invalid class index (every loss)", nan_checks)

    # ----------------------------------------------------------------- no host sync
    calls = [lambda fn=fn: fn(xb.requires_grad_(True), tb, backend="triton",
                              check_values=False).backward() for fn in LOSSES.values()]
    calls += [lambda fn=fn: fn(xm.requires_grad_(True), tm, mode="multiclass", ignore_index=3,
                               backend="triton", check_values=False).backward()
              for fn in LOSSES.values()]
    comp = composite("dice", "focal", backend="triton", check_values=False)
    calls.append(lambda: comp(xb.requires_grad_(True), tb).backward())

    def no_sync() -> str | None:
        for call in calls:
            call()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for call in calls:
                call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return None
    case("no host synchronisation in any Triton loss (forward + backward)", no_sync)

    # ---------------------------------------------------------------- launches
    seed = torch.ones((), device=device)
    for (name, mode), per_image in itertools.product(
            itertools.product([*LOSSES, "dice+bce", "dice+focal"],
                              ["binary", "multilabel", "multiclass"]), (False,)):
        def count_launches(name=name, mode=mode, per_image=per_image) -> str | None:
            shape = {"binary": (4, 1, 64, 64), "multilabel": (2, 3, 32, 32),
                     "multiclass": (2, 4, 32, 32)}[mode]
            x, t = inputs(mode, shape, torch.float32,
                          torch.int64 if mode == "multiclass" else torch.float32, device)
            kw = dict(mode=mode, backend="triton", check_values=False)
            fn = (composite(*name.split("+"), **kw) if "+" in name
                  else functools.partial(LOSSES[name], **kw))
            xg = x.clone().requires_grad_(True)

            def step() -> None:
                xg.grad = None
                fn(xg, t).backward(seed)

            got = launches(step)
            goal = LAUNCH_GOAL.get(name, 4)
            print(f"     launches {name} {mode}: {got} (goal <= {goal})")
            return None if got <= goal else f"{got} launches > {goal}"
        case(f"launches {name} {mode}", count_launches)

    # ---------------------------------------------------------- CUDA graph capture
    for name in [*LOSSES, "dice+focal"]:
        def capture(name=name) -> str | None:
            kw = dict(mode="multiclass", check_values=False)
            fn = (composite("dice", "focal", backend="triton", **kw) if "+" in name
                  else lambda xs, ts, f=LOSSES[name]: f(xs, ts, backend="triton", **kw))
            x0, t0 = inputs("multiclass", (3, 4, 48, 40), torch.float32, torch.int64, device)
            xs, ts = x0.clone().requires_grad_(True), t0.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    xs.grad = None
                    fn(xs, ts).backward()
            torch.cuda.current_stream().wait_stream(side)
            xs.grad = None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = fn(xs, ts)
                loss.backward()
            grad = xs.grad
            for s in (1, 2):
                x1, t1 = inputs("multiclass", (3, 4, 48, 40), torch.float32, torch.int64,
                                device, seed=s)
                with torch.no_grad():
                    xs.copy_(x1)
                ts.copy_(t1)
                graph.replay()
                xe = x1.clone().requires_grad_(True)
                want = fn(xe, t1)
                want.backward()
                if not torch.allclose(loss, want, rtol=1e-5, atol=1e-6):
                    return f"replayed loss {loss.item()} vs eager {want.item()}"
                if not torch.allclose(grad, xe.grad, rtol=1e-4, atol=1e-6):
                    return "replayed gradient differs from eager"
            return None
        case(f"CUDA graph capture + replay: {name}", capture)

    # ------------------------------------------------- torch.compile reduce-overhead
    for name in ("dice", "focal", "topk", "dice+focal"):
        def compiled(name=name) -> str | None:
            kw = dict(mode="multiclass", check_values=False, backend="triton")
            module = (dynloss.CompositeLoss([dynloss.DiceLoss(**kw), dynloss.FocalLoss(**kw)])
                      if "+" in name else {"dice": dynloss.DiceLoss, "focal": dynloss.FocalLoss,
                                           "topk": dynloss.TopKLoss}[name](**kw))
            torch._dynamo.reset()
            cfn = torch.compile(module, fullgraph=True, mode="reduce-overhead")
            for s in range(4):
                torch.compiler.cudagraph_mark_step_begin()
                x, t = inputs("multiclass", (2, 4, 32, 32), torch.float32, torch.int64, device,
                              seed=s)
                xa, xb_ = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
                got = cfn(xa, t)
                got.backward()
                want = module(xb_, t)
                want.backward()
                if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                    return f"compiled {got.item()} vs eager {want.item()}"
                if not torch.allclose(xa.grad, xb_.grad, rtol=1e-4, atol=1e-6):
                    return "compiled gradient differs from eager"
            return None
        case(f"torch.compile(fullgraph=True, mode='reduce-overhead'): {name}", compiled)

    print(f"cuda_selfcheck: {count - len(failures)}/{count} passed in "
          f"{time.monotonic() - start:.0f} s" + (f"; FAILED: {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
