"""Compile every Triton kernel variant for a GPU target without a GPU (a developer check).

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute but not that they
compile. This script intercepts each kernel launch made by the dynloss Triton autograd
Functions on CPU tensors and, instead of launching, compiles the kernel ahead of time for
``--arch`` (default sm_90: H100/H200) down to a cubin with Triton's bundled ``ptxas``.
Outputs of the intercepted launches are left uninitialised; only compilation is checked.
Every variant the losses can launch is covered: region (pooled, per image, every reduction),
BCE/Focal (alpha, sum), composites, TopK (with and without ignore_index, alpha, sum), the
``ddp_pool`` sums, for binary and multiclass inputs in float32/float16/bfloat16, logits and
probabilities, several target dtypes.

Usage::

    PYTHONPATH=src python benchmarks/compile_check.py [--arch 90] [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check.py needs TRITON_INTERPRET unset (it compiles, it does not interpret)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dynloss._params import composite_params, distribution_params, region_params
from dynloss.kernels.triton import stream, topk

_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.float64: "fp64", torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16",
    torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}


class _Compiler:
    """Stands in for a ``JITFunction``: ``kernel[grid](*args, **kw)`` compiles, no launch."""

    def __init__(self, fn, target: GPUTarget, seen: dict):
        self.fn, self.target, self.seen = fn, target, seen

    def __getitem__(self, grid):
        return self._compile

    def _compile(self, *args, **kwargs):
        fn = self.fn
        names = fn.arg_names
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        values = dict(zip(names, args, strict=False))
        values.update(kwargs)
        for param in fn.params:  # a parameter left to its default (a defaulted constexpr)
            if param.name not in values and param.default is not inspect.Parameter.empty:
                values[param.name] = param.default
        signature, constexprs = {}, {}
        for i, name in enumerate(names):
            value = values[name]
            if fn.params[i].is_constexpr:
                signature[name] = "constexpr"
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _TYPES[value.dtype]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
        key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
               tuple(sorted(options.items())))
        if key in self.seen:
            return
        start = time.perf_counter()
        triton.compile(ASTSource(fn, signature, constexprs), target=self.target, options=options)
        self.seen[key] = time.perf_counter() - start


def _patch(target: GPUTarget, seen: dict) -> None:
    for module in (stream, topk):
        for name in dir(module):
            obj = getattr(module, name)
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.jit.JITFunction):
                setattr(module, name, _Compiler(obj, target, seen))


def _exercise(x, t, mode: str, from_logits: bool, ignore, alpha) -> None:
    """Forward and backward of every Triton autograd Function for one configuration."""
    common = dict(mode=mode, from_logits=from_logits, ignore_index=ignore)
    for per_image, reduction in ((False, "mean"), (True, "mean"), (False, "none"),
                                 (True, "sum")):
        params = region_params(alpha=0.3, beta=0.7, per_image=per_image, reduction=reduction,
                               **common)
        loss = stream.TritonFusedLoss.apply(x, t, mode, params, False)
        loss.sum().backward()
    sums_params = region_params(alpha=0.5, beta=0.5, ddp_pool=True, **common)
    sums = stream.TritonRegionSums.apply(x, t, sums_params, False)
    (sums[0].sum() + sums[1].sum()).backward()
    for gamma, reduction in ((0.0, "mean"), (2.0, "mean"), (2.0, "sum")):
        dist = distribution_params(gamma=gamma, alpha=alpha if gamma else None,
                                   reduction=reduction, **common)
        stream.TritonFusedLoss.apply(x, t, mode, dist, False).backward()
    for gamma in (0.0, 2.0):  # per-element losses (the ELEMENTS and CLAMP variants)
        dist = distribution_params(gamma=gamma, alpha=alpha if gamma else None,
                                   reduction="none", **common)
        stream.TritonFusedLoss.apply(x, t, mode, dist, False).sum().backward()
        composite = composite_params(region_params(alpha=0.5, beta=0.5, **common),
                                     distribution_params(gamma=gamma, alpha=None, **common),
                                     0.7, 1.3)
        combined, _region, _dist = stream.TritonFusedLoss.apply(x, t, mode, composite, False)
        combined.backward()
    for gamma, reduction in ((0.0, "mean"), (2.0, "sum")):
        dist = distribution_params(gamma=gamma, alpha=alpha if gamma else None, k=0.3,
                                   reduction=reduction, **common)
        topk.TritonTopK.apply(x, t, dist, False).backward()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--quick", action="store_true", help="fewer dtype combinations")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    seen: dict = {}
    _patch(target, seen)
    dtypes = [torch.float32, torch.bfloat16] if args.quick else [
        torch.float32, torch.float16, torch.bfloat16]
    failures = 0
    started = time.perf_counter()
    cases = itertools.product(["binary", "multiclass"], dtypes, [True, False], [None, 255])
    for mode, dtype, from_logits, ignore in cases:
        c = 3 if mode == "multiclass" else 1
        x = torch.zeros(2, c, 40, dtype=dtype, requires_grad=True)
        if mode == "multiclass":
            t = torch.zeros(2, 40, dtype=torch.int64)
            alpha = (1.0, 2.0, 3.0)
        else:
            t = torch.zeros(2, 1, 40, dtype=torch.uint8)
            alpha = 0.25
        try:
            _exercise(x, t, mode, from_logits, ignore, alpha)
        except Exception as exc:  # report and go on
            failures += 1
            root = exc
            while root.__cause__ is not None:
                root = root.__cause__
            print(f"FAIL {mode} {dtype} logits={from_logits} ignore={ignore}: "
                  f"{type(root).__name__}: {root}", flush=True)
    # other target dtypes (binary) and a multilabel layout
    for tdtype in (torch.float32, torch.bool, torch.int64, torch.float16):
        x = torch.zeros(2, 2, 40, requires_grad=True)
        t = torch.zeros(2, 2, 40, dtype=tdtype)
        try:
            _exercise(x, t, "multilabel", True, None, 0.25)
        except Exception as exc:
            failures += 1
            print(f"FAIL target {tdtype}: {type(exc).__name__}: {exc}", flush=True)
    total = sum(seen.values())
    print(f"compiled {len(seen)} kernel variants for sm_{args.arch} in {total:.1f} s "
          f"({time.perf_counter() - started:.0f} s in all); {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
